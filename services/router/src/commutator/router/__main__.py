"""``python -m commutator.router``: run the standalone router service."""

from commutator.common.runtime import run_role
from commutator.router.config import RouterServiceConfig
from commutator.router.service import RouterService

if __name__ == "__main__":
    raise SystemExit(run_role(RouterServiceConfig, "python -m commutator.router", RouterService))

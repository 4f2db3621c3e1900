"""``python -m commutator.frontend``: run the OpenAI-compatible frontend."""

from commutator.common.runtime import run_role
from commutator.frontend.config import FrontendConfig
from commutator.frontend.server import Frontend

if __name__ == "__main__":
    raise SystemExit(run_role(FrontendConfig, "python -m commutator.frontend", Frontend))

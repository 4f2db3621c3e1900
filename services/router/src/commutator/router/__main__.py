"""``python -m commutator.router``: run the standalone router service."""

from commutator.common.runtime import run
from commutator.router.service import _main

if __name__ == "__main__":
    raise SystemExit(run(_main))

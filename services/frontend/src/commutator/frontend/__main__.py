"""``python -m commutator.frontend``: run the OpenAI-compatible frontend."""

from commutator.common.runtime import run
from commutator.frontend.server import _main

if __name__ == "__main__":
    raise SystemExit(run(_main))

"""``python -m commutator.decode``: run a decode (aggregated) worker."""

from commutator.common.runtime import run
from commutator.decode.worker import _main

if __name__ == "__main__":
    raise SystemExit(run(_main))

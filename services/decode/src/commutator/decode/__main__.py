"""``python -m commutator.decode``: run a decode (aggregated) worker."""

from commutator.common.runtime import run_role
from commutator.decode.config import DecodeConfig
from commutator.decode.worker import DecodeWorker

if __name__ == "__main__":
    raise SystemExit(run_role(DecodeConfig, "python -m commutator.decode", DecodeWorker))

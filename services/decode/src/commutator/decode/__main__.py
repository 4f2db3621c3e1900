"""``python -m commutator.decode``: run a decode (aggregated) worker."""

from commutator.common.runtime import run, serve_role
from commutator.decode.config import DecodeConfig
from commutator.decode.worker import DecodeWorker

if __name__ == "__main__":
    raise SystemExit(run(serve_role(DecodeConfig, "python -m commutator.decode", DecodeWorker)))

"""``python -m commutator.prefill``: run a prefill worker."""

from commutator.common.runtime import run_role
from commutator.prefill.config import PrefillConfig
from commutator.prefill.worker import PrefillWorker

if __name__ == "__main__":
    raise SystemExit(run_role(PrefillConfig, "python -m commutator.prefill", PrefillWorker))

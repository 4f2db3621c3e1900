"""The models this frontend serves: the model cards workers publish, live.

A model is served while at least one live worker has a card for it (cards
leave with their worker's lease). Its tokenizer files are fetched from the
object store on first sight, into a local cache keyed by their content, so a
frontend serves a model it has never seen on disk.

Cards are untrusted (anything that can write etcd can publish one). A card that
discovery rejects (see :meth:`Discovery.watch_model_cards`) is logged there and
remembered here: the other models are served as before, and a request for a
model that has only rejected cards gets a 503 that says why.
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

from commutator.common.discovery import Discovery, ModelCard, ModelCardError, WatchKind
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
    def __init__(
        self, discovery: Discovery, events: EventPlane, namespace: str, cache_dir: Path, *, tiktoken: bool = True
    ) -> None:
        self._discovery = discovery
        self._tiktoken = tiktoken
        self._events = events
        self._namespace = namespace
        self._cache = cache_dir
        self.models: dict[str, ModelEntry] = {}
        self.rejected: dict[str, dict[int, str]] = {}
        """Models published only with cards that were rejected: instance id -> why."""
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
                    if ev.kind is WatchKind.PUT and ev.card is not None:
                        self._put(ev.model, ev.instance_id, ev.card)
                    elif ev.kind is WatchKind.PUT:
                        # Discovery logged why; a request for the model is told too.
                        self._drop(ev.model, ev.instance_id)
                        self.rejected.setdefault(ev.model, {})[ev.instance_id] = ev.error or "unreadable"
                    else:
                        self._drop(ev.model, ev.instance_id)
                self._synced.set()

    def _put(self, model: str, instance_id: int, card: ModelCard) -> None:
        self._forget_rejection(model, instance_id)
        entry = self.models.get(model)
        if entry is None:
            entry = self.models[model] = ModelEntry(model, card)
            log.info("model available: %s", model)
        elif card.artifacts != entry.card.artifacts:
            log.warning(
                "model %s: worker %x publishes other tokenizer files than the first; keeping the first",
                model,
                instance_id,
            )
        entry.instances.add(instance_id)

    def _drop(self, model: str, instance_id: int) -> None:
        """The card of ``instance_id`` for ``model`` is gone (or replaced by a rejected one)."""
        self._forget_rejection(model, instance_id)
        entry = self.models.get(model)
        if entry is None:
            return
        entry.instances.discard(instance_id)
        if not entry.instances:
            del self.models[model]
            if entry.loader is not None and not entry.loader.done():
                entry.loader.cancel()
            log.info("model gone (no workers left): %s", model)

    def _forget_rejection(self, model: str, instance_id: int) -> None:
        reasons = self.rejected.get(model)
        if reasons is not None:
            reasons.pop(instance_id, None)
            if not reasons:
                del self.rejected[model]

    def names(self) -> list[ModelEntry]:
        return sorted(self.models.values(), key=lambda e: e.name)

    async def preprocessor(self, name: str) -> Preprocessor:
        """The model's preprocessor (loaded on first use).

        ``ApiError``: 404 for a model nobody serves; 503 (code ``model_card_rejected``)
        for a model whose only cards were rejected, or whose card names a file that
        cannot be written safely; 503 for a model whose files are missing from the store.
        """
        entry = self.models.get(name)
        if entry is None:
            reasons = self.rejected.get(name)
            if reasons:
                instance_id, why = next(iter(reasons.items()))
                raise _rejected(name, f"the model card of worker {instance_id:x} was rejected: {why}")
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
        except ModelCardError as exc:
            log.error("model %s: not served: %s", name, exc)
            raise _rejected(name, str(exc)) from None
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
        # Off the event loop: reading a large tokenizer.json, building tiktoken's tables and checking the
        # two against each other take a good part of a second for a 150k-token vocabulary.
        pre = await asyncio.to_thread(
            Preprocessor.load,
            folder,
            chat_template=card.chat_template,
            eos_token_ids=card.eos_token_ids,
            context_length=card.context_length,
            tiktoken=self._tiktoken,
        )
        assert pre.encoder is not None
        log.info(
            "model %s: tokenizer and chat template loaded (tokenized through %s)",
            card.name,
            "tiktoken" if pre.encoder.fast is not None else "tokenizers",
        )
        return pre


def _rejected(name: str, why: str) -> ApiError:
    return ApiError(
        503, f"model '{name}' cannot be served: {why}", type="service_unavailable", code="model_card_rejected"
    )

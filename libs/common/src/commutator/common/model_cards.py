"""Model cards: how a worker tells frontends what it serves, tokenizer included.

A worker publishes its model's tokenizer files to the event plane's object
store (content-addressed, so every worker of a model shares one copy) and a
:class:`~commutator.common.discovery.ModelCard` in discovery that names them.
A frontend that has never seen the model on disk fetches the files back.

Cards are untrusted input (anything that can write etcd can publish one): a
frontend writes only the known :data:`ARTIFACT_FILES`, only under plain file
names, atomically.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path

from commutator.common.discovery import Discovery, ModelCard, check_artifact_name
from commutator.common.events import EventPlane
from commutator.common.subjects import model_bucket

__all__ = ["ARTIFACT_FILES", "fetch_model_artifacts", "publish_model"]

log = logging.getLogger(__name__)

ARTIFACT_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "config.json",
    "chat_template.jinja",
)


async def publish_model(
    discovery: Discovery,
    events: EventPlane,
    namespace: str,
    *,
    model_name: str,
    model_path: str | Path,
    block_size: int,
    context_length: int,
    eos_token_ids: tuple[int, ...] = (),
) -> ModelCard:
    """Upload the tokenizer files of ``model_path`` and publish the model card."""
    folder = Path(model_path)
    bucket = model_bucket(namespace)
    artifacts: dict[str, str] = {}
    for name in ARTIFACT_FILES:
        path = folder / name
        if not path.is_file():
            continue
        data = path.read_bytes()
        obj = f"{hashlib.sha256(data).hexdigest()[:32]}-{name}"
        await events.object_put(bucket, obj, data)
        artifacts[name] = obj
    chat_template = None
    tc = folder / "tokenizer_config.json"
    if tc.is_file():
        template = json.loads(tc.read_text()).get("chat_template")
        if isinstance(template, str):
            chat_template = template
    if chat_template is None and (folder / "chat_template.jinja").is_file():
        chat_template = (folder / "chat_template.jinja").read_text()
    card = ModelCard(
        name=model_name,
        block_size=block_size,
        context_length=context_length,
        chat_template=chat_template,
        eos_token_ids=eos_token_ids,
        artifact_bucket=bucket,
        artifacts=artifacts,
    )
    await discovery.publish_model_card(namespace, card)
    log.info("model card published: %s (%d artifacts)", model_name, len(artifacts))
    return card


async def fetch_model_artifacts(events: EventPlane, card: ModelCard, dest: str | Path) -> Path:
    """Download a card's files into ``dest`` (a folder a tokenizer loads from); returns ``dest``.

    Only the files of :data:`ARTIFACT_FILES` are written, each directly inside
    ``dest``: a card comes from discovery, which any process with etcd access
    can write, so every name is checked again here (whatever checked the card
    before) and :class:`~commutator.common.discovery.ModelCardError` is raised,
    before anything is written, for a name that is not a plain file name. A
    plain name this frontend does not know (a newer worker's extra file) is
    skipped with a log line: nothing here would read it, and refusing the card
    would make a model unservable across a version skew.

    Each file is written atomically (a temporary file in ``dest``, then
    ``os.replace``), so a reader never sees half a file and a symlink already
    at a file's name is replaced, not followed. ``FileNotFoundError`` if an
    object is missing from the store.
    """
    for name in card.artifacts:
        check_artifact_name(name)
    out = Path(dest)
    out.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 - a few small files, once per model
    for name, obj in card.artifacts.items():
        if name not in ARTIFACT_FILES:
            log.warning("model %s: skipping artifact %r (not a file this version reads)", card.name, name)
            continue
        data = await events.object_get(card.artifact_bucket, obj)
        if data is None:
            raise FileNotFoundError(
                f"model {card.name}: artifact {name} ({obj}) is missing from {card.artifact_bucket}"
            )
        _write_atomically(out, check_artifact_name(name), data)
    return out


def _write_atomically(folder: Path, name: str, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, folder / name)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise

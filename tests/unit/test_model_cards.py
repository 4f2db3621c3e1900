"""Model cards from discovery are untrusted: artifact names that are not plain file names are
rejected when the card is read and again before anything is written; files land atomically;
a frontend that sees a bad card keeps serving the other models."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest
from commutator.common.discovery import Discovery, MemoryBackend, MemoryStore, ModelCard
from commutator.common.events import MemoryBroker, MemoryEventPlane
from commutator.common.model_cards import ARTIFACT_FILES, fetch_model_artifacts, publish_model
from commutator.engines.tiny_model import ensure_tiny_model
from commutator.frontend.models import ModelRegistry
from commutator.frontend.protocol import ApiError

pytestmark = pytest.mark.unit

UNSAFE_NAMES = [
    "../escape",
    "../../escape",
    "nested/tokenizer.json",
    "..",
    ".",
    "",
    "tokenizer.json\x00.txt",
    "back\\slash",
    "x" * 256,
]


def card_json(artifacts: object, **extra: object) -> bytes:
    obj = {"name": "org/m", "block_size": 16, "context_length": 128, "artifact_bucket": "b", "artifacts": artifacts}
    obj.update(extra)
    return json.dumps(obj).encode()


def files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file() or p.is_symlink()}


@pytest.mark.parametrize("name", [*UNSAFE_NAMES, "/etc/passwd"])
def test_a_card_with_an_unsafe_artifact_name_is_rejected_when_read(name: str) -> None:
    with pytest.raises(ValueError, match="artifact name"):
        ModelCard.from_json(card_json({name: "obj"}))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("artifacts", ["tokenizer.json"]),
        ("artifacts", {"tokenizer.json": 5}),
        ("eos_token_ids", 5),
        ("eos_token_ids", ["2"]),
        ("block_size", "16"),
        ("context_length", None),
        ("chat_template", 3),
        ("artifact_bucket", 1),
        ("metadata", []),
    ],
)
def test_a_card_with_a_field_of_the_wrong_type_is_a_value_error(field: str, value: object) -> None:
    # A TypeError here would escape the frontend's watch loop (it skips unreadable cards on ValueError).
    obj = json.loads(card_json({"tokenizer.json": "obj"}))
    obj[field] = value
    with pytest.raises(ValueError, match=field):
        ModelCard.from_json(json.dumps(obj).encode())


def test_a_good_card_round_trips() -> None:
    card = ModelCard.from_json(card_json({n: f"obj-{n}" for n in ARTIFACT_FILES}, eos_token_ids=[2, 3]))
    assert card.artifacts == {n: f"obj-{n}" for n in ARTIFACT_FILES} and card.eos_token_ids == (2, 3)
    assert ModelCard.from_json(card.to_json()) == card


@pytest.mark.parametrize("name", UNSAFE_NAMES)
async def test_fetch_refuses_unsafe_names_and_writes_nothing_outside_dest(name: str, tmp_path: Path) -> None:
    # A card that never went through from_json (built in-process, or its dict changed later): the
    # writer checks every name again.
    plane = MemoryEventPlane(MemoryBroker())
    await plane.object_put("b", "tok", b'{"tok": 1}')
    await plane.object_put("b", "evil", b"pwned")
    dest = tmp_path / "cache" / "model"
    card = ModelCard(
        name="org/m",
        block_size=16,
        context_length=128,
        artifact_bucket="b",
        artifacts={"tokenizer.json": "tok", name: "evil"},
    )
    with pytest.raises(ValueError, match="artifact name"):
        await fetch_model_artifacts(plane, card, dest)
    assert not any(p.read_bytes() == b"pwned" for p in files_under(tmp_path) if p.is_file())
    assert {p for p in files_under(tmp_path) if not p.is_relative_to(dest)} == set()


async def test_fetch_refuses_an_absolute_name(tmp_path: Path) -> None:
    plane = MemoryEventPlane(MemoryBroker())
    await plane.object_put("b", "evil", b"pwned")
    target = tmp_path / "outside.txt"
    card = ModelCard(
        name="org/m", block_size=16, context_length=128, artifact_bucket="b", artifacts={str(target): "evil"}
    )
    with pytest.raises(ValueError, match="artifact name"):
        await fetch_model_artifacts(plane, card, tmp_path / "dest")
    assert not target.exists()


async def test_fetch_writes_the_known_files_atomically_and_skips_unknown_ones(tmp_path: Path) -> None:
    plane = MemoryEventPlane(MemoryBroker())
    await plane.object_put("b", "tok", b'{"tok": 1}')
    await plane.object_put("b", "cfg", b'{"cfg": 1}')
    await plane.object_put("b", "other", b"from a newer worker")
    dest = tmp_path / "dest"
    dest.mkdir()
    # A stale symlink where a file goes: replaced by the file, its target left alone (a plain
    # write would follow it out of the cache).
    outside = tmp_path / "outside.json"
    outside.write_bytes(b"keep me")
    (dest / "tokenizer.json").symlink_to(outside)
    card = ModelCard(
        name="org/m",
        block_size=16,
        context_length=128,
        artifact_bucket="b",
        artifacts={"tokenizer.json": "tok", "config.json": "cfg", "vocab.txt": "other"},
    )
    assert await fetch_model_artifacts(plane, card, dest) == dest
    assert outside.read_bytes() == b"keep me"
    assert not (dest / "tokenizer.json").is_symlink()
    assert sorted(os.listdir(dest)) == ["config.json", "tokenizer.json"]  # no temp files left, no unknown names
    assert (dest / "tokenizer.json").read_bytes() == b'{"tok": 1}'
    assert (dest / "config.json").read_bytes() == b'{"cfg": 1}'


async def test_a_frontend_rejects_a_bad_card_clearly_and_keeps_serving_the_others(tmp_path: Path) -> None:
    store = MemoryStore()
    plane = MemoryEventPlane(MemoryBroker())
    worker, frontend = Discovery(MemoryBackend(store)), Discovery(MemoryBackend(store))
    await worker.start()
    await frontend.start()
    model_dir = ensure_tiny_model()
    good = await publish_model(
        worker, plane, "ns", model_name="org/good", model_path=model_dir, block_size=16, context_length=128
    )
    # Any process that can write etcd can publish a card: one that names a file outside the cache.
    evil = dict(good.artifacts, **{"../../escape": good.artifacts["tokenizer.json"]})
    bad_key = f"/models/ns/org%2Fbad/{0xBAD:x}"
    await frontend.backend.put(bad_key, card_json(evil, name="org/bad", artifact_bucket=good.artifact_bucket))
    cache = tmp_path / "root" / "cache"
    registry = ModelRegistry(frontend, plane, "ns", cache)
    await registry.start()
    try:
        assert [e.name for e in registry.names()] == ["org/good"]
        pre = await registry.preprocessor("org/good")
        assert pre.encode("hello")
        with pytest.raises(ApiError) as err:
            await registry.preprocessor("org/bad")
        assert err.value.status == 503 and err.value.code == "model_card_rejected"
        assert "org/bad" in err.value.message and "../../escape" in err.value.message
        assert {p for p in files_under(tmp_path) if not p.is_relative_to(cache)} == set()
        # The bad card leaves with its key; the model is then simply unknown.
        await frontend.backend.delete(bad_key)
        for _ in range(100):
            try:
                await registry.preprocessor("org/bad")
            except ApiError as exc:
                if exc.status == 404:
                    break
            await asyncio.sleep(0.01)
        else:
            raise AssertionError("the deleted bad card is still reported")
    finally:
        await registry.close()
        await frontend.close()
        await worker.close()

"""What a migrated request is sent and what its consumer sees (``commutator.router.core.Progress``)."""

from __future__ import annotations

from commutator.router.migration import Progress
from commutator.v1 import common_pb2


def request(max_tokens: int = 10, min_tokens: int = 4) -> common_pb2.GenerateRequest:
    return common_pb2.GenerateRequest(
        request_id="r",
        model="m",
        token_ids=[1, 2, 3],
        sampling=common_pb2.SamplingOptions(seed=7, temperature=0.5),
        stop=common_pb2.StopConditions(max_tokens=max_tokens, min_tokens=min_tokens, stop_token_ids=[9]),
        lora_name="lora",
        cache_salt="salt",
        dp_rank=1,
    )


def resp(tokens: list[int], prompt: int = 0, cached: int = 0) -> common_pb2.GenerateResponse:
    return common_pb2.GenerateResponse(token_ids=tokens, prompt_tokens=prompt, cached_prompt_tokens=cached)


def test_a_migrated_request_continues_the_prompt_with_the_streamed_tokens_and_the_rest_of_its_budget() -> None:
    orig = request()
    p = Progress(orig)
    p.take(resp([5], prompt=3, cached=0))
    p.take(resp([6, 7]))
    first = p.migrate(orig)
    assert list(first.token_ids) == [1, 2, 3, 5, 6, 7]
    assert (first.stop.max_tokens, first.stop.min_tokens) == (7, 1)
    assert list(first.stop.stop_token_ids) == [9] and first.sampling.seed == 7
    assert (first.request_id, first.lora_name, first.cache_salt) == ("r", "lora", "salt")
    assert not first.HasField("dp_rank")  # the new worker's rank is the router's choice
    assert list(orig.token_ids) == [1, 2, 3] and orig.stop.max_tokens == 10  # the original is untouched
    # Migrated again after more tokens: the budget counts from the original request, not the first migration.
    p.take(resp([8, 8, 8], prompt=6, cached=6))
    second = p.migrate(first)
    assert list(second.token_ids) == [1, 2, 3, 5, 6, 7, 8, 8, 8]
    assert (second.stop.max_tokens, second.stop.min_tokens) == (4, 0)
    assert p.migrations == 2 and not p.done


def test_the_consumer_sees_the_original_prompts_usage_once() -> None:
    p = Progress(request())
    first = resp([5], prompt=3, cached=2)
    p.take(first)
    assert (first.prompt_tokens, first.cached_prompt_tokens) == (3, 2)  # not migrated: untouched
    p.migrate(request())
    again = resp([6], prompt=4, cached=4)  # the new worker counts the longer prompt
    p.take(again)
    assert (again.prompt_tokens, again.cached_prompt_tokens) == (0, 0)  # already reported: cleared


def test_a_prompt_first_reported_after_migration_is_the_original_length() -> None:
    p = Progress(request())
    p.take(resp([5]))  # a worker that sent tokens before any prompt counts
    p.migrate(request())
    late = resp([6], prompt=4, cached=4)
    p.take(late)
    assert (late.prompt_tokens, late.cached_prompt_tokens) == (3, 3)


def test_a_request_whose_whole_budget_was_streamed_only_lacks_its_end() -> None:
    p = Progress(request(max_tokens=3, min_tokens=0))
    p.take(resp([5, 6, 7], prompt=3))
    p.migrate(request(max_tokens=3))
    assert p.done
    assert p.final().finish_reason == common_pb2.FINISH_REASON_LENGTH
    unbounded = Progress(request(max_tokens=0))  # up to the context limit: the engine decides
    unbounded.take(resp([5, 6, 7], prompt=3))
    assert unbounded.migrate(request(max_tokens=0)).stop.max_tokens == 0 and not unbounded.done


def test_push_mode_counts_what_the_sink_is_handed() -> None:
    p = Progress(request())
    seen: list[list[int]] = []
    sink = p.counting(lambda r: seen.append(list(r.token_ids)) or False)
    assert sink(resp([5, 6], prompt=3)) is False
    sink(resp([7]))
    assert seen == [[5, 6], [7]] and p.generated == [5, 6, 7] and p.started


def test_past_the_limit_the_failure_is_unavailable_and_counted() -> None:
    import pytest
    from commutator.common.errors import Unavailable
    from prometheus_client import CollectorRegistry, Counter

    counter = Counter("m", "migrations", ["outcome"], registry=CollectorRegistry())
    p = Progress(request())
    p.take(resp([5], prompt=3))
    once = p.migrate_or_raise(request(), RuntimeError("worker gone"), 1, counter)
    assert list(once.token_ids) == [1, 2, 3, 5]
    with pytest.raises(Unavailable, match=r"worker gone \(request r migrated 1 times already: --migration-limit 1\)"):
        p.migrate_or_raise(once, RuntimeError("worker gone"), 1, counter)
    assert counter.labels("migrated")._value.get() == 1 and counter.labels("limit")._value.get() == 1

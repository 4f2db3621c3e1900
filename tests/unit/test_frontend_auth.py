"""API keys (``--api-keys-file``): the file format and its errors, the key check, the per-key token bucket."""

from __future__ import annotations

import pytest
from commutator.frontend.auth import ApiKeys, ApiKeysError, TokenBucket, load_api_keys, parse_api_keys

pytestmark = pytest.mark.unit

ALICE = "sk-alice-0123456789abcdef"
BATCH = "sk-batch-0123456789abcdef"
CI = "sk-ci-0123456789abcdefgh"
FILE = f"""
# name   key   limit
alice  {ALICE}  10/s
  batch\t{BATCH}   600/m

ci {CI}
"""


def test_the_file_gives_names_keys_and_limits() -> None:
    keys = parse_api_keys(FILE, "keys.txt")
    assert [(k.name, k.key, k.rate_per_s, k.burst) for k in keys] == [
        ("alice", ALICE, 10.0, 10.0),
        ("batch", BATCH, 10.0, 600.0),
        ("ci", CI, None, 0.0),
    ]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "keys.txt: no keys"),
        ("# only a comment\n", "keys.txt: no keys"),
        (f"alice {ALICE} 10/s extra", "keys.txt:1: expected 'NAME KEY [LIMIT]', got 4 fields"),
        (f"\n{ALICE}", "keys.txt:2: expected 'NAME KEY [LIMIT]', got 1 fields"),
        (f"al/ice {ALICE}", "keys.txt:1: the name must be 1 to 64"),
        ("alice short", "keys.txt:1: the key of 'alice' must be 16 to 256 printable ASCII characters, got 5"),
        ("alice sk-\u00e9\u00e9\u00e9\u00e9\u00e9\u00e9\u00e9\u00e9\u00e9\u00e9\u00e9\u00e9\u00e9\u00e9", "printable"),
        (f"alice {ALICE}\nalice {BATCH}", "keys.txt:2: the name 'alice' appears twice"),
        (f"alice {ALICE}\nbob {ALICE}", "keys.txt:2: the key of 'bob' is also the key of an earlier line"),
        (f"alice {ALICE} 10", "keys.txt:1: the limit must be N/s or N/m"),
        (f"alice {ALICE} 10/h", "keys.txt:1: the limit must be N/s or N/m"),
        (f"alice {ALICE} 0/s", "keys.txt:1: the limit must be a number of requests in (0, 1e9]"),
        (f"alice {ALICE} 1e400/s", "keys.txt:1: the limit must be N/s or N/m"),
    ],
)
def test_a_bad_file_is_one_clear_error_that_never_shows_a_key(text: str, message: str) -> None:
    with pytest.raises(ApiKeysError) as err:
        parse_api_keys(text, "keys.txt")
    assert message in str(err.value)
    for key in (ALICE, BATCH, "short"):
        assert key not in str(err.value)


def test_an_unreadable_file_is_an_error_naming_it(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ApiKeysError, match=r"cannot read the API keys file .*missing\.txt"):
        load_api_keys(tmp_path / "missing.txt")
    bad = tmp_path / "latin1.txt"
    bad.write_bytes(b"alice sk-\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\n")
    with pytest.raises(ApiKeysError, match="cannot read"):
        load_api_keys(bad)
    good = tmp_path / "keys.txt"
    good.write_text(FILE)
    assert load_api_keys(good).names == ("alice", "batch", "ci")


def test_only_a_bearer_header_with_a_known_key_is_let_in() -> None:
    keys = ApiKeys(parse_api_keys(FILE))
    assert keys.identify(f"Bearer {ALICE}").name == "alice"  # type: ignore[union-attr]
    assert keys.identify(f"bearer  {CI} ").name == "ci"  # type: ignore[union-attr]
    for header in (None, "", "Bearer", "Bearer ", ALICE, f"Basic {ALICE}", f"Bearer {ALICE}x", f"Bearer {ALICE[:-1]}"):
        assert keys.identify(header) is None, header
    assert keys.identify("Bearer sk-\udcff\udcfe-not-utf8-at-all") is None  # undecodable header bytes
    assert len(keys) == 3


def test_no_printed_form_shows_a_key() -> None:
    keys = ApiKeys(parse_api_keys(FILE))
    shown = repr(keys) + repr(list(parse_api_keys(FILE)))
    assert "alice" in shown and "batch" in shown
    for key in (ALICE, BATCH, CI):
        assert key not in shown
    many = ApiKeys(parse_api_keys("\n".join(f"k{i} sk-{i:020d}" for i in range(25))))
    assert repr(many).endswith("... (15 more))") and "k9" not in repr(many)  # names sort as strings


def test_the_bucket_holds_its_burst_and_refills_at_its_rate() -> None:
    b = TokenBucket(rate_per_s=2.0, burst=3.0, now=100.0)
    assert [b.take(100.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert b.take(100.0) == pytest.approx(0.5)  # one token in half a second
    assert b.take(100.25) == pytest.approx(0.25)  # a refused request takes nothing
    assert b.take(100.5) == 0.0
    assert b.take(1000.0) == 0.0 and b.take(1000.0) == 0.0 and b.take(1000.0) == 0.0  # capped at the burst
    assert b.take(1000.0) > 0
    assert b.take(999.0) > 0  # time that goes back refills nothing


def test_check_applies_each_keys_own_limit() -> None:
    keys = ApiKeys(parse_api_keys(f"one {ALICE} 1/s\nfree {CI}"), now=0.0)
    assert keys.check(f"Bearer {ALICE}", 0.0).ok
    over = keys.check(f"Bearer {ALICE}", 0.1)
    assert (over.name, over.ok, over.retry_after_s) == ("one", False, pytest.approx(0.9))
    assert all(keys.check(f"Bearer {CI}", 0.1).ok for _ in range(1000))
    assert keys.check(f"Bearer {ALICE}", 1.0).ok
    nobody = keys.check("Bearer sk-nobody-0123456789abcdef", 1.0)
    assert (nobody.name, nobody.ok) == (None, False)


def test_a_reload_keeps_the_buckets_of_unchanged_keys() -> None:
    old = ApiKeys(parse_api_keys(f"one {ALICE} 1/s\ntwo {BATCH} 1/s"), now=0.0)
    assert old.check(f"Bearer {ALICE}", 0.0).ok and old.check(f"Bearer {BATCH}", 0.0).ok
    new = ApiKeys(parse_api_keys(f"one {ALICE} 1/s\ntwo {BATCH} 5/s"), now=0.0)
    new.carry_buckets_from(old)
    assert not new.check(f"Bearer {ALICE}", 0.0).ok  # same limit: still spent
    assert new.check(f"Bearer {BATCH}", 0.0).ok  # a new limit starts full

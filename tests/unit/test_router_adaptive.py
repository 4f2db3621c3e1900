"""The adaptive kv tuner (--router-adaptive): arm choice from TTFT, trust from predicted vs actual hits."""

from __future__ import annotations

import logging
import random

import pytest
from commutator.router.adaptive import _DECIDE_EVERY, _MIN_SAMPLES, _MIN_TRUST, AdaptiveTuner

pytestmark = pytest.mark.unit


def test_it_starts_from_the_default_weight_and_routes_agreed_requests_with_it() -> None:
    t = AdaptiveTuner((0.5, 1.0, 2.0), (0.0, 0.1), explore=1.0, rng=random.Random(1))
    assert [a.label() for a in t.arms][:2] == ["w=0.5,dw=1,T=0", "w=0.5,dw=1,T=0.1"]
    assert t.arms[t.best].weight == 1.0 and t.arms[t.best].temperature == 0.0
    # Where every arm picks the same worker the arm cannot matter: the best one, even at explore=1.
    assert {t.select([3] * 6) for _ in range(100)} == {t.best}
    assert t.contested == 0 and t.decisions == 100
    assert t.params(t.best) == (1.0, 0.0, 1.0)
    assert t.settings()[t.best] == t.params(t.best)


def test_decode_weights_are_a_dimension_of_the_arms_and_tuned_like_the_others() -> None:
    t = AdaptiveTuner((1.0, 2.0), decode_weights=(1.0, 0.25), explore=0.0, start=(2.0, 0.0, 0.25))
    assert [a.label() for a in t.arms] == ["w=1,dw=1,T=0", "w=1,dw=0.25,T=0", "w=2,dw=1,T=0", "w=2,dw=0.25,T=0"]
    assert t.params(t.best) == (2.0, 0.0, 0.25)  # the arm closest to the fixed settings
    ttft_ms = {0: 50.0, 1: 30.0, 2: 60.0, 3: 45.0}
    for i in range(4 * _MIN_SAMPLES + _DECIDE_EVERY):
        t.observe(i % 4, ttft_ms[i % 4] / 1000, 4, 4)
    assert t.best == 1 and t.params(t.best) == (1.0, 0.0, 0.25)


def test_contested_requests_explore_every_arm() -> None:
    t = AdaptiveTuner((0.5, 1.0, 2.0, 4.0), explore=1.0, rng=random.Random(2))
    assert {t.select([0, 0, 1, 1]) for _ in range(200)} == {0, 1, 2, 3}
    assert t.contested == 200


def test_unmeasured_arms_are_tried_first_then_thompson_sampling_favours_the_fastest() -> None:
    t = AdaptiveTuner((1.0,), decode_weights=(1.0, 0.5, 0.25), explore=0.0, rng=random.Random(4))
    tried = set()
    for _ in range(200):  # each arm needs two contested observations before it is compared
        arm = t.select([0, 1, 1])
        tried.add(arm)
        t.observe(arm, {0: 0.050, 1: 0.040, 2: 0.030}[arm] + random.Random(arm).random() * 1e-3, 0, 0)
        if all(a.samples >= 2 for a in t.arms):
            break
    assert tried == {0, 1, 2}
    picks = [t.select([0, 1, 1]) for _ in range(300)]
    for arm in picks:
        t.observe(arm, (30.0 + 20.0 * (arm == 0) + 10.0 * (arm == 1) + random.gauss(0, 5)) / 1000, 0, 0)
    later = [t.select([0, 1, 1]) for _ in range(200)]
    assert later.count(2) > 150  # the fastest arm routes most contested requests
    assert t.arms[t.best].decode_weight == 0.25


def test_uncontested_observations_only_update_the_trust() -> None:
    t = AdaptiveTuner((1.0, 2.0), explore=0.0)
    for _ in range(3 * _DECIDE_EVERY):
        t.observe(1, 0.001, predicted_blocks=4, cached_blocks=2, contested=False)
    assert [a.samples for a in t.arms] == [0, 0] and t.best == 0
    assert t.accuracy == pytest.approx(0.5)


def test_the_arm_with_the_lowest_ttft_becomes_the_best_and_the_change_is_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    t = AdaptiveTuner((0.5, 1.0, 2.0), explore=0.0, rng=random.Random(3))
    ttft_ms = {0: 80.0, 1: 60.0, 2: 40.0}  # weight 2 serves this workload best
    with caplog.at_level(logging.INFO, logger="commutator.router.adaptive"):
        for i in range(3 * _MIN_SAMPLES + _DECIDE_EVERY):
            arm = i % 3
            t.observe(arm, ttft_ms[arm] / 1000, predicted_blocks=4, cached_blocks=4)
    assert t.best == 2 and t.changes == 1
    assert t.arms[2].score_ms == pytest.approx(40.0) and t.arms[0].samples >= _MIN_SAMPLES
    assert "w=1,dw=1,T=0 -> w=2,dw=1,T=0" in caplog.text and "index accuracy 1.00" in caplog.text
    # A later shift in the workload moves it again: weight 0.5 becomes the fastest.
    for i in range(30 * _DECIDE_EVERY):
        arm = i % 3
        t.observe(arm, {0: 20.0, 1: 60.0, 2: 90.0}[arm] / 1000, 4, 4)
    assert t.best == 0 and t.changes == 2


def test_arms_with_too_few_samples_are_not_chosen() -> None:
    t = AdaptiveTuner((0.5, 1.0), explore=0.0)
    for _ in range(_DECIDE_EVERY):
        t.observe(1, 0.05, 0, 0)
    t.observe(0, 0.001, 0, 0)  # far faster, but one sample
    for _ in range(_DECIDE_EVERY):
        t.observe(1, 0.05, 0, 0)
    assert t.arms[t.best].weight == 1.0


def test_unconfirmed_predictions_lower_the_weight_used_within_bounds() -> None:
    t = AdaptiveTuner((2.0,), explore=0.0, half_life=10)
    for _ in range(200):
        t.observe(0, 0.03, predicted_blocks=10, cached_blocks=5)
    assert t.accuracy == pytest.approx(0.5, rel=1e-6)
    assert t.params(0) == (pytest.approx(1.0, rel=1e-6), 0.0, 1.0)
    for _ in range(200):
        t.observe(0, 0.03, predicted_blocks=10, cached_blocks=0)
    assert t.trust == _MIN_TRUST and t.params(0)[0] == pytest.approx(2.0 * _MIN_TRUST)
    for _ in range(200):
        t.observe(0, 0.03, predicted_blocks=4, cached_blocks=9)  # more than predicted: trust tops out at 1
    assert t.trust == pytest.approx(1.0, rel=1e-3) and t.params(0)[0] <= 2.0


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"weights": ()}, "weights"),
        ({"weights": (-1.0,)}, "weights"),
        ({"weights": (1.0,), "temperatures": (float("nan"),)}, "temperatures"),
        ({"weights": (1.0,), "decode_weights": ()}, "decode weights"),
        ({"weights": (1.0,), "decode_weights": (-0.1,)}, "decode weights"),
        ({"weights": (1.0,), "explore": 1.5}, "exploration"),
        ({"weights": (1.0,), "half_life": 0}, "half-life"),
    ],
)
def test_bad_settings_are_refused_clearly(kw: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        AdaptiveTuner(**kw)  # type: ignore[arg-type]


def test_bad_observations_are_ignored() -> None:
    t = AdaptiveTuner((1.0,))
    t.observe(0, float("nan"), 1, 1)
    t.observe(0, -1.0, 1, 1)
    t.observe(5, 0.01, 1, 1)
    assert t.arms[0].samples == 0

"""Seed racing (mdsearch.search.racing): a trial gets another group of seeds only while its
interval against a trial at no more cost still overlaps 0."""

import math

import pytest

from mdsearch.search.racing import MORE, STOP, Decision, Entrant, SeedRace

RACE = SeedRace("text_gain", "max", min_seeds=2, max_seeds=8, tie_margin=0.001)


def entrant(name, values, cost=0.0):
    return Entrant(name, dict(enumerate(values)), cost)


def test_an_overlapping_interval_asks_for_the_next_group():
    best = entrant("best", [0.050, 0.056])
    close = entrant("close", [0.052, 0.050])  # 0.002 apart, seed std ~0.004: open
    decision = RACE.decide(close, [best])
    assert decision.action == MORE and "overlaps best" in decision.reason
    assert RACE.next_seeds(close.n) == 2 and RACE.next_seeds(7) == 1 and RACE.next_seeds(8) == 0


def test_a_trial_confidently_worse_than_a_cheaper_one_stops_off_the_front():
    cheap = entrant("cheap", [0.050, 0.055, 0.052], cost=1.0)
    dear = entrant("dear", [0.040, 0.044, 0.043], cost=2.0)  # 0.010 worse on every seed
    decision = RACE.decide(dear, [cheap])
    assert decision.action == STOP and decision.reason.startswith("off the front")
    # the cheaper one is not judged against the dearer one: it is on the front by cost, and
    # races on (the others are judged against its mean)
    assert RACE.decide(cheap, [dear]) == Decision(
        MORE, "nothing at its cost or less: on the front so far")


def test_a_trial_on_the_front_races_on_to_max():
    cheap = entrant("cheap", [0.040, 0.044, 0.043], cost=1.0)
    dear = entrant("dear", [0.050, 0.055, 0.052], cost=2.0)
    assert RACE.decide(dear, [cheap]) == Decision(MORE, "on the front so far")
    done = entrant("dear", [0.050, 0.055, 0.052, 0.051] * 2, cost=2.0)
    assert RACE.decide(done, [cheap]) == Decision(STOP, "max seeds (8)")


def test_two_equal_trials_stop_tied_within_the_margin_instead_of_racing_to_max():
    a = entrant("a", [0.0500, 0.0504, 0.0502, 0.0506])
    b = entrant("b", [0.0501, 0.0503, 0.0504, 0.0505])  # means 0.00003 apart, std 0.0003
    decision = RACE.decide(b, [a])
    assert decision.action == STOP and decision.reason.startswith("tied with a")
    # without a margin the same pair keeps racing until max
    strict = SeedRace("text_gain", "max", tie_margin=0.0)
    assert strict.decide(b, [a]).action == MORE
    full = entrant("b", [0.0501, 0.0503, 0.0504, 0.0505] * 2)
    assert strict.decide(full, [entrant("a", [0.0500, 0.0504, 0.0502, 0.0506] * 2)]).reason \
        == "max seeds (8)"


def test_a_two_seed_trial_is_judged_with_the_fields_pooled_seed_noise():
    """Two seeds alone give t(1) = 12.7: hopeless. Pooled over a field of trials with the same
    seed noise, the same two seeds resolve a gap of a few seed stds."""
    a, b = entrant("a", [0.060, 0.064]), entrant("b", [0.050, 0.053])
    lo, hi = RACE.interval(a, b)
    assert lo < 0 < hi
    field = [a, b] + [entrant(f"f{i}", [0.03 + 0.004 * (i % 2), 0.032 - 0.003 * (i % 2),
                                         0.031, 0.033]) for i in range(6)]
    lo, hi = RACE.interval(a, b, field)
    assert 0 < lo < 0.0105 < hi


def test_the_interval_is_students_t_with_the_pooled_std():
    from scipy import stats

    a, b = entrant("a", [1.0, 2.0, 4.0]), entrant("b", [0.5, 1.0])
    ss = (1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2 + 2 * 0.25 ** 2
    sd, dof = math.sqrt(ss / 3), 3
    gap = 7 / 3 - 0.75
    half = stats.t.ppf(0.975, dof) * sd * math.sqrt(1 / 3 + 1 / 2)
    race = SeedRace("val_loss", "min")  # lower is better: a - b is worse by the gap
    assert race.interval(a, b) == pytest.approx((-gap - half, -gap + half))


@pytest.mark.parametrize("kwargs", [dict(mode="up"), dict(min_seeds=3, max_seeds=2),
                                    dict(min_seeds=0), dict(group=0),
                                    dict(tie_margin=math.nan), dict(tie_margin=-1)])
def test_a_malformed_race_is_refused(kwargs):
    with pytest.raises(ValueError):
        SeedRace(**{"metric": "text_gain", "mode": "max", **kwargs})

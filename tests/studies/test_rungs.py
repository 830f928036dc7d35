"""Budget rungs and the asynchronous MO promotion rule: order, bookkeeping, the Syne Tune case."""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mlbtc_search.errors import SpecError
from studies.rungs import (
    Ladder,
    RungSchedule,
    crowding_distances,
    nondominated_ranks,
    normalise,
    promotion_order,
)

coord = st.one_of(st.integers(1, 6).map(float), st.sampled_from([math.nan, math.inf]))
points_st = st.lists(st.tuples(coord, coord), max_size=30)


def brute_ranks(points):
    def ok(p):
        return all(math.isfinite(v) for v in p)

    def dominates(a, b):
        return a[0] <= b[0] and a[1] <= b[1] and (a[0] < b[0] or a[1] < b[1])

    ranks, remaining, r = {}, [i for i, p in enumerate(points) if ok(p)], 0
    while remaining:
        front = [i for i in remaining if not any(dominates(points[j], points[i])
                                                 for j in remaining)]
        ranks.update({i: r for i in front})
        remaining = [i for i in remaining if i not in front]
        r += 1
    return [ranks.get(i, r) for i in range(len(points))]


@settings(max_examples=300, deadline=None)
@given(points_st)
def test_ranks_equal_brute_force_peeling(points):
    assert nondominated_ranks(points) == brute_ranks(points)


# ---- the schedule -------------------------------------------------------------------------
def test_schedule_parses_yaml_values():
    s = RungSchedule.parse([1e11, 3e11, 10**12], {"eta": 3})
    assert s.budgets == (1e11, 3e11, 1e12) and s.eta == 3 and s.top == 2
    assert RungSchedule.parse([1e11]).eta == 3
    assert RungSchedule(**{"budgets": tuple(s.to_dict()["budgets"]),
                           "eta": s.to_dict()["promote"]["eta"]}) == s
    assert [s.quota(n) for n in range(8)] == [0, 0, 0, 1, 1, 1, 2, 2]


@pytest.mark.parametrize(("budgets", "promote", "match"), [
    ([3e11, 1e11], None, r"budgets\[1\]: budgets must increase strictly, got 1e\+11 after"),
    ([1e11, 1e11], None, r"budgets\[1\]: budgets must increase strictly"),
    ([1e11, "lots"], None, r"budgets\[1\]: a budget must be a positive number"),
    ([1e11, -1], None, r"budgets\[1\]: a budget must be a positive number"),
    ([], None, r"budgets: budgets must be a non-empty list"),
    (1e11, None, r"budgets: budgets must be a list of FLOPs"),
    ([1e11], {"eta": 1}, r"promote.eta: eta must be an integer >= 2, got 1"),
    ([1e11], {"eta": 2.5}, r"promote.eta: eta must be an integer >= 2"),
    ([1e11], {"eat": 3}, r"promote.eat: unknown key 'eat'; valid keys: eta"),
    ([1e11], [3], r"promote: promote must be a mapping"),
])
def test_schedule_errors_name_the_field(budgets, promote, match):
    with pytest.raises(SpecError, match=match):
        RungSchedule.parse(budgets, promote)


# ---- the order inside a rung --------------------------------------------------------------
def test_normalise_scales_loss_linearly_and_flops_in_log10():
    norm = normalise([(1.0, 1e6), (3.0, 1e8), (2.0, 1e7), (math.nan, 1e7)])
    assert norm[:3] == [(0.0, 0.0), (1.0, 1.0), (0.5, 0.5)]
    assert norm[3] == (math.inf, math.inf)


def test_crowding_gives_the_ends_infinity_and_interior_gaps():
    norm = [(0.0, 1.0), (0.2, 0.5), (0.6, 0.3), (1.0, 0.0)]
    d = crowding_distances(norm, [0, 1, 2, 3])
    assert d[0] == d[3] == math.inf
    assert d[1] == pytest.approx(0.6 + 0.7) and d[2] == pytest.approx(0.8 + 0.5)


def test_promotion_order_front_first_ends_first_then_crowding():
    points = [(3.0, 1e7), (1.0, 1e9), (2.0, 1e8), (2.5, 1e8), (1.6, 3e8), (math.nan, 1e6)]
    order = promotion_order(points)
    # front: 0 (cheapest), 1 (best loss), 2 and 4; 0 and 1 are its ends; 3 is dominated by 2
    assert order[:2] == [1, 0]  # both ends (inf crowding): lower loss first
    assert set(order[2:4]) == {2, 4} and order[4] == 3 and order[5] == 5


def test_a_point_dominating_the_whole_rung_is_promoted():
    """Syne Tune 0.16 MOASHA (default NonDominatedPriority) STOPs this (0.5, 0.5)."""
    ladder = Ladder(RungSchedule((1e11, 3e11), eta=3))
    for t, p in enumerate([(1, 1), (2, 2), (3, 3)]):
        ladder.record(t, 0, *p)
    ladder.record(3, 0, 0.5, 0.5)
    assert promotion_order([r.point for r in ladder.results(0)])[0] == 3
    assert ladder.promotable(0) == [3]
    assert ladder.next_promotion() == (3, 1)
    assert ladder.next_promotion() is None  # quota 4 // 3 = 1, and it is taken


# ---- asynchronous bookkeeping -------------------------------------------------------------
def test_promotions_happen_as_results_arrive_and_are_never_taken_back():
    ladder = Ladder(RungSchedule((1e11, 3e11, 1e12), eta=3))
    ladder.record("a", 0, 2.0, 1e6)
    ladder.record("b", 0, 3.0, 1e6)
    assert ladder.next_promotion() is None  # 2 results, quota 0: start a new trial
    ladder.record("c", 0, 1.0, 1e6)
    assert ladder.next_promotion() == ("c", 1)  # 3 results: the best third goes up at once
    assert ladder.in_flight() == [("c", 1)]
    ladder.record("d", 0, 0.5, 1e6)  # "d" beats "c", but "c" stays promoted
    assert ladder.is_promoted("c", 0) and ladder.promotable(0) == ["d"]
    assert ladder.next_promotion() == ("d", 1)
    ladder.record("c", 1, 0.9, 1e6, spent_flops=2e11)
    ladder.record("d", 1, 0.4, 1e6, spent_flops=2e11)
    assert ladder.next_promotion() is None  # rung 1 holds 2, quota 0
    for t, loss in zip("efg", (4.0, 5.0, 6.0), strict=True):
        ladder.record(t, 0, loss, 1e6)
    assert ladder.next_promotion() is None  # quota 7 // 3 = 2: "d" and "c", both promoted
    ladder.record("h", 0, 7.0, 1e6)
    ladder.record("i", 0, 8.0, 1e6)
    assert ladder.counts() == [9, 2, 0] and ladder.next_promotion() == ("a", 1)
    ladder.record("a", 1, 1.5, 1e6)
    # the highest rung is served first: rung 1 (quota 1: "d") before rung 0
    assert ladder.next_promotion() == ("d", 2)
    assert ladder.highest_rung("d") == 1 and ladder.promotable(2) == []
    ladder.record("d", 2, 0.3, 1e6, spent_flops=7e11)
    assert [r.rung for r in ladder.trial_results("d")] == [0, 1, 2]
    assert ladder.spent_flops() == pytest.approx(1.1e12)


def test_failed_results_are_ranked_last_and_never_promoted():
    ladder = Ladder(RungSchedule((1e11, 3e11), eta=2))
    ladder.record(0, 0, math.nan, 1e6)
    ladder.record(1, 0, math.nan, 1e6)
    assert ladder.next_promotion() is None  # the quota is 1, but the only candidates failed
    ladder.record(2, 0, 5.0, 1e6)
    ladder.record(3, 0, None, 1e6)
    assert ladder.next_promotion() == (2, 1)


def test_bookkeeping_refuses_impossible_records():
    ladder = Ladder(RungSchedule((1e11, 3e11), eta=2))
    ladder.record(0, 0, 1.0, 1e6)
    with pytest.raises(ValueError, match="already has a result at rung 0"):
        ladder.record(0, 0, 1.0, 1e6)
    with pytest.raises(ValueError, match="was not promoted to rung 1"):
        ladder.record(0, 1, 1.0, 1e6)
    with pytest.raises(ValueError, match=r"rung must be an integer in \[0, 1\], got 2"):
        ladder.record(0, 2, 1.0, 1e6)
    with pytest.raises(ValueError, match="top rung"):
        ladder.mark_promoted(0, 1)
    with pytest.raises(ValueError, match="has no result at rung 0"):
        ladder.mark_promoted(9, 0)


def test_replaying_finished_rungs_rebuilds_the_same_decisions():
    """A resumed driver replays records and promotions and continues where it stopped."""
    schedule = RungSchedule((1e11, 3e11, 1e12), eta=3)
    rng = random.Random(0)
    live = Ladder(schedule)
    log: list[tuple] = []
    started = 0
    for _ in range(60):
        nxt = live.next_promotion()
        if nxt is None:
            trial, rung = started, 0
            started += 1
        else:
            trial, rung = nxt
            log.append(("promote", trial, rung - 1))
        point = (rng.uniform(0, 1) / (rung + 1), 10 ** rng.uniform(5, 8))
        live.record(trial, rung, *point, spent_flops=schedule.budgets[rung])
        log.append(("record", trial, rung, *point))
    replayed = Ladder(schedule)
    for entry in log:
        if entry[0] == "record":
            replayed.record(*entry[1:3], *entry[3:])
        else:
            replayed.mark_promoted(entry[1], entry[2])
    assert replayed.counts() == live.counts()
    assert replayed.next_promotion() == live.next_promotion()
    assert replayed.counts()[0] > replayed.counts()[1] > replayed.counts()[2] > 0


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.floats(0.1, 9), st.floats(1e5, 1e9)), min_size=1, max_size=40),
       st.integers(2, 4))
def test_every_promotion_was_in_the_top_fraction_when_made(points, eta):
    ladder = Ladder(RungSchedule((1e11, 3e11), eta=eta))
    for t, p in enumerate(points):
        ladder.record(t, 0, *p)
        while (nxt := ladder.next_promotion()) is not None:
            results = ladder.results(0)
            order = promotion_order([r.point for r in results])
            top = {results[i].trial for i in order[: len(results) // eta]}
            assert nxt[0] in top
    # at the end every trial in the final top fraction has been promoted
    results = ladder.results(0)
    order = promotion_order([r.point for r in results])
    assert all(ladder.is_promoted(results[i].trial, 0) for i in order[: len(results) // eta])


# ---- settling: when a trial's Optuna trial can be told --------------------------------------
def test_max_results_bounds_each_rung():
    ladder = Ladder(RungSchedule((1e11, 3e11, 1e12), eta=3))
    for t in range(4):
        ladder.record(t, 0, float(t), 1e6)
    assert ladder.next_promotion() == (0, 1)
    # 4 recorded + 5 to come at rung 0: at most 9 -> 3 promoted -> 1 at the top
    assert ladder.max_results(5) == [9, 3, 1]
    assert ladder.max_results(0) == [4, 1, 0]


def test_settled_only_when_it_can_never_be_promoted():
    ladder = Ladder(RungSchedule((1e11, 3e11), eta=2))
    ladder.record("a", 0, 1.0, 1e6)
    ladder.record("b", 0, 2.0, 2e6)  # dominated by "a"
    ladder.record("c", 0, 0.5, 4e6)  # on the front with "a"
    # up to 2 more results: at most 5 -> quota 2; "b" has 1 dominator: it could still go up
    assert not ladder.settled("b", future=2)
    ladder.record("d", 0, 1.5, 1.5e6)  # a second dominator of "b"
    assert ladder.settled("b", future=1)  # at most 5 results, quota 2, 2 dominators
    assert not ladder.settled("b", future=2)  # 6 results could promote 3
    # the front {a, c}: both ends, lower loss first; "d" and "b" are dominated by "a"
    assert [ladder.next_promotion() for _ in range(3)] == [("c", 1), ("a", 1), None]
    assert not ladder.settled("c", future=0)  # promoted: training at rung 1
    ladder.record("c", 1, 0.4, 4e6)
    assert ladder.settled("c", future=0)  # the top rung
    ladder.record("e", 0, math.nan, 1e6)
    assert ladder.settled("e", future=5)  # a failed rung never goes up


def test_closed_trials_count_but_are_never_promoted():
    ladder = Ladder(RungSchedule((1e11, 3e11), eta=2))
    ladder.record("a", 0, 1.0, 1e6)
    ladder.close("a")
    ladder.record("b", 0, 2.0, 1e6)
    assert ladder.promotable(0) == [] and ladder.next_promotion() is None  # quota 1: "a"
    ladder.record("c", 0, 0.5, 1e6)
    ladder.record("d", 0, 3.0, 1e6)
    assert ladder.next_promotion() == ("c", 1)  # quota 2: "c" and "a" (closed)
    assert ladder.next_promotion() is None


def test_fidelity_settings_one_budget_or_rungs():
    from studies.rungs import fidelity_settings

    assert fidelity_settings(2e11, None, None, None) == (2e11, None, 1)
    budget, schedule, seeds = fidelity_settings(None, [1e11, 1e12], {"eta": 4}, {"seeds": 3})
    assert (budget, schedule.budgets, schedule.eta, seeds) == (1e12, (1e11, 1e12), 4, 3)
    for args, match in [
        ((None, None, None, None), r"budget: missing required key 'budget'"),
        ((1e11, [1e12], None, None), r"budgets: give either budget"),
        ((1e11, None, {"eta": 3}, None), r"promote: promote needs budgets"),
        ((1e11, None, None, {"seeds": 3}), r"confirm: confirm needs budgets"),
        ((None, [1e11], None, {"seed": 3}), r"confirm: confirm must be a mapping like"),
        ((None, [1e11], None, {"seeds": True}), r"confirm.seeds: seeds must be an integer"),
    ]:
        with pytest.raises(SpecError, match=match):
            fidelity_settings(*args)

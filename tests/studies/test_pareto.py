"""Pareto fronts and hypervolume: exact against brute force, known values, real studies."""

from __future__ import annotations

import math

import optuna
import pytest
from _study_factory import make_study
from hypothesis import given, settings
from hypothesis import strategies as st

from studies.pareto import (
    default_reference,
    front,
    hv_point,
    hypervolume,
    hypervolume_2d,
    hypervolume_history,
    hypervolume_history_points,
    pareto_front,
    study_summary,
)
from studies.record import StudyInfo, TrialRecord
from studies.storage import load_records, study_info

optuna.logging.set_verbosity(optuna.logging.WARNING)

# Small integer grids make ties (equal x, equal y, identical points) common; NaN and inf are
# never on a front.
coord = st.one_of(st.integers(0, 6).map(float), st.sampled_from([math.nan, math.inf]))
points_st = st.lists(st.tuples(coord, coord), max_size=25)


def brute_front(points):
    def finite(p):
        return all(math.isfinite(v) for v in p)

    def dominates(a, b):
        return a[0] <= b[0] and a[1] <= b[1] and (a[0] < b[0] or a[1] < b[1])

    return sorted(i for i, p in enumerate(points) if finite(p) and not any(
        finite(q) and dominates(q, p) for q in points))


def brute_hypervolume(points, ref):
    """Union area of the boxes [x, rx] x [y, ry] on the grid the coordinates make."""
    boxes = [p for p in points if all(math.isfinite(v) for v in p) and p[0] < ref[0]
             and p[1] < ref[1]]
    xs = sorted({p[0] for p in boxes} | {ref[0]})
    ys = sorted({p[1] for p in boxes} | {ref[1]})
    area = 0.0
    for x0, x1 in zip(xs, xs[1:], strict=False):
        for y0, y1 in zip(ys, ys[1:], strict=False):
            if any(p[0] <= x0 and p[1] <= y0 for p in boxes):
                area += (x1 - x0) * (y1 - y0)
    return area


@settings(max_examples=300, deadline=None)
@given(points_st)
def test_front_is_exactly_the_non_dominated_points(points):
    front = pareto_front(points)
    assert sorted(front) == brute_front(points)
    xs = [points[i][0] for i in front]
    assert xs == sorted(xs)  # sorted by the first objective


@settings(max_examples=300, deadline=None)
@given(points_st)
def test_hypervolume_equals_the_union_of_boxes(points):
    ref = (5.5, 5.0)
    assert hypervolume_2d(points, ref) == pytest.approx(brute_hypervolume(points, ref))


def test_ties_are_all_on_the_front():
    assert pareto_front([(1.0, 2.0), (1.0, 2.0), (1.0, 3.0), (2.0, 1.0)]) == [0, 1, 3]
    assert pareto_front([]) == []
    assert pareto_front([(math.nan, 1.0)]) == []


@pytest.mark.parametrize("points, ref, volume", [
    ([(1.0, 1.0)], (2.0, 2.0), 1.0),
    ([(1.0, 3.0), (2.0, 1.0)], (4.0, 4.0), 7.0),  # 3*1 + 2*3 - overlap 2*1
    ([(1.0, 3.0), (2.0, 1.0), (3.0, 3.5)], (4.0, 4.0), 7.0),  # a dominated point adds nothing
    ([(0.0, 0.0)], (1.0, 1.0), 1.0),
    ([(5.0, 0.0)], (4.0, 4.0), 0.0),  # beyond the reference
    ([], (1.0, 1.0), 0.0),
])
def test_hypervolume_of_known_sets(points, ref, volume):
    assert hypervolume_2d(points, ref) == pytest.approx(volume)


def test_default_reference_is_ten_percent_beyond_the_worst():
    assert default_reference([(1.0, 10.0), (2.0, 5.0)]) == pytest.approx((2.2, 11.0))
    assert default_reference([(0.0, -2.0)]) == pytest.approx((0.1, -1.8))
    with pytest.raises(ValueError, match="no finite points"):
        default_reference([(math.nan, 1.0)])
    # hv space is (loss, log10 FLOPs)
    assert hv_point(0.5, 1e4) == (0.5, 4.0)


def _rec(number, loss, flops, state="COMPLETE"):
    values = [loss, flops] if state == "COMPLETE" else None
    return TrialRecord.from_parts(number=number, optuna_state=state, values=values,
                                  user_attrs={"status": "failed"} if state == "FAIL" else {})


def test_hypervolume_history_never_decreases_and_ends_at_the_study_value():
    recs = [_rec(0, 1.0, 1e4), _rec(1, 0.9, 1e5), _rec(2, 1.2, 1e5), _rec(3, 0.0, 0.0, "FAIL"),
            _rec(4, 0.5, 1e6), _rec(5, 0.8, 1e3)]
    history = hypervolume_history(recs)
    assert [n for n, _ in history] == [0, 1, 2, 4, 5]
    volumes = [h for _, h in history]
    assert volumes == sorted(volumes) and volumes[0] > 0
    assert volumes[2] == volumes[1]  # trial 2 is dominated
    assert volumes[-1] == pytest.approx(hypervolume(recs))


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 6).map(float), st.integers(0, 6).map(float)),
                min_size=1, max_size=20))
def test_incremental_history_equals_recomputing_each_prefix(points):
    ref = (7.0, 7.0)
    history = hypervolume_history_points(points, ref)
    assert history == pytest.approx([hypervolume_2d(points[:k + 1], ref)
                                     for k in range(len(points))])


def test_records_front_and_summary_of_a_real_study(storage_url, tmp_path):
    study = make_study(storage_url, tmp_path / "artifacts")
    recs = load_records(study)
    assert [r.state for r in recs] == ["complete"] * 3 + ["infeasible", "failed", "duplicate"]
    row = recs[0].row()
    assert {"number", "state", "values", "family", "hash", "flops_per_token", "params",
            "reason", "val_loss", "sampled"} <= set(row)
    assert recs[4].reason.startswith("TrainingError") and recs[5].duplicate_of == 0
    assert recs[5].row()["reason"] == "duplicate of trial 0"
    assert isinstance(recs[0].spec, dict) and isinstance(recs[0].train, dict)
    done = [r for r in recs if r.state == "complete"]
    best = front(recs)
    expected = brute_front([r.point for r in done])
    assert sorted(r.number for r in best) == sorted(done[i].number for i in expected)
    assert [r.flops_per_token for r in best] == sorted(r.flops_per_token for r in best)

    info = study_info(study)
    assert isinstance(info, StudyInfo) and info.task_name == "icl_regression"
    summary = study_summary("tiny", info, recs)
    assert summary["name"] == "tiny" and summary["task"] == "icl_regression"
    assert summary["trials"] == 6 and summary["trained"] == 4
    assert {k: v for k, v in summary["states"].items() if v} == {
        "complete": 3, "infeasible": 1, "failed": 1, "duplicate": 1}
    assert summary["best_loss"] == min(r.val_loss for r in done)
    assert summary["front_size"] == len(best) and summary["hypervolume"] > 0
    assert summary["last_update"]


def test_interrupted_trials_are_their_own_state():
    old = TrialRecord.from_parts(number=0, optuna_state="FAIL", values=None,
                                 user_attrs={"status": "failed", "reason": "interrupted"})
    new = TrialRecord.from_parts(number=1, optuna_state="FAIL", values=None,
                                 user_attrs={"status": "interrupted", "reason": "interrupted",
                                             "retried": True})
    assert old.state == new.state == "interrupted"
    assert not new.trained and study_summary("s", StudyInfo(), [old, new])["states"][
        "interrupted"] == 2

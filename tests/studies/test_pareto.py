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
    front_rows,
    hv_point,
    hypervolume_2d,
    hypervolume_history,
    pareto_front,
    study_hypervolume,
    study_rows,
    study_summary,
)

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


def _row(number, loss, flops, state="COMPLETE"):
    values = [loss, flops] if state == "COMPLETE" else None
    return {"trial": number, "state": state, "values": values, "loss": loss, "flops": flops}


def test_hypervolume_history_never_decreases_and_ends_at_the_study_value():
    rows = [_row(0, 1.0, 1e4), _row(1, 0.9, 1e5), _row(2, 1.2, 1e5), _row(3, 0.0, 0.0, "FAIL"),
            _row(4, 0.5, 1e6), _row(5, 0.8, 1e3)]
    history = hypervolume_history(None, rows)
    assert [h["trial"] for h in history] == [0, 1, 2, 4, 5]
    volumes = [h["hypervolume"] for h in history]
    assert volumes == sorted(volumes) and volumes[0] > 0
    assert volumes[2] == volumes[1]  # trial 2 is dominated
    assert volumes[-1] == pytest.approx(study_hypervolume(rows))


def test_rows_front_and_summary_of_a_real_study(storage_url, tmp_path):
    study = make_study(storage_url, tmp_path / "artifacts")
    rows = study_rows(study)
    assert [r["status"] for r in rows] == ["ok", "ok", "ok", "infeasible", "failed", "duplicate"]
    assert {"trial", "state", "status", "values", "family", "hash", "flops", "params_count",
            "reason", "loss", "params"} <= set(rows[0])
    assert rows[4]["reason"].startswith("TrainingError") and rows[5]["duplicate_of"] == 0
    done = [r for r in rows if r["state"] == "COMPLETE"]
    front = front_rows(study, rows)
    expected = brute_front([(r["loss"], r["flops"]) for r in done])
    assert sorted(r["trial"] for r in front) == sorted(done[i]["trial"] for i in expected)
    assert [r["flops"] for r in front] == sorted(r["flops"] for r in front)

    summary = study_summary(study)
    assert summary["name"] == "tiny" and summary["task"] == "icl_regression"
    assert summary["trials"] == 6 and summary["states"] == {"COMPLETE": 3, "FAIL": 3}
    assert summary["statuses"] == {"ok": 3, "infeasible": 1, "failed": 1, "duplicate": 1}
    assert summary["best_loss"] == min(r["loss"] for r in done)
    assert summary["front_size"] == len(front) and summary["hypervolume"] > 0
    assert summary["last_update"]

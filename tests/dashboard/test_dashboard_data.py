"""Pure data functions: front, hypervolume, rows, NaN/inf, spec descriptions."""

from __future__ import annotations

import json
import math

import pytest
from dashboard_factory import tiny_spec
from hypothesis import given, settings
from hypothesis import strategies as st

from dashboard import data
from studies import pareto as studies_pareto
from studies.record import StudyInfo, TrialRecord, json_safe

coord = st.one_of(st.integers(0, 6).map(float), st.sampled_from([math.nan, math.inf]))
points = st.lists(st.tuples(coord, st.integers(0, 6).map(float)), max_size=25)


def dominates(q, p):
    return q[0] <= p[0] and q[1] <= p[1] and (q[0] < p[0] or q[1] < p[1])


def brute_front(pts):
    ok = [i for i, p in enumerate(pts) if math.isfinite(p[0]) and math.isfinite(p[1])]
    return [i for i in ok if not any(dominates(pts[j], pts[i]) for j in ok)]


def brute_area(pts, ref, step=0.5):
    """Count grid cells dominated by some point (exact for points on the 0.5 grid)."""
    inside = [p for p in pts if math.isfinite(p[0]) and math.isfinite(p[1])]
    area = 0.0
    a = 0.0
    while a < ref[0]:
        b = 0.0
        while b < ref[1]:
            if any(p[0] <= a and p[1] <= b for p in inside):
                area += step * step
            b += step
        a += step
    return area


@settings(max_examples=150, deadline=None)
@given(points)
def test_front_is_the_brute_force_non_dominated_set(pts):
    assert sorted(studies_pareto.pareto_front(pts)) == brute_front(pts)


@settings(max_examples=80, deadline=None)
@given(points)
def test_hypervolume_matches_a_grid_count_and_its_history_is_monotone(pts):
    ref = (7.0, 7.0)
    assert studies_pareto.hypervolume_2d(pts, ref) == pytest.approx(brute_area(pts, ref))
    history = studies_pareto.hypervolume_history_points(pts, ref)
    assert len(history) == len(pts)
    assert all(b >= a for a, b in zip(history, history[1:], strict=False))
    for k in range(len(pts)):
        assert history[k] == pytest.approx(studies_pareto.hypervolume_2d(pts[:k + 1], ref))


@pytest.mark.parametrize("value, text", [
    (None, "n/a"), (math.nan, "n/a"), (math.inf, "n/a"), (-math.inf, "n/a"), ("x", "n/a"),
    (0.123456, "0.1235"), (12345, "12,345"), (True, "n/a")])
def test_fmt_shows_missing_and_non_finite_as_na(value, text):
    assert data.fmt(value) == text


def test_fmt_si_and_json_safe():
    assert data.fmt_si(1.5e6, "FLOPs") == "1.5 MFLOPs"
    assert data.fmt_si(math.nan) == "n/a"
    blob = {"a": [1.0, math.nan, {"b": math.inf}], "c": -math.inf}
    assert json.dumps(json_safe(blob), allow_nan=False) == \
        '{"a": [1.0, null, {"b": null}], "c": null}'


def _trial(number, state, values=None, **attrs):
    return TrialRecord.from_parts(number=number, optuna_state=state, values=values,
                                  user_attrs=attrs)


def test_trial_states_follow_the_contract():
    assert _trial(0, "COMPLETE", [1.0, 2.0], status="ok").state == "complete"
    for status in ("infeasible", "failed", "duplicate", "interrupted"):
        assert _trial(0, "FAIL", status=status).state == status
    assert _trial(0, "FAIL").state == "failed"
    assert _trial(0, "RUNNING").state == "running"


def test_rows_handle_nan_and_inf_and_are_json_safe():
    spec = tiny_spec("mlr").to_dict()
    trials = [
        _trial(0, "COMPLETE", [math.inf, 100.0], status="ok", family="mlr", spec=spec),
        _trial(1, "COMPLETE", [0.5, 200.0], status="ok", family="mlr", spec=spec,
               params=math.nan, metric=math.inf, duration_s=-math.inf),
        _trial(2, "FAIL", status="failed", reason="nan loss", val_loss=math.nan,
               flops_per_token=math.inf, spec=spec, family="mlr"),
        _trial(3, "COMPLETE", [0.7, 50.0], status="ok", family="standard"),
    ]
    view = data.study_view(trials)
    json.dumps(json_safe([r for r in view.rows]), allow_nan=False)
    json.dumps([r for r in view.rows], allow_nan=False)  # already finite or None
    rows = {r["number"]: r for r in view.rows}
    assert rows[0]["val_loss"] is None and not rows[0]["on_front"]  # inf loss: not on front
    assert rows[1]["params"] is None and rows[1]["metric"] is None
    assert rows[2]["val_loss"] is None and rows[2]["flops_per_token"] is None
    assert rows[2]["reason"] == "nan loss"
    assert view.front == [3, 1]  # cheapest first
    assert view.best_loss == 0.5
    assert [n for n, _ in view.hv_history] == [1, 3]  # COMPLETE with finite values only
    assert 0 < view.hv_history[0][1] <= view.hv_history[1][1]


def test_study_view_front_counts_and_history():
    trials = [_trial(i, "COMPLETE", [1.0 / (i + 1), 10.0 ** (i % 4 + 3)],
                     status="ok", family="standard") for i in range(12)]
    trials.append(_trial(12, "FAIL", status="infeasible", flops_per_token=1e9))
    trials.append(_trial(13, "RUNNING"))
    view = data.study_view(trials)
    pts = [tuple(t.values) for t in trials[:12]]
    assert sorted(view.front) == brute_front(pts)
    assert view.counts["complete"] == 12 and view.counts["infeasible"] == 1
    assert view.counts["running"] == 1
    hv = [h for _, h in view.hv_history]
    assert all(b >= a for a, b in zip(hv, hv[1:], strict=False))
    logged = [(a, math.log10(b)) for a, b in pts]
    assert hv[-1] == pytest.approx(studies_pareto.hypervolume_2d(logged))
    summary = data.study_summary("s", StudyInfo(task={"name": "text"}), view)
    assert summary["task"] == "text" and summary["trials"] == 14
    assert summary["front"] == len(view.front)


def test_filter_rows():
    rows = [{"family": "mlr", "state": "complete"}, {"family": "standard", "state": "failed"}]
    assert data.filter_rows(rows, None, None) == rows
    assert data.filter_rows(rows, ["mlr"], []) == rows[:1]
    assert data.filter_rows(rows, [], ["failed"]) == rows[1:]


@pytest.mark.parametrize("kind, attention", [
    ("standard", "rank 8"), ("mlr", "ranks 2/1 @ global/16"), ("bilinear_btt", "btt(rank=1)"),
    ("sliding_window", "rank 8 window 4")])
def test_describe_spec_in_one_line(kind, attention):
    spec = tiny_spec(kind)
    desc = data.describe_spec(spec.to_dict())
    assert (desc["width"], desc["depth"], desc["heads"]) == (16, 1, 2)
    assert desc["attention"] == attention
    assert desc["mlp"] == "dense x2"
    line = data.architecture_line(spec.family, desc, 5120.0, 0.25)
    assert line.startswith(f"{spec.family} · D=16 L=1 H=2 · attn: {attention}")
    assert "5.12 kFLOPs/tok" in line and "loss 0.25" in line


def test_describe_spec_tolerates_foreign_specs():
    assert data.describe_spec(None)["attention"] == "n/a"
    desc = data.describe_spec({"width": 8, "attention": {"kind": "mlr", "heads": 2,
                                                        "ranks": [4, 2]}})
    assert desc["heads"] == 2 and desc["attention"] == "ranks=4/2"
    assert data.describe_spec({"attention": "weird", "mlp": 3})["mlp"] == "?"


def test_curve_series_drops_non_finite_points():
    curve = [{"step": 1, "flops": 10.0, "train_loss": 2.0},
             {"step": 2, "flops": 20.0, "train_loss": math.nan, "val_loss": 1.5, "metric": 0.3},
             {"step": 3, "flops": None, "train_loss": 1.0}, "junk"]
    s = data.curve_series(curve)
    assert s == {"train_loss": [(10.0, 2.0)], "val_loss": [(20.0, 1.5)], "metric": [(20.0, 0.3)]}
    assert data.curve_series(None)["train_loss"] == []


def test_trial_metrics_show_na_for_missing_values():
    t = _trial(4, "FAIL", status="duplicate", duplicate_of=2)
    items = dict(data.trial_metrics(t))
    assert items["validation loss"] == "n/a" and items["duplicate of trial"] == "2"
    assert data.trial_row(t)["reason"] == "duplicate of trial 2"

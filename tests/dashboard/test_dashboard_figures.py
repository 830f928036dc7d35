"""Pure figure functions: what is drawn where, colors, hover text, escaping, JSON safety."""

from __future__ import annotations

import json
import math

import plotly.io as pio
import pytest
from dashboard_factory import tiny_spec

from dashboard import architecture, data, figures
from studies.record import TrialRecord


def _trial(number, state, values=None, **attrs):
    return TrialRecord.from_parts(number=number, optuna_state=state, values=values,
                                  user_attrs=attrs)


def _strict_json(fig) -> dict:
    def no_constants(name):
        raise AssertionError(f"figure JSON contains {name}")

    return json.loads(pio.to_json(fig), parse_constant=no_constants)


@pytest.fixture
def view():
    spec = {k: tiny_spec(k).to_dict() for k in ("standard", "mlr", "bilinear_btt")}
    trials = [
        _trial(0, "COMPLETE", [0.9, 5e3], status="ok", family="standard",
               spec=spec["standard"]),
        _trial(1, "COMPLETE", [0.95, 4e3], status="ok", family="mlr", spec=spec["mlr"]),
        _trial(2, "COMPLETE", [0.97, 6e3], status="ok", family="bilinear_btt",
               spec=spec["bilinear_btt"]),
        _trial(3, "COMPLETE", [0.7, 2e4], status="ok", family="standard",
               spec=spec["standard"]),
        _trial(4, "COMPLETE", [math.inf, 3e3], status="ok", family="mlr"),
        _trial(5, "FAIL", status="infeasible", flops_per_token=8e4, family="standard",
               reason="too many FLOPs"),
        _trial(6, "FAIL", status="failed", flops_per_token=1.5e4, family="mlr",
               reason="<b>boom</b><script>alert(1)</script>"),
        _trial(7, "FAIL", status="failed", family="mlr", reason="no flops known"),
        _trial(8, "RUNNING", flops_per_token=3e3, family="mlr"),
    ]
    return data.study_view(trials)


def _traces(fig, role):
    return [t for t in fig.data if (t.meta or {}).get("role") == role]


def test_front_traces_hold_exactly_the_front(view):
    fig = figures.pareto_figure(view.rows, view.front)
    for t in _traces(fig, "front") + _traces(fig, "dominated"):
        assert isinstance(t.customdata, tuple)  # plain list: click events carry it
    on_front = sorted(n for t in _traces(fig, "front") for n in t.customdata)
    assert on_front == sorted(view.front) == [0, 1, 3]
    dominated = sorted(n for t in _traces(fig, "dominated") for n in t.customdata)
    assert dominated == [2]  # trial 4 (inf loss) is drawn nowhere on the loss axes
    (line,) = _traces(fig, "front-line")
    assert list(line.x) == [4e3, 5e3, 2e4] and line.line.shape == "hv"
    assert fig.layout.xaxis.type == "log"
    assert "FLOPs per token" in fig.layout.xaxis2.title.text  # the strip carries the x title
    assert fig.layout.yaxis.title.text == "validation loss"


def test_failed_and_infeasible_are_on_the_strip_not_the_front(view):
    fig = figures.pareto_figure(view.rows, view.front)
    (infeasible,) = _traces(fig, "infeasible")
    (failed,) = _traces(fig, "failed")
    assert list(infeasible.customdata) == [5] and list(infeasible.y) == ["infeasible"]
    assert list(failed.customdata) == [6]  # trial 7 has no FLOPs: listed in the table only
    assert infeasible.yaxis == "y2" and failed.yaxis == "y2"
    front_numbers = {n for t in _traces(fig, "front") + _traces(fig, "dominated")
                     for n in t.customdata}
    assert not front_numbers & {5, 6, 7, 8}


def test_points_are_colored_by_family(view):
    fig = figures.pareto_figure(view.rows, view.front)
    for t in _traces(fig, "front") + _traces(fig, "dominated"):
        assert t.marker.color == figures.family_color(t.meta["family"])
    known = [figures.family_color(f) for f in figures.FAMILY_COLORS]
    assert len(set(known)) == len(known)
    assert figures.family_color("mlr/mlp:btt") == figures.family_color("mlr/mlp:btt")
    legend = [t.name for t in fig.data if t.showlegend is not False]
    assert sorted(n for n in legend if n in ("standard", "mlr", "bilinear_btt")) == \
        ["bilinear_btt", "mlr", "standard"]


def test_hover_shows_the_architecture_in_one_line_and_is_escaped(view):
    fig = figures.pareto_figure(view.rows, view.front)
    (mlr,) = [t for t in _traces(fig, "front") if t.meta["family"] == "mlr"]
    text = mlr.hovertext[0]
    assert text.startswith("<b>trial 1</b> (complete)<br>mlr · D=16 L=1 H=2 · attn: ranks 2/1")
    assert "mlp: dense x2" in text and "4 kFLOPs/tok" in text and "loss 0.95" in text
    (failed,) = _traces(fig, "failed")
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in failed.hovertext[0]
    assert "<script>" not in failed.hovertext[0] and "<b>boom" not in failed.hovertext[0]


def test_figures_serialize_without_nan_or_inf(view):
    for fig in (figures.pareto_figure(view.rows, view.front),
                figures.hypervolume_figure(view.hv_history, view.reference),
                figures.overlay_figure([("a", data.front_rows(view))]),
                figures.curve_figure(data.curve_series([
                    {"flops": 1.0, "train_loss": math.nan}, {"flops": 2.0, "train_loss": 1.0,
                                                             "val_loss": math.inf}]))):
        _strict_json(fig)


def test_empty_studies_give_an_explaining_figure():
    fig = figures.pareto_figure([], [])
    assert "No trials with a loss yet" in fig.layout.annotations[0].text
    assert "No complete trials" in figures.hypervolume_figure([], None).layout.annotations[0].text
    assert "Pick studies" in figures.overlay_figure([]).layout.annotations[0].text


def test_hypervolume_figure_is_monotone_and_labeled(view):
    fig = figures.hypervolume_figure(view.hv_history, view.reference)
    ys = list(fig.data[0].y)
    assert ys == sorted(ys)
    assert fig.layout.xaxis.title.text == "trial number"
    assert "reference point" in fig.layout.annotations[0].text


def test_overlay_escapes_study_names(view):
    fig = figures.overlay_figure([("<script>alert(1)</script>", data.front_rows(view)),
                                  ("b", [])])
    assert [t.name for t in fig.data] == ["&lt;script&gt;alert(1)&lt;/script&gt;"]
    assert fig.data[0].meta["study"] == "<script>alert(1)</script>"


def test_curve_figure_plots_train_and_val_loss_against_flops():
    series = data.curve_series([{"flops": 1e6 * s, "train_loss": 2.0 / s, "val_loss": 2.5 / s,
                                 "metric": 0.5 / s} for s in range(1, 5)])
    fig = figures.curve_figure(series, "last_sq_error")
    roles = [t.meta["role"] for t in fig.data]
    assert roles == ["train_loss", "val_loss", "metric"]
    assert fig.layout.xaxis.title.text == "training compute (FLOPs)"
    assert fig.layout.yaxis2.title.text == "last_sq_error"


@pytest.mark.parametrize("kind", ["standard", "mlr", "bilinear_btt"])
def test_contraction_graphs_of_every_matrix(kind):
    spec = tiny_spec(kind)
    mats = architecture.spec_matrices(spec)
    labels = [label for label, _ in mats]
    assert labels[-2].startswith("MLP up 16->32") and labels[-1].startswith("MLP down 32->16")
    assert any("score matrix" in label for label in labels)
    for label, matrix in mats:
        panels = architecture.matrix_panels(matrix)
        assert len(panels) == len(matrix.levels)
        fig = figures.matrix_figure(panels, label)
        nodes = [t for t in fig.data if t.meta["role"] == "node"]
        for (_, g, order), trace in zip(panels, nodes, strict=True):
            assert list(trace.text) == order and set(order) == set(g.nodes)
        edge_labels = " ".join(" ".join(t.text) for t in fig.data
                               if t.meta["role"] == "edge-label")
        for _, g, _ in panels:
            for _, _, d in g.edges(data=True):
                assert f"{d['axis']}={d['size']}" in edge_labels
        _strict_json(fig)

"""The Scaling page of a multi-fidelity study: loss against training FLOPs, fits, frontier.

Pure: records in (:func:`studies.scaling.scaling_points` reads their rungs), a figure and Dash
components out. The figure shows every architecture's losses per budget (faint, joined per
architecture), each family's envelope (its best loss at each budget) with its fitted
``L(C) = E + A * C**-alpha`` drawn up to the target budget (dotted beyond the data), and the
predicted compute-optimal frontier: the lowest family curve at each budget.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import plotly.graph_objects as go
from dash import dcc, html

from studies.scaling import ScalingPoint, ScalingReport, frontier, scaling_points, scaling_report

from .data import fmt
from .figures import _layout, empty_figure, esc, family_color
from .pages import GRAPH_CONFIG, crumbs, study_path

CURVE_POINTS = 80


def report_for(records: Sequence[Any], target: float | None = None
               ) -> tuple[list[ScalingPoint], ScalingReport | None, float | None]:
    """``(points, report, target)``; no report when the study recorded no rungs."""
    points = scaling_points(records)
    if not points:
        return points, None, None
    top = max(p.budget for p in points)
    target = target or 10.0 * top
    return points, scaling_report(points, target=target), target


def scaling_figure(points: Sequence[ScalingPoint], report: ScalingReport,
                   target: float) -> go.Figure:
    """Validation loss against training FLOPs (log-log x), see the module doc."""
    if not points:
        return empty_figure("No rungs recorded: this is not a multi-fidelity study.")
    fig = go.Figure()
    by_arch: dict[Any, list[ScalingPoint]] = {}
    for p in points:
        by_arch.setdefault(p.key, []).append(p)
    shown: set[str] = set()
    for key, pts in sorted(by_arch.items(), key=lambda kv: str(kv[0])):
        pts = sorted(pts, key=lambda p: p.budget)
        fam = pts[0].family
        fig.add_trace(go.Scatter(
            x=[p.budget for p in pts], y=[p.loss for p in pts], mode="lines+markers",
            line={"color": family_color(fam), "width": 1}, opacity=0.35,
            marker={"size": 5}, name=esc(fam), legendgroup=esc(fam),
            showlegend=fam not in shown, hoverinfo="text",
            hovertext=[f"trial {esc(key)} ({esc(fam)})<br>{p.budget:.3g} FLOPs: loss "
                       f"{p.loss:.4g}" for p in pts]))
        shown.add(fam)
    for curve in report.families:
        color = family_color(curve.family)
        low, high = curve.points[0][0], curve.points[-1][0]
        fig.add_trace(go.Scatter(
            x=[b for b, _ in curve.points], y=[v for _, v in curve.points], mode="markers",
            marker={"color": color, "size": 10, "symbol": "diamond"}, showlegend=False,
            legendgroup=esc(curve.family), hoverinfo="text",
            hovertext=[f"{esc(curve.family)} envelope<br>{b:.3g} FLOPs: loss {v:.4g}"
                       for b, v in curve.points]))
        fit = curve.fit
        for lo, hi, dash in ((low, high, "solid"), (high, max(target, high), "dot")):
            if hi <= lo:
                continue
            xs = np.geomspace(lo, hi, CURVE_POINTS)
            fig.add_trace(go.Scatter(
                x=xs, y=fit.predict(xs), mode="lines", showlegend=False,
                line={"color": color, "width": 2.5, "dash": dash},
                legendgroup=esc(curve.family), hoverinfo="text",
                hovertext=[f"{esc(curve.family)} fit: {x:.3g} FLOPs -> {y:.4g}"
                           for x, y in zip(xs, fit.predict(xs), strict=True)]))
    if report.families:
        fits = {c.name: c.fit for c in report.families}
        low = min(p.budget for p in points)
        grid = list(np.geomspace(low, max(target, low * 10), CURVE_POINTS))
        best = frontier(fits, grid)
        fig.add_trace(go.Scatter(
            x=[b["budget"] for b in best], y=[b["loss"] for b in best], mode="lines",
            name="predicted frontier", line={"color": "#222", "width": 1.5, "dash": "dash"},
            hoverinfo="text", hovertext=[f"best predicted: {esc(b['name'])}<br>{b['budget']:.3g}"
                                         f" FLOPs -> {b['loss']:.4g}" for b in best]))
    fig.update_xaxes(type="log", title_text="training FLOPs")
    fig.update_yaxes(type="log", title_text="validation loss")
    return _layout(fig, "", 520, legend={"title": {"text": "family"}})


def _fit_row(curve: Any, target: float) -> html.Tr:
    f = curve.fit
    cells = [curve.name, curve.family if curve.kind == "architecture" else "",
             str(len(curve.points)), fmt(f.E), fmt(f.A), fmt(f.alpha), fmt(f.rmse_log, 2),
             fmt(f.holdout_rel_err, 2), fmt(f.predict(target))]
    return html.Tr([html.Td(c) for c in cells])


def _fits_table(curves: Sequence[Any], target: float, first: str) -> html.Table:
    head = [first, "family", "budgets", "E", "A", "alpha", "rmse (log)", "holdout err",
            f"L({target:.2g})"]
    return html.Table([html.Thead(html.Tr([html.Th(h) for h in head])),
                       html.Tbody([_fit_row(c, target) for c in curves])],
                      className="metrics")


def scaling_page(name: str, points: Sequence[ScalingPoint], report: ScalingReport | None,
                 target: float | None) -> html.Div:
    """The whole page (static: it is rebuilt when opened)."""
    head = [crumbs(("Studies", "/"), (name, study_path(name)), ("Scaling", None)),
            html.H1(f"{name}: scaling laws", className="study-name")]
    if report is None or target is None:
        return html.Div([*head, html.P("This study recorded no budget rungs: scaling laws "
                                       "need a multi-fidelity search (budgets: [...] in the "
                                       "search space).", className="lead")])
    lines = []
    best = report.best
    if best is not None:
        what = (f"trial {best['name']} ({best['family']})" if best["kind"] == "architecture"
                else f"family {best['name']}")
        lines.append(f"Predicted best at {target:.3g} FLOPs: {what}, loss "
                     f"{best['predicted_loss']:.4g} ({best['extrapolation']:.3g} x the largest "
                     "budget it was fitted on).")
    for x in report.crossings:
        lines.append(f"Families {x['below']} and {x['above']} cross at {x['budget']:.3g} FLOPs "
                     f"(loss {x['loss']:.4g}): {x['below']} is predicted better below.")
    if report.skipped:
        lines.append(f"{len(report.skipped)} architecture(s) reached fewer than 3 budgets and "
                     "have no fit of their own.")
    body: list[Any] = [
        html.P(f"L(C) = E + A * C^-alpha, fitted in log space; predictions at C = "
               f"{target:.3g} FLOPs.", className="lead"),
        html.Section([html.H2("Loss against training compute"),
                      dcc.Graph(id="scaling-graph", config=GRAPH_CONFIG,
                                figure=scaling_figure(points, report, target))],
                     className="panel"),
        html.Section([html.H2("Predictions"), *[html.P(t) for t in lines]], className="panel")]
    if report.families:
        body.append(html.Section([html.H2("Families (lower envelope)"),
                                  _fits_table(report.families, target, "family")],
                                 className="panel"))
    if report.architectures:
        body.append(html.Section([html.H2("Architectures with 3 or more budgets"),
                                  _fits_table(report.architectures, target, "trial")],
                                 className="panel"))
    return html.Div([*head, *body])


def has_rungs(records: Sequence[Any]) -> bool:
    return any(math.isfinite(p.loss) for p in scaling_points(records))


__all__ = ["has_rungs", "report_for", "scaling_figure", "scaling_page"]

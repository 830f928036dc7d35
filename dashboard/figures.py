"""Pure figure functions: rows and specs in, Plotly figures out (no Dash, no storage).

Every string that came from the storage is HTML-escaped before it enters a figure: Plotly renders
a subset of HTML in hover text, titles and legends, and shows escaped entities literally.
Traces carry ``meta={"role": ...}`` (``front``, ``dominated``, ``front-line``, ``failed``, ...)
and clickable points carry the trial number in ``customdata`` (a plain list: plotly.js leaves
typed-array customdata out of click events). Coordinates are numpy arrays: Plotly validates them
without copying element by element and sends them as compact typed arrays, which keeps a
5,000-point front fast to build and to serialize.
"""

from __future__ import annotations

import html
import math
import zlib
from collections.abc import Sequence
from typing import Any

import networkx as nx
import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from .data import NA, Point, fmt, fmt_si

TEMPLATE = "plotly_white"
FONT = {"family": "Inter, Segoe UI, Helvetica, Arial, sans-serif", "size": 13}
FLOPS_AXIS = "forward FLOPs per token (non-embedding, log scale)"
LOSS_AXIS = "validation loss"
# Fixed colors for the attention families (colorblind-safe Okabe-Ito + extras); other families
# (MLP variants, mixtures) get a stable color from PALETTE by a hash of their name.
FAMILY_COLORS = {
    "standard": "#0072B2", "mlr": "#D55E00", "bilinear_btt": "#009E73",
    "bilinear_mlr": "#CC79A7", "sliding_window": "#6A3D9A", "global_window": "#56B4E9",
    "general": "#7F7F7F",
}
PALETTE = ("#1F77B4", "#FF7F0E", "#2CA02C", "#D62728", "#9467BD", "#8C564B", "#E377C2",
           "#17BECF", "#BCBD22", "#393B79", "#AD494A", "#637939", "#7B4173", "#3182BD")
STATE_MARKERS = {"infeasible": ("triangle-up-open", "#8C6D31"), "failed": ("x", "#C0392B"),
                 "duplicate": ("diamond-open", "#7F7F7F"), "pruned": ("circle-open", "#7F7F7F")}


def esc(text: Any) -> str:
    """Text from the storage, safe inside Plotly's HTML-ish labels."""
    return html.escape(str(text), quote=True)


def _col(rows: Sequence[dict[str, Any]], key: str, dtype: type = float) -> np.ndarray:
    return np.array([r[key] for r in rows], dtype=dtype)


def family_color(family: str) -> str:
    """One color per family, the same in every figure and study."""
    if family in FAMILY_COLORS:
        return FAMILY_COLORS[family]
    return PALETTE[zlib.crc32(family.encode()) % len(PALETTE)]


def _layout(fig: go.Figure, title: str, height: int = 460, **kw: Any) -> go.Figure:
    """House style; ``title`` may be empty (the page's section heading names the figure)."""
    fig.update_layout(template=TEMPLATE, font=FONT, height=height,
                      margin={"l": 70, "r": 20, "t": 60 if title else 24, "b": 60},
                      hoverlabel={"align": "left"}, **kw)
    if title:
        fig.update_layout(title={"text": title, "x": 0.01, "xanchor": "left",
                                 "font": {"size": 17}})
    return fig


def empty_figure(message: str, title: str = "", height: int = 360) -> go.Figure:
    """A blank plot that says why it is blank."""
    fig = go.Figure()
    fig.add_annotation(text=esc(message), x=0.5, y=0.5, xref="paper", yref="paper",
                       showarrow=False, font={"size": 15, "color": "#666"})
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    return _layout(fig, esc(title), height)


def hover_text(row: dict[str, Any]) -> str:
    """Trial number and its architecture line (escaped), plus the failure reason if any."""
    text = f"<b>trial {row['number']}</b> ({esc(row['state'])})<br>{esc(row['arch'])}"
    if row.get("reason"):
        reason = str(row["reason"])
        text += "<br>reason: " + esc(reason if len(reason) <= 160 else reason[:157] + "...")
    return text


def _sizes(pts: Sequence[dict[str, Any]], key: str | None, lo: float, hi: float,
           default: float) -> Any:
    """Marker sizes 6..22 by ``key`` (linear over the values of all points), else ``default``."""
    if not key:
        return default
    vals = [v for v in (_finite(p.get(key)) for p in pts) if v is not None]
    span = hi - lo
    return [6 + 16 * ((_finite(p.get(key)) or lo) - lo) / span if span > 0 else 12
            for p in pts] if vals else default


def _finite(v: Any) -> float | None:
    ok = isinstance(v, int | float) and not isinstance(v, bool) and np.isfinite(v)
    return float(v) if ok else None


def _error_y(pts: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """Error bars: the loss's standard deviation over seeds, when trials have several."""
    stds = [_finite(p.get("loss_std")) or 0.0 for p in pts]
    if not any(stds):
        return None
    return {"type": "data", "array": stds, "visible": True, "thickness": 1, "width": 3}


def pareto_figure(rows: Sequence[dict[str, Any]], front: Sequence[int],
                  title: str = "", color_by: str | None = None,
                  size_by: str | None = None) -> go.Figure:
    """Loss against FLOPs/token (log x): the front joined by a step line, dominated points
    faded, and trials without a loss (infeasible, failed, ...) on a strip below at their FLOPs.
    Colors are families, or a numeric column ``color_by`` (a structure descriptor) on a color
    scale; ``size_by`` sizes the points by another; error bars are the spread over seeds.
    Clicking a point gives its trial number in ``customdata``."""
    on_front = set(front)
    scored = [r for r in rows if r["state"] == "complete" and r["val_loss"] is not None
              and r["flops_per_token"] is not None and r["flops_per_token"] > 0]
    unscored = [r for r in rows if r["state"] in STATE_MARKERS
                and r["flops_per_token"] is not None and r["flops_per_token"] > 0]
    if not scored and not unscored:
        return empty_figure("No trials with a loss yet: the front appears when the first trial "
                            "completes.", title, 520)
    strip = bool(unscored)
    fig = make_subplots(rows=2 if strip else 1, cols=1, shared_xaxes=True,
                        row_heights=[0.84, 0.16] if strip else None, vertical_spacing=0.03)
    sized = [v for v in (_finite(r.get(size_by)) for r in scored) if v is not None] \
        if size_by else []
    lo, hi = (min(sized), max(sized)) if sized else (0.0, 0.0)
    scale = [v for v in (_finite(r.get(color_by)) for r in scored) if v is not None] \
        if color_by else []
    groups = [(None, scored)] if scale else [
        (fam, [r for r in scored if r["family"] == fam])
        for fam in sorted({r["family"] for r in scored})]
    for fam, members in groups:
        for role in ("front", "dominated"):
            pts = [r for r in members if (r["number"] in on_front) == (role == "front")]
            if not pts:
                continue
            first = role == "front" or not any(r["number"] in on_front for r in members)
            marker: dict[str, Any] = {
                "size": _sizes(pts, size_by, lo, hi, 12 if role == "front" else 8),
                "opacity": 1.0 if role == "front" else 0.5,
                "line": {"width": 1.5 if role == "front" else 0, "color": "#222"}}
            if fam is None:
                marker.update(color=[_finite(r.get(color_by)) for r in pts],
                              colorscale="Viridis", cmin=min(scale), cmax=max(scale),
                              showscale=role == "front" or not any(
                                  r["number"] in on_front for r in scored),
                              colorbar={"title": {"text": esc(_label(color_by or ""))}})
            else:
                marker["color"] = family_color(fam)
            name = esc(fam) if fam is not None else f"{role} (colour: {esc(_label(color_by))})"
            fig.add_trace(go.Scatter(
                x=_col(pts, "flops_per_token"), y=_col(pts, "val_loss"),
                error_y=_error_y(pts), mode="markers", name=name, legendgroup=name,
                showlegend=first if fam is not None else True,
                customdata=[r["number"] for r in pts],
                hovertext=[hover_text(r) for r in pts], hoverinfo="text",
                meta={"role": role, "family": fam}, marker=marker), row=1, col=1)
    line = sorted((r for r in scored if r["number"] in on_front),
                  key=lambda r: (r["flops_per_token"], r["val_loss"]))
    if line:
        fig.add_trace(go.Scatter(
            x=_col(line, "flops_per_token"), y=_col(line, "val_loss"),
            mode="lines", line={"shape": "hv", "color": "#222", "width": 1.5, "dash": "dot"},
            name="Pareto front", hoverinfo="skip", meta={"role": "front-line"}), row=1, col=1)
    for state, (symbol, color) in STATE_MARKERS.items():
        pts = [r for r in unscored if r["state"] == state]
        if not pts:
            continue
        fig.add_trace(go.Scatter(
            x=_col(pts, "flops_per_token"), y=[state] * len(pts), mode="markers",
            name=f"{state} (no loss)", customdata=[r["number"] for r in pts],
            hovertext=[hover_text(r) for r in pts], hoverinfo="text", meta={"role": state},
            marker={"symbol": symbol, "color": color, "size": 9, "line": {"width": 1.5}}),
            row=2, col=1)
    fig.update_xaxes(type="log", showgrid=True, gridcolor="#eee", ticks="outside",
                     tickformat="~s", dtick="D2")
    fig.update_xaxes(title_text=FLOPS_AXIS, row=2 if strip else 1, col=1)
    fig.update_yaxes(title_text=LOSS_AXIS, row=1, col=1, gridcolor="#eee", ticks="outside")
    if strip:
        fig.update_yaxes(row=2, col=1, type="category", showgrid=False, tickfont={"size": 11})
    return _layout(fig, esc(title), 560, clickmode="event", hovermode="closest",
                   legend={"title": {"text": "family"}, "itemclick": "toggle"})


def _label(key: str | None) -> str:
    return (key or "").removeprefix("d_").replace("_", " ")


def importance_figure(imp: dict[str, dict[str, float]], title: str, top: int = 10
                      ) -> go.Figure:
    """PED-ANOVA importances (``studies.importance``): one bar chart per objective."""
    if not imp:
        return empty_figure("Importances appear once a few trials have completed.", title, 300)
    names = list(imp)
    fig = make_subplots(rows=1, cols=len(names), subplot_titles=[esc(n) for n in names],
                        horizontal_spacing=0.25)
    for i, name in enumerate(names, 1):
        ranked = sorted(imp[name].items(), key=lambda kv: kv[1])[-top:]
        fig.add_trace(go.Bar(x=[v for _, v in ranked], y=[esc(_label(k)) for k, _ in ranked],
                             orientation="h", marker={"color": "#0072B2"}, showlegend=False,
                             meta={"role": "importance", "objective": name},
                             hovertemplate="%{y}: %{x:.3f}<extra></extra>"), row=1, col=i)
        fig.update_xaxes(title_text="importance", range=[0, 1], row=1, col=i)
    return _layout(fig, esc(title), 60 + 28 * min(top, max(len(v) for v in imp.values())) + 80)


def hypervolume_figure(history: Sequence[tuple[int, float]], reference: Point | None,
                       title: str = "") -> go.Figure:
    """The hypervolume of the COMPLETE trials so far, after each COMPLETE trial."""
    if not history or reference is None:
        return empty_figure("No complete trials yet.", title, 320)
    fig = go.Figure(go.Scatter(
        x=np.array([n for n, _ in history], dtype=int),
        y=np.array([h for _, h in history], dtype=float), mode="lines+markers",
        line={"shape": "hv", "color": "#0072B2", "width": 2}, marker={"size": 4},
        name="hypervolume", meta={"role": "hypervolume"},
        hovertemplate="after trial %{x}: %{y:.4g}<extra></extra>"))
    last = max(n for n, _ in history)
    fig.update_xaxes(title_text="trial number", gridcolor="#eee", ticks="outside",
                     tickformat="d", **({"dtick": 1} if last < 10 else {}))
    fig.update_yaxes(title_text="hypervolume", gridcolor="#eee", ticks="outside",
                     rangemode="tozero")
    fig.add_annotation(
        text=f"reference point: loss {fmt(reference[0])}, "
             f"{fmt_si(10 ** reference[1] if math.isfinite(reference[1]) else None)} FLOPs/token",
        xref="paper", yref="paper", x=1, y=0.02, xanchor="right", showarrow=False,
        font={"size": 11, "color": "#666"})
    return _layout(fig, esc(title), 320, showlegend=False)


def overlay_figure(fronts: Sequence[tuple[str, Sequence[dict[str, Any]]]],
                   title: str = "") -> go.Figure:
    """One step line per study (its front), on shared axes."""
    fronts = [(name, rows) for name, rows in fronts if rows]
    if not fronts:
        return empty_figure("Pick studies with complete trials to compare their fronts.",
                            title, 420)
    fig = go.Figure()
    for k, (name, rows) in enumerate(fronts):
        rows = sorted(rows, key=lambda r: (r["flops_per_token"], r["val_loss"]))
        color = PALETTE[k % len(PALETTE)]
        fig.add_trace(go.Scatter(
            x=_col(rows, "flops_per_token"), y=_col(rows, "val_loss"),
            mode="lines+markers", name=esc(name), line={"shape": "hv", "color": color},
            marker={"size": 8, "color": color}, meta={"role": "overlay", "study": name},
            hovertext=[f"<b>{esc(name)}</b><br>" + hover_text(r) for r in rows],
            hoverinfo="text"))
    fig.update_xaxes(type="log", title_text=FLOPS_AXIS, gridcolor="#eee", ticks="outside",
                     tickformat="~s", dtick="D2")
    fig.update_yaxes(title_text=LOSS_AXIS, gridcolor="#eee", ticks="outside")
    return _layout(fig, esc(title), 440, legend={"title": {"text": "study"}})


def curve_figure(series: dict[str, list[tuple[float, float]]], metric_name: str = "metric",
                 title: str = "") -> go.Figure:
    """Train and validation loss against training FLOPs (from :func:`data.curve_series`)."""
    if not series.get("train_loss") and not series.get("val_loss"):
        return empty_figure("No learning curve recorded for this trial.", title, 200)
    fig = go.Figure()
    styles = {"train_loss": ("train loss", "#0072B2", "lines"),
              "val_loss": ("validation loss", "#D55E00", "lines+markers")}
    for key, (name, color, mode) in styles.items():
        pts = series.get(key) or []
        if pts:
            fig.add_trace(go.Scatter(
                x=[x for x, _ in pts], y=[y for _, y in pts], mode=mode, name=name,
                line={"color": color, "width": 2}, marker={"size": 7}, meta={"role": key},
                hovertemplate=f"{name}: %{{y:.4g}}<br>%{{x:.3s}} FLOPs<extra></extra>"))
    metric = series.get("metric") or []
    if metric and metric_name not in ("", "val_loss"):
        fig.add_trace(go.Scatter(
            x=[x for x, _ in metric], y=[y for _, y in metric], mode="lines+markers",
            name=esc(metric_name), yaxis="y2", line={"color": "#009E73", "dash": "dash"},
            marker={"size": 6}, meta={"role": "metric"},
            hovertemplate=f"{esc(metric_name)}: %{{y:.4g}}<extra></extra>"))
        fig.update_layout(yaxis2={"title": {"text": esc(metric_name)}, "overlaying": "y",
                                  "side": "right", "showgrid": False, "tickformat": ".3~g"})
    fig.update_xaxes(title_text="training compute (FLOPs)", gridcolor="#eee", ticks="outside",
                     exponentformat="SI")
    fig.update_layout(yaxis={"title": {"text": "loss"}, "gridcolor": "#eee", "ticks": "outside"})
    return _layout(fig, esc(title), 380, legend={"orientation": "h", "y": 1.02, "x": 1,
                                                   "xanchor": "right", "yanchor": "bottom"})


# ---- contraction graphs -----------------------------------------------------------------------
def _arc(x0: float, x1: float, height: float, n: int = 24) -> tuple[list[float], list[float]]:
    xs = [x0 + (x1 - x0) * k / n for k in range(n + 1)]
    ys = [height * 4 * (k / n) * (1 - k / n) for k in range(n + 1)]
    return xs, ys


def contraction_panel(g: nx.MultiGraph, order: Sequence[str]) -> list[go.Scatter]:
    """Traces of one contraction graph: nodes on a line (``order``: x, cores, y), edges as arcs
    labeled ``axis=size`` (parallel edges between two nodes share one arc and one label)."""
    pos = {node: float(i) for i, node in enumerate(order)}
    pairs: dict[tuple[str, str], list[str]] = {}
    for u, v, d in g.edges(data=True):
        a, b = sorted((u, v), key=lambda n: pos[n])
        pairs.setdefault((a, b), []).append(f"{d['axis']}={d['size']}")
    traces: list[go.Scatter] = []
    lx, ly, lt = [], [], []
    for k, ((a, b), labels) in enumerate(sorted(pairs.items(), key=lambda kv: (
            pos[kv[0][1]] - pos[kv[0][0]], pos[kv[0][0]]))):
        span = pos[b] - pos[a]
        height = 0.0 if span == 1 else (0.35 * span) * (1 if k % 2 == 0 else -1)
        xs, ys = _arc(pos[a], pos[b], height)
        traces.append(go.Scatter(x=xs, y=ys, mode="lines", hoverinfo="skip", showlegend=False,
                                 line={"color": "#888", "width": 1.5}, meta={"role": "edge"}))
        lx.append((pos[a] + pos[b]) / 2)
        ly.append(height + (0.08 if height >= 0 else -0.08))
        lt.append(esc(", ".join(labels)))
    traces.append(go.Scatter(x=lx, y=ly, mode="text", text=lt, hoverinfo="skip",
                             showlegend=False, textfont={"size": 11, "color": "#333"},
                             meta={"role": "edge-label"}))
    colors = {"input": "#0072B2", "output": "#D55E00", "core": "#444"}
    nodes = list(order)
    hover = []
    for n in nodes:
        d = g.nodes[n]
        axes = ", ".join(d.get("axes", []))
        shape = d.get("shape")
        hover.append(f"<b>{esc(n)}</b> ({esc(d.get('kind'))})<br>axes: {esc(axes)}"
                     + (f"<br>shape: {esc(' x '.join(map(str, shape)))}" if shape else ""))
    traces.append(go.Scatter(
        x=[pos[n] for n in nodes], y=[0.0] * len(nodes), mode="markers+text",
        text=[esc(n) for n in nodes], textposition="middle center", hovertext=hover,
        hoverinfo="text", showlegend=False, meta={"role": "node"},
        textfont={"color": "white", "size": 12},
        marker={"size": 34, "color": [colors.get(g.nodes[n].get("kind"), "#444") for n in nodes],
                "symbol": ["square" if g.nodes[n].get("kind") == "core" else "circle"
                           for n in nodes], "line": {"width": 1, "color": "white"}}))
    return traces


def matrix_figure(panels: Sequence[tuple[str, nx.MultiGraph, Sequence[str]]],
                  title: str) -> go.Figure:
    """One panel per level of a structured matrix: ``(panel title, graph, node order)``."""
    if not panels:
        return empty_figure("No structured matrix to draw.", title, 300)
    cols = min(len(panels), 3)
    nrows = math.ceil(len(panels) / cols)
    reach = []  # how far the arcs of each panel reach above/below the line of nodes
    for _, g, order in panels:
        traces = contraction_panel(g, order)
        reach.append((traces, max([abs(y) for t in traces for y in t.y] + [0.3]), len(order)))
    row_reach = [max(r for _, r, _ in reach[i * cols:(i + 1) * cols]) for i in range(nrows)]
    fig = make_subplots(rows=nrows, cols=cols, subplot_titles=[esc(t) for t, _, _ in panels],
                        horizontal_spacing=0.04, vertical_spacing=0.16 / nrows,
                        row_heights=row_reach)
    for k, (traces, _, n) in enumerate(reach):
        row, col = k // cols + 1, k % cols + 1
        for trace in traces:
            fig.add_trace(trace, row=row, col=col)
        m = row_reach[row - 1] + 0.35
        fig.update_yaxes(range=[-m, m], row=row, col=col)
        fig.update_xaxes(range=[-0.4, n - 0.6], row=row, col=col)
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    fig.update_annotations(font={"size": 12})
    fig.add_annotation(text="nodes: x (input), cores G0, G1, ... (flow order), y (output); "
                            "edges: shared axes as axis=size; hover a node for its shape",
                       xref="paper", yref="paper", x=0, y=0, yshift=-34, showarrow=False,
                       xanchor="left", font={"size": 11, "color": "#666"})
    height = 110 + sum(int(110 + 80 * r) for r in row_reach)
    return _layout(fig, esc(title), height, showlegend=False)


__all__ = ["NA", "curve_figure", "empty_figure", "esc", "family_color", "hover_text",
           "hypervolume_figure", "matrix_figure", "overlay_figure", "pareto_figure"]

"""Pure data functions: trials in, plain JSON-safe rows and numbers out.

Nothing here touches the storage, Dash or Plotly. A *trial* is anything with ``number``,
``state`` (an Optuna TrialState), ``values``, ``user_attrs``, ``datetime_start`` and
``datetime_complete`` (a FrozenTrial or a :class:`dashboard.store.TrialRecord`). Non-finite
floats (NaN, inf) become ``None`` in every row, and :func:`fmt` shows them as ``"n/a"``.

The objectives follow the storage contract: COMPLETE trials have values ``[val_loss,
flops_per_token]``, both minimized. Hypervolume is measured in (val_loss, log10 FLOPs/token),
from a reference point that is fixed per study (:func:`reference_point`), as in
:mod:`studies.pareto`.
"""

from __future__ import annotations

import bisect
import datetime as dt
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from optuna.trial import TrialState

from mlbtc_search.yamlio import json_safe  # noqa: F401 (re-exported for app and export)
from studies import pareto as _pareto

NA = "n/a"
STATES = ("complete", "running", "failed", "infeasible", "duplicate", "pruned", "waiting")

Point = tuple[float, float]


# ---- numbers ----------------------------------------------------------------------------------
def finite(value: Any) -> float | None:
    """A finite float, or None (for None, NaN, inf, and anything that is not a number)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def fmt(value: Any, digits: int = 4) -> str:
    """A number for people: ``"n/a"`` for missing or non-finite, ``digits`` significant."""
    v = finite(value)
    if v is None:
        return NA
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return f"{v:.{digits}g}"


def fmt_si(value: Any, unit: str = "") -> str:
    """``1.23e6`` -> ``"1.23 M"`` (k, M, G, T, P); ``"n/a"`` when not finite."""
    v = finite(value)
    if v is None:
        return NA
    for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= scale:
            return f"{v / scale:.3g} {prefix}{unit}".rstrip()
    return f"{v:.3g} {unit}".rstrip()


def fmt_time(value: dt.datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S") if value is not None else NA


# ---- Pareto front and hypervolume --------------------------------------------------------------
# The front, the hypervolume and its reference point are those of ``studies.pareto`` (the same
# numbers as ``mlbtc studies`` / ``mlbtc pareto``); only the incremental history is here.
def _ok(p: Point) -> bool:
    return math.isfinite(p[0]) and math.isfinite(p[1])


def pareto_front(points: Sequence[Point]) -> list[int]:
    """Indices (ascending) of the non-dominated points, minimizing both coordinates.

    ``q`` dominates ``p`` when it is no worse in both and better in one; equal points do not
    dominate each other, so both stay. Points with a non-finite coordinate are never on the front.
    """
    return sorted(_pareto.pareto_front(points))


def hypervolume_2d(points: Sequence[Point], reference: Point) -> float:
    """Area dominated by ``points`` and bounded by ``reference`` (both coordinates minimized)."""
    return _pareto.hypervolume_2d(list(points), reference)


def reference_point(points: Sequence[Point]) -> Point | None:
    """``studies.pareto.default_reference`` (max + 10% of |max| per coordinate), or None."""
    pts = [p for p in points if _ok(p)]
    return _pareto.default_reference(pts) if pts else None


def hypervolume_history(points: Sequence[Point], reference: Point) -> list[float]:
    """Hypervolume after each point in order (non-decreasing by construction).

    Incremental: a dominated point leaves the front and the area unchanged; a new front point
    removes the points it dominates. Cost O(n log n + n * front size).
    """
    front_b: list[float] = []  # second coordinate ascending
    front_a: list[float] = []  # first coordinate, strictly descending along the front
    out: list[float] = []
    area = 0.0
    for a, b in points:
        if not (_ok((a, b)) and a < reference[0] and b < reference[1]):
            out.append(area)
            continue
        r = bisect.bisect_right(front_b, b)
        if r > 0 and front_a[r - 1] <= a:  # weakly dominated: adds no area
            out.append(area)
            continue
        i = j = bisect.bisect_left(front_b, b)
        while j < len(front_b) and front_a[j] >= a:  # the points the new one dominates
            j += 1
        front_b[i:j] = [b]
        front_a[i:j] = [a]
        area = _area(front_a, front_b, reference)
        out.append(area)
    return out


def _area(front_a: list[float], front_b: list[float], reference: Point) -> float:
    area = 0.0
    for k, (a, b) in enumerate(zip(front_a, front_b, strict=True)):
        nxt = front_b[k + 1] if k + 1 < len(front_b) else reference[1]
        area += (nxt - b) * (reference[0] - a)
    return area


# ---- trials -> rows ---------------------------------------------------------------------------
def trial_state(trial: Any) -> str:
    """complete | running | failed | infeasible | duplicate | pruned | waiting."""
    state = trial.state
    if state == TrialState.COMPLETE:
        return "complete"
    if state == TrialState.FAIL:
        status = trial.user_attrs.get("status")
        return status if status in ("infeasible", "failed", "duplicate") else "failed"
    return {TrialState.RUNNING: "running", TrialState.PRUNED: "pruned",
            TrialState.WAITING: "waiting"}.get(state, str(state.name).lower())


def objectives(trial: Any) -> Point | None:
    """``(val_loss, flops_per_token)`` of a COMPLETE trial with two finite values, else None."""
    if trial.state != TrialState.COMPLETE or not trial.values or len(trial.values) < 2:
        return None
    p = (float(trial.values[0]), float(trial.values[1]))
    return p if _ok(p) else None


def matrix_label(m: Any) -> str:
    """A MatrixSpec dict in a few characters: ``"btt(rank=1)"``, ``"4x low_rank(rank=2)"``."""
    if isinstance(m, str):
        return m
    if not isinstance(m, dict):
        return "?"
    levels = m.get("levels")
    if not isinstance(levels, list):
        levels = [m]
    parts = []
    for lv in levels:
        if not isinstance(lv, dict):
            return "?"
        kinds = [k for k in lv if k not in ("blocks", "in", "out")]
        if not kinds:
            continue
        kind = kinds[0]
        params = lv[kind] if isinstance(lv[kind], dict) else {}
        inner = ",".join(f"{k}={_short(v)}" for k, v in params.items())
        blocks = lv.get("blocks", 1)
        parts.append((f"{blocks}x " if blocks not in (1, None) else "")
                     + kind + (f"({inner})" if inner else ""))
    return " + ".join(parts) or "?"


def _short(v: Any) -> str:
    if isinstance(v, list):
        return "/".join(str(x) for x in v)
    return str(v)


def _low_rank(m: Any) -> int | None:
    """The rank of a one-level, one-block low-rank matrix dict, else None."""
    try:
        (lv,) = m["levels"]
        return int(lv["low_rank"]["rank"]) if lv.get("blocks", 1) == 1 else None
    except (KeyError, TypeError, ValueError):
        return None


def attention_label(a: Any) -> tuple[int | None, str]:
    """``(heads, structure)`` of an attention dict (expanded ``groups`` form or a preset)."""
    if not isinstance(a, dict):
        return None, "?"
    groups = a.get("groups")
    if not isinstance(groups, list):  # a preset as written in YAML
        keys = [f"{k}={_short(a[k])}" for k in ("rank", "ranks", "window", "head_dim",
                                                "block_sizes") if k in a]
        return a.get("heads"), " ".join(keys)
    heads, parts = 0, []
    for g in groups:
        heads += int(g.get("heads", 0))
        levels = g.get("levels") or []
        ranks = [_low_rank(lv.get("score")) for lv in levels]
        blocks = ["global" if lv.get("block_size") is None else str(lv["block_size"])
                  for lv in levels]
        if ranks and all(r is not None for r in ranks):
            if len(ranks) == 1:
                text = f"rank {ranks[0]}"
            else:
                text = f"ranks {'/'.join(map(str, ranks))} @ {'/'.join(blocks)}"
        else:
            text = " | ".join(matrix_label(lv.get("score")) for lv in levels)
        if g.get("window") is not None:
            text += f" window {g['window']}"
        parts.append(f"{g.get('heads')}h {text}" if len(groups) > 1 else text)
    for name in ("value", "output"):
        label = matrix_label(a.get(name))
        if label != "dense":
            parts.append(f"W_{name[0].upper()} {label}")
    return heads, "; ".join(parts)


def describe_spec(spec: Any) -> dict[str, Any]:
    """Width, depth, heads, attention and MLP structure of a ModelSpec dict, for tables."""
    out: dict[str, Any] = {"width": None, "depth": None, "heads": None, "attention": NA,
                           "mlp": NA}
    if not isinstance(spec, dict):
        return out
    out["width"] = spec.get("width") if isinstance(spec.get("width"), int) else None
    out["depth"] = spec.get("depth") if isinstance(spec.get("depth"), int) else None
    attn = spec.get("attention")
    layers = spec.get("layers")
    if attn is None and isinstance(layers, list) and layers:
        attn = layers[0]
        heads, text = attention_label(attn)
        text += " (layer 0; layers differ)"
    else:
        heads, text = attention_label(attn)
    out["heads"], out["attention"] = heads, text or NA
    mlp = matrix_label(spec.get("mlp", "dense"))
    ratio = spec.get("mlp_ratio")
    out["mlp"] = f"{mlp} x{ratio}" if ratio else mlp
    return out


def architecture_line(family: str, desc: dict[str, Any], flops: Any, loss: Any) -> str:
    """One line for hover text: family, sizes, structure, FLOPs, loss."""
    return (f"{family} · D={desc.get('width') or NA} L={desc.get('depth') or NA} "
            f"H={desc.get('heads') or NA} · attn: {desc.get('attention')} · mlp: "
            f"{desc.get('mlp')} · {fmt_si(flops, 'FLOPs/tok')} · loss {fmt(loss)}")


def trial_row(trial: Any) -> dict[str, Any]:
    """The table row of one trial: JSON-safe, numbers as numbers (None when unknown)."""
    ua = trial.user_attrs
    state = trial_state(trial)
    obj = objectives(trial)
    loss = obj[0] if obj else finite(ua.get("val_loss"))
    flops = obj[1] if obj else finite(ua.get("flops_per_token"))
    desc = describe_spec(ua.get("spec"))
    family = str(ua.get("family") or "unknown")
    reason = ua.get("reason")
    if state == "duplicate" and "duplicate_of" in ua:
        reason = f"duplicate of trial {ua['duplicate_of']}"
    return {
        "number": trial.number, "state": state, "family": family,
        "val_loss": loss, "flops_per_token": flops,
        "params": finite(ua.get("params")), "metric": finite(ua.get("metric")),
        "metric_name": str(ua.get("metric_name") or ""),
        "kv_cache_bytes_per_token": finite(ua.get("kv_cache_bytes_per_token")),
        "width": desc["width"], "depth": desc["depth"], "heads": desc["heads"],
        "attention": desc["attention"], "mlp": desc["mlp"],
        "duration_s": finite(ua.get("duration_s")),
        "completed": fmt_time(trial.datetime_complete) if trial.datetime_complete else "",
        "reason": str(reason) if reason is not None else "",
        "arch": architecture_line(family, desc, flops, loss),
        "on_front": False,
    }


# ---- a whole study ----------------------------------------------------------------------------
@dataclass
class StudyView:
    """Everything a study page shows, computed once per change of the study's trials."""

    rows: list[dict[str, Any]]
    front: list[int]  # trial numbers on the Pareto front, cheapest first
    reference: Point | None  # in (val_loss, log10 FLOPs/token)
    hv_history: list[tuple[int, float]]  # (trial number, hypervolume) per COMPLETE trial
    counts: dict[str, int]
    best_loss: float | None
    hypervolume: float | None
    last_update: dt.datetime | None
    families: list[str] = field(default_factory=list)

    @property
    def n_trials(self) -> int:
        return len(self.rows)


def study_view(trials: Sequence[Any]) -> StudyView:
    """Rows, front, hypervolume history and counts of one study's trials."""
    trials = sorted(trials, key=lambda t: t.number)
    rows = [trial_row(t) for t in trials]
    complete = [(t.number, objectives(t)) for t in trials]
    complete = [(n, p) for n, p in complete if p is not None]
    points = [p for _, p in complete]
    front_idx = pareto_front(points)
    by_number = dict(complete)
    front = sorted((complete[i][0] for i in front_idx),
                   key=lambda n: (by_number[n][1], by_number[n][0], n))
    on_front = set(front)
    for row in rows:
        row["on_front"] = row["number"] in on_front
    logged = [(p[0], math.log10(p[1])) if p[1] > 0 else (p[0], math.nan) for p in points]
    reference = reference_point(logged)
    history = hypervolume_history(logged, reference) if reference else []
    counts = {s: 0 for s in STATES}
    for row in rows:
        counts[row["state"]] = counts.get(row["state"], 0) + 1
    times = [t for tr in trials for t in (tr.datetime_complete, tr.datetime_start)
             if t is not None]
    return StudyView(
        rows=rows, front=front, reference=reference,
        hv_history=[(n, h) for (n, _), h in zip(complete, history, strict=True)],
        counts=counts, best_loss=min((p[0] for p in points), default=None),
        hypervolume=history[-1] if history else None,
        last_update=max(times) if times else None,
        families=sorted({r["family"] for r in rows}),
    )


def front_rows(view: StudyView) -> list[dict[str, Any]]:
    """The rows of the front's trials, cheapest first."""
    by_number = {r["number"]: r for r in view.rows}
    return [by_number[n] for n in view.front]


def filter_rows(rows: Sequence[dict[str, Any]], families: Sequence[str] | None,
                states: Sequence[str] | None) -> list[dict[str, Any]]:
    """Rows whose family and state are selected (an empty selection keeps everything)."""
    fam, st = set(families or ()), set(states or ())
    return [r for r in rows if (not fam or r["family"] in fam) and (not st or r["state"] in st)]


def study_summary(name: str, user_attrs: dict[str, Any], view: StudyView) -> dict[str, Any]:
    """One line of the studies page."""
    info = user_attrs.get("mlbtc") if isinstance(user_attrs.get("mlbtc"), dict) else {}
    task = info.get("task") if isinstance(info.get("task"), dict) else {}
    return {
        "name": name, "task": str(task.get("name") or NA), "trials": view.n_trials,
        "complete": view.counts.get("complete", 0), "failed": view.counts.get("failed", 0),
        "infeasible": view.counts.get("infeasible", 0),
        "running": view.counts.get("running", 0), "best_loss": finite(view.best_loss),
        "hypervolume": finite(view.hypervolume), "front": len(view.front),
        "last_update": fmt_time(view.last_update),
        "budget_flops": finite(info.get("budget_flops")),
    }


def curve_series(curve: Any) -> dict[str, list[tuple[float, float]]]:
    """``{"train_loss": [(flops, loss), ...], "val_loss": [...], "metric": [...]}``.

    Entries without FLOPs, and non-finite values, are dropped (a NaN run still plots its
    finite part).
    """
    out: dict[str, list[tuple[float, float]]] = {"train_loss": [], "val_loss": [], "metric": []}
    if not isinstance(curve, list):
        return out
    for entry in curve:
        if not isinstance(entry, dict):
            continue
        x = finite(entry.get("flops"))
        if x is None:
            continue
        for key, series in out.items():
            y = finite(entry.get(key))
            if y is not None:
                series.append((x, y))
    return out


def trial_metrics(trial: Any) -> list[tuple[str, str]]:
    """(label, formatted value) pairs for the trial page."""
    ua = trial.user_attrs
    obj = objectives(trial)
    metric_name = str(ua.get("metric_name") or "metric")
    items: list[tuple[str, str]] = [
        ("state", trial_state(trial)),
        ("family", str(ua.get("family") or NA)),
        ("validation loss", fmt(obj[0] if obj else ua.get("val_loss"), 6)),
        (metric_name, fmt(ua.get("metric"), 6)),
        ("FLOPs / token (forward)", fmt_si(obj[1] if obj else ua.get("flops_per_token"))),
        ("parameters (non-embedding)", fmt(ua.get("params"))),
        ("KV-cache bytes / token", fmt(ua.get("kv_cache_bytes_per_token"))),
        ("training FLOPs", fmt_si(ua.get("train_flops"))),
        ("budget FLOPs", fmt_si(ua.get("budget_flops"))),
        ("steps", fmt(ua.get("steps"))),
        ("seed", str(ua.get("seed", NA))),
        ("duration", f"{fmt(ua.get('duration_s'), 3)} s"
         if finite(ua.get("duration_s")) is not None else NA),
        ("architecture hash", str(ua.get("hash") or NA)),
        ("started", fmt_time(trial.datetime_start)),
        ("completed", fmt_time(trial.datetime_complete)),
        ("code version", str(ua.get("code_version") or NA)),
    ]
    if "duplicate_of" in ua:
        items.append(("duplicate of trial", str(ua["duplicate_of"])))
    return items

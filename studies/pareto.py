"""Pareto fronts and hypervolume of loss against FLOPs: pure functions over points and trials.

Used by ``mlbtc pareto``/``mlbtc studies``, the live search progress and the dashboard.

Conventions (both objectives are minimized):

- ``a`` dominates ``b`` when ``a <= b`` in both objectives and ``a < b`` in at least one. Equal
  points do not dominate each other, so exact ties are all on the front. Points with a NaN or an
  infinity are never on the front.
- The hypervolume is measured in ``(val_loss, log10(flops_per_token))``: FLOPs span orders of
  magnitude, and on a linear axis one expensive model would set the whole volume. The reference
  point defaults to ``max + 0.1 * |max|`` of each coordinate over the points given (for losses
  and log-FLOPs, which are positive, that is ``1.1 * max``). A history is computed with one
  reference (that of all its points), so it never decreases.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

Point = Sequence[float]


def _finite(p: Point) -> bool:
    return len(p) >= 2 and all(isinstance(v, (int, float)) and math.isfinite(v) for v in p[:2])


def pareto_front(points: Sequence[Point]) -> list[int]:
    """Indices of the non-dominated points (2-D minimization), sorted by the first objective.

    Exact in O(n log n): sort by (x, y) and sweep; within one x only the least y survives, and
    only if it is below the best y of every smaller x.
    """
    order = sorted((i for i, p in enumerate(points) if _finite(p)),
                   key=lambda i: (points[i][0], points[i][1]))
    front: list[int] = []
    best_y = math.inf
    k = 0
    while k < len(order):
        x = points[order[k]][0]
        group = []
        while k < len(order) and points[order[k]][0] == x:
            group.append(order[k])
            k += 1
        y_min = points[group[0]][1]  # sorted by y within the group
        if y_min < best_y:
            front.extend(i for i in group if points[i][1] == y_min)
            best_y = y_min
    return front


def default_reference(points: Sequence[Point]) -> tuple[float, float]:
    """``max + 0.1 * |max|`` per coordinate (``+ 0.1`` when the max is 0) over finite points."""
    finite = [p for p in points if _finite(p)]
    if not finite:
        raise ValueError("no finite points to place a reference point from")
    ref = []
    for j in range(2):
        m = max(p[j] for p in finite)
        ref.append(m + (0.1 * abs(m) if m != 0 else 0.1))
    return ref[0], ref[1]


def hypervolume_2d(points: Sequence[Point], reference: Point | None = None) -> float:
    """The area dominated by ``points`` and bounded by ``reference`` (2-D minimization), exact.

    Points that are not strictly better than the reference in both coordinates add nothing.
    """
    finite = [(float(p[0]), float(p[1])) for p in points if _finite(p)]
    if not finite:
        return 0.0
    rx, ry = default_reference(finite) if reference is None else (reference[0], reference[1])
    inside = [p for p in finite if p[0] < rx and p[1] < ry]
    volume = 0.0
    best_y = ry
    for x, y in sorted(inside):  # sweep in x: each new lower y adds a strip to the right of x
        if y < best_y:
            volume += (rx - x) * (best_y - y)
            best_y = y
    return volume


def hv_point(loss: float, flops: float) -> tuple[float, float]:
    """A trial's point in hypervolume space: ``(loss, log10(flops))`` (NaN if flops <= 0)."""
    return float(loss), math.log10(flops) if flops > 0 else math.nan


# ---- trials -------------------------------------------------------------------------------
def _values(t: FrozenTrial) -> tuple[float, float] | None:
    if t.state != TrialState.COMPLETE or not t.values or len(t.values) < 2:
        return None
    loss, flops = float(t.values[0]), float(t.values[1])
    if not (math.isfinite(loss) and math.isfinite(flops)):
        return None
    return loss, flops


def trial_row(t: FrozenTrial) -> dict[str, Any]:
    """One trial as a flat, JSON-able dict (the trial table of the CLI and the dashboard)."""
    ua = t.user_attrs
    values = _values(t)
    status = ua.get("status")
    if status is None:
        status = {TrialState.COMPLETE: "ok", TrialState.RUNNING: "running",
                  TrialState.WAITING: "waiting"}.get(t.state, t.state.name.lower())
    return {
        "trial": t.number,
        "state": t.state.name,
        "status": status,
        "loss": values[0] if values else ua.get("val_loss"),
        "flops": values[1] if values else ua.get("flops_per_token"),
        "values": list(t.values) if t.values else None,
        "metric": ua.get("metric"),
        "metric_name": ua.get("metric_name"),
        "family": ua.get("family"),
        "hash": ua.get("hash"),
        "params_count": ua.get("params"),
        "kv_cache_bytes_per_token": ua.get("kv_cache_bytes_per_token"),
        "params": dict(t.params),
        "reason": ua.get("reason"),
        "duplicate_of": ua.get("duplicate_of"),
        "retry_of": ua.get("retry_of"),
        "duration_s": ua.get("duration_s"),
        "started": t.datetime_start.isoformat() if t.datetime_start else None,
        "completed": t.datetime_complete.isoformat() if t.datetime_complete else None,
    }


def study_rows(study: optuna.Study, trials: Sequence[FrozenTrial] | None = None
               ) -> list[dict[str, Any]]:
    """Every trial as a :func:`trial_row`, reading the storage once (never ``study.trials``)."""
    trials = study.get_trials(deepcopy=False) if trials is None else trials
    return [trial_row(t) for t in trials]


def front_rows(study: optuna.Study, rows: Sequence[dict[str, Any]] | None = None
               ) -> list[dict[str, Any]]:
    """The non-dominated COMPLETE trials (loss vs FLOPs), cheapest first."""
    rows = study_rows(study) if rows is None else rows
    done = [r for r in rows if r["state"] == "COMPLETE" and r["values"]]
    front = pareto_front([(r["loss"], r["flops"]) for r in done])
    return sorted((done[i] for i in front), key=lambda r: (r["flops"], r["loss"]))


def study_hypervolume(rows: Sequence[dict[str, Any]],
                      reference: Point | None = None) -> float | None:
    """Hypervolume of the COMPLETE rows in (loss, log10 FLOPs); None without any."""
    points = [hv_point(r["loss"], r["flops"]) for r in rows
              if r["state"] == "COMPLETE" and r["values"]]
    points = [p for p in points if _finite(p)]
    if not points:
        return None
    return hypervolume_2d(points, reference)


def hypervolume_history(study: optuna.Study, rows: Sequence[dict[str, Any]] | None = None,
                        reference: Point | None = None) -> list[dict[str, Any]]:
    """``[{trial, hypervolume}]`` after each COMPLETE trial in trial-number order, all against
    one reference point (default: that of all the COMPLETE trials), so it never decreases."""
    rows = study_rows(study) if rows is None else rows
    done = sorted((r for r in rows if r["state"] == "COMPLETE" and r["values"]),
                  key=lambda r: r["trial"])
    points = [hv_point(r["loss"], r["flops"]) for r in done]
    finite = [p for p in points if _finite(p)]
    if not finite:
        return []
    ref = default_reference(finite) if reference is None else reference
    out: list[dict[str, Any]] = []
    front: list[Point] = []
    volume = 0.0
    for r, p in zip(done, points, strict=True):
        if _finite(p) and not any(q[0] <= p[0] and q[1] <= p[1] for q in front):
            front = [q for q in front if not (p[0] <= q[0] and p[1] <= q[1])] + [p]
            volume = hypervolume_2d(front, ref)
        out.append({"trial": r["trial"], "hypervolume": volume})
    return out


def count_statuses(rows: Sequence[dict[str, Any]]) -> dict[str, int]:
    """How many trials have each status (ok, failed, infeasible, duplicate, running, waiting)."""
    out: dict[str, int] = {}
    for r in rows:
        out[r["status"]] = out.get(r["status"], 0) + 1
    return out


def study_summary(study: optuna.Study) -> dict[str, Any]:
    """One line of ``mlbtc studies``: name, task, trial counts, best loss, front, hypervolume."""
    trials = study.get_trials(deepcopy=False)
    rows = study_rows(study, trials)
    info = study.user_attrs.get("mlbtc") or {}
    states: dict[str, int] = {}
    for r in rows:
        states[r["state"]] = states.get(r["state"], 0) + 1
    losses = [r["loss"] for r in rows if r["state"] == "COMPLETE" and r["values"]]
    times = [t.datetime_complete or t.datetime_start for t in trials]
    times = [t for t in times if t is not None]
    return {
        "name": study.study_name,
        "task": (info.get("task") or {}).get("name"),
        "budget_flops": info.get("budget_flops"),
        "trials": len(rows),
        "states": states,
        "statuses": count_statuses(rows),
        "best_loss": min(losses) if losses else None,
        "front_size": len(front_rows(study, rows)),
        "hypervolume": study_hypervolume(rows),
        "last_update": max(times).isoformat() if times else None,
    }


__all__ = [
    "count_statuses", "default_reference", "front_rows", "hv_point", "hypervolume_2d",
    "hypervolume_history", "pareto_front", "study_hypervolume", "study_rows", "study_summary",
    "trial_row",
]

"""Pareto fronts and hypervolume of loss against FLOPs: pure functions over points and trials.

The one implementation of fronts, hypervolume and study summaries: ``mlbtc pareto``/``mlbtc
studies``, the live search progress, export and the dashboard all use these, over points or
over :class:`~studies.record.TrialRecord`.

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

import bisect
import math
from collections.abc import Sequence
from typing import Any

from .record import STATES, StudyInfo, TrialRecord, json_safe

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


def hypervolume_history_points(points: Sequence[Point], reference: Point) -> list[float]:
    """Hypervolume after each point in order, against one ``reference`` (never decreasing).

    Incremental: a dominated point leaves the front and the area unchanged; a new front point
    removes the points it dominates. Cost O(n log n + n * front size).
    """
    front_b: list[float] = []  # second coordinate ascending
    front_a: list[float] = []  # first coordinate, strictly descending along the front
    out: list[float] = []
    area = 0.0
    for p in points:
        a, b = float(p[0]), float(p[1])
        if not (_finite((a, b)) and a < reference[0] and b < reference[1]):
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
        area = 0.0
        for k, (fa, fb) in enumerate(zip(front_a, front_b, strict=True)):
            nxt = front_b[k + 1] if k + 1 < len(front_b) else reference[1]
            area += (nxt - fb) * (reference[0] - fa)
        out.append(area)
    return out


# ---- records ----------------------------------------------------------------------------------
def front(recs: Sequence[TrialRecord]) -> list[TrialRecord]:
    """The non-dominated COMPLETE records (loss vs FLOPs), cheapest first."""
    done = [r for r in recs if r.point is not None]
    idx = pareto_front([r.point for r in done])  # type: ignore[misc]
    return sorted((done[i] for i in idx),
                  key=lambda r: (r.flops_per_token, r.val_loss, r.number))


def hv_points(recs: Sequence[TrialRecord]) -> list[tuple[int, tuple[float, float]]]:
    """``(number, (loss, log10 flops))`` of the COMPLETE records in trial-number order."""
    out = []
    for r in sorted(recs, key=lambda r: r.number):
        if r.point is not None:
            p = hv_point(*r.point)
            if _finite(p):
                out.append((r.number, p))
    return out


def hypervolume(recs: Sequence[TrialRecord], reference: Point | None = None) -> float | None:
    """Hypervolume of the COMPLETE records in (loss, log10 FLOPs); None without any."""
    points = [p for _, p in hv_points(recs)]
    return hypervolume_2d(points, reference) if points else None


def hypervolume_history(recs: Sequence[TrialRecord], reference: Point | None = None
                        ) -> list[tuple[int, float]]:
    """``(trial number, hypervolume)`` after each COMPLETE trial, in trial-number order, all
    against one reference (default: that of all the COMPLETE trials)."""
    numbered = hv_points(recs)
    if not numbered:
        return []
    points = [p for _, p in numbered]
    ref = default_reference(points) if reference is None else reference
    hist = hypervolume_history_points(points, ref)
    return [(n, h) for (n, _), h in zip(numbered, hist, strict=True)]


def count_states(recs: Sequence[TrialRecord]) -> dict[str, int]:
    """How many records have each state (every state of :data:`STATES`, zeros included)."""
    out = {s: 0 for s in STATES}
    for r in recs:
        out[r.state] = out.get(r.state, 0) + 1
    return out


def study_summary(name: str, info: StudyInfo, recs: Sequence[TrialRecord]) -> dict[str, Any]:
    """One study in a line: ``mlbtc studies`` (and its JSON) and the dashboard's studies page.

    Keys: name, task, budget_flops, trials, states (count per state), trained (counting towards
    the study's total), best_loss, front_size, hypervolume, last_update (ISO time or None).
    """
    times = [t for r in recs for t in (r.completed, r.started) if t is not None]
    losses = [r.val_loss for r in recs if r.point is not None]
    return json_safe({
        "name": name, "task": info.task_name, "budget_flops": info.budget_flops,
        "trials": len(recs), "states": count_states(recs),
        "trained": sum(1 for r in recs if r.trained),
        "best_loss": min(losses) if losses else None,
        "front_size": len(front(recs)), "hypervolume": hypervolume(recs),
        "last_update": max(times).isoformat() if times else None,
    })


__all__ = [
    "count_states", "default_reference", "front", "hv_point", "hv_points", "hypervolume",
    "hypervolume_2d", "hypervolume_history", "hypervolume_history_points", "pareto_front",
    "study_summary",
]

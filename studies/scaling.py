"""Scaling laws per structure: fit ``L(C) = E + A * C**-alpha`` to losses at several budgets.

Pure numpy (no Optuna): the inputs are :class:`ScalingPoint` s (an architecture, its family, a
training budget ``C`` in FLOPs and the validation loss it reached there), which the runner
records once per rung of a multi-fidelity search.

The fit. Least squares in log space, as Hoffmann et al. (2022) do it, on
``log L_hat = logaddexp(e, a - alpha * log(C / C0))`` with ``E = exp(e)``, ``A = exp(a) *
C0**alpha`` and ``C0`` the geometric mean of the budgets (so the problem is well scaled whether
budgets are 1e9 or 1e21). Levenberg-Marquardt from a grid of starts (7 exponents x 5 floors),
with tight tolerances and parameters kept at full precision (Besiroglu et al. 2024 found that
an early stop and rounded parameters biased the original fit); the best start wins. ``alpha``
is kept in ``[0, ALPHA_MAX]``. With few budgets ``E`` and ``alpha`` trade off against each
other: three budgets fit exactly (the fit error is then 0 and says nothing), so each fit also
reports ``holdout_rel_err`` for four or more budgets: the relative error of predicting the
largest budget from a fit to the others, which is the extrapolation error that matters.

A *family* curve is the lower envelope of its architectures: at each budget, the least loss any
architecture of the family reached there (with asynchronous promotion only the family's
promising architectures reach the top rungs, so this is its compute-optimal frontier).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

ALPHA_MAX = 4.0
ALPHA_STARTS = (0.05, 0.1, 0.2, 0.35, 0.5, 0.8, 1.2)
FLOOR_STARTS = (0.0, 0.3, 0.6, 0.8, 0.95)  # E as a fraction of the least loss
MIN_BUDGETS = 3
CROSSING_GRID = 400


@dataclass(frozen=True)
class ScalingPoint:
    """One architecture's validation loss after training for ``budget`` FLOPs."""

    key: Hashable  # the architecture (a trial number or a spec hash)
    family: str
    budget: float
    loss: float


@dataclass(frozen=True)
class PowerLaw:
    """A fitted ``L(C) = E + A * C**-alpha`` and how well it fits.

    ``rmse_log``: root mean square of ``log L - log L_hat`` over the points;
    ``max_rel_err``: the largest ``|L_hat / L - 1|``; ``holdout_rel_err``: ``|L_hat / L - 1|``
    at the largest budget for a fit to the smaller ones (``None`` with fewer than 4 budgets).
    """

    E: float
    A: float
    alpha: float
    n: int
    budgets: tuple[float, float]  # the smallest and largest budget fitted
    rmse_log: float
    max_rel_err: float
    holdout_rel_err: float | None = None

    def predict(self, budget: float | np.ndarray) -> Any:
        c = np.asarray(budget, dtype=float)
        out = self.E + self.A * np.exp(-self.alpha * np.log(c))
        return float(out) if out.ndim == 0 else out

    def to_dict(self) -> dict[str, Any]:
        return {"E": self.E, "A": self.A, "alpha": self.alpha, "n": self.n,
                "budgets": list(self.budgets), "rmse_log": self.rmse_log,
                "max_rel_err": self.max_rel_err, "holdout_rel_err": self.holdout_rel_err}


def _model(theta: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``log L_hat`` at log-budgets ``c`` and its Jacobian in ``(e, a, alpha)``."""
    e, a, alpha = theta
    power = a - alpha * c
    pred = np.logaddexp(e, power)
    w = np.exp(e - pred)  # d pred / d e; the power term's share is 1 - w
    jac = np.stack([w, 1.0 - w, -(1.0 - w) * c], axis=1)
    return pred, jac


def _clip(theta: np.ndarray, e_min: float) -> np.ndarray:
    return np.array([max(theta[0], e_min), theta[1], min(max(theta[2], 0.0), ALPHA_MAX)])


def _levenberg_marquardt(theta: np.ndarray, c: np.ndarray, y: np.ndarray, e_min: float,
                         iters: int = 300) -> tuple[np.ndarray, float]:
    theta = _clip(theta, e_min)
    pred, jac = _model(theta, c)
    r = pred - y
    cost, lam = float(r @ r), 1e-3
    for _ in range(iters):
        h, g = jac.T @ jac, jac.T @ r
        try:
            step = np.linalg.solve(h + lam * np.diag(np.diag(h) + 1e-12), -g)
        except np.linalg.LinAlgError:
            break
        new = _clip(theta + step, e_min)
        new_pred, new_jac = _model(new, c)
        new_r = new_pred - y
        new_cost = float(new_r @ new_r)
        if new_cost < cost:
            done = cost - new_cost <= 1e-16 * (1.0 + cost) and np.abs(new - theta).max() < 1e-12
            theta, jac, r, cost, lam = new, new_jac, new_r, new_cost, max(lam / 3, 1e-12)
            if done or cost < 1e-30:
                break
        else:
            lam *= 4
            if lam > 1e12:
                break
    return theta, cost


def _fit(budgets: np.ndarray, losses: np.ndarray) -> tuple[float, float, float]:
    """``(E, A, alpha)`` of the best of the grid of starts."""
    c0 = float(np.exp(np.log(budgets).mean()))
    c, y = np.log(budgets / c0), np.log(losses)
    least = float(losses.min())
    e_min = math.log(least) - 40.0
    best: tuple[float, np.ndarray] | None = None
    for alpha, frac in itertools.product(ALPHA_STARTS, FLOOR_STARTS):
        floor = frac * least
        e = math.log(floor) if floor > 0 else e_min
        a = float(np.mean(np.log(np.maximum(losses - floor, 1e-300)) + alpha * c))
        theta, cost = _levenberg_marquardt(np.array([e, a, alpha]), c, y, e_min)
        if best is None or cost < best[0]:
            best = (cost, theta)
    assert best is not None
    e, a, alpha = best[1]
    E = 0.0 if e <= e_min else math.exp(e)
    return E, math.exp(a + alpha * math.log(c0)), float(alpha)


def fit_power_law(budgets: Sequence[float], losses: Sequence[float]) -> PowerLaw:
    """Fit ``L(C) = E + A * C**-alpha`` (module doc); ValueError when fewer than 3 distinct
    positive budgets with positive finite losses are given."""
    pairs = [(float(b), float(v)) for b, v in zip(budgets, losses, strict=True)
             if b > 0 and math.isfinite(b) and v is not None and math.isfinite(v) and v > 0]
    distinct = sorted({b for b, _ in pairs})
    if len(distinct) < MIN_BUDGETS:
        raise ValueError(f"a scaling fit needs losses at >= {MIN_BUDGETS} distinct budgets, got "
                         f"{len(distinct)}")
    b = np.array([p[0] for p in pairs])
    v = np.array([p[1] for p in pairs])
    E, A, alpha = _fit(b, v)
    pred = E + A * np.exp(-alpha * np.log(b))
    holdout = None
    if len(distinct) > MIN_BUDGETS:
        keep = b < distinct[-1]
        hE, hA, halpha = _fit(b[keep], v[keep])
        top = v[~keep]
        holdout = float(np.abs((hE + hA * distinct[-1] ** -halpha) / top - 1.0).max())
    return PowerLaw(E=E, A=A, alpha=alpha, n=len(pairs), budgets=(distinct[0], distinct[-1]),
                    rmse_log=float(np.sqrt(np.mean((np.log(pred) - np.log(v)) ** 2))),
                    max_rel_err=float(np.abs(pred / v - 1.0).max()), holdout_rel_err=holdout)


# ---- points from trial records ---------------------------------------------------------------
def rung_entries(rec: Any) -> list[dict[str, Any]]:
    """The finished rungs a :class:`studies.record.TrialRecord` recorded (``[]`` for a
    single-budget trial)."""
    return [r for r in rec.rungs or [] if isinstance(r, dict)]


def scaling_points(recs: Sequence[Any]) -> list[ScalingPoint]:
    """Every successful rung, and every confirmation seed, as a point ``(trial, family, C, L)``."""
    out = []
    for rec in recs:
        family = rec.family or "unknown"
        entries = [r for r in rung_entries(rec) if r.get("status") == "ok"]
        for r in entries:
            out.append(ScalingPoint(rec.number, family, float(r["budget_flops"]),
                                    float(r["val_loss"])))
        confirm = rec.confirm
        if entries and isinstance(confirm, dict):
            top = float(entries[-1]["budget_flops"])
            for run in confirm.get("runs") or []:
                if isinstance(run, dict) and run.get("val_loss") is not None:
                    out.append(ScalingPoint(rec.number, family, top, float(run["val_loss"])))
    return out


# ---- curves, the best structure at a budget, and where families cross ----------------------
@dataclass(frozen=True)
class Curve:
    """The points of one architecture (``kind="architecture"``) or one family's lower envelope
    (``kind="family"``) and their fit."""

    name: str
    kind: str
    family: str
    points: tuple[tuple[float, float], ...]  # (budget, loss), budget ascending
    fit: PowerLaw

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "family": self.family,
                "points": [list(p) for p in self.points], "fit": self.fit.to_dict()}


@dataclass(frozen=True)
class ScalingReport:
    architectures: tuple[Curve, ...]
    families: tuple[Curve, ...]
    target: float | None = None
    ranking: tuple[dict[str, Any], ...] = ()  # at ``target``: best predicted first
    crossings: tuple[dict[str, Any], ...] = ()
    skipped: tuple[dict[str, Any], ...] = field(default=())  # too few budgets to fit

    @property
    def best(self) -> dict[str, Any] | None:
        """The architecture predicted best at ``target`` (a family when none has a fit)."""
        archs = [r for r in self.ranking if r["kind"] == "architecture"]
        return (archs or list(self.ranking) or [None])[0]

    def to_dict(self) -> dict[str, Any]:
        return {"target": self.target, "best": self.best, "ranking": list(self.ranking),
                "crossings": list(self.crossings), "skipped": list(self.skipped),
                "architectures": [c.to_dict() for c in self.architectures],
                "families": [c.to_dict() for c in self.families]}


def _good(p: ScalingPoint) -> bool:
    return (p.loss is not None and math.isfinite(p.loss) and p.loss > 0
            and math.isfinite(p.budget) and p.budget > 0)


def family_envelope(points: Iterable[ScalingPoint]) -> dict[str, list[tuple[float, float]]]:
    """Per family, ``(budget, least loss at that budget)`` ascending in budget."""
    least: dict[str, dict[float, float]] = {}
    for p in points:
        if _good(p):
            at = least.setdefault(p.family, {})
            at[p.budget] = min(at.get(p.budget, math.inf), p.loss)
    return {f: sorted(at.items()) for f, at in sorted(least.items())}


def crossings(fits: dict[str, PowerLaw], low: float, high: float,
              grid: int = CROSSING_GRID) -> list[dict[str, Any]]:
    """Budgets in ``[low, high]`` where two fitted curves cross, for every pair of ``fits``.

    Each entry: ``{a, b, budget, loss, below, above}``: ``below`` is the one predicted better
    just below the crossing. Found on a log grid, then refined by bisection in log budget.
    """
    logs = np.linspace(math.log(low), math.log(high), grid)
    out = []
    for (na, fa), (nb, fb) in itertools.combinations(sorted(fits.items()), 2):
        diff = fa.predict(np.exp(logs)) - fb.predict(np.exp(logs))
        for k in np.nonzero(np.sign(diff[:-1]) * np.sign(diff[1:]) < 0)[0]:
            lo, hi = logs[k], logs[k + 1]
            for _ in range(100):
                mid = 0.5 * (lo + hi)
                d = fa.predict(math.exp(mid)) - fb.predict(math.exp(mid))
                lo, hi = (mid, hi) if np.sign(d) == np.sign(diff[k]) else (lo, mid)
            budget = math.exp(0.5 * (lo + hi))
            below = na if diff[k] < 0 else nb
            out.append({"a": na, "b": nb, "budget": budget, "loss": fa.predict(budget),
                        "below": below, "above": nb if below == na else na})
    return sorted(out, key=lambda x: x["budget"])


def frontier(fits: dict[str, PowerLaw], budgets: Sequence[float]) -> list[dict[str, Any]]:
    """The predicted compute-optimal frontier: at each budget, the curve predicted lowest."""
    out = []
    for budget in budgets:
        name = min(fits, key=lambda n: (fits[n].predict(budget), n))
        out.append({"budget": float(budget), "name": name, "loss": fits[name].predict(budget)})
    return out


def scaling_report(points: Iterable[ScalingPoint], target: float | None = None,
                   span: tuple[float, float] | None = None) -> ScalingReport:
    """Fit every architecture with >= 3 budgets and every family's envelope; rank the
    architectures at ``target`` (with each family's envelope prediction alongside); list the
    crossings of family curves within ``span`` (default: the smallest budget observed to
    ``max(target, 1000 x the largest)``)."""
    points = [p for p in points if _good(p)]
    by_arch: dict[Hashable, list[ScalingPoint]] = {}
    for p in points:
        by_arch.setdefault(p.key, []).append(p)
    archs, skipped = [], []
    for key, pts in sorted(by_arch.items(), key=lambda kv: str(kv[0])):
        pairs = tuple(sorted((p.budget, p.loss) for p in pts))
        if len({b for b, _ in pairs}) < MIN_BUDGETS:
            skipped.append({"name": str(key), "family": pts[0].family,
                            "budgets": len({b for b, _ in pairs})})
            continue
        fit = fit_power_law([b for b, _ in pairs], [v for _, v in pairs])
        archs.append(Curve(str(key), "architecture", pts[0].family, pairs, fit))
    fams = []
    for fam, pairs in family_envelope(points).items():
        if len(pairs) >= MIN_BUDGETS:
            fit = fit_power_law([b for b, _ in pairs], [v for _, v in pairs])
            fams.append(Curve(fam, "family", fam, tuple(pairs), fit))
    ranking: list[dict[str, Any]] = []
    if target is not None:
        ranking = sorted(({"name": c.name, "kind": c.kind, "family": c.family,
                           "predicted_loss": c.fit.predict(target),
                           "extrapolation": target / c.fit.budgets[1]} for c in archs + fams),
                         key=lambda r: (r["predicted_loss"], r["name"]))
    cross: list[dict[str, Any]] = []
    if len(fams) >= 2:
        if span is None:
            low = min(p.budget for p in points)
            high = max(max(p.budget for p in points) * 1e3, target or 0.0)
            span = (low, high)
        cross = crossings({c.name: c.fit for c in fams}, *span)
    return ScalingReport(tuple(archs), tuple(fams), target, tuple(ranking), tuple(cross),
                         tuple(skipped))


__all__ = [
    "Curve", "PowerLaw", "ScalingPoint", "ScalingReport", "crossings", "family_envelope",
    "fit_power_law", "frontier", "rung_entries", "scaling_points", "scaling_report",
]

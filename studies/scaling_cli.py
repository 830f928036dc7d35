"""``mlbtc scaling STUDY [--at 1e15] [--json]``: scaling laws of a multi-fidelity study.

Reads the rung results every trial of the study recorded (user attr ``rungs``, plus the extra
seeds of ``confirm`` at the top rung), fits ``L(C) = E + A * C**-alpha`` per architecture with
3 or more budgets and per family (:mod:`studies.scaling`), and prints the fits with their
errors, the structure predicted best at ``--at`` (default: 10 x the largest budget), and where
families' curves cross.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from typing import Any

from mlbtc_search.errors import UsageError

from .progress import format_table
from .record import json_safe
from .scaling import ScalingReport, frontier, scaling_points, scaling_report

FIT_COLUMNS = (("E", "E", ".4g"), ("A", "A", ".4g"), ("alpha", "alpha", ".4g"),
               ("points", "n", ""), ("rmse(log)", "rmse_log", ".2g"),
               ("holdout err", "holdout_rel_err", ".2g"))


def _fit_rows(curves: Any, target: float) -> list[dict[str, Any]]:
    rows = []
    for c in curves:
        rows.append({"name": c.name, "family": c.family, **c.fit.to_dict(),
                     "budgets": len({b for b, _ in c.points}), "at": c.fit.predict(target)})
    return rows


def format_report(study: str, report: ScalingReport, target: float, n_archs: int,
                  budgets: Sequence[float]) -> str:
    lines = [f"study {study!r}: {n_archs} architecture(s) trained at {len(budgets)} budget(s) "
             f"({min(budgets):.3g} .. {max(budgets):.3g} FLOPs); L(C) = E + A * C^-alpha, "
             f"predictions at C = {target:.3g}"]
    at = (f"L({target:.2g})", "at", ".4g")
    if report.families:
        lines += ["", "families (lower envelope of their architectures):",
                  format_table(_fit_rows(report.families, target),
                               (("family", "name", ""), ("budgets", "budgets", ""),
                                *FIT_COLUMNS, at))]
    if report.architectures:
        lines += ["", "architectures with >= 3 budgets:",
                  format_table(_fit_rows(report.architectures, target),
                               (("trial", "name", ""), ("family", "family", ""),
                                *FIT_COLUMNS, at))]
    if report.skipped:
        lines += ["", f"{len(report.skipped)} architecture(s) reached fewer than 3 budgets "
                      "(no fit)"]
    best = report.best
    if best is not None:
        what = (f"trial {best['name']} ({best['family']})" if best["kind"] == "architecture"
                else f"family {best['name']}")
        lines += ["", f"predicted best at {target:.3g} FLOPs: {what}, loss "
                      f"{best['predicted_loss']:.4g} ({best['extrapolation']:.3g} x the "
                      f"largest budget it was fitted on)"]
    else:
        lines += ["", "no fit: no architecture or family has losses at 3 or more budgets"]
    for x in report.crossings:
        lines.append(f"families {x['below']} and {x['above']} cross at {x['budget']:.3g} "
                     f"FLOPs (loss {x['loss']:.4g}): {x['below']} is predicted better below, "
                     f"{x['above']} above")
    if len(report.families) >= 2 and not report.crossings:
        lines.append("no crossing of family curves up to "
                     f"{max(target, 1e3 * max(budgets)):.3g} FLOPs")
    return "\n".join(lines)


def scaling(args: argparse.Namespace) -> int:
    from .storage import load_records, load_study, open_storage

    storage = open_storage(getattr(args, "storage", None), create=False)
    study = load_study(storage, args.study)
    recs = load_records(study)
    points = scaling_points(recs)
    if not points:
        raise UsageError(f"study {args.study!r} records no budget rungs: scaling laws need a "
                         "multi-fidelity search (budgets: [1e11, 3e11, 1e12] in its search "
                         "space; see docs/scaling.md)")
    budgets = sorted({p.budget for p in points})
    target = float(args.at) if getattr(args, "at", None) else 10.0 * budgets[-1]
    report = scaling_report(points, target=target)
    fits = {f"family {c.name}": c.fit for c in report.families}
    grid = [10 ** (math.log10(budgets[0]) + i * (math.log10(target / budgets[0])) / 20)
            for i in range(21)]
    if getattr(args, "json", False):
        out = {"study": study.study_name, "budgets": budgets, **report.to_dict(),
               "frontier": frontier(fits, grid) if fits else []}
        sys.stdout.write(json.dumps(json_safe(out), allow_nan=False) + "\n")
        return 0
    n_archs = len({p.key for p in points})
    sys.stdout.write(format_report(study.study_name, report, target, n_archs, budgets) + "\n")
    return 0


__all__ = ["format_report", "scaling"]

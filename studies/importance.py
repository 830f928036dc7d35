"""Which parameters (and which structure descriptors) matter, for loss and for FLOPs.

PED-ANOVA (``optuna.importance.PedAnovaImportanceEvaluator``) is the one importance evaluator
that copes with conditional parameters: our spaces are conditional everywhere (a group's levels
exist only when it has them), and fANOVA / mean-decrease-impurity silently drop every parameter
that is not in all trials. It treats lower as better, which is right for both objectives.

- :func:`param_importances`: Optuna's own parameters (the YAML paths), per objective.
- :func:`descriptor_importances`: the same evaluator over the trials' structure descriptors
  (``descriptors.summary``: heads, q.k width, rank, cores, levels, finest block, ...), which are
  fewer and easier to read than the hundreds of structural parameters they come from. They are
  put on trials of an in-memory study as float parameters over their observed range.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import optuna
from optuna.distributions import FloatDistribution
from optuna.importance import PedAnovaImportanceEvaluator, get_param_importances
from optuna.trial import FrozenTrial, TrialState, create_trial

MIN_TRIALS = 3


def _evaluate(study: optuna.Study, index: int) -> dict[str, float]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # experimental-feature and few-trial warnings
        imp = get_param_importances(study, evaluator=PedAnovaImportanceEvaluator(),
                                    target=lambda t: t.values[index])
    return {k: float(v) for k, v in imp.items()}


def _complete(study: optuna.Study) -> list[FrozenTrial]:
    return [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if t.values and all(math.isfinite(v) for v in t.values)]


def param_importances(study: optuna.Study, objectives: Sequence[str]
                      ) -> dict[str, dict[str, float]]:
    """{objective: {parameter: importance}} (each sums to 1), objectives in the study's order;
    empty if fewer than ``MIN_TRIALS`` trials completed."""
    if len(_complete(study)) < MIN_TRIALS:
        return {}
    return {name: _evaluate(study, i) for i, name in enumerate(objectives)}


def descriptor_importances(values: Sequence[Sequence[float]],
                           descriptors: Sequence[Mapping[str, float]],
                           objectives: Sequence[str]) -> dict[str, dict[str, float]]:
    """Importances of descriptor values (one mapping per trial) for each objective value."""
    rows = [(list(v), dict(d)) for v, d in zip(values, descriptors, strict=True)
            if all(math.isfinite(x) for x in v)]
    if len(rows) < MIN_TRIALS:
        return {}
    ranges: dict[str, tuple[float, float]] = {}
    for _, d in rows:
        for k, x in d.items():
            if isinstance(x, (int, float)) and math.isfinite(x):
                lo, hi = ranges.get(k, (x, x))
                ranges[k] = (min(lo, x), max(hi, x))
    varying = {k: FloatDistribution(lo, hi) for k, (lo, hi) in ranges.items() if hi > lo}
    if not varying:
        return {}
    study = optuna.create_study(directions=["minimize"] * len(objectives))
    for v, d in rows:
        params = {k: float(d[k]) for k in varying if k in d}
        study.add_trial(create_trial(values=v, params=params,
                                     distributions={k: varying[k] for k in params}))
    return {name: _evaluate(study, i) for i, name in enumerate(objectives)}


def format_importances(imp: Mapping[str, Mapping[str, float]], top: int = 10,
                       title: str = "Parameter importances (PED-ANOVA)") -> str:
    if not imp:
        return f"{title}: not enough completed trials (need {MIN_TRIALS})."
    lines = [f"{title}, top {top} per objective:"]
    for objective, values in imp.items():
        lines.append(f"  for {objective}:")
        ranked = sorted(values.items(), key=lambda kv: -kv[1])[:top]
        w = max((len(k) for k, _ in ranked), default=0)
        lines += [f"    {k:<{w}}  {v:.3f}" for k, v in ranked]
    return "\n".join(lines)


def as_json(imp: Mapping[str, Mapping[str, float]]) -> dict[str, Any]:
    return {obj: dict(sorted(v.items(), key=lambda kv: -kv[1])) for obj, v in imp.items()}

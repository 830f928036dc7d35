"""Which parameters (and which structure descriptors) matter, for loss and for FLOPs.

PED-ANOVA (``optuna.importance.PedAnovaImportanceEvaluator``) is the one importance evaluator
that copes with conditional parameters: our spaces are conditional everywhere (a group's levels
exist only when it has them), and fANOVA / mean-decrease-impurity silently drop every parameter
that is not in all trials. It treats lower as better, which is right for both objectives.

- :func:`param_importances`: Optuna's own parameters (the YAML paths), per objective.
- :func:`descriptor_importances`: the same evaluator over named features of the trials: their
  structure descriptors (``descriptors.summary``: heads, q.k width, rank, cores, levels, finest
  block, ...), which are fewer and easier to read than the hundreds of structural parameters
  they come from, or the sampled parameters as the records hold them (the dashboard reads
  records, not Optuna's distributions). They are put on the trials of an in-memory study:
  numbers as float parameters over their observed range, other values as categoricals.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import optuna
from optuna.distributions import CategoricalDistribution, FloatDistribution
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
                           descriptors: Sequence[Mapping[str, Any]],
                           objectives: Sequence[str]) -> dict[str, dict[str, float]]:
    """Importances of named features (one mapping per trial: descriptor summaries, or sampled
    parameters as records hold them) for each objective. Numbers become float parameters over
    their observed range, anything else a categorical over the values seen; a feature that
    never varies is left out."""
    rows = [(list(v), dict(d)) for v, d in zip(values, descriptors, strict=True)
            if len(v) >= len(objectives) and all(math.isfinite(x) for x in v)]
    if len(rows) < MIN_TRIALS:
        return {}
    seen: dict[str, list[Any]] = {}
    for _, d in rows:
        for k, x in d.items():
            seen.setdefault(k, []).append(x)
    dists: dict[str, Any] = {}
    for k, xs in seen.items():
        if all(_number(x) for x in xs):
            lo, hi = min(xs), max(xs)
            if hi > lo:
                dists[k] = FloatDistribution(float(lo), float(hi))
        else:
            cats = sorted({_category(x) for x in xs})
            if len(cats) > 1:
                dists[k] = CategoricalDistribution(cats)
    if not dists:
        return {}
    level = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # no "new study created" line
    try:
        study = optuna.create_study(directions=["minimize"] * len(objectives))
    finally:
        optuna.logging.set_verbosity(level)
    for v, d in rows:
        params = {k: (float(d[k]) if isinstance(dists[k], FloatDistribution)
                      else _category(d[k])) for k in dists if k in d}
        study.add_trial(create_trial(values=v[:len(objectives)], params=params,
                                     distributions={k: dists[k] for k in params}))
    return {name: _evaluate(study, i) for i, name in enumerate(objectives)}


def _number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _category(x: Any) -> str:
    return x if isinstance(x, str) else json.dumps(x, sort_keys=True)


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

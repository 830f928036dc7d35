"""The top-level settings of a search-space file: keys, defaults, precedence and field checks.

Everything here is pure: it reads and normalizes values, it builds no task, sampler or model.
:func:`resolve_settings` decides command line > file > default in one place, and
:func:`normalize` checks every field and returns it in canonical form (the keyword arguments of
:class:`studies.space.SearchSpace`).
"""

from __future__ import annotations

import copy
import dataclasses
import re
from collections.abc import Mapping
from typing import Any

from mlbtc_search.checks import check_int
from mlbtc_search.errors import SpecError, UsageError

TOP_KEYS = ("name", "task", "budget", "objectives", "sampler", "trials", "workers",
            "resources", "storage", "seed", "seeds", "train", "constraints", "baselines",
            "space", "budgets", "promote", "confirm")
REQUIRED = ("task", "space")  # and budget, or budgets (studies.rungs.fidelity_settings)
DEFAULTS: dict[str, Any] = {
    "objectives": ["val_loss", "flops_per_token"], "sampler": {"name": "tpe"}, "trials": 20,
    "workers": 1, "resources": {"cpus": 1.0, "gpus": 0.0}, "storage": None, "seed": 0,
    "seeds": 1, "train": {}, "constraints": {}, "baselines": [], "budget": None,
    "budgets": None, "promote": None, "confirm": None,
}
OVERRIDES = ("trials", "workers", "storage", "name", "budget", "seeds")
OBJECTIVES = ("val_loss", "flops_per_token", "params", "kv_cache_bytes", "latency")
SAMPLER_OPTIONS = {
    "tpe": ("n_startup_trials", "n_ei_candidates", "multivariate", "group", "constant_liar",
            "consider_prior", "prior_weight", "consider_magic_clip", "consider_endpoints",
            "warn_independent_sampling"),
    "nsga2": ("population_size", "mutation_prob", "crossover_prob", "swapping_prob"),
    "gp": ("n_startup_trials", "deterministic_objective", "warn_independent_sampling"),
    "random": (),
}
CONSTRAINT_KEYS = ("max_flops", "max_params")
FALLBACK_TRAIN_OPTIONS = {
    "lr": float, "batch_size": int, "warmup_steps": int, "schedule": str, "grad_clip": float,
    "weight_decay": float, "eval_batches": int, "eval_batch_size": int, "eval_every": int,
    "eval_seed": int, "max_steps": int, "device": str, "threads": int, "autocast": str,
    "compile": "bool | str",
}


def resolve_settings(data: Any, overrides: Mapping[str, Any] | None,
                     default_name: str) -> dict:
    """Every top-level setting, command line > file > default (the one place this is decided).

    Returns the raw values by key (``budget`` becomes ``budget_flops``); :func:`normalize`
    checks them.
    """
    if not isinstance(data, dict):
        raise SpecError(f"a search space must be a mapping with keys {', '.join(TOP_KEYS)}, got "
                        f"{type(data).__name__}")
    for key in data:
        if key not in TOP_KEYS:
            raise SpecError(f"unknown key {key!r}; valid keys: {', '.join(TOP_KEYS)}", (key,))
    overrides = _check_overrides(overrides or {})
    out: dict[str, Any] = {}
    for key in TOP_KEYS:
        if overrides.get(key) is not None:
            value = overrides[key]
        elif key in data:
            value = data[key]
        elif key == "name":
            value = default_name
        elif key in REQUIRED:
            raise SpecError(f"missing required key {key!r} (a search space needs "
                            f"{', '.join(REQUIRED)})", (key,))
        else:
            value = copy.deepcopy(DEFAULTS[key])
        out["budget_flops" if key == "budget" else key] = value
    return out


def normalize(s: Mapping[str, Any]) -> dict[str, Any]:
    """Check every setting except ``space`` and ``baselines`` (they need the compiled tree) and
    return them in canonical form; idempotent."""
    from .rungs import fidelity_settings

    seed = check_int(s["seed"], ("seed",), "seed", 0)
    resources, train = _resources(s["resources"]), _train(s["train"])
    if str(train.get("device", "")).startswith("cuda") and resources["gpus"] == 0:
        raise SpecError(f"train.device {train['device']!r} needs resources.gpus > 0 (Ray hides "
                        "the GPUs from trials that reserve none), e.g. resources: {gpus: 0.25}",
                        ("train", "device"))
    budget, rungs, confirm = fidelity_settings(s["budget_flops"], s.get("budgets"),
                                               s.get("promote"), s.get("confirm"))
    seeds = check_int(s["seeds"], ("seeds",), "seeds")
    return {
        "name": _name(s["name"]), "task": _task(s["task"]),
        "budget_flops": _positive(budget, ("budget",), "budget"),
        "budgets": None if rungs is None else rungs.budgets,
        "promote": None if rungs is None else {"eta": rungs.eta},
        "confirm": None if rungs is None else {"seeds": confirm},
        "objectives": _objectives(s["objectives"]), "sampler": _sampler(s["sampler"], seed),
        "trials": check_int(s["trials"], ("trials",), "trials"),
        "workers": check_int(s["workers"], ("workers",), "workers"),
        "resources": resources, "storage": _storage(s["storage"]),
        "seed": seed, "seeds": seeds,
        "train": train, "constraints": _constraints(s["constraints"]),
    }


def mask(url: str | None) -> str | None:
    """``url`` with its password shown as ``***``."""
    return None if url is None else re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", url)


def _check_overrides(overrides: Mapping[str, Any]) -> dict:
    out = {}
    for key, value in overrides.items():
        if key not in OVERRIDES:
            raise UsageError(f"unknown override {key!r}; the command line can set "
                             f"{', '.join(OVERRIDES)}")
        if value is None:
            continue
        flag = "--" + key
        if key == "budget" and (isinstance(value, bool) or not isinstance(value, int | float)
                                or not 0 < value < float("inf")):
            raise UsageError(f"{flag} must be a positive number of FLOPs, got {value!r}")
        if key in ("trials", "workers", "seeds"):
            try:
                check_int(value, (), flag)
            except SpecError as err:
                raise UsageError(err.message) from None
        if key in ("storage", "name") and (not isinstance(value, str) or not value.strip()):
            raise UsageError(f"{flag} must be a non-empty string, got {value!r}")
        out[key] = value
    return out


def _name(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise SpecError(f"name must be a non-empty string, got {value!r}", ("name",))
    return value


def _positive(value: Any, path: tuple, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0 or (
            value == float("inf")):
        raise SpecError(f"{what} must be a positive number (e.g. 2e11), got {value!r}", path)
    return float(value)


def _task(value: Any) -> dict:
    """``{name, options}`` with a known task name and option names (values are checked when
    the task is built, by :meth:`studies.space.SearchSpace.prepare`)."""
    from trainers.tasks import task_options

    if isinstance(value, str):
        value = {"name": value}
    if not isinstance(value, dict):
        raise SpecError("task must be a mapping {name, options}, e.g. {name: icl_regression, "
                        "options: {n_dims: 8}}", ("task",))
    for key in value:
        if key not in ("name", "options"):
            raise SpecError(f"unknown key {key!r} in task; valid keys: name, options",
                            ("task", key))
    name, options = value.get("name"), value.get("options") or {}
    if not isinstance(name, str):
        raise SpecError(f"task.name must be a task name, got {name!r}", ("task", "name"))
    if not isinstance(options, dict):
        raise SpecError("task.options must be a mapping", ("task", "options"))
    try:
        valid = task_options(name)
    except SpecError as err:
        raise err.prefixed(("task",)) from None
    for option in options:
        if option not in valid:
            raise SpecError(f"unknown option {option!r} for task {name!r}; valid options: "
                            f"{', '.join(valid)}", ("task", "options", option))
    return {"name": name, "options": copy.deepcopy(options)}


def _objectives(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list | tuple) or not value:
        raise SpecError("objectives must be a list, e.g. [val_loss, flops_per_token]",
                        ("objectives",))
    for i, name in enumerate(value):
        if name not in OBJECTIVES:
            raise SpecError(f"unknown objective {name!r}; valid objectives: "
                            f"{', '.join(OBJECTIVES)}", ("objectives", i))
        if name in value[:i]:
            raise SpecError(f"objective {name!r} is listed twice", ("objectives", i))
    if tuple(value[:2]) != ("val_loss", "flops_per_token"):
        raise SpecError("the first two objectives must be val_loss, flops_per_token (extra ones "
                        f"may follow), got {list(value)}", ("objectives",))
    return tuple(value)


def _sampler(value: Any, seed: int) -> dict:
    if isinstance(value, str):
        value = {"name": value}
    if not isinstance(value, dict):
        raise SpecError("sampler must be a mapping, e.g. {name: tpe, seed: 0}", ("sampler",))
    name = value.get("name", "tpe")
    if name not in SAMPLER_OPTIONS:
        raise SpecError(f"unknown sampler {name!r}; valid samplers: "
                        f"{', '.join(SAMPLER_OPTIONS)}", ("sampler", "name"))
    for key in value:
        if key not in ("name", "seed") + SAMPLER_OPTIONS[name]:
            valid = ", ".join(("name", "seed") + SAMPLER_OPTIONS[name])
            raise SpecError(f"unknown option {key!r} for the {name} sampler; valid: {valid}",
                            ("sampler", key))
    return {**value, "name": name,
            "seed": check_int(value.get("seed", seed), ("sampler", "seed"), "sampler.seed", 0)}


def _resources(value: Any) -> dict:
    if not isinstance(value, dict):
        raise SpecError("resources must be a mapping {cpus, gpus} (per trial)", ("resources",))
    out = dict(DEFAULTS["resources"])
    for key, v in value.items():
        if key not in out:
            raise SpecError(f"unknown key {key!r} in resources; valid keys: cpus, gpus",
                            ("resources", key))
        if isinstance(v, bool) or not isinstance(v, int | float) or not (
                v > 0 if key == "cpus" else v >= 0) or v == float("inf"):
            low = "> 0" if key == "cpus" else ">= 0"
            raise SpecError(f"resources.{key} must be a finite number {low}, got {v!r}",
                            ("resources", key))
        out[key] = float(v)
    return out


def _storage(value: Any) -> str | None:
    if value is not None and (not isinstance(value, str) or not value.strip()):
        raise SpecError(f"storage must be a database URL or null, got {value!r}", ("storage",))
    return value


def _constraints(value: Any) -> dict:
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise SpecError("constraints must be a mapping {max_flops, max_params}",
                        ("constraints",))
    out: dict[str, Any] = dict.fromkeys(CONSTRAINT_KEYS)
    for key, v in value.items():
        if key not in CONSTRAINT_KEYS:
            raise SpecError(f"unknown constraint {key!r}; valid: {', '.join(CONSTRAINT_KEYS)}",
                            ("constraints", key))
        if v is None:
            continue
        n = _positive(v, ("constraints", key), key)
        out[key] = int(n) if key == "max_params" else n
    return out


def train_options() -> dict[str, Any]:
    """TrainConfig field name -> its type text (or type); a fixed list if trainers lacks it."""
    try:
        from trainers.train import TrainConfig
    except ModuleNotFoundError as exc:  # only when trainers.train itself is missing
        if exc.name != "trainers.train":
            raise
        return dict(FALLBACK_TRAIN_OPTIONS)
    return {f.name: f.type for f in dataclasses.fields(TrainConfig)}


def check_train_config(train: dict) -> None:
    """``TrainConfig(**train)`` must accept ``train``; errors are located under ``train``."""
    try:
        from trainers.train import TrainConfig
    except ModuleNotFoundError:
        return
    try:
        TrainConfig(**train)
    except SpecError as err:
        raise err.prefixed(("train",)) from None
    except TypeError as exc:
        raise SpecError(f"invalid train options: {exc}", ("train",)) from None


def _train(value: Any) -> dict:
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise SpecError("train must be a mapping of TrainConfig options, e.g. {lr: 1.0e-3, "
                        "batch_size: 32}", ("train",))
    options = train_options()
    for key in value:
        if key not in options:
            raise SpecError(f"unknown train option {key!r}; valid: {', '.join(options)}",
                            ("train", key))
    out = dict(value)
    check_train_config(out)
    return out


__all__ = ["CONSTRAINT_KEYS", "DEFAULTS", "OBJECTIVES", "OVERRIDES", "REQUIRED",
           "SAMPLER_OPTIONS", "TOP_KEYS", "check_train_config", "mask", "normalize",
           "resolve_settings", "train_options"]

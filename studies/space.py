"""Search spaces: a YAML file -> a validated :class:`SearchSpace` -> sampled :class:`Candidate`.

The format is documented key by key in ``docs/search_spaces.md``; in short::

    name: quickstart
    task: {name: icl_regression, options: {n_dims: 8}}
    budget: 4e10                     # training FLOPs per trial
    constraints: {max_flops: 1.0e5}  # forward FLOPs per token (non-embedding)
    baselines: [{attention.kind: standard, attention.heads: 4}]
    space:                           # a model spec whose leaves may be distributions
      width: 32
      attention:
        kind: {choice: [standard, bilinear_btt]}
        rank: {int: [1, 2], when: {kind: bilinear_btt}}

Everything is checked before anything runs (:func:`load_space`), errors carry ``file:line`` and
the key path. :meth:`SearchSpace.sample` is an Optuna define-by-run function: parameter names are
the YAML paths, and replaying a trial is sampling with ``optuna.trial.FixedTrial(trial.params)``.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import logging
import re
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path as FilePath
from typing import Any

import optuna

from mlbtc_search.errors import SpecError, UsageError
from mlbtc_search.model import (
    MODEL_KEYS,
    AdapterSpec,
    ModelSpec,
    kv_cache_bytes,
    model_flops,
    model_params,
)
from mlbtc_search.yamlio import load_yaml

from .sampling import (
    Leaf,
    Node,
    Path,
    ReplayTrial,
    Tree,
    Walk,
    canonical_json,
    check_per_layer,
    check_when,
    expand,
    flatten_into,
    leaves,
    node_at,
    param_name,
    parse_tree,
    source_of,
)

log = logging.getLogger(__name__)

TOP_KEYS = ("name", "task", "budget", "objectives", "sampler", "trials", "workers",
            "resources", "storage", "seed", "seeds", "train", "constraints", "baselines", "space")
REQUIRED = ("task", "budget", "space")
DEFAULTS: dict[str, Any] = {
    "objectives": ["val_loss", "flops_per_token"], "sampler": {"name": "tpe"}, "trials": 20,
    "workers": 1, "resources": {"cpus": 1.0, "gpus": 0.0}, "storage": None, "seed": 0,
    "seeds": 1, "train": {}, "constraints": {}, "baselines": [],
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
SPACE_MODEL_KEYS = tuple(k for k in MODEL_KEYS if k not in ("adapter", "max_seq_len", "task"))
CONSTRAINT_KEYS = ("max_flops", "max_params")
FALLBACK_TRAIN_OPTIONS = {
    "lr": float, "batch_size": int, "warmup_steps": int, "schedule": str, "grad_clip": float,
    "weight_decay": float, "eval_batches": int, "eval_batch_size": int, "eval_every": int,
    "eval_seed": int, "max_steps": int, "device": str, "threads": int,
}
DRY_SAMPLES = 20


@dataclass(frozen=True)
class Candidate:
    """One sampled architecture, checked but not trained."""

    model: dict  # ModelSpec.from_dict input (no adapter; max_seq_len and task from the task)
    train: dict  # TrainConfig overrides for this trial
    params: dict  # Optuna parameter name -> the value Optuna records
    spec: ModelSpec | None
    error: str | None  # why the architecture is invalid, one line with the field path
    flops_per_token: float | None
    params_count: int | None
    kv_cache_bytes: float | None
    feasible: bool
    reason: str | None  # why it is infeasible (invalid, or over a constraint)


@dataclass(frozen=True)
class SearchSpace:
    """A validated search space (see the module doc); build it with :func:`load_space`."""

    name: str
    task: dict
    budget_flops: float
    objectives: tuple[str, ...]
    sampler: dict
    trials: int
    workers: int
    resources: dict
    storage: str | None
    seed: int
    train: dict
    constraints: dict
    baselines: tuple[dict, ...]
    space: dict  # the ``space:`` tree as written (dotted keys allowed)
    source: str = "<dict>"
    seeds: int = 1  # every architecture is trained with seeds seed, seed+1, ...; objective = mean
    _root: Tree = field(init=False, repr=False, compare=False)
    _adapter: AdapterSpec = field(init=False, repr=False, compare=False)
    _seq_len: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        setattr_ = object.__setattr__
        setattr_(self, "name", _name(self.name))
        task, adapter, seq_len = _task(self.task)
        setattr_(self, "task", task)
        setattr_(self, "_adapter", adapter)
        setattr_(self, "_seq_len", seq_len)
        setattr_(self, "budget_flops", _positive(self.budget_flops, ("budget",), "budget"))
        setattr_(self, "objectives", _objectives(self.objectives))
        setattr_(self, "seed", _int(self.seed, ("seed",), "seed", 0))
        setattr_(self, "seeds", _int(self.seeds, ("seeds",), "seeds", 1))
        setattr_(self, "sampler", _sampler(self.sampler, self.seed))
        setattr_(self, "trials", _int(self.trials, ("trials",), "trials", 1))
        setattr_(self, "workers", _int(self.workers, ("workers",), "workers", 1))
        setattr_(self, "resources", _resources(self.resources))
        setattr_(self, "storage", _storage(self.storage))
        setattr_(self, "train", _train(self.train))
        setattr_(self, "constraints", _constraints(self.constraints))
        setattr_(self, "_root", _compile(self.space, self.train))
        make_sampler(self)  # the sampler's own checks
        raw = self.baselines
        if not isinstance(raw, list | tuple):
            raise SpecError("baselines must be a list of assignments, e.g. "
                            "[{attention.kind: standard, attention.heads: 4}]", ("baselines",))
        setattr_(self, "baselines", tuple(
            self._check_baseline(b, ("baselines", i)) for i, b in enumerate(raw)))
        self._dry_check()

    # ---- public API ----------------------------------------------------------------------
    def sample(self, trial: optuna.trial.BaseTrial) -> Candidate:
        """Define-by-run: suggest every active parameter, build and check the architecture.

        Never raises for an invalid or over-constraint architecture: the Candidate says so.
        """
        walk = Walk(self._root, trial, self._seq_len)
        return self._candidate(walk.build(), walk.params)

    def fixed_params(self, baseline: dict) -> dict:
        """A baseline (``{param.path: value}`` or a partial model dict) -> the Optuna params
        to enqueue; every value must lie in its distribution."""
        return self._encode(self._flatten(baseline, ("baselines",)))

    def to_dict(self) -> dict:
        """The whole file as a JSON-able dict (dotted keys nested, defaults filled in, storage
        password hidden); ``SearchSpace.from_dict(to_dict())`` gives the same space."""
        return {
            "name": self.name, "task": copy.deepcopy(self.task), "budget": self.budget_flops,
            "objectives": list(self.objectives), "sampler": dict(self.sampler),
            "trials": self.trials, "workers": self.workers, "resources": dict(self.resources),
            "storage": _mask(self.storage), "seed": self.seed, "seeds": self.seeds,
            "train": dict(self.train),
            "constraints": dict(self.constraints),
            "baselines": [copy.deepcopy(b) for b in self.baselines],
            "space": expand(copy.deepcopy(self.space)),
        }

    def hash(self) -> str:
        """Hash of the ``space:`` tree only: equal hashes, equal Optuna param distributions."""
        blob = canonical_json(expand(copy.deepcopy(self.space)))
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    @classmethod
    def from_dict(cls, data: Any, source: str = "<dict>",
                  overrides: Mapping[str, Any] | None = None) -> SearchSpace:
        """Build from a loaded document; errors are SpecErrors with the key path."""
        stem = FilePath(source).stem if source != "<dict>" else "study"
        return cls(**resolve_settings(data, overrides, stem), source=source)

    @property
    def param_names(self) -> list[str]:
        """Every parameter the space can suggest (layer paths shown with index 0)."""
        return [param_name(p) for p, leaf in leaves(self._root) if leaf.is_param]

    # ---- candidates ----------------------------------------------------------------------
    def _candidate(self, built: dict, params: dict, costs: bool = True) -> Candidate:
        """``built`` is one walk's output: the model keys plus maybe ``train``."""
        train = {**self.train, **built.get("train", {})}
        model = {k: v for k, v in built.items() if k != "train"}
        model.update(max_seq_len=self._seq_len, task=copy.deepcopy(self.task))
        spec, err = self._spec(model, train)
        if spec is None or not costs:
            return Candidate(model, train, params, spec, err, None, None, None,
                             spec is not None, err)
        flops, n_params, kv = model_costs(spec)
        over = []
        max_flops, max_params = self.constraints["max_flops"], self.constraints["max_params"]
        if max_flops is not None and flops > max_flops:
            over.append(f"flops_per_token {flops:.4g} > max_flops {max_flops:.4g}")
        if max_params is not None and n_params > max_params:
            over.append(f"params {n_params} > max_params {max_params}")
        return Candidate(model, train, params, spec, None, flops, n_params, kv, not over,
                         "; ".join(over) or None)

    def _spec(self, model: dict, train: dict) -> tuple[ModelSpec | None, str | None]:
        try:
            _check_train_config(train)
            return ModelSpec.from_dict(model, adapter=self._adapter, seq_len=self._seq_len), None
        except SpecError as err:
            return None, str(err).replace("\n", " ")

    def _spec_error(self, model: dict, train: dict) -> SpecError | None:
        """Why ``model`` (with ``train``) is invalid, located in the ``space:`` tree."""
        try:
            _check_train_config(train)
            ModelSpec.from_dict(model, adapter=self._adapter, seq_len=self._seq_len)
        except SpecError as err:
            if err.path[:1] == ("train",) and err.path[1:2] and err.path[1] in self.train:
                return err  # from the fixed train: section
            return SpecError(err.message, source_of(self._root, err.path))
        return None

    def _dry_check(self) -> None:
        """Sample a few random assignments: at least one must give a valid model."""
        with _quiet_optuna():
            study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
        invalid: list[str] = []
        last: SpecError | None = None
        valid: list[Candidate] = []
        built: list[dict] = []
        for _ in range(DRY_SAMPLES):
            walk = Walk(self._root, study.ask(), self._seq_len)
            b = walk.build()
            c = self._candidate(b, walk.params, costs=False)
            if c.spec is None:
                invalid.append(c.error or "")
                last = self._spec_error(c.model, c.train)
            else:
                valid.append(c)
                built.append(b)
        if not valid and last is not None:
            raise SpecError(f"no sampled architecture is valid ({DRY_SAMPLES} random samples), "
                            f"e.g.: {last.message}", last.path)
        if invalid:
            log.warning("%s: %d of %d random samples are invalid architectures (they are "
                        "recorded as infeasible, never trained), e.g. %s", self.source,
                        len(invalid), DRY_SAMPLES, invalid[-1])
        if any(v is not None for v in self.constraints.values()):
            for b, c in zip(built, valid, strict=True):
                if self._candidate(b, c.params).feasible:
                    return
            log.warning("%s: none of %d random samples meets the constraints %s; check "
                        "max_flops / max_params", self.source, len(valid), self.constraints)

    # ---- baselines -----------------------------------------------------------------------
    def _flatten(self, raw: Any, doc: Path) -> dict[Path, tuple[Any, Path]]:
        """A baseline -> {concrete param path: (value, where it is written)}."""
        out: dict[Path, tuple[Any, Path]] = {}
        if not isinstance(raw, dict):
            raise SpecError("a baseline must be a mapping of parameter paths (or model keys) to "
                            f"values, got {raw!r}", doc)
        flatten_into(raw, self._root, (), doc, out, self.param_names)
        return out

    def _encode(self, flat: dict[Path, tuple[Any, Path]]) -> dict:
        params = {}
        for path, (value, doc) in flat.items():
            leaf = node_at(self._root, path)
            if not isinstance(leaf, Leaf):
                raise SpecError(f"{param_name(path)!r} is not a parameter", doc)
            if not leaf.is_param:
                if not leaf.contains(value):
                    raise SpecError(f"{param_name(path)} is fixed to {leaf.value!r} in the "
                                    f"space, got {value!r}", doc)
                continue
            params[param_name(path)] = leaf.encode(value, doc)
        return params

    def _check_baseline(self, raw: Any, doc: Path) -> dict:
        flat = self._flatten(raw, doc)
        params = self._encode(flat)
        replay = ReplayTrial(params)
        walk = Walk(self._root, replay, self._seq_len)
        built = walk.build()
        if not replay.missing:  # a full assignment: it must be used and give a valid model
            for name in params:
                if name not in replay.used:
                    path = next(p for p in flat if param_name(p) == name)
                    raise SpecError(f"{name} is not used by this baseline (its `when` does not "
                                    "hold)", flat[path][1])
            c = self._candidate(built, walk.params)
            if not c.feasible:
                raise SpecError(f"the baseline's architecture is not feasible: {c.reason}", doc)
        return {param_name(p): copy.deepcopy(v) for p, (v, _) in flat.items()}


# ---- model costs ------------------------------------------------------------------------------


def model_costs(spec: ModelSpec) -> tuple[float, int, float]:
    """``(model_flops(spec), model_params(spec), kv_cache_bytes(spec))`` (the core caches the
    per-layer costs they share)."""
    return float(model_flops(spec)), int(model_params(spec)), float(kv_cache_bytes(spec))


# ---- samplers ---------------------------------------------------------------------------------


def make_sampler(space: SearchSpace) -> optuna.samplers.BaseSampler:
    """The Optuna sampler the space names, seeded (TPE: multivariate, grouped, constant liar)."""
    opts = dict(space.sampler)
    name, seed = opts.pop("name"), opts.pop("seed")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            if name == "tpe":
                kwargs = {"multivariate": True, "group": True, "constant_liar": True, **opts}
                return optuna.samplers.TPESampler(seed=seed, **kwargs)
            if name == "nsga2":
                return optuna.samplers.NSGAIISampler(seed=seed, **{"population_size": 16, **opts})
            if name == "gp":
                return optuna.samplers.GPSampler(seed=seed, **opts)
            return optuna.samplers.RandomSampler(seed=seed)
    except (TypeError, ValueError) as exc:
        raise SpecError(f"invalid {name} sampler options: {exc}", ("sampler",)) from None


# ---- loading and precedence ---------------------------------------------------------------------


def resolve_settings(data: Any, overrides: Mapping[str, Any] | None,
                     default_name: str) -> dict:
    """Every top-level setting, command line > file > default (the one place this is decided).

    Returns the keyword arguments of :class:`SearchSpace` (``budget`` becomes ``budget_flops``).
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


def load_space(path: str | FilePath, overrides: dict | None = None) -> SearchSpace:
    """Read, validate and dry-check a search-space YAML file.

    ``overrides`` come from the command line (``trials``, ``workers``, ``storage``, ``name``;
    None values are ignored). SpecErrors are re-raised with ``file:line`` of the offending key.
    """
    located = load_yaml(path)
    try:
        return SearchSpace.from_dict(located.data, source=str(path), overrides=overrides)
    except SpecError as err:
        if err.source is not None:
            raise
        raise located.locate(err) from None


def default_storage(space: SearchSpace) -> str:
    """``space.storage``, else a SQLite file named after the study beside the YAML file."""
    if space.storage:
        return space.storage
    folder = FilePath(space.source).resolve().parent if space.source != "<dict>" else FilePath()
    return f"sqlite:///{folder / (space.name + '.db')}"


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
                                or not value > 0 or value == float("inf")):
            raise UsageError(f"{flag} must be a positive number of FLOPs, got {value!r}")
        if key in ("trials", "workers", "seeds") and (
                isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise UsageError(f"{flag} must be an integer >= 1, got {value!r}")
        if key in ("storage", "name") and (not isinstance(value, str) or not value.strip()):
            raise UsageError(f"{flag} must be a non-empty string, got {value!r}")
        out[key] = value
    return out


# ---- field checks -----------------------------------------------------------------------------


def _name(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise SpecError(f"name must be a non-empty string, got {value!r}", ("name",))
    return value


def _int(value: Any, path: Path, what: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise SpecError(f"{what} must be an integer >= {low}, got {value!r}", path)
    return value


def _positive(value: Any, path: Path, what: str) -> float:
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            value = float(value)
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0 or (
            value == float("inf")):
        raise SpecError(f"{what} must be a positive number (e.g. 2e11), got {value!r}", path)
    return float(value)


def _task(value: Any) -> tuple[dict, AdapterSpec, int]:
    from trainers.tasks import get_task

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
        task = get_task(name, **options)
    except SpecError as err:
        prefix = ("task",) if err.path[:1] == ("name",) else ("task", "options")
        raise err.prefixed(prefix) from None
    a = task.adapter
    adapter = AdapterSpec(a.input_kind, a.input_dim, a.output_dim)
    return {"name": name, "options": copy.deepcopy(options)}, adapter, a.seq_len


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
    out = {**value, "name": name, "seed": _int(value.get("seed", seed), ("sampler", "seed"),
                                                "sampler.seed", 0)}
    return out


def _resources(value: Any) -> dict:
    if not isinstance(value, dict):
        raise SpecError("resources must be a mapping {cpus, gpus} (per trial)", ("resources",))
    out = dict(DEFAULTS["resources"])
    for key, v in value.items():
        if key not in out:
            raise SpecError(f"unknown key {key!r} in resources; valid keys: cpus, gpus",
                            ("resources", key))
        if isinstance(v, bool) or not isinstance(v, int | float) or not (
                v > 0 if key == "cpus" else v >= 0):
            low = "> 0" if key == "cpus" else ">= 0"
            raise SpecError(f"resources.{key} must be a number {low}, got {v!r}",
                            ("resources", key))
        out[key] = float(v)
    return out


def _storage(value: Any) -> str | None:
    if value is not None and (not isinstance(value, str) or not value.strip()):
        raise SpecError(f"storage must be a database URL or null, got {value!r}", ("storage",))
    return value


def _mask(url: str | None) -> str | None:
    return None if url is None else re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", url)


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


def _check_train_config(train: dict) -> None:
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
    out = {}
    for key, v in value.items():
        if key not in options:
            raise SpecError(f"unknown train option {key!r}; valid: {', '.join(options)}",
                            ("train", key))
        out[key] = _coerce_train(key, v, options[key])
    _check_train_config(out)
    return out


def _coerce_train(key: str, value: Any, kind: Any) -> Any:
    """``"1e-3"`` -> ``0.001`` for float options (YAML 1.1 reads 1e-3 as text)."""
    if isinstance(value, str) and ("float" in str(kind) or kind is float):
        with contextlib.suppress(ValueError):
            return float(value)
    return value


# ---- the space tree ---------------------------------------------------------------------------


def _compile(raw: Any, fixed_train: dict) -> Tree:
    root = parse_tree(raw, ("space",))
    options = train_options()
    for key, node in root.children.items():
        if key == "train":
            _check_space_train(node, fixed_train, options)
        elif key in ("adapter", "max_seq_len", "task"):
            raise SpecError(f"{key} is set by the task, not searched", node.src)
        elif key not in SPACE_MODEL_KEYS:
            raise SpecError(f"unknown model key {key!r}; valid keys: "
                            f"{', '.join(SPACE_MODEL_KEYS)}, train", node.src)
    check_per_layer(root)
    check_when(root)
    return root


def _check_space_train(node: Node, fixed: dict, options: dict) -> None:
    if not isinstance(node, Tree):
        raise SpecError("train in the space must be a mapping of TrainConfig options to values "
                        "or distributions, e.g. train.lr: {float: [3.0e-4, 3.0e-3], log: true}",
                        node.src)
    for key, child in node.children.items():
        if key not in options:
            raise SpecError(f"unknown train option {key!r}; valid: {', '.join(options)}",
                            child.src)
        if not isinstance(child, Leaf):
            raise SpecError(f"train.{key} must be a value or a distribution", child.src)
        if key in fixed:
            raise SpecError(f"train.{key} is both fixed (in train:) and searched (in space:); "
                            "keep one", child.src)


@contextlib.contextmanager
def _quiet_optuna() -> Iterator[None]:
    level = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        yield
    finally:
        optuna.logging.set_verbosity(level)


__all__ = ["Candidate", "SearchSpace", "default_storage", "load_space", "make_sampler",
           "model_costs", "resolve_settings"]

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

Two explicit steps, both before anything runs; errors carry ``file:line`` and the key path:

1. :func:`load_space` parses and checks the file into a :class:`SearchSpace`: pure (no task,
   sampler or model is built), frozen, comparable, round-trips through ``to_dict``.
2. :meth:`SearchSpace.prepare` builds the task (its data are read: the adapter and sequence
   length come from it), checks the sampler options and the baselines' architectures, and
   samples a few random architectures (at least one must be valid). It returns a
   :class:`PreparedSpace`, which samples: :meth:`PreparedSpace.sample` is an Optuna
   define-by-run function whose parameter names are the YAML paths, and replaying a trial is
   sampling with ``optuna.trial.FixedTrial(trial.params)``.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import logging
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path as FilePath
from typing import Any

import optuna

from mlbtc_search.errors import SpecError
from mlbtc_search.model import (
    MODEL_KEYS,
    AdapterSpec,
    ModelSpec,
    kv_cache_bytes,
    model_flops,
    model_params,
)
from mlbtc_search.yamlio import Located, load_yaml

from .rungs import DEFAULT_ETA, RungSchedule
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
from .settings import check_train_config, mask, normalize, resolve_settings, train_options

log = logging.getLogger(__name__)

SPACE_MODEL_KEYS = tuple(k for k in MODEL_KEYS if k not in ("adapter", "max_seq_len", "task"))
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
    """A checked search space (see the module doc): pure data, built by :func:`load_space` or
    :meth:`from_dict`, which normalize the values; the constructor checks that they are."""

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
    seeds: int  # every architecture trains with seeds seed, seed + 1, ...; objective = mean
    train: dict
    constraints: dict
    baselines: tuple[dict, ...]
    space: dict  # the ``space:`` tree as written (dotted keys allowed)
    source: str = "<dict>"
    located: Located | None = field(default=None, repr=False, compare=False)  # for file:line
    budgets: tuple[float, ...] | None = None  # rungs of a multi-fidelity search, with
    promote: dict | None = None  # {eta}, and
    confirm: dict | None = None  # {seeds} (docs/scaling.md)

    def __post_init__(self) -> None:
        settings = {k: getattr(self, k) for k in _SETTINGS}
        if normalize(settings) != settings:
            raise SpecError("SearchSpace needs normalized settings: build it with "
                            "SearchSpace.from_dict or load_space")
        if self.baselines != tuple(_baselines(self.baselines, self.tree)):
            raise SpecError("SearchSpace needs normalized baselines: build it with "
                            "SearchSpace.from_dict or load_space", ("baselines",))

    @classmethod
    def from_dict(cls, data: Any, source: str = "<dict>",
                  overrides: Mapping[str, Any] | None = None,
                  located: Located | None = None) -> SearchSpace:
        """Build from a loaded document; errors are SpecErrors with the key path."""
        stem = FilePath(source).stem if source != "<dict>" else "study"
        raw = resolve_settings(data, overrides, stem)
        settings = normalize(raw)
        tree = compile_tree(raw["space"], settings["train"])
        baselines = tuple(_baselines(raw["baselines"], tree))
        return cls(**settings, baselines=baselines, space=raw["space"], source=source,
                   located=located)

    @functools.cached_property
    def tree(self) -> Tree:
        """The compiled ``space:`` tree (pure; computed once)."""
        return compile_tree(self.space, self.train)

    @property
    def param_names(self) -> list[str]:
        """Every parameter the space can suggest (layer paths shown with index 0)."""
        return [param_name(p) for p, leaf in leaves(self.tree) if leaf.is_param]

    def to_dict(self) -> dict:
        """The whole file as a JSON-able dict (dotted keys nested, defaults filled in, storage
        password hidden); ``SearchSpace.from_dict(to_dict())`` gives the same space."""
        return {
            "name": self.name, "task": copy.deepcopy(self.task), "budget": self.budget_flops,
            "objectives": list(self.objectives), "sampler": dict(self.sampler),
            "trials": self.trials, "workers": self.workers, "resources": dict(self.resources),
            "storage": mask(self.storage), "seed": self.seed, "seeds": self.seeds,
            "train": dict(self.train),
            "constraints": dict(self.constraints),
            "baselines": [copy.deepcopy(b) for b in self.baselines],
            "space": expand(copy.deepcopy(self.space)),
            **({"budgets": list(self.budgets), "promote": dict(self.promote or {}),
                "confirm": dict(self.confirm or {})} if self.budgets else {}),
        }

    @property
    def rungs(self) -> RungSchedule | None:
        """The budget rungs of a multi-fidelity search (None for one budget)."""
        if self.budgets is None:
            return None
        return RungSchedule(self.budgets, (self.promote or {}).get("eta", DEFAULT_ETA))

    @property
    def confirm_seeds(self) -> int:
        """Seeds the final front is trained with at the top rung (1: no confirmation)."""
        return int((self.confirm or {}).get("seeds", 1))

    def hash(self) -> str:
        """Hash of the ``space:`` tree only: equal hashes, equal Optuna param distributions."""
        blob = canonical_json(expand(copy.deepcopy(self.space)))
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    def fixed_params(self, baseline: dict) -> dict:
        """A baseline (``{param.path: value}`` or a partial model dict) -> the Optuna params
        to enqueue; every value must lie in its distribution."""
        return _encode(self.tree, _flatten(self.tree, baseline, ("baselines",)))

    def prepare(self) -> PreparedSpace:
        """Build the task, check the sampler and the baselines, dry-run a few samples (see the
        module doc); SpecErrors carry ``file:line`` when the space came from a file."""
        try:
            return PreparedSpace.build(self)
        except SpecError as err:
            if err.source is not None or self.located is None:
                raise
            raise self.located.locate(err) from None


_SETTINGS = ("name", "task", "budget_flops", "objectives", "sampler", "trials", "workers",
             "resources", "storage", "seed", "seeds", "train", "constraints", "budgets",
             "promote", "confirm")


@dataclass(frozen=True)
class PreparedSpace:
    """A :class:`SearchSpace` with what sampling needs: the task's adapter and sequence length.

    Built by :meth:`SearchSpace.prepare`. The space's settings (``name``, ``trials``,
    ``to_dict()``, ...) read through to :attr:`space`.
    """

    space: SearchSpace
    adapter: AdapterSpec
    seq_len: int

    def __getattr__(self, name: str) -> Any:  # only called for names not defined here
        if name.startswith("__") or name == "space":  # (no recursion while unpickling)
            raise AttributeError(name)
        return getattr(self.space, name)

    @classmethod
    def build(cls, space: SearchSpace) -> PreparedSpace:
        adapter, seq_len = _task_shape(space.task)
        prepared = cls(space, adapter, seq_len)
        make_sampler(space)  # the sampler's own checks of its options
        for i, baseline in enumerate(space.baselines):
            prepared._check_baseline(baseline, ("baselines", i))
        prepared._dry_check()
        return prepared

    def prepare(self) -> PreparedSpace:
        """Already prepared: itself (so callers may prepare either kind of space)."""
        return self

    # ---- public API ----------------------------------------------------------------------
    def sample(self, trial: optuna.trial.BaseTrial) -> Candidate:
        """Define-by-run: suggest every active parameter, build and check the architecture.

        Never raises for an invalid or over-constraint architecture: the Candidate says so.
        """
        walk = Walk(self.space.tree, trial, self.seq_len)
        return self._candidate(walk.build(), walk.params)

    # ---- candidates ----------------------------------------------------------------------
    def _candidate(self, built: dict, params: dict, costs: bool = True) -> Candidate:
        """``built`` is one walk's output: the model keys plus maybe ``train``."""
        sp = self.space
        train = {**sp.train, **built.get("train", {})}
        model = {k: v for k, v in built.items() if k != "train"}
        model.update(max_seq_len=self.seq_len, task=copy.deepcopy(sp.task))
        spec, err = self._spec(model, train)
        if spec is None or not costs:
            return Candidate(model, train, params, spec, err, None, None, None,
                             spec is not None, err)
        flops, n_params, kv = model_costs(spec)
        over = []
        max_flops, max_params = sp.constraints["max_flops"], sp.constraints["max_params"]
        if max_flops is not None and flops > max_flops:
            over.append(f"flops_per_token {flops:.4g} > max_flops {max_flops:.4g}")
        if max_params is not None and n_params > max_params:
            over.append(f"params {n_params} > max_params {max_params}")
        return Candidate(model, train, params, spec, None, flops, n_params, kv, not over,
                         "; ".join(over) or None)

    def _spec(self, model: dict, train: dict) -> tuple[ModelSpec | None, str | None]:
        try:
            check_train_config(train)
            return ModelSpec.from_dict(model, adapter=self.adapter, seq_len=self.seq_len), None
        except SpecError as err:
            return None, str(err).replace("\n", " ")

    def _spec_error(self, model: dict, train: dict) -> SpecError | None:
        """Why ``model`` (with ``train``) is invalid, located in the ``space:`` tree."""
        try:
            check_train_config(train)
            ModelSpec.from_dict(model, adapter=self.adapter, seq_len=self.seq_len)
        except SpecError as err:
            if err.path[:1] == ("train",) and err.path[1:2] and err.path[1] in self.space.train:
                return err  # from the fixed train: section
            return SpecError(err.message, source_of(self.space.tree, err.path))
        return None

    def _dry_check(self) -> None:
        """Sample a few random assignments: at least one must give a valid model."""
        with _quiet_optuna():
            study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
        invalid: list[str] = []
        last: SpecError | None = None
        valid: list[tuple[dict, Candidate]] = []
        for _ in range(DRY_SAMPLES):
            walk = Walk(self.space.tree, study.ask(), self.seq_len)
            built = walk.build()
            c = self._candidate(built, walk.params, costs=False)
            if c.spec is None:
                invalid.append(c.error or "")
                last = self._spec_error(c.model, c.train)
            else:
                valid.append((built, c))
        if not valid and last is not None:
            raise SpecError(f"no sampled architecture is valid ({DRY_SAMPLES} random samples), "
                            f"e.g.: {last.message}", last.path)
        source, constraints = self.space.source, self.space.constraints
        if invalid:
            log.warning("%s: %d of %d random samples are invalid architectures (they are "
                        "recorded as infeasible, never trained), e.g. %s", source,
                        len(invalid), DRY_SAMPLES, invalid[-1])
        if any(v is not None for v in constraints.values()) and not any(
                self._candidate(b, c.params).feasible for b, c in valid):
            log.warning("%s: none of %d random samples meets the constraints %s; check "
                        "max_flops / max_params", source, len(valid), constraints)

    def _check_baseline(self, baseline: dict, doc: Path) -> None:
        """A full assignment must be used and give a feasible architecture."""
        replay = ReplayTrial(self.space.fixed_params(baseline))
        walk = Walk(self.space.tree, replay, self.seq_len)
        built = walk.build()
        if replay.missing:
            return
        c = self._candidate(built, walk.params)
        if not c.feasible:
            raise SpecError(f"the baseline's architecture is not feasible: {c.reason}", doc)


# ---- baselines (pure) ---------------------------------------------------------------------------


def _baselines(raw: Any, tree: Tree) -> list[dict]:
    if not isinstance(raw, list | tuple):
        raise SpecError("baselines must be a list of assignments, e.g. "
                        "[{attention.kind: standard, attention.heads: 4}]", ("baselines",))
    return [_baseline(b, tree, ("baselines", i)) for i, b in enumerate(raw)]


def _baseline(raw: Any, tree: Tree, doc: Path) -> dict:
    """Check a baseline against the tree (names, values in their distributions, a full
    assignment uses every value) and return it as ``{param.path: value}``."""
    flat = _flatten(tree, raw, doc)
    params = _encode(tree, flat)
    replay = ReplayTrial(params)
    Walk(tree, replay).build()
    if not replay.missing:
        for name in params:
            if name not in replay.used:
                path = next(p for p in flat if param_name(p) == name)
                raise SpecError(f"{name} is not used by this baseline (its `when` does not "
                                "hold)", flat[path][1])
    return {param_name(p): copy.deepcopy(v) for p, (v, _) in flat.items()}


def _flatten(tree: Tree, raw: Any, doc: Path) -> dict[Path, tuple[Any, Path]]:
    """A baseline -> {concrete param path: (value, where it is written)}."""
    out: dict[Path, tuple[Any, Path]] = {}
    if not isinstance(raw, dict):
        raise SpecError("a baseline must be a mapping of parameter paths (or model keys) to "
                        f"values, got {raw!r}", doc)
    names = [param_name(p) for p, leaf in leaves(tree) if leaf.is_param]
    flatten_into(raw, tree, (), doc, out, names)
    return out


def _encode(tree: Tree, flat: dict[Path, tuple[Any, Path]]) -> dict:
    params = {}
    for path, (value, doc) in flat.items():
        leaf = node_at(tree, path)
        if not isinstance(leaf, Leaf):
            raise SpecError(f"{param_name(path)!r} is not a parameter", doc)
        if not leaf.is_param:
            if not leaf.contains(value):
                raise SpecError(f"{param_name(path)} is fixed to {leaf.value!r} in the "
                                f"space, got {value!r}", doc)
            continue
        params[param_name(path)] = leaf.encode(value, doc)
    return params


# ---- the task, model costs and samplers ---------------------------------------------------------


def _task_shape(task: dict) -> tuple[AdapterSpec, int]:
    """Build the task (reading its data) for its adapter and sequence length."""
    from trainers.tasks import get_task

    try:
        built = get_task(task["name"], **task["options"])
    except SpecError as err:
        prefix = ("task",) if err.path[:1] == ("name",) else ("task", "options")
        raise err.prefixed(prefix) from None
    a = built.adapter
    return AdapterSpec(a.input_kind, a.input_dim, a.output_dim), a.seq_len


def model_costs(spec: ModelSpec) -> tuple[float, int, float]:
    """``(model_flops(spec), model_params(spec), kv_cache_bytes(spec))`` (the core caches the
    per-layer costs they share)."""
    return float(model_flops(spec)), int(model_params(spec)), float(kv_cache_bytes(spec))


def make_sampler(space: SearchSpace | PreparedSpace) -> optuna.samplers.BaseSampler:
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


# ---- loading ------------------------------------------------------------------------------------


def load_space(path: str | FilePath, overrides: dict | None = None) -> SearchSpace:
    """Read and check a search-space YAML file (pure: nothing is built; see
    :meth:`SearchSpace.prepare` for the second step).

    ``overrides`` come from the command line (``trials``, ``workers``, ``storage``, ``name``;
    None values are ignored). SpecErrors are re-raised with ``file:line`` of the offending key.
    """
    located = load_yaml(path)
    try:
        return SearchSpace.from_dict(located.data, source=str(path), overrides=overrides,
                                     located=located)
    except SpecError as err:
        if err.source is not None:
            raise
        raise located.locate(err) from None


# ---- the space tree ---------------------------------------------------------------------------


def compile_tree(raw: Any, fixed_train: dict) -> Tree:
    """The ``space:`` tree parsed and checked (keys, ``when`` references, per-layer use)."""
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


__all__ = ["Candidate", "PreparedSpace", "SearchSpace", "compile_tree",
           "load_space", "make_sampler", "model_costs", "resolve_settings"]

"""The search-space DSL side of the structural distributions: a ``{structure: ...}`` leaf.

``studies.sampling`` parses a mapping whose ``structure`` is ``matrix`` or ``attention`` into a
leaf of kind ``structure`` (its value: the options, see ``options``), which may carry ``when``
like any other leaf and may stand under ``per_layer``. Walking the tree, the leaf samples its
structure define-by-run through :func:`sample_structure`; its Optuna parameters are named under
the leaf's path (``attention.g0.levels``, ``layers.1.g0.l0.score.cores``, ``mlp.form``).

Where a leaf may stand, and the matrix shape it samples:

- ``{structure: attention}``: ``attention`` or the body of ``layers: {per_layer: ...}`` (or an
  item of ``layers``): one layer's attention, at the model's width and the task's length;
- ``{structure: matrix}``: wherever a matrix spec stands: ``mlp``, and inside an attention spec
  (a level's ``score``, ``value``, ``output``: width x width). A contraction graph has one
  shape, so under ``mlp`` the ``graph`` form samples two graphs, ``mlp.up`` (width ->
  ratio*width) and ``mlp.down`` (ratio*width -> width), into ``{up: SPEC, down: SPEC}``; the
  shape-agnostic forms (``theta``, ``dense``) give one spec for both, as before.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from mlbtc_search.errors import SpecError

from .attention import sample_attention
from .matrix import sample_matrix
from .options import KINDS, AttentionOptions, MatrixOptions, parse_options

KEY = "structure"


def is_structure(raw: Any) -> bool:
    """A mapping that is a structural distribution (``block_diag``'s own ``structure`` key holds
    a matrix spec, never the words matrix or attention)."""
    return isinstance(raw, dict) and isinstance(raw.get(KEY), str) and raw[KEY] in KINDS


def parse_structure(raw: dict, src: tuple) -> MatrixOptions | AttentionOptions:
    """The options of a structure leaf at YAML path ``src`` (``when`` is the caller's)."""
    opts = parse_options({k: v for k, v in raw.items() if k != "when"}, src)
    model_path = [p for p in src[1:] if p != "per_layer"]  # without "space"
    if isinstance(opts, AttentionOptions):
        if not (model_path == ["attention"] or model_path[:1] == ["layers"]):
            raise SpecError("structure: attention stands for one layer's attention: at "
                            "attention, or in layers (per_layer)", src + (KEY,))
    elif model_path == ["attention"] or (model_path[:1] == ["layers"] and len(model_path) <= 2):
        raise SpecError("structure: matrix stands where a matrix spec stands (mlp, a level's "
                        "score, value, output); one layer's attention is structure: attention",
                        src + (KEY,))
    return opts


class RecordingTrial:
    """A trial that records every suggested value under its name (for the walk's params)."""

    def __init__(self, trial: Any, params: dict[str, Any]):
        self._trial = trial
        self._params = params

    def suggest_categorical(self, name: str, choices: list) -> Any:
        v = self._trial.suggest_categorical(name, choices)
        self._params[name] = v
        return v

    def suggest_int(self, name: str, low: int, high: int, step: int = 1,
                    log: bool = False) -> int:
        v = self._trial.suggest_int(name, low, high, step=step, log=log)
        self._params[name] = v
        return v

    def suggest_float(self, name: str, low: float, high: float, step: float | None = None,
                      log: bool = False) -> float:
        v = self._trial.suggest_float(name, low, high, step=step, log=log)
        self._params[name] = v
        return v


def sample_structure(trial: Any, name: str, opts: MatrixOptions | AttentionOptions,
                     params: dict[str, Any], width: Any, seq_len: int, mlp_ratio: Any) -> Any:
    """The spec dict of one structure leaf (suggested values recorded into ``params``).

    ``width`` / ``mlp_ratio`` are the walk's values (maybe absent or invalid: then the leaf's
    value is a placeholder and the model spec's own check reports the bad width)."""
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        return {"dense": {}} if isinstance(opts, MatrixOptions) else {"kind": "standard"}
    rec = RecordingTrial(trial, params)
    if isinstance(opts, AttentionOptions):
        return sample_attention(rec, name, opts, width, seq_len)
    if name != "mlp":
        return sample_matrix(rec, name, opts, width, width)
    ratio = mlp_ratio if isinstance(mlp_ratio, int) and not isinstance(mlp_ratio, bool) else 4
    return sample_mlp(rec, opts, width, width * max(ratio, 1))


def sample_mlp(trial: Any, opts: MatrixOptions, width: int, hidden: int) -> dict:
    """The MLP's spec. Without ``graph`` in the forms: one shape-agnostic spec (parameters as
    they always were). With it, ``mlp.form`` first picks graph or a shape-agnostic form: graph
    samples ``mlp.up`` and ``mlp.down`` (each with its own feature levels) into ``{up, down}``;
    the others sample one spec, every feature level of that form."""
    if "graph" not in opts.forms:
        return sample_matrix(trial, "mlp", opts, width, hidden)
    form = opts.forms[0]
    if len(opts.forms) > 1:
        form = trial.suggest_categorical("mlp.form", list(opts.forms))
    if form == "graph":
        graph = replace(opts, forms=("graph",))
        return {"up": sample_matrix(trial, "mlp.up", graph, width, hidden),
                "down": sample_matrix(trial, "mlp.down", graph, hidden, width)}
    return sample_matrix(trial, "mlp", replace(opts, forms=(form,)), width, hidden)

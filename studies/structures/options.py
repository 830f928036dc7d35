"""Options of the structural distributions, as written in a search-space YAML.

Two distributions sample the MLBTC structure itself instead of picking a named preset:

``{structure: matrix, ...}`` (a :class:`MatrixOptions`) stands wherever a matrix spec can stand::

    forms: [graph, theta]    # parameterizations to choose from: graph (a contraction graph over
                             # cores and bonds), theta (the einsum-search exponents), dense
    feature_levels: 3        # at most 3 levels (MLR over features), each its own structure,
                             # blocks nested coarse to fine (each level 2x or 4x the previous)
    max_blocks: 8            # blocks per level: a power of two up to 8 (dividing in and out)
    cores: 3                 # graph: at most 3 cores in a chain
    axes: 3                  # graph: in and out each factorized into at most 3 axes
    ranks: [1, 64]           # graph: bond ranks (log-uniform integers)

``{structure: attention, ...}`` (an :class:`AttentionOptions`) stands for one layer's attention::

    heads: [1, 2, 4, 8]      # total heads (a categorical)
    groups: 2                # at most 2 head groups, each with its own structure
    sequence_levels: 4       # at most 4 nested sequence levels (MLR over the sequence)
    halvings: 2              # each finer level halves the block size 1..2 times
    windows: [4, 32]         # sliding-window groups allowed, windows 4..32 (powers of two);
                             # null: no sliding windows
    score: {...}             # MatrixOptions of every level's bilinear form
    value: null              # MatrixOptions, or null for dense (the default)
    output: null

Every option has a default; unknown keys are errors naming the key and the valid ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from mlbtc_search.errors import SpecError

FORMS = ("graph", "theta", "dense")
KINDS = ("matrix", "attention")


def _int(value: Any, path: tuple, name: str, low: int = 1, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (
            high is not None and value > high):
        upper = f" and <= {high}" if high is not None else ""
        raise SpecError(f"{name} must be an integer >= {low}{upper}, got {value!r}", path)
    return value


def _pow2(value: int, path: tuple, name: str) -> int:
    if value & (value - 1):
        raise SpecError(f"{name} must be a power of two (1, 2, 4, ...), got {value}", path)
    return value


def _pair(value: Any, path: tuple, name: str, low: int = 1) -> tuple[int, int]:
    if not isinstance(value, list | tuple) or len(value) != 2:
        raise SpecError(f"{name} must be a list [lo, hi] of integers, got {value!r}", path)
    lo = _int(value[0], path + (0,), f"{name}[0]", low)
    hi = _int(value[1], path + (1,), f"{name}[1]", low)
    if lo > hi:
        raise SpecError(f"{name}: lo <= hi must hold, got [{lo}, {hi}]", path)
    return lo, hi


def _keys(d: Any, cls: type, path: tuple, what: str) -> dict:
    if not isinstance(d, dict):
        raise SpecError(f"{what} options must be a mapping, got {type(d).__name__}", path)
    valid = [f.name for f in fields(cls)]
    for key in d:
        if key not in valid and key != "structure":
            raise SpecError(f"unknown key {key!r} in a {what} structure; valid keys: structure, "
                            f"{', '.join(valid)}", path + (key,))
    return d


@dataclass(frozen=True)
class MatrixOptions:
    """How a structured matrix is sampled (see the module docstring)."""

    forms: tuple[str, ...] = ("graph",)
    feature_levels: int = 1
    max_blocks: int = 1
    cores: int = 3
    axes: int = 2
    ranks: tuple[int, int] = (1, 16)

    def __post_init__(self) -> None:
        if not self.forms or len(set(self.forms)) != len(self.forms):
            raise SpecError(f"forms must be a non-empty list of distinct forms of {list(FORMS)}, "
                            f"got {list(self.forms)}", ("forms",))
        for i, f in enumerate(self.forms):
            if f not in FORMS:
                raise SpecError(f"unknown form {f!r}; valid forms: {', '.join(FORMS)}",
                                ("forms", i))
        _int(self.feature_levels, ("feature_levels",), "feature_levels", 1, 8)
        _pow2(_int(self.max_blocks, ("max_blocks",), "max_blocks", 1, 1024), ("max_blocks",),
              "max_blocks")
        _int(self.cores, ("cores",), "cores", 1, 5)
        _int(self.axes, ("axes",), "axes", 1, 4)
        _pair(self.ranks, ("ranks",), "ranks")

    def to_dict(self) -> dict:
        return {"structure": "matrix", "forms": list(self.forms),
                "feature_levels": self.feature_levels, "max_blocks": self.max_blocks,
                "cores": self.cores, "axes": self.axes, "ranks": list(self.ranks)}

    @classmethod
    def from_dict(cls, d: Any, path: tuple = ()) -> MatrixOptions:
        d = _keys(d, cls, path, "matrix")
        forms = d.get("forms", list(cls.forms))
        if isinstance(forms, str):
            forms = [forms]
        if not isinstance(forms, list):
            raise SpecError(f"forms must be a list of {list(FORMS)}, got {forms!r}",
                            path + ("forms",))
        ranks = _pair(d.get("ranks", list(cls.ranks)), path + ("ranks",), "ranks")
        kwargs = {k: d[k] for k in ("feature_levels", "max_blocks", "cores", "axes") if k in d}
        try:
            return cls(tuple(forms), ranks=ranks, **kwargs)
        except SpecError as err:
            raise err.prefixed(path) from None


@dataclass(frozen=True)
class AttentionOptions:
    """How one layer's attention is sampled (see the module docstring)."""

    heads: tuple[int, ...] = (1, 2, 4, 8)
    groups: int = 2
    sequence_levels: int = 4
    halvings: int = 2
    windows: tuple[int, int] | None = (4, 32)
    score: MatrixOptions = field(default_factory=lambda: MatrixOptions(
        forms=("graph",), feature_levels=4, max_blocks=8, cores=3, axes=3, ranks=(1, 16)))
    value: MatrixOptions | None = None
    output: MatrixOptions | None = None

    def __post_init__(self) -> None:
        if not self.heads or len(set(self.heads)) != len(self.heads):
            raise SpecError(f"heads must be a non-empty list of distinct integers, got "
                            f"{list(self.heads)}", ("heads",))
        for i, h in enumerate(self.heads):
            _int(h, ("heads", i), "each heads value")
        _int(self.groups, ("groups",), "groups", 1, 8)
        _int(self.sequence_levels, ("sequence_levels",), "sequence_levels", 1, 8)
        _int(self.halvings, ("halvings",), "halvings", 1, 8)
        if self.windows is not None:
            lo, hi = _pair(self.windows, ("windows",), "windows", 2)
            _pow2(lo, ("windows", 0), "windows[0]")
            _pow2(hi, ("windows", 1), "windows[1]")

    def to_dict(self) -> dict:
        def opt(m: MatrixOptions | None) -> dict | None:
            return None if m is None else m.to_dict()

        return {"structure": "attention", "heads": list(self.heads), "groups": self.groups,
                "sequence_levels": self.sequence_levels, "halvings": self.halvings,
                "windows": None if self.windows is None else list(self.windows),
                "score": self.score.to_dict(), "value": opt(self.value),
                "output": opt(self.output)}

    @classmethod
    def from_dict(cls, d: Any, path: tuple = ()) -> AttentionOptions:
        d = _keys(d, cls, path, "attention")
        kwargs: dict[str, Any] = {}
        for key in ("groups", "sequence_levels", "halvings"):
            if key in d:
                kwargs[key] = d[key]
        if "heads" in d:
            heads = d["heads"]
            heads = [heads] if isinstance(heads, int) and not isinstance(heads, bool) else heads
            if not isinstance(heads, list):
                raise SpecError(f"heads must be a list of integers, got {heads!r}",
                                path + ("heads",))
            kwargs["heads"] = tuple(heads)
        if "windows" in d:
            w = d["windows"]
            kwargs["windows"] = None if w is None else _pair(w, path + ("windows",), "windows", 2)
        if "score" in d:
            kwargs["score"] = MatrixOptions.from_dict(d["score"], path + ("score",))
        for key in ("value", "output"):
            if d.get(key) is not None:
                kwargs[key] = MatrixOptions.from_dict(d[key], path + (key,))
        try:
            return cls(**kwargs)
        except SpecError as err:
            raise err.prefixed(path) from None


def parse_options(d: Any, path: tuple = ()) -> MatrixOptions | AttentionOptions:
    """``{structure: matrix|attention, ...}`` -> the options of that distribution."""
    kind = d.get("structure") if isinstance(d, dict) else None
    if kind not in KINDS:
        raise SpecError(f"structure must be one of {', '.join(KINDS)}, got {kind!r}",
                        path + ("structure",))
    if kind == "matrix":
        return MatrixOptions.from_dict(d, path)
    return AttentionOptions.from_dict(d, path)

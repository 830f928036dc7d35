"""MatrixSpec: one structured linear map R^n -> R^m as a multi-level block tensor contraction.

    M = sum over levels l of BlockDiag_{k_l}(B_{l,1}, ..., B_{l,k_l})

Each level splits input and output into ``blocks`` contiguous blocks (``blocks`` divides n and m);
every block has its own weights and the same BTC structure. The YAML format is documented in
``docs/specs.md``; for example::

    {in: 1024, out: 1024, levels: [{blocks: 1, btt: {rank: 1}}, {blocks: 8, low_rank: {rank: 4}}]}
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from .btc import BTC, MAX_SIZE
from .errors import SpecError
from .presets import PRESETS, build_preset

STRUCTURE_KEYS = tuple(PRESETS) + ("btc",)
MAX_LEVELS = 32
_SHORTHANDS = ("mlr", "block_diag")


@dataclass(frozen=True)
class Level:
    """One level: ``blocks`` diagonal blocks, each the contraction ``btc`` of size n/k -> m/k."""

    blocks: int
    btc: BTC
    preset: str = "btc"
    params: tuple[tuple[str, Any], ...] = ()

    @property
    def family(self) -> str:
        return self.preset

    def to_dict(self) -> dict:
        body: Any = self.btc.to_dict() if self.preset == "btc" else _thaw(self.params)
        return {"blocks": self.blocks, self.preset: body}


def _freeze(value: Any) -> Any:
    if isinstance(value, dict):  # sorted: key order carries no meaning (and safe_dump sorts)
        return tuple((k, _freeze(v)) for k, v in sorted(value.items()))
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    return value


def _thaw(params: tuple[tuple[str, Any], ...]) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in params}


@dataclass(frozen=True)
class MatrixSpec:
    """A validated structured matrix spec: frozen, hashable, round-trips through YAML/JSON."""

    n_in: int
    n_out: int
    levels: tuple[Level, ...] = field(default=())

    def __post_init__(self) -> None:
        for name, v in (("in", self.n_in), ("out", self.n_out)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise SpecError(f"{name} must be an integer >= 1, got {v!r}", (name,))
            if v > MAX_SIZE:
                raise SpecError(f"{name} must be at most {MAX_SIZE:,} (2^24), got {v}", (name,))
        if not self.levels:
            raise SpecError("a matrix needs at least one level", ("levels",))
        for l, level in enumerate(self.levels):
            k = level.blocks
            if self.n_in % k or self.n_out % k:
                raise SpecError(f"blocks must divide in={self.n_in} and out={self.n_out}, got "
                                f"blocks={k}", ("levels", l, "blocks"))
            if level.btc.n_in * k != self.n_in or level.btc.n_out * k != self.n_out:
                raise SpecError(
                    f"the input axes must multiply to in/blocks={self.n_in // k} and the output "
                    f"axes to out/blocks={self.n_out // k}, got {level.btc.n_in} and "
                    f"{level.btc.n_out}", ("levels", l))

    # ---- derived quantities ------------------------------------------------------------
    @property
    def params(self) -> int:
        return sum(level.blocks * level.btc.params for level in self.levels)

    @property
    def family(self) -> str:
        """A short label: the preset of a single level, 'mlr' for all-low-rank levels, ..."""
        names = [lv.preset for lv in self.levels]
        if len(names) == 1:
            return names[0] if self.levels[0].blocks == 1 else f"block_diag({names[0]})"
        if all(n == "low_rank" for n in names):
            return "mlr"
        return "+".join(dict.fromkeys(names))

    # ---- serialization -----------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"in": self.n_in, "out": self.n_out,
                "levels": [lv.to_dict() for lv in self.levels]}

    def canonical(self) -> dict:
        """Presets expanded, axes renamed by position, levels in a fixed order."""
        levels = sorted(
            ({"blocks": lv.blocks, "btc": lv.btc.canonical()} for lv in self.levels),
            key=lambda d: json.dumps(d, sort_keys=True))
        return {"in": self.n_in, "out": self.n_out, "levels": levels}

    def hash(self) -> str:
        """Stable (across processes and spellings) hash of the canonical form."""
        blob = json.dumps(self.canonical(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    @classmethod
    def from_dict(cls, d: Any, path: tuple = (), n_in: int | None = None,
                  n_out: int | None = None) -> MatrixSpec:
        """Build from the YAML form. ``n_in``/``n_out`` fill in ``in``/``out`` when the context
        (an attention or MLP slot) fixes them; if the document gives them too they must agree."""
        if isinstance(d, str):
            d = {d: {}}
        if not isinstance(d, dict):
            raise SpecError(f"a matrix spec must be a mapping (e.g. {{dense: {{}}}}), got "
                            f"{type(d).__name__}", path)
        allowed = {"in", "out", "levels", "blocks"} | set(STRUCTURE_KEYS) | set(_SHORTHANDS)
        for key in d:
            if key not in allowed:
                raise SpecError(f"unknown key {key!r}; valid keys are in, out, levels, blocks, "
                                f"mlr, block_diag, or one structure of {list(STRUCTURE_KEYS)}",
                                path + (key,))
        n = _dim(d, "in", n_in, path)
        m = _dim(d, "out", n_out, path)
        shapes = [k for k in d if k in STRUCTURE_KEYS or k in _SHORTHANDS or k == "levels"]
        if len(shapes) != 1:
            raise SpecError("give exactly one of levels, mlr, block_diag or a structure key "
                            f"({', '.join(STRUCTURE_KEYS)}), got {shapes or 'none'}", path)
        kind = shapes[0]
        if kind not in STRUCTURE_KEYS and "blocks" in d:
            raise SpecError(f"blocks goes inside {kind}, not beside it", path + ("blocks",))
        if kind == "levels":
            raw = d["levels"]
            if not isinstance(raw, list) or not raw:
                raise SpecError("levels must be a non-empty list of levels", path + ("levels",))
            levels = tuple(_level(lv, n, m, path + ("levels", i)) for i, lv in enumerate(raw))
        elif kind == "mlr":
            levels = _mlr(d["mlr"], n, m, path + ("mlr",))
        elif kind == "block_diag":
            levels = (_block_diag(d["block_diag"], n, m, path + ("block_diag",)),)
        else:
            levels = (_level({"blocks": d.get("blocks", 1), kind: d[kind]}, n, m, path),)
        try:
            return cls(n, m, levels)
        except SpecError as err:
            raise err.prefixed(path) from None


def _dim(d: dict, key: str, given: int | None, path: tuple) -> int:
    value = d.get(key, given)
    if value is None:
        raise SpecError(f"missing {key!r}: the {key}put dimension of the matrix", path)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SpecError(f"{key} must be an integer >= 1, got {value!r}", path + (key,))
    if given is not None and value != given:
        raise SpecError(f"{key} must be {given} here (fixed by the model), got {value}",
                        path + (key,))
    return value


def _blocks(value: Any, n: int, m: int, path: tuple) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SpecError(f"blocks must be an integer >= 1, got {value!r}", path)
    if n % value or m % value:
        raise SpecError(f"blocks must divide in={n} and out={m}, got blocks={value}", path)
    return value


def _level(d: Any, n: int, m: int, path: tuple) -> Level:
    if not isinstance(d, dict):
        raise SpecError(f"a level must be a mapping like {{blocks: 2, low_rank: {{rank: 4}}}}, "
                        f"got {d!r}", path)
    for key in d:
        if key != "blocks" and key not in STRUCTURE_KEYS:
            raise SpecError(f"unknown key {key!r}; a level has blocks and one structure of "
                            f"{list(STRUCTURE_KEYS)}", path + (key,))
    kinds = [k for k in d if k in STRUCTURE_KEYS]
    if len(kinds) != 1:
        raise SpecError(f"a level needs exactly one structure of {list(STRUCTURE_KEYS)}, got "
                        f"{kinds or 'none'}", path)
    kind = kinds[0]
    k = _blocks(d.get("blocks", 1), n, m, path + ("blocks",))
    if kind == "btc":
        return Level(k, BTC.from_dict(d[kind], path + ("btc",)), "btc")
    params = d[kind] if d[kind] is not None else {}
    btc = build_preset(kind, params, n // k, m // k, path + (kind,))
    if kind == "theta" and not isinstance(params, dict):
        params = {"exponents": params}
    return Level(k, btc, kind, _freeze(params))


def _mlr(d: Any, n: int, m: int, path: tuple) -> tuple[Level, ...]:
    """mlr: {ranks: [r0, r1, ...], blocks: [1, 2, ...]} -> levels of low-rank blocks."""
    if not isinstance(d, dict) or "ranks" not in d:
        raise SpecError("mlr needs {ranks: [r0, r1, ...]} and optionally blocks: [k0, k1, ...] "
                        "(default 1, 2, 4, ...)", path)
    for key in d:
        if key not in ("ranks", "blocks"):
            raise SpecError(f"unknown key {key!r}; mlr takes ranks and blocks", path + (key,))
    ranks = d["ranks"]
    if not isinstance(ranks, list) or not ranks:
        raise SpecError("ranks must be a non-empty list of integers", path + ("ranks",))
    if len(ranks) > MAX_LEVELS:
        raise SpecError(f"ranks may have at most {MAX_LEVELS} levels, got {len(ranks)}",
                        path + ("ranks",))
    blocks = d.get("blocks", [2**i for i in range(len(ranks))])
    if not isinstance(blocks, list) or len(blocks) != len(ranks):
        raise SpecError(f"blocks must be a list of {len(ranks)} integers (one per rank)",
                        path + ("blocks",))
    levels = []
    for i, (r, k) in enumerate(zip(ranks, blocks, strict=True)):
        k = _blocks(k, n, m, path + ("blocks", i))
        btc = build_preset("low_rank", {"rank": r}, n // k, m // k, path + ("ranks", i))
        levels.append(Level(k, btc, "low_rank", (("rank", r),)))
    return tuple(levels)


def _block_diag(d: Any, n: int, m: int, path: tuple) -> Level:
    """block_diag: {blocks: k, structure: {low_rank: {rank: 2}}} (structure defaults to dense)."""
    if not isinstance(d, dict) or "blocks" not in d:
        raise SpecError("block_diag needs {blocks: k} and optionally structure: {...}", path)
    for key in d:
        if key not in ("blocks", "structure"):
            raise SpecError(f"unknown key {key!r}; block_diag takes blocks and structure",
                            path + (key,))
    inner = d.get("structure", {"dense": {}})
    if isinstance(inner, str):
        inner = {inner: {}}
    if not isinstance(inner, dict):
        raise SpecError("structure must be a mapping with one structure key",
                        path + ("structure",))
    return _level({"blocks": d["blocks"], **inner}, n, m, path)

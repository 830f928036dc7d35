"""AttentionSpec: sequence levels over positions, a MatrixSpec bilinear form per level, per head.

For one head, the score between positions t and t' is

    S[t, t'] = sum_l 1[block_l(t) == block_l(t')] * scale_l * x_t^T M_l x_t'

with contiguous blocks of ``block_size`` positions at level l (None: one global block) and M_l a
D x D MatrixSpec. Heads come in groups; each group has its own levels (heterogeneous heads). W_V
and W_O are MatrixSpecs too. The YAML form, its presets (standard, bilinear_btt, bilinear_mlr,
mlr, sliding_window, global_window) and the explicit ``groups`` form are in docs/models.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .checks import check_int as _int
from .errors import SpecError
from .matrix import MatrixSpec


def _keys(d: Any, allowed: set[str], path: tuple, what: str) -> dict:
    if not isinstance(d, dict):
        raise SpecError(f"{what} must be a mapping, got {type(d).__name__}", path)
    for key in d:
        if key not in allowed:
            raise SpecError(f"unknown key {key!r} in {what}; valid keys: "
                            f"{', '.join(sorted(allowed))}", path + (key,))
    return d


@dataclass(frozen=True)
class ScoreLevel:
    """One sequence level: blocks of ``block_size`` positions (None = global), score matrix,
    logit scale (None = ``logit_mult / width`` of this level's q.k, the µP 1/d rule)."""

    block_size: int | None
    score: MatrixSpec
    scale: float | None = None

    def to_dict(self) -> dict:
        d: dict[str, Any] = {"block_size": self.block_size, "score": self.score.to_dict()}
        if self.scale is not None:
            d["scale"] = self.scale
        return d


@dataclass(frozen=True)
class HeadGroup:
    """``heads`` heads sharing one scoring structure; ``window`` makes it sliding-window."""

    heads: int
    levels: tuple[ScoreLevel, ...]
    window: int | None = None

    def to_dict(self) -> dict:
        d: dict[str, Any] = {"heads": self.heads, "levels": [lv.to_dict() for lv in self.levels]}
        if self.window is not None:
            d["window"] = self.window
        return d


ATTENTION_KINDS = ("standard", "bilinear_btt", "bilinear_mlr", "mlr", "sliding_window",
                   "global_window", "general")


@dataclass(frozen=True)
class AttentionSpec:
    width: int
    groups: tuple[HeadGroup, ...]
    value: MatrixSpec
    output: MatrixSpec
    qk_norm: bool = True
    causal: bool = True
    logit_mult: float = 8.0
    kind: str = "general"

    def __post_init__(self) -> None:
        D = self.width
        heads = self.heads
        if D % heads:
            raise SpecError(f"the total number of heads ({heads}) must divide width={D}",
                            ("heads",))
        for g, group in enumerate(self.groups):
            path = ("groups", g)
            if not group.levels:
                raise SpecError("a head group needs at least one level", path + ("levels",))
            prev: int | None = None
            for l, lv in enumerate(group.levels):
                if lv.score.n_in != D or lv.score.n_out != D:
                    raise SpecError(f"score matrices must be {D} x {D} (width), got "
                                    f"{lv.score.n_out} x {lv.score.n_in}",
                                    path + ("levels", l, "score"))
                bs = lv.block_size
                if bs is None and l > 0:
                    raise SpecError("only the first level may be global (block_size: null); "
                                    "levels must be nested from coarse to fine",
                                    path + ("levels", l, "block_size"))
                if bs is not None and prev is not None and (bs > prev or prev % bs):
                    raise SpecError(f"block sizes must be nested: each must divide the previous "
                                    f"level's ({prev}), got {bs}",
                                    path + ("levels", l, "block_size"))
                if bs is not None:
                    prev = bs
            if group.window is not None and (len(group.levels) != 1 or
                                             group.levels[0].block_size is not None):
                raise SpecError("a sliding window goes with exactly one global level",
                                path + ("window",))
        for name, m in (("value", self.value), ("output", self.output)):
            if m.n_in != D or m.n_out != D:
                raise SpecError(f"{name} must be a {D} x {D} matrix", (name,))

    @property
    def heads(self) -> int:
        return sum(g.heads for g in self.groups)

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    def to_dict(self) -> dict:
        return {"kind": "general", "family": self.kind,
                "groups": [g.to_dict() for g in self.groups],
                "value": self.value.to_dict(), "output": self.output.to_dict(),
                "qk_norm": self.qk_norm, "causal": self.causal, "logit_mult": self.logit_mult}

    @classmethod
    def from_dict(cls, d: Any, width: int, seq_len: int | None, path: tuple = ()) -> AttentionSpec:
        """Presets (``kind``) expand into the explicit ``groups`` form. ``seq_len`` gives the
        default block sizes of ``mlr`` (T / 2^l)."""
        if isinstance(d, str):
            d = {"kind": d}
        d = _keys(d, set(_PRESET_KEYS["general"]) | {k for v in _PRESET_KEYS.values() for k in v},
                  path, "attention")
        kind = d.get("kind", "general")
        if kind not in ATTENTION_KINDS:
            raise SpecError(f"unknown attention kind {kind!r}; valid kinds: "
                            f"{', '.join(ATTENTION_KINDS)}", path + ("kind",))
        _keys(d, set(_PRESET_KEYS[kind]), path, f"{kind} attention")
        common = {
            "qk_norm": d.get("qk_norm", True), "causal": d.get("causal", True),
            "logit_mult": d.get("logit_mult", 8.0),
        }
        for key in ("qk_norm", "causal"):
            if not isinstance(common[key], bool):
                raise SpecError(f"{key} must be true or false", path + (key,))
        if isinstance(common["logit_mult"], bool) or not isinstance(
                common["logit_mult"], int | float) or common["logit_mult"] <= 0:
            raise SpecError("logit_mult must be a positive number", path + ("logit_mult",))
        value = MatrixSpec.from_dict(d.get("value", {"dense": {}}), path + ("value",),
                                     width, width)
        output = MatrixSpec.from_dict(d.get("output", {"dense": {}}), path + ("output",),
                                      width, width)
        groups = _expand(kind, d, width, seq_len, path)
        family = d.get("family", kind) if kind == "general" else kind
        if family not in ATTENTION_KINDS:
            raise SpecError(f"family must be one of {', '.join(ATTENTION_KINDS)}",
                            path + ("family",))
        try:
            return cls(width, groups, value, output, kind=family, **common)
        except SpecError as err:
            raise err.prefixed(path) from None


_COMMON = ("kind", "heads", "value", "output", "qk_norm", "causal", "logit_mult")
_PRESET_KEYS = {
    "standard": _COMMON + ("head_dim",),
    "bilinear_btt": _COMMON + ("rank", "in_factors", "out_factors"),
    "bilinear_mlr": _COMMON + ("ranks",),
    "mlr": _COMMON + ("ranks", "block_sizes"),
    "sliding_window": _COMMON + ("window", "head_dim"),
    "global_window": _COMMON + ("window", "global_heads", "head_dim"),
    "general": ("kind", "family", "groups", "value", "output", "qk_norm", "causal",
                "logit_mult"),
}


def _score(d: Any, width: int, path: tuple) -> MatrixSpec:
    return MatrixSpec.from_dict(d, path, width, width)


def _preset_score(d: dict, width: int, path: tuple) -> MatrixSpec:
    """The score matrix of a bilinear preset; errors name the preset's own keys
    (``attention.in_factors``, not ``attention.btt.in_factors``; ``attention.ranks`` for the
    derived ``mlr.blocks``)."""
    try:
        return _score(d, width, path)
    except SpecError as err:
        inner = err.path[len(path) + 1:] if err.path[:len(path)] == path else err.path
        if inner[:1] == ("blocks",):
            inner = ("ranks",)
        raise SpecError(err.message, path + inner) from None


def _ranks(d: dict, path: tuple, allow_zero: bool) -> list[int]:
    ranks = d.get("ranks")
    if not isinstance(ranks, list) or not ranks:
        raise SpecError("ranks must be a non-empty list of integers, e.g. [8, 4, 2, 2]",
                        path + ("ranks",))
    low = 0 if allow_zero else 1
    out = [_int(r, path + ("ranks", i), "each rank", low) for i, r in enumerate(ranks)]
    if not any(out):
        raise SpecError("at least one rank must be >= 1", path + ("ranks",))
    return out


def _expand(kind: str, d: dict, width: int, seq_len: int | None,
            path: tuple) -> tuple[HeadGroup, ...]:
    if kind == "general":
        groups = d.get("groups")
        if not isinstance(groups, list) or not groups:
            raise SpecError("general attention needs groups: a list of {heads, levels}",
                            path + ("groups",))
        return tuple(_group(g, width, path + ("groups", i)) for i, g in enumerate(groups))
    heads = _int(d.get("heads", 1), path + ("heads",), "heads")
    if width % heads:
        raise SpecError(f"heads must divide width={width}, got heads={heads}", path + ("heads",))
    head_dim = d.get("head_dim", width // heads)
    if kind in ("standard", "sliding_window", "global_window"):
        head_dim = _int(head_dim, path + ("head_dim",), "head_dim")
        if head_dim > width:
            raise SpecError(f"head_dim must be <= width={width}, got {head_dim}",
                            path + ("head_dim",))
    std = ScoreLevel(None, _score({"low_rank": {"rank": head_dim}}, width, path))
    if kind == "standard":
        return (HeadGroup(heads, (std,)),)
    if kind == "sliding_window":
        window = _int(d.get("window"), path + ("window",), "window")
        return (HeadGroup(heads, (std,), window),)
    if kind == "global_window":
        window = _int(d.get("window"), path + ("window",), "window")
        g = _int(d.get("global_heads", heads // 2 or 1), path + ("global_heads",),
                 "global_heads")
        if g >= heads:
            raise SpecError(f"global_heads must be < heads={heads} (the rest use the window)",
                            path + ("global_heads",))
        return (HeadGroup(g, (std,)), HeadGroup(heads - g, (std,), window))
    if kind == "bilinear_btt":
        params = {k: d[k] for k in ("rank", "in_factors", "out_factors") if k in d}
        score = _preset_score({"btt": params}, width, path)
        return (HeadGroup(heads, (ScoreLevel(None, score),)),)
    if kind == "bilinear_mlr":
        ranks = _ranks(d, path, allow_zero=False)
        mlr = {"mlr": {"ranks": ranks, "blocks": [2**i for i in range(len(ranks))]}}
        return (HeadGroup(heads, (ScoreLevel(None, _preset_score(mlr, width, path)),)),)
    # kind == "mlr": sequence levels with block sizes T / 2^l, rank r_l each
    ranks = _ranks(d, path, allow_zero=True)
    sizes = d.get("block_sizes")
    if sizes is None:
        if seq_len is None:
            raise SpecError("mlr attention needs block_sizes, or the model's max_seq_len to "
                            "default them to T / 2^l", path + ("block_sizes",))
        if seq_len % 2 ** (len(ranks) - 1):
            raise SpecError(f"max_seq_len={seq_len} must be divisible by 2^(levels-1)="
                            f"{2 ** (len(ranks) - 1)} for the default block sizes",
                            path + ("ranks",))
        sizes = [None] + [seq_len // 2**i for i in range(1, len(ranks))]
    if not isinstance(sizes, list) or len(sizes) != len(ranks):
        raise SpecError(f"block_sizes must be a list of {len(ranks)} entries (one per rank)",
                        path + ("block_sizes",))
    levels: list[ScoreLevel] = []
    prev: int | None = None
    for i, (r, bs) in enumerate(zip(ranks, sizes, strict=True)):
        if bs is not None:
            bs = _int(bs, path + ("block_sizes", i), "block size")
            if seq_len is not None and bs >= seq_len:
                bs = None if i == 0 else bs
        if r == 0:
            continue
        if levels and bs is None:
            raise SpecError("only the first level may be global (null); block sizes go from "
                            "coarse to fine", path + ("block_sizes", i))
        if bs is not None and prev is not None and prev % bs:
            raise SpecError(f"block sizes must be nested: each must divide the previous "
                            f"level's ({prev}), got {bs}", path + ("block_sizes", i))
        prev = bs if bs is not None else prev
        levels.append(ScoreLevel(bs, _score({"low_rank": {"rank": r}}, width,
                                            path + ("ranks", i))))
    return (HeadGroup(heads, tuple(levels)),)


def _group(d: Any, width: int, path: tuple) -> HeadGroup:
    d = _keys(d, {"heads", "levels", "window"}, path, "head group")
    heads = _int(d.get("heads", 1), path + ("heads",), "heads")
    levels = d.get("levels")
    if not isinstance(levels, list) or not levels:
        raise SpecError("levels must be a non-empty list of {block_size, score, scale}",
                        path + ("levels",))
    out = []
    for i, lv in enumerate(levels):
        p = path + ("levels", i)
        lv = _keys(lv, {"block_size", "score", "scale"}, p, "level")
        if "score" not in lv:
            raise SpecError("a level needs score: a matrix spec (e.g. {low_rank: {rank: 8}})", p)
        bs = lv.get("block_size")
        if bs is not None:
            bs = _int(bs, p + ("block_size",), "block_size")
        scale = lv.get("scale")
        if scale is not None and (isinstance(scale, bool) or not isinstance(scale, int | float)):
            raise SpecError("scale must be a number or null (auto)", p + ("scale",))
        out.append(ScoreLevel(bs, _score(lv["score"], width, p + ("score",)),
                              None if scale is None else float(scale)))
    window = d.get("window")
    if window is not None:
        window = _int(window, path + ("window",), "window")
    return HeadGroup(heads, tuple(out), window)

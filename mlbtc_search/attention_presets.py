"""Attention presets: each one function and one registry row, as the matrix ``PRESETS``.

A preset turns its YAML keys into the explicit head groups of an ``AttentionSpec``. Its row in
``ATTENTION_PRESETS`` names the keys it accepts (besides the common ``kind, heads, value, output,
qk_norm, causal, logit_mult``); ``AttentionSpec.from_dict`` validates against it and calls it.
Adding a structure family is one function here, one row, and a line in docs/models.md (the cost
table in section 3.1 and its test, tests/core/test_attention_costs.py, if it has a closed form).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .attention_spec import OPTION_KEYS, HeadGroup, ScoreLevel, check_keys
from .checks import check_int
from .errors import SpecError
from .matrix import MatrixSpec

Expand = Callable[[dict, int, "int | None", tuple], tuple[HeadGroup, ...]]

COMMON_KEYS = ("kind", "heads", "value", "output", "qk_norm", "causal", "logit_mult",
               *OPTION_KEYS)


@dataclass(frozen=True)
class AttentionPreset:
    name: str
    keys: tuple[str, ...]  # every key the preset's YAML mapping accepts
    expand: Expand  # (doc, width, seq_len, path) -> head groups


ATTENTION_PRESETS: dict[str, AttentionPreset] = {}


def register(name: str, *own_keys: str, common: tuple[str, ...] = COMMON_KEYS):
    def deco(fn: Expand) -> Expand:
        ATTENTION_PRESETS[name] = AttentionPreset(name, common + own_keys, fn)
        return fn

    return deco


# ---- helpers ------------------------------------------------------------------------------------
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
    out = [check_int(r, path + ("ranks", i), "each rank", low) for i, r in enumerate(ranks)]
    if not any(out):
        raise SpecError("at least one rank must be >= 1", path + ("ranks",))
    return out


def _heads(d: dict, width: int, path: tuple) -> int:
    heads = check_int(d.get("heads", 1), path + ("heads",), "heads")
    if width % heads:
        raise SpecError(f"heads must divide width={width}, got heads={heads}", path + ("heads",))
    return heads


def _standard_level(d: dict, width: int, heads: int, path: tuple) -> ScoreLevel:
    head_dim = check_int(d.get("head_dim", width // heads), path + ("head_dim",), "head_dim")
    if head_dim > width:
        raise SpecError(f"head_dim must be <= width={width}, got {head_dim}",
                        path + ("head_dim",))
    return ScoreLevel(None, _score({"low_rank": {"rank": head_dim}}, width, path))


# ---- the presets --------------------------------------------------------------------------------
@register("standard", "head_dim")
def standard(d: dict, width: int, seq_len: int | None, path: tuple) -> tuple[HeadGroup, ...]:
    """One global level, score x^T W_Q W_K^T x' of rank head_dim."""
    heads = _heads(d, width, path)
    return (HeadGroup(heads, (_standard_level(d, width, heads, path),)),)


@register("sliding_window", "window", "head_dim")
def sliding_window(d: dict, width: int, seq_len: int | None,
                   path: tuple) -> tuple[HeadGroup, ...]:
    """Standard heads that see the last ``window`` positions."""
    heads = _heads(d, width, path)
    level = _standard_level(d, width, heads, path)
    window = check_int(d.get("window"), path + ("window",), "window")
    return (HeadGroup(heads, (level,), window),)


@register("global_window", "window", "global_heads", "head_dim")
def global_window(d: dict, width: int, seq_len: int | None,
                  path: tuple) -> tuple[HeadGroup, ...]:
    """``global_heads`` standard heads plus window heads."""
    heads = _heads(d, width, path)
    level = _standard_level(d, width, heads, path)
    window = check_int(d.get("window"), path + ("window",), "window")
    g = check_int(d.get("global_heads", heads // 2 or 1), path + ("global_heads",),
                  "global_heads")
    if g >= heads:
        raise SpecError(f"global_heads must be < heads={heads} (the rest use the window)",
                        path + ("global_heads",))
    return (HeadGroup(g, (level,)), HeadGroup(heads - g, (level,), window))


@register("bilinear_btt", "rank", "in_factors", "out_factors")
def bilinear_btt(d: dict, width: int, seq_len: int | None,
                 path: tuple) -> tuple[HeadGroup, ...]:
    """One global level whose score matrix is a BTT per head."""
    heads = _heads(d, width, path)
    params = {k: d[k] for k in ("rank", "in_factors", "out_factors") if k in d}
    score = _preset_score({"btt": params}, width, path)
    return (HeadGroup(heads, (ScoreLevel(None, score),)),)


@register("bilinear_mlr", "ranks")
def bilinear_mlr(d: dict, width: int, seq_len: int | None,
                 path: tuple) -> tuple[HeadGroup, ...]:
    """One global level whose score matrix is MLR over the features (2^l blocks at level l)."""
    heads = _heads(d, width, path)
    ranks = _ranks(d, path, allow_zero=False)
    mlr = {"mlr": {"ranks": ranks, "blocks": [2**i for i in range(len(ranks))]}}
    return (HeadGroup(heads, (ScoreLevel(None, _preset_score(mlr, width, path)),)),)


@register("mlr", "ranks", "block_sizes")
def mlr(d: dict, width: int, seq_len: int | None, path: tuple) -> tuple[HeadGroup, ...]:
    """MLR over the sequence: level l has block size T / 2^l (or ``block_sizes``), rank r_l."""
    heads = _heads(d, width, path)
    ranks = _ranks(d, path, allow_zero=True)
    sizes = d.get("block_sizes")
    if sizes is None:
        if seq_len is None:
            raise SpecError("mlr attention needs block_sizes, or the model's max_seq_len to "
                            "default them to T / 2^l", path + ("block_sizes",))
        n = len(ranks) - 1  # checked on bit lengths first: no 2^(10^6) for a long list
        if n >= seq_len.bit_length() or seq_len % 2**n:
            need = 2**n if n < 64 else f"2^{n}"
            raise SpecError(f"max_seq_len={seq_len} must be divisible by 2^(levels-1)="
                            f"{need} for the default block sizes", path + ("ranks",))
        sizes = [None] + [seq_len // 2**i for i in range(1, len(ranks))]
    if not isinstance(sizes, list) or len(sizes) != len(ranks):
        raise SpecError(f"block_sizes must be a list of {len(ranks)} entries (one per rank)",
                        path + ("block_sizes",))
    levels: list[ScoreLevel] = []
    prev: int | None = None
    for i, (r, bs) in enumerate(zip(ranks, sizes, strict=True)):
        if bs is not None:
            bs = check_int(bs, path + ("block_sizes", i), "block size")
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


@register("general", "family", "groups", common=tuple(k for k in COMMON_KEYS if k != "heads"))
def general(d: dict, width: int, seq_len: int | None, path: tuple) -> tuple[HeadGroup, ...]:
    """The explicit form: a list of head groups, each with its own levels."""
    groups = d.get("groups")
    if not isinstance(groups, list) or not groups:
        raise SpecError("general attention needs groups: a list of {heads, levels}",
                        path + ("groups",))
    return tuple(_group(g, width, path + ("groups", i)) for i, g in enumerate(groups))


def _group(d: Any, width: int, path: tuple) -> HeadGroup:
    d = check_keys(d, {"heads", "levels", "window"}, path, "head group")
    heads = check_int(d.get("heads", 1), path + ("heads",), "heads")
    levels = d.get("levels")
    if not isinstance(levels, list) or not levels:
        raise SpecError("levels must be a non-empty list of {block_size, score, scale}",
                        path + ("levels",))
    out = []
    for i, lv in enumerate(levels):
        p = path + ("levels", i)
        lv = check_keys(lv, {"block_size", "score", "scale"}, p, "level")
        if "score" not in lv:
            raise SpecError("a level needs score: a matrix spec (e.g. {low_rank: {rank: 8}})", p)
        bs = lv.get("block_size")
        if bs is not None:
            bs = check_int(bs, p + ("block_size",), "block_size")
        scale = lv.get("scale")
        if scale is not None and (isinstance(scale, bool) or not isinstance(scale, int | float)):
            raise SpecError("scale must be a number or null (auto)", p + ("scale",))
        out.append(ScoreLevel(bs, _score(lv["score"], width, p + ("score",)),
                              None if scale is None else float(scale)))
    window = d.get("window")
    if window is not None:
        window = check_int(window, path + ("window",), "window")
    return HeadGroup(heads, tuple(out), window)


ATTENTION_KINDS = tuple(ATTENTION_PRESETS)

__all__ = ["ATTENTION_KINDS", "ATTENTION_PRESETS", "AttentionPreset", "register"]

"""Structure descriptors: what a sampled architecture *is*, in numbers and short labels.

Recorded per trial and shown wherever trials are shown. Per layer and head group: the heads, the
window, the number of sequence levels and the finest block size; per level of a group: the
bilinear form's numerical rank (of a random instance, i.e. its generic rank), its q.k width per
head, its number of cores and feature levels, its matrix family and canonical hash, and the theta
exponents when it was sampled as theta. Per layer: params, FLOPs and KV-cache bytes per token
(``model.layer_costs``). :func:`summary` flattens them into a few numbers per trial (what the
dashboard colours and sizes the front by).

Labels: :func:`matrix_family` names a matrix by the preset it equals (same canonical form):
dense, low_rank, kronecker, monarch, btt, tensor_train, mlr (levels of low rank), theta, else
btc (a general contraction graph). :func:`structure_label` names an attention structure from its
groups (``standard``, ``mlr``, ``sliding_window``, ``bilinear_<matrix family>``,
``mlr:<families>``, groups joined by `` | ``).
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from mlbtc_search.attention_presets import ATTENTION_PRESETS
from mlbtc_search.attention_spec import AttentionSpec, HeadGroup
from mlbtc_search.errors import SpecError
from mlbtc_search.matrix import Level, MatrixSpec
from mlbtc_search.model import ModelSpec, layer_costs
from mlbtc_search.plan import bilinear_cut

THETA_NAMES = ("alpha", "beta", "gamma", "delta", "epsilon", "phi", "rho")


# ---- matrices ------------------------------------------------------------------------------


def _candidates(level: Level) -> list[tuple[str, dict]]:
    """Presets (with parameters read off the level's shape) that this level might equal."""
    can = level.btc.canonical()
    ins = [s for _, s in can["in"]]
    outs = [s for _, s in can["out"]]
    bonds = [s for _, s in can["bonds"]]
    rank = bonds[0] if len(bonds) == 1 else 1
    out: list[tuple[str, dict]] = [("dense", {}), ("low_rank", {"rank": rank})]
    if len(ins) == 2 and len(outs) == 2:
        f = {"in_factors": ins, "out_factors": outs}
        out += [("kronecker", f), ("monarch", {}), ("btt", {"rank": rank, **f})]
    c = len(can["cores"])
    if c >= 2 and len(ins) == c and len(outs) == c and len(bonds) in (0, c - 1):
        ranks = [s for _, s in sorted(can["bonds"], key=lambda b: int(b[0][1:]))] or [1] * (c - 1)
        out.append(("tensor_train", {"cores": c, "ranks": ranks, "in_factors": ins,
                                     "out_factors": outs}))
    return out


@functools.lru_cache(maxsize=4096)
def level_family(level: Level) -> str:
    if level.preset == "theta":
        return "theta"
    target = level.btc.canonical()
    n, m = level.btc.n_in, level.btc.n_out
    for name, params in _candidates(level):
        try:
            spec = MatrixSpec.from_dict({name: params}, (), n, m)
        except SpecError:
            continue
        if spec.levels[0].btc.canonical() == target:
            return name
    return "btc"


def matrix_family(spec: MatrixSpec) -> str:
    """The preset a matrix equals (canonically), or ``btc`` / a ``+``-joined sum of levels."""
    names = [level_family(lv) for lv in spec.levels]
    if len(names) == 1:
        return names[0] if spec.levels[0].blocks == 1 else f"block_diag({names[0]})"
    if all(n == "low_rank" for n in names):
        return "mlr"
    return "+".join(sorted(set(names)))


@functools.lru_cache(maxsize=4096)
def numerical_rank(spec: MatrixSpec) -> int:
    """The rank of a random instance (Gaussian cores, float64): the structure's generic rank.

    The dense matrix is contracted with numpy (a few ms at width 64; running the module on the
    identity took about 50 ms)."""
    rng = np.random.default_rng(0)
    total = np.zeros((spec.n_out, spec.n_in))
    for lv in spec.levels:
        btc = lv.btc
        letters = {a: chr(ord("a") + i) for i, a in enumerate(btc.sizes)}
        ins = "".join(letters[a] for a, _ in btc.in_axes)
        outs = "".join(letters[a] for a, _ in btc.out_axes)
        terms = ",".join("".join(letters[a] for a in core) for core in btc.cores)
        m, n = btc.n_out, btc.n_in
        for b in range(lv.blocks):
            cores = [rng.standard_normal(btc.core_shape(c)) for c in range(len(btc.cores))]
            block = np.einsum(f"{terms}->{outs}{ins}", *cores, optimize=True)  # (*out, *in)
            total[b * m:(b + 1) * m, b * n:(b + 1) * n] += block.reshape(m, n)
    return int(np.linalg.matrix_rank(total))


def theta_exponents(spec: MatrixSpec) -> list[list[float]]:
    """The theta exponents of each level sampled as theta (empty if none)."""
    out = []
    for lv in spec.levels:
        if lv.preset == "theta":
            exps = dict(lv.params)["exponents"]
            if isinstance(exps, str):
                exps = [float(t) for t in exps.strip("() ").split("|")]
            out.append([float(t) for t in exps])
    return out


def matrix_descriptor(spec: MatrixSpec) -> dict:
    d: dict[str, Any] = {"family": matrix_family(spec), "hash": spec.hash(),
                         "feature_levels": len(spec.levels),
                         "cores": max(len(lv.btc.cores) for lv in spec.levels),
                         "params": spec.params}
    thetas = theta_exponents(spec)
    if thetas:
        d["theta"] = thetas
    return d


# ---- attention -----------------------------------------------------------------------------


def _group_label(group: HeadGroup) -> str:
    fams = [matrix_family(lv.score) for lv in group.levels]
    if group.window is not None:
        return "sliding_window" if fams[0] == "low_rank" else f"sliding_window:{fams[0]}"
    if len(fams) == 1:
        return "standard" if fams[0] == "low_rank" else f"bilinear_{fams[0]}"
    if all(f == "low_rank" for f in fams):
        return "mlr"
    return "mlr:" + "+".join(dict.fromkeys(fams))


def structure_label(attn: AttentionSpec) -> str:
    """A short name of an attention structure, finer than the presets (see module doc)."""
    return " | ".join(dict.fromkeys(_group_label(g) for g in attn.groups))


_KIND_OF_LABEL = {"standard": "standard", "mlr": "mlr", "sliding_window": "sliding_window",
                  "bilinear_btt": "bilinear_btt", "bilinear_monarch": "bilinear_btt",
                  "bilinear_mlr": "bilinear_mlr", "standard | sliding_window": "global_window"}


def attention_family(attn: dict | AttentionSpec, width: int, seq_len: int) -> str:
    """The attention kind (an ``ATTENTION_PRESETS`` name) a structure falls in, else general."""
    if isinstance(attn, dict):
        attn = AttentionSpec.from_dict({k: v for k, v in attn.items() if k != "family"},
                                       width, seq_len)
    kind = _KIND_OF_LABEL.get(structure_label(attn), "general")
    return kind if kind in ATTENTION_PRESETS else "general"


def group_descriptor(group: HeadGroup, width: int, seq_len: int) -> dict:
    levels = []
    for lv in group.levels:
        d = matrix_descriptor(lv.score)
        d["block_size"] = lv.block_size
        d["rank"] = numerical_rank(lv.score)
        d["qk_width"] = sum(level.blocks * bilinear_cut(level.btc).width
                            for level in lv.score.levels)
        levels.append(d)
    blocks = [lv.block_size for lv in group.levels if lv.block_size is not None]
    finest = min(blocks) if blocks else seq_len
    if group.window is not None:
        finest = min(finest, group.window)
    return {"label": _group_label(group), "heads": group.heads, "window": group.window,
            "sequence_levels": len(group.levels), "finest_block": finest, "levels": levels}


def describe(spec: ModelSpec) -> dict:
    """Per layer: label, params, FLOPs, KV bytes and the descriptors of each head group; the
    MLP's matrix descriptor; and :func:`summary`."""
    T = spec.max_seq_len
    layers = []
    for attn, cost in zip(spec.layers, layer_costs(spec), strict=True):
        layers.append({
            "label": structure_label(attn), "heads": attn.heads,
            "params": cost["params"], "flops_per_token": cost["flops_per_token"],
            "kv_cache_bytes_per_token": cost["kv_cache_bytes_per_token"],
            "value": matrix_descriptor(attn.value), "output": matrix_descriptor(attn.output),
            "groups": [group_descriptor(g, spec.width, T) for g in attn.groups],
        })
    out = {"label": model_label(spec), "family": family_label(spec), "layers": layers,
           "mlp": matrix_descriptor(spec.mlp_up)}
    if matrix_family(spec.mlp_down) != matrix_family(spec.mlp_up):  # a split MLP: both halves
        out["mlp_down"] = matrix_descriptor(spec.mlp_down)
    out["summary"] = summary(out)
    return out


def _coarse_matrix(spec: MatrixSpec) -> str:
    if len(spec.levels) > 1:
        return "mlr"
    level = spec.levels[0]
    return level_family(level) if level.blocks == 1 else f"block_{level_family(level)}"


def _coarse_group(group: HeadGroup) -> str:
    if group.window is not None:
        return "sliding_window"
    if len(group.levels) > 1:
        return "mlr"
    name = _coarse_matrix(group.levels[0].score)
    return "standard" if name == "low_rank" else f"bilinear_{name}"


def family_label(spec: ModelSpec) -> str:
    """The family a trial is counted in by the answer's table: the kinds of its head groups over
    all layers, sorted and joined by ``+``. A group is ``standard`` (one global low-rank level),
    ``mlr`` (nested sequence levels), ``sliding_window``, or ``bilinear_<matrix family>`` (one
    global level with another bilinear form; ``btc`` for a general contraction graph,
    ``block_<family>`` for a block-diagonal one). The MLP is not part of it."""
    return "+".join(sorted({_coarse_group(g) for a in spec.layers for g in a.groups}))


def model_label(spec: ModelSpec) -> str:
    """The attention label of every distinct layer (``, ``-joined) and a non-dense MLP's family."""
    att = ", ".join(dict.fromkeys(structure_label(a) for a in spec.layers))
    mlp = matrix_family(spec.mlp_up)
    down = matrix_family(spec.mlp_down)
    mlp = mlp if down == mlp else f"{mlp}+{down}"
    return att + ("" if mlp == "dense" else f" / mlp:{mlp}")


def summary(desc: dict) -> dict[str, float]:
    """A few numbers per trial: maxima/minima over layers, groups and levels."""
    groups = [g for lay in desc["layers"] for g in lay["groups"]]
    levels = [lv for g in groups for lv in g["levels"]]
    out: dict[str, float] = {
        "heads": max(lay["heads"] for lay in desc["layers"]),
        "groups": max(len(lay["groups"]) for lay in desc["layers"]),
        "sequence_levels": max(g["sequence_levels"] for g in groups),
        "finest_block": min(g["finest_block"] for g in groups),
        "min_rank": min(lv["rank"] for lv in levels),
        "max_rank": max(lv["rank"] for lv in levels),
        "qk_width": max(lv["qk_width"] for lv in levels),
        "cores": max(lv["cores"] for lv in levels),
        "feature_levels": max(lv["feature_levels"] for lv in levels),
        "windowed_heads": sum(g["heads"] for g in desc["layers"][0]["groups"]
                              if g["window"] is not None),
    }
    theta = desc["mlp"].get("theta") or next((lv["theta"] for lv in levels if "theta" in lv),
                                             None)
    if theta:
        for name, value in zip(THETA_NAMES, theta[0], strict=True):
            out[f"theta_{name}"] = value
    return out

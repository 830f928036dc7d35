"""The attention module against dense references built from its own weights.

Every score level's bilinear form is materialized per head from the cores of *both* sides of its
cut (an einsum over the contraction, independent of the executors), so the module's output is
checked against ``softmax(mask(sum_l blocks_l * scale_l * X M_l X^T)) V W_O`` with explicit block
and band masks, and standard attention against ``F.scaled_dot_product_attention``.
"""

from __future__ import annotations

import math
import string

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from mlbtc_search.attention import Attention
from mlbtc_search.attention_spec import AttentionSpec, HeadGroup, ScoreLevel
from mlbtc_search.errors import SpecError

D, T = 32, 16

# One attention document per variant (width D, max_seq_len T); small, but every code path: fused
# SDPA, region kernel with nested and partial blocks, window kernel, several head groups,
# structured value/output matrices, multi-level score matrices, fixed scales.
VARIANTS: dict[str, dict] = {
    "standard": {"kind": "standard", "heads": 4},
    "bilinear_btt": {"kind": "bilinear_btt", "heads": 4},
    "bilinear_mlr": {"kind": "bilinear_mlr", "heads": 4, "ranks": [4, 2, 1]},
    "mlr": {"kind": "mlr", "heads": 4, "ranks": [4, 2, 1, 1]},
    "sliding_window": {"kind": "sliding_window", "heads": 4, "window": 5},
    "global_window": {"kind": "global_window", "heads": 4, "window": 4, "global_heads": 1},
    "general": {
        "kind": "general",
        "groups": [
            {
                "heads": 1,
                "levels": [
                    {"block_size": None, "score": {"btt": {"rank": 2}}},
                    {"block_size": 4, "score": {"low_rank": {"rank": 4}}, "scale": 0.3},
                ],
            },
            {
                "heads": 3,
                "levels": [
                    {"block_size": None, "score": {"mlr": {"ranks": [2, 1], "blocks": [1, 2]}}},
                    {"block_size": 8, "score": {"low_rank": {"rank": 2}}},
                    {"block_size": 2, "score": {"low_rank": {"rank": 2}}},
                ],
            },
        ],
        "value": {"btt": {"rank": 1}},
        "output": {"low_rank": {"rank": 16}},
    },
    "structured_value_output": {
        "kind": "mlr",
        "heads": 2,
        "ranks": [8, 4, 4],
        "value": {"monarch": {}},
        "output": {"block_diag": {"blocks": 4}},
    },
}


def spec_of(doc: dict | str, width: int = D, seq_len: int | None = T) -> AttentionSpec:
    return AttentionSpec.from_dict(doc, width=width, seq_len=seq_len)


def randomized(spec: AttentionSpec, seed: int = 0) -> Attention:
    """A float64 module whose every parameter is random (the zero-init output and the unit
    LayerNorm gains would hide mistakes)."""
    torch.manual_seed(seed)
    attn = Attention(spec).double()
    with torch.no_grad():
        for name, p in attn.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif name.startswith("output") and p.abs().sum() == 0:
                p.normal_(0.0, 0.3)
    return attn


# ---- dense references ---------------------------------------------------------------------------
def level_matrix(attn: Attention, group: int, side: int, head: int) -> Tensor:
    """The D x D matrix M of one score-matrix level of one head, from the cores of its query and
    key sides: ``x_t^T M x_t'`` is that level's q . k (rows index the query side, the output
    leg of the contraction; columns the key side, its input leg)."""
    f = attn.features[group]
    q_side, k_side, _ = f.sides[side]
    btc = q_side.btc
    q_ids, k_ids = f._index[side]
    cores: dict[int, Tensor] = {}
    for s, ids in ((q_side, q_ids), (k_side, k_ids)):
        for step, pid in zip(s.steps, ids, strict=True):
            cores[step.core] = f.cores[pid][head]  # (blocks, *core axes)
    assert sorted(cores) == list(range(len(btc.cores))), "the two sides hold every core once"
    letter = dict(zip(btc.sizes, string.ascii_letters[:-1], strict=False))
    terms = ["Z" + "".join(letter[a] for a in btc.cores[c]) for c in range(len(btc.cores))]
    out = "Z" + "".join(letter[a] for a, _ in btc.out_axes + btc.in_axes)
    blocks = torch.einsum(",".join(terms) + "->" + out, *(cores[c] for c in sorted(cores)))
    k = q_side.blocks
    blocks = blocks.reshape(k, btc.n_out, btc.n_in)  # (k, D/k, D/k)
    return torch.block_diag(*blocks.unbind(0))  # (D, D)


def score_matrices(attn: Attention, group: int) -> list[Tensor]:
    """Per sequence level of a head group: (heads, D, D), summed over the score's matrix levels."""
    f, g = attn.features[group], attn.spec.groups[group]
    out, side = [], 0
    for lv in g.levels:
        n = len(lv.score.levels)
        out.append(
            torch.stack(
                [
                    sum(level_matrix(attn, group, side + j, h) for j in range(n))
                    for h in range(f.heads)
                ]
            )
        )
        side += n
    return out


def scales(attn: Attention, group: int) -> list[float]:
    """Per sequence level: the logit scale (``logit_mult / width`` unless given)."""
    f, g = attn.features[group], attn.spec.groups[group]
    return [
        lv.scale if lv.scale is not None else attn.spec.logit_mult / w
        for lv, w in zip(g.levels, f.level_widths, strict=True)
    ]


def same_block(Tn: int, block_size: int | None) -> Tensor:
    t = torch.arange(Tn)
    b = Tn if block_size is None else block_size
    return (t[:, None] // b == t[None, :] // b).double()  # (T, T)


def allowed(Tn: int, window: int | None, causal: bool) -> Tensor:
    t = torch.arange(Tn)
    d = t[:, None] - t[None, :]  # query - key
    ok = d >= 0 if causal else torch.ones(Tn, Tn, dtype=torch.bool)
    if window is not None:
        ok = ok & (d < window) & (d > -window)
    return ok


def dense_attention(attn: Attention, x: Tensor) -> Tensor:
    """The module's function from materialized score matrices (qk_norm must be off)."""
    assert not attn.spec.qk_norm
    B, Tn, _ = x.shape
    v = attn.value(x).view(B, Tn, attn.spec.heads, attn.head_dim).transpose(1, 2)
    ys, h0 = [], 0
    for gi, g in enumerate(attn.spec.groups):
        S = x.new_zeros(B, g.heads, Tn, Tn)
        for lv, M, s in zip(g.levels, score_matrices(attn, gi), scales(attn, gi), strict=True):
            S = S + torch.einsum("btd,hde,bse->bhts", x, M, x) * s * same_block(Tn, lv.block_size)
        S = S.masked_fill(~allowed(Tn, g.window, attn.spec.causal), float("-inf"))
        ys.append(torch.softmax(S, dim=-1) @ v[:, h0 : h0 + g.heads])
        h0 += g.heads
    y = torch.cat(ys, dim=1).transpose(1, 2).reshape(B, Tn, -1)  # (B, T, D)
    return attn.output(y)


# ---- standard attention is SDPA -----------------------------------------------------------------
@pytest.mark.parametrize("qk_norm", [True, False])
def test_standard_attention_is_sdpa(qk_norm):
    spec = spec_of({"kind": "standard", "heads": 4, "qk_norm": qk_norm})
    attn = randomized(spec)
    x = torch.randn(2, T, D, dtype=torch.float64)
    [(q, k, v)] = attn.qkv(x)
    d = spec.head_dim
    f = attn.features[0]
    # low rank M = V^T U: the query core V (r, o) sits on the query side, U (i, r) on the key side
    assert [tuple(p.shape) for p in f.cores] == [(4, 1, d, D), (4, 1, D, d)]
    W_Q = f.cores[0][:, 0].transpose(-1, -2)  # (H, D, d)
    W_K = f.cores[1][:, 0]  # (H, D, d)
    q_raw = torch.einsum("btd,hde->bhte", x, W_Q)
    k_raw = torch.einsum("btd,hde->bhte", x, W_K)
    if qk_norm:
        q_raw = F.layer_norm(q_raw, (d,), attn.q_norm[0].weight)
        k_raw = F.layer_norm(k_raw, (d,), attn.k_norm[0].weight)
    scale = 8.0 / d
    torch.testing.assert_close(q, q_raw * scale)
    torch.testing.assert_close(k, k_raw)
    B = x.shape[0]
    v_ref = attn.value(x).view(B, T, 4, d).transpose(1, 2)
    torch.testing.assert_close(v, v_ref)
    y = F.scaled_dot_product_attention(q_raw, k_raw, v_ref, is_causal=True, scale=scale)
    expected = attn.output(y.transpose(1, 2).reshape(B, T, D))
    torch.testing.assert_close(attn(x), expected)


def test_standard_head_dim_sets_the_qk_width():
    spec = spec_of({"kind": "standard", "heads": 4, "head_dim": 4})
    attn = randomized(spec)
    q, k, v = attn.qkv(torch.randn(1, T, D, dtype=torch.float64))[0]
    assert q.shape == k.shape == (1, 4, T, 4) and v.shape == (1, 4, T, 8)
    assert attn._scale(0).tolist() == [2.0] * 4  # logit_mult / 4


def test_mlr_with_one_rank_is_standard_attention():
    std = spec_of({"kind": "standard", "heads": 4})
    mlr = spec_of({"kind": "mlr", "heads": 4, "ranks": [8]})
    assert mlr.groups == std.groups and mlr.kind == "mlr"
    a, b = randomized(std), randomized(mlr, seed=1)
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, T, D, dtype=torch.float64)
    torch.testing.assert_close(b(x), a(x))
    assert a._scale(0)[0].item() == 8.0 / 8


# ---- every variant equals its dense reference ---------------------------------------------------
@pytest.mark.parametrize("name", sorted(VARIANTS))
@pytest.mark.parametrize("Tn", [T, 11])
def test_matches_dense_reference(name, Tn):
    spec = spec_of({**VARIANTS[name], "qk_norm": False})
    attn = randomized(spec)
    x = torch.randn(2, Tn, D, dtype=torch.float64)
    torch.testing.assert_close(attn(x), dense_attention(attn, x))


@pytest.mark.parametrize("name", ["mlr", "general"])
def test_non_causal_matches_dense_reference(name):
    spec = spec_of({**VARIANTS[name], "qk_norm": False, "causal": False})
    attn = randomized(spec)
    x = torch.randn(2, T, D, dtype=torch.float64)
    torch.testing.assert_close(attn(x), dense_attention(attn, x))


def test_sliding_and_global_window_masks():
    """Band t - w < t' <= t for window heads; global heads see the whole causal prefix."""
    spec = spec_of({**VARIANTS["global_window"], "qk_norm": False})
    assert [(g.heads, g.window) for g in spec.groups] == [(1, None), (3, 4)]
    attn = randomized(spec)
    x = torch.randn(1, T, D, dtype=torch.float64)
    y = attn(x)
    torch.testing.assert_close(y, dense_attention(attn, x))
    # the band is real: widening the window changes the output
    wide = spec_of({**VARIANTS["global_window"], "window": 8, "qk_norm": False})
    other = randomized(wide)
    other.load_state_dict(attn.state_dict())
    assert not torch.allclose(other(x), y)


# ---- bilinear BTT -------------------------------------------------------------------------------
def test_bilinear_btt_score_is_x_ln_mx():
    """x_t^T LN(M_h x_t') * 8 / D, no query projection (the key side holds every core)."""
    spec = spec_of(VARIANTS["bilinear_btt"])
    attn = randomized(spec)
    f = attn.features[0]
    q_side, k_side, width = f.sides[0]
    assert q_side.cores == () and len(k_side.cores) == 2 and width == D
    x = torch.randn(2, T, D, dtype=torch.float64)
    [(q, k, _)] = attn.qkv(x)
    [M] = score_matrices(attn, 0)  # (H, D, D)
    Mx = torch.einsum("hde,bse->bhsd", M, x)  # (B, H, T, D): M_h x_t'
    k_ref = F.layer_norm(Mx, (D,), attn.k_norm[0].weight)
    q_ref = F.layer_norm(x, (D,), attn.q_norm[0].weight).unsqueeze(1) * (8.0 / D)
    torch.testing.assert_close(k, k_ref)
    torch.testing.assert_close(q, q_ref.expand_as(q))
    scores = q @ k.transpose(-1, -2)
    torch.testing.assert_close(scores, q_ref @ k_ref.transpose(-1, -2))


@pytest.mark.parametrize("width,heads,rank", [(16, 2, 1), (32, 4, 1), (64, 8, 1), (64, 4, 2)])
def test_bilinear_btt_is_full_rank(width, heads, rank):
    spec = spec_of({"kind": "bilinear_btt", "heads": heads, "rank": rank}, width=width)
    attn = randomized(spec)
    [M] = score_matrices(attn, 0)
    for h in range(heads):
        assert torch.linalg.matrix_rank(M[h]).item() == width
    # heads differ only through their own slices of the cores
    assert not torch.allclose(M[0], M[1])
    # against standard attention's low-rank bottleneck
    [W] = score_matrices(randomized(spec_of({"kind": "standard", "heads": heads}, width=width)), 0)
    assert torch.linalg.matrix_rank(W[0]).item() == width // heads


# ---- bilinear MLR (MLR over features) -----------------------------------------------------------
@pytest.mark.parametrize("ranks", [[4, 2, 1], [2, 2, 2, 2], [8], [1, 1, 1, 1, 1]])
def test_bilinear_mlr_is_a_sum_of_block_diagonal_low_rank_levels(ranks):
    spec = spec_of({"kind": "bilinear_mlr", "heads": 2, "ranks": ranks})
    attn = randomized(spec)
    f = attn.features[0]
    assert f.level_widths == [sum(2**l * r for l, r in enumerate(ranks))]
    [M] = score_matrices(attn, 0)
    for h in range(2):
        total = torch.zeros(D, D, dtype=torch.float64)
        for l, r in enumerate(ranks):
            Ml = level_matrix(attn, 0, l, h)
            blocks, n = 2**l, D // 2**l
            mask = torch.block_diag(*[torch.ones(n, n, dtype=torch.float64)] * blocks)
            assert (Ml * (1 - mask)).abs().max() == 0, "level l is block-diagonal (2^l blocks)"
            for b in range(blocks):
                assert torch.linalg.matrix_rank(Ml[b * n : (b + 1) * n, b * n : (b + 1) * n]) == r
            total = total + Ml
        torch.testing.assert_close(M[h], total)
        bound = min(D, sum(2**l * r for l, r in enumerate(ranks)))
        assert torch.linalg.matrix_rank(M[h]).item() == bound


# ---- MLR over the sequence ----------------------------------------------------------------------
def test_mlr_default_levels():
    spec = spec_of(VARIANTS["mlr"])
    [g] = spec.groups
    assert [lv.block_size for lv in g.levels] == [None, 8, 4, 2]  # T / 2^l
    assert [lv.score.levels[0].btc.sizes["r"] for lv in g.levels] == [4, 2, 1, 1]


@pytest.mark.parametrize("qk_norm", [True, False])
def test_mlr_is_the_blockwise_dense_sum(qk_norm):
    """S = sum_l Blk_l * (q_l k_l^T) * scale_l with explicit block masks, then causal softmax,
    where q_l, k_l are the level-l slices of the (normalized) per-head features."""
    spec = spec_of({**VARIANTS["mlr"], "qk_norm": qk_norm})
    attn = randomized(spec)
    x = torch.randn(2, T, D, dtype=torch.float64)
    q, k = attn.features[0](x)  # (B, H, T, 8) each
    q, k = attn.q_norm[0](q), attn.k_norm[0](k)
    v = attn.value(x).view(2, T, 4, 8).transpose(1, 2)
    S = torch.zeros(2, 4, T, T, dtype=torch.float64)
    start = 0
    for r, bs in zip([4, 2, 1, 1], [None, 8, 4, 2], strict=True):
        ql, kl = q[..., start : start + r], k[..., start : start + r]
        S = S + same_block(T, bs) * (ql @ kl.transpose(-1, -2)) * (8.0 / r)
        start += r
    S = S.masked_fill(~allowed(T, None, True), float("-inf"))
    y = (torch.softmax(S, dim=-1) @ v).transpose(1, 2).reshape(2, T, D)
    torch.testing.assert_close(attn(x), attn.output(y))


def test_mlr_zero_ranks_drop_levels():
    spec = spec_of({"kind": "mlr", "heads": 4, "ranks": [4, 0, 2, 2]})
    [g] = spec.groups
    assert [lv.block_size for lv in g.levels] == [None, 4, 2]  # T/1, T/4, T/8; T/2 dropped
    explicit = spec_of(
        {
            "kind": "general",
            "groups": [
                {
                    "heads": 4,
                    "levels": [
                        {"block_size": None, "score": {"low_rank": {"rank": 4}}},
                        {"block_size": 4, "score": {"low_rank": {"rank": 2}}},
                        {"block_size": 2, "score": {"low_rank": {"rank": 2}}},
                    ],
                }
            ],
        }
    )
    assert explicit.groups == spec.groups
    attn = randomized(spec)
    assert attn.features[0].level_widths == [4, 2, 2]
    # a zero first rank leaves blocked levels only: distant pairs score 0, not -inf
    local = spec_of({"kind": "mlr", "heads": 4, "ranks": [0, 4, 4], "qk_norm": False})
    assert [lv.block_size for lv in local.groups[0].levels] == [8, 4]
    a = randomized(local)
    x = torch.randn(1, T, D, dtype=torch.float64)
    torch.testing.assert_close(a(x), dense_attention(a, x))


def test_mlr_zero_rank_levels_do_not_constrain_nesting():
    spec = spec_of({"kind": "mlr", "heads": 4, "ranks": [4, 0, 2], "block_sizes": [None, 8, 6]})
    assert [lv.block_size for lv in spec.groups[0].levels] == [None, 6]


def test_mlr_explicit_block_sizes():
    spec = spec_of({"kind": "mlr", "heads": 4, "ranks": [4, 4], "block_sizes": [None, 6]})
    assert [lv.block_size for lv in spec.groups[0].levels] == [None, 6]
    attn = randomized(
        spec_of(
            {
                "kind": "mlr",
                "heads": 4,
                "ranks": [4, 4],
                "block_sizes": [None, 6],
                "qk_norm": False,
            }
        )
    )
    x = torch.randn(1, T, D, dtype=torch.float64)  # 16 = 6 + 6 + a partial block of 4
    torch.testing.assert_close(attn(x), dense_attention(attn, x))


def test_logit_scale_default_and_override():
    spec = spec_of({**VARIANTS["general"], "logit_mult": 4.0})
    attn = randomized(spec)
    # group 0: btt (q.k width D) then low rank 4 with a fixed scale
    assert scales(attn, 0) == [4.0 / D, 0.3]
    # group 1: feature MLR [2, 1] with blocks [1, 2] has width 2 + 2; then ranks 2 and 2
    assert attn.features[1].level_widths == [4, 2, 2]
    assert scales(attn, 1) == [1.0, 2.0, 2.0]
    assert attn._scale(1).tolist() == [1.0] * 4 + [2.0] * 4


# ---- causality ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_causality(name):
    attn = randomized(spec_of(VARIANTS[name]))
    x = torch.randn(2, T, D, dtype=torch.float64)
    y = attn(x)
    for t in (0, 5, 9, T - 2):
        x2 = x.clone()
        x2[:, t + 1 :] = torch.randn_like(x2[:, t + 1 :]) * 3
        y2 = attn(x2)
        torch.testing.assert_close(y2[:, : t + 1], y[:, : t + 1], rtol=0, atol=1e-12)
        assert not torch.allclose(y2[:, t + 1 :], y[:, t + 1 :])


def test_gradients_reach_every_parameter():
    attn = randomized(spec_of(VARIANTS["general"]))
    x = torch.randn(2, T, D, dtype=torch.float64, requires_grad=True)
    attn(x).square().sum().backward()
    for name, p in attn.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


# ---- spec errors name the field -----------------------------------------------------------------
@pytest.mark.parametrize(
    "doc,match",
    [
        ({"kind": "sparse"}, r"at kind: unknown attention kind 'sparse'"),
        ({"kind": "standard", "heads": 5}, r"at heads: heads must divide width=32"),
        ({"kind": "mlr", "ranks": [4, 4], "window": 3}, r"at window: unknown key 'window'"),
        ({"kind": "mlr", "ranks": []}, r"at ranks: ranks must be a non-empty list"),
        ({"kind": "mlr", "ranks": [0, 0]}, r"at ranks: at least one rank"),
        (
            {"kind": "mlr", "ranks": [4, 2], "block_sizes": [None]},
            r"at block_sizes: block_sizes "
            r"must be a list of 2",
        ),
        ({"kind": "sliding_window"}, r"at window: window must be an integer >= 1"),
        (
            {"kind": "global_window", "heads": 2, "window": 4, "global_heads": 2},
            r"at global_heads: global_heads must be < heads=2",
        ),
        ({"kind": "standard", "qk_norm": "yes"}, r"at qk_norm: qk_norm must be true or false"),
        ({"kind": "standard", "value": {"low_rank": {"rank": 99}}}, r"at value\.low_rank\.rank"),
        (
            {
                "groups": [
                    {
                        "heads": 2,
                        "levels": [
                            {"block_size": 8, "score": {"low_rank": {"rank": 2}}},
                            {"block_size": 3, "score": {"low_rank": {"rank": 2}}},
                        ],
                    }
                ]
            },
            r"at groups\[0\]\.levels\[1\]\.block_size: block sizes must be nested",
        ),
        (
            {
                "groups": [
                    {
                        "heads": 2,
                        "levels": [
                            {"block_size": 8, "score": {"low_rank": {"rank": 2}}},
                            {"block_size": None, "score": {"low_rank": {"rank": 2}}},
                        ],
                    }
                ]
            },
            r"at groups\[0\]\.levels\[1\]\.block_size: only the first level may be global",
        ),
        (
            {
                "groups": [
                    {
                        "heads": 2,
                        "window": 4,
                        "levels": [
                            {"score": {"low_rank": {"rank": 2}}},
                            {"block_size": 4, "score": {"low_rank": {"rank": 2}}},
                        ],
                    }
                ]
            },
            r"at groups\[0\]\.window: a sliding window goes with exactly one global level",
        ),
        (
            {"groups": [{"heads": 2, "levels": [{"block_size": 4}]}]},
            r"at groups\[0\]\.levels\[0\]: a level needs score",
        ),
        (
            {
                "groups": [
                    {"heads": 2, "levels": [{"score": {"low_rank": {"rank": 2}}, "scale": "x"}]}
                ]
            },
            r"at groups\[0\]\.levels\[0\]\.scale: scale must be a number",
        ),
        (
            {"groups": [{"heads": 3, "levels": [{"score": {"dense": {}}}]}]},
            r"at heads: the total number of heads \(3\) must divide width=32",
        ),
        # presets name their own keys, not the fields they expand into
        (
            {"kind": "mlr", "ranks": [2, 2, 2], "block_sizes": [None, 8, 6]},
            r"at block_sizes\[2\]: block sizes must be nested: each must divide the previous "
            r"level's \(8\), got 6",
        ),
        (
            {"kind": "mlr", "ranks": [2, 2], "block_sizes": [8, None]},
            r"at block_sizes\[1\]: only the first level may be global",
        ),
        (
            {"kind": "mlr", "ranks": [2, 2], "block_sizes": [None, 0]},
            r"at block_sizes\[1\]: block size must be an integer >= 1",
        ),
        (
            {"kind": "mlr", "ranks": [64]},
            r"at ranks\[0\]\.low_rank\.rank: rank must be >= 1 and <= 32",
        ),
        (
            {"kind": "bilinear_btt", "in_factors": [3, 11]},
            r"at in_factors: the product of in_factors must be 32",
        ),
        ({"kind": "bilinear_btt", "rank": 0}, r"at rank: rank must be >= 1"),
        ({"kind": "bilinear_mlr", "ranks": [1] * 7}, r"at ranks: blocks must divide in=32"),
        ({"kind": "bilinear_mlr", "ranks": [40]}, r"at ranks\[0\]\.rank: rank must be >= 1"),
        ({"kind": "bilinear_mlr", "ranks": [4, 0]}, r"at ranks\[1\]: each rank must be an"),
    ],
)
def test_spec_errors_name_the_field(doc, match):
    with pytest.raises(SpecError, match=match):
        spec_of(doc)


def test_errors_are_prefixed_with_the_caller_path():
    with pytest.raises(SpecError, match=r"at layers\[1\]\.kind: unknown attention kind"):
        AttentionSpec.from_dict({"kind": "nope"}, D, T, path=("layers", 1))


def test_mlr_default_block_sizes_need_a_divisible_length():
    with pytest.raises(
        SpecError,
        match=r"at ranks: max_seq_len=12 must be divisible by "
        r"2\^\(levels-1\)=8",
    ):
        spec_of({"kind": "mlr", "ranks": [1, 1, 1, 1]}, seq_len=12)
    with pytest.raises(SpecError, match=r"at block_sizes: mlr attention needs block_sizes"):
        spec_of({"kind": "mlr", "ranks": [1, 1]}, seq_len=None)


def test_spec_is_frozen_and_validated_on_construction():
    spec = spec_of("standard")
    with pytest.raises(AttributeError):
        spec.width = 64  # type: ignore[misc]
    level = spec.groups[0].levels[0]
    with pytest.raises(SpecError, match=r"at heads: the total number of heads \(3\)"):
        AttentionSpec(D, (HeadGroup(3, (level,)),), spec.value, spec.output)
    bad = ScoreLevel(None, spec_of("standard", width=16).groups[0].levels[0].score)
    with pytest.raises(
        SpecError,
        match=r"at groups\[0\]\.levels\[0\]\.score: score matrices "
        r"must be 32 x 32",
    ):
        AttentionSpec(D, (HeadGroup(1, (bad,)),), spec.value, spec.output)
    assert math.isclose(spec.logit_mult, 8.0)


def test_rms_cap_reaches_the_score_cores():
    spec = AttentionSpec.from_dict({"kind": "bilinear_btt", "heads": 2}, width=16, seq_len=8)
    capped = Attention(spec, rms_cap=True).double()
    with torch.no_grad():  # well below the cap (a random init can sit just above it)
        for p in capped.features[0].cores:
            p.mul_(0.5)
    plain = Attention(spec).double()
    plain.load_state_dict(capped.state_dict())
    x = torch.randn(2, 8, 16, dtype=torch.float64)
    assert torch.equal(capped.qkv(x)[0][1], plain.qkv(x)[0][1])  # below the cap: unchanged
    feats = capped.features[0]
    with torch.no_grad():
        feats.cores[0].mul_(10.0)
    w = feats._weight(0)
    assert w.pow(2).mean().sqrt().item() == pytest.approx(feats._init_std[0], rel=1e-9)


# ---- paper-faithful options ---------------------------------------------------------------------
def test_bilinear_mlr_per_level_norm_and_scale():
    """qk_norm_per_level: one LayerNorm and one logit scale per feature-MLR level (the paper's),
    instead of one over the head's W = sum 2^l r_l features."""
    doc = {"kind": "bilinear_mlr", "heads": 2, "ranks": [4, 2, 1], "qk_norm_per_level": True}
    spec = spec_of(doc)
    attn = randomized(spec)
    parts = [4, 4, 4]  # 2^l blocks of rank r_l: widths 4, 2*2, 4*1
    assert [n.normalized_shape[0] for n in attn.q_norm[0].norms] == parts
    assert attn._scale(0).tolist() == [8.0 / 4] * 12
    x = torch.randn(2, T, D, dtype=torch.float64)
    q, k = attn.features[0](x)
    q_ref = torch.cat([F.layer_norm(p, (4,), n.weight) for p, n in
                       zip(q.split(parts, -1), attn.q_norm[0].norms, strict=True)], -1) * 2.0
    torch.testing.assert_close(attn.qkv(x)[0][0], q_ref)
    default = spec_of({**doc, "qk_norm_per_level": False})
    assert default.to_dict() == spec_of({k: v for k, v in doc.items()
                                         if k != "qk_norm_per_level"}).to_dict()
    assert "qk_norm_per_level" not in default.to_dict()  # default specs keep their hash
    assert spec.to_dict()["qk_norm_per_level"] is True
    assert AttentionSpec.from_dict(spec.to_dict(), D, T) == spec
    assert sum(p.numel() for p in attn.parameters()) == sum(
        p.numel() for p in Attention(default).parameters())


def test_mlr_mean_over_shared_levels_module():
    doc = {"kind": "mlr", "heads": 4, "ranks": [4, 2, 1, 1], "mean_over_shared_levels": True}
    spec = spec_of(doc)
    attn = randomized(spec)
    x = torch.randn(2, T, D, dtype=torch.float64)
    plain = randomized(spec_of({**doc, "mean_over_shared_levels": False}))
    plain.load_state_dict(attn.state_dict())
    assert not torch.allclose(attn(x), plain(x))
    with pytest.raises(SpecError, match=r"at mean_over_shared_levels: mean_over_shared_levels "
                                        r"must be true or false"):
        spec_of({**doc, "mean_over_shared_levels": "yes"})

"""The cost table of docs/models.md (section 3.1), written out independently, against the plan.

Closed forms per preset, causal, T a power of two: per head, ``pairs`` (query, key) pairs at q.k
width ``e`` cost ``2 e`` (score) + ``2 d`` (value) FLOPs forward and ``2 (3 e + 2 d)`` backward;
the feature projections, W_V and W_O cost their matrix FLOPs per token.
"""

from __future__ import annotations

import pytest

from mlbtc_search.attention_plan import attention_plan
from mlbtc_search.attention_spec import AttentionSpec


def global_pairs(T: int, e: int, d: int) -> int:
    """One global causal level: fused (e == d) the allowed pairs; else rectangles down to
    causal blocks of 64, which run whole."""
    c = 1 if e == d else min(T, 64)
    return T * (T + c) // 2


def mlr_terms(T: int, ranks: list[int], d: int) -> list[tuple[int, int]]:
    """(pairs, q.k width) per level of `mlr` with block sizes T / 2^l."""
    L = len(ranks)
    prefix = [sum(ranks[: l + 1]) for l in range(L)]
    terms = [(T * T // 2 ** (l + 2), prefix[l]) for l in range(L - 1)]
    b = T // 2 ** (L - 1)
    c = 1 if prefix[-1] == d else min(b, 64)
    return terms + [(T * (b + c) // 2, prefix[-1])]


def closed_form(doc: dict, D: int, T: int) -> tuple[int, int, int]:
    """(projection FLOPs per token, kernel forward, kernel backward) of one sequence."""
    H = doc["heads"]
    d = D // H
    dense_vo = 2 * (2 * D * D)
    kind = doc["kind"]
    if kind in ("standard", "sliding_window", "global_window"):
        k = doc.get("head_dim", d)
        proj = 4 * H * D * k
        std = [(global_pairs(T, k, d), k)]
        win = [(2 * doc.get("window", 1) * T, k)]  # chunks of w queries against 2w keys
        g = doc.get("global_heads", H // 2) if kind == "global_window" else H
        heads_terms = {"standard": [(H, std)], "sliding_window": [(H, win)],
                       "global_window": [(g, std), (H - g, win)]}[kind]
    elif kind == "mlr":
        proj = 4 * H * D * sum(doc["ranks"])
        heads_terms = [(H, mlr_terms(T, doc["ranks"], d))]
    elif kind == "bilinear_mlr":
        W = sum(2**l * r for l, r in enumerate(doc["ranks"]))
        proj = 4 * H * D * sum(doc["ranks"])
        heads_terms = [(H, [(global_pairs(T, W, d), W)])]
    else:  # bilinear_btt
        s = doc.get("rank", 1)
        c, _ = doc["in_factors"]
        a, b = doc["out_factors"]
        e = min(D, c * b * s)
        key = D * b * s
        query = a * b * c * s if e == D else D * c * s  # e == D: q = x, M x' on the key side
        proj = 2 * H * (key + query)
        heads_terms = [(H, [(global_pairs(T, e, d), e)])]
    fwd = sum(h * 2 * n * (e + d) for h, terms in heads_terms for n, e in terms)
    bwd = sum(h * 2 * n * (3 * e + 2 * d) for h, terms in heads_terms for n, e in terms)
    return proj + dense_vo, fwd, bwd


DOCS = [
    {"kind": "standard", "heads": 8},
    {"kind": "standard", "heads": 4, "head_dim": 8},
    {"kind": "mlr", "heads": 8, "ranks": [4, 2, 1, 1]},  # prefix 8 == d: fused finest blocks
    {"kind": "mlr", "heads": 8, "ranks": [32, 4, 4, 4, 4, 4, 4, 4]},
    {"kind": "mlr", "heads": 4, "ranks": [4, 2, 1]},
    {"kind": "bilinear_mlr", "heads": 8, "ranks": [4, 2, 1]},
    {"kind": "bilinear_mlr", "heads": 4, "ranks": [8, 4]},  # W = 16 = d
    {"kind": "bilinear_btt", "heads": 8, "in_factors": [8, 8], "out_factors": [8, 8]},
    {"kind": "bilinear_btt", "heads": 8, "in_factors": [8, 8], "out_factors": [16, 4]},
    {"kind": "bilinear_btt", "heads": 2, "rank": 2, "in_factors": [4, 16],
     "out_factors": [16, 4]},
    {"kind": "sliding_window", "heads": 8, "window": 16},
    {"kind": "global_window", "heads": 8, "window": 32, "global_heads": 3},
]


@pytest.mark.parametrize("T", [128, 256, 1024])
@pytest.mark.parametrize("doc", DOCS, ids=lambda d: f"{d['kind']}-{d['heads']}")
def test_plan_matches_the_cost_table(doc, T):
    D = 64
    plan = attention_plan(AttentionSpec.from_dict(doc, D, T))
    proj, fwd, bwd = closed_form(doc, D, T)
    assert plan.projection_flops == proj
    cost = plan.kernel_cost(T)
    assert (cost.forward, cost.backward) == (fwd, bwd)
    assert plan.flops_per_token(T) == proj + fwd / T
    assert plan.flops_per_token(T, backward=True) == 3 * proj + (fwd + bwd) / T


def test_the_issue_example_now_credits_mlr_rank_savings():
    """Width 64, 8 heads, T=256: MLR [4, 2, 1, 1] used to report exactly standard's 67,584
    attention FLOPs per token (q, k padded to the value width)."""
    std = attention_plan(AttentionSpec.from_dict({"kind": "standard", "heads": 8}, 64, 256))
    mlr = attention_plan(AttentionSpec.from_dict(
        {"kind": "mlr", "heads": 8, "ranks": [4, 2, 1, 1]}, 64, 256))
    assert mlr.kernel_cost(256).forward < std.kernel_cost(256).forward

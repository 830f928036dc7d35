"""Attention kernels: exactness against dense masked references, gradients, causality, the region
plan, window attention, KV caches and exact FLOP counts."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mlbtc_search.attention_kernels import (
    multilevel_attention,
    multilevel_attention_cost,
    multilevel_attention_flops,
    multilevel_attention_reference,
    plan_regions,
    window_attention,
    window_attention_cost,
    window_attention_flops,
)
from mlbtc_search.errors import SpecError
from mlbtc_search.flopcount import count_flops
from mlbtc_search.kv_cache import MultilevelKVCache, WindowKVCache, kv_cache_bytes_per_token

# (widths, block_sizes, T, dv): global + nested levels, width 0, partial final blocks, an implicit
# global root (coarsest level blocked), ratios 2 to 12, block sizes above T, W < dv and W > dv.
CONFIGS = [
    ((4, 3, 2), (None, 8, 4), 16, 9),
    ((4, 3, 2), (None, 8, 4), 13, 9),
    ((4, 0, 2), (None, 6, 3), 20, 6),
    ((3, 2), (8, 4), 21, 5),
    ((2, 2, 2), (None, 9, 3), 7, 6),
    ((3, 2, 2), (12, 4, 2), 30, 7),
    ((6, 2), (None, 4), 11, 4),
    ((2, 3), (None, None), 9, 5),
    ((5, 1), (64, 4), 10, 6),
    ((4, 2, 1, 1), (None, 16, 8, 2), 37, 8),
    ((2, 2), (None, 2), 37, 4),  # global + tiny blocks: virtual halving levels
    ((3, 1, 2), (None, 24, 2), 50, 5),  # 24 -> 12 -> 6 -> 2 (ratio 3 last)
]


def dense_multilevel(q, k, v, widths, block_sizes, causal):
    """Explicit masked sum of per-level score matrices, then mask, softmax, @ v."""
    T = q.shape[2]
    t = torch.arange(T)
    scores = torch.zeros(*q.shape[:2], T, T, dtype=q.dtype)
    start = 0
    for w, bs in zip(widths, block_sizes, strict=True):
        b = T if bs is None else bs
        same_block = (t[:, None] // b == t[None, :] // b).to(q.dtype)  # (T, T)
        ql, kl = q[..., start : start + w], k[..., start : start + w]
        scores = scores + (ql @ kl.transpose(-1, -2)) * same_block
        start += w
    if causal:
        scores = scores.masked_fill(t[None, :] > t[:, None], float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def dense_window(q, k, v, window, causal):
    T = q.shape[2]
    t = torch.arange(T)
    d = t[:, None] - t[None, :]  # query - key
    allowed = (d >= 0) & (d < window) if causal else d.abs() < window
    scores = (q @ k.transpose(-1, -2)).masked_fill(~allowed, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def qkv(T, W, dv, dtype=torch.float64, B=2, H=3, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(B, H, T, W, generator=g, dtype=dtype) for _ in range(2))
    v = torch.randn(B, H, T, dv, generator=g, dtype=dtype)
    return tuple(x.requires_grad_(grad) for x in (q, k, v))


def decode(cache, q, k, v):
    """Feed positions one at a time; the rows, concatenated: (B, H, T, Dv)."""
    steps = [cache.step(*(x[:, :, t : t + 1] for x in (q, k, v))) for t in range(q.shape[2])]
    return torch.cat(steps, dim=2)


@pytest.mark.parametrize("E, Ev", [(8, 8), (6, 10)])
@pytest.mark.parametrize("causal", [True, False])
def test_single_global_level_is_sdpa(E, Ev, causal):
    q, k, v = qkv(19, E, Ev, dtype=torch.float32)
    out = multilevel_attention(q, k, v, [E], [None], causal)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=1.0)
    torch.testing.assert_close(out, ref)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("widths, block_sizes, T, dv", CONFIGS)
def test_matches_dense_reference_and_gradients(widths, block_sizes, T, dv, causal):
    q, k, v = qkv(T, sum(widths), dv, grad=True)
    out = multilevel_attention(q, k, v, widths, block_sizes, causal)
    ref = dense_multilevel(q, k, v, widths, block_sizes, causal)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    ref_grads = torch.autograd.grad(ref, (q, k, v), g)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("widths, block_sizes, T, dv", CONFIGS[:6])
def test_buffer_reference_matches_dense(widths, block_sizes, T, dv, causal):
    q, k, v = qkv(T, sum(widths), dv, grad=True)
    out = multilevel_attention_reference(q, k, v, widths, block_sizes, causal)
    ref = dense_multilevel(q, k, v, widths, block_sizes, causal)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    g = torch.randn_like(out)
    for got, want in zip(
        torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g), strict=True
    ):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)


def test_unfused_path_in_chunks_matches_dense(monkeypatch):
    """The unfused path splits the heads into chunks that keep the scores in cache; with tiny
    chunks (one rectangle per step) the result and gradients are unchanged (the fused C++
    kernel off, as without a compiler)."""
    from mlbtc_search import attention_attend, attention_cpu

    monkeypatch.setenv(attention_cpu.ENV, "0")
    monkeypatch.setattr(attention_attend, "CHUNK_ENTRIES", 16)
    widths, block_sizes, T, dv = (4, 3, 2), (None, 8, 4), 13, 9
    q, k, v = qkv(T, sum(widths), dv, grad=True)
    out = multilevel_attention(q, k, v, widths, block_sizes, True)
    out = out + window_attention(q, k, v, 5)
    ref = dense_multilevel(q, k, v, widths, block_sizes, True) + dense_window(q, k, v, 5, True)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    g = torch.randn_like(out)
    for got, want in zip(
        torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g), strict=True
    ):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)


def dense_mean(q, k, v, widths, block_sizes, causal):
    """The paper's option: each pair's score is the mean over the levels (of nonzero width)
    whose blocks it shares."""
    T = q.shape[2]
    t = torch.arange(T)
    scores = torch.zeros(*q.shape[:2], T, T, dtype=q.dtype)
    shared = torch.zeros(T, T, dtype=q.dtype)
    start = 0
    for w, bs in zip(widths, block_sizes, strict=True):
        b = T if bs is None else bs
        same = (t[:, None] // b == t[None, :] // b).to(q.dtype)
        scores = scores + (q[..., start : start + w] @ k[..., start : start + w].mT) * same
        shared = shared + same * (w > 0)
        start += w
    scores = scores / shared.clamp(min=1)
    if causal:
        scores = scores.masked_fill(t[None, :] > t[:, None], float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("widths, block_sizes, T, dv",
                         [CONFIGS[0], CONFIGS[2], CONFIGS[3], CONFIGS[7], CONFIGS[9],
                          ((8, 4, 4), (None, 64, 16), 100, 16)])
def test_mean_over_shared_levels(widths, block_sizes, T, dv, causal):
    q, k, v = qkv(T, sum(widths), dv, grad=True)
    ref = dense_mean(q, k, v, widths, block_sizes, causal)
    for fn in (multilevel_attention, multilevel_attention_reference):
        out = fn(q, k, v, widths, block_sizes, causal, True)
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
        g = torch.randn_like(out)
        for got, want in zip(torch.autograd.grad(out, (q, k, v), g),
                             torch.autograd.grad(ref, (q, k, v), g, retain_graph=True),
                             strict=True):
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)
    if causal:
        cache = MultilevelKVCache(widths, block_sizes, 2, 3, dv, torch.float64, max_len=T,
                                  mean=True)
        torch.testing.assert_close(decode(cache, q.detach(), k.detach(), v.detach()),
                                   ref.detach(), rtol=1e-10, atol=1e-12)
    # the division is elementwise: the same FLOPs as the sum
    q32, k32, v32 = (x.detach().float() for x in (q, k, v))
    cost = multilevel_attention_cost(T, 3, widths, block_sizes, dv, causal, batch=2)
    assert count_flops(lambda: multilevel_attention(q32, k32, v32, widths, block_sizes, causal,
                                                    True)) == cost.forward


def test_zero_width_level_contributes_nothing():
    q, k, v = qkv(24, 6, 5)
    with_zero = multilevel_attention(q, k, v, [4, 0, 2], [None, 12, 6])
    without = multilevel_attention(q, k, v, [4, 2], [None, 6])
    torch.testing.assert_close(with_zero, without, rtol=1e-12, atol=1e-12)


def test_float32_lm_config_matches_buffer_reference():
    widths, block_sizes = [32, 8, 6, 4, 4, 4, 4, 2], [256, 128, 64, 32, 16, 8, 4, 2]
    q, k, v = qkv(200, 64, 64, dtype=torch.float32, B=1, H=2)
    q = q / 8
    out = multilevel_attention(q, k, v, widths, [None, *block_sizes[1:]])
    ref = multilevel_attention_reference(q, k, v, widths, [None, *block_sizes[1:]])
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("fn", ["multilevel", "window"])
def test_causality(fn):
    T, t0 = 29, 13
    q, k, v = qkv(T, 7, 5)
    run = {
        "multilevel": lambda q, k, v: multilevel_attention(q, k, v, [3, 2, 2], [None, 8, 2]),
        "window": lambda q, k, v: window_attention(q, k, v, 6),
    }[fn]
    out = run(q, k, v)
    q2, k2, v2 = (x.clone() for x in (q, k, v))
    for x in (q2, k2, v2):
        x[:, :, t0 + 1 :] += torch.randn_like(x[:, :, t0 + 1 :])
    out2 = run(q2, k2, v2)
    torch.testing.assert_close(out2[:, :, : t0 + 1], out[:, :, : t0 + 1], rtol=0, atol=0)
    assert not torch.allclose(out2[:, :, t0 + 1 :], out[:, :, t0 + 1 :])


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("widths, block_sizes, T, dv", CONFIGS)
def test_regions_partition_the_allowed_pairs(widths, block_sizes, T, dv, causal):
    """Every (query, key) pair the mask allows lies in exactly one region, scored with the prefix
    of the deepest level whose block the pair shares."""
    count = torch.zeros(T, T, dtype=torch.long)
    prefix = torch.full((T, T), -1)
    for r in plan_regions(T, widths, block_sizes, causal):
        for j in range(r.nblk):
            b = r.base + j * r.stride
            for i in range(r.q_len):
                t = b + r.q_off + i
                keys = range(b + r.k_off, b + r.k_off + (i + 1 if r.causal else r.k_len))
                for s in keys:
                    count[t, s] += 1
                    prefix[t, s] = r.prefix
    t = torch.arange(T)
    allowed = t[None, :] <= t[:, None] if causal else torch.ones(T, T, dtype=torch.bool)
    assert torch.equal(count, allowed.long())
    want = torch.zeros(T, T, dtype=torch.long)
    start = 0
    for w, bs in zip(widths, block_sizes, strict=True):
        start += w
        b = T if bs is None else bs
        want[t[:, None] // b == t[None, :] // b] = start
    assert torch.equal(prefix[allowed], want[allowed])


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("T, window, W, dv", [(24, 6, 5, 5), (23, 5, 4, 7), (9, 16, 6, 3)])
def test_window_matches_dense_reference(T, window, W, dv, causal):
    q, k, v = qkv(T, W, dv, grad=True)
    out = window_attention(q, k, v, window, causal)
    ref = dense_window(q, k, v, window, causal)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    g = torch.randn_like(out)
    for got, want in zip(
        torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g), strict=True
    ):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize(
    "widths, block_sizes", [((4, 3, 2), (None, 8, 4)), ((3, 2), (8, 2)), ((2, 2, 2), (None, 9, 3))]
)
def test_multilevel_kv_cache_reproduces_forward(widths, block_sizes):
    T, dv = 21, 5
    q, k, v = qkv(T, sum(widths), dv)
    full = multilevel_attention(q, k, v, widths, block_sizes)
    cache = MultilevelKVCache(widths, block_sizes, 2, 3, dv, torch.float64, max_len=T)
    torch.testing.assert_close(decode(cache, q, k, v), full, rtol=1e-10, atol=1e-12)


def test_kv_cache_evicts_fine_level_keys():
    widths, block_sizes, dv, T = (4, 2, 2), (None, 8, 4), 8, 19
    q, k, v = qkv(T, 8, dv, B=1, H=2)
    cache = MultilevelKVCache(widths, block_sizes, 1, 2, dv, torch.float64, max_len=T)
    decode(cache, q, k, v)
    # after 19 tokens: global keys 4*19, level-1 keys 2*3 (block 16..18), level-2 keys 2*3 (16..18)
    assert cache.nbytes() == 2 * 8 * (4 * 19 + 2 * 3 + 2 * 3 + dv * 19)
    assert cache.nbytes() < 2 * 8 * (8 + dv) * T  # keeping every key
    assert cache.nbytes() == kv_cache_bytes_per_token(widths, block_sizes, dv, T, 8) * T * 2


def test_kv_cache_bytes_per_token_lm_config():
    widths, block_sizes = [32, 8, 6, 4, 4, 4, 4, 2], [None, 512, 256, 128, 64, 32, 16, 8]
    per_token = kv_cache_bytes_per_token(widths, block_sizes, 64, 1024, dtype_bytes=4)
    assert per_token == (39_376 + 64 * 1024) * 4 / 1024


def test_window_kv_cache_reproduces_forward():
    T, window, W, dv = 17, 5, 4, 3
    q, k, v = qkv(T, W, dv)
    full = window_attention(q, k, v, window)
    cache = WindowKVCache(2, 3, W, dv, window, torch.float64)
    torch.testing.assert_close(decode(cache, q, k, v), full, rtol=1e-10, atol=1e-12)
    assert cache.nbytes() == 2 * 3 * window * (W + dv) * 8


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize(
    "widths, block_sizes, T, dv",
    [*CONFIGS, ((32, 8, 8, 16), (None, 32, 16, 8), 64, 64), ((6,), (None,), 12, 4)],
)
def test_flops_equal_counted(widths, block_sizes, T, dv, causal):
    q, k, v = qkv(T, sum(widths), dv, dtype=torch.float32, grad=True)
    cost = multilevel_attention_cost(T, 3, widths, block_sizes, dv, causal, batch=2)
    assert count_flops(lambda: multilevel_attention(q, k, v, widths, block_sizes, causal)) == (
        cost.forward
    )
    assert multilevel_attention_flops(T, 3, widths, block_sizes, dv, causal, 2) == cost.forward
    both = count_flops(
        lambda: multilevel_attention(q, k, v, widths, block_sizes, causal).sum().backward()
    )
    assert both == cost.total


def test_large_block_ratios_run_few_regions():
    """Global + blocks of 8 at T=1024 is cut by halving: 7 batched rectangles and the diagonal,
    not 127 single rectangles."""
    assert len(plan_regions(1024, [32, 32], [None, 8])) == 8


def test_mlr_flops_lm_config():
    """The LM config at T=1024 scores a pair whose finest shared block is at level l at width
    r_0 + ... + r_l, and every pair's value work at the head size 64 (nothing padded). The
    finest blocks (prefix 64 == head size) run fused and causal: the allowed pairs only."""
    widths, block_sizes = [32, 8, 6, 4, 4, 4, 4, 2], [None, 512, 256, 128, 64, 32, 16, 8]
    prefix = [sum(widths[: l + 1]) for l in range(8)]
    # level l's 2^l blocks of 1024 / 2^l: the later half's queries against the earlier half's keys
    pairs = [2**l * (512 // 2**l) ** 2 for l in range(7)] + [128 * 8 * 9 // 2]
    assert multilevel_attention_flops(1024, 1, widths, block_sizes, 64) == sum(
        2 * n * (p + 64) for n, p in zip(pairs, prefix, strict=True)
    )
    standard = multilevel_attention_cost(1024, 1, [64], [None], 64)
    assert standard.forward == 2 * (1024 * 1025 // 2) * (64 + 64)  # one fused causal call
    assert standard.backward == 2 * (1024 * 1025 // 2) * (3 * 64 + 2 * 64)


def test_unfused_causal_attention_is_cut_into_rectangles():
    """q.k width 32 != value width 64: masked rectangles would run whole on the unfused path,
    so the triangle is cut down to causal blocks of CAUSAL_FINEST_BLOCK (64)."""
    cost = multilevel_attention_cost(1024, 1, [32], [None], 64)
    pairs = sum(2**l * (512 // 2**l) ** 2 for l in range(4)) + 1024 * 64
    assert cost.forward == 2 * pairs * (32 + 64)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("T, window, W, dv", [(24, 6, 5, 5), (23, 5, 4, 7)])
def test_window_flops_equal_counted(T, window, W, dv, causal):
    q, k, v = qkv(T, W, dv, dtype=torch.float32, grad=True)
    cost = window_attention_cost(T, 3, W, dv, window, causal, batch=2)
    assert window_attention_flops(T, 3, W, dv, window, causal, batch=2) == cost.forward
    assert count_flops(lambda: window_attention(q, k, v, window, causal)) == cost.forward
    both = count_flops(lambda: window_attention(q, k, v, window, causal).sum().backward())
    assert both == cost.total


@pytest.mark.parametrize(
    "widths, block_sizes, match",
    [
        ((4, 2), (None,), r"same length >= 1, got 2 widths and 1 block sizes"),
        ((4, -1), (None, 4), r"at widths\[1\]: width must be an int >= 0, got -1"),
        ((4, 2), (8, None), r"at block_sizes\[1\]: a global level \(None\) must come before"),
        ((4, 2), (8, 3), r"at block_sizes\[1\]: levels must be nested: .* previous 8, got 3"),
        ((4, 2), (None, 0), r"at block_sizes\[1\]: block size must be an int >= 1 or None"),
    ],
)
def test_bad_levels_raise(widths, block_sizes, match):
    q, k, v = qkv(8, sum(max(w, 0) for w in widths), 4)
    with pytest.raises(SpecError, match=match):
        multilevel_attention(q, k, v, widths, block_sizes)


def test_width_mismatch_raises():
    q, k, v = qkv(8, 6, 4)
    with pytest.raises(SpecError, match=r"W = sum\(widths\) = 5 features, got 6"):
        multilevel_attention(q, k, v, [3, 2], [None, 4])


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [True, False])
def test_cuda_fallbacks_match_cpu_kernels(causal):
    """With ``backend="regions"`` off CPU, every rectangle of the region kernel and every window
    chunk takes the unfused path; both must agree with the CPU kernels, gradients included."""
    widths, block_sizes = (4, 3, 2), (None, 8, 4)
    inputs = qkv(13, 9, 6)
    results = []
    for device in ("cpu", "cuda"):
        q, k, v = (x.detach().to(device).requires_grad_() for x in inputs)
        out = multilevel_attention(q, k, v, widths, block_sizes, causal, backend="regions")
        out = out + window_attention(q, k, v, 5, causal, backend="regions")
        out.pow(2).sum().backward()
        results.append([x.detach().cpu() for x in (out, q.grad, k.grad, v.grad)])
    for got, want in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-11)

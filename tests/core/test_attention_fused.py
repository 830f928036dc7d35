"""The fused CUDA path (``attention_flex``): FlexAttention per score width, merged by log-sum-exp.

On CPU flex runs eagerly and forward-only, so these tests check its masks, widths and merge
against the region kernel and the dense reference under ``torch.no_grad``; the ``gpu`` tests
check the compiled kernels, gradients included."""

from __future__ import annotations

import pytest
import torch

from mlbtc_search import attention_flex
from mlbtc_search.attention import Attention
from mlbtc_search.attention_flex import (
    ENV_BACKEND,
    FlexLevel,
    flex_levels,
    flex_runs,
    flex_window_runs,
    resolve_backend,
)
from mlbtc_search.attention_kernels import (
    multilevel_attention,
    multilevel_attention_reference,
    window_attention,
)
from mlbtc_search.attention_spec import AttentionSpec
from mlbtc_search.errors import SpecError

# (widths, block_sizes, T, dv): several levels, an implicit global root of width 0, widths 0,
# q.k width above and below dv (bilinear forms, MLR), lengths that are not multiples of the
# blocks nor of flex's 128-row tiles, blocks smaller and larger than a tile.
CONFIGS = [
    ((4, 3, 2), (None, 8, 4), 13, 9),
    ((4, 0, 2), (None, 6, 3), 20, 6),
    ((3, 2), (8, 4), 21, 5),
    ((4, 2, 1, 1), (None, 16, 8, 2), 37, 8),
    ((2, 3), (None, None), 9, 5),  # one global level, W != dv: standard as one region
    ((20,), (None,), 150, 6),  # bilinear BTT-like: q.k width > dv
    ((6, 2, 2, 2), (None, 96, 48, 24), 300, 8),
    ((3, 1, 2), (256, 32, 16), 290, 4),
]


def qkv(T: int, W: int, dv: int, B: int = 2, H: int = 3, dtype=torch.float64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(B, H, T, W, generator=g, dtype=dtype) for _ in range(2))
    return q, k, torch.randn(B, H, T, dv, generator=g, dtype=dtype)


def test_flex_levels_merge_equal_blocks_and_add_the_root():
    assert flex_levels(20, (4, 0, 2), (None, 6, 3)) == (
        FlexLevel(20, 6, 4, 1.0), FlexLevel(6, 3, 4, 1.0), FlexLevel(3, None, 6, 1.0))
    assert flex_levels(21, (3, 2), (8, 4)) == (
        FlexLevel(21, 8, 0, 1.0), FlexLevel(8, 4, 3, 1.0), FlexLevel(4, None, 5, 1.0))
    assert flex_levels(9, (2, 3), (None, 12), mean=True) == (FlexLevel(9, None, 5, 0.5),)


def test_levels_wider_than_flex_takes_run_the_region_kernel():
    assert flex_runs(40, (1000,), (None,))  # one region: one SDPA call at any width
    assert flex_runs(40, (200, 56), (None, 8))  # padded 256
    assert not flex_runs(40, (200, 57), (None, 8))  # padded 512
    q, k, v = qkv(40, 257, 8)
    with torch.no_grad():
        got = multilevel_attention(q, k, v, (200, 57), (None, 8), backend="flex")
        want = multilevel_attention_reference(q, k, v, (200, 57), (None, 8))
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-11)
    assert flex_window_runs(256) and not flex_window_runs(257)
    with torch.no_grad():
        got = window_attention(q, k, v, 7, backend="flex")
    torch.testing.assert_close(got, window_attention(q, k, v, 7), rtol=1e-10, atol=1e-11)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize(("widths", "block_sizes", "T", "dv"), CONFIGS)
def test_flex_equals_region_kernel_and_reference(widths, block_sizes, T, dv, causal):
    q, k, v = qkv(T, sum(widths), dv)
    with torch.no_grad():
        got = multilevel_attention(q, k, v, widths, block_sizes, causal, backend="flex")
        regions = multilevel_attention(q, k, v, widths, block_sizes, causal, backend="regions")
        ref = multilevel_attention_reference(q, k, v, widths, block_sizes, causal)
    torch.testing.assert_close(got, regions, rtol=1e-10, atol=1e-11)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-11)


def test_flex_mean_over_shared_levels_float32():
    widths, block_sizes = (6, 2, 2, 2), (None, 96, 48, 24)
    q, k, v = qkv(300, 12, 8, dtype=torch.float32)
    with torch.no_grad():
        got = multilevel_attention(q, k, v, widths, block_sizes, True, True, backend="flex")
        want = multilevel_attention_reference(q, k, v, widths, block_sizes, True, True)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize(("T", "window", "W", "dv"), [(300, 50, 6, 8), (37, 5, 4, 4),
                                                       (20, 64, 3, 5)])
def test_flex_window_equals_window_kernel(T, window, W, dv, causal):
    q, k, v = qkv(T, W, dv)
    with torch.no_grad():
        got = window_attention(q, k, v, window, causal, backend="flex")
        want = window_attention(q, k, v, window, causal, backend="regions")
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-11)


# Layers through the env var (as benchmarks select it): MLR, standard, windows, bilinear forms,
# heterogeneous head groups with a window group beside a multi-level group.
LAYERS = {
    "mlr": {"kind": "mlr", "heads": 4, "ranks": [4, 2, 1, 1]},
    "bilinear_btt": {"kind": "bilinear_btt", "heads": 4},
    "bilinear_mlr": {"kind": "bilinear_mlr", "heads": 4, "ranks": [4, 2, 1]},
    "sliding_window": {"kind": "sliding_window", "heads": 4, "window": 5},
    "global_window": {"kind": "global_window", "heads": 4, "window": 4, "global_heads": 1},
    "general": {"kind": "general", "groups": [
        {"heads": 1, "levels": [{"block_size": None, "score": {"btt": {"rank": 2}}},
                                {"block_size": 4, "score": {"low_rank": {"rank": 4}}}]},
        {"heads": 3, "levels": [{"block_size": None, "score": {"low_rank": {"rank": 3}}},
                                {"block_size": 8, "score": {"low_rank": {"rank": 2}}},
                                {"block_size": 2, "score": {"low_rank": {"rank": 2}}}]}]},
}


def _layer(name: str, dtype=torch.float64, **extra) -> Attention:
    torch.manual_seed(0)
    attn = Attention(AttentionSpec.from_dict({**LAYERS[name], **extra}, width=32, seq_len=16))
    with torch.no_grad():
        for p in attn.parameters():
            p.normal_(0.0, 0.3)
    return attn.to(dtype)


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_layers_run_the_same_on_both_backends(name, monkeypatch):
    attn = _layer(name)
    x = torch.randn(2, 13, 32, dtype=torch.float64)
    outs = []
    with torch.no_grad():
        for backend in ("regions", "flex"):
            monkeypatch.setenv(ENV_BACKEND, backend)
            outs.append(attn(x))
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-10, atol=1e-11)


def test_backend_selection(monkeypatch):
    x = torch.zeros(1)
    assert resolve_backend(x) == "regions"
    assert resolve_backend(x, "flex") == "flex"
    monkeypatch.setenv(ENV_BACKEND, "flex")
    assert resolve_backend(x) == "flex"
    assert resolve_backend(x, "regions") == "regions"
    with pytest.raises(SpecError, match="backend must be one of auto, regions, flex, got 'x'"):
        resolve_backend(x, "x")
    q, k, v = qkv(20, 6, 4)
    with pytest.raises(SpecError, match="backend 'flex' runs forward-only off CUDA"):
        multilevel_attention(q.requires_grad_(), k, v, (4, 2), (None, 4), backend="flex")
    monkeypatch.setenv(ENV_BACKEND, "cuda")
    with pytest.raises(SpecError, match=f"{ENV_BACKEND} must be one of .* got 'cuda'"):
        resolve_backend(x)


@pytest.mark.slow
def test_compiled_flex_shares_one_graph_across_levels():
    """The function CUDA runs, ``torch.compile(flex_attention)``, compiled here for CPU (forward,
    no LSE: what torch allows on CPU): every level's mask (parameters as captured tensors) reuses
    one graph, and each equals eager flex."""
    from torch._dynamo.utils import counters
    from torch.nn.attention.flex_attention import flex_attention

    torch._dynamo.reset()
    attention_flex._compiled = None
    fn = attention_flex.compiled_flex()
    q, k, v = qkv(200, 16, 16, B=1, H=2, dtype=torch.float32)
    masks = [attention_flex._block_mask("level", 200, lv.size, lv.finer, True, "cpu")
             for lv in flex_levels(200, (8, 4, 4), (None, 96, 24))]
    before = counters["stats"]["unique_graphs"]
    with torch.no_grad():
        got = [fn(q, k, v, block_mask=bm, scale=1.0) for bm in masks]
        assert counters["stats"]["unique_graphs"] - before == 1  # (eager flex compiles too)
        for out, bm in zip(got, masks, strict=True):
            want = flex_attention(q, k, v, block_mask=bm, scale=1.0)
            torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    attention_flex._compiled = None


# ---- CUDA: the compiled kernels, forward and backward -----------------------------------------
def _grads(fn, inputs, device, dtype):
    xs = [x.detach().to(device, dtype).requires_grad_() for x in inputs]
    out = fn(*xs)
    out.float().pow(2).sum().backward()
    return [t.detach().cpu().double() for t in (out, *(x.grad for x in xs))]


# One realistic case (six levels, blocks below flex's 128-row tiles, T not a multiple of them),
# shared by the gpu tests so that they compile few kernels (the device time is short).
GPU_CASE = ((32, 8, 8, 8, 4, 4), (None, 512, 256, 128, 64, 32), 1000, 64)


def _multilevel(backend):
    widths, block_sizes = GPU_CASE[:2]
    return lambda q, k, v: multilevel_attention(q, k, v, widths, block_sizes, True,
                                                backend=backend)


def _gpu_inputs():
    widths, _, T, dv = GPU_CASE
    q, k, v = qkv(T, sum(widths), dv, B=1, H=2, dtype=torch.float32)
    return q / sum(widths) ** 0.5, k, v


@pytest.mark.gpu
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 2e-4), (torch.bfloat16, 5e-2)])
def test_cuda_flex_forward_backward(dtype, tol):
    """Compiled flex on CUDA (output, dQ, dK, dV) against the region kernel in float64."""
    inputs = _gpu_inputs()
    for fn in (_multilevel, lambda b: lambda q, k, v: window_attention(q, k, v, 100, True, b)):
        want = _grads(fn("regions"), inputs, "cpu", torch.float64)
        got = _grads(fn(None), inputs, "cuda", dtype)
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, rtol=tol, atol=tol * w.abs().max().item())


@pytest.mark.gpu
def test_cuda_uses_the_compiled_flex_path_by_default():
    inputs = _gpu_inputs()
    assert resolve_backend(inputs[0].cuda()) == "flex"
    attention_flex._compiled = None
    got = _grads(_multilevel(None), inputs, "cuda", torch.float32)
    assert attention_flex._compiled is not None
    want = _grads(_multilevel("regions"), inputs, "cuda", torch.float32)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=2e-4, atol=2e-4 * w.abs().max().item())


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["general", "global_window", "bilinear_btt"])
def test_cuda_layers_match_cpu_float32(name):
    """Whole layers: heterogeneous groups (multi-level and window), a single-region SDPA call."""
    attn = _layer(name, torch.float32)
    x = torch.randn(2, 16, 32)
    want = _grads(attn, [x], "cpu", torch.float32)
    got = _grads(attn.cuda(), [x], "cuda", torch.float32)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-3, atol=1e-3 * w.abs().max().item())

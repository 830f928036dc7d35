"""The fused C++ CPU kernel (``attention_cpu``): built, exact against the unfused PyTorch path and
dense references, merges and accumulates into strided views, counted FLOPs, and the fallback when
it cannot be built."""

from __future__ import annotations

import pytest
import torch
from test_attention_kernels import CONFIGS, dense_multilevel

from mlbtc_search import attention_cpu
from mlbtc_search.attention_kernels import multilevel_attention, multilevel_attention_cost
from mlbtc_search.flopcount import count_flops

needs_kernel = pytest.mark.usefixtures("attention_kernel")


def _run(widths, block_sizes, T, dv, causal, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = sum(widths)
    q, k = (torch.randn(2, 3, T, W, generator=g, dtype=dtype, requires_grad=True)
            for _ in range(2))
    v = torch.randn(2, 3, T, dv, generator=g, dtype=dtype, requires_grad=True)
    out = multilevel_attention(q, k, v, widths, block_sizes, causal)
    go = torch.randn(out.shape, generator=g, dtype=dtype)
    return (out, *torch.autograd.grad(out, (q, k, v), go)), (q, k, v, go)


@needs_kernel
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("widths, block_sizes, T, dv", CONFIGS)
def test_fused_kernel_equals_unfused_path(widths, block_sizes, T, dv, causal, monkeypatch):
    fused, (q, k, v, go) = _run(widths, block_sizes, T, dv, causal)
    monkeypatch.setenv(attention_cpu.ENV, "0")
    assert not attention_cpu.available()
    unfused, _ = _run(widths, block_sizes, T, dv, causal)
    for a, b in zip(fused, unfused, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    ref = dense_multilevel(q, k, v, widths, block_sizes, causal)
    torch.testing.assert_close(fused[0], ref, rtol=1e-10, atol=1e-10)


@needs_kernel
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("widths, block_sizes, T, dv", CONFIGS + [
    ((20, 17), (None, 4), 22, 33),  # q.k widths over one 16-float vector, with tails
    ((16, 16), (None, 8), 16, 16),  # whole vectors, blocks of 4 x 4 dot products exactly
])
def test_float32_small_rectangles(widths, block_sizes, T, dv, causal):
    """float32 takes the kernel's own small-GEMM code (register blocks of dot products, masked
    loads for widths that are not whole vectors, edge rows and keys): equal to the float64
    dense reference to float32 rounding."""
    fused, (q, k, v, go) = _run(widths, block_sizes, T, dv, causal, torch.float32, seed=3)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = dense_multilevel(q64, k64, v64, widths, block_sizes, causal)
    grads = torch.autograd.grad(ref, (q64, k64, v64), go.double())
    for a, b in zip(fused, (ref, *grads), strict=True):
        torch.testing.assert_close(a.double(), b, rtol=2e-3, atol=2e-4)


@needs_kernel
@pytest.mark.parametrize("causal", [True, False])
def test_long_rectangles_cross_tiles_float32(causal):
    """Rectangles longer than one tile (256 queries x 512 keys), also the first (covering) one
    when not causal: writes, not adds, from its first tile on."""
    widths, sizes, T, dv = (24, 8), (None, 1024), 1300, 40
    fused, (q, k, v, go) = _run(widths, sizes, T, dv, causal, torch.float32)
    ref = dense_multilevel(q, k, v, widths, sizes, causal)
    torch.testing.assert_close(fused[0], ref, rtol=2e-4, atol=2e-5)
    grads = torch.autograd.grad(ref, (q, k, v), go)
    for a, b in zip(fused[1:], grads, strict=True):
        torch.testing.assert_close(a, b, rtol=2e-3, atol=2e-4)


@needs_kernel
def test_merge_and_accumulate_into_strided_views():
    """``first=False`` merges into existing (out, lse) and adds into existing gradients, on
    views with row strides (prefix features of wider tensors)."""
    g = torch.Generator().manual_seed(1)
    B, H, N, L, E, Ev = 2, 2, 3, 9, 5, 7
    wide = torch.randn(B, H, N, L, E + 4, generator=g, dtype=torch.float64)
    q, k = wide[..., :E], torch.randn(B, H, N, L, E + 2, generator=g, dtype=torch.float64)[
        ..., 2:]
    v = torch.randn(B, H, N, L, Ev, generator=g, dtype=torch.float64)
    s = q @ k.transpose(-1, -2) * 0.5
    old_o = torch.randn(B, H, N, L, Ev, generator=g, dtype=torch.float64)
    old_l = torch.randn(B, H, N, L, generator=g, dtype=torch.float64)
    out, lse = old_o.clone(), old_l.clone()
    attention_cpu.attend_merge(q, k, v, out, lse, False, 0.5, False)
    l_r = torch.logsumexp(s, -1)
    new = torch.logaddexp(old_l, l_r)
    want = old_o * (old_l - new).exp()[..., None] + (s - new[..., None]).exp() @ v
    torch.testing.assert_close(lse, new)
    torch.testing.assert_close(out, want)

    go = torch.randn(B, H, N, L, Ev, generator=g, dtype=torch.float64)
    buf = torch.randn(B, H, N, L, E + 3, generator=g, dtype=torch.float64)
    dq, dk, dv = buf[..., :E], torch.randn_like(k), torch.randn_like(v)
    start = (dq.clone(), dk.clone(), dv.clone())
    attention_cpu.attend_backward(go, q, k, v, out, lse, dq, dk, dv, False, 0.5, False)
    p = (s - lse[..., None]).exp()
    ds = p * (go @ v.transpose(-1, -2) - (go * out).sum(-1, keepdim=True)) * 0.5
    torch.testing.assert_close(dq, start[0] + ds @ k)
    torch.testing.assert_close(dk, start[1] + ds.transpose(-1, -2) @ q)
    torch.testing.assert_close(dv, start[2] + p.transpose(-1, -2) @ go)
    torch.testing.assert_close(buf[..., E:], buf[..., E:].clone())  # untouched columns


@needs_kernel
@pytest.mark.parametrize("widths, block_sizes, T, dv", CONFIGS[:6])
def test_counted_flops_equal_the_plan(widths, block_sizes, T, dv):
    W = sum(widths)
    q, k = (torch.randn(1, 2, T, W, requires_grad=True) for _ in range(2))
    v = torch.randn(1, 2, T, dv, requires_grad=True)
    got = count_flops(lambda: multilevel_attention(q, k, v, widths, block_sizes).sum().backward())
    cost = multilevel_attention_cost(T, 2, widths, block_sizes, dv)
    assert got == cost.forward + cost.backward


def test_unbuildable_kernel_warns_once_and_falls_back(tmp_path, monkeypatch):
    broken = tmp_path / "region_attention.cpp"
    broken.write_text("#error this source does not compile\n")
    monkeypatch.setattr(attention_cpu, "SOURCE", broken)
    monkeypatch.setattr(attention_cpu, "_state", {})
    monkeypatch.delenv(attention_cpu.ENV, raising=False)  # (the attempt is what is tested)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    with pytest.warns(RuntimeWarning, match="could not be built"):
        out, (q, k, v, _) = _run((3, 2), (None, 4), 12, 5, True)
    assert attention_cpu._state == {"ok": False}
    torch.testing.assert_close(out[0], dense_multilevel(q, k, v, (3, 2), (None, 4), True))


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_token_major_operands_and_strided_grad_out(dtype):
    """Inside a model q, v and the output's gradient arrive as token-major views (B, T, H, C)
    transposed: the kernel packs q, k, v per head and reads the gradient in place; regions at
    the full width (the finest prefix equals dv here) run torch's flash backward on it."""
    widths, sizes, T, dv = (4, 3, 2), (None, 8, 4), 16, 9
    g = torch.Generator().manual_seed(5)
    q = torch.randn(2, T, 3, 9, generator=g, dtype=dtype).transpose(1, 2).requires_grad_()
    k = torch.randn(2, 3, T, 9, generator=g, dtype=dtype, requires_grad=True)
    v = torch.randn(2, T, 3, dv, generator=g, dtype=dtype).transpose(1, 2).requires_grad_()
    go = torch.randn(2, T, 3, dv, generator=g, dtype=dtype).transpose(1, 2)
    out = multilevel_attention(q, k, v, widths, sizes, True)
    ref = dense_multilevel(q, k, v, widths, sizes, True)
    tol = {"rtol": 1e-10, "atol": 1e-10} if dtype == torch.float64 else \
        {"rtol": 2e-3, "atol": 2e-4}
    for a, b in zip((out, *torch.autograd.grad(out, (q, k, v), go)),
                    (ref, *torch.autograd.grad(ref, (q, k, v), go)), strict=True):
        torch.testing.assert_close(a, b, **tol)

"""Attention kernels over projected q, k, v: multi-level (MLR over the sequence) and window.

The region plan and the exact costs are pure data in ``attention_regions``. Every rectangle of
the plan (and every window chunk) runs as one attention at its own widths (``attention_attend``,
or at unequal widths on CPU the fused C++ kernel of ``attention_cpu``): q.k at the width the
rectangle needs (its prefix r_0 + ... + r_l, or a bilinear form's min-cut width) and ``P V`` at
the value width; nothing is padded, so what runs is what ``attend_cost`` charges. The partial
outputs merge exactly through their log-sum-exps (split-KV flash attention); the backward runs
each rectangle's backward with the *merged* output and log-sum-exp, which gives exactly that
rectangle's share of dQ, dK and dV.

Which path runs when, and why:

- q.k width == value width (standard attention, MLR's deepest regions when the prefix equals the
  head size, windows with W == Dv): torch's fused CPU flash kernel
  (``_scaled_dot_product_flash_attention_for_cpu``), which returns the log-sum-exp and has a
  fused backward. It needs equal head sizes; padding the narrower side with zeros would be exact
  but would execute (and have to charge) work the structure does not need.
- unequal widths (MLR's coarse regions at r_0 + ... + r_l < Dv, bilinear BTT at D > D/H, zero
  widths) on CPU in float32/float64: our fused C++ kernel (``attention_cpu``): flash-style
  tiles, BLAS GEMMs at the rectangle's own widths, online softmax, the log-sum-exp merge in
  place on strided views of ``out``/``lse`` (operands packed per head once per call, then
  read as views: no copy per rectangle), and a backward that writes or
  adds each rectangle's dQ, dK, dV share into the full gradients. One thread, CPU time, 32
  heads of one 512 x 512 rectangle at q.k width 32, values 64: 15 ms forward and 31 ms
  backward, against 28 and 45 ms for the unfused path below.
- the same without the C++ kernel (no compiler, ``MLBTC_CPU_KERNEL=0``, other dtypes, tracing):
  two matmuls around an in-place softmax (max, exp, sum), in chunks of heads whose scores fit
  in cache (``attention_attend.CHUNK_ENTRIES``); the rectangle exists one chunk at a time,
  never T x T. The backward recomputes the scores, as flash does.
- causal masks: a flash call skips masked tiles and is charged the allowed pairs; the C++ and
  unfused paths compute a masked block whole, so their causal blocks are cut down to
  ``CAUSAL_FINEST_BLOCK`` (64) by virtual halving levels: every structure pays about T^2/2.
- on CUDA (by default; ``backend``/``MLBTC_ATTENTION_BACKEND`` select): not this kernel but
  ``attention_flex``, one compiled FlexAttention call per score width with a block mask, merged
  by log-sum-exp (fused Triton kernels, differentiable LSE, so autograd is exact). With
  ``backend="regions"`` off CPU every rectangle here takes the unfused path. The costs in
  ``attention_regions`` are the CPU kernels' exact counts, charged on every device.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from . import attention_cpu
from .attention_attend import _attend, _attend_backward, _one_dtype
from .attention_flex import (
    flex_multilevel_attention,
    flex_runs,
    flex_window_attention,
    flex_window_runs,
    resolve_backend,
)
from .attention_regions import (
    CAUSAL_FINEST_BLOCK,
    KernelCost,
    Region,
    check_levels,
    fused,
    kernel_levels,
    multilevel_attention_cost,
    plain_sdpa,
    plan_regions,
    window_attention_cost,
    window_geometry,
)
from .errors import SpecError

# ----------------------------------------------------------------------------------------------
# Region operands (views of (B, H, T, C) tensors where possible) and the exact merge


def _rows(x: Tensor, r: Region, off: int, length: int) -> Tensor:
    """View of rows ``[off, off + length)`` of every block of ``r`` in ``x`` (B, H, T, ...):
    shape (B, H, nblk, length, ...)."""
    B, H = x.shape[:2]
    span = x[:, :, r.base : r.base + r.nblk * r.stride]
    blocks = span.view(B, H, r.nblk, r.stride, *x.shape[3:])  # (B, H, nblk, stride, ...)
    return blocks[:, :, :, off : off + length]


def _take(x: Tensor, r: Region, off: int, length: int, width: int) -> Tensor:
    """Rows of ``r``'s blocks, features ``[:width]``: (B, H * nblk, length, width), a view when
    the blocks tile the sequence."""
    B, H = x.shape[:2]
    rows = _rows(x, r, off, length)[..., :width]  # (B, H, nblk, length, width)
    return rows.reshape(B, H * r.nblk, length, width)


def _operands(q: Tensor, k: Tensor, v: Tensor, r: Region) -> tuple[Tensor, Tensor, Tensor]:
    """(q_r, k_r, v_r): q and k at the region's prefix width, v at the value width."""
    dv = v.shape[-1]
    return (
        _take(q, r, r.q_off, r.q_len, r.prefix),
        _take(k, r, r.k_off, r.k_len, r.prefix),
        _take(v, r, r.k_off, r.k_len, dv),
    )


def _views(q: Tensor, k: Tensor, v: Tensor, r: Region) -> tuple[Tensor, Tensor, Tensor]:
    """(q_r, k_r, v_r) as (B, H, nblk, rows, width) views (the fused C++ kernel's operands)."""
    return (
        _rows(q, r, r.q_off, r.q_len)[..., : r.prefix],
        _rows(k, r, r.k_off, r.k_len)[..., : r.prefix],
        _rows(v, r, r.k_off, r.k_len),
    )


def _head_major(t: Tensor) -> Tensor:
    """``t`` (B, H, T, C) with each head's rows packed (unit stride on C, rows C apart), for the
    C++ kernel: from a token-major view (the values' rows are a whole fused q|k|v row apart)
    every row of a small region is on its own page. A broadcast head dim (stride 0) stays one."""
    if t.stride(-1) == 1 and (t.shape[-2] == 1 or t.stride(-2) == t.shape[-1]):
        return t
    if t.shape[1] > 1 and t.stride(1) == 0:
        return t[:, :1].contiguous().expand(t.shape)
    return t.contiguous()


def _put(dst: Tensor, src: Tensor, first: bool) -> None:
    """``dst = src`` on the first (covering) pass, else ``dst += src``."""
    if first:
        dst.copy_(src)
    else:
        dst.add_(src)


def merge_into(out: Tensor, lse: Tensor, o_r: Tensor, l_r: Tensor, first: bool) -> None:
    """Merge a partial attention (o_r, l_r) over disjoint keys into (out, lse), in place.

    ``out`` (..., L, Dv) and ``lse`` (..., L) hold the running result; ``first`` initialises them.
    """
    if first:
        out.copy_(o_r)
        lse.copy_(l_r)
        return
    new = torch.logaddexp(lse, l_r)
    out.mul_(torch.exp(lse - new).unsqueeze(-1))
    out.addcmul_(o_r, torch.exp(l_r - new).unsqueeze(-1))
    lse.copy_(new)


class _RegionAttention(torch.autograd.Function):
    """Exact softmax attention as a log-sum-exp merge of per-region attentions.

    The plan lists the deepest level's regions first; they cover every query and every key once
    (at the full width W), so they initialise the accumulators and later regions merge into them.
    """

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, regions: tuple[Region, ...]) -> Tensor:
        B, H, T, _ = q.shape
        dv = v.shape[-1]
        acc = torch.promote_types(q.dtype, torch.float32)
        out = q.new_empty(B, H, T, dv, dtype=acc)
        lse = q.new_empty(B, H, T, dtype=acc)
        native = attention_cpu.usable(q, k, v)
        if native:
            q, k, v = (_head_major(t) for t in (q, k, v))
        for r in regions:
            if native and not fused(r.prefix, dv):  # fused C++ rectangle, merged in place
                attention_cpu.attend_merge(*_views(q, k, v, r), _rows(out, r, r.q_off, r.q_len),
                                           _rows(lse, r, r.q_off, r.q_len), r.causal, r.scale,
                                           r.diagonal)
                continue
            o_r, l_r = _attend(*_operands(q, k, v, r), r.causal, None, r.scale)
            o_r = o_r.reshape(B, H, r.nblk, r.q_len, dv)  # (B, H, nblk, q_len, dv)
            l_r = l_r.reshape(B, H, r.nblk, r.q_len)  # (B, H, nblk, q_len)
            merge_into(_rows(out, r, r.q_off, r.q_len), _rows(lse, r, r.q_off, r.q_len),
                       o_r, l_r, r.diagonal)
        out = out.to(q.dtype)
        ctx.regions = regions
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor):
        q, k, v, out, lse = ctx.saved_tensors
        B, H = q.shape[:2]
        dv = v.shape[-1]
        dq, dk, dvv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        native = attention_cpu.usable(q, k, v)
        grad_out = grad_out.to(q.dtype)
        if not (native and grad_out.stride(-1) == 1):  # the C++ kernel reads views in place
            grad_out = grad_out.contiguous()  # (a copy there cost more than it saved)
        for r in ctx.regions:
            if native and not fused(r.prefix, dv):
                p, rows = r.prefix, _rows
                attention_cpu.attend_backward(
                    rows(grad_out, r, r.q_off, r.q_len), *_views(q, k, v, r),
                    rows(out, r, r.q_off, r.q_len), rows(lse, r, r.q_off, r.q_len),
                    rows(dq, r, r.q_off, r.q_len)[..., :p], rows(dk, r, r.k_off, r.k_len)[..., :p],
                    rows(dvv, r, r.k_off, r.k_len), r.causal, r.scale, r.diagonal)
                continue
            qr, kr, vr = _operands(q, k, v, r)
            go_r = _take(grad_out, r, r.q_off, r.q_len, dv)
            o_r = _take(out, r, r.q_off, r.q_len, dv)
            l_r = _rows(lse, r, r.q_off, r.q_len).reshape(B, H * r.nblk, r.q_len)
            dq_r, dk_r, dv_r = _attend_backward(go_r, qr, kr, vr, o_r, l_r, r.causal, None,
                                                r.scale)
            p = r.prefix
            dq_r = dq_r.reshape(B, H, r.nblk, r.q_len, p)  # (B, H, nblk, q_len, p)
            dk_r = dk_r.reshape(B, H, r.nblk, r.k_len, p)  # (B, H, nblk, k_len, p)
            dv_r = dv_r.reshape(B, H, r.nblk, r.k_len, dv)
            _put(_rows(dq, r, r.q_off, r.q_len)[..., :p], dq_r, r.diagonal)
            _put(_rows(dk, r, r.k_off, r.k_len)[..., :p], dk_r, r.diagonal)
            _put(_rows(dvv, r, r.k_off, r.k_len), dv_r, r.diagonal)
        return dq, dk, dvv, None


class _MaskedAttention(torch.autograd.Function):
    """``_attend`` with an additive mask as one autograd node (the window kernel)."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
        out, lse = _attend(q, k, v, False, mask)
        ctx.save_for_backward(q, k, v, out, lse, mask)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor):
        q, k, v, out, lse, mask = ctx.saved_tensors
        dq, dk, dv = _attend_backward(grad_out.contiguous(), q, k, v, out, lse, False, mask)
        return dq, dk, dv, None


# ----------------------------------------------------------------------------------------------
# Public kernels


def _check_qkv(q: Tensor, k: Tensor, v: Tensor, width: int | None = None) -> None:
    if q.dim() != 4 or k.shape != q.shape or v.dim() != 4 or v.shape[:3] != q.shape[:3]:
        raise SpecError(
            f"q, k must be (B, H, T, W) and v (B, H, T, Dv) with equal B, H, T, got "
            f"q={tuple(q.shape)}, k={tuple(k.shape)}, v={tuple(v.shape)}"
        )
    if width is not None and q.shape[-1] != width:
        raise SpecError(f"q and k must have W = sum(widths) = {width} features, got {q.shape[-1]}")


def multilevel_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    widths: Sequence[int],
    block_sizes: Sequence[int | None],
    causal: bool = True,
    mean: bool = False,
    backend: str | None = None,
) -> Tensor:
    """Multi-level attention: q, k (B, H, T, W), W = sum(widths), v (B, H, T, Dv) -> (B, H, T, Dv).

    Feature slice l of q and k belongs to level l, whose contiguous sequence blocks have size
    ``block_sizes[l]`` (None: one global block); levels are nested. Scales are folded into q.
    T need not be a multiple of the block sizes (the last block is partial); a width may be 0.

    Plain attention (all levels global, W == Dv) is one fused ``F.scaled_dot_product_attention``
    call. Everything else runs, by ``backend`` (``attention_flex.resolve_backend``: on CUDA
    ``flex``, else ``regions``), one compiled FlexAttention call per score width merged by
    log-sum-exp, or the region kernel. ``multilevel_attention_cost`` gives the exact FLOPs of
    the CPU kernels (the analytic plan, charged on every device).
    """
    check_levels(widths, block_sizes)
    _check_qkv(q, k, v, sum(widths))
    T = q.shape[2]
    mean = mean and sum(w > 0 for w in widths) > 1  # one level: the mean is the sum
    if not (not mean and plain_sdpa(T, widths, block_sizes, v.shape[-1])) and \
            resolve_backend(q, backend) == "flex" and flex_runs(T, widths, block_sizes, mean):
        (q, k, v), dtype_guard = _one_dtype(q, k, v)  # flex needs one dtype (autocast mixes)
        with dtype_guard:
            return flex_multilevel_attention(q, k, v, widths, block_sizes, causal, mean)
    widths, block_sizes = kernel_levels(T, widths, block_sizes, causal, v.shape[-1])
    if not mean and plain_sdpa(T, widths, block_sizes, v.shape[-1]):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=1.0)
    (q, k, v), dtype_guard = _one_dtype(q, k, v)
    with dtype_guard:
        return _RegionAttention.apply(q, k, v, plan_regions(T, widths, block_sizes, causal, mean))


def multilevel_attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    widths: Sequence[int],
    block_sizes: Sequence[int | None],
    causal: bool = True,
    mean: bool = False,
) -> Tensor:
    """The same function through one T x T score buffer: global matmul, ``+=`` on the diagonal
    blocks of each level, mask, softmax, ``@ v``. Simple and slower: for tests, as a fallback."""
    check_levels(widths, block_sizes)
    _check_qkv(q, k, v, sum(widths))
    B, H, T, _ = q.shape
    scores = q.new_zeros(B, H, T, T)
    start = 0
    for w, bs in zip(widths, block_sizes, strict=True):
        ql, kl = q[..., start : start + w], k[..., start : start + w]
        start += w
        if w == 0:
            continue
        b = T if bs is None else min(bs, T)
        nb, rem = divmod(T, b)
        sB, sH, sT, _ = scores.stride()
        diag = scores.as_strided((B, H, nb, b, b), (sB, sH, b * (sT + 1), sT, 1))  # (B,H,nb,b,b)
        qb = ql[:, :, : nb * b].reshape(B, H, nb, b, w)  # (B, H, nb, b, w)
        kb = kl[:, :, : nb * b].reshape(B, H, nb, b, w)
        diag += qb @ kb.transpose(-1, -2)
        if rem:
            tail = slice(nb * b, T)
            scores[:, :, tail, tail] += ql[:, :, tail] @ kl[:, :, tail].transpose(-1, -2)
    if mean:  # divide by the number of shared levels of nonzero width
        t = torch.arange(T, device=q.device)
        shared = sum(((t[:, None] // (T if bs is None else bs)) == (t[None, :] // (
            T if bs is None else bs))).to(q.dtype) for w, bs in zip(widths, block_sizes,
                                                                    strict=True) if w > 0)
        scores = scores / torch.clamp(shared, min=1)
    if causal:
        mask = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def _window_mask(T: int, nc: int, window: int, kw: int, causal: bool, like: Tensor) -> Tensor:
    """Additive mask (1, nc, window, kw): 0 where query ``c*window + i`` may see key
    ``(c - 1)*window + j``, else -inf. Padded queries (>= T) see every real key in reach."""
    t = torch.arange(nc * window, device=like.device).view(nc, window, 1)  # (nc, w, 1)
    c = torch.arange(nc, device=like.device).view(nc, 1, 1)
    p = (c - 1) * window + torch.arange(kw, device=like.device).view(1, 1, kw)  # (nc, 1, kw)
    real = (p >= 0) & (p < T)
    band = (p > t - window) & ((p <= t) if causal else (p < t + window))
    ok = real & (band | (t >= T))
    mask = torch.zeros(nc, window, kw, dtype=like.dtype, device=like.device)
    return mask.masked_fill_(~ok, float("-inf")).unsqueeze(0)


def window_attention(
    q: Tensor, k: Tensor, v: Tensor, window: int, causal: bool = True, backend: str | None = None
) -> Tensor:
    """Sliding-window attention: query t sees keys t - window < t' <= t (|t - t'| < window if not
    causal). q, k (B, H, T, W), v (B, H, T, Dv) -> (B, H, T, Dv); the scale is folded into q.

    Queries run in chunks of ``window`` rows, each against the ``2 * window`` keys around it
    (``3 * window`` if not causal) with an additive band mask, as one ``_attend`` call at widths
    W (scores) and Dv (values). With the ``flex`` backend (default on CUDA): one FlexAttention
    call with a band block mask.
    """
    _check_qkv(q, k, v)
    if not isinstance(window, int) or window < 1:
        raise SpecError(f"window must be an int >= 1, got {window!r}", ("window",))
    B, H, T, W = q.shape
    dv = v.shape[-1]
    window = min(window, T)  # a longer window sees the same keys
    if resolve_backend(q, backend) == "flex" and flex_window_runs(W):
        (q, k, v), dtype_guard = _one_dtype(q, k, v)  # flex needs one dtype (autocast mixes)
        with dtype_guard:
            return flex_window_attention(q, k, v, window, causal)
    nc, kw = window_geometry(T, window, causal)
    pad_t = nc * window - T
    after = pad_t + (0 if causal else window)
    qp = F.pad(q, (0, 0, 0, pad_t))  # (B, H, nc*w, W)
    kp = F.pad(k, (0, 0, window, after))  # (B, H, w + nc*w [+ w], W)
    vp = F.pad(v, (0, 0, window, after))
    qc = qp.reshape(B * H, nc, window, W)  # (B*H, nc, w, W)
    kc = kp.unfold(2, kw, window).transpose(-1, -2).reshape(B * H, nc, kw, W)  # (B*H, nc, kw, W)
    vc = vp.unfold(2, kw, window).transpose(-1, -2).reshape(B * H, nc, kw, dv)
    mask = _window_mask(T, nc, window, kw, causal, q)
    (qc, kc, vc, mask), dtype_guard = _one_dtype(qc, kc, vc, mask)
    with dtype_guard:
        out = _MaskedAttention.apply(qc, kc, vc, mask)  # (B*H, nc, w, dv)
    return out.reshape(B, H, nc * window, dv)[:, :, :T]  # (B, H, T, dv)


def multilevel_attention_flops(
    T: int, heads: int, widths: Sequence[int], block_sizes: Sequence[int | None], dv: int,
    causal: bool = True, batch: int = 1,
) -> int:
    """Forward FLOPs of ``multilevel_attention`` (``multilevel_attention_cost``: both passes)."""
    return multilevel_attention_cost(T, heads, widths, block_sizes, dv, causal, batch).forward


def window_attention_flops(
    T: int, heads: int, width: int, dv: int, window: int, causal: bool = True, batch: int = 1
) -> int:
    """Forward FLOPs of ``window_attention`` (``window_attention_cost`` has both passes)."""
    return window_attention_cost(T, heads, width, dv, window, causal, batch).forward


__all__ = [
    "CAUSAL_FINEST_BLOCK",
    "KernelCost",
    "Region",
    "check_levels",
    "merge_into",
    "multilevel_attention",
    "multilevel_attention_cost",
    "multilevel_attention_flops",
    "multilevel_attention_reference",
    "plan_regions",
    "window_attention",
    "window_attention_cost",
    "window_attention_flops",
]

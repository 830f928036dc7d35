"""One attention at its own widths: the primitive every rectangle and window chunk runs.

``_attend`` gives (out, lse) of q against k at q.k width E and values at width Ev;
``_attend_backward`` gives dQ, dK, dV from the (merged) output and log-sum-exp of the query rows,
which is exactly that attention's share when it is one part of a log-sum-exp merge. Equal widths
run torch's fused CPU flash kernel; unequal ones two matmuls around an in-place softmax in
chunks that keep the scores in cache (``attention_kernels`` documents which path runs when; the
fused C++ kernel for unequal widths is ``attention_cpu``). ``_one_dtype`` prepares operands for
an autograd Function under autocast.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from .attention_regions import fused

_flash_fwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


# ----------------------------------------------------------------------------------------------
# One attention at its own widths: (o, lse) forward and the backward from (merged) o, lse


def _fused(q: Tensor, v: Tensor) -> bool:
    """The fused CPU flash kernel runs when q.k and value widths are equal (and nonzero)."""
    return q.device.type == "cpu" and fused(q.shape[-1], v.shape[-1])


# Entries of one score chunk of the unfused path: 256K floats (1 MiB in fp32) stay in cache;
# one 512 x 512 rectangle per step ran 1.9x faster than all 32 heads at once (2 threads).
CHUNK_ENTRIES = 1 << 18


def _chunks(x: Tensor, lk: int) -> range:
    """Steps over dim 0 of x (N, M, Lq, E) so that one step's scores hold ~CHUNK_ENTRIES."""
    per = max(1, x.shape[1] * x.shape[2] * lk)
    return range(0, x.shape[0], max(1, CHUNK_ENTRIES // per))


def _scores(q: Tensor, k: Tensor, causal: bool, mask: Tensor | None, scale: float) -> Tensor:
    s = q @ k.transpose(-1, -2)  # (n, M, Lq, Lk)
    if scale != 1.0:
        s.mul_(scale)
    if mask is not None:
        s.add_(mask)
    if causal:
        Lq, Lk = s.shape[-2:]
        upper = torch.ones(Lq, Lk, dtype=torch.bool, device=s.device).triu(1)
        s.masked_fill_(upper, float("-inf"))
    return s


def _attend(
    q: Tensor, k: Tensor, v: Tensor, causal: bool, mask: Tensor | None = None, scale: float = 1.0
) -> tuple[Tensor, Tensor]:
    """q, k (N, M, Lq|Lk, E), v (N, M, Lk, Ev) -> (out (N, M, Lq, Ev), lse (N, M, Lq)); scale 1.

    ``mask``: additive, broadcast over N. Fused flash kernel or, chunked over N, two matmuls
    around an in-place softmax (no autograd runs inside).
    """
    if _fused(q, v):
        return _flash_fwd(q, k, v, 0.0, causal, attn_mask=mask, scale=scale)
    N, M, Lq, _ = q.shape
    out = q.new_empty(N, M, Lq, v.shape[-1])
    lse = q.new_empty(N, M, Lq)
    step = _chunks(q, k.shape[2]).step
    for i in range(0, N, step):
        c = slice(i, i + step)
        s = _scores(q[c], k[c], causal, mask, scale)  # (n, M, Lq, Lk)
        m = s.amax(-1, keepdim=True).clamp_(min=torch.finfo(s.dtype).min)
        p = s.sub_(m).exp_()
        total = p.sum(-1, keepdim=True)
        out[c] = (p @ v[c]).div_(total)  # (no out=: torch.export traces this with grad on)
        lse[c] = (m + total.log()).squeeze(-1)
    return out, lse


def _attend_backward(
    go: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, causal: bool,
    mask: Tensor | None = None, scale: float = 1.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """dQ, dK, dV of ``_attend`` given the (merged) output and log-sum-exp of the query rows."""
    if _fused(q, v):
        return _flash_bwd(go, q, k, v, out, lse, 0.0, causal, attn_mask=mask, scale=scale)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    delta = (go * out).sum(-1, keepdim=True)  # (N, M, Lq, 1)
    lse = lse.to(q.dtype).unsqueeze(-1)
    step = _chunks(q, k.shape[2]).step
    for i in range(0, q.shape[0], step):
        c = slice(i, i + step)
        p = _scores(q[c], k[c], causal, mask, scale).sub_(lse[c]).exp_()  # (n, M, Lq, Lk)
        torch.matmul(p.transpose(-1, -2), go[c], out=dv[c])
        ds = (go[c] @ v[c].transpose(-1, -2)).sub_(delta[c]).mul_(p)  # dS (n, M, Lq, Lk)
        if scale != 1.0:
            ds.mul_(scale)
        torch.matmul(ds, k[c], out=dq[c])
        torch.matmul(ds.transpose(-1, -2), q[c], out=dk[c])
    return dq, dk, dv


def _one_dtype(*ts: Tensor) -> tuple[tuple[Tensor, ...], contextlib.AbstractContextManager]:
    """Operands of one dtype and a context that turns autocast off around a kernel's autograd
    Function: autocast would mix dtypes in its forward and never reaches its backward. Under
    autocast the operands take the autocast dtype (bf16 on CUDA), else q's (a no-op in fp32).
    The casts run outside the Function, so autograd casts the gradients back."""
    dev = ts[0].device.type
    on = torch.is_autocast_enabled(dev)
    dtype = torch.get_autocast_dtype(dev) if on else ts[0].dtype
    guard = torch.autocast(dev, enabled=False) if on else contextlib.nullcontext()
    return tuple(t.to(dtype) for t in ts), guard

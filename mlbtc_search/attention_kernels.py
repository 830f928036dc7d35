"""Attention kernels over projected q, k, v: multi-level (MLR over the sequence) and window.

Multi-level score, per head (the logit scales are folded into q by the caller)::

    S[t, t'] = sum_l 1[t // bs_l == t' // bs_l] * q_t[slice_l] . k_t'[slice_l]

With nested levels every (query, key) pair belongs to exactly one *region*, the deepest level l
whose block the two share, and its score is one dot product over the *prefix* features of levels
0..l. The kernel therefore never builds a T x T score tensor: ``plan_regions`` cuts the attention
pattern into batched rectangles (for causal attention: inside each level-l block, the later
level-(l+1) sub-blocks' queries against the earlier sub-blocks' keys, unmasked; and causal
attention inside the finest blocks), each rectangle runs as one fused CPU flash-attention call that
also returns its log-sum-exp, and the partial outputs merge exactly through their log-sum-exps
(split-KV flash attention). The backward runs the fused backward kernel per rectangle with the
*merged* output and log-sum-exp, which gives exactly that rectangle's share of dQ, dK and dV.

The CPU flash kernel needs equal head sizes for q, k and v, so each rectangle pads the narrower of
(prefix features, value features) with zeros; FLOPs count what executes (``flopcount``), padding
included, and ``multilevel_attention_flops`` reproduces that count exactly from the same plan.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import SpecError
from .flopcount import sdpa_forward_flops

_flash_fwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


# ----------------------------------------------------------------------------------------------
# Levels and the region plan (pure data)


def check_levels(widths: Sequence[int], block_sizes: Sequence[int | None]) -> None:
    """Raise ``SpecError`` unless the levels are nested: widths >= 0, block sizes None first, then
    positive and non-increasing, each dividing the previous one."""
    if len(widths) != len(block_sizes) or not widths:
        raise SpecError(
            f"widths and block_sizes must have the same length >= 1, got {len(widths)} widths "
            f"and {len(block_sizes)} block sizes"
        )
    for l, w in enumerate(widths):
        if not isinstance(w, int) or w < 0:
            raise SpecError(f"width must be an int >= 0, got {w!r}", ("widths", l))
    prev: int | None = None
    for l, bs in enumerate(block_sizes):
        if bs is None:
            if prev is not None:
                raise SpecError(
                    f"a global level (None) must come before every blocked level, got None after "
                    f"block size {prev}",
                    ("block_sizes", l),
                )
            continue
        if not isinstance(bs, int) or bs < 1:
            raise SpecError(
                f"block size must be an int >= 1 or None, got {bs!r}", ("block_sizes", l)
            )
        if prev is not None and prev % bs != 0:
            raise SpecError(
                f"levels must be nested: block size must divide the previous {prev}, got {bs}",
                ("block_sizes", l),
            )
        prev = bs


@dataclass(frozen=True)
class Region:
    """One batched rectangle of (query, key) pairs, scored over the first ``prefix`` features.

    Blocks ``j = 0..nblk-1`` start at ``base + j * stride``; inside each, the queries are rows
    ``[q_off, q_off + q_len)`` and the keys rows ``[k_off, k_off + k_len)``. ``causal`` (only with
    equal query and key rows) masks key row > query row.
    """

    base: int
    stride: int
    nblk: int
    q_off: int
    q_len: int
    k_off: int
    k_len: int
    prefix: int
    causal: bool

    @property
    def diagonal(self) -> bool:
        """A deepest-level region: whole blocks against themselves."""
        return self.q_len == self.k_len == self.stride and self.q_off == self.k_off == 0


def _block_regions(
    base: int, n: int, nblk: int, sub: int | None, prefix: int, causal: bool
) -> list[Region]:
    """Regions of ``nblk`` blocks of length ``n`` for one level: pairs in different sub-blocks of
    size ``sub`` (``None``: the deepest level, so all in-block pairs)."""
    if nblk == 0 or n == 0:
        return []
    if sub is None:
        return [Region(base, n, nblk, 0, n, 0, n, prefix, causal)]
    out = []
    for start in range(0, n, sub):
        rows = min(sub, n - start)
        if start > 0:  # keys of the earlier sub-blocks
            out.append(Region(base, n, nblk, start, rows, 0, start, prefix, False))
        if not causal and start + rows < n:  # keys of the later sub-blocks
            out.append(
                Region(base, n, nblk, start, rows, start + rows, n - start - rows, prefix, False)
            )
    return out


def _chain(b: int, sub: int, T: int) -> list[int]:
    """Block sizes strictly between ``b`` and ``sub`` that keep the levels nested and cut the
    step from ``b`` to ``sub`` into ratios of small primes (2 where possible), so that a level
    costs a few batched regions instead of ``b / sub - 1`` single ones."""
    chain = []
    if b >= T:  # one block holding everything: powers of two times sub
        c = sub * 2
        while c < T:
            chain.append(c)
            c *= 2
        return chain[::-1]
    m, c, p = b // sub, b, 2
    while m > 1:
        while m % p:
            p += 1
        m //= p
        c //= p
        if m > 1:
            chain.append(c)
    return chain


def plan_regions(
    T: int, widths: Sequence[int], block_sizes: Sequence[int | None], causal: bool = True
) -> tuple[Region, ...]:
    """The rectangles that ``multilevel_attention`` runs for sequence length ``T``, deepest first.

    A level whose block is ``None`` or at least ``T`` is global. If the coarsest level is blocked,
    an implicit global level of width 0 is prepended (pairs in no common block score 0, they are
    not masked). Between two levels, virtual levels with the coarser prefix halve the blocks
    (``_chain``). Every (query, key) pair that the mask allows lies in exactly one region.
    """
    check_levels(widths, block_sizes)
    given = [T if bs is None else min(bs, T) for bs in block_sizes]
    prefixes = [sum(widths[: l + 1]) for l in range(len(widths))]
    if given[0] < T:
        given, prefixes = [T, *given], [0, *prefixes]
    sizes, prefix = [given[0]], [prefixes[0]]
    for l in range(1, len(given)):
        if given[l] < sizes[-1]:
            virtual = _chain(sizes[-1], given[l], T)
            sizes += [*virtual, given[l]]
            prefix += [prefix[-1]] * len(virtual) + [prefixes[l]]
        else:  # same blocks as the level above: its features join the same region
            prefix[-1] = prefixes[l]
    regions: list[Region] = []
    for l in reversed(range(len(sizes))):
        b = sizes[l]
        sub = sizes[l + 1] if l + 1 < len(sizes) else None
        nb, rem = divmod(T, b)
        regions += _block_regions(0, b, nb, sub, prefix[l], causal)
        regions += _block_regions(nb * b, rem, 1, sub, prefix[l], causal)
    return tuple(regions)


CAUSAL_FINEST_BLOCK = 16


def kernel_levels(
    T: int, widths: Sequence[int], block_sizes: Sequence[int | None], causal: bool
) -> tuple[tuple[int, ...], tuple[int | None, ...]]:
    """The levels the kernel runs: for causal attention whose finest block is longer than
    ``CAUSAL_FINEST_BLOCK``, a zero-width level of that block size is appended.

    That splits the masked triangle into unmasked rectangles (virtual halving levels) plus small
    causal blocks, so every causal variant, standard attention included, executes and is charged
    about T^2/2 score work instead of T^2 for one fused causal call: FLOPs stay comparable
    across structures, and they are what runs. Values are unchanged (width 0 adds no score).
    """
    finest = min(T if bs is None else min(bs, T) for bs in block_sizes)
    if causal and finest > CAUSAL_FINEST_BLOCK:
        return (*widths, 0), (*block_sizes, CAUSAL_FINEST_BLOCK)
    return tuple(widths), tuple(block_sizes)


def _plain_sdpa(T: int, widths: Sequence[int], block_sizes: Sequence[int | None], dv: int) -> bool:
    """True when every level is global and q, k, v have one head size: one fused SDPA call.

    (With unequal head sizes torch's CPU SDPA falls back to its unfused math path, about 4x
    slower; the region kernel runs it as one padded fused call instead.)
    """
    return sum(widths) == dv and all(bs is None or bs >= T for bs in block_sizes)


def multilevel_attention_flops(
    T: int,
    heads: int,
    widths: Sequence[int],
    block_sizes: Sequence[int | None],
    dv: int,
    causal: bool = True,
    batch: int = 1,
) -> int:
    """Forward FLOPs of ``multilevel_attention`` exactly as ``flopcount.count_flops`` measures them
    (backward is twice this)."""
    widths, block_sizes = kernel_levels(T, widths, block_sizes, causal)
    if _plain_sdpa(T, widths, block_sizes, dv):
        return sdpa_forward_flops(
            (batch, heads, T, dv), (batch, heads, T, dv), (batch, heads, T, dv)
        )
    total = 0
    for r in plan_regions(T, widths, block_sizes, causal):
        e = max(r.prefix, dv)
        bh = (batch, heads * r.nblk)
        total += sdpa_forward_flops((*bh, r.q_len, e), (*bh, r.k_len, e), (*bh, r.k_len, e))
    return total


# ----------------------------------------------------------------------------------------------
# Region operands (views of (B, H, T, C) tensors where possible) and the exact merge


def _rows(x: Tensor, r: Region, off: int, length: int) -> Tensor:
    """View of rows ``[off, off + length)`` of every block of ``r`` in ``x`` (B, H, T, ...):
    shape (B, H, nblk, length, ...)."""
    B, H = x.shape[:2]
    span = x[:, :, r.base : r.base + r.nblk * r.stride]
    blocks = span.view(B, H, r.nblk, r.stride, *x.shape[3:])  # (B, H, nblk, stride, ...)
    return blocks[:, :, :, off : off + length]


def _take(x: Tensor, r: Region, off: int, length: int, width: int, e: int, zero: bool) -> Tensor:
    """Rows of ``r``'s blocks as (B, H * nblk, length, e), features ``[:width]`` from ``x``.

    Features ``[width:e]`` are zeros if ``zero``; otherwise they may be ``x``'s own features, so
    that the result is a view (no copy) when the blocks tile the sequence. A key may carry extra
    features because its query's are zero there; their gradients are discarded.
    """
    B, H = x.shape[:2]
    rows = _rows(x, r, off, length)  # (B, H, nblk, length, C)
    if x.shape[-1] >= e and (width == e or not zero):
        return rows[..., :e].reshape(B, H * r.nblk, length, e)  # a view if blocks tile T
    out = x.new_empty(B, H, r.nblk, length, e)
    out[..., :width] = rows[..., :width]
    out[..., width:].zero_()
    return out.view(B, H * r.nblk, length, e)  # (B, H * nblk, length, e)


def _operands(q: Tensor, k: Tensor, v: Tensor, r: Region) -> tuple[Tensor, Tensor, Tensor, int]:
    """(q_r, k_r, v_r, e): the region's fused-attention operands, all with head size e."""
    dv = v.shape[-1]
    e = max(r.prefix, dv)
    qr = _take(q, r, r.q_off, r.q_len, r.prefix, e, zero=True)
    kr = _take(k, r, r.k_off, r.k_len, r.prefix, e, zero=False)
    vr = _take(v, r, r.k_off, r.k_len, dv, e, zero=True)
    return qr, kr, vr, e


def _put(dst: Tensor, src: Tensor, first: bool) -> None:
    """``dst = src`` on the first (covering) pass, else ``dst += src``."""
    if first:
        dst.copy_(src)
    else:
        dst.add_(src)


class _RegionAttention(torch.autograd.Function):
    """Exact softmax attention as a log-sum-exp merge of fused per-region attentions.

    The plan lists the deepest level's regions first; they cover every query and every key once,
    so they initialise the accumulators and the later regions merge into them.
    """

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, regions: tuple[Region, ...]) -> Tensor:
        B, H, T, _ = q.shape
        dv = v.shape[-1]
        acc = torch.promote_types(q.dtype, torch.float32)
        out = q.new_empty(B, H, T, dv, dtype=acc)
        lse = q.new_empty(B, H, T, dtype=acc)
        for r in regions:
            qr, kr, vr, _ = _operands(q, k, v, r)
            o_r, l_r = _flash_fwd(qr, kr, vr, 0.0, r.causal, scale=1.0)
            o_r = o_r[..., :dv].reshape(B, H, r.nblk, r.q_len, dv)  # (B, H, nblk, q_len, dv)
            l_r = l_r.reshape(B, H, r.nblk, r.q_len)  # (B, H, nblk, q_len)
            o_view, l_view = _rows(out, r, r.q_off, r.q_len), _rows(lse, r, r.q_off, r.q_len)
            if r.diagonal:
                o_view.copy_(o_r)
                l_view.copy_(l_r)
                continue
            new = torch.logaddexp(l_view, l_r)
            o_view.mul_(torch.exp(l_view - new).unsqueeze(-1))
            o_view.addcmul_(o_r, torch.exp(l_r - new).unsqueeze(-1))
            l_view.copy_(new)
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
        grad_out = grad_out.to(q.dtype)
        for r in ctx.regions:
            qr, kr, vr, e = _operands(q, k, v, r)
            go_r = _take(grad_out, r, r.q_off, r.q_len, dv, e, zero=True)
            o_r = _take(out, r, r.q_off, r.q_len, dv, e, zero=True)
            l_r = _rows(lse, r, r.q_off, r.q_len).reshape(B, H * r.nblk, r.q_len)
            dq_r, dk_r, dv_r = _flash_bwd(go_r, qr, kr, vr, o_r, l_r, 0.0, r.causal, scale=1.0)
            p = r.prefix
            dq_r = dq_r.reshape(B, H, r.nblk, r.q_len, e)  # (B, H, nblk, q_len, e)
            dk_r = dk_r.reshape(B, H, r.nblk, r.k_len, e)  # (B, H, nblk, k_len, e)
            dv_r = dv_r.reshape(B, H, r.nblk, r.k_len, e)
            _put(_rows(dq, r, r.q_off, r.q_len)[..., :p], dq_r[..., :p], r.diagonal)
            _put(_rows(dk, r, r.k_off, r.k_len)[..., :p], dk_r[..., :p], r.diagonal)
            _put(_rows(dvv, r, r.k_off, r.k_len), dv_r[..., :dv], r.diagonal)
        return dq, dk, dvv, None


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
) -> Tensor:
    """Multi-level attention: q, k (B, H, T, W), W = sum(widths), v (B, H, T, Dv) -> (B, H, T, Dv).

    Feature slice l of q and k belongs to level l, whose contiguous sequence blocks have size
    ``block_sizes[l]`` (None: one global block); levels are nested. Scales are folded into q.
    T need not be a multiple of the block sizes (the last block is partial); a width may be 0.

    Plain non-causal attention (all levels global, W == Dv) is one fused
    ``F.scaled_dot_product_attention`` call. Everything else, causal attention included (see
    ``kernel_levels``), runs the region kernel on CPU and the one-buffer reference on other
    devices (``multilevel_attention_flops`` describes the CPU kernels).
    """
    check_levels(widths, block_sizes)
    _check_qkv(q, k, v, sum(widths))
    T = q.shape[2]
    widths, block_sizes = kernel_levels(T, widths, block_sizes, causal)
    if _plain_sdpa(T, widths, block_sizes, v.shape[-1]):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=1.0)
    if q.device.type != "cpu":  # the region kernel uses the CPU fused op
        return multilevel_attention_reference(q, k, v, widths, block_sizes, causal)
    k, v = k.to(q.dtype), v.to(q.dtype)  # one dtype for the fused op (autocast mixes them)
    return _RegionAttention.apply(q, k, v, plan_regions(T, widths, block_sizes, causal))


def multilevel_attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    widths: Sequence[int],
    block_sizes: Sequence[int | None],
    causal: bool = True,
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


def _window_geometry(T: int, window: int, causal: bool) -> tuple[int, int]:
    """(number of query chunks of size ``window``, keys per chunk)."""
    return -(-T // window), (2 if causal else 3) * window


def window_attention(q: Tensor, k: Tensor, v: Tensor, window: int, causal: bool = True) -> Tensor:
    """Sliding-window attention: query t sees keys t - window < t' <= t (|t - t'| < window if not
    causal). q, k (B, H, T, W), v (B, H, T, Dv) -> (B, H, T, Dv); the scale is folded into q.

    Queries run in chunks of ``window`` rows, each against the ``2 * window`` keys around it
    (``3 * window`` if not causal) with an additive band mask, as one fused call.
    """
    _check_qkv(q, k, v)
    if not isinstance(window, int) or window < 1:
        raise SpecError(f"window must be an int >= 1, got {window!r}", ("window",))
    B, H, T, W = q.shape
    dv = v.shape[-1]
    nc, kw = _window_geometry(T, window, causal)
    e = max(W, dv)
    pad_t = nc * window - T
    after = pad_t + (0 if causal else window)
    qp = F.pad(q, (0, e - W, 0, pad_t))  # (B, H, nc*w, e)
    kp = F.pad(k, (0, e - W, window, after))  # (B, H, w + nc*w [+ w], e)
    vp = F.pad(v, (0, e - dv, window, after))
    qc = qp.reshape(B * H, nc, window, e)  # (B*H, nc, w, e)
    kc = kp.unfold(2, kw, window).transpose(-1, -2).reshape(B * H, nc, kw, e)  # (B*H, nc, kw, e)
    vc = vp.unfold(2, kw, window).transpose(-1, -2).reshape(B * H, nc, kw, e)
    mask = _window_mask(T, nc, window, kw, causal, q)
    out = F.scaled_dot_product_attention(qc, kc, vc, attn_mask=mask, scale=1.0)  # CPU: fused
    return out.reshape(B, H, nc * window, e)[:, :, :T, :dv]  # (B, H, T, dv)


def window_attention_flops(
    T: int, heads: int, width: int, dv: int, window: int, causal: bool = True, batch: int = 1
) -> int:
    """Forward FLOPs of ``window_attention`` exactly as ``flopcount.count_flops`` measures them."""
    nc, kw = _window_geometry(T, window, causal)
    e = max(width, dv)
    bh = (batch * heads, nc)
    return sdpa_forward_flops((*bh, window, e), (*bh, kw, e), (*bh, kw, e))


__all__ = [
    "Region",
    "check_levels",
    "multilevel_attention",
    "multilevel_attention_flops",
    "multilevel_attention_reference",
    "plan_regions",
    "window_attention",
    "window_attention_flops",
]

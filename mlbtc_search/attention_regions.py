"""The region plan of the attention kernels and their exact costs: pure data, no torch.

Multi-level score, per head (the logit scales are folded into q by the caller)::

    S[t, t'] = sum_l 1[t // bs_l == t' // bs_l] * q_t[slice_l] . k_t'[slice_l]

With nested levels every (query, key) pair belongs to exactly one *region*, the deepest level l
whose block the two share, and its score is one dot product over the *prefix* features of levels
0..l (width r_0 + ... + r_l). ``plan_regions`` cuts the attention pattern into batched rectangles
(for causal attention: inside each level-l block, the later level-(l+1) sub-blocks' queries
against the earlier sub-blocks' keys, unmasked; and causal attention inside the finest blocks).
``attention_kernels`` runs each rectangle at its own q.k width and the value width; the costs
here count exactly the matmuls that run (``attend_cost``), which is what ``flopcount`` measures.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .errors import SpecError


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
    scale: float = 1.0  # multiplies the scores (``shared_level_scales``)

    @property
    def diagonal(self) -> bool:
        """A deepest-level region: whole blocks against themselves."""
        return self.q_len == self.k_len == self.stride and self.q_off == self.k_off == 0


def _block_regions(
    base: int, n: int, nblk: int, sub: int | None, prefix: int, causal: bool, scale: float
) -> list[Region]:
    """Regions of ``nblk`` blocks of length ``n`` for one level: pairs in different sub-blocks of
    size ``sub`` (``None``: the deepest level, so all in-block pairs)."""
    if nblk == 0 or n == 0:
        return []
    if sub is None:
        return [Region(base, n, nblk, 0, n, 0, n, prefix, causal, scale)]
    out = []
    for start in range(0, n, sub):
        rows = min(sub, n - start)
        if start > 0:  # keys of the earlier sub-blocks
            out.append(Region(base, n, nblk, start, rows, 0, start, prefix, False, scale))
        if not causal and start + rows < n:  # keys of the later sub-blocks
            out.append(
                Region(base, n, nblk, start, rows, start + rows, n - start - rows, prefix, False,
                       scale)
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


def shared_level_scales(widths: Sequence[int]) -> list[float]:
    """For ``mean_over_shared_levels``: 1 / (levels of nonzero width among 0..l), per level l.

    A pair whose finest shared block is at level l scores the mean, not the sum, of the shared
    levels' dot products (the paper's "divide by the number of shared levels")."""
    out, n = [], 0
    for w in widths:
        n += w > 0
        out.append(1.0 / max(n, 1))
    return out


def plan_regions(
    T: int, widths: Sequence[int], block_sizes: Sequence[int | None], causal: bool = True,
    mean: bool = False,
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
    scales = shared_level_scales(widths) if mean else [1.0] * len(widths)
    if given[0] < T:
        given, prefixes, scales = [T, *given], [0, *prefixes], [1.0, *scales]
    sizes, prefix, scale = [given[0]], [prefixes[0]], [scales[0]]
    for l in range(1, len(given)):
        if given[l] < sizes[-1]:
            virtual = _chain(sizes[-1], given[l], T)
            sizes += [*virtual, given[l]]
            prefix += [prefix[-1]] * len(virtual) + [prefixes[l]]
            scale += [scale[-1]] * len(virtual) + [scales[l]]
        else:  # same blocks as the level above: its features join the same region
            prefix[-1], scale[-1] = prefixes[l], scales[l]
    regions: list[Region] = []
    for l in reversed(range(len(sizes))):
        b = sizes[l]
        sub = sizes[l + 1] if l + 1 < len(sizes) else None
        nb, rem = divmod(T, b)
        regions += _block_regions(0, b, nb, sub, prefix[l], causal, scale[l])
        regions += _block_regions(nb * b, rem, 1, sub, prefix[l], causal, scale[l])
    return tuple(regions)


CAUSAL_FINEST_BLOCK = 64


def fused(e: int, ev: int) -> bool:
    """Whether an attention with q.k width ``e`` and value width ``ev`` runs the fused CPU flash
    kernel (equal, nonzero widths) or the unfused two-matmul path."""
    return e == ev > 0


def kernel_levels(
    T: int, widths: Sequence[int], block_sizes: Sequence[int | None], causal: bool, dv: int
) -> tuple[tuple[int, ...], tuple[int | None, ...]]:
    """The levels the kernel runs. For causal attention whose finest blocks are longer than
    ``CAUSAL_FINEST_BLOCK`` and scored at a width other than ``dv`` (the unfused path, which
    computes a masked rectangle whole), a zero-width level of that block size is appended.

    That splits the masked triangles into unmasked rectangles (virtual halving levels) plus small
    causal blocks, so the unfused path executes (and is charged) about T^2/2 pairs instead of
    T^2. The fused path skips masked tiles itself and is charged the pairs the mask allows.
    Values are unchanged (width 0 adds no score).
    """
    finest = min(T if bs is None else min(bs, T) for bs in block_sizes)
    if causal and finest > CAUSAL_FINEST_BLOCK and not fused(sum(widths), dv):
        return (*widths, 0), (*block_sizes, CAUSAL_FINEST_BLOCK)
    return tuple(widths), tuple(block_sizes)


# ----------------------------------------------------------------------------------------------
# Exact costs (torch.utils.flop_counter's convention: 2 x multiply-accumulates)


@dataclass(frozen=True)
class KernelCost:
    """FLOPs of one kernel call: forward, and backward (what ``.backward()`` runs)."""

    forward: int
    backward: int

    def __add__(self, other: KernelCost) -> KernelCost:
        return KernelCost(self.forward + other.forward, self.backward + other.backward)

    @property
    def total(self) -> int:
        return self.forward + self.backward


ZERO = KernelCost(0, 0)


def causal_pairs(lq: int, lk: int) -> int:
    """(query, key) pairs a causal mask allows: query i sees keys 0..i (top-left aligned)."""
    if lq <= lk:
        return lq * (lq + 1) // 2
    return lk * (lk + 1) // 2 + (lq - lk) * lk


def attend_cost(n: int, lq: int, lk: int, e: int, ev: int, causal: bool = False) -> KernelCost:
    """``n`` attentions of ``lq`` queries against ``lk`` keys, q.k width ``e``, value width ``ev``.

    Per (query, key) pair: forward, the score (``2 e``) and ``P V`` (``2 ev``); backward, the
    score recomputed (e), dP and dV (ev each), dQ and dK (e each), as torch's
    ``sdpa_backward_flop_count``. The fused kernel (``fused(e, ev)``) under a causal mask is
    charged the pairs the mask allows (``causal_pairs``; it skips masked tiles, computing whole
    tiles of 32 to 256 queries on the diagonal); the unfused path computes and is charged the
    whole rectangle.
    """
    pairs = n * (causal_pairs(lq, lk) if causal and fused(e, ev) else lq * lk)
    return KernelCost(2 * pairs * (e + ev), 2 * pairs * (3 * e + 2 * ev))


def plain_sdpa(T: int, widths: Sequence[int], block_sizes: Sequence[int | None], dv: int) -> bool:
    """True when every level is global and q, k, v have one head size: one fused SDPA call."""
    return sum(widths) == dv and all(bs is None or bs >= T for bs in block_sizes)


def multilevel_attention_cost(
    T: int,
    heads: int,
    widths: Sequence[int],
    block_sizes: Sequence[int | None],
    dv: int,
    causal: bool = True,
    batch: int = 1,
) -> KernelCost:
    """FLOPs of ``multilevel_attention`` exactly as ``flopcount.count_flops`` measures them."""
    widths, block_sizes = kernel_levels(T, widths, block_sizes, causal, dv)
    if plain_sdpa(T, widths, block_sizes, dv):
        return attend_cost(batch * heads, T, T, dv, dv, causal)
    total = ZERO
    for r in plan_regions(T, widths, block_sizes, causal):
        total += attend_cost(batch * heads * r.nblk, r.q_len, r.k_len, r.prefix, dv, r.causal)
    return total


def window_geometry(T: int, window: int, causal: bool) -> tuple[int, int]:
    """(number of query chunks of size ``window``, keys per chunk)."""
    return -(-T // window), (2 if causal else 3) * window


def window_attention_cost(
    T: int, heads: int, width: int, dv: int, window: int, causal: bool = True, batch: int = 1
) -> KernelCost:
    """FLOPs of ``window_attention`` exactly as ``flopcount.count_flops`` measures them."""
    window = min(window, T)
    nc, kw = window_geometry(T, window, causal)
    return attend_cost(batch * heads * nc, window, kw, width, dv)


__all__ = [
    "CAUSAL_FINEST_BLOCK",
    "KernelCost",
    "Region",
    "attend_cost",
    "causal_pairs",
    "check_levels",
    "fused",
    "kernel_levels",
    "multilevel_attention_cost",
    "plan_regions",
    "plain_sdpa",
    "shared_level_scales",
    "window_attention_cost",
    "window_geometry",
]

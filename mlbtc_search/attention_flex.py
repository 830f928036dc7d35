"""The fused CUDA path of the attention kernels: FlexAttention, one call per score width.

Multi-level attention (MLR over the sequence, bilinear forms, standard attention with a q.k
width other than the value width) scores a (query, key) pair over the prefix features of its
deepest shared level l (width r_0 + ... + r_l, ``attention_regions``). Here each level l is one
``flex_attention`` call on q[..., :prefix_l], k[..., :prefix_l] and all of v, with a block mask
that keeps exactly the pairs whose deepest shared block is at level l (same level-l block,
different level-(l+1) blocks; causal if asked). Each call returns its output and log-sum-exp;
the outputs merge exactly by log-sum-exp. Sliding windows are one call with a band mask. A
single region (one global level at q.k width != value width: bilinear BTT, standard attention
at its own widths) is one SDPA call (on CUDA the memory-efficient kernel: unequal and wide
widths allowed, fused backward). Levels wider than ``MAX_WIDTH`` after padding go to the region
kernel.

Which path runs when, and why (``backend``; the env var ``MLBTC_ATTENTION_BACKEND`` overrides
the default, for tests and benchmarks only):

- ``auto`` (default): ``flex`` on CUDA, ``regions`` elsewhere. On CUDA ``flex_attention`` is
  compiled (``torch.compile``; one graph per shape: the mask parameters are captured tensors, so
  every level of one padded width reuses it), generating a fused Triton kernel
  that never holds a T x T buffer, skips tiles the block mask empties and differentiates through
  both its output and its log-sum-exp, so autograd gives the exact backward of the merge. The
  region kernel (``attention_kernels``) would run its rectangles unfused on CUDA.
- ``flex`` off CUDA: eager ``flex_attention``, forward only (``SpecError`` when an input
  requires grad) and materializing the scores; it exists so that CPU tests check
  the exact masks, widths and merge that CUDA runs.
- ``regions``: the region kernel of ``attention_kernels`` on any device.

What runs on CUDA vs what is charged: the FLOPs of a model are the analytic plan's
(``attention_regions``: each rectangle at its own widths, exact for the CPU kernels). The flex
kernel works on tiles (128 x 128 by default): a tile that the mask leaves empty is skipped, a
partly masked one is computed whole, so per level it executes the tiles touching that level's
pairs (at least the charged pairs; more where blocks are smaller than a tile), and Triton may
round head sizes up to a power of two. Score widths are zero-padded here to a power of two of at
least ``MIN_WIDTH`` (exact; Triton's smallest head size, a zero-width root level needs it, and
levels of one padded width share one compiled kernel); values narrower than ``MIN_WIDTH`` too.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor

from .attention_regions import shared_level_scales
from .errors import SpecError

BACKENDS = ("auto", "regions", "flex")
ENV_BACKEND = "MLBTC_ATTENTION_BACKEND"
MIN_WIDTH = 16  # Triton's smallest head size; narrower q.k features are zero-padded
MAX_WIDTH = 256  # the widest padded q.k width given to flex (its kernels' shared-memory tiles)


def resolve_backend(x: Tensor, backend: str | None = None) -> str:
    """``regions`` or ``flex`` for tensors like ``x``: ``backend``, else the env var, else auto."""
    name = backend if backend is not None else os.environ.get(ENV_BACKEND, "auto")
    if name not in BACKENDS:
        where = "backend" if backend is not None else ENV_BACKEND
        raise SpecError(f"{where} must be one of {', '.join(BACKENDS)}, got {name!r}")
    if name == "auto":
        return "flex" if x.device.type == "cuda" else "regions"
    return name


@dataclass(frozen=True)
class FlexLevel:
    """One flex call: pairs in one block of ``size`` but not one of ``finer`` (None: deepest),
    scored over the first ``prefix`` features times ``scale``."""

    size: int
    finer: int | None
    prefix: int
    scale: float


def flex_levels(
    T: int, widths: Sequence[int], block_sizes: Sequence[int | None], mean: bool = False
) -> tuple[FlexLevel, ...]:
    """The calls for checked levels at length ``T``, coarsest first. A blocked coarsest level
    gets an implicit global root of width 0; levels with equal blocks share one call."""
    sizes = [T if bs is None else min(bs, T) for bs in block_sizes]
    prefixes = [sum(widths[: l + 1]) for l in range(len(widths))]
    scales = shared_level_scales(widths) if mean else [1.0] * len(widths)
    if sizes[0] < T:
        sizes, prefixes, scales = [T, *sizes], [0, *prefixes], [1.0, *scales]
    merged: list[list] = []
    for s, p, c in zip(sizes, prefixes, scales, strict=True):
        if merged and merged[-1][0] == s:
            merged[-1][1:] = [p, c]
        else:
            merged.append([s, p, c])
    return tuple(
        FlexLevel(s, merged[i + 1][0] if i + 1 < len(merged) else None, p, c)
        for i, (s, p, c) in enumerate(merged)
    )


def _padded(e: int) -> int:
    """The q.k width a flex call runs: at least ``MIN_WIDTH``, rounded up to a power of two
    (Triton rounds to one anyway; equal widths share one compiled kernel)."""
    return max(MIN_WIDTH, 1 << max(0, e - 1).bit_length())


def _level_mask(p: Tensor) -> Callable:
    """Pairs in one block of ``p[0]`` rows, in different blocks of ``p[1]`` unless ``p[2] == 0``,
    key <= query if ``p[3]``. Parameters are a tensor (captured buffer), so every level runs one
    compiled graph per width instead of one per block size."""

    def mask_mod(b, h, q, kv):
        same = (q // p[0]) == (kv // p[0])
        apart = ((q // p[1]) != (kv // p[1])) | (p[2] == 0)
        return same & apart & ((kv <= q) | (p[3] == 0))

    return mask_mod


def _window_mask(p: Tensor) -> Callable:
    """|query - key| < ``p[0]``, key <= query if ``p[1]``."""

    def mask_mod(b, h, q, kv):
        return (q - kv < p[0]) & (kv - q < p[0]) & ((kv <= q) | (p[1] == 0))

    return mask_mod


@lru_cache(maxsize=256)
def _block_mask(kind: str, T: int, a: int, b: int | None, causal: bool, device: str):
    """The cached BlockMask of one level (``a`` = block size, ``b`` = finer block size or None)
    or of a window (``a`` = window)."""
    from torch.nn.attention.flex_attention import create_block_mask

    if kind == "level":
        p = torch.tensor([a, b or 1, b is not None, causal], device=device)
        mod = _level_mask(p)
    else:
        mod = _window_mask(torch.tensor([a, causal], device=device))
    return create_block_mask(mod, None, None, T, T, device=device)


_compiled: Callable | None = None


def compiled_flex() -> Callable:
    """``torch.compile(flex_attention)``, built once. Each distinct shape compiles its own graph,
    so the recompile limit is raised to at least 64."""
    global _compiled
    if _compiled is None:
        from torch.nn.attention.flex_attention import flex_attention

        cfg = torch._dynamo.config
        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(cfg, name):
                setattr(cfg, name, max(getattr(cfg, name), 64))
        _compiled = torch.compile(flex_attention, dynamic=False)
    return _compiled


def _flex(q: Tensor, k: Tensor, v: Tensor, block_mask, scale: float) -> tuple[Tensor, Tensor]:
    """(out (B, H, T, Dv'), lse (B, H, T)) of one masked flex call; q, k zero-padded to
    ``_padded`` features (exact: zeros add nothing to q.k)."""
    from torch.nn.attention import flex_attention as fa

    e = _padded(q.shape[-1])
    if e != q.shape[-1]:
        q, k = F.pad(q, (0, e - q.shape[-1])), F.pad(k, (0, e - k.shape[-1]))
    aux = fa.AuxRequest(lse=True)
    if q.device.type == "cuda":
        out, lse = compiled_flex()(q, k, v, block_mask=block_mask, scale=scale, return_aux=aux)
        return out, lse.lse
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        raise SpecError(f"backend 'flex' runs forward-only off CUDA (here {q.device.type}): use "
                        "torch.no_grad() or backend 'regions'")
    with warnings.catch_warnings():  # eager on purpose (tests): no "use torch.compile" warning
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        out, lse = fa.flex_attention(q, k, v, block_mask=block_mask, scale=scale, return_aux=aux)
    return out, lse.lse


def _pad_values(v: Tensor) -> Tensor:
    """v with at least ``MIN_WIDTH`` features (zeros; the extra output columns are dropped)."""
    return F.pad(v, (0, MIN_WIDTH - v.shape[-1])) if v.shape[-1] < MIN_WIDTH else v


def flex_runs(
    T: int, widths: Sequence[int], block_sizes: Sequence[int | None], mean: bool = False
) -> bool:
    """Whether the flex backend takes these levels: one region (one SDPA call) or every level's
    padded q.k width at most ``MAX_WIDTH``; else the region kernel runs them."""
    levels = flex_levels(T, widths, block_sizes, mean)
    return len(levels) == 1 or all(_padded(lv.prefix) <= MAX_WIDTH for lv in levels)


def flex_window_runs(width: int) -> bool:
    """Whether the flex backend takes a window group of q.k ``width`` (padded <= ``MAX_WIDTH``)."""
    return _padded(width) <= MAX_WIDTH


def flex_multilevel_attention(
    q: Tensor, k: Tensor, v: Tensor, widths: Sequence[int], block_sizes: Sequence[int | None],
    causal: bool = True, mean: bool = False,
) -> Tensor:
    """``multilevel_attention`` as flex calls merged by log-sum-exp (checked, ``flex_runs``).

    One region (a single global level, q.k width != value width: standard attention at its own
    widths, bilinear forms) is one ``F.scaled_dot_product_attention`` call: on CUDA the
    memory-efficient kernel takes unequal (and wide) q.k and value widths, fused, with its own
    backward."""
    T, dv = q.shape[2], v.shape[-1]
    levels = flex_levels(T, widths, block_sizes, mean)
    if len(levels) == 1:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=levels[0].scale)
    device = str(q.device)
    vp = _pad_values(v)
    outs, lses = [], []
    for lv in levels:
        bm = _block_mask("level", T, lv.size, lv.finer, causal, device)
        o, lse = _flex(q[..., : lv.prefix], k[..., : lv.prefix], vp, bm, lv.scale)
        outs.append(o[..., :dv])
        lses.append(lse)
    acc = torch.promote_types(q.dtype, torch.float32)
    lse = torch.stack(lses).to(acc)  # (levels, B, H, T)
    weights = torch.exp(lse - torch.logsumexp(lse, dim=0)).unsqueeze(-1)  # (levels, B, H, T, 1)
    out = sum(w * o.to(acc) for w, o in zip(weights, outs, strict=True))
    return out.to(q.dtype)


def flex_window_attention(q: Tensor, k: Tensor, v: Tensor, window: int, causal: bool) -> Tensor:
    """``window_attention`` as one flex call with a band mask (checked inputs, window <= T)."""
    bm = _block_mask("window", q.shape[2], window, None, causal, str(q.device))
    return _flex(q, k, _pad_values(v), bm, 1.0)[0][..., : v.shape[-1]]


__all__ = [
    "BACKENDS",
    "ENV_BACKEND",
    "FlexLevel",
    "MIN_WIDTH",
    "MAX_WIDTH",
    "compiled_flex",
    "flex_levels",
    "flex_runs",
    "flex_multilevel_attention",
    "flex_window_attention",
    "flex_window_runs",
    "resolve_backend",
]

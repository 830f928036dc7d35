"""Exact FLOP counting: torch's FlopCounterMode plus formulas for the ops it misses on CPU.

The convention is torch.utils.flop_counter's: FLOPs = 2 x multiply-accumulates of matmul, bmm and
fused attention, nothing for elementwise ops, softmax or norms. Backward is counted when
``.backward()`` runs inside the counted function.

torch 2.13 counts the CPU fused attention ``aten._scaled_dot_product_flash_attention_for_cpu``
(what ``F.scaled_dot_product_attention`` runs on CPU) and its backward as 0 FLOPs (pytorch#195460).
``count_flops`` registers the formulas torch uses for the other SDPA variants for them: forward
``2*B*H*Tq*Tk*(E + Ev)`` and backward ``2*B*H*Tq*Tk*(3*E + 2*Ev)`` (the scores are recomputed,
then dP, dV, dQ and dK), as ``torch.utils.flop_counter.sdpa_backward_flop_count``. One
deviation: with ``is_causal`` the CPU kernel skips the masked tiles, so it is charged the
(query, key) pairs the mask allows, not the whole square (torch's own formulas for the CUDA ops
charge the square).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode, baddbmm_flop

from .attention_regions import causal_pairs

aten = torch.ops.aten

Shape = tuple[int, ...]


def sdpa_forward_flops(query_shape: Shape, key_shape: Shape, value_shape: Shape) -> int:
    """FLOPs of one fused attention forward, ``Q K^T`` plus ``P V``, as torch's sdpa_flop_count.

    Shapes are ``(B, H, Tq, E)``, ``(B, H, Tk, E)`` and ``(B, H, Tk, Ev)`` (key/value heads may be
    fewer than query heads: grouped-query attention broadcasts them).
    """
    b, h, tq, e = query_shape
    tk = key_shape[-2]
    ev = value_shape[-1]
    return 2 * b * h * tq * tk * e + 2 * b * h * tq * tk * ev


def sdpa_backward_flops(query_shape: Shape, key_shape: Shape, value_shape: Shape) -> int:
    """FLOPs of one fused attention backward: the scores recomputed (E), dP and dV (Ev each), dQ
    and dK (E each), as torch's ``sdpa_backward_flop_count``."""
    b, h, tq, e = query_shape
    tk = key_shape[-2]
    ev = value_shape[-1]
    return 2 * b * h * tq * tk * (3 * e + 2 * ev)


def _causal_share(query: Shape, key: Shape, is_causal: bool) -> tuple[int, int]:
    """(allowed pairs, all pairs) per head for the CPU kernel's top-left causal mask."""
    lq, lk = query[-2], key[-2]
    return (causal_pairs(lq, lk) if is_causal else lq * lk), lq * lk


def _cpu_flash_forward(query, key, value, dropout_p=0.0, is_causal=False, *args,
                       out_shape=None, **kwargs) -> int:
    allowed, every = _causal_share(query, key, is_causal)
    return sdpa_forward_flops(query, key, value) // every * allowed


def _cpu_flash_backward(grad_out, query, key, value, out, logsumexp, dropout_p=0.0,
                        is_causal=False, *args, out_shape=None, **kwargs) -> int:
    allowed, every = _causal_share(query, key, is_causal)
    return sdpa_backward_flops(query, key, value) // every * allowed


# Ops that torch 2.13 runs but counts as 0; shape-only formulas, as torch's own registry holds.
def _baddbmm_inplace(self_shape, a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    return baddbmm_flop(self_shape, a_shape, b_shape)


CUSTOM_FLOP_FORMULAS: dict[Any, Callable[..., int]] = {
    aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash_forward,
    aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_flash_backward,
    aten.baddbmm_: _baddbmm_inplace,  # torch counts baddbmm but not its in-place form
}


def flop_counter() -> FlopCounterMode:
    """A ``FlopCounterMode`` (no display) that also counts the ops in ``CUSTOM_FLOP_FORMULAS``.

    Use it as a context manager when per-module or per-op counts are needed::

        with flop_counter() as counter:
            model(x).sum().backward()
        counter.get_flop_counts()["Global"]
    """
    from . import attention_cpu, linear_cpu  # the fused C++ kernels' ops (when they are built)

    custom = {**CUSTOM_FLOP_FORMULAS, **attention_cpu.flop_formulas(),
              **linear_cpu.flop_formulas()}
    return FlopCounterMode(display=False, custom_mapping=custom)


def count_flops(fn: Callable[[], Any]) -> int:
    """Total FLOPs of running ``fn()`` (forward, plus backward if ``fn`` calls ``.backward()``)."""
    with flop_counter() as counter:
        fn()
    return int(counter.get_total_flops())

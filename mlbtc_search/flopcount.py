"""Exact FLOP counting: torch's FlopCounterMode plus formulas for the ops it misses on CPU.

The convention is torch.utils.flop_counter's: FLOPs = 2 x multiply-accumulates of matmul, bmm and
fused attention, nothing for elementwise ops, softmax or norms, no discount for causal masks (the
counter charges what the kernel is asked to compute). Backward is counted when ``.backward()`` runs
inside the counted function.

torch 2.13 counts the CPU fused attention ``aten._scaled_dot_product_flash_attention_for_cpu``
(what ``F.scaled_dot_product_attention`` runs on CPU) and its backward as 0 FLOPs (pytorch#195460).
``count_flops`` registers the formulas torch uses for the other SDPA variants for them: forward
``2*B*H*Tq*Tk*E + 2*B*H*Tq*Tk*Ev`` and backward twice that.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

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
    """FLOPs of one fused attention backward: the scores recomputed, dP, dV, dQ and dK.

    Equals twice the forward, as torch's ``sdpa_backward_flop_count``.
    """
    b, h, tq, e = query_shape
    tk = key_shape[-2]
    ev = value_shape[-1]
    return 2 * b * h * tq * tk * (e + ev + ev + e)


def _cpu_flash_forward(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_forward_flops(query, key, value)


def _cpu_flash_backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flops(query, key, value)


# Ops that torch 2.13 runs but counts as 0; shape-only formulas, as torch's own registry holds.
CUSTOM_FLOP_FORMULAS: dict[Any, Callable[..., int]] = {
    aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash_forward,
    aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_flash_backward,
}


def flop_counter() -> FlopCounterMode:
    """A ``FlopCounterMode`` (no display) that also counts the ops in ``CUSTOM_FLOP_FORMULAS``.

    Use it as a context manager when per-module or per-op counts are needed::

        with flop_counter() as counter:
            model(x).sum().backward()
        counter.get_flop_counts()["Global"]
    """
    return FlopCounterMode(display=False, custom_mapping=CUSTOM_FLOP_FORMULAS)


def count_flops(fn: Callable[[], Any]) -> int:
    """Total FLOPs of running ``fn()`` (forward, plus backward if ``fn`` calls ``.backward()``)."""
    with flop_counter() as counter:
        fn()
    return int(counter.get_total_flops())

"""count_flops: torch's convention, plus the CPU fused attention that torch 2.13 counts as 0."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from mlbtc_search.flopcount import count_flops, flop_counter, sdpa_forward_flops

B, H, T = 2, 3, 16


def test_matmul_is_two_flops_per_mac():
    a, b = torch.randn(5, 7), torch.randn(7, 11)
    assert count_flops(lambda: a @ b) == 2 * 5 * 7 * 11


@pytest.mark.parametrize("causal", [True, False])
def test_cpu_sdpa_forward_and_backward(causal):
    """E == Ev runs ``_scaled_dot_product_flash_attention_for_cpu``; with a causal mask it skips
    the masked tiles and is charged the T (T + 1) / 2 allowed pairs."""
    E = Ev = 8
    q, k, v = (torch.randn(B, H, T, E, requires_grad=True) for _ in range(3))
    pairs = B * H * (T * (T + 1) // 2 if causal else T * T)
    forward = 2 * pairs * (E + Ev)
    assert count_flops(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal)) == (
        forward
    )
    both = count_flops(
        lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal).sum().backward()
    )
    backward = 2 * pairs * (3 * E + 2 * Ev)  # torch's sdpa_backward_flop_count
    assert both == forward + backward


def test_torch_alone_misses_cpu_sdpa():
    """Why the custom formulas exist; if torch starts counting the op, this test says so."""
    q, k, v = (torch.randn(B, H, T, 8) for _ in range(3))
    with FlopCounterMode(display=False) as counter:
        F.scaled_dot_product_attention(q, k, v)
    assert counter.get_total_flops() == 0


def test_math_sdpa_with_unequal_head_sizes_uses_the_same_formula():
    """E != Ev falls back to the math path, counted through its bmm calls."""
    E, Ev = 6, 10
    q, k = torch.randn(B, H, T, E), torch.randn(B, H, T, E)
    v = torch.randn(B, H, T, Ev)
    assert count_flops(lambda: F.scaled_dot_product_attention(q, k, v)) == sdpa_forward_flops(
        (B, H, T, E), (B, H, T, E), (B, H, T, Ev)
    )


def test_flop_counter_reports_per_op():
    q, k, v = (torch.randn(B, H, T, 4) for _ in range(3))
    with flop_counter() as counter:
        F.scaled_dot_product_attention(q, k, v)
    counts = counter.get_flop_counts()["Global"]
    op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    assert counts[op] == 2 * B * H * T * T * (4 + 4)

"""Speed of the attention kernels, forward + backward, relative to fused SDPA in the same run.

    python benchmarks/bench_attention.py [--T 1024] [--batch 4] [--heads 8] [--repeats 7]
                                         [--threads N] [--skip-naive]

Default problem: T=1024, batch 4, 8 heads of 64, fp32, CPU, causal. MLR uses 8 levels with block
sizes T, T/2, ..., T/128 and widths 32, 8, 6, 4, 4, 4, 4, 2. Times are medians over repeats after
a warmup; the fast variants take turns within each repeat, the slow ones (one T x T buffer,
manual attention, the paper's one-T x T-per-level approach) run fewer repeats afterwards.
"fwd GFLOP" is the forward count as torch.utils.flop_counter (with the CPU SDPA formula) has it.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from mlbtc_search.attention_kernels import (
    multilevel_attention,
    multilevel_attention_flops,
    multilevel_attention_reference,
    window_attention,
    window_attention_flops,
)

WIDTHS = [32, 8, 6, 4, 4, 4, 4, 2]


def naive_multilevel(q, k, v, widths, block_sizes):
    """The paper's implementation: per level, blockwise products written into a zero T x T tensor
    (L of them, each kept for the backward), summed, then mask, softmax, @ v."""
    B, H, T, _ = q.shape
    scores, start = [], 0
    for w, bs in zip(widths, block_sizes, strict=True):
        nb = T // bs
        ql = q[..., start : start + w].reshape(B, H, nb, bs, w).permute(2, 0, 1, 3, 4)
        kl = k[..., start : start + w].reshape(B, H, nb, bs, w).permute(2, 0, 1, 3, 4)
        blocks = ql @ kl.transpose(-1, -2)  # (nb, B, H, bs, bs)
        full = q.new_zeros(B, H, T, T)
        sB, sH, sT, _ = full.stride()
        diag = full.as_strided((nb, B, H, bs, bs), (bs * (sT + 1), sB, sH, sT, 1))
        diag.copy_(blocks)  # one strided write of all diagonal blocks
        scores.append(full)
        start += w
    s = torch.stack(scores).sum(0)
    mask = torch.ones(T, T, dtype=torch.bool).tril()
    return torch.softmax(s.masked_fill(~mask, float("-inf")), dim=-1) @ v


def manual_attention(q, k, v):
    """Plain matmul, mask, softmax, matmul."""
    T = q.shape[2]
    mask = torch.ones(T, T, dtype=torch.bool).tril()
    s = (q @ k.transpose(-1, -2)).masked_fill(~mask, float("-inf"))
    return torch.softmax(s, dim=-1) @ v


def fwd_bwd_seconds(fn: Callable, inputs) -> float:
    """Seconds of one fn(*inputs).sum().backward()."""
    for x in inputs:
        x.grad = None
    start = time.perf_counter()
    fn(*inputs).sum().backward()
    return time.perf_counter() - start


def median_ms(fns: list[Callable], inputs, repeats: int) -> list[float]:
    """Median milliseconds of each fn, forward + backward, after one warmup each. The functions
    take turns in every repeat, so that load from other processes hits them alike."""
    times: list[list[float]] = [[] for _ in fns]
    for i in range(1 + repeats):
        for fn, ts in zip(fns, times, strict=True):
            t = fwd_bwd_seconds(fn, inputs)
            if i > 0:
                ts.append(t)
    return [1e3 * statistics.median(ts) for ts in times]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--T", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--window", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    parser.add_argument("--skip-naive", action="store_true", help="skip the slowest variant")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    T, B, H, d = args.T, args.batch, args.heads, 64
    block_sizes = [T >> l for l in range(len(WIDTHS))]
    mlr_levels = [None, *block_sizes[1:]]
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, H, T, d, requires_grad=True) for _ in range(3))
    dense = ([d] + [0] * 7, mlr_levels)  # standard attention cut into MLR regions
    w = args.window

    def flops(widths, levels):
        return multilevel_attention_flops(T, H, widths, levels, d, batch=B)

    def sdpa(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    def mlr(q, k, v):
        return multilevel_attention(q, k, v, WIDTHS, mlr_levels)

    def dense_mlr(q, k, v):
        return multilevel_attention(q, k, v, *dense)

    def window(q, k, v):
        return window_attention(q, k, v, w)

    def buffer(q, k, v):
        return multilevel_attention_reference(q, k, v, WIDTHS, mlr_levels)

    def naive(q, k, v):
        return naive_multilevel(q, k, v, WIDTHS, block_sizes)

    fast = [  # (name, fn, forward FLOPs)
        ("SDPA causal (fused)", sdpa, flops([d], [None])),
        ("MLR 8 levels (regions)", mlr, flops(WIDTHS, mlr_levels)),
        ("dense via MLR regions", dense_mlr, flops(*dense)),
        (f"window w={w}", window, window_attention_flops(T, H, d, d, w, batch=B)),
    ]
    slow = [  # (name, fn, repeats)
        ("MLR one T x T buffer", buffer, max(3, args.repeats // 2)),
        ("manual attention", manual_attention, max(3, args.repeats // 2)),
    ]
    if not args.skip_naive:
        slow.append(("MLR one T x T per level", naive, 2))

    print(
        f"T={T} batch={B} heads={H}x{d} fp32 causal, forward+backward, "
        f"{torch.get_num_threads()} threads, median of repeats"
    )
    print(f"{'variant':<26}{'ms':>10}{'x SDPA':>9}{'fwd GFLOP':>11}")
    inputs = (q, k, v)
    fast_ms = median_ms([fn for _, fn, _ in fast], inputs, args.repeats)
    base = fast_ms[0]
    for (name, _, fl), ms in zip(fast, fast_ms, strict=True):
        print(f"{name:<26}{ms:>10.1f}{ms / base:>9.2f}{fl / 1e9:>11.2f}")
    for name, fn, repeats in slow:
        (ms,) = median_ms([fn], inputs, repeats)
        print(f"{name:<26}{ms:>10.1f}{ms / base:>9.2f}{'-':>11}", flush=True)


if __name__ == "__main__":
    main()

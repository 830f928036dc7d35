"""Speed of whole attention layers (projections + kernel), forward+backward, against plain SDPA.

The baseline is a hand-written standard attention layer (four dense projections and one fused
causal ``F.scaled_dot_product_attention``). Against it, in the same run: our standard attention
(causal attention runs as regions, see ``attention_kernels.kernel_levels``), MLR attention with
8 levels (block sizes T / 2^l), bilinear BTT, and sliding-window attention, all at equal width
and heads. Prints milliseconds (the fastest of 20 round-robin steps per layer after two warmup
steps, and the median) and the ratios to the baseline.

    python benchmarks/bench_attention_modules.py [--T 1024 --width 512 --heads 8 --batch 4]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

from mlbtc_search import attention_cpu
from mlbtc_search.attention import Attention
from mlbtc_search.attention_spec import AttentionSpec
from mlbtc_search.flopcount import count_flops
from mlbtc_search.malloc import reuse_freed_memory


class PlainSDPA(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.out = nn.Linear(width, width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, hd)
        return self.out(y.transpose(1, 2).reshape(B, T, D))


def timed(module: nn.Module, x: torch.Tensor, repeats: int = 1, warmup: int = 0) -> list[float]:
    """Milliseconds of ``repeats`` forward+backward steps, after ``warmup`` untimed ones."""
    def once() -> None:
        module.zero_grad(set_to_none=True)
        module(x).square().mean().backward()

    def sync() -> None:
        if x.is_cuda:
            torch.cuda.synchronize()

    for _ in range(warmup):
        once()
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        once()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--T", type=int, default=1024)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=1, help="timed steps per layer per round")
    ap.add_argument("--rounds", type=int, default=20,
                    help="rounds over all layers (round-robin); each layer's time is its fastest "
                         "step over all rounds, its median is printed too")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--default-malloc", action="store_true",
                    help="keep glibc's default mmap thresholds (trainers raise them on CPU: "
                         "mlbtc_search/malloc.py); both apply to every layer alike")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tuned = not args.default_malloc and reuse_freed_memory()
    torch.manual_seed(0)
    T, D, H = args.T, args.width, args.heads
    levels = 8
    ranks = [D // H // 2] + [max(1, D // H // 2 // (levels - 1))] * (levels - 1)
    specs = {
        "standard (ours, regions)": {"kind": "standard", "heads": H},
        f"mlr {levels} levels {ranks}": {"kind": "mlr", "heads": H, "ranks": ranks},
        "bilinear_btt rank 1": {"kind": "bilinear_btt", "heads": H},
        "sliding_window 128": {"kind": "sliding_window", "heads": H, "window": 128},
    }
    # the input needs a gradient, as inside a model (else the projections skip dX)
    x = torch.randn(args.batch, T, D, device=args.device, requires_grad=True)
    base = PlainSDPA(D, H).to(args.device)
    tokens = args.batch * T

    def train_flops(m: nn.Module) -> float:
        return count_flops(lambda: m(x).square().mean().backward()) / tokens

    modules = [("plain SDPA (baseline)", base)]
    modules += [(name, Attention(AttentionSpec.from_dict(d, D, T)).to(args.device))
                for name, d in specs.items()]
    flops = {name: train_flops(m) for name, m in modules}
    for name, m in modules[1:]:  # the plan prices what runs
        assert abs(flops[name] - m.flops_per_token(T, backward=True)) < 1e-6 * flops[name], name
    times: dict[str, list[float]] = {name: [] for name, _ in modules}
    for _, m in modules:
        timed(m, x, repeats=0, warmup=2)
    for _ in range(args.rounds):  # round-robin: load that drifts hits every row alike
        for name, m in modules:
            times[name] += timed(m, x, args.repeats)
    # the fastest step is the least disturbed one (on a shared VM, bursts of other load only
    # ever add time); the median shows how much the load moved
    ms = {name: min(t) for name, t in times.items()}
    med = {name: statistics.median(t) for name, t in times.items()}
    load = os.getloadavg()
    print(f"attention layers, T={T}, width {D}, {H} heads, batch {args.batch}, fp32, "
          f"forward+backward, {torch.get_num_threads()} threads, device {args.device}, "
          f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} (1/5/15 min; "
          f"{os.cpu_count()} CPUs), fastest of {args.rounds * args.repeats} steps "
          f"(round-robin), malloc "
          f"{'keeps freed memory (as in training)' if tuned else 'glibc default'}, fused CPU "
          f"kernel {'on' if attention_cpu.available() else 'off'}")
    print(f"{'layer':<36}{'ms':>9}{'x baseline':>12}{'median ms':>11}{'x':>7}"
          f"{'fwd+bwd FLOPs/token':>21}{'FLOP ratio':>12}{'time/FLOP ratio':>17}")
    base = modules[0][0]
    b_ms, b_med, b_fl = ms[base], med[base], flops[base]
    for name, _ in modules:
        r_t, r_f = ms[name] / b_ms, flops[name] / b_fl
        print(f"{name:<36}{ms[name]:>9.1f}{r_t:>12.2f}{med[name]:>11.1f}"
              f"{med[name] / b_med:>7.2f}{flops[name]:>21,.0f}{r_f:>12.2f}{r_t / r_f:>17.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Forward+backward speed of structured matrices against dense ``nn.Linear``, measured in one run.

For each width D: BTT (rank 1 and 4), Monarch (the same spec as BTT rank 1: a repeat), low rank
(D/16), Kronecker and a 3-core tensor train (ranks 4), compiled by ``compile_matrix``, plus a
deliberately naive BTT (two bmm with an explicit contiguous permute copy around each, forward and
backward, as einsum-search does) as a reference row, and on CPU BTT rank 1 once more through its
batched-matmul path (``MLBTC_CPU_KERNEL=0``: what runs without the fused kernel). Achieved GFLOP/s
= ``flops(spec) * rows * 3`` (forward + backward, checked once against FlopCounterMode) / median
time; the ratio is to dense ``nn.Linear``'s GFLOP/s in the same run. Rows of one width are timed
round-robin, so load that drifts during the run hits every row alike. On CPU, BTT rank 1 runs the
fused C++ kernel (``mlbtc_search/linear_cpu.py``); the last lines are its own profile: time per
phase, its GEMM rate per core against dense's and against its register tiles' rate in L1, and the
memory it moves. Freed memory is kept for reuse as training does on CPU
(``mlbtc_search/malloc.py``; ``--default-malloc`` measures glibc's default, under which every fresh
intermediate page-faults).

    python benchmarks/bench_matrices.py                 # D in {1024, 4096}, 4096 rows, fp32, CPU
    python benchmarks/bench_matrices.py --sizes 1024 --repeats 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.profiler import ProfilerActivity, profile

from mlbtc_search import MatrixSpec, compile_matrix, flops, linear_cpu
from mlbtc_search.flopcount import flop_counter
from mlbtc_search.malloc import reuse_freed_memory


class _NaiveBTTFunction(torch.autograd.Function):
    """Rank-1 BTT the einsum-search way: a contiguous permute copy around every bmm, forward and
    (hand-written, from transposed bmms) backward."""

    @staticmethod
    def forward(ctx, x: Tensor, R: Tensor, L: Tensor) -> Tensor:
        c, d, b = R.shape
        a = L.shape[2]
        N = x.shape[0]
        xt = x.view(N, c, d).transpose(0, 1).contiguous()  # (c, N, d) copy
        z = torch.bmm(xt, R).permute(2, 1, 0).contiguous()  # (c, N, b) -> (b, N, c) copy
        y = torch.bmm(z, L)  # (b, N, a)
        ctx.save_for_backward(xt, z, R, L)
        return y.permute(1, 2, 0).contiguous().view(N, a * b)  # (N, a, b) copy

    @staticmethod
    def backward(ctx, gout: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        xt, z, R, L = ctx.saved_tensors
        c, d, b = R.shape
        a = L.shape[2]
        N = gout.shape[0]
        gy = gout.view(N, a, b).permute(2, 0, 1).contiguous()  # (b, N, a) copy
        gL = torch.bmm(z.transpose(1, 2), gy)  # (b, c, a)
        gz = torch.bmm(gy, L.transpose(1, 2)).permute(2, 1, 0).contiguous()  # (c, N, b) copy
        gR = torch.bmm(xt.transpose(1, 2), gz)  # (c, d, b)
        gx = torch.bmm(gz, R.transpose(1, 2)).transpose(0, 1).contiguous()  # (N, c, d) copy
        return gx.view(N, c * d), gR, gL


class NaiveBTT(nn.Module):
    def __init__(self, c: int, d: int, a: int, b: int):
        super().__init__()
        self.R = nn.Parameter(torch.randn(c, d, b) * d**-0.5)  # R[i, j, b]
        self.L = nn.Parameter(torch.randn(b, c, a) * c**-0.5)  # L[b, i, a]

    def forward(self, x: Tensor) -> Tensor:
        return _NaiveBTTFunction.apply(x, self.R, self.L)


class BmmPath(nn.Module):
    """A compiled matrix run with ``MLBTC_CPU_KERNEL=0``: its batched-matmul path (the
    backward follows the forward's choice)."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, x: Tensor) -> Tensor:
        before = os.environ.get(linear_cpu.ENV)
        os.environ[linear_cpu.ENV] = "0"
        try:
            return self.module(x)
        finally:
            if before is None:
                del os.environ[linear_cpu.ENV]
            else:
                os.environ[linear_cpu.ENV] = before


def structures(D: int) -> list[tuple[str, dict]]:
    rank = D // 16
    return [
        ("btt r=1", {"btt": {"rank": 1}}),
        ("monarch (= btt r=1)", {"monarch": {}}),
        ("btt r=4", {"btt": {"rank": 4}}),
        (f"low_rank r={rank}", {"low_rank": {"rank": rank}}),
        ("kronecker", {"kronecker": {}}),
        ("tensor_train 3 cores r=4", {"tensor_train": {"cores": 3, "ranks": 4}}),
    ]


def step(module: nn.Module, x: Tensor, grad: Tensor) -> Callable[[], None]:
    def run() -> None:
        x.grad = None
        for p in module.parameters():
            p.grad = None
        module(x).backward(grad)

    return run


def counted_flops(run: Callable[[], None]) -> int:
    with flop_counter() as counter:
        run()
    return int(counter.get_total_flops())


def time_split(run: Callable[[], None]) -> tuple[float, float, float]:
    """Seconds of (matmul, copy, other) self CPU time in one forward+backward."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    matmul = copy = other = 0.0
    for e in prof.key_averages():
        t = e.self_cpu_time_total / 1e6
        if e.key in ("aten::bmm", "aten::mm", "aten::addmm", "aten::matmul", "aten::baddbmm_",
                     "aten::baddbmm"):
            matmul += t
        elif e.key in ("aten::copy_", "aten::clone", "aten::contiguous"):
            copy += t
        else:
            other += t
    return matmul, copy, other


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def bench(D: int, rows: int, repeats: int, warmup: int, device: str = "cpu") -> None:
    torch.manual_seed(0)
    x = torch.randn(rows, D, device=device, requires_grad=True)
    grad = torch.randn(rows, D, device=device)
    dense = nn.Linear(D, D, bias=False)
    entries: list[tuple[str, nn.Module, int]] = [("dense nn.Linear", dense, 2 * D * D)]
    for name, body in structures(D):
        spec = MatrixSpec.from_dict({"in": D, "out": D, **body})
        entries.append((name, compile_matrix(spec), flops(spec)))
    btt = MatrixSpec.from_dict({"in": D, "out": D, "btt": {"rank": 1}}).levels[0].btc.sizes
    naive = NaiveBTT(btt["i"], btt["j"], btt["a"], btt["b"])
    if device == "cpu":  # the same module as "btt r=1", without the fused C++ kernel
        entries.append(("btt r=1, bmm path", BmmPath(entries[1][1]), entries[1][2]))
    entries.append(("naive btt r=1 (reference)", naive, flops(
        MatrixSpec.from_dict({"in": D, "out": D, "btt": {"rank": 1}}))))

    for _, m, _ in entries:
        m.to(device)
    runs = [step(m, x, grad) for _, m, _ in entries]
    for (name, _, f), run in zip(entries, runs, strict=True):
        got = counted_flops(run)  # also the first warmup
        if got != 3 * f * rows:
            raise SystemExit(f"{name}: FlopCounterMode counted {got}, expected {3 * f * rows}")
    for _ in range(warmup - 1):
        for run in runs:
            run()
    times: list[list[float]] = [[] for _ in entries]
    for _ in range(repeats):
        for i, run in enumerate(runs):
            _sync(device)
            t0 = time.perf_counter()
            run()
            _sync(device)
            times[i].append(time.perf_counter() - t0)
    medians = [statistics.median(t) for t in times]
    dense_rate = 3 * entries[0][2] * rows / medians[0] / 1e9

    where = device if device != "cpu" else f"cpu, {torch.get_num_threads()} threads"
    load = os.getloadavg()
    print(f"\nD = {D}, {rows} rows, fp32, forward+backward, {where}, median of {repeats}, "
          f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} (1/5/15 min, "
          f"{os.cpu_count()} CPUs)")
    print(f"{'structure':28s} {'MFLOP/row':>10s} {'ms':>9s} {'GFLOP/s':>8s} {'x dense':>8s}")
    for (name, _, f), t in zip(entries, medians, strict=True):
        rate = 3 * f * rows / t / 1e9
        print(f"{name:28s} {3 * f / 1e6:10.3f} {t * 1e3:9.1f} {rate:8.1f} "
              f"{rate / dense_rate:8.3f}")
    if device == "cpu":
        matmul, copy, other = time_split(runs[-1])
        total = matmul + copy + other
        print(f"time split of naive btt r=1: matmul {matmul / total:.0%}, copies "
              f"{copy / total:.0%}, other {other / total:.0%} (profiled, self CPU time)")
        what_limits_btt(D, rows, entries[1][1], runs[1], medians[1], entries[1][2],
                        dense_rate / torch.get_num_threads())


GEMMS = ("z = x R", "y = z L", "gL", "gz", "gR", "gx")  # the kernel's GEMM phases


def what_limits_btt(D: int, rows: int, module: nn.Module, run: Callable[[], None], t: float,
                    f: int, dense_per_core: float) -> None:
    """The fused kernel's own profile (time per phase, summed over threads), its GEMM rate
    per core at this size and on rows that stay in cache, and the memory it streams."""
    R, L = module.cores
    if not linear_cpu.usable(torch.empty(1, D), R, L):
        print("what limits btt r=1: the fused CPU kernel does not run here (the bmm path does)")
        return
    linear_cpu.stats(reset=True)
    run()
    phases = linear_cpu.stats(reset=True)
    busy = sum(phases.values())
    split = ", ".join(f"{k} {v / busy:.0%}" for k, v in phases.items() if v / busy >= 0.005)
    per_core = 3 * f * rows / sum(phases[k] for k in GEMMS) / 1e9  # per second of thread time
    peak = max(linear_cpu.tile_peak() for _ in range(3))  # (broadcast, Hadamard), one thread
    moved = linear_cpu.traffic_bytes(rows, R, L)
    src = torch.randn(rows, D)
    dst = torch.empty_like(src)
    copy = 2 * src.numel() * 4 / min(_time(lambda: dst.copy_(src)) for _ in range(3)) / 1e9
    gemm_share = sum(phases[k] for k in GEMMS) / busy
    f_ = round(D**0.5)
    print(f"btt r=1 fused kernel, thread time per phase: {split}")
    print(f"what limits btt r=1 (fused C++ kernel, measured): {gemm_share:.0%} of its thread "
          f"time is its six GEMMs (inner size {f_}), the rest packing gy and the "
          f"cores and summing the threads' weight gradients; the GEMMs run at {per_core:.0f} "
          f"GFLOP/s per core, {per_core / dense_per_core:.2f} of dense's {dense_per_core:.0f}. "
          f"Its register tiles reach {peak[0]:.0f} (broadcast, first core) and {peak[1]:.0f} "
          f"(Hadamard, second core: both operands are vectors) GFLOP/s on data in L1, one "
          f"thread, at inner size 64 with all 24 accumulators, so "
          f"{per_core / (sum(peak) / 2):.2f} of that is reached; the rest is the tiles at this "
          f"size (inner size {f_}: "
          f"accumulators loaded and stored every {f_} multiply-adds; broadcast tiles of 6 x "
          f"{min(4, max(1, f_ // 16))} vectors) and cache traffic: each phase streams its core "
          f"({R.numel() * 4 / 2**20:.2g} MB, from L3) past every {linear_cpu.split(rows, R)[1]} "
          f"rows, and {moved / 1e9:.2f} GB per step go through memory (x twice, y, gy, gx, z "
          f"three times) = {moved / t / 1e9:.1f} GB/s, where a plain copy moves {copy:.0f} GB/s")


def _time(run: Callable[[], None]) -> float:
    t0 = time.perf_counter()
    run()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--default-malloc", action="store_true",
                        help="keep glibc's default mmap thresholds (trainers raise them on CPU: "
                             "mlbtc_search/malloc.py); both apply to every row alike")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tuned = not args.default_malloc and reuse_freed_memory()
    print(f"malloc: {'freed memory kept for reuse, as in training' if tuned else 'glibc default'}")
    for D in args.sizes:
        bench(D, args.rows, args.repeats, max(1, args.warmup), args.device)


if __name__ == "__main__":
    main()

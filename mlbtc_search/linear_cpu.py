"""The fused CPU kernel for two-core BTT matrices (``csrc/btt_linear.cpp``).

The bmm path (``linear._BTT``) runs each core as a batched GEMM with inner size 64 at D=4096
(about 0.45 of dense GEMM speed) and spends a quarter of its time on the transposes that the
output order (a, b) forces (benchmarks/results/bench_matrices_quiet3.txt: 0.36 of dense
GFLOP/s). This kernel takes b, the block index of the second core, as the SIMD lane axis: the
first core is then a GEMM of broadcast scalars of x with contiguous vectors of R, the second one
GEMM per lane done elementwise on vectors of b, which writes y in its own (a, b) order; the
backward is four products of the same two kinds. No transposes; rows in chunks that stay in
cache; register tiles of 24 vector accumulators (AVX-512 under -march=native).

It runs exactly the six GEMMs of the bmm path (forward 2 N k (C D S B + C S A B) FLOPs; each
weight or input gradient nobody needs is skipped as ``_BTT`` skips it), and FlopCounterMode
counts its two ops by that formula (``flop_formulas``, which ``flopcount.flop_counter`` adds).
It runs for float32/float64 CPU tensors outside tracing and autocast when the lane count (16 in
float32, 8 in float64) divides both B and D; anything else runs ``_BTT`` (same results).
Built on first use like ``attention_cpu`` (``cpu_build``); ``MLBTC_CPU_KERNEL=0`` turns it off.
"""

from __future__ import annotations

import threading
from pathlib import Path

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import cpu_build

ENV = cpu_build.ENV  # MLBTC_CPU_KERNEL=0 turns it off
SOURCE = Path(__file__).with_name("csrc") / "btt_linear.cpp"
# Rows per chunk of the forward (the unit that streams past the core a phase keeps in L2): about
# CHUNK_BYTES of the intermediate z (k*C*S*B per row), 32 rows at D = 4096 in float32. Rows per
# super-chunk (the backward's unit: its gz stays in L2 between the two phases, and the weight
# gradients sum over it in registers): about SUPER_BYTES of z, 64 rows at D = 4096. Measured in
# one process, interleaved, at D = 4096: 32 rows per chunk beat 64; 1 MB super-chunks beat 2, 4,
# 8 and 32 MB ones (gz then leaves L2).
CHUNK_BYTES = 512 * 1024
MIN_CHUNK, MAX_CHUNK = 32, 256
SUPER_BYTES = 1 << 20

_state: dict[str, bool] = {}
_lock = threading.Lock()


def available() -> bool:
    """Whether the kernel runs (compiling it on the first call); False with
    ``MLBTC_CPU_KERNEL=0`` or when it cannot be built (warns once, with the reason)."""
    return cpu_build.load_once(_state, _lock, SOURCE, "mlbtc_btt_linear",
                               "fused CPU BTT matrix kernel", "the bmm path runs",
                               lambda: hasattr(torch.ops.mlbtc_btt, "btt_forward"))


def usable(x: Tensor, R: Tensor, L: Tensor) -> bool:
    """The kernel can run on x (N, k*C*D) with cores R (k, C, D, B, S), L (k, B, C, S, A): CPU
    float32/float64 of one dtype, outside tracing and autocast, lanes dividing B and D."""
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64):
        return False
    if R.dtype != x.dtype or L.dtype != x.dtype or R.device != x.device or \
            L.device != x.device or torch.is_autocast_enabled("cpu"):
        return False
    lanes = 64 // x.element_size()
    if R.shape[3] % lanes or R.shape[2] % lanes:
        return False
    return not cpu_build.tracing() and available()


# the kernel's phases, as btt_stats reports their time (seconds summed over threads)
PHASES = ("weights", "z = x R", "y = z L", "gy in", "gL", "gz", "gR", "gx", "reduce")


def stats(reset: bool = True) -> dict[str, float]:
    """Seconds spent per phase (summed over threads) since the last reset, for benchmarks."""
    if not available():
        return {}
    return dict(zip(PHASES, torch.ops.mlbtc_btt.btt_stats(reset), strict=True))


def tile_peak() -> tuple[float, float]:
    """GFLOP/s of the broadcast and the Hadamard register tiles on operands in L1 (float32,
    inner size 64, one thread): the ceiling of the kernel's GEMM phases, for benchmarks."""
    return tuple(torch.ops.mlbtc_btt.btt_tile_peak())


def traffic_bytes(rows: int, R: Tensor, L: Tensor) -> int:
    """Bytes a forward+backward moves through memory: x twice (for z and gR), y, gy, gx once
    and the saved z three times (written, read for y, read for gL); gz stays in cache."""
    k, C, D, B, S = R.shape
    return rows * R.element_size() * k * (3 * C * D + 2 * L.shape[4] * B + 3 * C * S * B)


def split(rows: int, R: Tensor) -> tuple[int, int, int]:
    """(rows per chunk, rows per super-chunk, parts): how the kernel cuts the rows (parts: one
    range of rows per thread)."""
    k, C, _, B, S = R.shape
    per_row = k * C * S * B * R.element_size()  # bytes of z per row
    chunk = max(MIN_CHUNK, min(MAX_CHUNK, CHUNK_BYTES // per_row))
    return chunk, max(1, SUPER_BYTES // per_row // chunk) * chunk, \
        max(1, min(torch.get_num_threads(), -(-rows // chunk)))


def btt(x: Tensor, R: Tensor, L: Tensor) -> Tensor:
    """y (N, k*A*B) = the two-core BTT of x (N, k*C*D) (``usable`` must hold)."""
    return _FusedBTT.apply(x, R, L, split(x.shape[0], R))


class _FusedBTT(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, R: Tensor, L: Tensor, cut: tuple[int, int, int]) -> Tensor:
        x, R, L = x.contiguous(), R.contiguous(), L.contiguous()
        save = any(ctx.needs_input_grad[:3])
        y, z = torch.ops.mlbtc_btt.btt_forward(x, R, L, *cut, save)
        if save:  # z in the kernel's layout for these parts (threads) of rows
            ctx.save_for_backward(x, z, R, L)
        ctx.cut = cut
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, gy: Tensor) -> tuple[Tensor | None, ...]:
        x, z, R, L = ctx.saved_tensors
        need_x, need_r, need_l = ctx.needs_input_grad[:3]
        gx, gr, gl = torch.ops.mlbtc_btt.btt_backward(gy.contiguous(), x, z, R, L, *ctx.cut,
                                                       need_x, need_r, need_l)
        return gx if need_x else None, gr if need_r else None, gl if need_l else None, None


def _gemms(x, r, l) -> tuple[int, int]:  # FLOPs of the two forward GEMMs (shapes)
    k, C, D, B, S = r
    return 2 * x[0] * k * C * D * S * B, 2 * x[0] * k * C * S * B * l[4]


def _forward_flops(x, r, l, *args, out_shape=None, **kwargs) -> int:
    first, second = _gemms(x, r, l)
    return first + second


def _backward_flops(gy, x, z, r, l, chunk, super_, parts, need_x, need_r, need_l, *args,
                    out_shape=None, **kwargs) -> int:
    first, second = _gemms(x, r, l)  # gL, gz like the second; gR, gx like the first
    return second * (int(need_l) + int(need_x or need_r)) + first * (int(need_r) + int(need_x))


def flop_formulas() -> dict:
    """FlopCounterMode ``custom_mapping`` entries for the two ops (the bmm path's GEMMs);
    empty when not built."""
    if not available():
        return {}
    return {torch.ops.mlbtc_btt.btt_forward: _forward_flops,
            torch.ops.mlbtc_btt.btt_backward: _backward_flops}

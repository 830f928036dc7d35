"""The fused CPU kernel for rectangles at unequal widths (``csrc/region_attention.cpp``).

torch's fused CPU flash kernel needs one head size for q, k and v. Multi-level attention scores
most rectangles at a prefix width r_0 + ... + r_l below the value width, and bilinear forms at
their min-cut width, so those rectangles ran unfused (two matmuls around a softmax, plus a
log-sum-exp merge): about 1.5-2x the time per FLOP of the flash kernel. This C++ kernel does what
flash does (tiles, online softmax, BLAS GEMMs, no T x T buffer) at any q.k and value widths, and
merges each rectangle into the running output and log-sum-exp in place; its backward writes or
adds this rectangle's share of dQ, dK, dV into strided views of the full gradients.

It computes exactly the rectangle the unfused path computes (a causal rectangle whole, masked), so
``attention_regions.attend_cost`` prices both, and FlopCounterMode counts its two ops by that
formula (``flop_formulas``, which ``flopcount.flop_counter`` adds).

It is compiled on first use with torch's C++ extension loader (a C++ compiler and ninja; about a
minute on 2 cores, once per machine: the build is cached under ``TORCH_EXTENSIONS_DIR``, by
default ``~/.cache/torch_extensions``). Without a compiler, or with ``MLBTC_CPU_KERNEL=0``, the
unfused PyTorch path runs (same results, same FLOPs; slower). ``available()`` says which.
"""

from __future__ import annotations

import threading
from pathlib import Path

import torch
from torch import Tensor

from . import cpu_build

ENV = cpu_build.ENV  # (build, cache and switch shared with linear_cpu: cpu_build)
SOURCE = Path(__file__).with_name("csrc") / "region_attention.cpp"

_state: dict[str, bool] = {}
_lock = threading.Lock()


def available() -> bool:
    """Whether the fused kernel runs (compiling it on the first call); False with
    ``MLBTC_CPU_KERNEL=0`` or when it cannot be built (warns once, with the reason)."""
    return cpu_build.load_once(_state, _lock, SOURCE, "mlbtc_region_attention",
                               "fused CPU attention kernel", "the unfused path runs",
                               lambda: hasattr(torch.ops.mlbtc, "attend_merge"))


def usable(*ts: Tensor) -> bool:
    """The fused kernel can run on these operands: real CPU float32/float64 tensors, outside
    tracing (torch.export and torch.compile see the unfused path)."""
    t = ts[0]
    if t.device.type != "cpu" or t.dtype not in (torch.float32, torch.float64):
        return False
    if any(x.dtype != t.dtype for x in ts) or cpu_build.tracing():
        return False
    return available()


def _pairs(q: tuple[int, ...], k: tuple[int, ...]) -> int:  # (B, H, N, Lq, E), (.., Lk, E)
    return q[0] * q[1] * q[2] * q[3] * k[3]


def _forward_flops(q, k, v, *args, out_shape=None, **kwargs) -> int:
    return 2 * _pairs(q, k) * (q[4] + v[4])


def _backward_flops(go, q, k, v, *args, out_shape=None, **kwargs) -> int:
    return 2 * _pairs(q, k) * (3 * q[4] + 2 * v[4])


def flop_formulas() -> dict:
    """FlopCounterMode ``custom_mapping`` entries for the two ops (``attend_cost``'s formula:
    forward 2 x pairs x (E + Ev), backward 2 x pairs x (3 E + 2 Ev)); empty when not built."""
    if not available():
        return {}
    return {torch.ops.mlbtc.attend_merge: _forward_flops,
            torch.ops.mlbtc.attend_backward: _backward_flops}


def attend_merge(q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, causal: bool,
                 scale: float, first: bool) -> None:
    """Attention of q (B, H, N, Lq, E) over k (B, H, N, Lk, E), v (B, H, N, Lk, Ev), merged in
    place into out (B, H, N, Lq, Ev) and lse (B, H, N, Lq) (``first``: written)."""
    torch.ops.mlbtc.attend_merge(q, k, v, out, lse, causal, scale, first)


def attend_backward(go: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                    dq: Tensor, dk: Tensor, dv: Tensor, causal: bool, scale: float,
                    first: bool) -> None:
    """This rectangle's dQ, dK, dV given the merged out and lse, written (``first``) or added
    into dq, dk, dv (views shaped like q, k, v)."""
    torch.ops.mlbtc.attend_backward(go, q, k, v, out, lse, dq, dk, dv, causal, scale, first)

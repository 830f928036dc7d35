"""StructuredLinear: the nn.Module that executes a MatrixSpec's plan.

Each level is a set of cores, each stored with a leading block axis of size k (the level's block
count). The plan's steps run as pairwise batched matmuls (``torch.einsum`` of two operands, which
PyTorch lowers to one bmm); dense, low-rank and two-core BTT levels have hand-written fast paths
with the same FLOPs (two-core BTT on CPU: the fused C++ kernel of ``linear_cpu`` where it applies).
"""

from __future__ import annotations

import math
import string
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from . import linear_cpu
from .matrix import MatrixSpec
from .plan import LevelPlan, plan

_LETTERS = [c for c in string.ascii_letters if c not in "NK"]
BTT_ROW_CHUNK = 512


@dataclass(frozen=True)
class CoreInfo:
    """µP facts about one core: fans at its step of the contraction, init std, cores in layer."""

    level: int
    core: int
    fan_in: int
    fan_out: int
    n_cores: int

    @property
    def init_std(self) -> float:
        return math.sqrt(min(self.fan_in, self.fan_out)) / self.fan_in


class StructuredLinear(nn.Module):
    """y = M x for a MatrixSpec M, mapping (..., n) -> (..., m)."""

    def __init__(self, spec: MatrixSpec, zero_init: bool = False, rms_cap: bool = False):
        super().__init__()
        self.spec = spec
        self.plans: tuple[LevelPlan, ...] = plan(spec)
        self.rms_cap = rms_cap
        self.zero_init = zero_init
        self.cores = nn.ParameterList()
        self.infos: list[CoreInfo] = []
        n_cores = sum(len(lv.btc.cores) for lv in spec.levels)
        for l, level in enumerate(spec.levels):
            for c in range(len(level.btc.cores)):
                shape = (level.blocks,) + level.btc.core_shape(c)
                self.cores.append(nn.Parameter(torch.empty(shape)))
                fi, fo = level.btc.fans(c)
                self.infos.append(CoreInfo(l, c, fi, fo, n_cores))
        self.reset_parameters()

    # ---- initialization ---------------------------------------------------------------
    @torch.no_grad()
    def reset_parameters(self) -> None:
        """µP init: std sqrt(min(fan_in, fan_out)) / fan_in per core; with ``zero_init`` the last
        core (flow order) of every level starts at zero so the layer outputs 0."""
        for p, info in zip(self.cores, self.infos, strict=True):
            last = info.core == len(self.spec.levels[info.level].btc.cores) - 1
            if self.zero_init and last:
                p.zero_()
            else:
                p.normal_(0.0, info.init_std)

    def mup_cores(self) -> list[tuple[str, int, int]]:
        """(parameter name, fan_in, cores in the layer) for every core, for µP groups."""
        return [(f"cores.{i}", info.fan_in, info.n_cores) for i, info in enumerate(self.infos)]

    def _weight(self, i: int) -> Tensor:
        w = self.cores[i]
        if not self.rms_cap:
            return w
        tau = self.infos[i].init_std
        rms = w.pow(2).mean().sqrt()
        return w / torch.clamp(rms / tau, min=1.0)

    def dense_weight(self) -> Tensor | None:
        """The (m, n) weight when the matrix is one dense level of one block (``forward`` is
        then ``F.linear(x, W)``), else None: for callers that fuse it into a wider GEMM."""
        if len(self.plans) != 1 or self.plans[0].kind != "dense" or \
                self.spec.levels[0].blocks != 1:
            return None
        return self._weight(0)[0]

    def _level_weights(self, l: int) -> list[Tensor]:
        return [self._weight(i) for i, info in enumerate(self.infos) if info.level == l]

    # ---- execution ----------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.spec.n_in)  # (N, n)
        y = None
        for l in range(len(self.spec.levels)):
            part = self._run_level(l, x2)
            y = part if y is None else y + part
        return y.reshape(*lead, self.spec.n_out)

    def _run_level(self, l: int, x: Tensor) -> Tensor:
        p = self.plans[l]
        level = self.spec.levels[l]
        k = level.blocks
        ws = self._level_weights(l)
        N = x.shape[0]
        if p.kind == "dense":
            return F.linear(x, ws[0][0])  # W[o, i]
        if p.kind == "low_rank":
            return (x @ ws[0][0]) @ ws[1][0]  # (N, n) @ (n, r) @ (r, m)
        if p.kind == "btt":
            return self._btt(x, ws, level.btc.sizes, k)
        btc = level.btc
        sizes = {**btc.sizes, "_N": N, "_K": k}
        axes = ["_N", "_K"] + [a for a, _ in btc.in_axes]
        t = x.reshape([sizes[a] for a in axes])  # (N, k, *in_axes)
        for step in p.steps:
            keep = ["_N", "_K", *step.after]
            t, axes = contract(t, axes, ws[step.core], ["_K", *btc.cores[step.core]], keep,
                               sizes)
        order = [axes.index(a) for a in ["_N", "_K"] + [a for a, _ in btc.out_axes]]
        return t.permute(order).reshape(N, self.spec.n_out)

    @staticmethod
    def _btt(x: Tensor, ws: list[Tensor], sizes: dict[str, int], k: int) -> Tensor:
        if linear_cpu.usable(x, ws[0], ws[1]):  # R (k, C, D, B, S), L (k, B, C, S, A)
            return linear_cpu.btt(x, ws[0], ws[1])  # the fused C++ kernel: same GEMMs, faster
        c, d, a, b, s = (sizes[n] for n in "ijabs")
        R = ws[0].reshape(k * c, d, b * s)  # R[k, i, j, b, s] -> (k*c, d, b*s)
        L = ws[1].reshape(k * b, c * s, a)  # L[k, b, i, s, a] -> (k*b, c*s, a)
        dims = (k, c, d, a, b, s)
        # On CPU, chunks of rows keep the intermediates in cache: 0.23 -> 0.33 of dense
        # GFLOP/s at D=4096 (benchmarks/bench_matrices.py); the same bmm, so the same FLOPs.
        chunk = x.shape[0] if x.device.type != "cpu" or x.shape[0] <= 2 * BTT_ROW_CHUNK \
            else BTT_ROW_CHUNK
        return _BTT.apply(x, R, L, (*dims, chunk))

    @torch.no_grad()
    def materialize(self) -> Tensor:
        """The dense m x n matrix (for tests and the dashboard)."""
        p = self.cores[0]
        eye = torch.eye(self.spec.n_in, dtype=p.dtype, device=p.device)
        return self(eye).T.contiguous()

    def extra_repr(self) -> str:
        return f"spec={self.spec.to_dict()}"


class _BTT(torch.autograd.Function):
    """Two-core BTT with layouts chosen so that every bmm reads its operands in place.

    CPU bmm runs as one batched GEMM only when each batch item is row- or column-major (one unit
    stride) and the result is contiguous; otherwise it loops over the batch and copies every
    item (what the earlier ``reshape`` views and autograd's backward through them hit: 10x
    slower). So the intermediate keeps the rows N as its unit-stride axis: (k*c, b*s, N) after
    R, (k*b, c*s, N) before L (a view when s = 1 and k = 1, else one copy). The copies left are
    inherent to the output order (a, b) with b the block index of L: the output from
    (k*b, N, a), its gradient back (as a transpose within each row), and the input gradient
    (runs of d contiguous values). FLOPs: the same six bmm as autograd (two forward, four
    backward), and none for a gradient nobody needs.
    """

    @staticmethod
    def forward(ctx, x: Tensor, R: Tensor, L: Tensor, dims: tuple[int, ...]) -> Tensor:
        k, c, d, a, b, s, chunk = dims
        N = x.shape[0]
        if x.stride(-1) != 1:
            x = x.contiguous()
        y = x.new_empty(N, k * a * b)
        zzs = []
        for r0 in range(0, N, chunk):  # chunks of rows: the intermediates stay in cache
            n = min(chunk, N - r0)
            xT = x[r0:r0 + n].reshape(n, k * c, d).permute(1, 2, 0)  # (k*c, d, n) col-major
            zT = torch.bmm(R.transpose(1, 2), xT)  # (k*c, b*s, n)
            zz = zT.view(k, c, b, s, n).transpose(1, 2).reshape(k * b, c * s, n)  # (k*b, c*s, n)
            yc = torch.bmm(zz.transpose(1, 2), L)  # (k*b, n, a)
            y[r0:r0 + n].view(n, k, a, b).copy_(yc.view(k, b, n, a).permute(2, 0, 3, 1))
            zzs.append(zz)
        ctx.save_for_backward(x, R, L, *zzs)
        ctx.dims = dims
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, gout: Tensor) -> tuple[Tensor | None, ...]:
        x, R, L, *zzs = ctx.saved_tensors
        dt = zzs[0].dtype  # bf16 under autocast (whose casts do not reach a custom backward)
        x, R, L, gout = x.to(dt), R.to(dt), L.to(dt), gout.to(dt)  # no-ops in float32
        k, c, d, a, b, s, chunk = ctx.dims
        N = gout.shape[0]
        need_x, need_R, need_L = ctx.needs_input_grad[:3]
        gx = x.new_empty(N, k * c * d) if need_x else None
        gR = gL = None
        for i, r0 in enumerate(range(0, N, chunk)):
            n = min(chunk, N - r0)
            zz = zzs[i]
            # (n, k, a, b) -> (n, k, b, a): a transpose within each row, cheaper than a global
            # one; then a view (k*b, n, a) whose items are row-major with row stride k*b*a
            gy = gout[r0:r0 + n].reshape(n, k, a, b).transpose(2, 3).contiguous()
            gy = gy.view(n, k * b, a).transpose(0, 1)
            if need_L:  # (k*b, c*s, a), accumulated over chunks in the same bmm
                gL = torch.bmm(zz, gy) if gL is None else gL.baddbmm_(zz, gy)
            if not (need_x or need_R):
                continue
            gzz = torch.bmm(L, gy.transpose(1, 2))  # (k*b, c*s, n)
            gzT = gzz.view(k, b, c, s, n).transpose(1, 2).reshape(k * c, b * s, n)
            if need_R:  # (k*c, d, b*s)
                xT = x[r0:r0 + n].reshape(n, k * c, d).permute(1, 2, 0)  # (k*c, d, n)
                gzt = gzT.transpose(1, 2)
                gR = torch.bmm(xT, gzt) if gR is None else gR.baddbmm_(xT, gzt)
            if need_x:
                gxc = torch.bmm(gzT.transpose(1, 2), R.transpose(1, 2))  # (k*c, n, d)
                gx[r0:r0 + n].view(n, k * c, d).copy_(gxc.transpose(0, 1))
        return gx, gR, gL, None


def _gemm_ready(x: Tensor) -> Tensor:
    """A (nb, n, m) tensor that BLAS reads in place: ``x`` when a matrix dim has unit stride,
    else one copy with m innermost and the other two dims in ``x``'s own memory order, so the
    copy reads memory nearly in order (for the transposes between BTT cores: per row a small
    block transposed in cache, 3x faster than a batch-major ``contiguous()``)."""
    if x.stride(-1) == 1 or x.stride(-2) == 1 or x.shape[-1] == 1 or x.shape[-2] == 1:
        return x
    order = sorted((0, 1), key=lambda d: -x.stride(d)) + [2]
    inverse = [order.index(d) for d in range(3)]
    return x.permute(order).contiguous().permute(inverse)


class _BMM(torch.autograd.Function):
    """``torch.bmm`` whose operands and output gradient are first made BLAS-ready
    (``_gemm_ready``): autograd's own bmm copies every batch matrix of a gradient that has no
    unit stride on its own, measured 0.9 s of 2.1 s in a bilinear BTT layer. Same three bmm
    calls (so the FLOP counter sees the same multiply-accumulates)."""

    @staticmethod
    def forward(ctx, lhs: Tensor, rhs: Tensor, rows_first: bool) -> Tensor:
        lhs, rhs = _gemm_ready(lhs), _gemm_ready(rhs)
        ctx.save_for_backward(lhs, rhs)
        if not rows_first:
            return torch.bmm(lhs, rhs)
        # the result in (rows, batch, cols) memory order: bmm writes it in place (each batch
        # item is row-major with a longer row stride)
        out = lhs.new_empty(lhs.shape[1], lhs.shape[0], rhs.shape[2]).transpose(0, 1)
        return torch.bmm(lhs, rhs, out=out)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        lhs, rhs = ctx.saved_tensors
        grad = _gemm_ready(grad)
        g_lhs = torch.bmm(grad, rhs.transpose(1, 2)) if ctx.needs_input_grad[0] else None
        g_rhs = torch.bmm(lhs.transpose(1, 2), grad) if ctx.needs_input_grad[1] else None
        return g_lhs, g_rhs, None


def contract(t: Tensor, t_axes: list[str], w: Tensor, w_axes: list[str], keep: list[str],
             sizes: dict[str, int], rows_first: bool = False) -> tuple[Tensor, list[str]]:
    """One pairwise contraction as exactly one ``torch.bmm`` (also for size-1 contractions, so
    the FLOP counter sees every multiply-accumulate of the plan). ``rows_first``: the result is
    laid out rows-major in memory (its shape and names are the same), for a caller that wants
    the rows outermost next (one token's features together).

    Axes in both operands and in ``keep`` are batch axes; in both but not kept are contracted;
    the rest are kept rows (from ``t``) or columns (from ``w``). Returns the result over
    (batch, rows, cols) and its axis names.
    """
    batch = [a for a in t_axes if a in w_axes and a in keep]
    summed = [a for a in t_axes if a in w_axes and a not in keep]
    rows = [a for a in t_axes if a not in w_axes]
    cols = [a for a in w_axes if a not in t_axes]
    nb = math.prod(sizes[a] for a in batch)
    nr = math.prod(sizes[a] for a in rows)
    ns = math.prod(sizes[a] for a in summed)
    nc = math.prod(sizes[a] for a in cols)
    lhs = t.permute([t_axes.index(a) for a in batch + rows + summed]).reshape(nb, nr, ns)
    rhs = w.permute([w_axes.index(a) for a in batch + summed + cols]).reshape(nb, ns, nc)
    dev = lhs.device.type
    if torch.is_autocast_enabled(dev):  # autocast reaches neither the Function's out= nor its
        dt = torch.get_autocast_dtype(dev)  # backward: cast here, run it with autocast off
        with torch.autocast(dev, enabled=False):
            out = _BMM.apply(lhs.to(dt), rhs.to(dt), rows_first)
    else:
        out = _BMM.apply(lhs, rhs, rows_first)  # (batch, rows, cols)
    names = batch + rows + cols
    return out.reshape([sizes[a] for a in names]), names


def compile_matrix(spec: MatrixSpec, zero_init: bool = False,
                   rms_cap: bool = False) -> StructuredLinear:
    """Compile a MatrixSpec to a module mapping (..., n) -> (..., m)."""
    return StructuredLinear(spec, zero_init=zero_init, rms_cap=rms_cap)

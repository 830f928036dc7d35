"""The attention module: executes an AttentionSpec.

Each level's bilinear form x^T M x' is cut at its cheapest cut (``plan.bilinear_cut``) into a
query side and a key side: q = (query-side cores) x, k = (key-side cores) x', score = q . k. The
per-level features of a head group are concatenated (QK-LayerNorm over the whole per-head
feature vector, then the per-level logit scales are folded into q) and handed to the kernels of
``attention_kernels``: fused SDPA for one global level, region-decomposed flash attention for
nested levels, a banded kernel for sliding windows.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from . import attention_kernels as K
from . import kv_cache
from .attention_spec import AttentionSpec, HeadGroup
from .linear import StructuredLinear, contract
from .matrix import MatrixSpec
from .plan import Step, bilinear_cut, side_steps


class _Side:
    """Pure data: how one side (query or key) of one matrix level maps x to features."""

    def __init__(self, btc, blocks: int, cores: tuple[int, ...], start: list[str],
                 cut: tuple[str, ...]):
        self.btc = btc
        self.blocks = blocks
        self.cores = cores
        self.start = start
        self.cut = cut
        self.steps: tuple[Step, ...] = side_steps(btc, cores, set(start), cut)

    @property
    def macs(self) -> int:
        """Per token, per head (all blocks)."""
        return self.blocks * sum(s.macs for s in self.steps)

    def fans(self) -> list[tuple[int, int]]:
        """(fan_in, fan_out) of each core at its step: contracted and produced axis sizes."""
        sizes = self.btc.sizes
        out = []
        for s in self.steps:
            core = self.btc.cores[s.core]
            fan_in = math.prod(sizes[a] for a in core if a in s.before and a not in s.after)
            fan_out = math.prod(sizes[a] for a in core if a not in s.before)
            out.append((max(fan_in, 1), max(fan_out, 1)))
        return out


def _sides(score: MatrixSpec) -> list[tuple[_Side, _Side, int]]:
    """(query side, key side, width incl. blocks) for each level of a score matrix."""
    out = []
    for lv in score.levels:
        cut = bilinear_cut(lv.btc)
        q = _Side(lv.btc, lv.blocks, cut.query_cores, [a for a, _ in lv.btc.out_axes], cut.cut)
        k = _Side(lv.btc, lv.blocks, cut.key_cores, [a for a, _ in lv.btc.in_axes], cut.cut)
        out.append((q, k, lv.blocks * cut.width))
    return out


class BilinearFeatures(nn.Module):
    """q and k features of one head group: (B, T, D) -> two (B, h, T, W) tensors."""

    def __init__(self, group: HeadGroup, width: int, rms_cap: bool = False):
        super().__init__()
        self.rms_cap = rms_cap
        self._init_std: list[float] = []
        self.heads = group.heads
        self.width = width
        self.sides: list[tuple[_Side, _Side, int]] = []
        self.level_widths: list[int] = []
        for lv in group.levels:
            parts = _sides(lv.score)
            self.sides.extend(parts)
            self.level_widths.append(sum(w for _, _, w in parts))
        self.cores = nn.ParameterList()
        self._index: list[tuple[list[int], list[int]]] = []  # param ids for each (q, k) side
        self._mup: list[tuple[str, int, int]] = []
        for q, k, _ in self.sides:
            ids = ([], [])
            for which, side in enumerate((q, k)):
                for step, (fi, fo) in zip(side.steps, side.fans(), strict=True):
                    shape = (self.heads, side.blocks) + side.btc.core_shape(step.core)
                    p = nn.Parameter(torch.empty(shape))
                    std = math.sqrt(min(fi, fo)) / fi
                    with torch.no_grad():
                        p.normal_(0.0, std)
                    self._init_std.append(std)
                    self._mup.append((f"cores.{len(self.cores)}", fi, len(side.steps)))
                    ids[which].append(len(self.cores))
                    self.cores.append(p)
            self._index.append(ids)

    def mup_cores(self) -> list[tuple[str, int, int]]:
        return self._mup

    @property
    def total_width(self) -> int:
        return sum(self.level_widths)

    @property
    def macs(self) -> int:
        """Per token, all heads of the group, both sides."""
        return self.heads * sum(q.macs + k.macs for q, k, _ in self.sides)

    def _weight(self, i: int) -> Tensor:
        """Core i, RMS-capped at its init std when ``rms_cap`` (as StructuredLinear does)."""
        w = self.cores[i]
        if not self.rms_cap:
            return w
        return w / torch.clamp(w.pow(2).mean().sqrt() / self._init_std[i], min=1.0)

    def _side(self, x: Tensor, side: _Side, ids: list[int]) -> Tensor:
        N = x.shape[0]
        h, k = self.heads, side.blocks
        sizes = {**side.btc.sizes, "_N": N, "_H": h, "_K": k}
        axes = ["_N", "_K", *side.start]
        t = x.reshape([sizes[a] for a in axes])  # (N, k, *start axes)
        for step, i in zip(side.steps, ids, strict=True):
            keep = ["_N", "_H", "_K", *step.after]
            t, axes = contract(t, axes, self._weight(i), ["_H", "_K", *side.btc.cores[step.core]],
                               keep, sizes)
        if "_H" not in axes:  # no cores on this side: the features are x itself
            t = t.unsqueeze(1).expand(N, h, *t.shape[1:])
            axes = ["_N", "_H", *axes[1:]]
        order = [axes.index(a) for a in ["_N", "_H", "_K", *side.cut]]
        return t.permute(order).reshape(N, h, -1)  # (N, h, k * cut width)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        B, T, D = x.shape
        x2 = x.reshape(B * T, D)
        qs, ks = [], []
        for (q_side, k_side, _), (q_ids, k_ids) in zip(self.sides, self._index, strict=True):
            qs.append(self._side(x2, q_side, q_ids))
            ks.append(self._side(x2, k_side, k_ids))
        q = torch.cat(qs, dim=-1).view(B, T, self.heads, -1).transpose(1, 2)  # (B, h, T, W)
        k = torch.cat(ks, dim=-1).view(B, T, self.heads, -1).transpose(1, 2)
        return q, k


class Attention(nn.Module):
    """Multi-group structured attention: (B, T, D) -> (B, T, D)."""

    def __init__(self, spec: AttentionSpec, rms_cap: bool = False):
        super().__init__()
        self.spec = spec
        D = spec.width
        self.head_dim = spec.head_dim
        self.features = nn.ModuleList(BilinearFeatures(g, D, rms_cap) for g in spec.groups)
        self.q_norm = nn.ModuleList()
        self.k_norm = nn.ModuleList()
        for f in self.features:
            w = f.total_width
            self.q_norm.append(nn.LayerNorm(w, bias=False) if spec.qk_norm else nn.Identity())
            self.k_norm.append(nn.LayerNorm(w, bias=False) if spec.qk_norm else nn.Identity())
        for i, (g, f) in enumerate(zip(spec.groups, self.features, strict=True)):
            scales = []
            for lv, w in zip(g.levels, f.level_widths, strict=True):
                s = lv.scale if lv.scale is not None else spec.logit_mult / max(w, 1)
                scales += [s] * w
            self.register_buffer(f"scale{i}", torch.tensor(scales), persistent=False)
        self.value = StructuredLinear(spec.value, rms_cap=rms_cap)
        self.output = StructuredLinear(spec.output, zero_init=True, rms_cap=rms_cap)

    def _scale(self, g: int) -> Tensor:
        return getattr(self, f"scale{g}")

    def qkv(self, x: Tensor) -> list[tuple[Tensor, Tensor, Tensor]]:
        """Scaled, normalized (q, k) features and the values of each head group."""
        B, T, D = x.shape
        v = self.value(x).view(B, T, self.spec.heads, self.head_dim).transpose(1, 2)
        out = []
        h0 = 0
        for g, f in enumerate(self.features):
            q, k = f(x)  # (B, h, T, W) each
            q = self.q_norm[g](q) * self._scale(g)
            k = self.k_norm[g](k)
            h = f.heads
            out.append((q, k, v[:, h0:h0 + h]))
            h0 += h
        return out

    def forward(self, x: Tensor) -> Tensor:
        B, T, D = x.shape
        ys = []
        for (q, k, v), group, f in zip(self.qkv(x), self.spec.groups, self.features,
                                       strict=True):
            if group.window is not None:
                ys.append(K.window_attention(q, k, v, group.window, self.spec.causal))
            else:
                sizes = [lv.block_size for lv in group.levels]
                ys.append(K.multilevel_attention(q, k, v, f.level_widths, sizes,
                                                 self.spec.causal))
        y = torch.cat(ys, dim=1).transpose(1, 2).reshape(B, T, D)  # (B, T, H * head_dim)
        return self.output(y)

    # ---- analytic costs ---------------------------------------------------------------
    def flops_per_token(self, T: int) -> float:
        """Forward FLOPs per token at sequence length T (projections + kernels)."""
        from .plan import flops as matrix_flops

        total = matrix_flops(self.spec.value) + matrix_flops(self.spec.output)
        kernel = 0
        for group, f in zip(self.spec.groups, self.features, strict=True):
            total += 2 * f.macs
            kernel += self._kernel_flops(group, f, T)
        return total + kernel / T

    def _kernel_flops(self, group: HeadGroup, f: BilinearFeatures, T: int) -> int:
        if group.window is not None:
            return K.window_attention_flops(T, f.heads, f.total_width, self.head_dim,
                                            group.window, self.spec.causal)
        sizes = [lv.block_size for lv in group.levels]
        return K.multilevel_attention_flops(T, f.heads, f.level_widths, sizes, self.head_dim,
                                            self.spec.causal)

    def kv_cache_bytes_per_token(self, T: int, dtype_bytes: int = 4) -> float:
        total = 0.0
        for group, f in zip(self.spec.groups, self.features, strict=True):
            if group.window is not None:
                per_head = min(group.window, T) * (f.total_width + self.head_dim) / T
                total += f.heads * per_head * dtype_bytes
            else:
                sizes = [lv.block_size for lv in group.levels]
                total += f.heads * kv_cache.kv_cache_bytes_per_token(f.level_widths, sizes,
                                                              self.head_dim, T, dtype_bytes)
        return total

    def extra_repr(self) -> str:
        return f"kind={self.spec.kind}, heads={self.spec.heads}, width={self.spec.width}"

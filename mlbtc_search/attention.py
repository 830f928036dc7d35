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
import torch.nn.functional as F
from torch import Tensor, nn

from . import attention_kernels as K
from .attention_plan import GroupPlan, Side, attention_plan, score_sides
from .attention_spec import AttentionSpec
from .linear import StructuredLinear, contract


class BilinearFeatures(nn.Module):
    """q and k features of one head group: (B, T, D) -> two (B, h, T, W) tensors."""

    def __init__(self, plan: GroupPlan, rms_cap: bool = False):
        super().__init__()
        self.rms_cap = rms_cap
        self._init_std: list[float] = []
        self.heads = plan.heads
        self.sides = plan.sides
        self.level_widths = list(plan.level_widths)
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
        # every side one dense (D x w) core: all levels' q and k features in one GEMM
        dense = [[self._dense_core(side, ids[w]) for (*sides, _), ids in
                  zip(self.sides, self._index, strict=True) for side in [sides[w]]]
                 for w in (0, 1)]
        self._dense = dense if all(d is not None for part in dense for d in part) else None

    @property
    def dense(self) -> bool:
        """Every side is one dense D x w core: all q and k features are one matrix product."""
        return self._dense is not None

    @staticmethod
    def _dense_core(side: Side, ids: list[int]) -> tuple[int, bool] | None:
        """(core id, stored as (w, D)) when ``side`` maps x by one dense D x w core, else None."""
        if side.blocks != 1 or len(side.steps) != 1 or len(side.start) != 1 or \
                len(side.cut) != 1:
            return None
        axes = side.btc.cores[side.steps[0].core]
        if len(axes) != 2 or set(axes) != {side.start[0], side.cut[0]}:
            return None
        return ids[0], axes[0] == side.cut[0]

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

    def _side(self, x: Tensor, side: Side, ids: list[int]) -> Tensor:
        N = x.shape[0]
        h, k = self.heads, side.blocks
        sizes = {**side.btc.sizes, "_N": N, "_H": h, "_K": k}
        axes = ["_N", "_K", *side.start]
        t = x.reshape([sizes[a] for a in axes])  # (N, k, *start axes)
        last = len(side.steps) - 1
        for n, (step, i) in enumerate(zip(side.steps, ids, strict=True)):
            keep = ["_N", "_H", "_K", *step.after]
            t, axes = contract(t, axes, self._weight(i), ["_H", "_K", *side.btc.cores[step.core]],
                               keep, sizes, rows_first=n == last)  # tokens outermost at the end
        if "_H" not in axes:  # no cores on this side: the features are x itself, every head
            t = t.unsqueeze(1)
            axes = ["_N", "_H", *axes[1:]]
        order = [axes.index(a) for a in ["_N", "_H", "_K", *side.cut]]
        heads = t.shape[axes.index("_H")]
        return t.permute(order).reshape(N, heads, -1)  # (N, h or 1, k * cut width)

    def dense_matrix(self) -> Tensor:
        """(D, 2 h W): the q and k features of every level as one matrix (``_dense`` sides)."""
        mats = []
        for part in self._dense:
            ws = [self._weight(i)[:, 0].transpose(1, 2) if wd else self._weight(i)[:, 0]
                  for i, wd in part]  # (h, D, w_l) each
            mats.append(ws[0] if len(ws) == 1 else torch.cat(ws, dim=-1))  # (h, D, W)
        w = torch.stack(mats).permute(2, 0, 1, 3)  # (D, 2, h, W)
        return w.reshape(w.shape[0], -1)

    def split(self, qk: Tensor, B: int, T: int) -> tuple[Tensor, Tensor]:
        """(B*T, 2 h W) features of ``dense_matrix`` -> q, k as (B, T, h, W) views."""
        qk = qk.view(B * T, 2, self.heads, -1)
        return tuple(t.view(B, T, self.heads, -1) for t in qk.unbind(1))  # no zero-fills

    def token_major(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """q and k features as (B, T, h, W), in the memory order they are computed in; a side
        without cores (its features are x itself for every head) gives (B, T, 1, W)."""
        B, T, D = x.shape
        x2 = x.reshape(B * T, D)
        if self._dense is not None:
            return self.split(x2 @ self.dense_matrix(), B, T)
        qs, ks = [], []
        for (q_side, k_side, _), (q_ids, k_ids) in zip(self.sides, self._index, strict=True):
            qs.append(self._side(x2, q_side, q_ids))
            ks.append(self._side(x2, k_side, k_ids))
        out = []
        for parts in (qs, ks):
            if len(parts) > 1:  # levels of one head: every part per head before the concat
                heads = max(p.shape[1] for p in parts)
                parts = [p.expand(-1, heads, -1) for p in parts]
            t = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)  # no copy for one
            out.append(t.view(B, T, t.shape[1], -1))
        return out[0], out[1]

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """q and k features, (B, h, T, W) each (views of ``token_major``'s)."""
        q, k = self.token_major(x)
        B, T = x.shape[:2]
        return tuple(t.expand(B, T, self.heads, -1).transpose(1, 2) for t in (q, k))


class _Norms(nn.Module):
    """Bias-free LayerNorms over consecutive feature slices of the given widths."""

    def __init__(self, widths: list[int]):
        super().__init__()
        self.widths = widths
        self.norms = nn.ModuleList(nn.LayerNorm(w, bias=False) for w in widths)

    def forward(self, x: Tensor) -> Tensor:
        parts = x.split(self.widths, dim=-1)
        return torch.cat([n(p) for n, p in zip(self.norms, parts, strict=True)], dim=-1)


class Attention(nn.Module):
    """Multi-group structured attention: (B, T, D) -> (B, T, D)."""

    def __init__(self, spec: AttentionSpec, rms_cap: bool = False):
        super().__init__()
        self.spec = spec
        self.head_dim = spec.head_dim
        self.plan = attention_plan(spec)
        self.features = nn.ModuleList(BilinearFeatures(g, rms_cap) for g in self.plan.groups)
        self.q_norm = nn.ModuleList()
        self.k_norm = nn.ModuleList()
        per_level = spec.qk_norm_per_level
        for g in self.plan.groups:
            # the LayerNorm scopes: the whole head, or (paper) each score part (matrix level)
            scopes = [w for *_, w in g.sides] if per_level else [g.total_width]
            for norms in (self.q_norm, self.k_norm):  # one scope: a plain LayerNorm (its names)
                norm = nn.LayerNorm(scopes[0], bias=False) if len(scopes) == 1 else _Norms(scopes)
                norms.append(norm if spec.qk_norm else nn.Identity())
        self._scales: list[list[float]] = []  # exact, for any dtype the module moves to
        for i, g in enumerate(spec.groups):
            scales = []
            for lv in g.levels:
                parts = [w for *_, w in score_sides(lv.score)]
                for w in parts if per_level else [sum(parts)]:
                    s = lv.scale if lv.scale is not None else spec.logit_mult / max(w, 1)
                    scales += [s] * w
            self._scales.append(scales)
            self.register_buffer(f"scale{i}", torch.tensor(scales), persistent=False)
        self.value = StructuredLinear(spec.value, rms_cap=rms_cap)
        self.output = StructuredLinear(spec.output, zero_init=True, rms_cap=rms_cap)

    def _scale(self, g: int) -> Tensor:
        return getattr(self, f"scale{g}")

    def _apply(self, fn, recurse=True):
        """Keep the logit scales exact in the new dtype (float64 models get float64 scales, not
        float32 values widened)."""
        out = super()._apply(fn, recurse)
        for i, scales in enumerate(self._scales):
            buf = self._scale(i)
            setattr(self, f"scale{i}", torch.tensor(scales, dtype=buf.dtype, device=buf.device))
        return out

    def _norm_scale(self, g: int, q: Tensor) -> Tensor:
        """q_norm(q) * scale; with one LayerNorm the scales fold into its weight (one pass)."""
        norm = self.q_norm[g]
        if type(norm) is nn.LayerNorm:
            w = norm.weight * self._scale(g)
            return F.layer_norm(q, norm.normalized_shape, w, None, norm.eps)
        return norm(q) * self._scale(g)

    def _fused_qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor] | None:
        """One head group of dense q/k cores and a dense value: q, k (B, T, h, W) and v
        (B, T, H * head_dim) from one GEMM over [q k | v] (x read once, as a fused qkv
        projection), else None."""
        f = self.features[0]
        wv = self.value.dense_weight() if len(self.features) == 1 and f.dense else None
        if wv is None:
            return None
        B, T, D = x.shape
        qk_w = f.dense_matrix()  # (D, 2 h W)
        y = x.reshape(B * T, D) @ torch.cat([qk_w, wv.t()], dim=1)
        qk, v = y.split([qk_w.shape[1], wv.shape[0]], dim=1)  # backward: one cat, no zero fill
        q, k = f.split(qk, B, T)
        return q, k, v.view(B, T, -1)

    def qkv(self, x: Tensor) -> list[tuple[Tensor, Tensor, Tensor]]:
        """Scaled, normalized (q, k) features and the values of each head group."""
        B, T, D = x.shape
        fused = self._fused_qkv(x)
        v = self.value(x) if fused is None else fused[2]
        v = v.view(B, T, self.spec.heads, self.head_dim).transpose(1, 2)
        out = []
        h0 = 0
        for g, f in enumerate(self.features):
            q, k = f.token_major(x) if fused is None else fused[:2]  # (B, T, h or 1, W)
            # the norms write head-major (B, h or 1, T, W), the kernels' layout: in a
            # token-major view every row of a small region lies on its own page (measured 4-5%
            # of an MLR layer); a norm copies its strided input either way
            q, k = q.transpose(1, 2), k.transpose(1, 2)
            q = self._norm_scale(g, q)
            k = self.k_norm[g](k)
            h = f.heads
            q, k = (t.expand(B, h, T, -1) for t in (q, k))  # (B, h, T, W)
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
                                                 self.spec.causal,
                                                 self.spec.mean_over_shared_levels))
        y = ys[0] if len(ys) == 1 else torch.cat(ys, dim=1)  # (B, H, T, head_dim)
        y = y.transpose(1, 2).reshape(B, T, D)  # (B, T, H * head_dim)
        return self.output(y)

    # ---- analytic costs (attention_plan) ---------------------------------------------
    def flops_per_token(self, T: int, backward: bool = False) -> float:
        """Forward (with ``backward``: forward + backward) FLOPs per token at length T."""
        return self.plan.flops_per_token(T, backward)

    def kv_cache_bytes_per_token(self, T: int, dtype_bytes: int = 4) -> float:
        return self.plan.kv_cache_bytes_per_token(T, dtype_bytes)

    def extra_repr(self) -> str:
        return f"kind={self.spec.kind}, heads={self.spec.heads}, width={self.spec.width}"

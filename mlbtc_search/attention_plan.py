"""The cost plan of an AttentionSpec: parameters, FLOPs and KV-cache bytes as pure data.

Nothing here builds a module or runs torch: ``attention_plan(spec)`` (cached) cuts every score
level at its cheapest bilinear cut (``plan.bilinear_cut``) into a query side and a key side,
plans both sides' contractions (``plan.side_steps``), and prices the kernels through
``attention_regions``. ``attention.Attention`` executes the same plan, so the numbers here are
what FlopCounterMode counts on the module (tests/core/test_model.py checks it, forward and
forward+backward).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache

from .attention_regions import (
    ZERO,
    KernelCost,
    check_levels,
    multilevel_attention_cost,
    window_attention_cost,
)
from .attention_spec import AttentionSpec, HeadGroup
from .btc import BTC
from .matrix import MatrixSpec
from .plan import Step, bilinear_cut, side_steps
from .plan import flops as matrix_flops


@dataclass(frozen=True)
class Side:
    """How one side (query or key) of one matrix level maps x to features: ``steps`` absorb
    ``cores`` of ``btc`` from the ``start`` leg, ending on the ``cut`` axes; ``blocks`` blocks."""

    btc: BTC
    blocks: int
    cores: tuple[int, ...]
    start: tuple[str, ...]
    cut: tuple[str, ...]
    steps: tuple[Step, ...]

    @property
    def macs(self) -> int:
        """Per token, per head (all blocks)."""
        return self.blocks * sum(s.macs for s in self.steps)

    @property
    def params(self) -> int:
        """Per head (all blocks)."""
        return self.blocks * sum(math.prod(self.btc.core_shape(s.core)) for s in self.steps)

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


def _side(btc: BTC, blocks: int, cores: tuple[int, ...], legs, cut: tuple[str, ...]) -> Side:
    start = tuple(a for a, _ in legs)
    return Side(btc, blocks, cores, start, cut, side_steps(btc, cores, set(start), cut))


@cache
def score_sides(score: MatrixSpec) -> tuple[tuple[Side, Side, int], ...]:
    """(query side, key side, q.k width incl. blocks) for each level of a score matrix."""
    out = []
    for lv in score.levels:
        cut = bilinear_cut(lv.btc)
        q = _side(lv.btc, lv.blocks, cut.query_cores, lv.btc.out_axes, cut.cut)
        k = _side(lv.btc, lv.blocks, cut.key_cores, lv.btc.in_axes, cut.cut)
        out.append((q, k, lv.blocks * cut.width))
    return tuple(out)


@dataclass(frozen=True)
class GroupPlan:
    """One head group: its sequence levels' q.k widths (per head) and projection sides."""

    group: HeadGroup
    sides: tuple[tuple[Side, Side, int], ...]
    level_widths: tuple[int, ...]

    @property
    def heads(self) -> int:
        return self.group.heads

    @property
    def total_width(self) -> int:
        return sum(self.level_widths)

    @property
    def block_sizes(self) -> tuple[int | None, ...]:
        return tuple(lv.block_size for lv in self.group.levels)

    @property
    def macs(self) -> int:
        """q and k feature MACs per token, all heads of the group."""
        return self.heads * sum(q.macs + k.macs for q, k, _ in self.sides)

    @property
    def core_params(self) -> int:
        return self.heads * sum(q.params + k.params for q, k, _ in self.sides)

    def kernel_cost(self, T: int, dv: int, causal: bool) -> KernelCost:
        """Kernel FLOPs over all T tokens of one sequence."""
        if self.group.window is not None:
            return window_attention_cost(T, self.heads, self.total_width, dv, self.group.window,
                                         causal)
        return multilevel_attention_cost(T, self.heads, self.level_widths, self.block_sizes, dv,
                                         causal)

    def kv_floats(self, T: int, dv: int) -> int:
        """Floats per head a causal decoding cache holds after T tokens (``kv_cache``)."""
        if self.group.window is not None:
            return min(self.group.window, T) * (self.total_width + dv)
        return kv_floats(self.level_widths, self.block_sizes, dv, T)


def kv_floats(widths, block_sizes, dv: int, T: int) -> int:
    """Floats per head that ``MultilevelKVCache`` holds after T tokens: every value, the keys of
    global levels, and the keys of the current block of each blocked level."""
    check_levels(widths, block_sizes)
    if T <= 0:
        return 0
    floats = dv * T
    for w, bs in zip(widths, block_sizes, strict=True):
        floats += w * (T if bs is None else (T - 1) % bs + 1)
    return floats


@dataclass(frozen=True)
class AttentionPlan:
    spec: AttentionSpec
    groups: tuple[GroupPlan, ...]

    @property
    def head_dim(self) -> int:
        return self.spec.head_dim

    @property
    def params(self) -> int:
        """Exactly ``sum(p.numel() for p in Attention(spec).parameters())``."""
        norms = 2 * sum(g.total_width for g in self.groups) if self.spec.qk_norm else 0
        cores = sum(g.core_params for g in self.groups)
        return cores + norms + self.spec.value.params + self.spec.output.params

    @property
    def projection_flops(self) -> int:
        """Forward FLOPs per token of the q/k feature sides, W_V and W_O (no T dependence)."""
        features = 2 * sum(g.macs for g in self.groups)
        return features + matrix_flops(self.spec.value) + matrix_flops(self.spec.output)

    def kernel_cost(self, T: int) -> KernelCost:
        """Kernel FLOPs of one sequence of T tokens, all groups."""
        total = ZERO
        for g in self.groups:
            total += g.kernel_cost(T, self.head_dim, self.spec.causal)
        return total

    def flops_per_token(self, T: int, backward: bool = False) -> float:
        """Forward FLOPs per token at length T; with ``backward``, forward + backward (every
        projection's backward is twice its forward: input and weight gradients)."""
        kernel = self.kernel_cost(T)
        if not backward:
            return self.projection_flops + kernel.forward / T
        return 3 * self.projection_flops + kernel.total / T

    def kv_cache_bytes_per_token(self, T: int, dtype_bytes: int = 4) -> float:
        floats = sum(g.heads * g.kv_floats(T, self.head_dim) for g in self.groups)
        return floats * dtype_bytes / T if T > 0 else 0.0


def _group_plan(group: HeadGroup) -> GroupPlan:
    sides: list[tuple[Side, Side, int]] = []
    widths = []
    for lv in group.levels:
        parts = score_sides(lv.score)
        sides.extend(parts)
        widths.append(sum(w for _, _, w in parts))
    return GroupPlan(group, tuple(sides), tuple(widths))


@cache
def attention_plan(spec: AttentionSpec) -> AttentionPlan:
    return AttentionPlan(spec, tuple(_group_plan(g) for g in spec.groups))


__all__ = ["AttentionPlan", "GroupPlan", "Side", "attention_plan", "kv_floats", "score_sides"]

"""Pure-data plans: contraction order, shapes, FLOPs and parameters of a MatrixSpec.

Nothing here runs torch. A level's plan absorbs its cores into the running input tensor one at a
time (every step is one batched matmul whose cost does not depend on the batch size); the order
is the cheapest permutation (exact search for up to 7 cores, greedy beyond). FLOPs follow
torch.utils.flop_counter: 2 x multiply-accumulates of each matmul.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from itertools import permutations
from math import prod

import networkx as nx

from .btc import BTC
from .matrix import Level, MatrixSpec

EXACT_ORDER_LIMIT = 7


@dataclass(frozen=True)
class Step:
    """Absorb core ``core`` into the running tensor: ``before`` x core -> ``after`` axes."""

    core: int
    before: tuple[str, ...]
    after: tuple[str, ...]
    macs: int  # per input vector, per block


@dataclass(frozen=True)
class LevelPlan:
    blocks: int
    kind: str  # "dense" | "low_rank" | "btt" | "general": which executor runs it
    order: tuple[int, ...]
    steps: tuple[Step, ...]

    @property
    def macs(self) -> int:
        """Multiply-accumulates per input vector for the whole level (all blocks)."""
        return self.blocks * sum(s.macs for s in self.steps)


def _steps(btc: BTC, order: tuple[int, ...]) -> tuple[Step, ...]:
    """Absorb the cores in ``order`` into x, ending on the output axes."""
    return side_steps(btc, order, {a for a, _ in btc.in_axes}, tuple(a for a, _ in btc.out_axes))


def best_order(btc: BTC) -> tuple[int, ...]:
    n = len(btc.cores)
    if n <= EXACT_ORDER_LIMIT:
        return min(permutations(range(n)),
                   key=lambda o: (sum(s.macs for s in _steps(btc, o)), o))
    order: list[int] = []  # greedy: cheapest next step
    while len(order) < n:
        rest = [c for c in range(n) if c not in order]
        order.append(min(rest, key=lambda c: (_steps(btc, tuple(order + [c]))[-1].macs, c)))
    return tuple(order)


def _kind(level: Level, order: tuple[int, ...]) -> str:
    if level.preset == "dense" and level.blocks == 1:
        return "dense"
    if level.preset == "low_rank" and level.blocks == 1 and order == (0, 1):
        return "low_rank"
    if level.preset in ("btt", "monarch") and order == (0, 1):
        return "btt"
    return "general"


@cache
def level_plan(level: Level) -> LevelPlan:
    order = best_order(level.btc)
    return LevelPlan(level.blocks, _kind(level, order), order, _steps(level.btc, order))


def plan(spec: MatrixSpec) -> tuple[LevelPlan, ...]:
    return tuple(level_plan(lv) for lv in spec.levels)


def flops(spec: MatrixSpec) -> int:
    """Forward FLOPs per input vector (2 x MACs), as FlopCounterMode counts the compiled module."""
    return 2 * sum(p.macs for p in plan(spec))


def params(spec: MatrixSpec) -> int:
    return spec.params


def graph(btc: BTC) -> nx.MultiGraph:
    """The contraction graph: cores and the x/y legs as nodes, one edge per (axis, node pair).

    Edges carry ``axis`` and ``size``. An axis on more than two nodes (a block index) becomes a
    clique of edges, so the drawing shows every node that shares it.
    """
    g = nx.MultiGraph()
    members: dict[str, list[str]] = {}
    g.add_node("x", kind="input", axes=[a for a, _ in btc.in_axes])
    g.add_node("y", kind="output", axes=[a for a, _ in btc.out_axes])
    for a, _ in btc.in_axes:
        members.setdefault(a, []).append("x")
    for a, _ in btc.out_axes:
        members.setdefault(a, []).append("y")
    for c, axes in enumerate(btc.cores):
        g.add_node(f"G{c}", kind="core", axes=list(axes), shape=list(btc.core_shape(c)))
        for a in axes:
            members.setdefault(a, []).append(f"G{c}")
    sizes = btc.sizes
    for a, nodes in members.items():
        for i in range(len(nodes)):
            for j in range(i + 1, len(nodes)):
                g.add_edge(nodes[i], nodes[j], axis=a, size=sizes[a])
    return g


def graph_text(btc: BTC) -> str:
    """The graph in text: one line per node with its axes and sizes."""
    sizes = btc.sizes
    lines = ["x  : " + " ".join(f"{a}={s}" for a, s in btc.in_axes)]
    for c, axes in enumerate(btc.cores):
        lines.append(f"G{c} : " + " ".join(f"{a}={sizes[a]}" for a in axes))
    lines.append("y  : " + " ".join(f"{a}={s}" for a, s in btc.out_axes))
    return "\n".join(lines)


# ---- bilinear forms: x^T M x' split into a query side and a key side -----------------------
@dataclass(frozen=True)
class BilinearCut:
    """x^T M x' = q(x) . k(x') with q from the output leg and ``query_cores``, k from the input
    leg and ``key_cores``; ``cut`` are the axes joining the two sides (their product is the width
    of q and k, per block)."""

    query_cores: tuple[int, ...]
    key_cores: tuple[int, ...]
    cut: tuple[str, ...]
    width: int


def bilinear_cut(btc: BTC) -> BilinearCut:
    """The cheapest cut: the smallest width, then the fewest MACs for both sides.

    Exhaustive over core subsets (structures have a handful of cores), which finds the minimum
    cut of the contraction graph between the x (key) leg and the y (query) leg.
    """
    n = len(btc.cores)
    sizes = btc.sizes
    in_set = {a for a, _ in btc.in_axes}
    out_set = {a for a, _ in btc.out_axes}
    best = None
    for mask in range(2**n):
        q_cores = tuple(c for c in range(n) if mask >> c & 1)
        k_cores = tuple(c for c in range(n) if not mask >> c & 1)
        q_axes = set(out_set).union(*(set(btc.cores[c]) for c in q_cores))
        k_axes = set(in_set).union(*(set(btc.cores[c]) for c in k_cores))
        cut = tuple(sorted(q_axes & k_axes))
        width = prod(sizes[a] for a in cut)
        cost = side_macs(btc, k_cores, in_set, cut) + side_macs(btc, q_cores, out_set, cut)
        key = (width, cost, -len(k_cores))
        if best is None or key < best[0]:
            best = (key, BilinearCut(q_cores, k_cores, cut, width))
    assert best is not None
    return best[1]


def side_macs(btc: BTC, cores: tuple[int, ...], start: set[str], cut: tuple[str, ...]) -> int:
    """MACs per vector to absorb ``cores`` (in the given order) starting from ``start`` axes,
    ending on the ``cut`` axes."""
    return sum(s.macs for s in side_steps(btc, cores, start, cut))


def side_steps(btc: BTC, cores: tuple[int, ...], start: set[str],
               cut: tuple[str, ...]) -> tuple[Step, ...]:
    sizes = btc.sizes
    current = [a for a, _ in (btc.in_axes + btc.out_axes) if a in start]
    steps = []
    for pos, c in enumerate(cores):
        later = set(cut)
        for k in cores[pos + 1:]:
            later |= set(btc.cores[k])
        involved = list(dict.fromkeys(current + list(btc.cores[c])))
        after = tuple(cut) if pos == len(cores) - 1 else tuple(a for a in involved if a in later)
        steps.append(Step(c, tuple(current), after, prod(sizes[a] for a in involved)))
        current = list(after)
    return tuple(steps)

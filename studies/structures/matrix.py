"""Sample a structured matrix (a MatrixSpec YAML dict) define-by-run from an Optuna trial.

Three parameterizations (``forms``), each reparameterized so that every assignment builds a
valid matrix (no rejection, no wasted trials):

- ``graph``: a contraction graph of ``c`` cores in a chain (the flow order). ``in`` and ``out``
  are factorized into axes by exponents (axis size = the divisor of what is left nearest to
  n^u, the divisor rule of the ``theta`` preset). Each axis sits on a contiguous run of cores
  (``core`` in [0, 1) picks the first, ``span`` the length; an axis on several cores is a block
  index, as in BTT and Monarch). Consecutive cores are joined by a bond of a sampled rank. Rank-1
  bonds are dropped and cores left with no axis removed; if that disconnects the graph, rank-1
  bonds are put back along the chain (as ``theta`` does), so the graph is always connected and
  the spec is already in its simplest spelling: dense, low rank, Kronecker, Monarch, BTT and
  tensor trains come out with the same canonical hash as their presets.
- ``theta``: the einsum-search exponents (alpha|beta|gamma|delta|epsilon|phi|rho). The input and
  output exponents are sampled by stick breaking (alpha, then beta as a share of 1 - alpha, gamma
  the rest), so they always sum to 1; the core's ``theta`` preset turns them into exact divisors.
  Shape-agnostic: the same dict fits the MLP's up and down projections.
- ``dense``: the unstructured matrix (the einsum-search sweeps also keep dense apart).

``feature_levels > 1`` samples a sum of levels (MLR over features), each with its own structure,
nested from coarse to fine like the sequence levels: level 0 has 2^b blocks (b sampled, up to
``max_blocks``), each further level 2^step times the blocks of the previous one (step 1 or 2);
a level whose blocks would no longer divide ``in`` and ``out`` (or exceed ``max_blocks``) ends
the list. Repeating a blocking would only re-sum the same block pattern.
"""

from __future__ import annotations

import math
from math import gcd
from typing import Any

from mlbtc_search.btc import BTC, reachable
from mlbtc_search.presets import divisors

from .options import MatrixOptions


def nearest_divisor(n: int, target: float) -> int:
    """The divisor of ``n`` nearest to ``target`` (ties go small): the ``theta`` preset's rule."""
    return min(divisors(n), key=lambda d: (abs(d - target), d))


def _levels_param(opts: MatrixOptions) -> bool:
    return opts.feature_levels > 1


def sample_matrix(trial: Any, name: str, opts: MatrixOptions, n_in: int, n_out: int) -> dict:
    """A MatrixSpec dict (``{levels: [...]}`` or ``{dense: {}}``) for an ``n_in -> n_out`` slot.

    Parameter names start with ``name`` (``attention.g0.l0.score.cores``, ...).
    """
    n_levels = 1
    if _levels_param(opts):
        n_levels = trial.suggest_int(f"{name}.levels", 1, opts.feature_levels)
    max_k = 1
    g = gcd(n_in, n_out)
    while max_k * 2 <= opts.max_blocks and g % (max_k * 2) == 0:
        max_k *= 2
    top = int(math.log2(max_k))
    levels = []
    prev_log2 = -1
    for lv in range(n_levels):
        p = f"{name}.l{lv}" if _levels_param(opts) else name
        if lv == 0:
            k_log2 = 0
            if opts.max_blocks > 1:
                k_log2 = trial.suggest_int(f"{p}.blocks_log2", 0, int(math.log2(opts.max_blocks)))
            k_log2 = min(k_log2, top)
        else:  # nested: every finer level has 2^step times the blocks of the previous one
            k_log2 = prev_log2 + trial.suggest_int(f"{p}.blocks_step", 1, 2)
            if k_log2 > top:
                break  # no finer blocking divides in and out: the list ends here
        prev_log2 = k_log2
        blocks = 2 ** k_log2
        form = opts.forms[0]
        if len(opts.forms) > 1:
            form = trial.suggest_categorical(f"{p}.form", list(opts.forms))
        n, m = n_in // blocks, n_out // blocks
        if form == "dense":
            levels.append({"blocks": blocks, "dense": {}})
        elif form == "theta":
            levels.append({"blocks": blocks, "theta": {"exponents": sample_theta(trial, p)}})
        else:
            levels.append({"blocks": blocks, "btc": sample_graph(trial, p, opts, n, m)})
    if len(levels) == 1 and levels[0]["blocks"] == 1 and "dense" in levels[0]:
        return {"dense": {}}
    return {"levels": levels}


def sample_theta(trial: Any, p: str) -> list[float]:
    """Seven exponents; input and output triples each sum to 1 by construction."""
    alpha = trial.suggest_float(f"{p}.theta.alpha", 0.0, 1.0)
    beta = (1 - alpha) * trial.suggest_float(f"{p}.theta.beta_share", 0.0, 1.0)
    delta = trial.suggest_float(f"{p}.theta.delta", 0.0, 1.0)
    eps = (1 - delta) * trial.suggest_float(f"{p}.theta.epsilon_share", 0.0, 1.0)
    rho = trial.suggest_float(f"{p}.theta.rho", 0.0, 1.0)
    a, b, d, e = (round(v, 4) for v in (alpha, beta, delta, eps))
    return [a, b, round(1 - a - b, 4), d, e, round(1 - d - e, 4), round(rho, 4)]


def factorize(trial: Any, p: str, n: int, max_axes: int) -> list[int]:
    """``n`` as a product of 1..max_axes axis sizes (size-1 axes dropped, at least one kept)."""
    k = trial.suggest_int(f"{p}.axes", 1, max_axes) if max_axes > 1 else 1
    sizes, rest = [], n
    for j in range(k - 1):
        u = trial.suggest_float(f"{p}.{j}.exp", 0.0, 1.0)
        s = nearest_divisor(rest, n ** u)
        sizes.append(s)
        rest //= s
    sizes.append(rest)
    return [s for s in sizes if s > 1] or [n]


def _run(trial: Any, p: str, c: int, max_cores: int) -> list[int]:
    """The cores an axis sits on: a contiguous run starting at floor(u * c)."""
    if c == 1:
        return [0]
    first = min(c - 1, int(trial.suggest_float(f"{p}.core", 0.0, 1.0) * c))
    span = trial.suggest_int(f"{p}.span", 1, max_cores)
    return list(range(first, min(c, first + span)))


def sample_graph(trial: Any, p: str, opts: MatrixOptions, n: int, m: int) -> dict:
    """A connected BTC dict (``in_axes``, ``out_axes``, ``bonds``, ``cores``) for n -> m."""
    c = trial.suggest_int(f"{p}.cores", 1, opts.cores) if opts.cores > 1 else 1
    ins = factorize(trial, f"{p}.in", n, opts.axes)
    outs = factorize(trial, f"{p}.out", m, opts.axes)
    runs_in = [_run(trial, f"{p}.in.{j}", c, opts.cores) for j in range(len(ins))]
    runs_out = [_run(trial, f"{p}.out.{j}", c, opts.cores) for j in range(len(outs))]
    lo, hi = opts.ranks
    ranks = [trial.suggest_int(f"{p}.bond.{k}", lo, hi, log=True) for k in range(c - 1)]
    ins, runs_in = merge_axes(ins, runs_in)
    outs, runs_out = merge_axes(outs, runs_out)
    cores: list[list[str]] = [[] for _ in range(c)]
    for side, runs in (("i", runs_in), ("o", runs_out)):
        for j, run in enumerate(runs):
            for k in run:
                cores[k].append(f"{side}{j}")
    return simplify(ins, outs, cores, ranks)


def merge_axes(sizes: list[int], runs: list[list[int]]) -> tuple[list[int], list[list[int]]]:
    """Adjacent axes on the same cores are one axis (the same map, fewer names): so a single
    core is always ``dense`` and a factorized low rank is ``low_rank``."""
    out_sizes, out_runs = [sizes[0]], [runs[0]]
    for s, r in zip(sizes[1:], runs[1:], strict=True):
        if r == out_runs[-1]:
            out_sizes[-1] *= s
        else:
            out_sizes.append(s)
            out_runs.append(r)
    return out_sizes, out_runs


def simplify(ins: list[int], outs: list[int], cores: list[list[str]],
             ranks: list[int]) -> dict:
    """The chain with rank-1 bonds dropped and empty cores removed (rank-1 bonds restored along
    the chain if that disconnects it). Returns the BTC dict; BTC validates it."""
    chain = [list(axes) for axes in cores]
    bonds: list[tuple[str, int]] = []
    for k, r in enumerate(ranks):
        if r > 1:
            bonds.append((f"r{k}", r))
            chain[k].append(f"r{k}")
            chain[k + 1].append(f"r{k}")
    kept = [axes for axes in chain if axes]
    in_axes = [(f"i{j}", s) for j, s in enumerate(ins)]
    out_axes = [(f"o{j}", s) for j, s in enumerate(outs)]
    if not _connected(in_axes, out_axes, kept):
        for k in range(len(kept) - 1):
            if not set(kept[k]) & set(kept[k + 1]):
                name = f"u{k}"
                bonds.append((name, 1))
                kept[k].append(name)
                kept[k + 1].append(name)
    btc = BTC(tuple(in_axes), tuple(out_axes), tuple(bonds), tuple(tuple(a) for a in kept))
    return btc.to_dict()


def _connected(in_axes: list, out_axes: list, cores: list[list[str]]) -> bool:
    nodes = [{a for a, _ in in_axes}, {a for a, _ in out_axes}] + [set(c) for c in cores]
    return len(reachable(nodes)) == len(nodes)

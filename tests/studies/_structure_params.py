"""Optuna parameter assignments that put the structural distributions on named structures
(shared by the structure tests and the reachability test). Every builder returns keys relative
to where it stands (``.cores``, ``.in.axes``); :func:`at` puts them under a prefix."""

from __future__ import annotations

import math

Run = tuple[int, int]  # (first core, span) of an axis


def at(prefix: str, rel: dict) -> dict:
    return {prefix + k: v for k, v in rel.items()}


def graph(ins: list[int], outs: list[int], in_runs: list[Run], out_runs: list[Run],
          bonds: list[int]) -> dict:
    """``sample_graph`` params for the chain described (the cores are ``len(bonds) + 1``)."""
    c = len(bonds) + 1
    d: dict = {".cores": c}
    for side, sizes, runs in (("in", ins, in_runs), ("out", outs, out_runs)):
        n = math.prod(sizes)
        d[f".{side}.axes"] = len(sizes)
        for j, s in enumerate(sizes[:-1]):
            d[f".{side}.{j}.exp"] = math.log(s) / math.log(n)
        if c > 1:
            for j, (first, span) in enumerate(runs):
                d[f".{side}.{j}.core"] = (first + 0.5) / c
                d[f".{side}.{j}.span"] = span
    for k, r in enumerate(bonds):
        d[f".bond.{k}"] = r
    return d


def dense(n: int, m: int) -> dict:
    return graph([n], [m], [(0, 1)], [(0, 1)], [])


def low_rank(n: int, m: int, r: int) -> dict:
    return graph([n], [m], [(0, 1)], [(1, 1)], [r])


def kronecker(ins: list[int], outs: list[int]) -> dict:
    return graph(ins, outs, [(0, 1), (1, 1)], [(0, 1), (1, 1)], [1])


def btt(ins: list[int], outs: list[int], rank: int) -> dict:
    """The btt preset: x over (i, j), y over (a, b); i and b sit on both cores."""
    return graph(ins, outs, [(0, 2), (0, 1)], [(1, 1), (0, 2)], [rank])


def tensor_train(ins: list[int], outs: list[int], ranks: list[int]) -> dict:
    runs = [(k, 1) for k in range(len(ins))]
    return graph(ins, outs, runs, runs, ranks)


def matrix(levels: list[tuple[int, dict]], feature_levels: bool = True) -> dict:
    """A matrix: [(blocks_log2, level params)], under ``.l{i}`` when feature levels are on;
    the blocks must grow 2x or 4x from level to level (nested)."""
    d: dict = {".levels": len(levels)} if feature_levels else {}
    prev = 0
    for i, (blocks_log2, rel) in enumerate(levels):
        prefix = f".l{i}" if feature_levels else ""
        blocks = {".blocks_log2": blocks_log2} if i == 0 else {".blocks_step": blocks_log2 - prev}
        d.update(at(prefix, {**blocks, **rel}))
        prev = blocks_log2
    return d


def group(levels: list[tuple[int, dict]] = (), local: bool = False,
          window_log2: int = 0) -> dict:
    """A head group: ``levels`` = [(halvings, score params)] (level 0's halvings is unused)."""
    d: dict = {".local": local}
    if local:
        d[".window_log2"] = window_log2
    else:
        d[".levels"] = len(levels)
    for i, (halvings, score) in enumerate(levels):
        if i > 0:
            d[f".l{i}.halvings"] = halvings
        d.update(at(f".l{i}.score", score))
    return d


def attention(heads: int, groups: list[dict], shares: tuple[float, ...] = ()) -> dict:
    d: dict = {".heads": heads, ".groups": len(groups)}
    for g, share in enumerate(shares):
        d[f".g{g}.share"] = share
    for g, rel in enumerate(groups):
        d.update(at(f".g{g}", rel))
    return d

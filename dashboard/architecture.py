"""A trial's spec -> the structured matrices it is made of and their contraction graphs.

Pure functions over the core (:class:`~mlbtc_search.model.ModelSpec`,
:func:`mlbtc_search.plan.graph`): no storage, no Dash.
"""

from __future__ import annotations

from typing import Any

import networkx as nx

from mlbtc_search.errors import SpecError
from mlbtc_search.matrix import MatrixSpec
from mlbtc_search.model import ModelSpec
from mlbtc_search.plan import graph

MAX_MATRICES = 40


def model_spec(spec: Any) -> ModelSpec:
    """The trial's ModelSpec; a SpecError says why a recorded spec cannot be rebuilt."""
    if not isinstance(spec, dict):
        raise SpecError("the trial records no spec (user attr 'spec')")
    return ModelSpec.from_dict(spec, path=("spec",))


def spec_matrices(spec: ModelSpec) -> list[tuple[str, MatrixSpec]]:
    """``(label, matrix)`` for each distinct structured matrix: every layer's score matrices
    (per head group and sequence level), W_V and W_O, then the two MLP matrices.

    Layers identical to an earlier one are skipped, so a uniform model lists layer 0 only.
    """
    out: list[tuple[str, MatrixSpec]] = []
    seen: list[Any] = []
    for i, attn in enumerate(spec.layers):
        if attn in seen:
            continue
        seen.append(attn)
        groups = attn.groups
        for g, group in enumerate(groups):
            where = f"layer {i}" + (f", head group {g} ({group.heads} heads)"
                                    if len(groups) > 1 else f" ({group.heads} heads)")
            for lv_i, lv in enumerate(group.levels):
                blocks = "global" if lv.block_size is None else f"blocks of {lv.block_size}"
                level = f", level {lv_i} ({blocks})" if len(group.levels) > 1 else ""
                window = f", window {group.window}" if group.window is not None else ""
                out.append((f"{where}{level}{window}: score matrix {lv.score.family}",
                            lv.score))
        out.append((f"layer {i}: value W_V {attn.value.family}", attn.value))
        out.append((f"layer {i}: output W_O {attn.output.family}", attn.output))
    D = spec.width
    out.append((f"MLP up {D}->{spec.mlp_up.n_out}: {spec.mlp_up.family}", spec.mlp_up))
    out.append((f"MLP down {spec.mlp_down.n_in}->{D}: {spec.mlp_down.family}", spec.mlp_down))
    return out[:MAX_MATRICES]


def matrix_panels(matrix: MatrixSpec) -> list[tuple[str, nx.MultiGraph, list[str]]]:
    """One ``(title, contraction graph, node order x, G0.., y)`` per level of ``matrix``."""
    panels = []
    for i, level in enumerate(matrix.levels):
        btc = level.btc
        order = ["x"] + [f"G{c}" for c in range(len(btc.cores))] + ["y"]
        blocks = f"{level.blocks} blocks of " if level.blocks > 1 else ""
        title = (f"level {i}: {blocks}{level.preset} {btc.n_out}x{btc.n_in}"
                 if len(matrix.levels) > 1 else f"{blocks}{level.preset} {btc.n_out}x{btc.n_in}")
        panels.append((title, graph(btc), order))
    return panels

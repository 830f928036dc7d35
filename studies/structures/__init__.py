"""Structural distributions: sample the MLBTC structure itself (contraction graphs, theta
exponents, feature and sequence levels, head groups) into plain spec dicts."""

from __future__ import annotations

from .attention import sample_attention, split_heads
from .matrix import factorize, nearest_divisor, sample_graph, sample_matrix, sample_theta
from .options import AttentionOptions, MatrixOptions, parse_options

__all__ = ["AttentionOptions", "MatrixOptions", "factorize", "nearest_divisor", "parse_options",
           "sample_attention", "sample_graph", "sample_matrix", "sample_theta", "split_heads"]

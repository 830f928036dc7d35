"""mlbtc_search: structured (MLBTC) matrices, attention and transformers, compiled to PyTorch.

The core package imports only torch, numpy, networkx and pyyaml (never optuna, ray or dash), so an
exported model loads with the core alone.
"""

from __future__ import annotations

from .btc import BTC
from .errors import MlbtcError, SpecError, TrainingError, UsageError
from .linear import StructuredLinear, compile_matrix
from .load import load
from .matrix import Level, MatrixSpec
from .model import ModelSpec, build_model
from .mup import make_adamw, param_groups
from .plan import bilinear_cut, flops, graph, params, plan

__all__ = [
    "BTC",
    "Level",
    "MatrixSpec",
    "MlbtcError",
    "ModelSpec",
    "SpecError",
    "StructuredLinear",
    "TrainingError",
    "UsageError",
    "bilinear_cut",
    "build_model",
    "compile_matrix",
    "flops",
    "graph",
    "load",
    "make_adamw",
    "param_groups",
    "params",
    "plan",
]
__version__ = "0.1.0"

"""mlbtc_search: structured (MLBTC) matrices, attention and transformers, compiled to PyTorch.

The core package imports only torch, numpy, networkx and pyyaml (never optuna, ray or dash), so an
exported model loads with the core alone. The re-exports below are resolved lazily (module
``__getattr__``): ``import mlbtc_search`` and ``mlbtc --help`` do not import torch (about 1.5 s);
``mlbtc_search.load(...)`` imports what it needs on first use.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

from .errors import MlbtcError, SpecError, TrainingError, UsageError

if TYPE_CHECKING:  # the lazy names, for type checkers and IDEs
    from .btc import BTC
    from .linear import StructuredLinear, compile_matrix
    from .load import load
    from .matrix import Level, MatrixSpec
    from .model import ModelSpec, build_model
    from .mup import make_adamw, param_groups
    from .plan import bilinear_cut, flops, graph, params, plan

_LAZY = {
    "BTC": "btc", "StructuredLinear": "linear", "compile_matrix": "linear", "load": "load",
    "Level": "matrix", "MatrixSpec": "matrix", "ModelSpec": "model", "build_model": "model",
    "make_adamw": "mup", "param_groups": "mup", "bilinear_cut": "plan", "flops": "plan",
    "graph": "plan", "params": "plan", "plan": "plan",
}

__all__ = [  # noqa: F822 (the lazy names are resolved by __getattr__)
    "BTC", "Level", "MatrixSpec", "MlbtcError", "ModelSpec", "SpecError", "StructuredLinear",
    "TrainingError", "UsageError", "bilinear_cut", "build_model", "compile_matrix", "flops",
    "graph", "load", "make_adamw", "param_groups", "params", "plan",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'mlbtc_search' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value  # resolved once
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


class _Package(types.ModuleType):
    """Importing submodule ``mlbtc_search.load`` (or ``.plan``) sets the package attribute of that
    name to the module; the functions ``load()`` and ``plan()`` must keep their names."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _LAZY and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package

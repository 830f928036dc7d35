"""mlbtc_search: structured (MLBTC) matrices, attention and transformers, compiled to PyTorch.

The core package imports only torch, numpy, networkx and pyyaml (never optuna, ray or dash), so an
exported model loads with the core alone.
"""

from __future__ import annotations

from .errors import MlbtcError, SpecError, TrainingError, UsageError

__all__ = ["MlbtcError", "SpecError", "TrainingError", "UsageError"]
__version__ = "0.1.0"

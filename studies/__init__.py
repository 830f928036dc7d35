"""Search spaces, Optuna sampling, Ray execution, storage, Pareto fronts and export.

Re-exports are resolved lazily, so ``import studies.pareto`` (the dashboard) does not import the
runner, torch or Ray.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "SearchSpace": "space", "PreparedSpace": "space", "Candidate": "space", "load_space": "space",
    "make_sampler": "space",
    "run_search": "runner", "SearchOutcome": "runner",
    "open_storage": "storage", "default_storage_url": "storage", "artifact_store": "storage",
    "artifact_dir_for": "storage", "list_studies": "storage", "load_study": "storage",
    "pareto_front": "pareto", "hypervolume_2d": "pareto", "study_rows": "pareto",
    "front_rows": "pareto", "hypervolume_history": "pareto",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'studies' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)

"""Search spaces, Optuna sampling, Ray execution, storage, Pareto fronts and export.

Re-exports are resolved lazily, so ``import studies.pareto`` (the dashboard) does not import the
runner, torch or Ray. The storage contract is :class:`TrialRecord` / :class:`StudyInfo`
(``studies.record``); every storage is opened through ``studies.storage``.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "SearchSpace": "space", "PreparedSpace": "space", "Candidate": "space", "load_space": "space",
    "make_sampler": "space",
    "run_search": "runner", "SearchOutcome": "runner",
    "TrialRecord": "record", "StudyInfo": "record", "encode_attr": "record",
    "open_storage": "storage", "resolve_url": "storage", "default_storage_url": "storage",
    "artifact_store": "storage", "artifact_dir_for": "storage", "list_studies": "storage",
    "load_study": "storage", "load_records": "storage", "read_artifact": "storage",
    "pareto_front": "pareto", "hypervolume_2d": "pareto", "front": "pareto",
    "hypervolume": "pareto", "hypervolume_history": "pareto", "study_summary": "pareto",
    "export_trial": "export", "export_zip": "export",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'studies' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)

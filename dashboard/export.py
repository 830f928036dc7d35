"""The trial page's export download: a zip, built in memory, of the `mlbtc export` layout.

::

    architecture.yaml    the complete ModelSpec (adapter, max_seq_len) + task {name, options}
    model.safetensors    the trial's weights artifact, byte for byte
    metrics.json         val_loss, metric, FLOPs/token, params, budget, seed, hash, provenance
    README.md            a short model card

Unpacked, the directory loads with ``mlbtc_search.load(directory)`` (core only). Nothing is
written to disk: the weights come from the artifact store by the id the storage records.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import re
import zipfile
from typing import Any

from mlbtc_search.errors import MlbtcError
from mlbtc_search.yamlio import dump_yaml

from .data import fmt, fmt_si, json_safe, objectives

FILES = ("architecture.yaml", "model.safetensors", "metrics.json", "README.md")


def archive_name(study_name: str, number: int) -> str:
    """A file name for the download (only ``[A-Za-z0-9_.-]`` from the study name)."""
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", study_name).strip("-.")[:60] or "study"
    return f"{slug}-trial{number}.zip"


def export_metrics(study_name: str, study_attrs: dict[str, Any], trial: Any) -> dict[str, Any]:
    """metrics.json: the same keys as ``mlbtc export`` writes; non-finite numbers are null."""
    ua = trial.user_attrs
    info = study_attrs.get("mlbtc") if isinstance(study_attrs.get("mlbtc"), dict) else {}
    obj = objectives(trial)
    train = ua.get("train") if isinstance(ua.get("train"), dict) else {}
    return json_safe({
        "study": study_name, "trial": trial.number,
        "val_loss": ua.get("val_loss", obj[0] if obj else None), "metric": ua.get("metric"),
        "metric_name": ua.get("metric_name"),
        "flops_per_token": ua.get("flops_per_token", obj[1] if obj else None),
        "params": ua.get("params"), "kv_cache_bytes_per_token": ua.get("kv_cache_bytes_per_token"),
        "budget_flops": ua.get("budget_flops", info.get("budget_flops")),
        "seed": ua.get("seed"), "steps": ua.get("steps"), "train_flops": ua.get("train_flops"),
        "family": ua.get("family"), "hash": ua.get("hash"),
        "code_version": ua.get("code_version", info.get("code_version")),
        "exported_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "exported_by": "mlbtc dashboard",
        "train": dict(train), "evaluation": _evaluation(train),
    })


def _evaluation(train: dict[str, Any]) -> dict[str, Any] | None:
    """How the trial was scored (``studies.export.evaluation_settings``), None if unknown."""
    from studies.export import evaluation_settings

    try:
        return evaluation_settings(train)
    except (MlbtcError, TypeError, ValueError):
        return None


def model_card(study_name: str, task: dict[str, Any], metrics: dict[str, Any],
               front_note: str) -> str:
    """README.md: what the model is, where it sits on the front, how to load it."""
    shown = []
    for key in ("val_loss", "metric", "flops_per_token", "params", "kv_cache_bytes_per_token",
                "budget_flops"):
        value = metrics.get(key)
        if value is not None:
            text = fmt_si(value) if key in ("flops_per_token", "budget_flops") else fmt(value, 6)
            shown.append(f"| {key} | {text} |")
    rows = "\n".join(shown)
    family, number = metrics.get("family"), metrics["trial"]
    return f"""# {family} transformer, trial {number} of study `{study_name}`

Trained on the `{task.get("name")}` task for {fmt_si(metrics.get("budget_flops"))} FLOPs by
`mlbtc search`; exported from the dashboard.

{front_note}

| metric | value |
|---|---|
| metric_name | {metrics.get("metric_name")} |
{rows}
| seed | {metrics.get("seed")} |
| hash | {metrics.get("hash")} |

## Load

```python
import mlbtc_search
model = mlbtc_search.load("THIS_DIRECTORY")   # eval mode; the core alone, nothing unpickled
```

`architecture.yaml` is the complete model spec (with its task), `model.safetensors` the weights.
"""


def export_zip(study_name: str, study_attrs: dict[str, Any], trial: Any, weights: bytes,
               front_note: str = "") -> bytes:
    """The zip archive of one trial (see the module docstring)."""
    info = study_attrs.get("mlbtc") if isinstance(study_attrs.get("mlbtc"), dict) else {}
    task = info.get("task") if isinstance(info.get("task"), dict) else {}
    task = {"name": task.get("name"), "options": dict(task.get("options") or {})}
    spec = dict(trial.user_attrs.get("spec") or {})
    if task.get("name"):
        spec["task"] = task
    header = (f"# Exported by the mlbtc dashboard from study {study_name!r}, trial "
              f"{trial.number}.\n# Load: import mlbtc_search; model = "
              "mlbtc_search.load(THIS_DIRECTORY)\n")
    metrics = export_metrics(study_name, study_attrs, trial)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("architecture.yaml", header + dump_yaml(json_safe(spec)))
        z.writestr("model.safetensors", weights)
        z.writestr("metrics.json", json.dumps(metrics, indent=2, allow_nan=False) + "\n")
        z.writestr("README.md", model_card(study_name, task, metrics, front_note))
    return buf.getvalue()

"""Studies with known trials, shaped like the STORAGE CONTRACT, for the dashboard tests.

Complete trials get real safetensors weights of a real ``build_model(spec)`` uploaded to the
study's FileSystemArtifactStore; ``trained_trials`` trains tiny real models with
``trainers.train.train``.
"""

from __future__ import annotations

import io
import math
import warnings
from pathlib import Path
from typing import Any

import optuna
from optuna.artifacts import FileSystemArtifactStore, upload_artifact
from optuna.trial import TrialState

from mlbtc_search.model import AdapterSpec, ModelSpec, build_model, kv_cache_bytes, model_params

ADAPTER = AdapterSpec("series", 1, 1)
SEQ_LEN = 32
TASK = {"name": "timeseries", "options": {"lookback": 24, "horizon": 8}}  # learns in 40 steps
BUDGET = 5e8
ATTENTIONS = {
    "standard": {"kind": "standard", "heads": 2},
    "mlr": {"kind": "mlr", "heads": 2, "ranks": [2, 1]},
    "bilinear_btt": {"kind": "bilinear_btt", "heads": 2, "rank": 1},
    "sliding_window": {"kind": "sliding_window", "heads": 2, "window": 4},
}


def tiny_spec(kind: str = "standard", width: int = 16, depth: int = 1,
              mlp: dict | None = None) -> ModelSpec:
    d: dict[str, Any] = {"width": width, "depth": depth, "attention": ATTENTIONS[kind],
                         "mlp_ratio": 2}
    if mlp is not None:
        d["mlp"] = mlp
    return ModelSpec.from_dict(d, adapter=ADAPTER, seq_len=SEQ_LEN)


def new_study(storage: Any, name: str, artifact_dir: Path) -> optuna.Study:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    artifact_dir.mkdir(parents=True, exist_ok=True)
    study = optuna.create_study(storage=storage, study_name=name,
                                directions=["minimize", "minimize"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(["val_loss", "flops_per_token"])
    study.set_user_attr("mlbtc", {
        "space": {"task": TASK}, "task": TASK, "budget_flops": BUDGET,
        "objectives": ["val_loss", "flops_per_token"], "artifact_dir": str(artifact_dir),
        "code_version": "test"})
    return study


def curve(loss: float, flops: float, steps: int = 6) -> list[dict[str, Any]]:
    out = []
    for s in range(1, steps + 1):
        entry: dict[str, Any] = {"step": s, "flops": 3 * flops * 64 * SEQ_LEN * s,
                                 "train_loss": loss * (1 + 1.0 / s)}
        if s % 2 == 0 or s == steps:
            entry["val_loss"] = loss * (1 + 0.8 / s)
            entry["metric"] = loss * 1.1
        out.append(entry)
    return out


def safetensors_bytes(spec: ModelSpec, seed: int = 0) -> bytes:
    import torch
    from safetensors.torch import save

    torch.manual_seed(seed)
    state = {k: v.detach().contiguous().clone() for k, v in build_model(spec).state_dict().items()}
    return save(state)


def base_attrs(spec: ModelSpec, status: str, seed: int = 0) -> dict[str, Any]:
    return {
        "status": status, "reason": None, "spec": spec.to_dict(), "hash": spec.hash(),
        "family": spec.family, "params": model_params(spec),
        "kv_cache_bytes_per_token": float(kv_cache_bytes(spec)), "seed": seed,
        "budget_flops": BUDGET, "code_version": "test"}


def add_trial(study: optuna.Study, state: str, spec: ModelSpec, *, loss: float | None = None,
              flops: float | None = None, reason: str | None = None, weights: bytes | None = None,
              seed: int = 0, **extra: Any) -> int:
    """Run one trial through ``study.ask``/``study.tell`` like the runner: attrs, weights
    artifact (for ``ok``), then the state. Returns the trial number."""
    store = FileSystemArtifactStore(study.user_attrs["mlbtc"]["artifact_dir"])
    trial = study.ask()
    attrs = base_attrs(spec, state, seed)
    flops = flops if flops is not None else 1e4
    attrs["flops_per_token"] = flops
    attrs["reason"] = reason
    if state == "ok":
        assert loss is not None
        attrs.update({"val_loss": loss, "metric": loss * 1.1, "metric_name": "mse",
                      "curve": curve(loss, flops), "steps": 6,
                      "train_flops": 3 * flops * 64 * SEQ_LEN * 6, "duration_s": 1.5})
        if weights is not None:
            attrs["weights_artifact_id"] = upload_artifact(
                artifact_store=store, file_path=_tmp_file(weights), study_or_trial=trial)
    attrs.update(extra)
    for k, v in attrs.items():
        trial.set_user_attr(k, v)
    if state == "ok":
        study.tell(trial, [loss, flops])
    elif state == "running":
        pass
    else:
        study.tell(trial, state=TrialState.FAIL)
    return trial.number


def _tmp_file(blob: bytes) -> str:
    import tempfile

    f = tempfile.NamedTemporaryFile(suffix=".safetensors", delete=False)
    with f:
        f.write(blob)
    return f.name


def trained_trials(study: optuna.Study, kinds: list[str], budget: float = BUDGET,
                   max_steps: int = 40) -> list[int]:
    """Train tiny real models with ``trainers.train.train`` and record them like the runner."""
    import torch
    from safetensors.torch import save

    from trainers.tasks import get_task
    from trainers.train import TrainConfig, train

    task = get_task(TASK["name"], **TASK["options"])
    store = FileSystemArtifactStore(study.user_attrs["mlbtc"]["artifact_dir"])
    numbers = []
    for seed, kind in enumerate(kinds):
        spec = tiny_spec(kind)
        torch.set_num_threads(1)
        result = train(spec, task, budget, seed=seed,
                       config=TrainConfig(batch_size=16, eval_batches=2, max_steps=max_steps,
                                          eval_every=max(1, max_steps // 8), lr=3e-3,
                                          threads=1))
        trial = study.ask()
        data = result.to_json()
        weights = save(result.state_dict())
        artifact_id = upload_artifact(artifact_store=store, file_path=_tmp_file(weights),
                                      study_or_trial=trial)
        attrs = {
            "status": "ok", "reason": None, "spec": data["spec"], "hash": data["hash"],
            "family": data["family"], "flops_per_token": data["flops_per_token"],
            "params": data["params"], "kv_cache_bytes_per_token": float(kv_cache_bytes(
                result.spec)), "val_loss": data["val_loss"], "metric": data["metric"],
            "metric_name": data["metric_name"], "curve": data["curve"], "seed": seed,
            "budget_flops": budget, "steps": data["steps"], "train_flops": data["train_flops"],
            "duration_s": data["seconds"], "code_version": "test",
            "weights_artifact_id": artifact_id}
        for k, v in attrs.items():
            trial.set_user_attr(k, v)
        loss = data["val_loss"] if data["val_loss"] is not None else math.inf
        study.tell(trial, [loss, data["flops_per_token"]])
        numbers.append(trial.number)
    return numbers


def read_zip(blob: bytes) -> dict[str, bytes]:
    import zipfile

    with zipfile.ZipFile(io.BytesIO(blob)) as z:
        return {n: z.read(n) for n in z.namelist()}

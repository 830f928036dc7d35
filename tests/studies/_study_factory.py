"""Real studies for tests that read the storage contract (export, dashboard, pareto, ...).

``make_study(storage_url, artifact_dir)`` records tiny but really trained models
(``trainers.train``) as COMPLETE trials with the contract's user attrs and a real safetensors
weights artifact, plus one infeasible, one failed and one duplicate trial, as the search runner
records them (the storage contract, :mod:`studies.record`: dicts and lists as JSON strings).
Training happens once per process and is cached; recording into a storage takes well under a
second.
"""

from __future__ import annotations

import functools
import tempfile
import warnings
from pathlib import Path
from typing import Any

import optuna
from safetensors.torch import save_file

from mlbtc_search.model import ModelSpec, kv_cache_bytes
from studies.record import StudyInfo, encode_attr
from trainers.tasks import get_task
from trainers.train import TrainConfig, TrainResult, train

# As the runner records it: the task's validated options (get_task(...).options).
TASK = {"name": "icl_regression", "options": dict(
    get_task("icl_regression", n_dims=4, n_points=8).options)}
BUDGET = 3e7
TRAIN = {"batch_size": 16, "eval_batches": 2}  # the trial's TrainConfig overrides ("train")
CONFIG = TrainConfig(**TRAIN)
CODE_VERSION = "test-0"
# Three architectures with distinct FLOPs/token (4672, 5120, 16896 at T=16).
SPECS: tuple[dict[str, Any], ...] = (
    {"width": 16, "depth": 1, "attention": {"kind": "mlr", "heads": 2, "ranks": [4, 2, 1, 1]},
     "mlp_ratio": 2},
    {"width": 16, "depth": 1, "attention": {"kind": "standard", "heads": 2}, "mlp_ratio": 2},
    {"width": 32, "depth": 1, "attention": {"kind": "standard", "heads": 4}, "mlp_ratio": 2},
)


def task():
    return get_task(TASK["name"], **TASK["options"])


@functools.cache
def trained(index: int, seed: int = 0) -> TrainResult:
    """The trained model of ``SPECS[index]`` (cached for the whole test process)."""
    t = task()
    spec = ModelSpec.from_dict(SPECS[index], seq_len=t.adapter.seq_len)
    result = train(spec, t, BUDGET, seed=seed, config=CONFIG)
    assert result.status == "ok", result.reason
    return result


def trial_attrs(result: TrainResult, weights_artifact_id: str | None = None) -> dict[str, Any]:
    """The contract's trial user attrs for a finished training run."""
    attrs = {
        "status": result.status, "reason": result.reason, "spec": result.spec.to_dict(),
        "hash": result.hash, "family": result.family,
        "flops_per_token": result.flops_per_token, "params": result.params,
        "kv_cache_bytes_per_token": kv_cache_bytes(result.spec),
        "val_loss": result.val_loss, "metric": result.metric, "metric_name": result.metric_name,
        "curve": [{k: e[k] for k in ("step", "flops", "train_loss", "val_loss", "metric")
                   if k in e} for e in result.curve],
        "seed": result.seed, "budget_flops": result.budget_flops, "steps": result.steps,
        "train_flops": result.train_flops, "duration_s": result.seconds,
        "code_version": CODE_VERSION, "train": dict(TRAIN),
    }
    if weights_artifact_id is not None:
        attrs["weights_artifact_id"] = weights_artifact_id
    return attrs


def make_study(storage_url: str, artifact_dir: str | Path, name: str = "tiny",
               models: tuple[int, ...] = (0, 1, 2), failures: bool = True) -> optuna.Study:
    """A study in ``storage_url`` holding ``models`` (indices into SPECS) as COMPLETE trials and,
    with ``failures``, an infeasible, a failed and a duplicate trial (numbers after them)."""
    artifact_dir = Path(artifact_dir).absolute()
    artifact_dir.mkdir(parents=True, exist_ok=True)
    store = optuna.artifacts.FileSystemArtifactStore(str(artifact_dir))
    study = optuna.create_study(storage=storage_url, study_name=name,
                                directions=["minimize", "minimize"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(["val_loss", "flops_per_token"])
    study.set_user_attr("mlbtc", StudyInfo(
        space={"name": name, "task": TASK, "budget_flops": BUDGET}, task=TASK,
        budget_flops=BUDGET, artifact_dir=str(artifact_dir), code_version=CODE_VERSION,
        identity={"train": dict(TRAIN), "seed": 0}).to_attr())
    for index in models:
        result = trained(index)
        trial = study.ask()
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "model.safetensors"
            save_file(result.state_dict(), str(path))
            artifact_id = optuna.artifacts.upload_artifact(
                artifact_store=store, file_path=str(path), study_or_trial=trial)
        for key, value in trial_attrs(result, artifact_id).items():
            trial.set_user_attr(key, encode_attr(value))
        study.tell(trial, [result.val_loss, result.flops_per_token])
    if failures:
        _fail(study, {"status": "infeasible",
                      "reason": "flops_per_token 1e9 > max_flops_per_token 1e6"})
        _fail(study, {"status": "failed", "reason": "TrainingError: budget too small"})
        _fail(study, {"status": "duplicate", "reason": "same architecture as trial 0",
                      "duplicate_of": 0})
    return study


def _fail(study: optuna.Study, attrs: dict[str, Any]) -> None:
    trial = study.ask()
    for key, value in attrs.items():
        trial.set_user_attr(key, value)
    study.tell(trial, state=optuna.trial.TrialState.FAIL)

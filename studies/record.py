"""The trial record: the storage contract of a study, in code.

A study made by ``mlbtc search`` is an ordinary Optuna study. Its directions are ``minimize``
for each objective (``val_loss``, ``flops_per_token``, then any extra ones, named with
``set_metric_names``). The study user attr ``mlbtc`` holds :class:`StudyInfo` (space, task,
budget, objectives, artifact directory, code version). Each trial's user attrs hold the fields
of :class:`TrialRecord`, one attr per field, under the field's name (``state`` is the attr
``status``; ``sampled`` is Optuna's own ``params``; times, values and the number are Optuna's).

Writers go through :func:`encode_attr`, readers through :meth:`TrialRecord.from_trial`:

- every dict or list value is stored as a compact JSON *string* (``spec``, ``train``,
  ``curve``, the study's ``mlbtc``). optuna-dashboard cuts JSON-dumped dicts and lists at 1,024
  characters (they arrive as broken JSON) but shows strings whole; readers also accept the
  dicts that older studies stored;
- every attr and artifact is written before ``tell`` (Optuna refuses changes afterwards);
- artifacts (Optuna's FileSystemArtifactStore, directory :attr:`StudyInfo.artifact_dir`):
  ``weights_artifact_id`` (safetensors, COMPLETE trials) and ``curve_artifact_id`` (the
  learning curve as JSON lines, readable in optuna-dashboard's table viewer).

Trial states (:attr:`TrialRecord.state`): ``complete``, ``running``, ``waiting``, ``failed``
(an error, NaN, divergence, a dead worker or driver), ``interrupted`` (Ctrl-C: re-queued, says
nothing about the architecture), ``infeasible`` and ``duplicate`` (never trained), ``pruned``.

Structure (issue 11): ``structure`` (the family label of ``studies.descriptors``),
``descriptors`` (``describe``: per layer and head group, with a flat ``summary``), ``seeds``,
``loss_std`` and ``seed_results`` (with ``seeds: k``, ``val_loss`` is the mean over the seeds).

Adding a field (per-trial structure descriptors, per-seed results, budget rungs): add it to
:class:`TrialRecord` with a default; its attr has the field's name; a dict or list is encoded
by :func:`encode_attr` and decoded by :func:`decode_attr` without further code. Nothing here
imports torch or Ray, so the dashboard reads records cheaply.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from mlbtc_search.yamlio import json_safe  # the one implementation, re-exported here

STATES = ("complete", "running", "waiting", "failed", "interrupted", "infeasible", "duplicate",
          "pruned")
INTERRUPTED_REASON = "interrupted"
STALE_REASON = "driver died (stale RUNNING trial)"
STUDY_ATTR = "mlbtc"
# Attrs never read in bulk (tables): only a trial page or an export reads them.
LAZY_ATTRS = ("curve",)


# ---- encoding ---------------------------------------------------------------------------------
def encode_attr(value: Any) -> Any:
    """The value as it is stored: dicts and lists become compact JSON strings (see module doc).

    Non-finite floats inside them become null; a non-finite scalar float stays a float (Optuna
    stores it).
    """
    if isinstance(value, Mapping | list | tuple):
        return json.dumps(json_safe(value), separators=(",", ":"), allow_nan=False,
                          default=str)
    return value


def decode_attr(value: Any) -> Any:
    """Inverse of :func:`encode_attr`: a string holding a JSON object or array is parsed."""
    if isinstance(value, str) and value[:1] in ("{", "["):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _str(value: Any) -> str | None:
    return None if value is None else str(value)


def _dict(value: Any) -> dict[str, Any]:
    value = decode_attr(value)
    return dict(value) if isinstance(value, dict) else {}


# ---- the study --------------------------------------------------------------------------------
@dataclass(frozen=True)
class StudyInfo:
    """The study user attr ``mlbtc`` (empty fields when a study was not made by mlbtc)."""

    space: dict[str, Any] = field(default_factory=dict)
    task: dict[str, Any] = field(default_factory=dict)
    budget_flops: float | None = None
    objectives: tuple[str, ...] = ("val_loss", "flops_per_token")
    artifact_dir: str | None = None
    code_version: str | None = None
    identity: dict[str, Any] = field(default_factory=dict)

    @property
    def task_name(self) -> str | None:
        return _str(self.task.get("name"))

    @property
    def made_by_mlbtc(self) -> bool:
        return bool(self.artifact_dir)

    @classmethod
    def from_attrs(cls, user_attrs: Mapping[str, Any]) -> StudyInfo:
        raw = _dict(user_attrs.get(STUDY_ATTR))
        objectives = raw.get("objectives")
        return cls(
            space=_dict(raw.get("space")), task=_dict(raw.get("task")),
            budget_flops=_num(raw.get("budget_flops")),
            objectives=tuple(objectives) if isinstance(objectives, list) and objectives
            else cls.objectives,
            artifact_dir=_str(raw.get("artifact_dir")),
            code_version=_str(raw.get("code_version")),
            identity={k: v for k, v in raw.items() if k not in (
                "space", "task", "budget_flops", "objectives", "artifact_dir", "code_version")},
        )

    def to_attr(self) -> str:
        """The encoded study attr (a JSON string)."""
        return encode_attr({"space": self.space, "task": self.task,
                            "budget_flops": self.budget_flops,
                            "objectives": list(self.objectives),
                            "artifact_dir": self.artifact_dir, "code_version": self.code_version,
                            **self.identity})


# ---- a trial ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrialRecord:
    """One trial as every reader sees it (see the module doc for the stored form).

    ``values`` are Optuna's objective values (COMPLETE trials only); ``val_loss`` and
    ``flops_per_token`` are the two objectives when there are values, else what the trial
    recorded (an infeasible trial still knows its FLOPs). ``params`` is the non-embedding
    parameter count; the sampled Optuna parameters are ``sampled``.
    """

    number: int
    state: str
    values: tuple[float, ...] | None = None
    val_loss: float | None = None
    flops_per_token: float | None = None
    params: int | None = None
    kv_cache_bytes_per_token: float | None = None
    metric: float | None = None
    metric_name: str | None = None
    family: str | None = None
    structure: str | None = None  # descriptors' family label (the per-family table's family)
    descriptors: dict[str, Any] = field(default_factory=dict)  # studies.descriptors.describe
    seeds: int | None = None  # seeds per architecture; val_loss is their mean
    loss_std: float | None = None  # standard deviation of val_loss over the seeds
    seed_results: list[dict[str, Any]] | None = None  # {seed, status, val_loss, ...} per seed
    hash: str | None = None
    spec: dict[str, Any] | None = None
    train: dict[str, Any] = field(default_factory=dict)
    seed: int | None = None
    budget_flops: float | None = None
    steps: int | None = None
    tokens: int | None = None
    train_flops: float | None = None
    train_status: str | None = None
    duration_s: float | None = None
    wall_s: float | None = None
    code_version: str | None = None
    reason: str | None = None
    duplicate_of: int | None = None
    retry_of: int | None = None
    retried: bool = False
    baseline: int | None = None
    weights_artifact_id: str | None = None
    curve_artifact_id: str | None = None
    curve: list[dict[str, Any]] | None = None  # a lazy attr: None when not read
    rungs: list[dict[str, Any]] | None = None  # multi-fidelity: one entry per finished rung,
    rung: int | None = None  # the highest good rung, the trial's compute over all rungs,
    spent_flops: float | None = None  # and the confirmation seeds (docs/scaling.md)
    confirm: dict[str, Any] | None = None
    node: str | None = None
    host: str | None = None
    pid: int | None = None
    sampled: dict[str, Any] = field(default_factory=dict)
    started: dt.datetime | None = None
    completed: dt.datetime | None = None
    trial_id: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # attrs this version does not know

    # ---- reading ---------------------------------------------------------------------------
    @classmethod
    def from_trial(cls, trial: Any, trial_id: int | None = None) -> TrialRecord:
        """From an Optuna FrozenTrial (or anything with its public attributes)."""
        return cls.from_parts(
            number=trial.number, optuna_state=trial.state.name, values=trial.values,
            user_attrs=trial.user_attrs, sampled=getattr(trial, "params", None) or {},
            started=trial.datetime_start, completed=trial.datetime_complete,
            trial_id=trial_id)

    @classmethod
    def from_parts(cls, *, number: int, optuna_state: str, values: Any,
                   user_attrs: Mapping[str, Any], sampled: Mapping[str, Any] | None = None,
                   started: dt.datetime | None = None, completed: dt.datetime | None = None,
                   trial_id: int | None = None) -> TrialRecord:
        """From the raw pieces of a stored trial (``optuna_state`` is a TrialState name)."""
        ua = {k: decode_attr(v) for k, v in user_attrs.items()}
        vals = tuple(float(v) for v in values) if values else None
        state = _state(optuna_state, ua.get("status"), ua.get("reason"))
        objectives = vals if state == "complete" and vals and len(vals) >= 2 else None
        known = {f.name for f in dataclasses.fields(cls)}
        reason = ua.get("reason")
        return cls(
            number=number, state=state, values=vals,
            val_loss=_num(objectives[0]) if objectives else _num(ua.get("val_loss")),
            flops_per_token=(_num(objectives[1]) if objectives
                             else _num(ua.get("flops_per_token"))),
            params=_int(ua.get("params")),
            kv_cache_bytes_per_token=_num(ua.get("kv_cache_bytes_per_token")),
            metric=_num(ua.get("metric")), metric_name=_str(ua.get("metric_name")),
            family=_str(ua.get("family")), structure=_str(ua.get("structure")),
            descriptors=_dict(ua.get("descriptors")), seeds=_int(ua.get("seeds")),
            loss_std=_num(ua.get("loss_std")),
            seed_results=ua["seed_results"] if isinstance(ua.get("seed_results"), list)
            else None, hash=_str(ua.get("hash")),
            spec=ua["spec"] if isinstance(ua.get("spec"), dict) else None,
            train=_dict(ua.get("train")), seed=_int(ua.get("seed")),
            budget_flops=_num(ua.get("budget_flops")), steps=_int(ua.get("steps")),
            tokens=_int(ua.get("tokens")), train_flops=_num(ua.get("train_flops")),
            train_status=_str(ua.get("train_status")), duration_s=_num(ua.get("duration_s")),
            wall_s=_num(ua.get("wall_s")), code_version=_str(ua.get("code_version")),
            reason=_str(reason), duplicate_of=_int(ua.get("duplicate_of")),
            retry_of=_int(ua.get("retry_of")), retried=ua.get("retried") is True,
            baseline=_int(ua.get("baseline")),
            weights_artifact_id=_str(ua.get("weights_artifact_id")),
            curve_artifact_id=_str(ua.get("curve_artifact_id")),
            curve=ua["curve"] if isinstance(ua.get("curve"), list) else None,
            rungs=ua["rungs"] if isinstance(ua.get("rungs"), list) else None,
            rung=_int(ua.get("rung")), spent_flops=_num(ua.get("spent_flops")),
            confirm=ua["confirm"] if isinstance(ua.get("confirm"), dict) else None,
            node=_str(ua.get("node")), host=_str(ua.get("host")), pid=_int(ua.get("pid")),
            sampled=dict(sampled or {}), started=started, completed=completed,
            trial_id=trial_id,
            extra={k: v for k, v in ua.items() if k not in known and k != "status"},
        )

    # ---- derived ---------------------------------------------------------------------------
    @property
    def point(self) -> tuple[float, float] | None:
        """``(val_loss, flops_per_token)`` of a COMPLETE trial with two finite values."""
        if self.state != "complete" or self.val_loss is None or self.flops_per_token is None:
            return None
        return self.val_loss, self.flops_per_token

    @property
    def exportable(self) -> bool:
        """COMPLETE, with finite objectives and a weights artifact."""
        return self.point is not None and self.weights_artifact_id is not None

    @property
    def trained(self) -> bool:
        """Counts towards a study's ``trials``: COMPLETE, or failed and not retried."""
        return self.state == "complete" or (self.state == "failed" and not self.retried)

    @property
    def why(self) -> str:
        """The reason as shown to people (duplicates name the trial they repeat)."""
        if self.state == "duplicate" and self.duplicate_of is not None:
            return f"duplicate of trial {self.duplicate_of}"
        return self.reason or ""

    def row(self) -> dict[str, Any]:
        """The trial as a flat, JSON-safe dict: THE row of every table (CLI, JSON, dashboard).

        Numbers stay numbers (None when unknown or not finite); times are ISO strings.
        """
        return json_safe({
            "number": self.number, "state": self.state, "family": self.family or "unknown",
            "structure": self.structure or self.family or "unknown",
            "loss_std": self.loss_std, "seeds": self.seeds or 1,
            "val_loss": self.val_loss, "flops_per_token": self.flops_per_token,
            "params": self.params, "metric": self.metric, "metric_name": self.metric_name or "",
            "kv_cache_bytes_per_token": self.kv_cache_bytes_per_token, "hash": self.hash,
            "values": list(self.values) if self.values else None,
            "sampled": self.sampled, "reason": self.why, "retry_of": self.retry_of,
            "duplicate_of": self.duplicate_of, "duration_s": self.duration_s,
            "started": self.started.isoformat() if self.started else None,
            "completed": self.completed.isoformat() if self.completed else None,
        })


def _state(optuna_state: str, status: Any, reason: Any) -> str:
    if optuna_state == "COMPLETE":
        return "complete"
    if optuna_state == "FAIL":
        if status in ("infeasible", "duplicate", "interrupted"):
            return str(status)
        if status == "failed" and reason == INTERRUPTED_REASON:
            return "interrupted"  # studies written before the state existed
        return "failed"
    return {"RUNNING": "running", "WAITING": "waiting", "PRUNED": "pruned"}.get(
        optuna_state, optuna_state.lower())


def records(trials: Any) -> list[TrialRecord]:
    """Records of Optuna trials (``study.get_trials(deepcopy=False)``), by number."""
    return sorted((TrialRecord.from_trial(t) for t in trials), key=lambda r: r.number)


__all__ = ["INTERRUPTED_REASON", "LAZY_ATTRS", "STALE_REASON", "STATES", "STUDY_ATTR",
           "StudyInfo", "TrialRecord", "decode_attr", "encode_attr", "json_safe", "records"]

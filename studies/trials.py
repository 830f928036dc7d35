"""The Optuna side of a search: open the study, ask for trainable candidates, record outcomes.

Only the driver runs this (the storage has one writer). It implements the STORAGE CONTRACT
(see ``studies/runner.py``) and the failure rules:

- *infeasible* (invalid architecture, over ``max_flops``/``max_params``, or so costly that the
  budget buys not one training step): told FAIL with ``status: infeasible`` and the reason as
  soon as it is sampled; never trained.
- *duplicate* (the same architecture hash, training settings and seed as a COMPLETE or running
  trial): told FAIL with ``status: duplicate`` and ``duplicate_of``; never trained. The training
  settings are part of the key because a space may search ``train.lr``.
- *failed* (an error, NaN, divergence, a dead worker, a dead driver): FAIL with ``status:
  failed`` and the reason. Failures that say nothing about the architecture (a dead worker or
  driver) are re-enqueued once with the same parameters; the new trial has ``retry_of`` and the
  failed one ``retried: true``.
- *interrupted* (Ctrl-C): FAIL with ``status: interrupted``; always re-enqueued, and never
  counted as failed.

What is written is :class:`studies.record.TrialRecord` (dicts and lists as JSON strings, through
:func:`studies.record.encode_attr`); every attr and artifact is written before ``tell``.

"Trials" in ``space.trials`` counts trained trials: COMPLETE plus failed ones that will not be
retried. Infeasible and duplicate proposals do not count (they cost no training).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import statistics
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.artifacts import FileSystemArtifactStore, upload_artifact
from optuna.trial import TrialState

from mlbtc_search.errors import UsageError

from .pareto import hv_point, hypervolume_2d, pareto_front
from .progress import Snapshot
from .record import (
    INTERRUPTED_REASON,
    STALE_REASON,
    STUDY_ATTR,
    StudyInfo,
    TrialRecord,
    encode_attr,
)
from .space import Candidate, SearchSpace, make_sampler
from .storage import artifact_dir_for, study_info, study_names

log = logging.getLogger(__name__)

MAX_CONSECUTIVE_REJECTS = 50
# Settings that make results comparable: a study refuses to continue under other values.
IDENTITY_KEYS = ("space_hash", "task", "budget_flops", "train", "seed", "objectives")


@contextlib.contextmanager
def quiet_optuna() -> Iterator[None]:
    """Optuna without its per-trial INFO lines and experimental-API warnings."""
    level = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            yield
    finally:
        optuna.logging.set_verbosity(level)


def code_version() -> str:
    """``mlbtc_search.__version__`` plus the git commit of the source tree when there is one
    (read from ``.git`` directly: no subprocess)."""
    import mlbtc_search

    version = mlbtc_search.__version__
    git = Path(mlbtc_search.__file__).resolve().parent.parent / ".git"
    with contextlib.suppress(OSError, ValueError, StopIteration):
        head = (git / "HEAD").read_text().strip()
        sha = head
        if head.startswith("ref: "):
            ref = head[5:]
            if (git / ref).is_file():
                sha = (git / ref).read_text().strip()
            else:
                packed = (git / "packed-refs").read_text().splitlines()
                sha = next(line.split()[0] for line in packed if line.endswith(" " + ref))
        if len(sha) >= 7 and all(c in "0123456789abcdef" for c in sha):
            version += f"+g{sha[:7]}"
    return version


def study_identity(space: SearchSpace) -> dict[str, Any]:
    return {"space_hash": space.hash(), "task": space.task, "budget_flops": space.budget_flops,
            "train": dict(space.train), "seed": space.seed, "objectives": list(space.objectives)}


@dataclass(frozen=True)
class OpenedStudy:
    """The study a search writes, its artifact directory, and whether it already existed."""

    study: optuna.Study
    artifact_dir: Path
    resumed: bool


def open_study(storage: optuna.storages.BaseStorage, space: SearchSpace, url: str,
               version: str) -> OpenedStudy:
    """Create the study, or load it to resume.

    Resuming under a different space, task, budget, training settings, seed or objectives is a
    UsageError (the old and new trials would not be comparable); ``trials``, ``workers``,
    ``constraints`` and ``baselines`` may change.
    """
    identity = json.loads(encode_attr(study_identity(space)))
    sampler = make_sampler(space)
    resumed = space.name in study_names(storage)
    with quiet_optuna():
        if resumed:
            study = optuna.load_study(study_name=space.name, storage=storage, sampler=sampler)
            old = study_info(study)
            if not old.made_by_mlbtc:
                raise UsageError(f"study {space.name!r} exists in this storage but was not made "
                                 "by mlbtc search; choose another name with --name")
            recorded = {**old.identity, "task": old.task, "budget_flops": old.budget_flops,
                        "objectives": list(old.objectives)}
            changed = [k for k in IDENTITY_KEYS if recorded.get(k, identity[k]) != identity[k]]
            if changed:
                raise UsageError(
                    f"study {space.name!r} exists with a different {', '.join(changed)} than "
                    f"{space.source}; its trials would not be comparable: start a new study "
                    "with --name NEW, or restore the file")
            artifact_dir = Path(str(old.artifact_dir))
        else:
            directions = ["minimize"] * len(space.objectives)
            study = optuna.create_study(storage=storage, sampler=sampler,
                                        study_name=space.name, directions=directions)
            study.set_metric_names(list(space.objectives))
            artifact_dir = artifact_dir_for(url, space.name)
        info = StudyInfo(
            space=space.to_dict(), task=dict(space.task), budget_flops=space.budget_flops,
            objectives=tuple(space.objectives), artifact_dir=str(artifact_dir),
            code_version=version,
            identity={k: identity[k] for k in ("space_hash", "train", "seed")})
        study.set_user_attr(STUDY_ATTR, info.to_attr())
    artifact_dir.mkdir(parents=True, exist_ok=True)
    return OpenedStudy(study, artifact_dir, resumed)


def dedup_key(spec_hash: str, train: dict[str, Any], seed: int) -> str:
    blob = json.dumps({"train": train, "seed": seed}, sort_keys=True, default=str)
    return f"{spec_hash}:{hashlib.sha256(blob.encode()).hexdigest()[:12]}"


@dataclass
class Pending:
    """A trial that was asked, found trainable and handed to a worker."""

    trial: optuna.Trial
    candidate: Candidate
    key: str
    retry_of: int | None
    submitted: float = field(default_factory=time.monotonic)


@dataclass
class Counts:
    ok: int = 0
    failed: int = 0
    failed_final: int = 0  # failed and not retried: counts towards space.trials
    interrupted: int = 0  # Ctrl-C: re-queued, neither done nor failed
    infeasible: int = 0
    duplicate: int = 0

    @property
    def done(self) -> int:
        return self.ok + self.failed_final


class Recorder:
    """Asks, checks and records the trials of one study (see the module doc)."""

    def __init__(self, study: optuna.Study, space: SearchSpace,
                 storage: optuna.storages.BaseStorage, store: FileSystemArtifactStore,
                 version: str):
        self.study = study
        self.space = space
        self.storage = storage
        self.store = store
        self.version = version
        self.counts = Counts()
        self.known: dict[str, int] = {}  # dedup key -> trial number (COMPLETE or running)
        self.points: list[tuple[float, float]] = []  # (loss, flops) of COMPLETE trials
        self.train_seconds = 0.0
        self._task: Any = None  # the task, built on first use (cost checks)
        self._trials = study.get_trials(deepcopy=False)
        for t in self._trials:
            self._count(TrialRecord.from_trial(t))

    # ---- reading the study ---------------------------------------------------------------
    def _count(self, r: TrialRecord) -> None:
        if r.state == "complete":
            self.counts.ok += 1
            if r.hash is not None:
                self.known[dedup_key(r.hash, r.train, r.seed or 0)] = r.number
            if r.point is not None:
                self.points.append(r.point)
        elif r.state in ("infeasible", "duplicate", "interrupted", "failed"):
            setattr(self.counts, r.state, getattr(self.counts, r.state) + 1)
            if r.state == "failed" and not r.retried:
                self.counts.failed_final += 1

    def reap_stale(self) -> list[int]:
        """Fail the trials a killed driver left RUNNING; re-enqueue each once."""
        stale = [t for t in self._trials if t.state == TrialState.RUNNING
                 and "rungs" not in t.user_attrs]  # multi-fidelity trials resume instead
        study_id = self.storage.get_study_id_from_name(self.study.study_name)
        for t in stale:
            retry = t.user_attrs.get("retry_of") is None
            trial_id = self.storage.get_trial_id_from_study_id_trial_number(study_id, t.number)
            attrs = {"status": "failed", "reason": STALE_REASON, **({"retried": True} if retry
                                                                    else {})}
            with quiet_optuna():
                for key, value in attrs.items():
                    self.storage.set_trial_user_attr(trial_id, key, value)
                self.study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)
                if retry:
                    self.study.enqueue_trial(dict(t.params), user_attrs={"retry_of": t.number})
            self.counts.failed += 1
            self.counts.failed_final += 0 if retry else 1
        self._trials = []
        return [t.number for t in stale]

    def enqueue_baselines(self) -> None:
        """Baselines go first (WAITING trials are asked before any sampled one), once."""
        with quiet_optuna():
            for i, baseline in enumerate(self.space.baselines):
                self.study.enqueue_trial(self.space.fixed_params(baseline),
                                         user_attrs={"baseline": i}, skip_if_exists=True)

    # ---- asking ----------------------------------------------------------------------------
    def ask(self) -> Pending | None:
        """The next trainable candidate; None once MAX_CONSECUTIVE_REJECTS proposals in a row
        were infeasible or duplicates (the space is exhausted or over-constrained)."""
        for _ in range(MAX_CONSECUTIVE_REJECTS):
            with quiet_optuna():
                trial = self.study.ask()
                cand = self.space.sample(trial)
            retry_of = trial.user_attrs.get("retry_of")
            base = {"seed": self.space.seed, "seeds": self.space.seeds,
                    "budget_flops": self.space.budget_flops,
                    "code_version": self.version, "train": cand.train}
            if cand.spec is None or not cand.feasible:
                self._reject(trial, {**base, **_costs(cand), "status": "infeasible",
                                     "reason": cand.error or cand.reason})
                self.counts.infeasible += 1
                continue
            too_small = self._budget_problem(cand)
            if too_small:
                self._reject(trial, {**base, **_costs(cand), "status": "infeasible",
                                     "reason": too_small})
                self.counts.infeasible += 1
                continue
            key = dedup_key(cand.spec.hash(), cand.train, self.space.seed)
            if key in self.known:
                other = self.known[key]
                self._reject(trial, {**base, **_describe(cand), "status": "duplicate",
                                     "reason": f"same architecture and training settings as "
                                               f"trial {other}", "duplicate_of": other})
                self.counts.duplicate += 1
                continue
            self._set_attrs(trial, {**base, **_describe(cand)})
            self.known[key] = trial.number
            return Pending(trial, cand, key, retry_of)
        return None

    def _budget_problem(self, cand: Candidate) -> str | None:
        """Why the budget cannot buy one training step of ``cand`` (None if it can)."""
        from trainers.tasks import get_task
        from trainers.train import StepCosts, TrainConfig

        if self._task is None:
            self._task = get_task(self.space.task["name"], **self.space.task["options"])
        assert cand.spec is not None
        batch = TrainConfig(**cand.train).batch_size
        first = StepCosts(cand.spec, self._task, batch)(0)
        if first <= self.space.budget_flops:
            return None
        return (f"budget too small for one step: one step costs {first:.4g} FLOPs "
                f"(batch {batch}), budget is {self.space.budget_flops:.4g}")

    def _reject(self, trial: optuna.Trial, attrs: dict[str, Any]) -> None:
        self._set_attrs(trial, attrs)
        with quiet_optuna():
            self.study.tell(trial, state=TrialState.FAIL)

    @staticmethod
    def _set_attrs(trial: optuna.Trial, attrs: dict[str, Any]) -> None:
        for key, value in attrs.items():
            trial.set_user_attr(key, encode_attr(value))

    def payload(self, p: Pending) -> dict[str, Any]:
        """What :func:`studies.worker.run_trial` needs (plain JSON-able data)."""
        assert p.candidate.spec is not None
        return self.trial_payload(p.trial.number, p.candidate.spec.to_dict(), p.candidate.train)

    def trial_payload(self, number: int, spec: dict[str, Any], train: dict[str, Any]
                      ) -> dict[str, Any]:
        """The worker payload of trial ``number`` (also that of a resumed multi-fidelity trial,
        rebuilt from its attrs): the spec, task, budget, seeds, training settings, resources."""
        train = dict(train)
        cpus, gpus = self.space.resources["cpus"], self.space.resources["gpus"]
        if gpus > 0 and "device" not in train:
            train["device"] = "cuda"
        return {
            "trial": number, "spec": spec, "task": self.space.task,
            "budget_flops": self.space.budget_flops, "seed": self.space.seed,
            "seeds": self.space.seeds, "train": train,
            "threads": int(train.get("threads") or max(1, int(cpus))), "gpus": gpus,
            "objectives": list(self.space.objectives),
        }

    # ---- recording -------------------------------------------------------------------------
    def record(self, p: Pending, out: dict[str, Any]) -> str:
        """Record a worker's answer (:func:`studies.worker.run_trial`); returns the status."""
        where = {k: out.get(k) for k in ("node", "host", "pid") if out.get(k) is not None}
        wall = time.monotonic() - p.submitted
        if "error" in out:
            return self.fail(p, out["error"], retry=False, attrs={**where, "wall_s": wall})
        res = out["result"]
        self.train_seconds += float(res.get("seconds") or 0.0)
        attrs = {
            **where, "spec": res["spec"], "hash": res["hash"], "family": res["family"],
            "flops_per_token": res["flops_per_token"], "params": res["params"],
            "val_loss": res["val_loss"], "metric": res["metric"],
            "metric_name": res["metric_name"], "curve": res["curve"], "seed": res["seed"],
            "budget_flops": res["budget_flops"], "steps": res["steps"],
            "tokens": res["tokens"], "train_flops": res["train_flops"],
            "duration_s": res["seconds"], "wall_s": wall, "code_version": self.version,
            "train_status": res["status"],
        }
        for key in ("latency_s", "cpu_s", "gpu"):
            if key in out:
                attrs[key] = out[key]
        seeds = out.get("seed_results") or [res]
        bad = next((r for r in seeds if r["status"] != "ok" or r.get("val_loss") is None
                    or not math.isfinite(r["val_loss"])), None)
        if bad is not None:
            reason = bad.get("reason") or f"training ended with status {bad['status']}"
            if bad["status"] == "interrupted":
                reason = INTERRUPTED_REASON
            elif len(seeds) > 1:
                reason = f"seed {bad['seed']}: {reason}"
            return self.fail(p, reason, retry=False, attrs=attrs)
        if len(seeds) > 1:  # the objective is the mean over seeds; the spread is recorded
            res = {**res, **seed_summary(seeds)}
            attrs.update(val_loss=res["val_loss"], metric=res["metric"],
                         loss_std=res["loss_std"], seed_results=seeds,
                         duration_s=res["seconds"])
        values = self._values(p.candidate, res, out)
        attrs["weights_artifact_id"] = self._upload(
            p.trial, out["weights"], "safetensors", "application/octet-stream")
        attrs["curve_artifact_id"] = self._upload(
            p.trial, curve_jsonl(res["curve"]), "jsonl", "application/jsonl")
        self._set_attrs(p.trial, {**attrs, "status": "ok", "reason": None})
        with quiet_optuna():
            self.study.tell(p.trial, values)
        self.counts.ok += 1
        self.points.append((values[0], values[1]))
        return "ok"

    def _values(self, cand: Candidate, res: dict[str, Any], out: dict[str, Any]) -> list[float]:
        extra = {"params": res["params"], "kv_cache_bytes": cand.kv_cache_bytes,
                 "latency": out.get("latency_s")}
        values = [float(res["val_loss"]), float(res["flops_per_token"])]
        for name in self.space.objectives[2:]:
            values.append(float(extra[name]) if extra[name] is not None else math.nan)
        return values

    def _upload(self, trial: optuna.Trial, blob: bytes, suffix: str, mimetype: str) -> str:
        kind = "weights" if suffix == "safetensors" else "curve"
        with tempfile.TemporaryDirectory(prefix="mlbtc-artifact-") as tmp:
            path = os.path.join(tmp, f"trial-{trial.number}-{kind}.{suffix}")
            with open(path, "wb") as fh:
                fh.write(blob)
            with quiet_optuna():
                return upload_artifact(artifact_store=self.store, file_path=path,
                                       study_or_trial=trial, mimetype=mimetype)

    def fail(self, p: Pending, reason: str, retry: bool,
             attrs: dict[str, Any] | None = None) -> str:
        """FAIL ``p`` with ``status: failed``; re-enqueue it once when ``retry``.

        An interruption (reason ``interrupted``) is ``status: interrupted`` and always
        re-enqueued: it says nothing about the architecture.
        """
        interrupted = reason == INTERRUPTED_REASON
        retry = interrupted or (retry and p.retry_of is None)
        status = "interrupted" if interrupted else "failed"
        final = {**(attrs or {}), "status": status, "reason": reason}
        if retry:
            final["retried"] = True
        self._set_attrs(p.trial, final)
        with quiet_optuna():
            self.study.tell(p.trial, state=TrialState.FAIL, skip_if_finished=True)
            if retry:
                self.study.enqueue_trial(dict(p.trial.params),
                                         user_attrs={"retry_of": p.trial.number})
        if self.known.get(p.key) == p.trial.number:
            del self.known[p.key]
        if interrupted:
            self.counts.interrupted += 1
        else:
            self.counts.failed += 1
            self.counts.failed_final += 0 if retry else 1
        return status

    # ---- progress ---------------------------------------------------------------------------
    def snapshot(self, running: int, elapsed: float, eta: float | None) -> Snapshot:
        hv_points = [hv_point(loss, flops) for loss, flops in self.points]
        front = pareto_front(self.points)
        return Snapshot(
            target=self.space.trials, done=self.counts.done, ok=self.counts.ok,
            running=running, failed=self.counts.failed,
            interrupted=self.counts.interrupted, infeasible=self.counts.infeasible,
            duplicate=self.counts.duplicate, front_size=len(front),
            hypervolume=hypervolume_2d(hv_points) if hv_points else None,
            elapsed_s=elapsed, eta_s=eta)


def _costs(cand: Candidate) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if cand.flops_per_token is not None:
        out["flops_per_token"] = cand.flops_per_token
    if cand.params_count is not None:
        out["params"] = cand.params_count
    if cand.kv_cache_bytes is not None:
        out["kv_cache_bytes_per_token"] = cand.kv_cache_bytes
    if cand.spec is not None:
        out.update(spec=cand.spec.to_dict(), hash=cand.spec.hash(), family=cand.spec.family)
    return out


def _describe(cand: Candidate) -> dict[str, Any]:
    """Costs, the structure label (the per-family table's family) and the descriptors."""
    from .descriptors import describe

    assert cand.spec is not None
    desc = describe(cand.spec)
    return {**_costs(cand), "structure": desc["family"], "descriptors": desc}


def seed_summary(seeds: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean loss and metric over seeds, the loss's standard deviation (n - 1), total seconds."""
    losses = [float(r["val_loss"]) for r in seeds]
    metrics = [float(r["metric"]) for r in seeds if r.get("metric") is not None]
    return {"val_loss": statistics.fmean(losses),
            "loss_std": statistics.stdev(losses) if len(losses) > 1 else 0.0,
            "metric": statistics.fmean(metrics) if metrics else None,
            "seconds": sum(float(r.get("seconds") or 0.0) for r in seeds)}


def curve_jsonl(curve: Any) -> bytes:
    """The learning curve as JSON lines (one evaluation per line), for the curve artifact."""
    rows = curve if isinstance(curve, list) else []
    return "".join(encode_attr(r) + "\n" for r in rows if isinstance(r, dict)).encode()


__all__ = ["Counts", "OpenedStudy", "Pending", "Recorder", "STALE_REASON", "code_version",
           "curve_jsonl", "dedup_key", "open_study", "quiet_optuna", "study_identity"]

"""A multi-fidelity search: budget rungs on Ray, every rung recorded on the same Optuna trial.

Used by :func:`studies.runner.run_search` when the space has ``budgets:``; docs/scaling.md
describes the rules and the attrs. The driver keeps ``workers`` jobs (one rung of one trial
each, :func:`studies.rung_worker.run_rung`) in flight. A free worker takes the
:class:`~studies.rungs.Ladder`'s next promotion (highest rung first), else starts a new
architecture at rung 0, so no worker waits for a rung to fill. A promoted trial continues each
of its seeds from the state its previous rung kept (:mod:`trainers.continuation`; the states
travel through Ray and are kept as artifacts, ``state_artifact_ids``), else it retrains.

A trial is asked at rung 0 and stays RUNNING while it can still be promoted; each finished rung
is written on it at once (:mod:`studies.rung_record`). It is told (with the values of its
highest rung) once it is settled: it reached the top rung, its last rung failed, more results
dominate it at its rung than that rung can ever promote, or the search ends. With ``confirm:
{seeds: n}`` the top rung's front stays open until the end and is retrained with the seeds it
lacks. A killed driver leaves open trials RUNNING with their finished rungs; the next run of the
same file replays them into the ladder (:meth:`MultiFidelityRun._replay`).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

from optuna.trial import TrialState

from .record import decode_attr
from .rung_record import (
    best_rung_attrs,
    confirm_summary,
    interrupted,
    rung_entry,
    upload,
    write_attrs,
)
from .rung_worker import run_rung
from .rungs import Ladder
from .runner import POLL_S, _Run, _worker_error
from .trials import Pending, curve_jsonl, dedup_key, quiet_optuna

log = logging.getLogger(__name__)


# ---- the driver side --------------------------------------------------------------------------
@dataclass
class OpenTrial:
    """A trial that is still RUNNING: its finished rungs and what its next rung needs."""

    number: int
    trial_id: int
    payload: dict[str, Any]  # the worker payload without budget and state
    attrs: dict[str, Any] = field(default_factory=dict)  # record fields of its best rung
    rungs: list[dict[str, Any]] = field(default_factory=list)
    curve: list[dict[str, Any]] = field(default_factory=list)
    states: list[bytes | None] | None = None  # one per seed: the state to continue from
    pending: Pending | None = None  # set while rung 0 trains (asked by this driver)


@dataclass
class Job:
    number: int
    rung: int
    seed: int
    confirm: bool = False
    pending: Pending | None = None
    submitted: float = field(default_factory=time.monotonic)


class MultiFidelityRun(_Run):
    """The loop of :class:`studies.runner._Run` with rungs (see the module doc)."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        assert self.space.rungs is not None
        self.schedule = self.space.rungs
        self.ladder = Ladder(self.schedule)
        self.open: dict[int, OpenTrial] = {}
        self.jobs: dict[Any, Job] = {}
        self.in_flight = self.jobs  # the base class counts running jobs through it
        self.confirmed: set[int] = set()
        # confirm: {seeds: n} adds the seeds the top rung does not have yet (it trains `seeds`)
        self.confirm_extra = max(0, self.space.confirm_seeds - self.space.seeds)
        self._replay()

    # ---- resume -----------------------------------------------------------------------------
    def _replay(self) -> None:
        storage, study = self.recorder.storage, self.recorder.study
        study_id = storage.get_study_id_from_name(study.study_name)
        for t in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number):
            rungs = decode_attr(t.user_attrs.get("rungs"))
            if not isinstance(rungs, list) or not rungs:
                continue
            for entry in rungs:
                k = int(entry["rung"])
                if k > 0:
                    self.ladder.mark_promoted(t.number, k - 1)
                self.ladder.record(t.number, k, _loss(entry), float(entry["flops_per_token"]),
                                   float(entry.get("spent_flops") or 0.0))
            if t.state != TrialState.RUNNING:
                self.ladder.close(t.number)
                continue
            ua = {k: decode_attr(v) for k, v in t.user_attrs.items()}
            trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, t.number)
            ids = ua.get("state_artifact_ids") or [ua.get("state_artifact_id")]  # older: one
            states = [self._read_state(t.number, i) for i in ids][:self.space.seeds]
            states += [None] * (self.space.seeds - len(states))
            if ua.get("hash") is not None:  # a resumed open trial is not proposed again
                key = dedup_key(ua["hash"], dict(ua.get("train") or {}), int(ua.get("seed") or 0))
                self.recorder.known[key] = t.number
            self.open[t.number] = OpenTrial(
                t.number, trial_id, self.recorder.trial_payload(
                    t.number, ua["spec"], ua.get("train") or {}), attrs=ua, rungs=list(rungs),
                curve=list(ua.get("curve") or []), states=states)
        if self.open:
            self.progress.message(f"resuming {len(self.open)} open multi-fidelity trial(s) "
                                  f"with {sum(len(o.rungs) for o in self.open.values())} "
                                  "finished rung(s)")

    def _read_state(self, number: int, artifact_id: str | None) -> bytes | None:
        if not artifact_id:
            return None
        try:
            with self.recorder.store.open_reader(artifact_id) as f:
                return f.read()
        except Exception as exc:  # noqa: BLE001 - then the next rung retrains this seed
            log.warning("trial %d: no continuation state (%s)", number, exc)
            return None

    # ---- the loop -----------------------------------------------------------------------------
    def started(self) -> int:
        """Architectures trained (or training) at rung 0."""
        return len(self.ladder.results(0)) + sum(1 for j in self.jobs.values()
                                                 if j.rung == 0 and not j.confirm)

    def future(self) -> int:
        """How many more rung-0 results can still arrive."""
        running = sum(1 for j in self.jobs.values() if j.rung == 0 and not j.confirm)
        new = 0 if self.exhausted else max(0, self.space.trials - self.started())
        return running + new

    def loop(self) -> None:
        import ray

        submit = _remote(self.space)
        self._settle()
        while not self.stop.requested:
            self._fill(submit)
            self.progress.update(self.snap())
            if not self.jobs:
                if self._confirm_queue():
                    self._fill_confirm(submit)
                    continue
                break
            ready, rest = ray.wait(list(self.jobs), num_returns=1, timeout=POLL_S)
            if ready and rest:
                more, _ = ray.wait(rest, num_returns=len(rest), timeout=0)
                ready += more
            for ref in ready:
                job = self.jobs.pop(ref)
                self.new_trials += job.rung == 0 and not job.confirm
                self._collect(ref, job)
            if ready:
                self.last_result = time.monotonic()
                self._settle()
        if self.stop.requested:
            self._interrupt_jobs()
        else:
            self._settle(final=True)

    def _fill(self, submit: Any) -> None:
        while not self.stop.requested and len(self.jobs) < self.space.workers:
            nxt = self.ladder.next_promotion()
            if nxt is not None:
                number, rung = nxt
                self._submit(submit, Job(number, rung, self.space.seed))
                continue
            if self.exhausted or self.started() >= self.space.trials:
                return
            pending = self.recorder.ask()
            if pending is None:
                self.exhausted = True
                self.progress.message("stopping: the sampler proposed only infeasible or "
                                      "duplicate candidates for a while (space exhausted?)")
                return
            number = pending.trial.number
            payload = self.recorder.payload(pending)
            del payload["budget_flops"]  # each rung job sets its own
            study_id = self.recorder.storage.get_study_id_from_name(self.space.name)
            trial_id = self.recorder.storage.get_trial_id_from_study_id_trial_number(
                study_id, number)
            self.open[number] = OpenTrial(number, trial_id, payload, pending=pending)
            self.first_submit = self.first_submit or time.monotonic()
            self._submit(submit, Job(number, 0, self.space.seed, pending=pending))

    def _submit(self, submit: Any, job: Job) -> None:
        trial = self.open[job.number]
        payload = {**trial.payload, "budgets": list(self.schedule.budgets),
                   "budget_flops": self.schedule.budgets[job.rung], "seed": job.seed,
                   "seeds": 1 if job.confirm else self.space.seeds,
                   "states": None if job.confirm or job.rung == 0 else trial.states,
                   "keep_state": not job.confirm and job.rung < self.schedule.top}
        self.jobs[submit(payload, job.number, job.rung)] = job

    # ---- results ------------------------------------------------------------------------------
    def _collect(self, ref: Any, job: Job) -> None:
        import ray

        try:
            out = ray.get(ref)
        except ray.exceptions.RayError as exc:
            out = {"error": _worker_error(exc), "worker_died": True}
        if job.confirm:
            self._record_confirm(job, out)
        else:
            self._record_rung(job, out)

    def _record_rung(self, job: Job, out: dict[str, Any]) -> None:
        trial = self.open[job.number]
        if job.rung == 0 and out.get("worker_died") and job.pending is not None:
            self.recorder.fail(job.pending, out["error"], retry=True)  # retried as a new trial
            del self.open[job.number]
            return
        if interrupted(out):
            if job.pending is not None:  # rung 0: re-queued; a higher rung resumes next run
                self.recorder.fail(job.pending, "interrupted", retry=True)
                del self.open[job.number]
            return
        entry = rung_entry(out, job.rung, self.schedule.budgets[job.rung], self.space.seeds,
                           trial.attrs.get("flops_per_token"))
        ok = entry["status"] == "ok"
        trial.rungs.append(entry)
        self.ladder.record(job.number, job.rung, entry["val_loss"] if ok else math.nan,
                           entry["flops_per_token"], entry["spent_flops"])
        self.recorder.train_seconds += float(entry["seconds"] or 0.0)
        attrs: dict[str, Any] = {"rungs": trial.rungs}
        if ok:
            res = out["result"]
            trial.curve += [{**row, "rung": job.rung} for row in res.get("curve") or []]
            attrs.update(best_rung_attrs(trial, out, entry, self.space.seeds,
                                         self.recorder.version))
            attrs["weights_artifact_id"] = self._upload(
                trial, out["weights"], f"rung{job.rung}-weights.safetensors",
                "application/octet-stream")
            attrs["curve_artifact_id"] = self._upload(
                trial, curve_jsonl(trial.curve), f"rung{job.rung}-curve.jsonl",
                "application/jsonl")
            if out.get("states"):
                trial.states = list(out["states"])
                attrs["state_artifact_ids"] = [self._upload(
                    trial, blob, f"rung{job.rung}-seed{job.seed + i}-state.safetensors",
                    "application/octet-stream") for i, blob in enumerate(trial.states)]
        trial.attrs.update(attrs)
        if job.rung == 0 and not ok and job.pending is not None:
            res = out.get("result") or {}
            attrs.update({"train_status": res.get("status"), "steps": res.get("steps"),
                          "train_flops": res.get("train_flops"),
                          "duration_s": entry["seconds"]})
            if self.space.seeds > 1 and "seed_results" in entry:
                attrs["seed_results"] = entry["seed_results"]
            self.recorder.fail(job.pending, str(entry["reason"]), retry=False, attrs=attrs)
            self.ladder.close(job.number)
            del self.open[job.number]
            return
        self._write(trial, attrs)

    def _write(self, trial: OpenTrial, attrs: dict[str, Any]) -> None:
        write_attrs(self.recorder, trial.trial_id, attrs)

    def _upload(self, trial: OpenTrial, blob: bytes, name: str, mimetype: str) -> str:
        return upload(self.recorder, trial.trial_id, f"trial-{trial.number}-{name}", blob,
                      mimetype)

    # ---- telling ------------------------------------------------------------------------------
    def _settle(self, final: bool = False) -> None:
        """Tell every open trial that is settled (all of them when ``final``)."""
        future = self.future()
        top_front = self._top_front() if self.confirm_extra else set()
        busy = {j.number for j in self.jobs.values()}
        for number in sorted(self.open):
            if number in busy:
                continue
            if not final:
                if not self.ladder.settled(number, future):
                    continue
                if number in top_front and number not in self.confirmed:
                    continue
            self._tell(self.open.pop(number))

    def _top_front(self) -> set[int]:
        from .pareto import pareto_front

        results = [r for r in self.ladder.results(self.schedule.top) if math.isfinite(r.loss)]
        return {results[i].trial for i in pareto_front([r.point for r in results])}

    def _tell(self, trial: OpenTrial) -> None:
        self.ladder.close(trial.number)
        good = [r for r in trial.rungs if r["status"] == "ok"]
        last = trial.rungs[-1] if trial.rungs else {}
        extra = {"params": trial.attrs.get("params"),
                 "kv_cache_bytes": trial.attrs.get("kv_cache_bytes_per_token"),
                 "latency": trial.attrs.get("latency_s")}
        with quiet_optuna():
            if not good:  # cannot happen through _record_rung (rung 0 fails the trial)
                self._write(trial, {"status": "failed", "reason": last.get("reason")})
                self.recorder.study.tell(trial.number, state=TrialState.FAIL)
                self.recorder.counts.failed += 1
                self.recorder.counts.failed_final += 1
                return
            best = good[-1]
            values = [float(best["val_loss"]), float(best["flops_per_token"])]
            for name in self.space.objectives[2:]:
                v = extra.get(name)
                values.append(float(v) if v is not None else math.nan)
            self._write(trial, {"status": "ok", "reason": None})
            self.recorder.study.tell(trial.number, values)
        self.recorder.counts.ok += 1
        self.recorder.points.append((values[0], values[1]))

    # ---- confirmation ---------------------------------------------------------------------------
    def _confirm_queue(self) -> list[tuple[int, int]]:
        """``(trial, seed)`` still to train for ``confirm`` (the top rung's open front)."""
        if not self.confirm_extra or self.stop.requested:
            return []
        out = []
        for number in sorted(self._top_front() & set(self.open)):
            if number in self.confirmed:
                continue
            have = {s["seed"] for s in self.open[number].attrs.get("confirm", {}).get(
                "runs", [])}
            seeds = [self.space.seed + i for i in range(self.space.seeds,
                                                         self.space.confirm_seeds)]
            todo = [s for s in seeds if s not in have]
            if not todo:
                self._finish_confirm(self.open[number])
                continue
            out += [(number, s) for s in todo]
        return out

    def _fill_confirm(self, submit: Any) -> None:
        queued = {(j.number, j.seed) for j in self.jobs.values() if j.confirm}
        for number, seed in self._confirm_queue():
            if len(self.jobs) >= self.space.workers:
                return
            if (number, seed) not in queued:
                self._submit(submit, Job(number, self.schedule.top, seed, confirm=True))

    def _record_confirm(self, job: Job, out: dict[str, Any]) -> None:
        trial = self.open[job.number]
        res = out.get("result") or {}
        loss = res.get("val_loss") if "error" not in out and res.get("status") == "ok" else None
        confirm = dict(trial.attrs.get("confirm") or {"runs": []})
        confirm["runs"] = [*confirm["runs"], {
            "seed": job.seed, "val_loss": loss, "metric": res.get("metric"),
            "train_flops": res.get("train_flops"), "spent_flops": out.get("spent_flops", 0.0),
            "reason": out.get("error") or res.get("reason")}]
        trial.attrs["confirm"] = confirm
        self._write(trial, {"confirm": confirm})

    def _finish_confirm(self, trial: OpenTrial) -> None:
        confirm = confirm_summary(trial.rungs[-1], dict(trial.attrs.get("confirm") or {
            "runs": []}), self.space.seed)
        trial.attrs["confirm"] = confirm
        self._write(trial, {"confirm": confirm})
        self.confirmed.add(trial.number)

    # ---- Ctrl-C ---------------------------------------------------------------------------------
    def _interrupt_jobs(self) -> None:
        """Cancel every job; a trial at rung 0 is failed ``interrupted`` (re-queued), a trial
        with finished rungs stays RUNNING for the next run to resume."""
        import ray

        for ref, job in list(self.jobs.items()):
            try:
                ray.cancel(ref)
            except Exception as exc:  # noqa: BLE001 - recorded below either way
                log.debug("cancelling trial %d: %s", job.number, exc)
            if job.rung == 0 and not job.confirm and job.pending is not None:
                self.recorder.fail(job.pending, "interrupted", retry=True)
                self.open.pop(job.number, None)
            del self.jobs[ref]


def _loss(entry: dict[str, Any]) -> float:
    v = entry.get("val_loss")
    return float(v) if v is not None and entry.get("status") == "ok" else math.nan


def _remote(space: Any) -> Any:
    """``submit(payload, number, rung) -> ObjectRef``: one Ray task per rung."""
    import ray

    fn = ray.remote(run_rung)
    options = {"num_cpus": space.resources["cpus"], "num_gpus": space.resources["gpus"],
               "max_retries": 0, "retry_exceptions": False}

    def submit(payload: dict[str, Any], number: int, rung: int) -> Any:
        return fn.options(name=f"mlbtc-trial-{number}-rung-{rung}", **options).remote(payload)

    return submit


__all__ = ["MultiFidelityRun", "OpenTrial"]

"""``mlbtc search``: run (or resume) a search, training the trials on Ray workers.

One driver process asks Optuna for candidates, checks them, hands trainable ones to Ray, and
records every outcome in the study storage -- the storage has exactly one writer, so SQLite is
fine even for a multi-node Ray cluster (the database stays beside the driver). The Optuna side
lives in :mod:`studies.trials`, the worker side in :mod:`studies.worker`.

Why plain Ray tasks and not Ray Tune. Tune was measured first (Ray 2.60, local Ray with 2 CPUs
on a shared 2-core machine at load average ~7, 8 trials of 0.5 s, a custom ``Searcher`` doing
ask/tell, ``reuse_actors=True``): 1 worker took 9.1 s, 2 workers 14.3 s -- *slower* -- because
two Tune trial actors needed ~16 s to start (their imports); with ``reuse_actors=False`` every
trial paid 5-8 s. The same batch driven by our own loop over plain Ray workers took 7.1 s with 1
worker and 7.0-9.0 s with 2, nearly all of it worker start-up (torch), with ~20 ms between
trials after that. Tune also adds what this search does not want: experiment directories that
must sit on shared storage for multi-node runs (ray#37177), checkpoints to ship weights, its own
SIGINT handling, and schedulers that store partial-fidelity results as COMPLETE (budgets here
are fixed). ``benchmarks/bench_search.py`` measures the loop as built.

So the loop is ours: at most ``workers`` trials in flight, each a Ray task with the space's
``resources`` (``num_cpus``/``num_gpus``) and ``max_retries=0`` (retries are decided here and
recorded on the study). Trials run ``studies.worker.run_trial`` by reference, so every node of
a cluster needs this package installed (the driver ships no code).

Failure handling (all in the study, nothing is lost that finished):
- a dead worker (SIGKILL, OOM, node loss): the trial is FAIL ``worker died: ...`` and retried
  once as a new trial with the same parameters (``retry_of``); the search goes on;
- a dead driver: its RUNNING trials are failed with :data:`~studies.trials.STALE_REASON` and
  re-enqueued once by the next ``mlbtc search`` of the same file (Optuna's heartbeat does not
  work with ask/tell);
- Ctrl-C: the first stops the search (running trials become FAIL ``interrupted`` and are
  re-enqueued for a resume, finished ones stay) and ``mlbtc search`` exits with 130; a second
  Ctrl-C aborts at once (the next run reaps what was left RUNNING);
- NaN, divergence, training errors: FAIL with the reason, not retried (they would recur).

The storage contract (what the CLI, export and the dashboard read) is :mod:`studies.record`;
the storage door (URL, opening, artifacts) is :mod:`studies.storage`.

Order of a run: the space is validated (by the caller), the storage is peeked at read-only (an
already-complete study starts no Ray), Ray is started or joined, and only then is the study
created or loaded -- a failed ``--address`` join leaves no study (and no new database) behind.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlbtc_search.errors import UsageError

from .pareto import front, hypervolume
from .progress import Progress, Snapshot
from .record import TrialRecord
from .space import SearchSpace
from .storage import load_records, mask_url, open_storage, resolve_url, study_names
from .trials import Pending, Recorder, code_version, open_study, quiet_optuna

log = logging.getLogger(__name__)

POLL_S = 0.25  # how often the loop looks at stop requests while waiting for workers


@dataclass
class SearchOutcome:
    """What a search run did (the CLI prints it; tests and the benchmark read it)."""

    study_name: str
    storage_url: str
    artifact_dir: Path
    snapshot: Snapshot
    front: list[TrialRecord]
    interrupted: bool
    resumed: bool  # the study existed before this run
    already_complete: bool  # it had its trials already: nothing was trained
    exhausted: bool
    stale: list[int]
    new_trials: int  # trials trained (or failed) by this run
    wall_s: float  # from the first submitted trial to the last result
    train_s: float  # sum of the training seconds of this run's trials


def storage_url_for(space: SearchSpace) -> str:
    """``--storage`` or the file's ``storage:``, else :func:`studies.storage.resolve_url`
    (``$MLBTC_STORAGE``, else ``sqlite:///mlbtc.db`` in the working directory)."""
    return resolve_url(space.storage)


# ---- Ray ----------------------------------------------------------------------------------------
def connect_ray(space: SearchSpace, address: str | None) -> bool:
    """Join ``address`` or start a local Ray; returns whether we started (and must stop) it."""
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = address or os.environ.get("RAY_ADDRESS") or None
    verbose = logging.getLogger().isEnabledFor(logging.DEBUG)
    common: dict[str, Any] = {"log_to_driver": verbose,
                              "logging_level": logging.INFO if verbose else logging.WARNING}
    if address and address != "auto":
        _check_reachable(address)
    try:
        if address:
            ray.init(address=address, **common)
        else:
            os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # local cluster: no token files
            cpus = max(os.cpu_count() or 1, int(space.workers * space.resources["cpus"] + 0.999))
            # address="local": a new instance even if `ray start` left a cluster to auto-join
            ray.init(address="local", num_cpus=cpus, include_dashboard=False, **common)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = f"the Ray cluster at {address}" if address else "a local Ray instance"
        first = " ".join(str(exc).split())[:300]
        raise UsageError(f"cannot start or join {where}: {first}") from None
    return True


def _check_gpus(space: SearchSpace) -> None:
    """A one-line UsageError when trials reserve GPUs the cluster does not have (Ray would leave
    them pending for ever)."""
    import ray

    want, have = space.resources["gpus"], ray.cluster_resources().get("GPU", 0.0)
    if want > 0 and have < want:
        raise UsageError(f"resources.gpus={want:g} per trial, but the Ray cluster has {have:g} "
                         "GPUs; use resources.gpus: 0 (CPU trials) or a machine with a GPU")


JOIN_TIMEOUT_S = 5.0


def _check_reachable(address: str) -> None:
    """A one-line UsageError unless a TCP connection to the Ray head at ``address`` opens.

    ``ray.init(address=...)`` retries an unreachable head for minutes (measured: still retrying
    after 5 minutes, Ray 2.60), so a typo in ``--address`` would hang the search.
    """
    import socket

    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"--address must be HOST:PORT of a Ray head (e.g. 127.0.0.1:6379), "
                         f"got {address!r}")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=JOIN_TIMEOUT_S):
            pass
    except OSError as exc:
        raise UsageError(f"cannot join the Ray cluster at {address}: {exc.strerror or exc} "
                         f"(is `ray start --head` running there?)") from None


def _remote_run_trial(space: SearchSpace) -> Any:
    """``submit(payload, number) -> ObjectRef``: one Ray task per trial, named after it."""
    import ray

    from .worker import run_trial

    fn = ray.remote(run_trial)
    options = {"num_cpus": space.resources["cpus"], "num_gpus": space.resources["gpus"],
               "max_retries": 0, "retry_exceptions": False}

    def submit(payload: dict[str, Any], number: int) -> Any:
        return fn.options(name=f"mlbtc-trial-{number}", **options).remote(payload)

    return submit


def _worker_error(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"worker died: {type(exc).__name__}: {text[:400]}"


# ---- Ctrl-C -----------------------------------------------------------------------------------
class StopFlag:
    """The first SIGINT asks the loop to stop; the second raises KeyboardInterrupt."""

    def __init__(self) -> None:
        self.requested = False

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    @contextmanager
    def installed(self) -> Iterator[StopFlag]:
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = signal.signal(signal.SIGINT, self._handle)
        try:
            yield self
        finally:
            signal.signal(signal.SIGINT, previous)


# ---- the search ---------------------------------------------------------------------------------
def run_search(space: SearchSpace, storage_url: str | None = None, address: str | None = None,
               progress: Progress | None = None, stop: StopFlag | None = None) -> SearchOutcome:
    """Run or resume the study of ``space`` until it has ``space.trials`` trained trials.

    ``space`` must come from :func:`studies.space.load_space` (validated). Ray is reused when
    already initialised, else started locally (or joined at ``address``) and shut down at the
    end; it is not started at all for a study that already has its trials.
    """
    space = space.prepare()  # builds the task and dry-runs a parsed space; no-op if prepared
    url = storage_url or storage_url_for(space)
    progress = progress or Progress(enabled=False)
    stop = stop or StopFlag()
    done_before = trained_so_far(url, space.name)
    complete = done_before is not None and done_before >= space.trials
    with stop.installed():
        started_ray = False
        try:
            if not complete and not stop.requested:
                _build_cpu_kernel()
                started_ray = connect_ray(space, address)
                _check_gpus(space)
            kind: type[_Run] = _Run
            if space.rungs is not None:  # budgets: [...] (docs/scaling.md)
                from .multifidelity import MultiFidelityRun as kind
            run = kind(space, url, progress, stop)
            run.announce(done_before)
            if not complete:
                run.loop()
        finally:
            if started_ray:
                import ray

                ray.shutdown()
    return run.outcome(complete)


def _build_cpu_kernel() -> None:
    """Compile the fused CPU kernels (attention, BTT matrices) here, once (each says so), before
    the workers start: they load the cached builds instead of compiling them concurrently and
    silently."""
    from mlbtc_search import attention_cpu, linear_cpu

    attention_cpu.available()
    linear_cpu.available()


def trained_so_far(url: str, name: str) -> int | None:
    """Trained trials of study ``name`` if it exists (read-only peek), else None."""
    storage = None
    try:
        storage = open_storage(url, create=False)
        if name not in study_names(storage):
            return None
        return sum(1 for r in load_records(optuna_load(storage, name)) if r.trained)
    except Exception:  # noqa: BLE001 - no database or no tables yet: a new study
        return None
    finally:
        if storage is not None:
            storage.engine.dispose()


def optuna_load(storage: Any, name: str) -> Any:
    import optuna

    with quiet_optuna():
        return optuna.load_study(study_name=name, storage=storage)


class _Run:
    """One run of the ask -> train on Ray -> record loop over an opened study."""

    def __init__(self, space: SearchSpace, url: str, progress: Progress, stop: StopFlag):
        from optuna.artifacts import FileSystemArtifactStore

        self.space, self.url, self.progress, self.stop = space, url, progress, stop
        version = code_version()
        storage = open_storage(url)
        self.opened = open_study(storage, space, url, version)
        self.recorder = Recorder(self.opened.study, space, storage,
                                 FileSystemArtifactStore(str(self.opened.artifact_dir)), version)
        self.stale = self.recorder.reap_stale()
        self.recorder.enqueue_baselines()
        self.start = time.monotonic()
        self.new_trials = 0
        self.exhausted = False
        self.in_flight: dict[Any, Pending] = {}
        self.first_submit: float | None = None
        self.last_result = self.start

    def announce(self, done_before: int | None) -> None:
        """Say whether the study is new, resumed or already complete."""
        name, target = self.space.name, self.space.trials
        if done_before is not None and done_before >= target:
            self.progress.message(f"study {name!r} already has {done_before}/{target} trained "
                                  "trials: nothing to run (raise --trials to continue it)")
        elif self.opened.resumed:
            self.progress.message(f"resuming study {name!r}: {self.recorder.counts.done}/"
                                  f"{target} trials trained so far")
        if self.stale:
            self.progress.message(f"marked {len(self.stale)} trial(s) left RUNNING by a "
                                  f"previous driver as failed and re-queued them: {self.stale}")

    def snap(self) -> Snapshot:
        elapsed = time.monotonic() - self.start
        eta = None
        if self.new_trials and self.first_submit is not None:
            left = max(0, self.space.trials - self.recorder.counts.done)
            eta = (self.last_result - self.first_submit) / self.new_trials * left
        return self.recorder.snapshot(len(self.in_flight), elapsed, eta)

    def loop(self) -> None:
        """Keep ``workers`` trials in flight until the study has its trials or a stop."""
        submit = _remote_run_trial(self.space)
        while not self.stop.requested:
            self._fill(submit)
            self.progress.update(self.snap())
            if not self.in_flight:
                break
            finished = _collect(self.recorder, self.in_flight)
            if finished:
                self.new_trials += finished
                self.last_result = time.monotonic()
        if self.stop.requested:
            _interrupt(self.recorder, self.in_flight)

    def _fill(self, submit: Any) -> None:
        rec, space = self.recorder, self.space
        while (not self.stop.requested and not self.exhausted
               and len(self.in_flight) < space.workers
               and rec.counts.done + len(self.in_flight) < space.trials):
            pending = rec.ask()
            if pending is None:
                self.exhausted = True
                self.progress.message("stopping: the sampler proposed only infeasible or "
                                      "duplicate candidates for a while (space exhausted?)")
                return
            self.first_submit = self.first_submit or time.monotonic()
            self.in_flight[submit(rec.payload(pending), pending.trial.number)] = pending

    def outcome(self, already_complete: bool) -> SearchOutcome:
        final = self.snap()
        self.progress.update(final, force=True)
        self.progress.close()
        with quiet_optuna():
            recs = load_records(self.opened.study)
        final = Snapshot(**{**final.__dict__, "hypervolume": hypervolume(recs)})
        return SearchOutcome(
            study_name=self.space.name, storage_url=mask_url(self.url),
            artifact_dir=self.opened.artifact_dir, snapshot=final, front=front(recs),
            interrupted=self.stop.requested, exhausted=self.exhausted, stale=self.stale,
            new_trials=self.new_trials, resumed=self.opened.resumed,
            already_complete=already_complete,
            wall_s=(self.last_result - self.first_submit) if self.first_submit else 0.0,
            train_s=self.recorder.train_seconds)


def _collect(recorder: Recorder, in_flight: dict[Any, Pending]) -> int:
    """Wait up to POLL_S for finished trials and record them; returns how many finished."""
    import ray

    ready, rest = ray.wait(list(in_flight), num_returns=1, timeout=POLL_S)
    if ready and rest:
        more, _ = ray.wait(rest, num_returns=len(rest), timeout=0)
        ready += more
    for ref in ready:
        pending = in_flight.pop(ref)
        try:
            out = ray.get(ref)
        except ray.exceptions.RayError as exc:
            recorder.fail(pending, _worker_error(exc), retry=True)
            continue
        recorder.record(pending, out)
    return len(ready)


def _interrupt(recorder: Recorder, in_flight: dict[Any, Pending]) -> None:
    """Ctrl-C: cancel the running trials and record them as interrupted (re-enqueued)."""
    import ray

    for ref, pending in list(in_flight.items()):
        try:
            ray.cancel(ref)
        except Exception as exc:  # noqa: BLE001 - the trial is failed below either way
            log.debug("cancelling trial %d: %s", pending.trial.number, exc)
        recorder.fail(pending, "interrupted", retry=True)
        del in_flight[ref]


__all__ = ["SearchOutcome", "StopFlag", "connect_ray", "run_search", "storage_url_for"]

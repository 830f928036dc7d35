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

STORAGE CONTRACT (what export and the dashboard rely on): an Optuna study with one
``minimize`` direction per objective (``val_loss``, ``flops_per_token``, then any extra ones) and
``set_metric_names`` of the objectives; study user attr ``mlbtc`` = {space, task, budget_flops,
objectives, artifact_dir, code_version, ...}; trial user attrs status, reason, spec, hash,
family, flops_per_token, params, kv_cache_bytes_per_token, val_loss, metric, metric_name, curve,
seed, budget_flops, steps, train_flops, duration_s, code_version, weights_artifact_id (status
ok), plus node/host (where it trained), train, retry_of/retried, duplicate_of, baseline.
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

from .pareto import front_rows, study_hypervolume, study_rows
from .progress import Progress, Snapshot
from .space import SearchSpace, default_storage
from .storage import STORAGE_ENV, mask_url, open_storage
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
    front: list[dict[str, Any]]
    interrupted: bool
    exhausted: bool
    stale: list[int]
    new_trials: int  # trials trained (or failed) by this run
    wall_s: float  # from the first submitted trial to the last result
    train_s: float  # sum of the training seconds of this run's trials


def storage_url_for(space: SearchSpace) -> str:
    """``--storage`` or the file's ``storage:``, else ``$MLBTC_STORAGE``, else a SQLite file
    named after the study beside the YAML file."""
    return space.storage or os.environ.get(STORAGE_ENV) or default_storage(space)


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


def _remote_run_trial(space: SearchSpace) -> Any:
    import ray

    from .worker import run_trial

    return ray.remote(run_trial).options(
        num_cpus=space.resources["cpus"], num_gpus=space.resources["gpus"], max_retries=0,
        retry_exceptions=False, name="mlbtc_trial")


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

    ``space`` must come from :func:`studies.space.load_space` (validated): nothing touches the
    storage before that. Ray is reused when already initialised, else started locally (or
    joined at ``address``) and shut down at the end.
    """
    space = space.prepare()  # builds the task and dry-runs a parsed space; no-op if prepared
    url = storage_url or storage_url_for(space)
    progress = progress or Progress(enabled=False)
    stop = stop or StopFlag()
    version = code_version()
    storage = open_storage(url)
    study, artifact_dir = open_study(storage, space, url, version)
    from optuna.artifacts import FileSystemArtifactStore

    recorder = Recorder(study, space, FileSystemArtifactStore(str(artifact_dir)), version)
    stale = recorder.reap_stale()
    if stale:
        progress.message(f"marked {len(stale)} trial(s) left RUNNING by a previous driver as "
                         f"failed and re-queued them: {stale}")
    recorder.enqueue_baselines()
    start = time.monotonic()
    new_trials = 0
    exhausted = False
    in_flight: dict[Any, Pending] = {}
    first_submit: float | None = None
    last_result = start

    def snap() -> Snapshot:
        elapsed = time.monotonic() - start
        eta = None
        if new_trials and first_submit is not None:
            left = max(0, space.trials - recorder.counts.done)
            eta = (last_result - first_submit) / new_trials * left
        return recorder.snapshot(len(in_flight), elapsed, eta)

    with stop.installed():
        started_ray = False
        remote: Any = None
        try:
            if recorder.counts.done < space.trials and not stop.requested:
                started_ray = connect_ray(space, address)
                _check_gpus(space)
                remote = _remote_run_trial(space)
            while not stop.requested:
                while (not stop.requested and not exhausted and len(in_flight) < space.workers
                       and recorder.counts.done + len(in_flight) < space.trials):
                    pending = recorder.ask()
                    if pending is None:
                        exhausted = True
                        progress.message("stopping: the sampler proposed only infeasible or "
                                         "duplicate candidates for a while (space exhausted?)")
                        break
                    first_submit = first_submit or time.monotonic()
                    in_flight[remote.remote(recorder.payload(pending))] = pending
                progress.update(snap())
                if not in_flight:
                    break
                new_trials += _collect(recorder, in_flight)
                if new_trials:
                    last_result = time.monotonic()
            if stop.requested:
                _interrupt(recorder, in_flight)
        finally:
            if started_ray:
                import ray

                ray.shutdown()
    final = snap()
    progress.update(final, force=True)
    progress.close()
    with quiet_optuna():
        rows = study_rows(study)
    front = front_rows(study, rows)
    final = Snapshot(**{**final.__dict__, "hypervolume": study_hypervolume(rows)})
    return SearchOutcome(
        study_name=space.name, storage_url=mask_url(url), artifact_dir=artifact_dir,
        snapshot=final, front=front, interrupted=stop.requested, exhausted=exhausted,
        stale=stale, new_trials=new_trials,
        wall_s=(last_result - first_submit) if first_submit else 0.0,
        train_s=recorder.train_seconds)


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

"""A killed worker, a killed driver, Ctrl-C, NaN/divergence and bad input lose nothing finished.

A trial is made slow by its own settings (``train.eval_batches`` = SLOW_EVAL_BATCHES), so a test
can act while it runs; its worker is found by the Ray task name the runner gives every trial
(``ray::mlbtc-trial-N`` as the process title). Baselines make the first trials deterministic.
"""

from __future__ import annotations

import os
import signal
import threading

import optuna
import pytest
import sqlalchemy
from _search_helpers import (
    REPO,
    SLOW_EVAL_BATCHES,
    cli_env,
    complete,
    kill_group,
    process_gone,
    run_search_cli,
    start_search,
    trial_worker_pid,
    trials,
    wait_for,
    write_space,
)
from optuna.trial import TrialState

from mlbtc_search.cli import main
from studies.pareto import front
from studies.record import records
from studies.runner import run_search
from studies.space import load_space
from studies.storage import load_records, load_study, open_storage
from studies.trials import STALE_REASON, dedup_key

optuna.logging.set_verbosity(optuna.logging.WARNING)

BASELINES = [
    {"attention.kind": "standard", "attention.heads": 2},
    {"attention.kind": "mlr", "attention.heads": 1, "attention.ranks": [4, 2, 1, 1]},
]


def _space(path, slow=(), **changes):
    """The tiny space at width 16 only (every proposal is feasible) with baselines: the two
    above, then standard with one head; the baselines numbered in ``slow`` train slowly."""
    from _search_helpers import tiny_space

    base = tiny_space()
    inner = {**base["space"], "width": 16, "train.eval_batches": {"choice": [2]}}
    baselines = [*BASELINES, {"attention.kind": "standard", "attention.heads": 1}]
    baselines = [{**b, "train.eval_batches": SLOW_EVAL_BATCHES if i in slow else 2}
                 for i, b in enumerate(baselines)]
    if slow:
        inner["train.eval_batches"] = {"choice": [2, SLOW_EVAL_BATCHES]}
    train = {k: v for k, v in base["train"].items() if k != "eval_batches"}
    return write_space(path, baselines=baselines, space=inner, train=train, **changes)


@pytest.fixture
def artifacts_env(tmp_path, monkeypatch):
    monkeypatch.setenv("MLBTC_ARTIFACTS", str(tmp_path / "artifacts"))


def _by_number(ts):
    return {t.number: t for t in ts}


def _trained(ts) -> int:
    """Trials that count towards the study's total: COMPLETE + failed and not retried."""
    return sum(1 for t in ts if t.state == TrialState.COMPLETE or (
        t.user_attrs.get("status") == "failed" and not t.user_attrs.get("retried")))


def _assert_no_repeats(ts):
    keys = [dedup_key(r.hash, r.train, r.seed) for r in records(complete(ts))]
    assert len(keys) == len(set(keys))


# ---- in-process, on the session's Ray ---------------------------------------------------------
def test_killed_worker_fails_the_trial_and_retries_it(ray_local, storage_url, tmp_path,
                                                      artifacts_env, monkeypatch):
    killed: list[int] = []

    def kill_trial_1() -> None:
        pid = wait_for(lambda: trial_worker_pid(1), 120, "trial 1's worker")
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)

    killer = threading.Thread(target=kill_trial_1, daemon=True)
    killer.start()
    outcome = run_search(load_space(_space(tmp_path / "s.yaml", slow=(1,), trials=3),
                                    {"storage": storage_url}))
    killer.join(10)
    assert killed, "the hooked trial never started"

    ts = load_study(open_storage(storage_url), "tiny").get_trials(deepcopy=False)
    t1 = _by_number(ts)[1]
    assert t1.state == TrialState.FAIL and t1.user_attrs["status"] == "failed"
    assert t1.user_attrs["reason"].startswith("worker died:"), t1.user_attrs["reason"]
    assert t1.user_attrs["retried"] is True
    retries = [t for t in ts if t.user_attrs.get("retry_of") == 1]
    assert len(retries) == 1 and retries[0].state == TrialState.COMPLETE
    assert retries[0].params == t1.params
    # The search went on: the study has its 3 trained trials, trial 0 intact.
    assert outcome.snapshot.done == 3 and _trained(ts) == 3 and len(complete(ts)) == 3
    assert _by_number(ts)[0].state == TrialState.COMPLETE
    _assert_no_repeats(ts)


def test_diverging_trial_is_failed_with_its_reason(ray_local, storage_url, tmp_path,
                                                   artifacts_env):
    from _search_helpers import tiny_space

    inner = {**tiny_space()["space"], "width": 16, "train.lr": {"choice": [3.0e-3, 1000.0]}}
    path = write_space(tmp_path / "s.yaml", trials=2, train={"batch_size": 16, "eval_batches": 2},
                       baselines=[{**BASELINES[0], "train.lr": 1000.0},
                                  {**BASELINES[1], "train.lr": 3.0e-3}], space=inner)
    outcome = run_search(load_space(path, {"storage": storage_url}))

    study = load_study(open_storage(storage_url), "tiny")
    ts = study.get_trials(deepcopy=False)
    t0 = ts[0]
    assert t0.state == TrialState.FAIL and t0.user_attrs["status"] == "failed"
    assert t0.user_attrs["train_status"] in ("nan", "diverged")
    assert "loss" in t0.user_attrs["reason"]
    assert "weights_artifact_id" not in t0.user_attrs and t0.values is None
    assert not [t for t in ts if t.user_attrs.get("retry_of") == 0]  # it would fail again
    assert 0 not in [r.number for r in front(load_records(study))]
    assert outcome.snapshot.done == 2 and outcome.snapshot.failed == 1
    assert [r.number for r in front(load_records(study))] == [1]


def test_invalid_space_exits_2_and_writes_nothing(storage_url, tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("name: bad\n"
                    "task: {name: icl_regression, options: {n_dims: 4, n_points: 8}}\n"
                    "budget: 2e7\n"
                    "trials: 0\n"
                    "space: {width: 16, depth: 1, attention: {kind: standard, heads: 2}}\n")
    code = main(["search", str(path), "--storage", storage_url])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and f"{path}:4" in err and "trials" in err, err
    assert "Traceback" not in err
    engine = sqlalchemy.create_engine(storage_url)
    try:
        assert sqlalchemy.inspect(engine).get_table_names() == []
    finally:
        engine.dispose()


def test_bad_command_line_value_exits_2(tmp_path, capsys):
    path = _space(tmp_path / "s.yaml")
    url = f"sqlite:///{tmp_path}/never.db"
    assert main(["search", str(path), "--storage", url, "--workers", "0"]) == 2
    assert "--workers must be an integer >= 1" in capsys.readouterr().err
    assert not (tmp_path / "never.db").exists()


# ---- the driver as a subprocess ---------------------------------------------------------------
@pytest.mark.e2e
@pytest.mark.slow
def test_killed_driver_resumes_without_repeating_trials(tmp_path):
    # SQLite only: two driver start-ups per run make this the slowest test; the stale-trial
    # reaping it checks is the same storage API that the in-process tests run on PostgreSQL.
    storage_url = f"sqlite:///{tmp_path}/study.db"
    space = _space(tmp_path / "s.yaml", slow=(2,), trials=3)
    args = [str(space), "--storage", storage_url]
    proc = start_search(args, cli_env(tmp_path), REPO)
    try:
        wait_for(lambda: complete(trials(storage_url)) and trial_worker_pid(2, proc.pid),
                 180, "a finished trial and trial 2 running", proc)
        before = {t.number: t.values for t in complete(trials(storage_url))}
        worker = trial_worker_pid(2, proc.pid)
        os.kill(proc.pid, signal.SIGKILL)  # kill -9 the driver
        proc.wait(30)
        # Ray's processes share the driver's fate: the sleeping worker goes too.
        wait_for(lambda: process_gone(worker), 60, "the orphaned worker to exit")
    finally:
        kill_group(proc)

    stale = _by_number(trials(storage_url))[2]
    assert stale.state == TrialState.RUNNING  # what a dead driver leaves behind

    cp = run_search_cli(args, cli_env(tmp_path), REPO)
    assert cp.returncode == 0, cp.stderr
    assert "previous driver" in cp.stderr
    assert "resuming study 'tiny'" in cp.stderr and "resumed: this run trained" in cp.stdout

    ts = trials(storage_url)
    t2 = _by_number(ts)[2]
    assert t2.state == TrialState.FAIL and t2.user_attrs["reason"] == STALE_REASON
    retries = [t for t in ts if t.user_attrs.get("retry_of") == 2]
    assert len(retries) == 1 and retries[0].state == TrialState.COMPLETE
    assert not [t for t in ts if t.state == TrialState.RUNNING]
    # Finished trials are kept as they were and not trained again.
    assert all(_by_number(ts)[n].values == v for n, v in before.items())
    _assert_no_repeats(ts)
    assert _trained(ts) == 3


@pytest.mark.e2e
@pytest.mark.slow
def test_ctrl_c_stops_cleanly_with_exit_130(tmp_path):
    url = f"sqlite:///{tmp_path}/study.db"
    space = _space(tmp_path / "s.yaml", slow=(1,), trials=4)
    proc = start_search([str(space), "--storage", url], cli_env(tmp_path), REPO)
    try:
        wait_for(lambda: complete(trials(url)) and trial_worker_pid(1, proc.pid),
                 180, "a finished trial and trial 1 running", proc)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        kill_group(proc)
    assert proc.returncode == 130, err
    assert "Traceback" not in err, err
    assert "search interrupted" in out and "resume:" in out

    ts = trials(url)
    t1 = _by_number(ts)[1]
    assert t1.state == TrialState.FAIL and t1.user_attrs["reason"] == "interrupted"
    assert t1.user_attrs["status"] == "interrupted"  # counted as interrupted, not failed
    assert "interrupted 1" in out or "interrupted 2" in out
    assert not [t for t in ts if t.state == TrialState.RUNNING]
    done = complete(ts)
    assert done and all("weights_artifact_id" in t.user_attrs for t in done)
    # The interrupted trial waits in the study for the resume.
    assert [t.state for t in ts if t.user_attrs.get("retry_of") == 1] == [TrialState.WAITING]

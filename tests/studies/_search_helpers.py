"""Helpers for the search tests: a tiny real search space, the CLI as a subprocess, waits.

The space trains each trial in about a second on one CPU thread: width 16 (or 48, which is over
``max_flops`` and so infeasible), one layer, standard or MLR attention, a 2e7-FLOP budget.
Every helper waits on a condition with a deadline, never a fixed sleep.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
import yaml

REPO = Path(__file__).resolve().parents[2]
CONTRACT_TRIAL_ATTRS = (
    "status", "reason", "spec", "hash", "family", "flops_per_token", "params",
    "kv_cache_bytes_per_token", "val_loss", "metric", "metric_name", "curve", "seed",
    "budget_flops", "steps", "train_flops", "duration_s", "code_version", "weights_artifact_id",
)
CONTRACT_STUDY_ATTRS = ("space", "task", "budget_flops", "objectives", "artifact_dir",
                        "code_version")


def tiny_space(**changes: Any) -> dict[str, Any]:
    """The tiny search space as a dict; ``changes`` replace top-level keys."""
    space: dict[str, Any] = {
        "name": "tiny",
        "task": {"name": "icl_regression", "options": {"n_dims": 4, "n_points": 8}},
        "budget": 2e7,
        "trials": 4,
        "workers": 2,
        "sampler": {"name": "random", "seed": 0},
        "train": {"lr": 3.0e-3, "batch_size": 16, "eval_batches": 2},
        "constraints": {"max_flops": 6000},
        "baselines": [{"attention.kind": "standard", "attention.heads": 2, "width": 16}],
        "space": {
            "width": {"choice": [16, 48]},
            "depth": 1,
            "mlp_ratio": 2,
            "attention": {
                "kind": {"choice": ["standard", "mlr"]},
                "heads": {"choice": [1, 2]},
                "ranks": {"choice": [[4, 2, 1, 1], [2, 2, 2, 2]], "when": {"kind": "mlr"}},
            },
        },
    }
    space.update(changes)
    return space


def write_space(path: Path, **changes: Any) -> Path:
    path.write_text(yaml.safe_dump(tiny_space(**changes), sort_keys=False))
    return path


def wait_for(condition: Callable[[], Any], timeout: float, what: str,
             proc: subprocess.Popen | None = None) -> Any:
    """Poll ``condition`` until it returns something truthy; fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    delay = 0.05
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"process exited ({proc.returncode}) while waiting for {what}"
                                 f"\nstdout:\n{out}\nstderr:\n{err}")
        time.sleep(delay)
        delay = min(delay * 1.5, 0.5)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def trials(storage_url: str, name: str = "tiny") -> list[optuna.trial.FrozenTrial]:
    """The study's trials, or [] while it does not exist yet. Reads only: never creates the
    schema (that would race with the search creating it)."""
    import sqlalchemy
    from sqlalchemy.exc import SQLAlchemyError
    from sqlalchemy.pool import NullPool

    engine = sqlalchemy.create_engine(storage_url, poolclass=NullPool)
    try:  # Optuna stamps the alembic version last: until then the schema is being created
        with engine.connect() as conn:
            if not conn.execute(sqlalchemy.text("SELECT * FROM alembic_version")).first():
                return []
    except SQLAlchemyError:
        return []
    finally:
        engine.dispose()
    storage = None
    try:
        storage = optuna.storages.RDBStorage(
            storage_url, engine_kwargs={"poolclass": NullPool}, skip_compatibility_check=True,
            skip_table_creation=True)
        if name not in {s.study_name for s in storage.get_all_studies()}:
            return []
        return optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)
    except (SQLAlchemyError, optuna.exceptions.StorageInternalError):  # no schema yet
        return []
    finally:
        if storage is not None:
            storage.engine.dispose()


def complete(ts: list[optuna.trial.FrozenTrial]) -> list[optuna.trial.FrozenTrial]:
    return [t for t in ts if t.state == optuna.trial.TrialState.COMPLETE]


# A trial made slow by its own training settings (no test hook in production code): this many
# evaluation batches take a few seconds even for the tiny models, long enough to act on.
SLOW_EVAL_BATCHES = 400


def _children() -> dict[int, list[int]]:
    """Parent pid -> child pids of every process, from /proc (Linux)."""
    out: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        out.setdefault(ppid, []).append(int(entry.name))
    return out


def trial_worker_pid(number: int, root_pid: int | None = None) -> int | None:
    """The pid of the Ray worker training trial ``number`` right now, else None.

    The runner names each trial's Ray task ``mlbtc-trial-<number>`` and Ray shows the running
    task's name as the worker's process title (``ray::mlbtc-trial-3``). Only descendants of
    ``root_pid`` (default: this process, whose Ray started the workers) are considered, so other
    searches on the machine are never touched.
    """
    title = f"ray::mlbtc-trial-{number}"
    children = _children()
    todo = list(children.get(root_pid or os.getpid(), []))
    while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
        except (OSError, UnicodeDecodeError):
            continue
        if cmdline.strip() == title:
            return pid
    return None


def cli_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           "MLBTC_ARTIFACTS": str(tmp_path / "artifacts"), "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    env.update(extra)
    return env


def start_search(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.Popen:
    """``python -m mlbtc_search.cli search ...`` in its own session (a Ctrl-C or SIGKILL sent
    to it reaches only it and what it started)."""
    return subprocess.Popen([sys.executable, "-m", "mlbtc_search.cli", "search", *args],
                            env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def run_search_cli(args: list[str], env: dict[str, str], cwd: Path,
                   timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mlbtc_search.cli", "search", *args], env=env,
                          cwd=cwd, capture_output=True, text=True, timeout=timeout)


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the process group we started for ``proc`` (teardown of a failed test)."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(30)


def process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:  # a zombie (dead, not yet reaped by its parent) is gone for our purpose
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state == "Z"

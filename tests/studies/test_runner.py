"""mlbtc search end to end on real components: Optuna + Ray + SQLite/PostgreSQL + training.

A tiny space (see ``_search_helpers``) makes each trial train in about a second, so a whole
2-worker search on the session's local Ray takes seconds. The cluster test starts a real
two-node Ray cluster (a head and a second node) and runs ``mlbtc search --address`` on it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import optuna
import pytest
import torch
from _search_helpers import (
    CONTRACT_STUDY_ATTRS,
    CONTRACT_TRIAL_ATTRS,
    REPO,
    cli_env,
    complete,
    run_search_cli,
    trials,
    wait_for,
    write_space,
)
from optuna.artifacts import download_artifact
from optuna.trial import TrialState
from safetensors.torch import load_file
from services import free_port

from mlbtc_search.model import ModelSpec, build_model
from studies.record import TrialRecord, json_safe, records
from studies.runner import run_search
from studies.space import load_space
from studies.storage import artifact_store, load_study, open_storage, study_info
from studies.trials import dedup_key


@pytest.fixture
def artifacts_env(tmp_path, monkeypatch):
    """Artifacts of non-SQLite storages go under tmp_path, not the working directory."""
    monkeypatch.setenv("MLBTC_ARTIFACTS", str(tmp_path / "artifacts"))


def test_search_records_the_storage_contract(ray_local, storage_url, tmp_path, artifacts_env):
    space = load_space(write_space(tmp_path / "tiny.yaml"), {"storage": storage_url})
    outcome = run_search(space)

    assert not outcome.interrupted and outcome.snapshot.done == 4 and outcome.snapshot.ok == 4
    storage = open_storage(storage_url, create=False)
    study = load_study(storage, "tiny")
    ts = study.get_trials(deepcopy=False)
    done = complete(ts)
    assert len(done) == 4
    assert study.metric_names == ["val_loss", "flops_per_token"]
    assert isinstance(study.user_attrs["mlbtc"], str)  # JSON text: optuna-dashboard shows it whole
    info = json.loads(study.user_attrs["mlbtc"])
    assert set(CONTRACT_STUDY_ATTRS) <= set(info)
    assert info["task"] == space.task and info["budget_flops"] == 2e7
    assert Path(info["artifact_dir"]).is_absolute() and Path(info["artifact_dir"]).is_dir()
    assert study_info(study).task == space.task
    # No dict or list attr anywhere (optuna-dashboard cuts their JSON at 1,024 characters).
    assert not [(t.number, k) for t in ts for k, v in t.user_attrs.items()
                if isinstance(v, dict | list)]

    # The baseline is enqueued first, so it is trial 0, and it trained.
    assert ts[0].user_attrs["baseline"] == 0 and ts[0].state == TrialState.COMPLETE
    assert ts[0].params == {"width": 16, "attention.kind": "standard", "attention.heads": 2}

    store = artifact_store(study)
    for t in done:
        ua = t.user_attrs
        assert set(CONTRACT_TRIAL_ATTRS) <= set(ua), t.number
        r = TrialRecord.from_trial(t)
        assert r.state == "complete" and ua["status"] == "ok" and r.reason is None
        assert t.values == [r.val_loss, r.flops_per_token]
        assert r.flops_per_token <= 6000 and r.budget_flops == 2e7
        assert r.curve and {"step", "flops", "train_loss"} <= set(r.curve[0])
        assert r.node and r.pid  # where it trained
        spec = ModelSpec.from_dict(r.spec)
        assert spec.hash() == r.hash and spec.family == r.family
        # The curve is also an artifact: JSON lines, one evaluation each.
        with store.open_reader(r.curve_artifact_id) as f:
            lines = [json.loads(line) for line in f.read().decode().splitlines()]
        assert lines == json_safe(r.curve)
    # Distinct architectures only: duplicates were never trained.
    keys = [dedup_key(r.hash, r.train, r.seed) for r in records(done)]
    assert len(set(keys)) == len(keys)

    # The weights are an artifact that loads into the rebuilt model.
    t = done[-1]
    path = tmp_path / "w.safetensors"
    download_artifact(artifact_store=artifact_store(study), file_path=str(path),
                      artifact_id=t.user_attrs["weights_artifact_id"])
    model = build_model(ModelSpec.from_dict(TrialRecord.from_trial(t).spec))
    model.load_state_dict(load_file(str(path)), strict=True)
    model.eval()
    inputs = torch.zeros(1, 4, 4)
    assert torch.isfinite(model(inputs)).all()

    # Infeasible proposals are recorded with the reason and never trained.
    infeasible = [t for t in ts if t.user_attrs.get("status") == "infeasible"]
    assert infeasible, "the tiny space proposes width 48, which is over max_flops"
    for t in infeasible:
        assert t.state == TrialState.FAIL and t.params["width"] == 48
        assert "max_flops" in t.user_attrs["reason"]
        assert "duration_s" not in t.user_attrs and "weights_artifact_id" not in t.user_attrs
    # Duplicates point to a trial with the same architecture and are not trained.
    duplicates = [t for t in ts if t.user_attrs.get("status") == "duplicate"]
    assert duplicates, "the seeded random sampler re-proposes an architecture in this space"
    by_number = {t.number: t for t in ts}
    for t in duplicates:
        other = by_number[t.user_attrs["duplicate_of"]]
        assert t.state == TrialState.FAIL and other.user_attrs["hash"] == t.user_attrs["hash"]
        assert "duration_s" not in t.user_attrs

    # Running it again changes nothing: the study already has its 4 trained trials.
    again = run_search(space)
    assert again.new_trials == 0 and again.already_complete and again.resumed
    assert len(load_study(storage, "tiny").get_trials(deepcopy=False)) == len(ts)


def test_resume_under_a_different_space_is_refused(ray_local, tmp_path, artifacts_env):
    url = f"sqlite:///{tmp_path}/s.db"
    run_search(load_space(write_space(tmp_path / "a.yaml", trials=1), {"storage": url}))
    changed = write_space(tmp_path / "b.yaml", trials=1, budget=3e7)
    from mlbtc_search.errors import UsageError

    with pytest.raises(UsageError, match="different budget_flops"):
        run_search(load_space(changed, {"storage": url}))


def test_candidates_the_budget_cannot_train_are_infeasible(tmp_path):
    """Checked in the driver before any training (no Ray needed)."""
    from optuna.artifacts import FileSystemArtifactStore

    from studies.trials import Recorder, open_study

    url = f"sqlite:///{tmp_path}/s.db"
    space = load_space(write_space(tmp_path / "s.yaml", constraints={},
                                   baselines=[{"width": 48, "attention.kind": "standard",
                                               "attention.heads": 2}]), {"storage": url}).prepare()
    storage = open_storage(url)
    opened = open_study(storage, space, url, "test")
    study = opened.study
    recorder = Recorder(study, space, storage, FileSystemArtifactStore(str(opened.artifact_dir)),
                        "test")
    recorder.enqueue_baselines()
    pending = recorder.ask()
    assert pending is not None and pending.candidate.spec.width == 16
    t0 = study.get_trials(deepcopy=False)[0]
    assert t0.state == TrialState.FAIL and t0.user_attrs["status"] == "infeasible"
    assert t0.user_attrs["reason"].startswith("budget too small for one step")
    assert recorder.counts.infeasible >= 1


def test_a_failed_address_join_is_one_line_and_leaves_no_study(tmp_path):
    url = f"sqlite:///{tmp_path}/s.db"
    space = write_space(tmp_path / "tiny.yaml", trials=1)
    cp = run_search_cli([str(space), "--address", f"127.0.0.1:{free_port()}", "--storage", url],
                        cli_env(tmp_path), REPO, timeout=120)
    assert cp.returncode == 2, cp.stderr
    assert cp.stderr.count("\n") == 1 and "cannot join the Ray cluster at 127.0.0.1:" in \
        cp.stderr, cp.stderr
    assert not (tmp_path / "s.db").exists()  # no study, not even an empty database


# ---- a real two-node Ray cluster -------------------------------------------------------------
def _ray_start(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    """``ray start ... --block`` in a session of its own: killing that process group stops
    exactly this node (never ``ray stop``, which would stop every Ray on the machine)."""
    with open(log, "w") as fh:
        return subprocess.Popen(["ray", "start", "--block", "--num-cpus=1",
                                 "--node-ip-address=127.0.0.1", *args], env=env,
                                stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)  # the node's own process group (see _ray_start)
        proc.wait(30)


def _alive_nodes(address: str, env: dict[str, str]) -> int:
    code = (f"import ray; ray.init(address={address!r}, logging_level='ERROR'); "
            "print(sum(n['Alive'] for n in ray.nodes()))")
    cp = subprocess.run([sys.executable, "-c", code], env=env,
                        capture_output=True, text=True, timeout=120)
    try:
        return int(cp.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return 0


@pytest.mark.e2e
@pytest.mark.slow
def test_search_on_a_two_node_cluster(tmp_path):
    env = cli_env(tmp_path)
    address = f"127.0.0.1:{free_port()}"
    # A private temp dir: `ray start --head` records its address there, not in /tmp/ray where
    # every plain ray.init() on this machine would find it and join this test cluster.
    temp_dir = tempfile.mkdtemp(prefix="rayt-", dir="/tmp")
    nodes: list[subprocess.Popen] = []
    try:
        nodes.append(_ray_start(["--head", f"--port={address.split(':')[1]}",
                                 f"--temp-dir={temp_dir}", "--include-dashboard=false"],
                                env, tmp_path / "head.log"))
        wait_for(lambda: _alive_nodes(address, env) >= 1, 120, "the Ray head")
        nodes.append(_ray_start([f"--address={address}"], env, tmp_path / "node.log"))
        wait_for(lambda: _alive_nodes(address, env) >= 2, 120, "the second Ray node")

        url = f"sqlite:///{tmp_path}/cluster.db"
        space = write_space(tmp_path / "tiny.yaml", trials=4, workers=2)
        cp = run_search_cli([str(space), "--address", address, "--storage", url], env, REPO)
        assert cp.returncode == 0, cp.stderr
        done = complete(trials(url))
        assert len(done) == 4
        # Two 1-CPU nodes and two 1-CPU trials at a time: both nodes trained trials.
        assert len({t.user_attrs["node"] for t in done}) == 2
    finally:
        for proc in reversed(nodes):
            _stop(proc)
        shutil.rmtree(temp_dir, ignore_errors=True)


optuna.logging.set_verbosity(optuna.logging.WARNING)

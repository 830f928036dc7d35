"""Multi-fidelity search on a real Ray and real storages: rungs on one Optuna trial each,
continuation, resume after a killed driver, `mlbtc scaling`, the YAML keys."""

from __future__ import annotations

import json
import math

import optuna
import pytest
import yaml
from _search_helpers import cli_env, kill_group, start_search, tiny_space, trials, wait_for
from optuna.trial import TrialState

from mlbtc_search.cli import main
from mlbtc_search.errors import SpecError
from studies.runner import run_search
from studies.space import SearchSpace, load_space
from studies.storage import load_records, load_study, open_storage

optuna.logging.set_verbosity(optuna.logging.WARNING)
BUDGETS = [1e7, 3e7, 9e7]


def mf_space(path, **changes):
    """The tiny space (6 distinct architectures at width 16) with three budget rungs."""
    data = tiny_space(**changes)
    data.pop("budget")
    inner = data["space"]
    data.update({"budgets": BUDGETS, "promote": {"eta": 2}, "trials": 6,
                 "space": {**inner, "width": 16},
                 "train": {**data["train"], "schedule": "wsd"}, **changes})
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def rungs_of(t):
    return json.loads(t.user_attrs["rungs"]) if "rungs" in t.user_attrs else []


def test_yaml_keys_budgets_promote_confirm(tmp_path):
    space = load_space(mf_space(tmp_path / "s.yaml", confirm={"seeds": 2}))
    assert space.rungs.budgets == tuple(BUDGETS) and space.rungs.eta == 2
    assert space.budget_flops == BUDGETS[-1] and space.confirm_seeds == 2
    assert SearchSpace.from_dict(space.to_dict()).rungs == space.rungs
    with pytest.raises(SpecError, match=r"s2.yaml:\d+ budgets: give either budget"):
        load_space(mf_space(tmp_path / "s2.yaml", budget=1e7))
    with pytest.raises(SpecError, match=r"promote.eta: eta must be an integer >= 2"):
        load_space(mf_space(tmp_path / "s3.yaml", promote={"eta": 1}))
    with pytest.raises(SpecError, match=r"confirm.seeds: seeds must be an integer in \[1, 100\]"):
        load_space(mf_space(tmp_path / "s4.yaml", confirm={"seeds": 0}))
    assert load_space(mf_space(tmp_path / "s5.yaml", seeds=2)).seeds == 2


@pytest.mark.slow
def test_rungs_are_recorded_on_one_trial_and_continue(ray_local, storage_url, tmp_path,
                                                      monkeypatch, capsys):
    monkeypatch.setenv("MLBTC_ARTIFACTS", str(tmp_path / "artifacts"))
    space = load_space(mf_space(tmp_path / "mf.yaml", confirm={"seeds": 2}))
    outcome = run_search(space, storage_url)
    assert not outcome.interrupted
    study = load_study(open_storage(storage_url), "tiny")
    ts = study.get_trials(deepcopy=False)
    trained = [t for t in ts if rungs_of(t)]
    assert len(trained) == 6 and all(t.state == TrialState.COMPLETE for t in trained)
    assert not [t for t in ts if t.state == TrialState.RUNNING]
    counts = [sum(1 for t in trained if len(rungs_of(t)) > k) for k in range(3)]
    assert counts[0] == 6 and counts[1] >= 3 and counts[2] >= 1  # eta 2: 6 -> >=3 -> >=1
    store = optuna.artifacts.FileSystemArtifactStore(str(outcome.artifact_dir))
    for t in trained:
        rungs = rungs_of(t)
        assert [r["rung"] for r in rungs] == list(range(len(rungs)))
        assert [r["budget_flops"] for r in rungs] == BUDGETS[:len(rungs)]
        top = rungs[-1]
        assert t.values[0] == pytest.approx(top["val_loss"]) and t.user_attrs["rung"] == top[
            "rung"]
        assert t.user_attrs["budget_flops"] == top["budget_flops"]
        for r in rungs[1:]:  # continued from the previous rung: less than its budget
            assert r["continued"] and r["spent_flops"] < 0.9 * r["budget_flops"]
            assert r["train_flops"] <= r["budget_flops"]
        assert rungs[0]["spent_flops"] == rungs[0]["train_flops"]
        assert t.user_attrs["spent_flops"] == pytest.approx(sum(r["spent_flops"] for r in rungs))
        # the weights artifact is that of the highest rung
        metas = {m.artifact_id: m.filename for m in optuna.artifacts.get_all_artifact_meta(
            t, storage=open_storage(storage_url))}
        assert metas[t.user_attrs["weights_artifact_id"]].endswith(
            f"rung{top['rung']}-weights.safetensors")
        with store.open_reader(t.user_attrs["weights_artifact_id"]) as f:
            assert f.read(8)
        curve = json.loads(t.user_attrs["curve"])
        assert {row["rung"] for row in curve} == set(range(len(rungs)))
    # confirm: the top rung's front was retrained with one more seed; the spread is recorded
    at_top = [t for t in trained if len(rungs_of(t)) == 3]
    confirmed = [t for t in at_top if "confirm" in t.user_attrs]
    assert confirmed
    for t in confirmed:
        c = json.loads(t.user_attrs["confirm"])
        assert [r["seed"] for r in c["runs"]] == [1] and c["seeds"] == 2
        losses = [rungs_of(t)[-1]["val_loss"], c["runs"][0]["val_loss"]]
        assert c["mean"] == pytest.approx(sum(losses) / 2) and c["std"] > 0
    recs = load_records(study)
    assert all(r.state == "complete" for r in recs if r.number in {t.number for t in trained})
    # mlbtc scaling reads the rungs back and fits the architectures with 3 budgets
    assert main(["scaling", "tiny", "--storage", storage_url, "--at", "1e9", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["budgets"] == BUDGETS and report["target"] == 1e9
    assert len(report["architectures"]) == counts[2]
    fitted = {a["name"]: a for a in report["architectures"]}
    for t in confirmed:  # the extra seed is one more point at the top budget
        assert fitted[str(t.number)]["fit"]["n"] == 4
    assert report["best"]["predicted_loss"] > 0
    assert main(["scaling", "tiny", "--storage", storage_url]) == 0
    assert "predicted best at 9e+08 FLOPs" in capsys.readouterr().out  # 10 x the top


@pytest.mark.slow
def test_seeds_train_every_rung_and_latency_is_measured(ray_local, tmp_path, monkeypatch):
    """seeds: 2 with budgets: each rung trains both seeds (each continuing its own chain), the
    rung's loss is their mean with the spread recorded, the FLOPs of both are counted; confirm:
    {seeds: 3} adds the one seed the top rung lacks; latency is measured for every rung."""
    monkeypatch.setenv("MLBTC_ARTIFACTS", str(tmp_path / "artifacts"))
    url = f"sqlite:///{tmp_path / 'mf.db'}"
    path = mf_space(tmp_path / "mf.yaml", seeds=2, trials=4, confirm={"seeds": 3},
                    objectives=["val_loss", "flops_per_token", "latency"])
    run_search(load_space(path), url)
    trained = [t for t in trials(url) if rungs_of(t)]
    assert len(trained) == 4 and all(t.state == TrialState.COMPLETE for t in trained)
    assert any(len(rungs_of(t)) == 3 for t in trained)
    for t in trained:
        rungs = rungs_of(t)
        for r in rungs:
            seeds = r["seed_results"]
            assert [s["seed"] for s in seeds] == [0, 1] and r["status"] == "ok"
            mean = (seeds[0]["val_loss"] + seeds[1]["val_loss"]) / 2
            assert r["val_loss"] == pytest.approx(mean)
            assert r["loss_std"] > 0 and r["latency_s"] > 0
            assert r["spent_flops"] == pytest.approx(sum(s["spent_flops"] for s in seeds))
            if r["rung"] > 0:  # both seeds continued from their own state
                assert all(s["continued"] for s in seeds) and r["continued"]
                assert all(s["spent_flops"] < 0.9 * r["budget_flops"] for s in seeds)
        top = rungs[-1]
        assert t.values[0] == pytest.approx(top["val_loss"])
        assert t.values[2] == t.user_attrs["latency_s"] == top["latency_s"]
        assert json.loads(t.user_attrs["seed_results"]) == top["seed_results"]
        assert t.user_attrs["loss_std"] == pytest.approx(top["loss_std"])
        assert t.user_attrs["spent_flops"] == pytest.approx(sum(r["spent_flops"] for r in rungs))
        if len(rungs) < 3:  # the states of its last rung, one per seed, kept as artifacts
            assert len(json.loads(t.user_attrs["state_artifact_ids"])) == 2
    confirmed = [t for t in trained if "confirm" in t.user_attrs]
    assert confirmed
    for t in confirmed:
        c = json.loads(t.user_attrs["confirm"])
        losses = [s["val_loss"] for s in rungs_of(t)[-1]["seed_results"]]
        assert [r["seed"] for r in c["runs"]] == [2] and c["seeds"] == 3
        assert c["mean"] == pytest.approx((sum(losses) + c["runs"][0]["val_loss"]) / 3)
    recs = load_records(load_study(open_storage(url), "tiny"))
    assert all(r.seeds == 2 and r.loss_std > 0 for r in recs if r.state == "complete")


@pytest.mark.slow
def test_killed_driver_keeps_every_finished_rung(ray_local, tmp_path, monkeypatch):
    """SIGKILL the driver while trials are open between rungs; the next run resumes them, each
    of the two seeds continuing from its own state artifact."""
    url = f"sqlite:///{tmp_path / 'mf.db'}"
    path = mf_space(tmp_path / "mf.yaml", workers=1, seeds=2)
    proc = start_search([str(path), "--storage", url], cli_env(tmp_path), tmp_path)
    try:
        wait_for(lambda: [t for t in trials(url) if t.state == TrialState.RUNNING
                          and len(rungs_of(t)) >= 1 and any(
                              len(rungs_of(o)) >= 2 for o in trials(url))],
                 240, "an open trial with a finished rung after a promotion", proc)
    finally:
        kill_group(proc)
    before = {t.number: rungs_of(t) for t in trials(url) if rungs_of(t)}
    open_before = [t.number for t in trials(url)
                   if t.state == TrialState.RUNNING and rungs_of(t)]
    assert open_before
    monkeypatch.setenv("MLBTC_ARTIFACTS", str(tmp_path / "artifacts"))  # as the CLI had it
    outcome = run_search(load_space(path), url)
    assert outcome.resumed and not outcome.interrupted
    after = {t.number: t for t in trials(url)}
    for number, rungs in before.items():  # finished rungs are kept as they were
        assert rungs_of(after[number])[:len(rungs)] == rungs
    for number in open_before:  # resumed, then told
        assert after[number].state == TrialState.COMPLETE
        assert after[number].values[0] == pytest.approx(rungs_of(after[number])[-1]["val_loss"])
    resumed_rungs = [r for n in open_before for r in rungs_of(after[n])[len(before[n]):]]
    assert resumed_rungs and all(r["continued"] for r in resumed_rungs)  # from the artifacts
    assert all(s["continued"] and s["spent_flops"] < 0.9 * r["budget_flops"]
               for r in resumed_rungs for s in r["seed_results"])
    hashes = [t.user_attrs["hash"] for t in after.values() if rungs_of(t)]
    assert len(hashes) == len(set(hashes)) == 6  # no architecture trained twice at rung 0
    assert not [t for t in after.values() if t.state == TrialState.RUNNING]
    assert all(not math.isnan(t.values[0]) for t in after.values()
               if t.state == TrialState.COMPLETE)


def _rung_worker_pid(rung: int) -> tuple[int, int] | None:
    """``(trial, pid)`` of a Ray worker of this process training some trial's ``rung``."""
    import os

    import psutil

    for child in psutil.Process(os.getpid()).children(recursive=True):
        try:
            title = (child.cmdline() or [""])[0].strip()
        except psutil.Error:
            continue
        if title.startswith("ray::mlbtc-trial-") and title.endswith(f"-rung-{rung}"):
            return int(title.split("-")[2]), child.pid
    return None


@pytest.mark.slow
def test_killed_worker_at_a_higher_rung_keeps_the_lower_ones(ray_local, tmp_path, monkeypatch):
    import os
    import signal
    import threading

    monkeypatch.setenv("MLBTC_ARTIFACTS", str(tmp_path / "artifacts"))
    url = f"sqlite:///{tmp_path / 'mf.db'}"
    killed: list[tuple[int, int]] = []

    def kill_first_rung_1() -> None:
        found = wait_for(lambda: _rung_worker_pid(1), 120, "a trial training rung 1")
        os.kill(found[1], signal.SIGKILL)
        killed.append(found)

    killer = threading.Thread(target=kill_first_rung_1, daemon=True)
    killer.start()
    space = mf_space(tmp_path / "mf.yaml", workers=1)
    data = yaml.safe_load(space.read_text())
    data["train"]["eval_batches"] = 50  # each rung ends with a slower evaluation
    space.write_text(yaml.safe_dump(data))
    run_search(load_space(space), url)
    killer.join(10)
    assert killed, "no trial reached rung 1"
    number = killed[0][0]
    t = {t.number: t for t in trials(url)}[number]
    rungs = rungs_of(t)
    assert rungs[0]["status"] == "ok" and rungs[1]["status"] == "failed"
    assert rungs[1]["reason"].startswith("worker died:")
    assert t.state == TrialState.COMPLETE and t.values[0] == pytest.approx(rungs[0]["val_loss"])
    assert t.user_attrs["rung"] == 0  # the weights and loss are those of rung 0
    assert not [o for o in trials(url) if o.state == TrialState.RUNNING]


def test_scaling_refuses_a_study_without_rungs_and_bad_flags(tmp_path, capsys):
    url = f"sqlite:///{tmp_path / 'one.db'}"
    study = optuna.create_study(storage=url, study_name="one",
                                directions=["minimize", "minimize"])
    study.add_trial(optuna.trial.create_trial(values=[1.0, 1e5], user_attrs={"family": "mlr"}))
    assert main(["scaling", "one", "--storage", url]) == 2
    assert "records no budget rungs" in capsys.readouterr().err
    assert main(["scaling", "two", "--storage", url]) == 2
    assert "no study named 'two'" in capsys.readouterr().err
    assert main(["scaling", "one", "--storage", url, "--at", "-1"]) == 2
    assert "--at must be a finite number > 0" in capsys.readouterr().err

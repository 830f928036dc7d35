"""mlbtc export: picks, the export directory, atomicity, errors, reproduction and retraining."""

from __future__ import annotations

import importlib.util
import json
import math
import re

import optuna
import pytest
import torch
import yaml
from _study_factory import BUDGET, CONFIG, SPECS, TASK, make_study, trained
from optuna.trial import TrialState, create_trial

import mlbtc_search
from mlbtc_search.cli import main
from mlbtc_search.errors import UsageError
from studies import export as ex
from studies.record import TrialRecord, records
from studies.storage import load_records
from trainers.tasks import get_task

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _trial(number: int, loss: float, flops: float, params: int = 100) -> TrialRecord:
    return TrialRecord.from_parts(number=number, optuna_state="COMPLETE", values=[loss, flops],
                                  user_attrs={"weights_artifact_id": f"a{number}",
                                              "params": params})


# ---- picks (pure) ----------------------------------------------------------------------------
def test_pareto_front_and_knee():
    # Cheap/bad -> expensive/good; trial 2 is the knee (a big loss drop for little cost),
    # trial 4 is dominated by 2.
    trials = [_trial(0, 1.0, 1e3), _trial(1, 0.7, 3e3), _trial(2, 0.3, 1e4),
              _trial(3, 0.25, 1e6), _trial(4, 0.5, 2e4), _trial(5, 0.2, 1e7)]
    front = ex.pareto_front(trials)
    assert [t.number for t in front] == [0, 1, 2, 3, 5]
    assert ex.knee(front).number == 2


def test_knee_degenerate_fronts_fall_back_to_min_loss():
    assert ex.knee([_trial(0, 1.0, 10)]).number == 0
    assert ex.knee([_trial(0, 1.0, 10), _trial(1, 0.5, 100)]).number == 1
    # A straight (in log FLOPs) or concave front has no knee below the chord.
    straight = [_trial(0, 1.0, 10), _trial(1, 0.75, 100), _trial(2, 0.5, 1000)]
    assert ex.knee(straight).number == 2
    concave = [_trial(0, 1.0, 10), _trial(1, 0.95, 100), _trial(2, 0.5, 1000)]
    assert ex.knee(concave).number == 2
    with pytest.raises(UsageError, match="no COMPLETE trials with weights"):
        ex.knee([])


@pytest.mark.parametrize("pick, expected", [
    ("flops<=1e6", ("flops", "<=", 1e6)), ("FLOPS < 2_000", ("flops", "<", 2000.0)),
    ("params<=5e4", ("params", "<=", 5e4)), (" params<12.5 ", ("params", "<", 12.5)),
])
def test_parse_bound(pick, expected):
    assert ex.parse_bound(pick) == expected


@pytest.mark.parametrize("pick", ["flops>=1e6", "flops<=", "loss<=1", "flops<=1e6 or True",
                                  "__import__('os').system('true')", "flops<=2**20", "best"])
def test_parse_bound_rejects_everything_else(pick):
    with pytest.raises(UsageError, match=r"--pick must be min-loss, knee, or a bound "
                                         r"'flops<=X'.*got"):
        ex.parse_bound(pick)


def test_pick_trial_on_a_synthetic_study():
    study = optuna.create_study(directions=["minimize", "minimize"], study_name="s")
    for number, loss, flops, params in [(0, 1.0, 1e3, 10), (1, 0.7, 3e3, 20), (2, 0.3, 1e4, 30),
                                        (3, 0.25, 1e6, 40), (4, 0.2, 1e7, 50)]:
        study.add_trial(create_trial(values=[loss, flops], user_attrs={
            "weights_artifact_id": f"a{number}", "params": params}))
    study.add_trial(create_trial(state=TrialState.FAIL, user_attrs={"status": "failed"}))
    study.add_trial(create_trial(values=[0.01, 1.0]))  # COMPLETE but no weights: never picked
    recs = records(study.get_trials())
    assert ex.pick_trial(recs, "min-loss").number == 4
    assert ex.pick_trial(recs, "knee").number == 2
    assert ex.pick_trial(recs, "flops<=3e3").number == 1
    assert ex.pick_trial(recs, "flops<3e3").number == 0
    assert ex.pick_trial(recs, "params<=40").number == 3
    with pytest.raises(UsageError, match=r"no trial of study 's' has flops_per_token <= 10 "
                                         r"\(the smallest is 1000\); raise the bound"):
        ex.pick_trial(recs, "flops<=10", "s")


# ---- real studies ----------------------------------------------------------------------------
@pytest.fixture
def cli():
    """``mlbtc ...`` through the real entry point (exit codes and one-line errors included)."""

    def run(*argv: object) -> int:
        return main([str(a) for a in argv])

    return run


@pytest.fixture(scope="module")
def sqlite_study(tmp_path_factory):
    """One real study (SQLite) shared by the error tests: trials 0-2 COMPLETE, 3 infeasible,
    4 failed, 5 duplicate."""
    root = tmp_path_factory.mktemp("study")
    url = f"sqlite:///{root}/study.db"
    make_study(url, root / "artifacts", name="tiny")
    make_study(url, root / "artifacts", name="other", models=(0,), failures=False)
    return url


def test_export_roundtrip_reproduces_the_trial(storage_url, tmp_path):
    study = make_study(storage_url, tmp_path / "artifacts")
    best = ex.pick_trial(load_records(study), "min-loss")
    out = ex.export_trial(study, best, tmp_path / "exports" / "best")
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md", "architecture.yaml", "metrics.json", "model.safetensors"]
    assert not [p for p in out.parent.iterdir() if p != out]  # no temporary left

    arch = yaml.safe_load((out / "architecture.yaml").read_text())
    assert arch["task"] == TASK
    assert arch["adapter"] == {"input_kind": "vector", "input_dim": 4, "output_dim": 1}
    assert arch["max_seq_len"] == 16
    assert arch["width"] == best.spec["width"]

    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("val_loss", "metric", "metric_name", "flops_per_token", "params", "seed",
                "budget_flops", "hash", "code_version"):
        assert metrics[key] == getattr(best, key), key
    assert metrics["study"] == "tiny" and metrics["trial"] == best.number
    assert metrics["exported_at"].endswith("+00:00")

    card = (out / "README.md").read_text()
    assert f'mlbtc_search.load("{out}")' in card
    assert f"mlbtc train {out}/architecture.yaml --budget 3e+07 --batch-size 16 --seed 0" in card
    assert "rank 1 of" in card and "Pareto front" in card

    # The loaded model is the trained one and reproduces the recorded validation numbers with
    # the training loop's evaluation settings (TrainConfig eval_batches/batch size/eval_seed).
    model = mlbtc_search.load(out)
    index = next(i for i in range(len(SPECS)) if trained(i).hash == best.hash)
    original = trained(index).model.state_dict()
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, original[name]), name
    assert metrics["evaluation"] == {"batches": CONFIG.eval_batches, "seed": CONFIG.eval_seed,
                                     "batch_size": CONFIG.eval_batch_size or CONFIG.batch_size}
    task = get_task(arch["task"]["name"], **arch["task"]["options"])
    again = task.evaluate(model, **metrics["evaluation"])
    assert again["val_loss"] == pytest.approx(best.val_loss, rel=1e-6, abs=1e-7)
    assert again["metric"] == pytest.approx(best.metric, rel=1e-6, abs=1e-7)


def test_cli_picks(cli, sqlite_study, tmp_path, capsys):
    study = optuna.load_study(study_name="tiny", storage=sqlite_study)
    done = [t for t in load_records(study) if t.state == "complete"]
    cheapest = min(done, key=lambda t: t.values[1])
    assert cli("export", "tiny", "--storage", sqlite_study, "--trial", 2,
               "--out", tmp_path / "t2") == 0
    assert json.loads((tmp_path / "t2/metrics.json").read_text())["trial"] == 2
    assert "exported trial 2 of study 'tiny'" in capsys.readouterr().out
    bound = f"flops<={cheapest.values[1]:.0f}"
    (tmp_path / "empty").mkdir()  # an existing empty directory is fine
    assert cli("export", "tiny", "--storage", sqlite_study, "--pick", bound,
               "--out", tmp_path / "empty") == 0
    assert json.loads((tmp_path / "empty/metrics.json").read_text())["trial"] == cheapest.number
    knee = ex.knee(ex.pareto_front(done))
    assert cli("export", "tiny", "--storage", sqlite_study, "--pick", "knee",
               "--out", tmp_path / "k") == 0
    assert json.loads((tmp_path / "k/metrics.json").read_text())["trial"] == knee.number


@pytest.mark.parametrize("argv, message", [
    (["nope", "--trial", "0"], r"no study named 'nope' in this storage; studies: other, tiny"),
    (["tiny", "--trial", "42"], r"study 'tiny' has no trial 42 \(trials are numbered 0\.\.5\)"),
    (["tiny", "--trial", "3"], r"trial 3 of study 'tiny' is infeasible, not complete "
                               r"\(flops_per_token 1e9 > max_flops_per_token 1e6\)"),
    (["tiny", "--trial", "4"], r"is failed, not complete \(TrainingError: budget"),
    (["tiny", "--trial", "5"], r"is duplicate, not complete \(same architecture as trial 0; "
                               r"duplicate of trial 0\)"),
    (["tiny", "--pick", "flops<=1"], r"no trial of study 'tiny' has flops_per_token <= 1 "),
    (["tiny", "--pick", "flops >= 1"], r"--pick must be min-loss, knee, or a bound"),
    (["tiny", "--pick", "min-loss", "--format", "onnx"], r"--format onnx needs the onnx"),
])
def test_cli_errors_are_one_line(cli, sqlite_study, tmp_path, capsys, argv, message):
    if "onnx" in argv and all(importlib.util.find_spec(m) for m in ("onnx", "onnxscript")):
        pytest.skip("onnx is installed here")
    out = tmp_path / "out"
    code = cli("export", *argv[:1], "--storage", sqlite_study, *argv[1:], "--out", out)
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1
    assert err.startswith("mlbtc export: error: ")
    assert re.search(message, err), err
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == []


def test_refuses_a_non_empty_directory_or_a_file(cli, sqlite_study, tmp_path, capsys):
    out = tmp_path / "full"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert cli("export", "tiny", "--storage", sqlite_study, "--trial", "0", "--out", out) == 2
    assert "exists and is not empty; give a new or empty directory" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    target = out / "keep.txt"
    assert cli("export", "tiny", "--storage", sqlite_study, "--trial", "0", "--out", target) == 2
    assert "keep.txt is a file; give a new or empty directory" in capsys.readouterr().err
    assert target.read_text() == "mine"


def test_a_failed_export_leaves_nothing_behind(sqlite_study, tmp_path, monkeypatch):
    study = optuna.load_study(study_name="tiny", storage=sqlite_study)

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ex, "model_card", broken)  # fails after the weights were written
    with pytest.raises(OSError, match="disk full"):
        ex.export_trial(study, 0, tmp_path / "new" / "deeper" / "out")
    assert list(tmp_path.iterdir()) == []  # neither the temporary nor the created parents


def test_missing_weights_artifact(sqlite_study, tmp_path):
    study = make_study(f"sqlite:///{tmp_path}/s.db", tmp_path / "artifacts", models=(0,),
                       failures=False)
    for f in (tmp_path / "artifacts").iterdir():
        f.unlink()
    with pytest.raises(UsageError, match=r"the weights of trial 0 \(artifact .*\) not found "
                                         r"in the artifact store"):
        ex.export_trial(study, 0, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_weights_that_do_not_match_the_spec(tmp_path):
    study = make_study(f"sqlite:///{tmp_path}/s.db", tmp_path / "artifacts", models=(0, 2),
                       failures=False)
    trials = load_records(study)
    # Replace trial 0's weights with trial 1's (a wider model) in the artifact store.
    artifacts = tmp_path / "artifacts"
    (artifacts / trials[0].weights_artifact_id).write_bytes(
        (artifacts / trials[1].weights_artifact_id).read_bytes())
    with pytest.raises(UsageError, match=r"do not match the architecture: .*has shape"):
        ex.export_trial(study, 0, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_exported_program(sqlite_study, tmp_path):
    study = optuna.load_study(study_name="tiny", storage=sqlite_study)
    out = ex.export_trial(study, 0, tmp_path / "pt2", fmt="exported-program")
    assert (out / "model.pt2").is_file()
    assert json.loads((out / "metrics.json").read_text())["extra_format"] == "exported-program"
    model = mlbtc_search.load(out)
    x, _ = get_task(TASK["name"], **TASK["options"]).batch("val", 2,
                                                           torch.Generator().manual_seed(3))
    program = torch.export.load(str(out / "model.pt2"))  # trusted: we just wrote it
    torch.testing.assert_close(program.module()(x), model(x))


def test_exported_program_failure_is_clean(sqlite_study, tmp_path, monkeypatch):
    study = optuna.load_study(study_name="tiny", storage=sqlite_study)

    def untraceable(*args, **kwargs):
        raise torch._dynamo.exc.Unsupported("data-dependent control flow\nmore details")

    monkeypatch.setattr(torch.export, "export", untraceable)
    with pytest.raises(UsageError, match=r"--format exported-program is not supported for this "
                                         r"model: torch\.export failed \(Unsupported: "
                                         r"data-dependent control flow\); export without"):
        ex.export_trial(study, 0, tmp_path / "pt2", fmt="exported-program")
    assert list(tmp_path.iterdir()) == []


def test_retrain_the_exported_architecture(cli, sqlite_study, tmp_path, capsys):
    assert cli("export", "tiny", "--storage", sqlite_study, "--pick", "min-loss",
               "--out", tmp_path / "best") == 0
    capsys.readouterr()
    code = main(["train", str(tmp_path / "best/architecture.yaml"), "--budget", str(BUDGET),
                 "--batch-size", str(CONFIG.batch_size), "--quiet"])
    assert code == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    exported = json.loads((tmp_path / "best/metrics.json").read_text())
    assert line["task"] == yaml.safe_load((tmp_path / "best/architecture.yaml").read_text())[
        "task"]
    assert line["hash"] == exported["hash"]
    assert line["flops_per_token"] == exported["flops_per_token"]
    assert line["status"] == "ok" and math.isfinite(line["val_loss"])


# ---- end to end: a real search, exported and reloaded ----------------------------------------
TINY_SPACE = """\
name: tiny-search
task: {name: icl_regression, options: {n_dims: 4, n_points: 8}}
budget: 3e7
sampler: {name: random, seed: 0}
trials: 2
workers: 2
seed: 0
train: {batch_size: 16, eval_batches: 2, threads: 1}
baselines: [{attention.kind: standard}, {attention.kind: mlr}]
space:
  width: 16
  depth: 1
  mlp_ratio: 2
  attention:
    kind: {choice: [standard, mlr]}
    heads: 2
    ranks: {choice: [[4, 2, 1, 1]], when: {kind: mlr}}
"""


@pytest.mark.slow
@pytest.mark.e2e
def test_export_a_real_search(ray_local, cli, tmp_path, capsys):
    from studies.runner import run_search
    from studies.space import load_space

    (tmp_path / "tiny.yaml").write_text(TINY_SPACE)
    url = f"sqlite:///{tmp_path}/search.db"
    outcome = run_search(load_space(tmp_path / "tiny.yaml"), url)
    assert outcome.snapshot.ok == 2
    study = optuna.load_study(study_name="tiny-search", storage=url)
    best = min((t for t in load_records(study) if t.state == "complete"),
               key=lambda t: t.values[0])

    out = tmp_path / "exports" / "best"
    assert cli("export", "tiny-search", "--storage", url, "--pick", "min-loss",
               "--out", out) == 0
    assert f"exported trial {best.number} of study 'tiny-search'" in capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train"] == {"batch_size": 16, "eval_batches": 2, "threads": 1}
    assert metrics["evaluation"] == {"batches": 2, "batch_size": 16, "seed": 1234}

    model = mlbtc_search.load(out)
    spec_task = model.spec.to_dict()["task"]  # the README's reproduction recipe
    task = get_task(spec_task["name"], **spec_task["options"])
    again = task.evaluate(model, **metrics["evaluation"])
    assert again["val_loss"] == pytest.approx(best.val_loss, rel=1e-6, abs=1e-7)
    assert again["metric"] == pytest.approx(best.metric, rel=1e-6, abs=1e-7)
    assert model.spec.hash() == best.hash

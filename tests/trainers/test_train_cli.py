"""``mlbtc train``: the JSON line, --out, task resolution, errors, the shipped example models."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from mlbtc_search.cli import main
from mlbtc_search.errors import UsageError
from mlbtc_search.model import ModelSpec, build_model
from mlbtc_search.yamlio import load_yaml
from trainers import StepCosts, TrainConfig, get_task, resolve_spec, train
from trainers.cli import parse_task_options

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples" / "models").glob("*.yaml"))
RESULT_KEYS = {"val_loss", "metric", "metric_name", "flops_per_token", "params", "steps",
               "train_flops", "status", "hash", "family", "seconds", "seed"}
TINY = """\
# a tiny model for fast CLI tests
width: 16
depth: 1
attention: {kind: standard, heads: 2}
max_seq_len: 8
"""
TASK_ARGS = ["--task-option", "n_dims=2", "--task-option", "n_points=4",
             "--task-option", "curriculum=false", "--task-option", "curriculum_start_dims=1"]


@pytest.fixture(autouse=True)
def _restore_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is faster than two shared ones
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY)
    return path


def run(argv: list[str], capsys) -> tuple[int, list[str], list[str]]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out.splitlines(), err.splitlines()


def test_the_last_stdout_line_is_the_result(tiny, capsys):
    code, out, err = run(["train", str(tiny), "--budget", "2e7", "--seed", "5", "--batch-size",
                          "8", *TASK_ARGS], capsys)
    assert code == 0, err
    result = json.loads(out[-1])
    assert RESULT_KEYS <= set(result)
    assert result["status"] == "ok" and result["seed"] == 5 and result["steps"] >= 1
    assert result["train_flops"] <= 2e7
    assert result["metric_name"] == "last_sq_error"
    assert result["task"]["options"]["n_dims"] == 2
    assert err and err[-2].startswith("ok: ")  # progress and the summary go to stderr
    assert err[-1].startswith("nothing saved: give --out DIR")


def test_quiet_writes_nothing_to_stderr(tiny, capsys):
    code, out, err = run(["train", str(tiny), "--budget", "1e7", "--quiet", "--batch-size", "8",
                          *TASK_ARGS], capsys)
    assert code == 0 and err == []
    assert len(out) == 1 and json.loads(out[0])["status"] == "ok"


def test_out_writes_a_loadable_model(tiny, tmp_path, capsys):
    out_dir = tmp_path / "run"
    code, out, err = run(["train", str(tiny), "--budget", "2e7", "--quiet", "--batch-size", "8",
                          "--lr", "3e-3", "--out", str(out_dir), *TASK_ARGS], capsys)
    assert code == 0, err
    assert sorted(p.name for p in out_dir.iterdir()) == [
        "architecture.yaml", "curve.csv", "metrics.json", "model.safetensors"]
    arch = yaml.safe_load((out_dir / "architecture.yaml").read_text())
    assert arch["task"]["name"] == "icl_regression" and arch["task"]["options"]["n_dims"] == 2
    model = build_model(ModelSpec.from_dict(arch))
    model.load_state_dict(load_file(str(out_dir / "model.safetensors")), strict=True)
    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert metrics["hash"] == json.loads(out[-1])["hash"] == model.spec.hash()
    assert metrics["config"]["lr"] == 3e-3
    lines = (out_dir / "curve.csv").read_text().splitlines()
    assert lines[0].startswith("step,tokens,flops,train_loss")
    assert len(lines) == 1 + len(metrics["curve"])
    # the exported architecture trains again as it is (its task comes from the file)
    code, out, err = run(["train", str(out_dir / "architecture.yaml"), "--budget", "1e7",
                          "--quiet", "--batch-size", "8"], capsys)
    assert code == 0, err
    assert json.loads(out[-1])["hash"] == metrics["hash"]


def test_out_refuses_a_non_empty_directory(tiny, tmp_path, capsys):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep me")
    code, out, err = run(["train", str(tiny), "--budget", "1e7", "--out", str(tmp_path / "full"),
                          *TASK_ARGS], capsys)
    assert code == 2 and out == []
    assert err == [f"mlbtc train: error: --out {tmp_path / 'full'} exists and is not empty; "
                   "give a new or empty directory"]


@pytest.mark.parametrize(("args", "message"), [
    (["--task", "nope"], "at --task: unknown task 'nope'; valid tasks: icl_regression"),
    (["--task-option", "n_dimz=4"], "at --task-option n_dimz: unknown option 'n_dimz'"),
    (["--task-option", "n_dims"], "--task-option must look like KEY=VALUE"),
    (["--budget", "10", *TASK_ARGS], "budget too small for one step: one step costs"),
    (["--task", "text", "--task-option", "path=/no/such/file.txt"],
     "text data path '/no/such/file.txt' does not exist"),
    (["--task", "text"], "tiny.yaml:5 max_seq_len: max_seq_len >= the task's sequence length"),
])
def test_bad_input_is_one_line_and_exit_2(tiny, capsys, args, message):
    argv = ["train", str(tiny), "--budget", "1e9", *args]
    code, out, err = run(argv, capsys)
    assert code == 2 and out == []
    assert len(err) == 1 and err[0].startswith("mlbtc train: error: ")
    assert message in err[0]


def test_a_model_with_another_adapter_does_not_fit(tmp_path, capsys):
    path = tmp_path / "lm.yaml"
    path.write_text(TINY + "adapter: {input_kind: tokens, input_dim: 256, output_dim: 256}\n")
    code, out, err = run(["train", str(path), "--budget", "1e9", *TASK_ARGS], capsys)
    assert code == 2 and len(err) == 1
    assert "lm.yaml:6 adapter: the model's adapter" in err[0]
    assert "does not fit the task" in err[0]


def test_the_files_task_options_apply_and_errors_point_into_the_file(tmp_path, capsys):
    path = tmp_path / "m.yaml"
    path.write_text(TINY + "task:\n  name: icl_regression\n  options: {n_dims: 2, n_points: 4, "
                    "curriculum: false, curriculum_start_dims: 1}\n")
    code, out, err = run(["train", str(path), "--budget", "1e7", "--quiet", "--batch-size",
                          "8"], capsys)
    assert code == 0, err
    assert json.loads(out[-1])["task"]["options"]["n_points"] == 4
    bad = tmp_path / "bad.yaml"
    bad.write_text(TINY + "task:\n  name: icl_regression\n  options:\n    n_dimz: 2\n")
    code, out, err = run(["train", str(bad), "--budget", "1e7"], capsys)
    assert code == 2
    assert "bad.yaml:9 task.options.n_dimz: unknown option 'n_dimz'" in err[0]


def test_task_options_are_yaml_scalars():
    assert parse_task_options(["n_dims=16", "curriculum=false", "path=a b.txt", "x=1e-3",
                               "columns=[OT, HUFL]", "empty="]) == {
        "n_dims": 16, "curriculum": False, "path": "a b.txt", "x": 1e-3,
        "columns": ["OT", "HUFL"], "empty": ""}
    with pytest.raises(UsageError, match="KEY=VALUE"):
        parse_task_options(["=3"])


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_every_example_model_trains_one_step_on_its_task(path):
    doc = load_yaml(path).data
    task = get_task(doc["task"]["name"], **doc["task"]["options"])
    a = task.adapter
    spec = ModelSpec.from_dict({k: v for k, v in doc.items() if k != "task"},
                               seq_len=a.seq_len)
    assert spec.max_seq_len == a.seq_len
    config = TrainConfig(batch_size=2, eval_batches=1, threads=1)
    cost = StepCosts(resolve_spec(spec, task), task, 2)(0)
    result = train(spec, task, cost, config=replace(config))
    assert result.status == "ok" and result.steps == 1
    assert result.family == doc["attention"]["kind"]


@pytest.mark.slow
def test_the_command_runs_as_a_subprocess():
    proc = subprocess.run(
        [sys.executable, "-m", "mlbtc_search.cli", "train", "examples/models/standard.yaml",
         "--task", "icl_regression", "--budget", "1e9", "--quiet"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    result = json.loads(proc.stdout.splitlines()[-1])
    assert result["status"] == "ok" and result["steps"] == 1
    assert result["family"] == "standard"

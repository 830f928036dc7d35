"""mlbtc studies / mlbtc pareto on a real study storage: JSON keys, tables, errors."""

from __future__ import annotations

import json

import optuna
import pytest
from _study_factory import make_study

from mlbtc_search.cli import main
from studies.pareto import front
from studies.storage import load_records, study_info

optuna.logging.set_verbosity(optuna.logging.WARNING)


@pytest.fixture
def study(storage_url, tmp_path):
    return make_study(storage_url, tmp_path / "artifacts")


def test_studies_json_lists_each_study(study, storage_url, capsys):
    make_study(storage_url, study_info(study).artifact_dir, name="other",
               models=(0,), failures=False)
    assert main(["studies", "--storage", storage_url, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == ["other", "tiny"]
    for key in ("name", "task", "trials", "states", "trained", "best_loss", "front_size",
                "hypervolume", "last_update"):
        assert key in rows[1], key
    assert rows[1]["task"] == "icl_regression" and rows[1]["states"]["complete"] == 3
    assert rows[1]["states"]["failed"] == 1 and rows[1]["trained"] == 4
    assert rows[0]["trials"] == 1 and rows[0]["hypervolume"] is not None


def test_studies_table(study, storage_url, capsys):
    assert main(["studies", "--storage", storage_url]) == 0
    out = capsys.readouterr().out
    header, line = out.splitlines()[:2]
    assert header.split()[:3] == ["study", "task", "trials"] and "hypervolume" in header
    assert line.split()[:3] == ["tiny", "icl_regression", "6"]


def test_pareto_json_is_the_front(study, storage_url, capsys):
    assert main(["pareto", "tiny", "--storage", storage_url, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    best = front(load_records(study))
    assert [r["number"] for r in rows] == [r.number for r in best]
    assert rows == [{**r.row(), "hypervolume": rows[0]["hypervolume"]} for r in best]
    for r in rows:
        assert {"number", "val_loss", "flops_per_token", "hash", "family", "params", "metric",
                "sampled", "hypervolume"} <= set(r)
        t = study.trials[r["number"]]
        assert (r["val_loss"], r["flops_per_token"]) == tuple(t.values)
        assert r["params"] == t.user_attrs["params"] and r["sampled"] == t.params


def test_pareto_table(study, storage_url, capsys):
    assert main(["pareto", "tiny", "--storage", storage_url]) == 0
    out = capsys.readouterr().out
    assert out.startswith("study 'tiny': ") and "hypervolume" in out
    lines = out.splitlines()
    n = len(front(load_records(study)))
    assert lines[2 + n].startswith("Per family (own front; matched = best loss at <= ")
    assert lines[-2].startswith("The front has ")  # the answer: table, front, sentence, PNG
    png = lines[-1].removeprefix("Picture of the front: ")
    assert png.endswith("front.png") and open(png, "rb").read(4) == b"\x89PNG"


def test_unknown_study_lists_the_studies(study, storage_url, capsys):
    assert main(["pareto", "nope", "--storage", storage_url]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "no study named 'nope'" in err and "studies: tiny" in err


def test_missing_database_is_an_error_not_a_new_file(tmp_path, capsys):
    url = f"sqlite:///{tmp_path}/missing.db"
    assert main(["studies", "--storage", url]) == 2
    assert "no study database at" in capsys.readouterr().err
    assert main(["pareto", "x", "--storage", url]) == 2
    assert not (tmp_path / "missing.db").exists()


def test_progress_lines_on_change_and_summary():
    import io

    from studies.progress import Progress, Snapshot, format_line, format_summary

    snap = Snapshot(target=4, done=1, ok=1, running=2, failed=0, interrupted=1, infeasible=3,
                    duplicate=1, front_size=1, hypervolume=0.25, elapsed_s=75.0, eta_s=150.0)
    line = format_line(snap)
    for part in ("trials 1/4 done", "running 2", "failed 0", "interrupted 1", "infeasible 3",
                 "front 1",
                 "hypervolume 0.25", "elapsed 1m15s", "ETA 2m30s"):
        assert part in line, part
    stream = io.StringIO()  # not a terminal: a line per change, not per call
    progress = Progress(stream)
    progress.update(snap)
    progress.update(snap)
    progress.update(Snapshot(**{**snap.__dict__, "done": 2, "ok": 2}))
    assert stream.getvalue().count("\n") == 2
    summary = format_summary(study_name="s", storage_url="sqlite:///x.db", artifact_dir="/a",
                             snapshot=snap, front=[{"number": 0, "family": "mlr",
                                                    "val_loss": 1.0, "flops_per_token": 4160.0,
                                                    "hash": "ab"}],
                             interrupted=True)
    assert "mlbtc dashboard --storage sqlite:///x.db" in summary and "resume:" in summary
    assert "4,160" in summary
    default = format_summary(study_name="s", storage_url="sqlite:///mlbtc.db", artifact_dir="/a",
                             snapshot=snap, front=[], interrupted=False, default_storage=True)
    assert "next:      mlbtc dashboard\n" in default and "--storage" not in default


def test_every_command_finds_the_default_storage(tmp_path, monkeypatch, capsys):
    # mlbtc search writes ./mlbtc.db by default; studies/pareto/export/dashboard read it.
    from dashboard.store import open_reader
    from studies.runner import storage_url_for
    from studies.space import load_space
    from studies.storage import DEFAULT_URL, open_storage

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLBTC_STORAGE", raising=False)
    (tmp_path / "s.yaml").write_text(
        "name: s\ntask: {name: icl_regression, options: {n_dims: 4, n_points: 8}}\n"
        "budget: 2e7\ntrials: 1\nspace: {width: 16, depth: 1, attention: {kind: standard, "
        "heads: 2}}\n")
    assert storage_url_for(load_space(tmp_path / "s.yaml")) == DEFAULT_URL
    assert main(["studies"]) == 2 and "no study database at mlbtc.db" in capsys.readouterr().err
    make_study(DEFAULT_URL, tmp_path / "artifacts")
    assert main(["studies"]) == 0 and "tiny" in capsys.readouterr().out
    assert main(["pareto", "tiny"]) == 0
    assert open_storage(None, create=False).url == open_reader(None).url == DEFAULT_URL
    monkeypatch.setenv("MLBTC_STORAGE", f"sqlite:///{tmp_path}/other.db")
    assert main(["studies"]) == 2 and "other.db" in capsys.readouterr().err

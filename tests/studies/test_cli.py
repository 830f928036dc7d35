"""mlbtc studies / mlbtc pareto on a real study storage: JSON keys, tables, errors."""

from __future__ import annotations

import json

import optuna
import pytest
from _study_factory import make_study

from mlbtc_search.cli import main
from studies.pareto import front_rows

optuna.logging.set_verbosity(optuna.logging.WARNING)


@pytest.fixture
def study(storage_url, tmp_path):
    return make_study(storage_url, tmp_path / "artifacts")


def test_studies_json_lists_each_study(study, storage_url, capsys):
    make_study(storage_url, study.user_attrs["mlbtc"]["artifact_dir"], name="other",
               models=(0,), failures=False)
    assert main(["studies", "--storage", storage_url, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == ["other", "tiny"]
    for key in ("name", "task", "trials", "states", "statuses", "best_loss", "front_size",
                "hypervolume", "last_update"):
        assert key in rows[1], key
    assert rows[1]["task"] == "icl_regression" and rows[1]["states"]["COMPLETE"] == 3
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
    assert [r["trial"] for r in rows] == [r["trial"] for r in front_rows(study)]
    for r in rows:
        assert {"trial", "loss", "flops", "hash", "family", "params", "metric",
                "hypervolume"} <= set(r)
        t = study.trials[r["trial"]]
        assert (r["loss"], r["flops"]) == tuple(t.values)
        assert r["hash"] == t.user_attrs["hash"] and r["params"] == t.params


def test_pareto_table(study, storage_url, capsys):
    assert main(["pareto", "tiny", "--storage", storage_url]) == 0
    out = capsys.readouterr().out
    assert out.startswith("study 'tiny': ") and "hypervolume" in out
    assert len(out.splitlines()) == 2 + len(front_rows(study))


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

    snap = Snapshot(target=4, done=1, ok=1, running=2, failed=0, infeasible=3, duplicate=1,
                    front_size=1, hypervolume=0.25, elapsed_s=75.0, eta_s=150.0)
    line = format_line(snap)
    for part in ("trials 1/4 done", "running 2", "failed 0", "infeasible 3", "front 1",
                 "hypervolume 0.25", "elapsed 1m15s", "ETA 2m30s"):
        assert part in line, part
    stream = io.StringIO()  # not a terminal: a line per change, not per call
    progress = Progress(stream)
    progress.update(snap)
    progress.update(snap)
    progress.update(Snapshot(**{**snap.__dict__, "done": 2, "ok": 2}))
    assert stream.getvalue().count("\n") == 2
    summary = format_summary(study_name="s", storage_url="sqlite:///x.db", artifact_dir="/a",
                             snapshot=snap, front=[{"trial": 0, "family": "mlr", "loss": 1.0,
                                                    "flops": 4160.0, "hash": "ab"}],
                             interrupted=True)
    assert "mlbtc dashboard --storage sqlite:///x.db" in summary and "resume:" in summary
    assert "4,160" in summary

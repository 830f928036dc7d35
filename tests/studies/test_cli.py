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

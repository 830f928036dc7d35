"""optuna-dashboard is a first-class viewer of a study written by a real ``mlbtc search``.

The real ``optuna-dashboard`` server (a dev dependency) runs on a free port over the study's
SQLite file and artifact directory; its HTTP API must show the study, both objective names,
every trial's params and user attrs (each value whole, JSON values valid: no attr is cut at
optuna-dashboard's 1,024 characters) and the trials' artifacts, which download byte for byte.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import urllib.error
import urllib.request

import optuna
import pytest
from _search_helpers import REPO, cli_env, kill_group, run_search_cli, wait_for, write_space
from services import free_port

from studies.record import TrialRecord
from studies.storage import load_study, open_storage, study_info

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=30) as r:  # noqa: S310 - our local server
        return r.read()


def _up(base: str) -> bool:
    try:
        return bool(json.loads(_get(base + "/api/studies")))
    except (OSError, urllib.error.URLError, ValueError):
        return False


def _json_or_text(value: str) -> object:
    """A user attr as optuna-dashboard shows it: JSON text must parse whole."""
    if value[:1] in ("{", "["):
        return json.loads(value)  # a cut value would raise here
    return value


@pytest.mark.timeout(600)
def test_optuna_dashboard_shows_the_study_attrs_and_artifacts(tmp_path):
    exe = shutil.which("optuna-dashboard")
    if exe is None:
        pytest.fail("optuna-dashboard is not installed (it is in the dev extra)")
    url = f"sqlite:///{tmp_path}/study.db"
    space = write_space(tmp_path / "tiny.yaml", trials=2, workers=2)
    cp = run_search_cli([str(space), "--storage", url], cli_env(tmp_path), REPO)
    assert cp.returncode == 0, cp.stderr

    study = load_study(open_storage(url, create=False), "tiny")
    info = study_info(study)
    trials = study.get_trials(deepcopy=False)
    assert len(study.user_attrs["mlbtc"]) > 1024  # would be cut if it were stored as a dict

    port = free_port()
    proc = subprocess.Popen([exe, url, "--host", "127.0.0.1", "--port", str(port),
                             "--artifact-dir", str(info.artifact_dir)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, env={**os.environ})
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _up(base), 120, "optuna-dashboard to serve", proc)
        studies = json.loads(_get(base + "/api/studies"))["study_summaries"]
        (entry,) = [s for s in studies if s["study_name"] == "tiny"]
        detail = json.loads(_get(f"{base}/api/studies/{entry['study_id']}"))

        assert detail["objective_names"] == ["val_loss", "flops_per_token"]
        assert detail["directions"] == ["minimize", "minimize"]
        study_attrs = {a["key"]: a["value"] for a in detail["user_attrs"]}
        assert _json_or_text(study_attrs["mlbtc"])["artifact_dir"] == info.artifact_dir

        shown = {t["number"]: t for t in detail["trials"]}
        assert sorted(shown) == sorted(t.number for t in trials)
        downloaded = 0
        for t in trials:
            api = shown[t.number]
            assert {p["name"]: p["param_external_value"] for p in api["params"]} == {
                k: str(v) for k, v in t.params.items()}
            attrs = {a["key"]: a["value"] for a in api["user_attrs"]}
            assert attrs.keys() == t.user_attrs.keys()
            for key, value in attrs.items():
                assert _json_or_text(value) is not None, key
            record = TrialRecord.from_trial(t)
            if record.state != "complete":
                continue
            assert json.loads(attrs["spec"]) == record.spec
            assert json.loads(attrs["curve"]) == record.curve
            artifacts = {a["artifact_id"]: a for a in api["artifacts"]}
            assert {record.weights_artifact_id, record.curve_artifact_id} <= set(artifacts)
            assert artifacts[record.curve_artifact_id]["filename"].endswith(".jsonl")
            blob = _get(f"{base}/artifacts/{entry['study_id']}/{api['trial_id']}/"
                        f"{record.weights_artifact_id}")
            with open(os.path.join(str(info.artifact_dir), record.weights_artifact_id),
                      "rb") as fh:
                assert blob == fh.read()
            downloaded += 1
        assert downloaded >= 1
    finally:
        kill_group(proc)


optuna.logging.set_verbosity(optuna.logging.WARNING)

"""The read-only storage layer: same trials as Optuna, incremental, never writes, never locks."""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import optuna
import pytest
from dashboard_factory import add_trial, new_study, safetensors_bytes, tiny_spec
from optuna.trial import TrialState

from dashboard import data
from dashboard.store import (
    TrialCache,
    find_study,
    list_studies,
    load_trial,
    open_reader,
)
from mlbtc_search.errors import UsageError
from studies.record import StudyInfo, TrialRecord
from studies.storage import read_artifact


def _expected(storage, study, t) -> TrialRecord:
    """What the fast reader must return for ``t``: its record, without the lazy curve and
    the sampled params (the dashboard reads neither in bulk)."""
    import dataclasses

    trial_id = storage.get_trial_id_from_study_id_trial_number(
        storage.get_study_id_from_name(study.study_name), t.number)
    return dataclasses.replace(TrialRecord.from_trial(t, trial_id), curve=None, sampled={})


def _fill(storage, tmp_path: Path) -> optuna.Study:
    study = new_study(storage, "s", tmp_path / "art")
    spec = tiny_spec("standard")
    add_trial(study, "ok", spec, loss=0.9, flops=5e3, weights=safetensors_bytes(spec))
    add_trial(study, "ok", tiny_spec("mlr"), loss=0.95, flops=4e3)
    add_trial(study, "infeasible", tiny_spec("standard", width=32), flops=9e4,
              reason="too big")
    add_trial(study, "failed", tiny_spec("mlr"), flops=4e3, reason="loss is NaN",
              val_loss=math.nan)
    add_trial(study, "running", tiny_spec("bilinear_btt"), flops=6e3)
    study.add_trial(optuna.trial.create_trial(values=[math.inf, 7e3], user_attrs={
        "status": "ok", "family": "standard"}))
    return study


def test_fast_reader_returns_what_optuna_returns(storage_url, tmp_path):
    writer = optuna.storages.RDBStorage(storage_url)
    study = _fill(writer, tmp_path)
    reader = open_reader(storage_url)
    info = find_study(reader, "s")
    assert info.metric_names == ("val_loss", "flops_per_token")
    assert info.info.task_name == "timeseries"
    records, changed = TrialCache(reader).trials(info.study_id)
    assert changed
    expected = study.get_trials(deepcopy=False)
    assert [r.number for r in records] == [t.number for t in expected]
    for r, t in zip(records, expected, strict=True):
        want = _expected(writer, study, t)
        assert r.values == want.values and (r.val_loss == want.val_loss or (
            r.val_loss != r.val_loss and want.val_loss != want.val_loss))
        assert r.__dict__.keys() == want.__dict__.keys()
        for key in r.__dict__:
            if key != "val_loss":
                assert getattr(r, key) == getattr(want, key), key
    assert records[5].values == (math.inf, 7e3)
    full = load_trial(reader, info.study_id, 0)
    assert full.curve == TrialRecord.from_trial(expected[0]).curve and full.curve
    with pytest.raises(UsageError, match="no trial 99"):
        load_trial(reader, info.study_id, 99)


def test_refresh_reads_only_new_and_unfinished_trials(tmp_path):
    url = f"sqlite:///{tmp_path}/s.db"
    writer = optuna.storages.RDBStorage(url)
    study = _fill(writer, tmp_path)
    cache = TrialCache(open_reader(url))
    sid = study._study_id
    first, changed = cache.trials(sid)
    assert changed and len(first) == 6
    again, changed = cache.trials(sid)
    assert not changed and [r.number for r in again] == list(range(6))
    running = next(t for t in study.get_trials() if t.state == TrialState.RUNNING)
    study.tell(running.number, [0.8, 6e3])
    add_trial(study, "ok", tiny_spec("standard"), loss=0.5, flops=3e4)
    records, changed = cache.trials(sid)
    assert changed and len(records) == 7
    assert records[4].state == "complete" and records[4].values == (0.8, 6e3)
    assert records[6].val_loss == 0.5
    assert data.study_view(records).front == data.study_view(
        [TrialRecord.from_trial(t) for t in writer.get_all_trials(sid)]).front


def test_refresh_finds_a_trial_whose_insert_committed_late(tmp_path):
    """Concurrent PostgreSQL writers can commit trial ids out of order: a trial with a smaller
    id than the newest the reader knows must still appear."""
    import sqlalchemy as sa

    url = f"sqlite:///{tmp_path}/s.db"
    writer = optuna.storages.RDBStorage(url)
    study = new_study(writer, "s", tmp_path / "art")
    add_trial(study, "ok", tiny_spec("standard"), loss=0.9, flops=5e3)
    add_trial(study, "ok", tiny_spec("mlr"), loss=0.8, flops=6e3)
    cache = TrialCache(open_reader(url))
    first, _ = cache.trials(study._study_id)
    trials_t = sa.Table("trials", sa.MetaData(), autoload_with=writer.engine)
    late_id = first[0].trial_id + 1000  # move the newest far up, leaving a gap below it
    with writer.engine.begin() as conn:
        conn.execute(sa.update(trials_t).where(trials_t.c.trial_id == first[1].trial_id)
                     .values(trial_id=late_id))
    cache = TrialCache(open_reader(url))
    records, _ = cache.trials(study._study_id)
    assert [r.trial_id for r in records] == [first[0].trial_id, late_id]
    with writer.engine.begin() as conn:  # a trial committed late, with a smaller id
        conn.execute(sa.insert(trials_t).values(
            trial_id=first[0].trial_id + 1, number=2, study_id=study._study_id,
            state="FAIL"))
    records, changed = cache.trials(study._study_id)
    assert changed and sorted(r.number for r in records) == [0, 1, 2]


def test_open_reader_never_creates_a_database(tmp_path, monkeypatch):
    missing = tmp_path / "nope.db"
    with pytest.raises(UsageError, match="no study database at"):
        open_reader(f"sqlite:///{missing}")
    assert not missing.exists()
    monkeypatch.setenv("MLBTC_STORAGE", f"sqlite:///{missing}")
    with pytest.raises(UsageError, match="nope.db"):
        open_reader(None)
    empty = tmp_path / "empty.db"
    empty.write_bytes(b"")
    with pytest.raises(UsageError, match="cannot open the storage"):
        open_reader(f"sqlite:///{empty}")
    assert empty.stat().st_size == 0  # no tables were created


def test_unknown_study_lists_the_studies(tmp_path):
    url = f"sqlite:///{tmp_path}/s.db"
    new_study(optuna.storages.RDBStorage(url), "alpha", tmp_path / "a")
    reader = open_reader(url)
    assert [s.name for s in list_studies(reader)] == ["alpha"]
    with pytest.raises(UsageError, match="unknown study 'beta'; studies in this storage: "
                                         "'alpha'"):
        find_study(reader, "beta")


def test_weights_are_read_only_by_the_recorded_artifact_id(tmp_path):
    url = f"sqlite:///{tmp_path}/s.db"
    _fill(optuna.storages.RDBStorage(url), tmp_path)
    reader = open_reader(url)
    entry = find_study(reader, "s")
    trial = load_trial(reader, entry.study_id, 0)
    blob = read_artifact(entry.info, trial.weights_artifact_id, "the weights")
    assert blob == safetensors_bytes(tiny_spec("standard"))
    (tmp_path / "secret").write_text("secret")
    for bad in ("../secret", "/etc/passwd", "..", ""):
        with pytest.raises(UsageError, match="has no usable artifact id"):
            read_artifact(entry.info, bad, "the weights")
    with pytest.raises(UsageError, match="artifact directory of the study"):
        read_artifact(StudyInfo(), trial.weights_artifact_id, "the weights")
    with pytest.raises(UsageError, match="not found in the artifact store"):
        read_artifact(entry.info, "0123-abc", "the weights")
    assert entry.info.artifact_dir == str(tmp_path / "art")


WRITER = textwrap.dedent("""
    import sys, optuna
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url, n = sys.argv[1], int(sys.argv[2])
    study = optuna.load_study(study_name="s", storage=url)
    attrs = {"status": "ok", "family": "standard", "spec": {"width": 16}, "curve": [
        {"step": s, "flops": s * 1e6, "train_loss": 1.0} for s in range(50)]}
    for i in range(n):
        t = study.ask()
        for k, v in attrs.items():
            t.set_user_attr(k, v)
        study.tell(t, [1.0 / (i + 1), 1e3 * (i + 1)])
    print("writer done", flush=True)
""")


def test_reader_beside_a_running_writer_never_sees_database_locked(tmp_path):
    """A search process writes trials (Optuna's default SQLite settings, rollback journal)
    while the dashboard's data functions read in a loop: neither side may fail."""
    url = f"sqlite:///{tmp_path}/s.db"
    new_study(optuna.storages.RDBStorage(url), "s", tmp_path / "art")
    n = 25
    proc = subprocess.Popen([sys.executable, "-c", WRITER, url, str(n)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    reader = open_reader(url)
    cache = TrialCache(reader)
    sid = find_study(reader, "s").study_id
    reads = 0
    deadline = time.monotonic() + 120
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            records, _ = cache.trials(sid)  # incremental reads
            data.study_view(records)
            TrialCache(reader).trials(sid)  # full reads
            list_studies(reader)
            reads += 1
    finally:
        out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "locked" not in err and "writer done" in out
    assert reads > 0
    records, _ = cache.trials(sid)
    assert len(records) == n and all(r.state == "complete" for r in records)

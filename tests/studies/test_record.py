"""The trial record: the storage contract in code (encoding, decoding, states)."""

from __future__ import annotations

import json
import math

import optuna
import pytest
from optuna.trial import TrialState, create_trial

from studies.record import StudyInfo, TrialRecord, decode_attr, encode_attr


def test_dicts_and_lists_are_stored_as_json_strings_and_read_back():
    spec = {"width": 64, "layers": [{"kind": "mlr", "ranks": list(range(300))}]}
    stored = encode_attr(spec)
    assert isinstance(stored, str) and len(stored) > 1024  # a string: shown whole, never cut
    assert decode_attr(stored) == spec
    assert encode_attr([1.0, math.nan, {"a": math.inf}]) == '[1.0,null,{"a":null}]'
    for scalar in (1, 2.5, "text", None, True):
        assert encode_attr(scalar) == scalar
    assert decode_attr("{not json") == "{not json"  # a plain string that looks like JSON


@pytest.mark.parametrize("stored", ["json", "dict"])  # "dict": studies written before
def test_a_record_reads_both_encodings(stored):
    spec, train = {"width": 16, "depth": 1}, {"lr": 0.003}
    attrs = {"status": "ok", "spec": spec, "train": train, "params": 42, "hash": "ab",
             "val_loss": 0.5, "flops_per_token": 10.0, "weights_artifact_id": "w"}
    if stored == "json":
        attrs = {k: encode_attr(v) for k, v in attrs.items()}
    trial = create_trial(values=[0.5, 10.0], user_attrs=attrs,
                         params={"width": 16},
                         distributions={"width": optuna.distributions.CategoricalDistribution(
                             [16, 32])})
    r = TrialRecord.from_trial(trial)
    assert (r.state, r.spec, r.train, r.params, r.point) == ("complete", spec, train, 42,
                                                             (0.5, 10.0))
    assert r.exportable and r.trained and r.sampled == {"width": 16}
    row = r.row()
    assert row["number"] == r.number and row["sampled"] == {"width": 16}
    json.dumps(row, allow_nan=False)


def test_states_and_counting():
    def rec(state, **attrs):
        return TrialRecord.from_trial(create_trial(state=state, user_attrs=attrs,
                                                   values=[1.0, 2.0] if state ==
                                                   TrialState.COMPLETE else None))

    assert rec(TrialState.FAIL, status="failed", retried=True).trained is False
    assert rec(TrialState.FAIL, status="failed").trained is True
    assert rec(TrialState.FAIL, status="interrupted", reason="interrupted").state == "interrupted"
    assert rec(TrialState.FAIL, status="duplicate", duplicate_of=3).row()["reason"] == \
        "duplicate of trial 3"
    nan = TrialRecord.from_parts(number=0, optuna_state="COMPLETE", values=[math.nan, 5.0],
                                 user_attrs={})
    assert nan.point is None and nan.row()["val_loss"] is None
    assert rec(TrialState.FAIL, foo=[1, 2]).extra == {"foo": [1, 2]}


def test_study_info_round_trip():
    info = StudyInfo(space={"name": "s"}, task={"name": "text", "options": {}},
                     budget_flops=1e9, artifact_dir="/a", code_version="v",
                     identity={"seed": 0, "train": {}, "space_hash": "h"})
    stored = info.to_attr()
    assert isinstance(stored, str)
    assert StudyInfo.from_attrs({"mlbtc": stored}) == info
    assert StudyInfo.from_attrs({"mlbtc": json.loads(stored)}) == info
    assert not StudyInfo.from_attrs({}).made_by_mlbtc

"""The Scaling page: records with rungs -> fits, figure, predictions; routed by the app."""

from __future__ import annotations

import json

import optuna
import pytest

from dashboard.app import Dashboard
from dashboard.scaling import report_for, scaling_figure, scaling_page
from studies.record import StudyInfo, TrialRecord, encode_attr

BUDGETS = [1e9, 3e9, 1e10, 3e10]
CURVES = {0: ("mlr", 2.0, 60.0, 0.15), 1: ("mlr", 2.1, 80.0, 0.15),
          2: ("standard", 1.5, 6e3, 0.3), 3: ("standard", 1.6, 6e3, 0.3)}


def law(E, A, alpha, c):
    return E + A * c ** -alpha


def attrs(number: int) -> dict:
    fam, E, A, alpha = CURVES[number]
    rungs = [{"rung": k, "budget_flops": b, "val_loss": law(E, A, alpha, b), "status": "ok",
              "flops_per_token": 1e5, "spent_flops": b} for k, b in enumerate(BUDGETS)]
    return {"family": fam, "rungs": rungs, "status": "ok", "rung": len(rungs) - 1}


def records() -> list[TrialRecord]:
    return [TrialRecord.from_parts(number=n, optuna_state="COMPLETE",
                                   values=[attrs(n)["rungs"][-1]["val_loss"], 1e5],
                                   user_attrs={k: encode_attr(v) for k, v in attrs(n).items()})
            for n in CURVES]


def text_of(component) -> str:
    return json.dumps(component.to_plotly_json(), default=lambda o: o.to_plotly_json()
                      if hasattr(o, "to_plotly_json") else str(o))


def test_report_figure_and_page_from_records():
    assert report_for(records())[2] == pytest.approx(3e11)  # default: 10 x the top budget
    assert report_for(records())[1].best["name"] == "0"  # mlr leads there
    points, report, target = report_for(records(), 1e15)
    assert len(points) == 16 and target == 1e15
    assert [c.name for c in report.families] == ["mlr", "standard"]
    assert report.best["name"] == "2"  # standard falls faster and leads at 1e15
    fig = scaling_figure(points, report, target)
    names = [t.name for t in fig.data]
    assert "predicted frontier" in names and {"mlr", "standard"} <= set(names)
    assert fig.layout.xaxis.type == "log"
    page = text_of(scaling_page("s", points, report, target))
    assert "Predicted best at 1e+15 FLOPs: trial 2 (standard)" in page
    assert "Families mlr and standard cross at" in page


def test_page_without_rungs_says_why():
    assert report_for([]) == ([], None, None)
    assert "recorded no budget rungs" in text_of(scaling_page("s", [], None, None))


def test_the_app_routes_the_scaling_page(tmp_path):
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    study = optuna.create_study(storage=url, study_name="mf",
                                directions=["minimize", "minimize"])
    study.set_user_attr("mlbtc", StudyInfo(artifact_dir=str(tmp_path)).to_attr())
    for n in CURVES:
        study.add_trial(optuna.trial.create_trial(
            values=[attrs(n)["rungs"][-1]["val_loss"], 1e5],
            user_attrs={k: encode_attr(v) for k, v in attrs(n).items()}))
    board = Dashboard(optuna.storages.RDBStorage(url))
    page = text_of(board.page("/study/mf/scaling"))
    assert "mf: scaling laws" in page
    assert "Predicted best at 3e+11 FLOPs: trial 0 (mlr)" in page
    assert "Scaling laws" in text_of(board.page("/study/mf"))  # the study page links to it

"""``mlbtc importance STUDY [--json]`` over a real study storage."""

from __future__ import annotations

import json

import optuna
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import create_trial

from mlbtc_search.cli import main
from studies.record import StudyInfo, encode_attr


def _study(url: str) -> None:
    study = optuna.create_study(storage=url, study_name="imp",
                                directions=["minimize", "minimize"])
    study.set_user_attr("mlbtc", StudyInfo(objectives=("val_loss", "flops_per_token")).to_attr())
    dists = {"attention.heads": CategoricalDistribution([1, 2, 4]),
             "train.lr": FloatDistribution(1e-4, 1e-2, log=True)}
    for i in range(12):
        heads = [1, 2, 4][i % 3]
        lr = 1e-4 * 1.5 ** i
        summary = {"heads": heads, "qk_width": 8 * heads, "cores": 1 + i % 2}
        study.add_trial(create_trial(
            values=[1.0 + abs(lr - 1e-3) * 100, 1e4 * heads],
            params={"attention.heads": heads, "train.lr": lr}, distributions=dists,
            user_attrs={"status": "ok", "descriptors": encode_attr({"summary": summary})}))


def test_importance_json_and_text(storage_url, capsys):
    _study(storage_url)
    assert main(["importance", "imp", "--storage", storage_url, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"params", "descriptors"}
    params, descs = out["params"], out["descriptors"]
    assert next(iter(params["val_loss"])) == "train.lr"  # sorted, most important first
    assert next(iter(params["flops_per_token"])) == "attention.heads"
    assert set(descs["flops_per_token"]) == {"heads", "qk_width", "cores"}
    assert main(["importance", "imp", "--storage", storage_url, "--top", "1"]) == 0
    text = capsys.readouterr().out
    assert "Parameter importances (PED-ANOVA), top 1 per objective:" in text
    assert "Structure descriptor importances (PED-ANOVA)" in text
    assert main(["importance", "nope", "--storage", storage_url]) == 2
    assert "no study named 'nope'" in capsys.readouterr().err

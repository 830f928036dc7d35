"""A 2-worker smoke search of each shipped neutral space (issue 11): real Ray, SQLite, training.

Each space is run as shipped except for its size: 3 trials of 2 seeds, a budget of a few steps
at batch 8, one evaluation batch. Checked: descriptors and the structure label on every trial,
the mean over seeds and its spread, importances, and the answer with its PNG.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from mlbtc_search.yamlio import load_yaml
from studies.answer import entries, format_answer
from studies.importance import param_importances
from studies.runner import run_search
from studies.space import SearchSpace
from studies.storage import load_records, load_study, open_storage

ROOT = Path(__file__).resolve().parents[2]
BUDGET = {"mlbtc_icl": 4e9, "mlbtc_text": 1.5e9}


@pytest.mark.parametrize("name", sorted(BUDGET))
def test_neutral_space_smoke_search(name, ray_local, tmp_path, monkeypatch):
    monkeypatch.setenv("MLBTC_ARTIFACTS", str(tmp_path / "artifacts"))
    path = ROOT / "search_spaces" / f"{name}.yaml"
    data = load_yaml(path).data
    assert data["seeds"] == 2 and "baselines" not in data  # neutral: no family goes first
    data["train"] = {**data["train"], "batch_size": 8, "eval_batches": 1, "eval_every": 1000}
    url = f"sqlite:///{tmp_path}/s.db"
    space = SearchSpace.from_dict(data, str(path), {"trials": 3, "workers": 2, "storage": url,
                                                    "budget": BUDGET[name]})
    outcome = run_search(space)
    assert outcome.snapshot.ok == 3, outcome.snapshot

    study = load_study(open_storage(url, create=False), name)
    done = [r for r in load_records(study) if r.state == "complete"]
    assert len(done) == 3
    for r in done:
        assert r.structure and r.descriptors["family"] == r.structure
        summary = r.descriptors["summary"]
        assert {"heads", "qk_width", "min_rank", "cores", "sequence_levels"} <= set(summary)
        assert r.seeds == 2 and len(r.seed_results) == 2 and r.loss_std is not None
        assert r.val_loss == pytest.approx(sum(s["val_loss"] for s in r.seed_results) / 2)
        assert any(k.endswith(".heads") for k in r.sampled)  # the structure was sampled
    imp = param_importances(study, ["val_loss", "flops_per_token"])
    assert set(imp) == {"val_loss", "flops_per_token"} and imp["val_loss"]
    text = format_answer(entries(done))
    assert "Per family" in text and "± = std over 2 seeds" in text

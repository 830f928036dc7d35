"""The dashboard's structure views (issue 11): colour and size by a descriptor, error bars over
seeds, PED-ANOVA importances of parameters and descriptors."""

from __future__ import annotations

import json

import optuna
import plotly.io as pio
from dashboard_factory import add_trial, new_study, tiny_spec

from dashboard import data, figures
from dashboard.app import Dashboard
from dashboard.store import open_reader
from studies.descriptors import describe
from studies.record import TrialRecord, encode_attr


def _trial(number: int, kind: str, heads: int, loss: float, flops: float, std: float):
    spec = tiny_spec(kind)
    attrs = {"status": "ok", "family": kind, "spec": spec.to_dict(), "seeds": 2,
             "loss_std": std, "structure": kind, "descriptors": describe(spec),
             "train": {"lr": 1e-3}}
    attrs["descriptors"]["summary"]["heads"] = heads  # make one descriptor vary
    return TrialRecord.from_parts(
        number=number, optuna_state="COMPLETE", values=[loss, flops],
        user_attrs={k: encode_attr(v) for k, v in attrs.items()},
        sampled={"kind": kind, "heads": heads, "lr": 1e-3 * (number + 1)})


def _view():
    recs = [_trial(i, ["standard", "mlr"][i % 2], [1, 2, 4][i % 3], 1.0 - 0.05 * i,
                   1e4 * (1 + i % 4), 0.01 * i) for i in range(8)]
    return recs, data.study_view(recs)


def test_rows_carry_descriptors_and_importances():
    _, view = _view()
    assert "d_heads" in view.descriptors and view.rows[0]["d_heads"] == 1
    assert set(view.importances) == {"params", "descriptors"}
    params = view.importances["params"]
    assert set(params) == {"val_loss", "flops_per_token"}
    assert {"kind", "heads", "lr"} >= set(params["val_loss"]) and params["val_loss"]


def test_front_coloured_and_sized_by_a_descriptor_with_error_bars():
    _, view = _view()
    fig = figures.pareto_figure(view.rows, view.front, color_by="d_heads", size_by="d_heads")
    pts = [t for t in fig.data if (t.meta or {}).get("role") in ("front", "dominated")]
    assert pts and all(t.marker.colorscale for t in pts)
    assert sorted({c for t in pts for c in t.marker.color}) == [1, 2, 4]
    sizes = [s for t in pts for s in t.marker.size]
    assert min(sizes) == 6 and max(sizes) == 22
    assert any(t.error_y.array and max(t.error_y.array) > 0 for t in pts)
    json.loads(pio.to_json(fig))
    plain = figures.pareto_figure(view.rows, view.front)  # by family, as before
    assert {t.meta["family"] for t in plain.data if (t.meta or {}).get("role") == "front"} \
        <= {"standard", "mlr"}


def test_importance_figure():
    _, view = _view()
    fig = figures.importance_figure(view.importances["params"], "sampled parameters")
    bars = [t for t in fig.data if (t.meta or {}).get("role") == "importance"]
    assert [t.meta["objective"] for t in bars] == ["val_loss", "flops_per_token"]
    empty = figures.importance_figure({}, "x")
    assert "appear once" in empty.layout.annotations[0].text


def test_study_page_data_over_a_real_storage(tmp_path):
    url = f"sqlite:///{tmp_path}/s.db"
    study = new_study(optuna.storages.RDBStorage(url), "structures", tmp_path / "art")
    for i in range(6):
        kind = ["standard", "mlr", "sliding_window"][i % 3]
        spec = tiny_spec(kind)
        desc = describe(spec)
        add_trial(study, "ok", spec, loss=1.0 - 0.05 * i, flops=1e4 * (1 + i % 4),
                  structure=kind, descriptors=encode_attr(desc), seeds=2, loss_std=0.01 * i)
    board = Dashboard(open_reader(url))
    sid = board.storage.get_study_id_from_name("structures")
    d = board.study_data(sid, None, None, color_by="d_sequence_levels", size_by="nonsense")
    assert {"label": "sequence_levels", "value": "d_sequence_levels"} in d["descriptors"]
    pts = [t for t in d["front"].data if (t.meta or {}).get("role") in ("front", "dominated")]
    assert all(t.marker.colorscale for t in pts)  # coloured by the descriptor
    assert any(t.error_y.array for t in pts)
    assert d["importance_descriptors"].data


def test_trial_page_lists_seeds_and_descriptors():
    recs, _ = _view()
    rec = TrialRecord.from_parts(
        number=9, optuna_state="COMPLETE", values=[1.0, 1e4],
        user_attrs={"status": "ok", "loss_std": 0.02, "seeds": 2, "seed_results": encode_attr(
            [{"seed": 0, "val_loss": 0.98}, {"seed": 1, "val_loss": 1.02}]),
            "descriptors": encode_attr(recs[1].descriptors)})
    items = dict(data.trial_metrics(rec))
    assert items["seeds (loss each)"] == "0: 0.98, 1: 1.02"
    assert items["structure"] == "mlr"
    assert items["layer 0 group 0 (2 heads)"].startswith("global: low_rank rank ")
    assert "descriptor: qk width" in items

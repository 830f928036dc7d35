"""The app over a real SQLite study: routes, the front against the storage, export, escaping."""

from __future__ import annotations

import io
import json
import random
import zipfile
from pathlib import Path

import optuna
import pytest
from dashboard_factory import add_trial, new_study, safetensors_bytes, tiny_spec
from optuna.trial import TrialState, create_trial

import mlbtc_search
from dashboard import pages
from dashboard.app import Dashboard, create_app
from dashboard.store import open_reader

pytestmark = pytest.mark.filterwarnings(
    r"ignore:\s*The dash_table.DataTable will be removed:DeprecationWarning")
SCRIPT = "<script>alert(1)</script>"
HTML_REASON = "<b>boom</b><img src=x onerror=alert(2)> loss became NaN"


@pytest.fixture(scope="module")
def storage_file(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("dash")
    url = f"sqlite:///{root}/s.db"
    writer = optuna.storages.RDBStorage(url)
    study = new_study(writer, "demo", root / "art")
    spec = tiny_spec("standard")
    add_trial(study, "ok", spec, loss=0.9, flops=5120.0, weights=safetensors_bytes(spec))
    add_trial(study, "ok", tiny_spec("mlr"), loss=0.95, flops=4224.0)
    add_trial(study, "failed", tiny_spec("mlr"), flops=4224.0, reason=HTML_REASON)
    add_trial(study, "infeasible", tiny_spec("standard", width=64), flops=8e4,
              reason="flops_per_token 8e4 exceeds 5e4")
    rng = random.Random(0)  # many light trials with ties, to check the front exactly
    light = []
    for i in range(40):
        state = rng.choice(["ok"] * 6 + ["failed", "infeasible", "duplicate"])
        fam = rng.choice(["standard", "mlr", "bilinear_btt"])
        if state == "ok":
            light.append(create_trial(
                values=[rng.choice([0.5, 0.6, 0.7, 0.8, 0.9]), rng.choice([1e3, 2e3, 4e3, 8e3])],
                user_attrs={"status": "ok", "family": fam, "val_loss": 0.0}))
        else:
            light.append(create_trial(state=TrialState.FAIL, user_attrs={
                "status": state, "family": fam, "flops_per_token": 1e3 * (i + 1),
                "reason": f"reason {i}", **({"duplicate_of": 0} if state == "duplicate" else {})}))
    study.add_trials(light)
    other = new_study(writer, SCRIPT, root / "art2")
    add_trial(other, "ok", tiny_spec("sliding_window"), loss=0.85, flops=4500.0)
    return url


@pytest.fixture(scope="module")
def board(storage_file) -> Dashboard:
    return Dashboard(open_reader(storage_file))


def strings(component) -> list[str]:
    """Every text child in a Dash component tree."""
    out: list[str] = []

    def walk(c):
        if isinstance(c, str):
            out.append(c)
        elif isinstance(c, list | tuple):
            for x in c:
                walk(x)
        elif hasattr(c, "children"):
            walk(c.children)

    walk(component)
    return out


def test_front_points_are_exactly_the_storages_non_dominated_complete_trials(board):
    storage = board.storage
    sid = storage.get_study_id_from_name("demo")
    trials = storage.get_all_trials(sid)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    brute = sorted(t.number for t in complete if not any(
        q.values[0] <= t.values[0] and q.values[1] <= t.values[1] and q.values != t.values
        for q in complete))
    fig = board.study_data(sid, None, None)["front"]
    drawn = sorted(n for tr in fig.data if (tr.meta or {}).get("role") == "front"
                   for n in tr.customdata)
    assert drawn == brute and len(brute) >= 3
    not_complete = {t.number for t in trials if t.state != TrialState.COMPLETE}
    dominated = {n for tr in fig.data if (tr.meta or {}).get("role") == "dominated"
                 for n in tr.customdata}
    assert not (set(drawn) | dominated) & not_complete
    assert set(drawn) | dominated == {t.number for t in complete}


def test_pages_route_and_dead_ends_say_why(board):
    home = strings(board.page("/"))
    assert "demo" in home and SCRIPT in home
    study = strings(board.page("/study/demo"))
    assert "demo" in study and "Pareto front" in study
    trial = strings(board.page("/study/demo/trial/0"))
    assert "Trial 0 " in trial and "Download export (.zip)" in trial
    assert "Not found" in strings(board.page("/study/nope"))
    assert "unknown study 'nope'" in " ".join(strings(board.page("/study/nope")))
    assert "no trial 999" in " ".join(strings(board.page("/study/demo/trial/999")))
    assert "There is no page at /x/y." in strings(board.page("/x/y"))


def test_storage_strings_stay_text(board):
    quoted = pages.study_path(SCRIPT)
    assert quoted == "/study/%3Cscript%3Ealert%281%29%3C%2Fscript%3E"
    assert SCRIPT in strings(board.page(quoted))
    failed = board.page("/study/demo/trial/2")
    assert HTML_REASON in strings(failed)
    source = "".join(p.read_text() for p in Path(pages.__file__).parent.glob("*.py"))
    assert "dangerously_set_inner_html=" not in source
    assert "\"html\": True" not in source and "'html': True" not in source


def test_study_data_filters_and_versions(board, storage_file):
    sid = board.storage.get_study_id_from_name("demo")
    d = board.study_data(sid, None, None)
    assert len(d["table"]) == 44
    assert {r["state"] for r in board.table(sid, None, ["infeasible"])} == {"infeasible"}
    assert {r["family"] for r in board.table(sid, ["mlr"], None)} == {"mlr"}
    row = next(r for r in d["table"] if r["number"] == 0)
    assert row["open"] == "[open →](/study/demo/trial/0)" and row["front"] in ("yes", "")
    _, version = board.views.get(sid)
    assert board.views.get(sid)[1] == version  # nothing changed: same version
    sid2 = board.storage.get_study_id_from_name(SCRIPT)
    study = optuna.load_study(study_name=SCRIPT, storage=storage_file)
    add_trial(study, "ok", tiny_spec("mlr"), loss=0.5, flops=9e3)
    view, newer = board.views.get(sid2)
    assert newer != board.views.get(sid)[1] and view.n_trials == 2


def test_export_zip_loads_with_the_core_alone(storage_file, tmp_path):
    app = create_app(storage_file)
    client = app.server.test_client()
    sid = Dashboard(open_reader(storage_file)).storage.get_study_id_from_name("demo")
    r = client.get(f"/export/{sid}/0")
    assert r.status_code == 200 and r.mimetype == "application/zip"
    assert 'filename="demo-trial0.zip"' in r.headers["Content-Disposition"]
    with zipfile.ZipFile(io.BytesIO(r.data)) as z:
        assert sorted(z.namelist()) == sorted(
            ["architecture.yaml", "model.safetensors", "metrics.json", "README.md"])
        z.extractall(tmp_path / "export")
    metrics = json.loads((tmp_path / "export" / "metrics.json").read_text())
    assert metrics["trial"] == 0 and metrics["val_loss"] == 0.9 and metrics["study"] == "demo"
    assert (tmp_path / "export" / "model.safetensors").read_bytes() == \
        safetensors_bytes(tiny_spec("standard"))
    model = mlbtc_search.load(tmp_path / "export")
    assert model.spec.hash() == tiny_spec("standard").hash()
    import torch

    assert model(torch.zeros(1, 4, 1)).shape == (1, 4, 1)
    readme = (tmp_path / "export" / "README.md").read_text()
    assert "trial 0 of study `demo`" in readme and "mlbtc_search.load" in readme
    assert "On the Pareto front" in readme or "Dominated" in readme


@pytest.mark.parametrize("path, why", [
    ("/export/{sid}/2", "not complete"), ("/export/{sid}/1", "no usable weights artifact"),
    ("/export/{sid}/999", "no trial 999"), ("/export/999/0", "no study with id 999")])
def test_export_refusals_are_404_with_the_reason(storage_file, path, why):
    client = create_app(storage_file).server.test_client()
    sid = open_reader(storage_file).get_study_id_from_name("demo")
    r = client.get(path.format(sid=sid))
    assert r.status_code == 404 and why in r.get_data(as_text=True)


def test_export_route_takes_only_numbers(storage_file):
    client = create_app(storage_file).server.test_client()
    for path in ("/export/1/..%2F..%2Fetc%2Fpasswd", "/export/1/0.zip", "/export/a/0"):
        r = client.get(path)  # not the export route: Dash's single-page index at most
        assert r.mimetype != "application/zip" and b"root:" not in r.data


def test_index_page_is_served_and_does_not_embed_storage_strings(storage_file):
    client = create_app(storage_file).server.test_client()
    r = client.get("/")
    assert r.status_code == 200 and b"mlbtc dashboard" in r.data
    assert b"<script>alert(1)" not in r.data
    assert client.get("/study/%3Cscript%3E").status_code == 200  # routed client-side

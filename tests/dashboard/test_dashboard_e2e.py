"""End to end in headless Chromium: a real SQLite study with tiny trained models, the real
server on a free port, the browser clicking through studies -> front -> trial -> export.

Also takes screenshots (set MLBTC_UPDATE_SCREENSHOTS=1 to refresh docs/img/dashboard-*.png).
"""

from __future__ import annotations

import io
import json
import os
import tempfile
import threading
import time
import urllib.request
import zipfile
from pathlib import Path

import optuna
import pytest
from dashboard_factory import (
    SEQ_LEN,
    add_trial,
    new_study,
    safetensors_bytes,
    tiny_spec,
    trained_trials,
)
from services import free_port

import mlbtc_search
from dashboard.cli import build_server
from mlbtc_search.model import model_flops

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300), pytest.mark.filterwarnings(
    r"ignore:\s*The dash_table.DataTable will be removed:DeprecationWarning")]

# Screenshots go to a temporary folder; MLBTC_UPDATE_SCREENSHOTS=1 refreshes the ones the README
# shows (docs/img), so a test run leaves the checkout clean.
IMG = (Path(__file__).resolve().parents[2] / "docs" / "img"
       if os.environ.get("MLBTC_UPDATE_SCREENSHOTS") else
       Path(tempfile.mkdtemp(prefix="mlbtc-screens-")))
SCRIPT = "<script>alert(1)</script>"
XSS_REASON = ('<b>boom</b><img src=x onerror="window.__xss=1;alert(2)"> loss became NaN '
              "at step 3")
SYNTHETIC = [("standard", 32, 1), ("mlr", 32, 1), ("bilinear_btt", 32, 1), ("standard", 32, 2),
             ("mlr", 32, 2), ("sliding_window", 32, 1), ("bilinear_btt", 64, 1),
             ("mlr", 64, 2), ("standard", 64, 2)]


def wait_until(condition, timeout: float = 60.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    delay = 0.02
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(delay)
        delay = min(delay * 2, 0.5)


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status == 200
    except OSError:
        return False


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    url = f"sqlite:///{root}/study.db"
    writer = optuna.storages.RDBStorage(url)
    study = new_study(writer, "ts-small", root / "artifacts")
    trained = trained_trials(study, ["standard", "mlr", "bilinear_btt"])
    for i, (kind, width, depth) in enumerate(SYNTHETIC):  # a richer front for the screenshots
        spec = tiny_spec(kind, width=width, depth=depth)
        flops = float(model_flops(spec, SEQ_LEN))
        loss = 0.32 * (flops / 5e3) ** -0.15 + 0.008 * ((i * 7) % 5 - 2)
        add_trial(study, "ok", spec, loss=round(loss, 4), flops=flops,
                  weights=safetensors_bytes(spec, seed=i), seed=i)
    add_trial(study, "infeasible", tiny_spec("standard", width=128, depth=2), flops=4e5,
              reason="flops_per_token 4e5 exceeds the space's max_flops 2e5")
    add_trial(study, "failed", tiny_spec("mlr", width=64), flops=4.2e4, reason=XSS_REASON)
    other = new_study(writer, SCRIPT, root / "artifacts2")
    for kind, width, loss in (("sliding_window", 16, 0.34), ("mlr", 32, 0.3),
                              ("standard", 64, 0.26)):
        spec = tiny_spec(kind, width=width)
        add_trial(other, "ok", spec, loss=loss, flops=float(model_flops(spec, SEQ_LEN)))
    port = free_port()
    server = build_server(url, "127.0.0.1", port)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    wait_until(lambda: http_ok(base + "/"), what="the dashboard to answer")
    yield {"url": url, "base": base, "study": study, "trained": trained, "writer": writer}
    server.shutdown()
    server.server_close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
    p = context.new_page()
    p.dialogs = []
    p.on("dialog", lambda d: (p.dialogs.append(d.message), d.dismiss()))
    yield p
    context.close()


FRONT_INFO = """() => {
  const gd = document.querySelector('#front .js-plotly-plot');
  const fl = gd._fullLayout, r = gd.getBoundingClientRect();
  const points = [];
  let drawn = 0;
  gd._fullData.forEach(t => {
    if (!t.meta || t.meta.role !== 'front') return;
    drawn += gd.querySelectorAll('.trace' + t.uid + ' path.point').length;
    for (let k = 0; k < t.customdata.length; k++) {
      points.push({n: t.customdata[k], flops: t.x[k],
                   x: r.left + fl.xaxis._offset + fl.xaxis.c2p(t.x[k]),
                   y: r.top + fl.yaxis._offset + fl.yaxis.c2p(t.y[k])});
    }
  });
  return {points: points, drawn: drawn};
}"""


def wait_graph(page, selector: str) -> None:
    page.wait_for_selector(f"{selector} .js-plotly-plot .main-svg", timeout=60000)
    page.wait_for_function(f"""() => {{
        const gd = document.querySelector('{selector} .js-plotly-plot');
        return gd && gd._fullData && gd._fullData.length > 0; }}""", timeout=60000)


def test_front_click_trial_page_export_and_screenshots(live, page, tmp_path):
    IMG.mkdir(parents=True, exist_ok=True)
    page.goto(live["base"] + "/")
    page.wait_for_selector("table.studies")
    page.screenshot(path=str(IMG / "dashboard-studies.png"), full_page=True)

    page.get_by_role("link", name="ts-small").click()
    page.wait_for_url("**/study/ts-small")
    wait_graph(page, "#front")
    wait_graph(page, "#hv")
    wait_graph(page, "#overlay")
    page.wait_for_selector("#trials td.dash-cell")

    trials = live["writer"].get_all_trials(live["study"]._study_id)
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    expected = sorted(t.number for t in complete if not any(
        q.values[0] <= t.values[0] and q.values[1] <= t.values[1] and q.values != t.values
        for q in complete))
    front = page.evaluate(FRONT_INFO)
    points = front["points"]
    assert sorted(p["n"] for p in points) == expected
    assert front["drawn"] == len(expected)  # in the DOM: one marker path per front point
    page.screenshot(path=str(IMG / "dashboard-study.png"), full_page=True)

    # The full-page screenshot resizes the viewport and Plotly relayouts: measure again now.
    page.locator("#front").scroll_into_view_if_needed()
    wait_graph(page, "#front")
    points = page.evaluate(FRONT_INFO)["points"]
    target = min(points, key=lambda p: p["flops"])  # the cheapest point: a trained model
    assert target["n"] in live["trained"]
    page.mouse.move(target["x"] + 1, target["y"])
    page.mouse.move(target["x"], target["y"])
    page.wait_for_selector("#front .hoverlayer .hovertext")
    page.mouse.click(target["x"], target["y"])
    page.wait_for_url(f"**/study/ts-small/trial/{target['n']}")
    page.wait_for_selector("h1:has-text('Trial')")
    assert page.locator("h1").inner_text().startswith(f"Trial {target['n']}")
    wait_graph(page, "#curve")
    wait_graph(page, "#matrix-graph")

    with page.expect_download() as info:
        page.click("#export-link")
    download = info.value
    assert download.suggested_filename == f"ts-small-trial{target['n']}.zip"
    blob = Path(download.path()).read_bytes()
    with zipfile.ZipFile(io.BytesIO(blob)) as z:
        assert sorted(z.namelist()) == ["README.md", "architecture.yaml", "metrics.json",
                                        "model.safetensors"]
        z.extractall(tmp_path / "export")
    metrics = json.loads((tmp_path / "export" / "metrics.json").read_text())
    assert metrics["trial"] == target["n"] and metrics["study"] == "ts-small"
    model = mlbtc_search.load(tmp_path / "export")
    import torch

    assert model(torch.zeros(2, SEQ_LEN, 1)).shape == (2, SEQ_LEN, 1)

    btt = live["trained"][2]  # the README shows a trained bilinear-BTT trial
    page.goto(f"{live['base']}/study/ts-small/trial/{btt}")
    wait_graph(page, "#curve")
    wait_graph(page, "#matrix-graph")
    page.screenshot(path=str(IMG / "dashboard-trial.png"), full_page=True)
    assert page.dialogs == []


def test_storage_strings_render_as_text_and_no_script_runs(live, page):
    page.goto(live["base"] + "/")
    page.wait_for_selector("table.studies")
    page.get_by_role("link", name=SCRIPT).click()
    page.wait_for_selector("h1.study-name")
    assert page.locator("h1.study-name").inner_text() == SCRIPT
    wait_graph(page, "#front")
    assert page.locator(".crumbs").inner_text().endswith(SCRIPT)

    failed = next(t.number for t in live["writer"].get_all_trials(live["study"]._study_id)
                  if t.user_attrs.get("status") == "failed")
    page.goto(f"{live['base']}/study/ts-small/trial/{failed}")
    page.wait_for_selector("#failure-reason")
    assert page.locator("#failure-reason").inner_text() == XSS_REASON
    assert page.locator("#failure-reason b, #failure-reason img").count() == 0
    page.goto(f"{live['base']}/study/ts-small")
    wait_graph(page, "#front")
    page.wait_for_selector("#trials td.dash-cell")
    assert page.evaluate("() => window.__xss") is None
    assert page.dialogs == []


def test_study_page_refreshes_while_a_search_writes(live, page):
    page.goto(live["base"] + "/study/ts-small")
    wait_graph(page, "#front")
    card = page.locator(".card").first.locator(".card-value")
    before = int(card.inner_text().replace(",", ""))
    spec = tiny_spec("mlr", width=64, depth=2)
    add_trial(live["study"], "ok", spec, loss=0.3, flops=float(model_flops(spec, SEQ_LEN)))
    page.wait_for_function(
        "n => document.querySelector('.card .card-value').innerText.replace(',', '') == n",
        arg=str(before + 1), timeout=30000)
    assert page.evaluate(FRONT_INFO)["points"] and page.dialogs == []

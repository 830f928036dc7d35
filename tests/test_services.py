"""The service fixtures themselves, against real services (PostgreSQL, Chromium, Ray)."""

from __future__ import annotations

import functools
import http.server
import socket
import threading

import pytest
from services import free_port

pytestmark = pytest.mark.e2e


def test_free_port_is_bindable():
    port = free_port()
    assert 0 < port < 65536
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", port))


def test_optuna_roundtrip_over_storage(storage_url):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = optuna.storages.RDBStorage(storage_url)
    backend = "postgresql" if storage_url.startswith("postgresql") else "sqlite"
    assert storage.engine.dialect.name == backend
    study = optuna.create_study(study_name="roundtrip", storage=storage, direction="minimize")
    for value in (3.0, 1.0, 2.0):
        trial = study.ask()
        trial.suggest_float("x", 0.0, 1.0)
        study.tell(trial, value)
    storage.engine.dispose()

    reloaded = optuna.storages.RDBStorage(storage_url)
    try:
        again = optuna.load_study(study_name="roundtrip", storage=reloaded)
        trials = again.get_trials(deepcopy=False)
        assert [t.value for t in trials] == [3.0, 1.0, 2.0]
        assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
        assert all(0.0 <= t.params["x"] <= 1.0 for t in trials)
        assert again.best_value == 1.0
    finally:
        reloaded.engine.dispose()


def test_postgres_answers_version(postgres_url):
    import sqlalchemy as sa

    engine = sa.create_engine(postgres_url)
    try:
        with engine.connect() as conn:
            version = conn.execute(sa.text("SELECT version()")).scalar_one()
            db = conn.execute(sa.text("SELECT current_database()")).scalar_one()
    finally:
        engine.dispose()
    assert version.startswith("PostgreSQL ")
    assert db == "mlbtc_test"


@pytest.mark.parametrize("storage_url", ["postgresql"], indirect=True)
def test_storage_url_gives_each_test_its_own_postgres_database(storage_url, postgres_url):
    assert storage_url != postgres_url
    assert storage_url.rsplit("/", 1)[0] == postgres_url.rsplit("/", 1)[0]


def test_ray_runs_a_remote_function(ray_local):
    ray = ray_local

    @ray.remote
    def square(x):
        return x * x

    assert ray.get([square.remote(i) for i in range(4)]) == [0, 1, 4, 9]
    assert ray.cluster_resources().get("CPU") == 2


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - signature of the base class
        pass


def test_browser_reads_page_title(browser, tmp_path):
    (tmp_path / "index.html").write_text(
        "<!doctype html><html><head><title>mlbtc e2e</title></head>"
        "<body><h1 id='h'>hello</h1></body></html>"
    )
    handler = functools.partial(_QuietHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    context = browser.new_context()
    try:
        page = context.new_page()
        page.goto(f"http://127.0.0.1:{server.server_address[1]}/index.html")
        assert page.title() == "mlbtc e2e"
        assert page.text_content("#h") == "hello"
    finally:
        context.close()
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)

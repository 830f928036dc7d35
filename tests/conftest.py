"""Shared fixtures: real PostgreSQL, SQLite/PostgreSQL storage URLs, Chromium, Ray.

Services that are missing are skipped, or fail the test when ``MLBTC_REQUIRE_SERVICES=1``
(``.ci/run`` sets it). Ray, Playwright and torch are imported only where they are needed.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import services  # noqa: E402
from services import CHROMIUM_ARGS, free_port, service_missing  # noqa: E402

__all__ = ["free_port"]


# -- markers ------------------------------------------------------------------------------------
def pytest_collection_modifyitems(config, items):
    gpu_items = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not gpu_items:
        return
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except Exception:  # torch missing or broken: no GPU tests either way
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (torch.cuda.is_available() is False)")
    for item in gpu_items:
        item.add_marker(skip)


# -- PostgreSQL -----------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def postgres_url():
    """SQLAlchemy URL of database ``mlbtc_test`` on a private PostgreSQL server for the session."""
    bindir = services.find_pg_bindir()
    if bindir is None:
        service_missing(
            "PostgreSQL server binaries not found (/usr/lib/postgresql/*/bin/initdb); "
            "install Debian's 'postgresql' package"
        )
    server = services.PostgresServer(bindir)
    try:
        server.start()
    except Exception as exc:  # noqa: BLE001 - report why the service is unusable
        service_missing(f"could not start PostgreSQL: {exc}")
    try:
        services.create_database("127.0.0.1", server.port, "mlbtc_test")
        yield server.url("mlbtc_test")
    finally:
        server.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def storage_url(request, tmp_path):
    """THE storage fixture: one URL per backend; PostgreSQL gets a fresh database per test."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/study.db"
        return

    from sqlalchemy.engine import make_url

    base = make_url(request.getfixturevalue("postgres_url"))
    name = services.create_database(base.host, base.port)
    try:
        yield base.set(database=name).render_as_string(hide_password=False)
    finally:
        services.drop_database(base.host, base.port, name)


# -- Chromium / Playwright ------------------------------------------------------------------------
@pytest.fixture(scope="session")
def chromium_path():
    path = services.find_chromium()
    if path is None:
        service_missing("Chromium not found at /usr/bin/chromium; install Debian's 'chromium'")
    return path


@pytest.fixture(scope="session")
def browser(chromium_path):
    """Headless Debian Chromium driven by Playwright (sync API); never `playwright install`."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        service_missing("the 'playwright' Python package is not installed")

    # launch() gives Chromium a fresh temporary profile (--user-data-dir) of its own, removed
    # on close; Playwright refuses --user-data-dir in args (that is launch_persistent_context).
    pw = sync_playwright().start()
    try:
        b = pw.chromium.launch(executable_path=chromium_path, headless=True, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()
    finally:
        pw.stop()


# -- Ray ------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def ray_local():
    """One local Ray (2 CPUs, no dashboard) shared by the whole session; yields ``ray``."""
    os.environ["RAY_AUTH_MODE"] = "disabled"  # Ray >= 2.59 would write an auth token otherwise
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # closed network: no usage report
    try:
        import ray
    except ImportError:
        service_missing("the 'ray' package is not installed")
    ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True)
    try:
        yield ray
    finally:
        ray.shutdown()

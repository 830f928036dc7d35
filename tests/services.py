"""Real services for the test suite: a private PostgreSQL server, Chromium, ports.

Used by ``tests/conftest.py`` (the ``tests`` directory is not a package; conftest puts it on
``sys.path``). Nothing here imports Ray, Playwright or torch, so collecting tests stays fast.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pytest

REQUIRE_SERVICES_ENV = "MLBTC_REQUIRE_SERVICES"
CHROMIUM_DEFAULT = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (bind to port 0, read it, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def services_required() -> bool:
    return os.environ.get(REQUIRE_SERVICES_ENV, "") not in ("", "0", "false", "no")


def service_missing(reason: str):
    """Skip the test, or fail it when ``MLBTC_REQUIRE_SERVICES=1`` (CI)."""
    if services_required():
        pytest.fail(f"{reason} ({REQUIRE_SERVICES_ENV}=1, so this is a failure, not a skip)")
    pytest.skip(reason)


def find_chromium() -> str | None:
    if os.access(CHROMIUM_DEFAULT, os.X_OK):
        return CHROMIUM_DEFAULT
    return shutil.which("chromium")


def find_pg_bindir() -> Path | None:
    """Debian's server binaries: /usr/lib/postgresql/<major>/bin (highest major wins)."""
    candidates = []
    for initdb in glob.glob("/usr/lib/postgresql/*/bin/initdb"):
        bindir = Path(initdb).parent
        if (bindir / "pg_ctl").exists() and (bindir / "postgres").exists():
            try:
                major = int(bindir.parent.name)
            except ValueError:
                major = 0
            candidates.append((major, bindir))
    if not candidates:
        return None
    return max(candidates)[1]


class PostgresServer:
    """A throwaway PostgreSQL cluster on 127.0.0.1 owned by the ``postgres`` OS user.

    PostgreSQL refuses to run as root, so when we are root every server command runs through
    ``runuser -u postgres --``; as a normal user the commands run as that user.
    """

    OS_USER = "postgres"

    def __init__(self, bindir: Path, start_timeout: float = 30.0):
        self.bindir = bindir
        self.start_timeout = start_timeout
        self.root: Path | None = None
        self.port: int | None = None
        self.timings: dict[str, float] = {}

    # -- paths ---------------------------------------------------------------------------
    @property
    def datadir(self) -> Path:
        assert self.root is not None
        return self.root / "data"

    @property
    def sockdir(self) -> Path:
        assert self.root is not None
        return self.root / "sock"

    @property
    def logfile(self) -> Path:
        assert self.root is not None
        return self.root / "server.log"

    # -- process helpers -------------------------------------------------------------------
    def _as_owner(self, argv: list[str]) -> list[str]:
        if os.geteuid() == 0:
            return ["runuser", "-u", self.OS_USER, "--", *argv]
        return argv

    def _give_to_owner(self, path: Path) -> None:
        path.chmod(0o700)
        if os.geteuid() == 0:
            pw = pwd.getpwnam(self.OS_USER)
            os.chown(path, pw.pw_uid, pw.pw_gid)

    def _run(self, argv: list[str], timeout: float = 60.0) -> subprocess.CompletedProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env["LC_ALL"] = "C"
        return subprocess.run(
            self._as_owner(argv),
            cwd=self.root,  # the postgres user may not be able to enter the caller's cwd
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=timeout,
        )

    def _pg_ctl(self, *args: str, timeout: float = 90.0) -> subprocess.CompletedProcess:
        return self._run([str(self.bindir / "pg_ctl"), "-D", str(self.datadir), *args], timeout)

    def _log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.logfile.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no server log)"

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="mlbtc-pg-"))
        self._give_to_owner(self.root)
        t0 = time.monotonic()
        cp = self._run(
            [
                str(self.bindir / "initdb"),
                "-D",
                str(self.datadir),
                "-U",
                "postgres",
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",
            ]
        )
        if cp.returncode != 0:
            raise RuntimeError(f"initdb failed ({cp.returncode}):\n{cp.stdout}")
        self.timings["initdb_s"] = time.monotonic() - t0
        self.sockdir.mkdir()
        self._give_to_owner(self.sockdir)

        last_error = ""
        for _attempt in range(3):  # the free port can be taken between probing and binding
            self.port = free_port()
            t0 = time.monotonic()
            options = " ".join(
                [
                    "-c listen_addresses=127.0.0.1",
                    f"-c port={self.port}",
                    f"-c unix_socket_directories={self.sockdir}",
                    "-c fsync=off",
                    "-c synchronous_commit=off",
                    "-c full_page_writes=off",
                    "-c max_connections=200",
                    "-c shared_buffers=32MB",
                ]
            )
            # -W: pg_ctl doesn't wait; readiness is a real connection, polled below.
            cp = self._pg_ctl("-l", str(self.logfile), "-o", options, "-W", "start")
            if cp.returncode != 0:
                last_error = f"pg_ctl start failed ({cp.returncode}):\n{cp.stdout}"
                continue
            if self._wait_ready(deadline=time.monotonic() + self.start_timeout):
                self.timings["start_s"] = time.monotonic() - t0
                return
            last_error = f"server on port {self.port} never accepted connections"
            self._pg_ctl("stop", "-m", "immediate")
        self.stop()
        raise RuntimeError(f"{last_error}\n--- server log ---\n{self._log_tail()}")

    def _server_running(self) -> bool:
        return self._pg_ctl("status").returncode == 0

    def _wait_ready(self, deadline: float) -> bool:
        import psycopg2

        delay = 0.01
        while time.monotonic() < deadline:
            try:
                conn = psycopg2.connect(**self.connect_kwargs("postgres"), connect_timeout=2)
            except psycopg2.OperationalError:
                # Starting up, or dead (port taken): a dead postmaster never comes back.
                if delay > 0.2 and not self._server_running():
                    return False
                time.sleep(delay)
                delay = min(delay * 2, 0.25)
                continue
            conn.close()
            return True
        return False

    def stop(self) -> None:
        if self.root is None:
            return
        try:
            if (self.datadir / "postmaster.pid").exists():
                if self._pg_ctl("stop", "-m", "fast", "-w", "-t", "60").returncode != 0:
                    self._pg_ctl("stop", "-m", "immediate")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None

    # -- clients ---------------------------------------------------------------------------------
    def connect_kwargs(self, dbname: str) -> dict:
        return {"host": "127.0.0.1", "port": self.port, "user": "postgres", "dbname": dbname}

    def url(self, dbname: str) -> str:
        return f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}/{dbname}"


def _admin(host: str, port: int, sql: str) -> None:
    import psycopg2

    conn = psycopg2.connect(
        host=host, port=port, user="postgres", dbname="postgres", connect_timeout=10
    )
    try:
        conn.autocommit = True  # CREATE/DROP DATABASE can't run in a transaction
        with conn.cursor() as cur:
            cur.execute(sql)
    finally:
        conn.close()


def create_database(host: str, port: int, name: str | None = None) -> str:
    """Create a database on the server and return its name (unique if ``name`` is None)."""
    name = name or f"t_{uuid.uuid4().hex[:16]}"
    _admin(host, port, f'CREATE DATABASE "{name}"')
    return name


def drop_database(host: str, port: int, name: str) -> None:
    # WITH (FORCE) (PostgreSQL 13+) ends sessions a test left open, e.g. a storage's pool.
    _admin(host, port, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

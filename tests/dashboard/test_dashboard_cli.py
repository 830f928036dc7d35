"""``mlbtc dashboard``: binds 127.0.0.1 by default, prints its URL, errors are one line."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
import urllib.request

import optuna
import pytest
from dashboard_factory import new_study
from services import free_port

from mlbtc_search.cli import build_parser, main

RUN_CLI = "import sys; from mlbtc_search.cli import main; sys.exit(main())"


def listening(port: int) -> list[str]:
    """Local addresses (hex, as in /proc/net/tcp) with a listening socket on ``port``."""
    out = []
    for line in open("/proc/net/tcp").read().splitlines()[1:]:
        fields = line.split()
        addr, hexport = fields[1].split(":")
        if int(hexport, 16) == port and fields[3] == "0A":
            out.append(addr)
    return out


def test_parser_defaults_to_loopback():
    args = build_parser().parse_args(["dashboard"])
    assert (args.host, args.port, args.storage) == ("127.0.0.1", 8050, None)
    assert args.verbose is False


def test_verbose_flag_works_after_the_command_as_documented():
    # docs/dashboard.md: "`-v` logs requests" -- as `mlbtc dashboard -v` and `mlbtc -v dashboard`
    assert build_parser().parse_args(["dashboard", "-v"]).verbose is True
    assert build_parser().parse_args(["-v", "dashboard"]).verbose is True


@pytest.mark.timeout(120)
def test_dashboard_binds_127_0_0_1_by_default_and_prints_its_url(tmp_path):
    url = f"sqlite:///{tmp_path}/s.db"
    new_study(optuna.storages.RDBStorage(url), "s", tmp_path / "art")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", RUN_CLI, "dashboard", "--storage", url,
                             "--port", str(port)], stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stderr.readline()
        assert line == (f"mlbtc dashboard: serving http://127.0.0.1:{port}/ (read-only; "
                        "Ctrl-C to stop)\n")
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as r:
                    assert r.status == 200
                    break
            except OSError:
                assert time.monotonic() < deadline and proc.poll() is None
                time.sleep(0.1)
        assert listening(port) == ["0100007F"]  # 127.0.0.1 only, not 0.0.0.0
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "stopped" in err


def test_missing_storage_is_one_line_and_exit_2(tmp_path, capsys):
    missing = tmp_path / "missing.db"
    assert main(["dashboard", "--storage", f"sqlite:///{missing}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no study database at" in err
    assert not missing.exists()


def test_port_in_use_is_a_usage_error(tmp_path, capsys):
    import socket

    url = f"sqlite:///{tmp_path}/s.db"
    new_study(optuna.storages.RDBStorage(url), "s", tmp_path / "art")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert main(["dashboard", "--storage", url, "--port", str(port)]) == 2
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err

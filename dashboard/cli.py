"""``mlbtc dashboard [--storage URL] [--host 127.0.0.1] [--port 8050]``.

Serves the read-only dashboard with werkzeug's threaded WSGI server on 127.0.0.1 unless told
otherwise (the dashboard has no authentication), prints its URL on stderr and runs until Ctrl-C.
"""

from __future__ import annotations

import argparse
import logging
import socket
import sys
from typing import TextIO

from werkzeug.serving import BaseWSGIServer, make_server

from mlbtc_search.errors import UsageError

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8050
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def build_server(storage: str | None, host: str = DEFAULT_HOST,
                 port: int = DEFAULT_PORT) -> BaseWSGIServer:
    """The dashboard app behind a threaded WSGI server bound to ``host:port`` (not started)."""
    from .app import create_app
    from .store import open_reader

    reader = open_reader(storage)  # a missing storage is reported before a taken port
    _check_bindable(host, port)
    app = create_app(reader, warm=True)
    try:
        return make_server(host, port, app.server, threaded=True)
    except (OSError, SystemExit):  # werkzeug exits on a bind error after printing it
        raise UsageError(f"cannot listen on {host}:{port}; pick another --port") from None


def _check_bindable(host: str, port: int) -> None:
    """Fail with one clear line before werkzeug would print and exit on a taken port."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as err:
        raise UsageError(f"cannot listen on {host}:{port}: {err}") from None
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(address)
        except OSError as err:
            raise UsageError(f"cannot listen on {host}:{port}: {err.strerror or err}; pick "
                             "another --port") from None


def url_of(server: BaseWSGIServer) -> str:
    host, port = server.server_address[:2]
    shown = f"[{host}]" if ":" in str(host) else host
    return f"http://{shown}:{port}/"


def serve(args: argparse.Namespace, err: TextIO | None = None) -> int:
    """Run the dashboard until interrupted; returns the exit code."""
    err = err or sys.stderr
    host = getattr(args, "host", None) or DEFAULT_HOST
    port = getattr(args, "port", None)
    server = build_server(getattr(args, "storage", None), host,
                          DEFAULT_PORT if port is None else port)
    err.write(f"mlbtc dashboard: serving {url_of(server)} (read-only; Ctrl-C to stop)\n")
    if host not in LOOPBACK:
        err.write(f"mlbtc dashboard: warning: listening on {host}, beyond this machine; the "
                  "dashboard has no authentication\n")
    err.flush()
    # Request logs only with -v; werkzeug's serve_forever ends quietly on Ctrl-C.
    logging.getLogger("werkzeug").setLevel(
        logging.INFO if getattr(args, "verbose", False) else logging.WARNING)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    err.write("mlbtc dashboard: stopped\n")
    return 0

"""The web dashboard over a study storage (read-only): ``create_app(storage) -> dash.Dash``.

See docs/dashboard.md. Layers: ``store`` (read-only storage access), ``data`` and ``figures``
(pure functions), ``architecture`` (spec -> contraction graphs), ``pages`` (layouts), ``export``
(the zip download), ``app`` (the wiring) and ``cli`` (``mlbtc dashboard``).
"""

from __future__ import annotations

from .app import Dashboard, create_app

__all__ = ["Dashboard", "create_app"]

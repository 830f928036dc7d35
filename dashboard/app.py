"""``create_app(storage) -> dash.Dash``: the wiring. Data and figures live in pure modules.

Routes (``dcc.Location``)::

    /                               the studies
    /study/<name>                   a study: Pareto front, hypervolume, trials, comparison
    /study/<name>/trial/<number>    a trial: metrics, failure, curve, contraction graphs, spec
    /export/<study_id>/<number>     the trial's export zip (a plain Flask route)

:class:`Dashboard` holds the storage reader and the per-study caches (one per app: no module
globals) and has one method per callback, so the benchmark and tests can call them directly.
A ``dcc.Interval`` ticks every 5 s; a page re-reads only when its study's trials changed (the
incremental reader in :mod:`dashboard.store` makes that check one small SELECT).
"""

from __future__ import annotations

import logging
import re
import threading
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import dash
import yaml
from dash import Input, Output, State, ctx, no_update
from dash.exceptions import PreventUpdate
from optuna.storages import BaseStorage

from mlbtc_search.errors import MlbtcError, UsageError
from studies.record import json_safe
from studies.storage import storage_label

from . import architecture, data, figures, pages, scaling
from .store import StudyEntry, TrialCache, find_study, list_studies, load_trial, open_reader

log = logging.getLogger(__name__)
_STUDY = re.compile(r"^/study/(?P<name>[^/]+)/?$")
_SCALING = re.compile(r"^/study/(?P<name>[^/]+)/scaling/?$")
_TRIAL = re.compile(r"^/study/(?P<name>[^/]+)/trial/(?P<number>[0-9]{1,9})/?$")


class StudyViews:
    """The :class:`~dashboard.data.StudyView` of each study, recomputed only on change."""

    def __init__(self, cache: TrialCache):
        self.cache = cache
        self._lock = threading.Lock()
        self._views: dict[int, tuple[data.StudyView, int]] = {}
        self._token = uuid.uuid4().hex[:8]

    def get(self, study_id: int, entry: StudyEntry | None = None) -> tuple[data.StudyView, str]:
        """``(view, version)``; the version string changes whenever the view does."""
        with self._lock:
            trials, changed = self.cache.trials(study_id)
            old = self._views.get(study_id)
            if old is None or changed:
                name, info = (entry.name, entry.info) if entry else ("", None)
                old = (data.study_view(trials, name, info), (old[1] + 1) if old else 0)
                self._views[study_id] = old
            return old[0], f"{self._token}:{study_id}:{old[1]}"


class Dashboard:
    """Everything the callbacks do, as plain methods over a read-only storage."""

    def __init__(self, storage: BaseStorage):
        self.storage = storage
        self.views = StudyViews(TrialCache(storage))

    # ---- studies ------------------------------------------------------------------------------
    def summaries(self) -> tuple[list[dict[str, Any]], tuple]:
        out, signature = [], []
        for s in list_studies(self.storage):
            view, version = self.views.get(s.study_id, s)
            out.append(data.study_summary(s.name, s.info, view))
            signature.append(version)
        return out, tuple(signature)

    def warm(self) -> None:
        """Read every study into the cache (errors are logged: the pages will show them)."""
        try:
            self.summaries()
        except Exception:  # noqa: BLE001 - a background warm-up must not kill the server
            log.warning("warming the study cache failed", exc_info=True)

    # ---- pages --------------------------------------------------------------------------------
    def page(self, pathname: str | None) -> Any:
        path = pathname or "/"
        try:
            if path in ("/", ""):
                summaries, signature = self.summaries()
                return pages.studies_page(summaries, list(signature))
            m = _TRIAL.match(path)
            if m:
                return self.trial_page(unquote(m["name"]), int(m["number"]))
            m = _SCALING.match(path)
            if m:
                return self.scaling_page(unquote(m["name"]))
            m = _STUDY.match(path)
            if m:
                return self.study_page(unquote(m["name"]))
        except UsageError as err:
            return pages.message_page("Not found", str(err))
        return pages.message_page("Not found", f"There is no page at {path}.")

    def study_page(self, name: str) -> Any:
        study = find_study(self.storage, name)
        names = [s.name for s in list_studies(self.storage)]
        return pages.study_page(study.study_id, study.name,
                                pages.study_subtitle(study.info, study.directions), names)

    def scaling_page(self, name: str) -> Any:
        """Loss against training FLOPs with the fitted scaling laws (multi-fidelity studies)."""
        study = find_study(self.storage, name)
        records, _ = self.views.cache.trials(study.study_id)
        return scaling.scaling_page(study.name, *scaling.report_for(records))

    def study_data(self, study_id: int, families: list[str] | None,
                   states: list[str] | None, color_by: str | None = None,
                   size_by: str | None = None) -> dict[str, Any]:
        """Everything the study page's callback returns (figures, cards, table, version)."""
        view, version = self.views.get(study_id)
        known = set(view.descriptors)
        return {
            "front": figures.pareto_figure(
                view.rows, view.front, color_by=color_by if color_by in known else None,
                size_by=size_by if size_by in known else None).update_layout(
                uirevision=f"front-{study_id}"),
            "descriptors": [{"label": d.removeprefix(data.DESCRIPTOR_PREFIX), "value": d}
                            for d in view.descriptors],
            "importance_params": figures.importance_figure(
                view.importances.get("params", {}), "sampled parameters"),
            "importance_descriptors": figures.importance_figure(
                view.importances.get("descriptors", {}), "structure descriptors"),
            "hv": figures.hypervolume_figure(view.hv_history, view.reference),
            "cards": pages.study_cards(view),
            "table": self.table(study_id, families, states),
            "families": [{"label": f, "value": f} for f in view.families],
            "version": version,
        }

    def table(self, study_id: int, families: list[str] | None,
              states: list[str] | None) -> list[dict[str, Any]]:
        view, _ = self.views.get(study_id)
        name = self._study_name(study_id)
        return pages.table_rows(name, data.filter_rows(view.rows, families, states))

    def overlay(self, names: list[str] | None) -> Any:
        studies = {s.name: s for s in list_studies(self.storage)}
        fronts = []
        for name in names or []:
            if name in studies:
                view, _ = self.views.get(studies[name].study_id)
                fronts.append((name, data.front_rows(view)))
        return figures.overlay_figure(fronts)

    def trial_page(self, study_name: str, number: int) -> Any:
        study = find_study(self.storage, study_name)
        trial = load_trial(self.storage, study.study_id, number)
        row = data.trial_row(trial)
        spec = trial.spec
        spec_yaml = (yaml.safe_dump(json_safe(spec), sort_keys=False, width=99)
                     if spec is not None else "(no spec recorded)")
        matrices: list[str] = []
        spec_error = None
        try:
            matrices = [label for label, _ in architecture.spec_matrices(
                architecture.model_spec(spec))]
        except MlbtcError as err:
            spec_error = str(err)
        exportable = trial.exportable
        series = data.curve_series(trial.curve)
        curve = figures.curve_figure(series, trial.metric_name or "")
        return pages.trial_page(
            study.study_id, study.name, number, row["state"], row["arch"], row["reason"] or None,
            data.trial_metrics(trial), spec_yaml, matrices, spec_error, exportable,
            self.front_note(study.study_id, number) if exportable else "", curve)

    def matrix(self, study_id: int, number: int, index: int) -> Any:
        trial = load_trial(self.storage, study_id, number)
        try:
            mats = architecture.spec_matrices(architecture.model_spec(trial.spec))
        except MlbtcError as err:
            return figures.empty_figure(f"The recorded spec cannot be rebuilt: {err}")
        _, matrix = mats[index if 0 <= index < len(mats) else 0]
        return figures.matrix_figure(architecture.matrix_panels(matrix), "")

    def front_note(self, study_id: int, number: int) -> str:
        view, _ = self.views.get(study_id)
        if number in view.front:
            loss = {r["number"]: r["val_loss"] for r in view.rows}
            by_loss = sorted(view.front, key=lambda n: (loss[n], n))
            return (f"On the Pareto front of {len(view.front)} non-dominated trials: rank "
                    f"{by_loss.index(number) + 1} by loss (1 = lowest).")
        return f"Dominated (not on the Pareto front of {len(view.front)} trials)."

    def export(self, study_id: int, number: int) -> tuple[bytes, str]:
        """The export zip of a trial (``studies.export.export_zip``, weights checked) and its
        file name; a UsageError when it cannot be exported."""
        from studies.export import archive_name, export_zip

        study = next((s for s in list_studies(self.storage) if s.study_id == study_id), None)
        if study is None:
            raise UsageError(f"no study with id {study_id}")
        load_trial(self.storage, study_id, number)  # "no trial N" before anything else
        recs, _ = self.views.cache.trials(study_id)
        blob = export_zip(study.name, study.info, recs, number)
        return blob, archive_name(study.name, number)

    def _study_name(self, study_id: int) -> str:
        return self.storage.get_study_name_from_id(study_id)


def create_app(storage: str | BaseStorage | None = None, warm: bool = False) -> dash.Dash:
    """The dashboard over ``storage`` (a URL, an Optuna storage, or None for the default).

    ``warm=True`` reads every study once in a background thread, so the first page a user
    opens is served from the cache (``mlbtc dashboard`` does this).
    """
    reader = storage if isinstance(storage, BaseStorage) else open_reader(storage)
    board = Dashboard(reader)
    if warm:
        threading.Thread(target=board.warm, name="mlbtc-dashboard-warm", daemon=True).start()
    app = dash.Dash(__name__, title="mlbtc dashboard", update_title=None,
                    suppress_callback_exceptions=True, serve_locally=True,
                    assets_folder=str(Path(__file__).with_name("assets")))
    app.layout = pages.shell(storage_label(reader))
    _register(app, board)
    return app


def _register(app: dash.Dash, board: Dashboard) -> None:
    @app.callback(Output("page", "children"), Input("url", "pathname"))
    def route(pathname: str | None) -> Any:
        return board.page(pathname)

    @app.callback(Output("studies-table", "children"), Output("studies-version", "data"),
                  Input("tick", "n_intervals"), State("studies-version", "data"),
                  prevent_initial_call=True)
    def refresh_studies(_: int, version: Any) -> Any:
        summaries, signature = board.summaries()
        if list(signature) == version:
            raise PreventUpdate
        return pages.studies_table(summaries), list(signature)

    @app.callback(
        Output("front", "figure"), Output("hv", "figure"), Output("study-cards", "children"),
        Output("trials", "data"), Output("family-filter", "options"),
        Output("study-version", "data"), Output("color-by", "options"),
        Output("size-by", "options"), Output("importance-params", "figure"),
        Output("importance-descriptors", "figure"),
        Input("tick", "n_intervals"), Input("family-filter", "value"),
        Input("state-filter", "value"), Input("color-by", "value"), Input("size-by", "value"),
        State("study-version", "data"), State("study-key", "data"))
    def update_study(_: int, families: list[str] | None, states: list[str] | None,
                     color_by: str | None, size_by: str | None,
                     version: str | None, key: dict | None) -> Any:
        if not key:
            raise PreventUpdate
        keep = (no_update,) * 4
        try:
            _, current = board.views.get(key["study_id"])
            if current == version:
                if ctx.triggered_id == "tick":
                    raise PreventUpdate
                if ctx.triggered_id in ("color-by", "size-by"):
                    d = board.study_data(key["study_id"], families, states, color_by, size_by)
                    return (d["front"], no_update, no_update, no_update, no_update,
                            no_update) + keep
                table = board.table(key["study_id"], families, states)
                return (no_update, no_update, no_update, table, no_update, no_update) + keep
            d = board.study_data(key["study_id"], families, states, color_by, size_by)
        except UsageError:
            raise PreventUpdate from None
        return (d["front"], d["hv"], d["cards"], d["table"], d["families"], d["version"],
                d["descriptors"], d["descriptors"], d["importance_params"],
                d["importance_descriptors"])

    @app.callback(Output("overlay", "figure"), Input("overlay-studies", "value"),
                  Input("study-version", "data"))
    def overlay(names: list[str] | None, _: Any) -> Any:
        return board.overlay(names)

    @app.callback(Output("url", "pathname"), Input("front", "clickData"),
                  State("study-key", "data"), prevent_initial_call=True)
    def open_trial(click: dict | None, key: dict | None) -> Any:
        points = (click or {}).get("points") or []
        number = points[0].get("customdata") if points else None
        if not key or not isinstance(number, int):
            raise PreventUpdate
        return pages.trial_path(key["name"], number)

    @app.callback(Output("matrix-graph", "figure"), Input("matrix-select", "value"),
                  State("trial-key", "data"))
    def matrix(index: int | None, key: dict | None) -> Any:
        if not key:
            raise PreventUpdate
        return board.matrix(key["study_id"], key["number"], int(index or 0))

    def export(study_id: int, number: int) -> Any:
        from flask import Response

        try:
            blob, filename = board.export(study_id, number)
        except UsageError as err:
            return Response(f"cannot export: {err}\n", status=404, mimetype="text/plain")
        return Response(blob, mimetype="application/zip", headers={
            "Content-Disposition": f'attachment; filename="{filename}"',
            "X-Content-Type-Options": "nosniff"})

    app.server.add_url_rule("/export/<int:study_id>/<int:number>", "mlbtc_export", export)


__all__ = ["Dashboard", "StudyViews", "create_app"]

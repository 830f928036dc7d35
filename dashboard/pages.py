"""Page layouts: data in, Dash components out (no storage, no callbacks).

Every string from the storage is passed to Dash components as plain text (children, labels,
table cells), which React escapes; nothing here uses ``dangerously_set_inner_html`` or raw HTML
in markdown. The only markdown is the trial table's "open" links, built from a trial number and
a percent-quoted study name.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any
from urllib.parse import quote

from dash import dash_table, dcc, html
from dash.dash_table.Format import Format, Scheme

from studies.record import STATES, StudyInfo

from .data import NA, StudyView, fmt, fmt_si, fmt_time

GRAPH_CONFIG = {"displaylogo": False, "responsive": True,
                "modeBarButtonsToRemove": ["lasso2d", "select2d"]}


def study_path(name: str) -> str:
    return "/study/" + quote(name, safe="")


def trial_path(name: str, number: int) -> str:
    return f"{study_path(name)}/trial/{int(number)}"


def export_path(study_id: int, number: int) -> str:
    return f"/export/{int(study_id)}/{int(number)}"


def shell(storage_label: str) -> html.Div:
    """The frame around every page: header with navigation, the page, timers and stores."""
    return html.Div([
        dcc.Location(id="url", refresh=False),
        html.Header(className="topbar", children=[
            dcc.Link("mlbtc-search", href="/", className="brand"),
            html.Span("architecture search dashboard", className="brand-sub"),
            html.Nav([dcc.Link("Studies", href="/", className="nav-link")]),
            html.Span(storage_label, className="storage", title="study storage (read-only)"),
        ]),
        html.Main(id="page", className="page"),
        dcc.Interval(id="tick", interval=5000, n_intervals=0),
        html.Footer("read-only view of the study storage · refreshes every 5 s while a search "
                    "runs", className="footer"),
    ])


def crumbs(*parts: tuple[str, str | None]) -> html.Div:
    items: list[Any] = []
    for i, (label, href) in enumerate(parts):
        if i:
            items.append(html.Span(" › ", className="sep"))
        items.append(dcc.Link(label, href=href) if href else html.Span(label))
    return html.Div(items, className="crumbs")


def message_page(title: str, text: str) -> html.Div:
    """Not found and other dead ends: a heading, the reason, a way back."""
    return html.Div([crumbs(("Studies", "/"), (title, None)), html.H1(title),
                     html.P(text, className="message"),
                     dcc.Link("← back to the studies", href="/")])


# ---- studies ----------------------------------------------------------------------------------
STUDY_COLUMNS = (("Study", "name"), ("Task", "task"), ("Trials", "trials"),
                 ("Complete", "complete"), ("Running", "running"), ("Failed", "failed"),
                 ("Interrupted", "interrupted"), ("Infeasible", "infeasible"),
                 ("Front", "front"), ("Best loss", "best_loss"),
                 ("Hypervolume", "hypervolume"), ("Last update", "last_update"))


def studies_table(summaries: Sequence[dict[str, Any]]) -> html.Div:
    """The studies, one row each, names linking to their pages."""
    if not summaries:
        return html.P("This storage has no studies yet. Start one with `mlbtc search SPACE.yaml "
                      "--storage URL` and it appears here.", className="message")
    head = html.Thead(html.Tr([html.Th(label) for label, _ in STUDY_COLUMNS]))
    body = []
    for s in summaries:
        cells = []
        for _, key in STUDY_COLUMNS:
            value = s.get(key)
            if key == "name":
                cell = html.Td(dcc.Link(str(value), href=study_path(str(value))),
                               className="name")
            elif key in ("best_loss", "hypervolume"):
                cell = html.Td(fmt(value), className="num")
            elif isinstance(value, int):
                cell = html.Td(f"{value:,}", className="num")
            else:
                cell = html.Td(str(value if value is not None else NA))
            cells.append(cell)
        body.append(html.Tr(cells))
    return html.Div(html.Table([head, html.Tbody(body)], className="grid studies"),
                    className="table-wrap")


def studies_page(summaries: Sequence[dict[str, Any]], version: Any = None) -> html.Div:
    return html.Div([
        html.H1("Studies"),
        html.P("Each study searches architectures for one task under one FLOP budget. Open a "
               "study for its Pareto front of validation loss against FLOPs per token.",
               className="lead"),
        html.Div(studies_table(summaries), id="studies-table"),
        dcc.Store(id="studies-version", data=version),
    ])


# ---- one study --------------------------------------------------------------------------------
def _card(label: str, value: str) -> html.Div:
    return html.Div([html.Div(value, className="card-value"),
                     html.Div(label, className="card-label")], className="card")


def study_cards(view: StudyView) -> list[html.Div]:
    c = view.counts
    return [
        _card("trials", f"{view.n_trials:,}"),
        _card("complete", f"{c.get('complete', 0):,}"),
        _card("running", f"{c.get('running', 0):,}"),
        _card("failed", f"{c.get('failed', 0):,}"),
        _card("infeasible", f"{c.get('infeasible', 0):,}"),
        _card("on the front", f"{len(view.front):,}"),
        _card("best loss", fmt(view.best_loss)),
        _card("hypervolume", fmt(view.hypervolume)),
        html.Div([html.Div(fmt_time(view.last_update), className="card-value"),
                  html.Div("last update", className="card-label")], className="card wide"),
    ]


def _num(id_: str, name: str, fmt_: Format) -> dict[str, Any]:
    return {"id": id_, "name": name, "type": "numeric", "format": fmt_}


TABLE_COLUMNS: list[dict[str, Any]] = [
    _num("number", "#", Format(precision=0, scheme=Scheme.fixed)),
    {"id": "state", "name": "state"},
    {"id": "family", "name": "family"},
    _num("val_loss", "val loss", Format(precision=4, scheme=Scheme.decimal_or_exponent)
         .nully(NA)),
    _num("flops_per_token", "FLOPs/token", Format(precision=3, scheme=Scheme.decimal_si_prefix)
         .nully(NA)),
    _num("params", "params", Format(precision=3, scheme=Scheme.decimal_si_prefix).nully(NA)),
    _num("metric", "metric", Format(precision=4, scheme=Scheme.decimal_or_exponent).nully(NA)),
    _num("width", "D", Format(precision=0, scheme=Scheme.fixed).nully(NA)),
    _num("depth", "L", Format(precision=0, scheme=Scheme.fixed).nully(NA)),
    _num("heads", "H", Format(precision=0, scheme=Scheme.fixed).nully(NA)),
    {"id": "attention", "name": "attention"},
    {"id": "mlp", "name": "MLP"},
    {"id": "front", "name": "front"},
    _num("duration_s", "time (s)", Format(precision=3, scheme=Scheme.decimal_or_exponent)
         .nully(NA)),
    {"id": "reason", "name": "reason"},
]
TABLE_COLUMNS.insert(1, {"id": "open", "name": "trial", "presentation": "markdown"})


def table_rows(study_name: str, rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows for the DataTable (only its columns; a link per trial)."""
    keys = [c["id"] for c in TABLE_COLUMNS if c["id"] not in ("open", "front")]
    out = []
    for r in rows:
        d = {k: r.get(k) for k in keys}
        d["front"] = "yes" if r.get("on_front") else ""
        d["completed"] = (r.get("completed") or "")[:19].replace("T", " ")
        d["open"] = f"[open →]({trial_path(study_name, r['number'])})"
        out.append(d)
    return out


def trials_table() -> dash_table.DataTable:
    return dash_table.DataTable(
        id="trials", columns=TABLE_COLUMNS, data=[], sort_action="native",
        filter_action="native", page_action="native", page_size=15,
        sort_by=[{"column_id": "number", "direction": "asc"}],
        markdown_options={"html": False, "link_target": "_self"},
        style_table={"overflowX": "auto"},
        style_header={"fontWeight": "600", "backgroundColor": "#f4f6f8",
                      "borderBottom": "2px solid #d0d7de"},
        style_cell={"fontFamily": "inherit", "fontSize": "13px", "padding": "6px 10px",
                    "textAlign": "left", "maxWidth": "320px", "overflow": "hidden",
                    "textOverflow": "ellipsis", "whiteSpace": "nowrap"},
        style_cell_conditional=[{"if": {"column_type": "numeric"}, "textAlign": "right"}],
        style_data_conditional=[
            {"if": {"filter_query": "{front} = yes"}, "backgroundColor": "#fff8e6"},
            {"if": {"filter_query": "{state} = failed", "column_id": "state"},
             "color": "#C0392B", "fontWeight": "600"},
            {"if": {"filter_query": "{state} = infeasible", "column_id": "state"},
             "color": "#8C6D31", "fontWeight": "600"},
        ],
        css=[{"selector": ".cell-markdown a", "rule": "color: #0072B2; font-weight: 600;"},
             {"selector": ".cell-markdown p", "rule": "margin: 0;"}],
    )


def _section(title: str, *children: Any, note: str | None = None) -> html.Section:
    head: list[Any] = [html.H2(title)]
    if note:
        head.append(html.P(note, className="note"))
    return html.Section(head + list(children), className="panel")


def study_page(study_id: int, name: str, subtitle: str,
               other_studies: Sequence[str]) -> html.Div:
    """The skeleton of a study page; a callback fills the figures, cards and table."""
    return html.Div([
        crumbs(("Studies", "/"), (name, None)),
        html.H1(name, className="study-name"),
        html.P(subtitle, className="lead"),
        html.P(html.A("Scaling laws (multi-fidelity studies)",
                      href=study_path(name) + "/scaling"), className="note"),
        html.Div(id="study-cards", className="cards"),
        _section("Pareto front", html.Div([
            dcc.Dropdown(id="color-by", placeholder="colour: family", className="filter"),
            dcc.Dropdown(id="size-by", placeholder="size: none", className="filter"),
        ], className="filters"), dcc.Graph(id="front", config=GRAPH_CONFIG),
                 note="Each point is a trained architecture; the dotted step line joins the "
                      "non-dominated ones. Faded points are dominated; trials without a loss "
                      "sit on the strip below at their FLOPs. Click a point to open its trial. "
                      "Colour and size can show a structure descriptor; error bars are the "
                      "spread over seeds."),
        _section("Importances", dcc.Graph(id="importance-params", config=GRAPH_CONFIG),
                 dcc.Graph(id="importance-descriptors", config=GRAPH_CONFIG),
                 note="PED-ANOVA (Optuna) for validation loss and for FLOPs: which sampled "
                      "parameters, and which structure descriptors, separate the best 10% of "
                      "trials from the rest. It keeps conditional parameters (fANOVA drops "
                      "them)."),
        _section("Hypervolume", dcc.Graph(id="hv", config=GRAPH_CONFIG),
                 note="Area dominated by the front in (validation loss, log10 FLOPs/token), "
                      "from a fixed reference point 10% beyond the worst complete trial."),
        _section("Trials", html.Div([
            dcc.Dropdown(id="family-filter", multi=True, placeholder="all families",
                         className="filter"),
            dcc.Dropdown(id="state-filter", multi=True, placeholder="all states",
                         options=[{"label": s, "value": s} for s in STATES],
                         className="filter"),
        ], className="filters"), trials_table(),
            note="Sort by a column header; type in the filter row (e.g. < 0.5, or mlr); "
                 "rows on the Pareto front are highlighted."),
        _section("Compare studies", dcc.Dropdown(
            id="overlay-studies", multi=True, value=[name], className="filter wide",
            options=[{"label": s, "value": s} for s in other_studies]),
            dcc.Graph(id="overlay", config=GRAPH_CONFIG),
            note="The Pareto fronts of the chosen studies on the same axes."),
        dcc.Store(id="study-key", data={"study_id": study_id, "name": name}),
        dcc.Store(id="study-version"),
    ])


# ---- one trial --------------------------------------------------------------------------------
def metrics_table(items: Sequence[tuple[str, str]]) -> html.Table:
    return html.Table(html.Tbody([html.Tr([html.Th(k), html.Td(v)]) for k, v in items]),
                      className="grid kv")


def trial_page(study_id: int, study_name: str, number: int, state: str, arch: str,
               reason: str | None, metrics: Sequence[tuple[str, str]], spec_yaml: str,
               matrices: Sequence[str], spec_error: str | None, exportable: bool,
               export_note: str, curve_figure: Any) -> html.Div:
    """The trial page: status, failure reason, metrics, export, curve, graphs, spec."""
    badge = html.Span(state, className=f"badge badge-{state}")
    failure = []
    if reason:
        failure = [html.Div([html.H3("Failure reason"), html.Pre(reason, id="failure-reason")],
                            className="failure")]
    if exportable:
        export = html.A("Download export (.zip)", href=export_path(study_id, number),
                        id="export-link", className="button", download="")
    else:
        export = html.Span("No export: only trained trials with weights can be exported.",
                           className="note")
    graph_part: list[Any]
    if spec_error:
        graph_part = [html.P(f"The recorded spec cannot be rebuilt: {spec_error}",
                             className="message")]
    else:
        graph_part = [
            dcc.Dropdown(id="matrix-select", clearable=False, value=0, className="filter wide",
                         options=[{"label": m, "value": i} for i, m in enumerate(matrices)]),
            dcc.Graph(id="matrix-graph", config=GRAPH_CONFIG),
        ]
    return html.Div([
        crumbs(("Studies", "/"), (study_name, f"/study/{quote(study_name, safe='')}"),
               (f"trial {number}", None)),
        html.H1([f"Trial {number} ", badge]),
        html.P(arch, className="lead arch"),
        *failure,
        html.Div([
            html.Section([html.H2("Metrics"), metrics_table(metrics)], className="panel"),
            html.Section([html.H2("Export"),
                          html.P("architecture.yaml + model.safetensors + metrics.json + "
                                 "README.md; unzip and load with mlbtc_search.load(dir).",
                                 className="note"),
                          export, html.P(export_note, className="note")], className="panel"),
        ], className="two-col"),
        _section("Learning curve", dcc.Graph(id="curve", figure=curve_figure,
                                             config=GRAPH_CONFIG),
                 note="Training loss (logged) and validation loss (at evaluations) against "
                      "the training compute spent so far."),
        _section("Contraction graphs", *graph_part,
                 note="Each structured matrix is a sum of levels; each level a block tensor "
                      "contraction of cores. Pick a matrix of the architecture."),
        _section("Spec", html.Pre(spec_yaml, id="spec-yaml", className="yaml"),
                 note="The trial's ModelSpec as recorded in the storage (YAML)."),
        dcc.Store(id="trial-key", data={"study_id": study_id, "number": number}),
    ])


def study_subtitle(info: StudyInfo, directions: Sequence[str]) -> str:
    parts = [f"task {info.task_name or NA}"]
    if info.budget_flops is not None:
        parts.append(f"budget {fmt_si(info.budget_flops, 'FLOPs')} per trial")
    parts.append("objectives: minimize validation loss and FLOPs per token"
                 if list(directions) == ["minimize", "minimize"]
                 else f"directions: {', '.join(directions)}")
    return " · ".join(parts)

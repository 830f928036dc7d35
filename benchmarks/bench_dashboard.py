"""Dashboard server time on a 5,000-trial SQLite study (target: a study page under 2 s).

    python benchmarks/bench_dashboard.py [--trials 5000] [--db PATH] [--optuna-build]

1. Builds a SQLite study shaped like the STORAGE CONTRACT: 88% COMPLETE, the rest failed,
   infeasible or duplicate, each with ~20 user attrs (a real ModelSpec dict, a 100-point curve).
   Optuna writes the first trial (``study.add_trial``); the others are bulk INSERTs into Optuna's
   own tables with the same column values, because Optuna upserts each attribute separately
   (~5 ms each, ~10 minutes for 5,000 trials on 2 cores). A sample is read back with Optuna's
   ``get_trial`` and compared. ``--optuna-build`` builds through ``study.add_trials`` instead.
2. Times, on that file: Optuna's ``get_all_trials`` (for reference), the dashboard's reader
   (cold, then a no-change refresh as every 5 s tick does), the data and figure functions, and
   the study page's two callbacks through the real Flask app (HTTP POST to
   ``/_dash-update-component`` with the test client: routing + update), cold and warm.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import optuna  # noqa: E402
import sqlalchemy as sa  # noqa: E402
from optuna.storages._rdb import models  # noqa: E402
from optuna.trial import TrialState, create_trial  # noqa: E402

from dashboard import data, figures, pages  # noqa: E402
from dashboard.app import Dashboard, create_app  # noqa: E402
from dashboard.store import TrialCache, open_reader  # noqa: E402
from mlbtc_search.model import ModelSpec, kv_cache_bytes, model_flops, model_params  # noqa: E402

STUDY = "bench-5k"
KINDS = {"standard": {"kind": "standard", "heads": 4},
         "mlr": {"kind": "mlr", "heads": 4, "ranks": [8, 4, 2, 2]},
         "bilinear_btt": {"kind": "bilinear_btt", "heads": 4, "rank": 1},
         "sliding_window": {"kind": "sliding_window", "heads": 4, "window": 16}}
ADAPTER = {"input_kind": "vector", "input_dim": 16, "output_dim": 1}


def specs() -> list[dict]:
    """Static contract attrs of a pool of architectures (computed once per architecture)."""
    out = []
    for attn in KINDS.values():
        for width in (32, 64, 128):
            for depth in (2, 4):
                spec = ModelSpec.from_dict({"width": width, "depth": depth, "attention": attn,
                                            "max_seq_len": 64, "adapter": ADAPTER})
                out.append({"spec": spec.to_dict(), "hash": spec.hash(), "family": spec.family,
                            "flops_per_token": float(model_flops(spec)),
                            "params": model_params(spec),
                            "kv_cache_bytes_per_token": float(kv_cache_bytes(spec))})
    return out


def contract_attrs(rng: random.Random, arch: dict, status: str) -> tuple[list | None, dict]:
    flops = arch["flops_per_token"]
    loss = 0.3 + 40.0 / math.sqrt(flops) + rng.random() * 0.08
    attrs = {"status": status, "reason": None, **arch, "seed": rng.randrange(3),
             "budget_flops": 1e13, "code_version": "bench"}
    attrs["spec"] = json.loads(json.dumps(arch["spec"]))  # each trial its own copy
    if status != "ok":
        attrs["reason"] = {"failed": "loss became NaN at step 812",
                           "infeasible": "flops_per_token above max_flops",
                           "duplicate": "same architecture hash"}[status]
        if status == "duplicate":
            attrs["duplicate_of"] = 0
        return None, attrs
    steps = 4000
    curve = [{"step": s, "tokens": s * 4096, "flops": s * 3 * flops * 4096,
              "train_loss": loss * (1 + 3.0 / (1 + s / 100))} for s in range(40, steps + 1, 40)]
    for entry in curve[9::10]:
        entry["val_loss"] = entry["train_loss"] * 1.02
        entry["metric"] = entry["val_loss"] * 0.9
    attrs.update({"val_loss": loss, "metric": loss * 0.9, "metric_name": "mse", "curve": curve,
                  "steps": steps, "train_flops": 3 * flops * 4096 * steps,
                  "duration_s": rng.uniform(20, 200),
                  "weights_artifact_id": f"{rng.getrandbits(128):032x}"})
    return [loss, flops], attrs


def build(path: Path, n: int, via_optuna: bool) -> tuple[str, float]:
    if path.exists():
        path.unlink()
    url = f"sqlite:///{path}"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = optuna.storages.RDBStorage(url)
    study = optuna.create_study(storage=storage, study_name=STUDY,
                                directions=["minimize", "minimize"])
    study.set_user_attr("mlbtc", {"task": {"name": "icl_regression", "options": {}},
                                  "budget_flops": 1e13, "artifact_dir": str(path.parent),
                                  "objectives": ["val_loss", "flops_per_token"]})
    rng = random.Random(0)
    pool = specs()
    statuses = rng.choices(["ok", "failed", "infeasible", "duplicate"], [88, 6, 5, 1], k=n)
    made = [contract_attrs(rng, rng.choice(pool), s) for s in statuses]
    t0 = time.perf_counter()
    if via_optuna:
        study.add_trials([create_trial(values=v, state=TrialState.COMPLETE if v else
                                       TrialState.FAIL, user_attrs=a) for v, a in made])
        return url, time.perf_counter() - t0
    values, attrs = made[0]
    study.add_trial(create_trial(values=values, user_attrs=attrs))
    trials_t, values_t = models.TrialModel.__table__, models.TrialValueModel.__table__
    attrs_t = models.TrialUserAttributeModel.__table__
    with storage.engine.begin() as conn:
        first = conn.execute(sa.select(trials_t)).one()
        next_id = first.trial_id + 1
        trial_rows, value_rows, attr_rows = [], [], []
        for number, (values, attrs) in enumerate(made[1:], start=1):
            tid = next_id + number - 1
            trial_rows.append({"trial_id": tid, "number": number, "study_id": first.study_id,
                               "state": TrialState.COMPLETE if values else TrialState.FAIL,
                               "datetime_start": first.datetime_start,
                               "datetime_complete": first.datetime_complete})
            for k, v in enumerate(values or []):
                value_rows.append({"trial_id": tid, "objective": k, "value": v,
                                   "value_type": models.TrialValueModel.TrialValueType.FINITE})
            attr_rows.extend({"trial_id": tid, "key": key, "value_json": json.dumps(v)}
                             for key, v in attrs.items())
        conn.execute(sa.insert(trials_t), trial_rows)
        conn.execute(sa.insert(values_t), value_rows)
        conn.execute(sa.insert(attrs_t), attr_rows)
    for number in (1, n // 2, n - 1):  # Optuna reads the bulk rows back as it wrote the first
        t = storage.get_trial(storage.get_trial_id_from_study_id_trial_number(
            study._study_id, number))
        values, attrs = made[number]
        assert t.values == values and t.user_attrs == attrs, number
    return url, time.perf_counter() - t0


class Clock:
    """Wall time and this process's CPU time (the CPU time does not grow when other processes
    load the machine, so it estimates the wall time on an idle machine)."""

    def __enter__(self) -> Clock:
        self.wall0, self.cpu0 = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self.wall0
        self.cpu = time.process_time() - self.cpu0


def timed(fn, repeat: int = 3) -> tuple[tuple[float, float], object]:
    """Median (wall, cpu) seconds of ``repeat`` calls, and the last result."""
    walls, cpus, out = [], [], None
    for _ in range(repeat):
        with Clock() as c:
            out = fn()
        walls.append(c.wall)
        cpus.append(c.cpu)
    return (statistics.median(walls), statistics.median(cpus)), out


def post_callback(client, outputs: list[tuple[str, str]], inputs: list[dict],
                  state: list[dict], changed: list[str]) -> dict:
    body = {"output": ".." + "...".join(f"{i}.{p}" for i, p in outputs) + ".."
            if len(outputs) > 1 else f"{outputs[0][0]}.{outputs[0][1]}",
            "outputs": [{"id": i, "property": p} for i, p in outputs]
            if len(outputs) > 1 else {"id": outputs[0][0], "property": outputs[0][1]},
            "inputs": inputs, "state": state, "changedPropIds": changed}
    r = client.post("/_dash-update-component", json=body)
    if r.status_code not in (200, 204):
        raise RuntimeError(f"callback failed: {r.status_code} {r.data[:300]!r}")
    return {"bytes": len(r.data)}


def page_requests(client, study_id: int) -> dict:
    """The two requests the browser makes for a study page: route, then the page's data."""
    out = {}
    with Clock() as route:
        out["route"] = post_callback(client, [("page", "children")],
                                     [{"id": "url", "property": "pathname",
                                       "value": f"/study/{STUDY}"}], [], ["url.pathname"])
    outputs = [("front", "figure"), ("hv", "figure"), ("study-cards", "children"),
               ("trials", "data"), ("family-filter", "options"), ("study-version", "data")]
    with Clock() as update:
        out["update"] = post_callback(
            client, outputs,
            [{"id": "tick", "property": "n_intervals", "value": 0},
             {"id": "family-filter", "property": "value", "value": None},
             {"id": "state-filter", "property": "value", "value": None}],
            [{"id": "study-version", "property": "data", "value": None},
             {"id": "study-key", "property": "data",
              "value": {"study_id": study_id, "name": STUDY}}],
            ["family-filter.value"])
    with Clock() as overlay:
        post_callback(client, [("overlay", "figure")],
                      [{"id": "overlay-studies", "property": "value", "value": [STUDY]},
                       {"id": "study-version", "property": "data", "value": "v"}],
                      [], ["overlay-studies.value"])
    out["route_s"] = (route.wall, route.cpu)
    out["update_s"] = (update.wall, update.cpu)
    out["overlay_s"] = (overlay.wall, overlay.cpu)
    out["total_s"] = tuple(a + b + c for a, b, c in zip(out["route_s"], out["update_s"],
                                                         out["overlay_s"], strict=True))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=5000)
    ap.add_argument("--db", type=Path, default=None, help="keep the SQLite file here")
    ap.add_argument("--reuse", action="store_true", help="use the --db file if it exists")
    ap.add_argument("--optuna-build", action="store_true",
                    help="build through study.add_trials (slow: minutes)")
    ap.add_argument("--skip-optuna-read", action="store_true",
                    help="do not time Optuna's get_all_trials (about 10 s at 5,000 trials)")
    args = ap.parse_args()
    tmp = tempfile.TemporaryDirectory()
    path = args.db or Path(tmp.name) / "bench.db"
    if args.reuse and path.exists():
        url = f"sqlite:///{path}"
        print(f"reusing {path}", flush=True)
    else:
        url, build_s = build(path, args.trials, args.optuna_build)
        print(f"built {args.trials} trials in {build_s:.1f} s "
              f"({'study.add_trials' if args.optuna_build else 'bulk insert'}), "
              f"{path.stat().st_size / 1e6:.1f} MB", flush=True)

    reader = open_reader(url)
    sid = reader.get_study_id_from_name(STUDY)
    rows = []
    if not args.skip_optuna_read:
        t, _ = timed(lambda: reader.get_all_trials(sid, deepcopy=False), repeat=1)
        rows.append(("optuna get_all_trials (reference, not used)", t))
    cache = TrialCache(reader)
    with Clock() as c:
        records, _ = cache.trials(sid)
    rows.append(("dashboard reader, cold (all trials, no curves)", (c.wall, c.cpu)))
    t, _ = timed(lambda: cache.trials(sid))
    rows.append(("dashboard reader, refresh with no change (each 5 s tick)", t))
    t, view = timed(lambda: data.study_view(records))
    rows.append(("data.study_view (rows, front, hypervolume history)", t))
    t, _ = timed(lambda: figures.pareto_figure(view.rows, view.front))
    rows.append((f"figures.pareto_figure ({len(view.rows)} points)", t))
    t, _ = timed(lambda: figures.hypervolume_figure(view.hv_history, view.reference))
    rows.append(("figures.hypervolume_figure", t))
    t, _ = timed(lambda: figures.overlay_figure([(STUDY, data.front_rows(view))]))
    rows.append(("figures.overlay_figure", t))
    t, _ = timed(lambda: pages.table_rows(STUDY, view.rows))
    rows.append(("pages.table_rows (trial table data)", t))
    board = Dashboard(reader)
    board.study_data(sid, None, None)  # fill its cache first
    t, _ = timed(lambda: board.study_data(sid, None, None))
    rows.append(("Dashboard.study_data (warm cache)", t))

    client = create_app(url).server.test_client()
    cold = page_requests(client, sid)
    warm = [page_requests(client, sid) for _ in range(3)]
    best = min(warm, key=lambda w: w["total_s"][0])
    for label, v in (("cold", cold), ("warm", best)):
        rows.append((f"study page over HTTP, {label}: route callback", v["route_s"]))
        rows.append((f"study page over HTTP, {label}: update callback "
                     f"({v['update']['bytes'] / 1e6:.1f} MB JSON)", v["update_s"]))
        rows.append((f"study page over HTTP, {label}: overlay callback", v["overlay_s"]))
        rows.append((f"study page over HTTP, {label}: total server time", v["total_s"]))
    width = max(len(r[0]) for r in rows)
    print(f"\n{'what':<{width}}  wall s   CPU s")
    for label, (wall, cpu) in rows:
        print(f"{label:<{width}}  {wall:6.3f}  {cpu:6.3f}")
    load = os.getloadavg()[0]
    print(f"\nmachine: {os.cpu_count()} CPUs, load average {load:.1f} while measuring")
    (wall, cpu), (warm_wall, warm_cpu) = cold["total_s"], best["total_s"]
    print(f"study page with {args.trials} trials, server time: cold {wall:.2f} s wall "
          f"({cpu:.2f} s CPU), warm {warm_wall:.2f} s wall ({warm_cpu:.2f} s CPU); target < 2 s "
          f"cold: {'OK' if wall < 2.0 else 'OK on CPU time' if cpu < 2.0 else 'OVER'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The rediscovery search and the tables and plots of benchmarks/gpu_evidence.py.

``run_rediscovery`` runs ``mlbtc search`` on a copy of the neutral ICL space (budget, trials,
workers and GPU share set by the plan) in a subprocess with a time limit; the study lives in
``OUT/rediscovery.db`` so a rerun resumes it. ``report`` turns ``OUT/results.jsonl`` into
``OUT/summary.md`` and the PNGs and returns the text.

Rank of a structure: for every layer and head group, the bilinear form a head applies to two
distant positions is the sum of its global score levels (block size None); its numerical rank
(``torch.linalg.matrix_rank`` of the materialised D x D form at initialisation) is the structure's
``global rank``. Standard attention has rank = head dim, bilinear BTT and MLR up to D, MLR over
the sequence the rank of its global level. The smallest over layers and groups is reported.
"""

from __future__ import annotations

import functools
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


# ---- rediscovery --------------------------------------------------------------------------
def space_file() -> tuple[Path, str]:
    neutral = ROOT / "search_spaces" / "mlbtc_icl.yaml"
    if neutral.exists():
        return neutral, "search_spaces/mlbtc_icl.yaml (the neutral structure space)"
    return (ROOT / "search_spaces" / "icl_regression.yaml",
            "search_spaces/icl_regression.yaml (mlbtc_icl.yaml is not in this tree: the broadest "
            "ICL space available, which picks among named families)")


def run_rediscovery(meta: dict, args: Any, out: Path, timeout_s: float, spawn: Any,
                    kill: Any) -> dict:
    """Run (or resume) the search; return the row for results.jsonl (with the trials)."""
    import importlib.util

    import yaml

    missing = [m for m in ("optuna", "ray", "sqlalchemy") if importlib.util.find_spec(m) is None]
    if missing:  # e.g. a GPU image with torch only: the other phases need none of these
        return {"status": "skipped", "reason": f"mlbtc search needs {', '.join(missing)}, not "
                "installed here", "space": space_file()[1], "budget": meta["budget"],
                "trials": [], "wall_s": 0.0}

    src, note = space_file()
    space = yaml.safe_load(src.read_text())
    workers = int(meta["workers"])
    gpu = args.device.startswith("cuda")
    name = "gpu_rediscovery_b" + f"{meta['budget']:.3g}".replace("+", "")  # one per budget
    space.update(name=name, budget=float(meta["budget"]), trials=int(meta["trials"]),
                 workers=workers, storage=f"sqlite:///{out / 'rediscovery.db'}",
                 resources={"cpus": 1, "gpus": round(1 / workers, 4) if gpu else 0})
    if args.smoke:  # tiny: short sequences, small batches
        space["task"] = {"name": "icl_regression", "options": {"n_dims": 4, "n_points": 8}}
        space["train"] = {**space.get("train", {}), "batch_size": 8, "eval_batches": 2}
        space.pop("constraints", None)
    path = out / "rediscovery_space.yaml"
    path.write_text(yaml.safe_dump(space, sort_keys=False))
    t0 = time.monotonic()
    log = out / "logs" / "rediscovery"
    proc = spawn([sys.executable, "-m", "mlbtc_search.cli", "search", str(path)], log)
    try:
        proc.wait(timeout=max(1.0, timeout_s))
        status = "ok" if proc.returncode == 0 else "error"
        err = Path(f"{log}.err").read_text().strip().splitlines() or ["?"]
        reason = None if status == "ok" else err[-1]
    except subprocess.TimeoutExpired:
        status, reason = "timeout", f"stopped after {timeout_s:.0f} s (rerun resumes the study)"
    finally:
        kill(proc)
    return {"status": status, "reason": reason, "space": note, "wall_s": time.monotonic() - t0,
            "budget": meta["budget"], "trials": study_trials(out / "rediscovery.db", name)}


def study_trials(db: Path, name: str) -> list[dict]:
    if not db.exists():
        return []
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.load_study(study_name=name, storage=f"sqlite:///{db}")
    except KeyError:  # the search stopped before creating it
        return []
    try:
        from studies.record import decode_attr  # dicts are stored as JSON strings
    except ImportError:  # older trees stored dicts
        def decode_attr(value: Any) -> Any:
            return value
    rows = []
    for t in study.get_trials(deepcopy=False):
        ua = {k: decode_attr(v) for k, v in t.user_attrs.items()}
        if t.state.name != "COMPLETE" or "spec" not in ua:
            continue
        rows.append({"number": t.number, "family": ua.get("family"), "metric": ua.get("metric"),
                     "val_loss": ua.get("val_loss"), "flops_per_token": ua.get("flops_per_token"),
                     "hash": ua.get("hash"), "rank": global_rank(json.dumps(ua["spec"]))})
    return rows


@functools.cache
def global_rank(spec_json: str) -> int:
    """The smallest numerical rank of a head's global bilinear form (see the module doc)."""
    import torch

    from mlbtc_search.linear import compile_matrix
    from mlbtc_search.model import ModelSpec

    spec = ModelSpec.from_dict(json.loads(spec_json))
    torch.manual_seed(0)
    ranks = []
    for attn in spec.layers:
        for group in attn.groups:
            forms = [compile_matrix(lv.score).double().materialize()
                     for lv in group.levels if lv.block_size is None]
            if forms:
                ranks.append(int(torch.linalg.matrix_rank(sum(forms)).item()))
    return min(ranks) if ranks else 0


# ---- tables -------------------------------------------------------------------------------
def _ok(results: dict[str, dict], phase: str) -> list[dict]:
    return [r for r in results.values() if r.get("phase") == phase and r.get("status") == "ok"
            and "label" in r]


def throughput_table(results: dict[str, dict]) -> list[str]:
    groups = [r for r in results.values() if r.get("phase") == "throughput"
              and "concurrency" in r]
    if not groups:
        return []
    lines = ["## Throughput (in-context regression trials, a new process per trial)", "",
             "| device | concurrent | trials | wall s | trials/hour | model FLOP/s | "
             "start s | train s |", "|---|---|---|---|---|---|---|---|"]
    cpu = next((g for g in groups if g["key"] == "throughput/cpu2"), None)
    for g in sorted(groups, key=lambda g: (g["key"] == "throughput/cpu2", g["concurrency"])):
        jobs = [r for k, r in results.items() if k.startswith(g["key"] + "/") and
                r.get("status") == "ok"]
        start = statistics.mean(r["start_s"] for r in jobs) if jobs else math.nan
        train = statistics.mean(r["train_s"] for r in jobs) if jobs else math.nan
        tph = g["ok"] / g["wall_s"] * 3600
        lines.append(f"| {g['device']} | {g['concurrency']} | {g['ok']}/{g['trials']} | "
                     f"{g['wall_s']:.0f} | {tph:,.0f} | {g['train_flops'] / g['wall_s']:.3g} | "
                     f"{start:.1f} | {train:.1f} |")
    gpu = [g for g in groups if g is not cpu and g["ok"]]
    if cpu and cpu["ok"] and gpu:
        best = max(gpu, key=lambda g: g["ok"] / g["wall_s"])
        ratio = (best["ok"] / best["wall_s"]) / (cpu["ok"] / cpu["wall_s"])
        lines += ["", f"Best: {best['device']} x{best['concurrency']}, {ratio:.1f}x the trials "
                      "per hour of the 2-core CPU."]
    return lines + [""]


def icl_table(results: dict[str, dict], out: Path) -> list[str]:
    rows = _ok(results, "icl")
    if not rows:
        return []
    budget = max(r["budget"] for r in rows)
    rows = [r for r in rows if r["budget"] == budget]
    by: dict[str, list[dict]] = {}
    for r in sorted(rows, key=lambda r: r["seed"]):
        by.setdefault(r["label"], []).append(r)
    dev = rows[0].get("device")
    lines = [f"## In-context regression at equal training FLOPs ({budget:.3g}, {dev})", "",
             "| model | seeds | FLOPs/token | steps | last_sq_error (mean) | per seed |",
             "|---|---|---|---|---|---|"]
    means = {}
    for name, rs in by.items():
        errs = [r["metric"] for r in rs]
        means[name] = statistics.mean(errs)
        lines.append(f"| {name} | {len(rs)} | {rs[0]['flops_per_token']:,.0f} | "
                     f"{int(statistics.mean(r['steps'] for r in rs))} | {means[name]:.3f} | "
                     f"{' '.join(f'{e:.3f}' for e in errs)} |")
    std8 = means.get("standard_8head")
    solved = [n for n in ("bilinear_btt", "bilinear_mlr", "mlr_sequence") if n in means]
    if std8 is not None and solved:
        hit = std8 >= 0.5 and all(means[n] <= 0.1 for n in solved)
        lines += ["", f"Paper's target (8-head standard >= 0.5 while BTT/MLR <= 0.1): "
                      f"{'reproduced' if hit else 'NOT reproduced'} (8-head standard "
                      f"{std8:.3f}; " + ", ".join(f"{n} {means[n]:.3f}" for n in solved) + ")."]
    s = rows[0]["spec"]
    d = rows[0].get("task", {}).get("options", {}).get("n_dims", "?")
    _try_plot(_plot_curves, by, out / "icl_curves.png",
                 f"In-context regression, d={d}, D={s['width']}, depth {s['depth']} ({dev})")
    return lines + ["", "![ICL curves](icl_curves.png)", ""]


def rediscovery_table(results: dict[str, dict], out: Path, d: int) -> list[str]:
    rows = [r for r in results.values() if r.get("phase") == "rediscovery"]
    if not rows:
        return []
    row = max(rows, key=lambda r: len(r.get("trials", [])))
    trials = [t for t in row["trials"] if t["metric"] is not None]
    lines = [f"## Rediscovery: {row['space']}", "",
             f"Search status {row['status']}" + (f" ({row['reason']})" if row.get("reason")
                                                  else "")
             + f", {len(trials)} trained trials, budget {row['budget']:.3g} per trial.", ""]
    if not trials:
        return lines
    lines += ["| family | trials | best last_sq_error | median | global rank |",
              "|---|---|---|---|---|"]
    fams: dict[str, list[dict]] = {}
    for t in trials:
        fams.setdefault(t["family"], []).append(t)
    for fam, ts in sorted(fams.items(), key=lambda kv: min(t["metric"] for t in kv[1])):
        ranks = sorted({t["rank"] for t in ts})
        lines.append(f"| {fam} | {len(ts)} | {min(t['metric'] for t in ts):.3f} | "
                     f"{statistics.median(t['metric'] for t in ts):.3f} | "
                     f"{', '.join(map(str, ranks))} |")
    front = pareto(trials)
    lines += ["", "Front (loss against FLOPs/token): " + "; ".join(
        f"{t['family']} rank {t['rank']} loss {t['val_loss']:.3f} at {t['flops_per_token']:,.0f}"
        for t in front)]
    high = [t["metric"] for t in trials if t["rank"] >= d]
    low = [t["metric"] for t in trials if t["rank"] < d]
    best = min(trials, key=lambda t: t["metric"])
    lines.append(f"Lowest error {best['metric']:.3f} by {best['family']} (global rank "
                 f"{best['rank']}, d={d}); median error rank >= d: "
                 f"{statistics.median(high) if high else math.nan:.3f} ({len(high)} trials), "
                 f"rank < d: {statistics.median(low) if low else math.nan:.3f} ({len(low)}).")
    _try_plot(_plot_front, trials, front, d, out / "rediscovery_front.png")
    return lines + ["", "![front](rediscovery_front.png)", ""]


def language_table(results: dict[str, dict], out: Path) -> list[str]:
    rows = _ok(results, "language")
    if not rows:
        return []
    cells: dict[tuple[str, float], list[float]] = {}
    for r in rows:
        cells.setdefault((r["label"], r["budget"]), []).append(r["metric"])
    budgets = sorted({b for _, b in cells})
    fams = sorted({f for f, _ in cells})
    corpus = rows[0].get("task", {}).get("options", {}).get("corpus", "?")
    lines = [f"## Language (bytes of the {corpus!r} corpus, {rows[0].get('device')}): bits per "
             "byte",
             "", "| family | " + " | ".join(f"{b:.2g}" for b in budgets) + " |",
             "|---|" + "---|" * len(budgets)]
    for f in fams:
        vals = [cells.get((f, b)) for b in budgets]
        lines.append(f"| {f} | " + " | ".join(
            "-" if not v else f"{statistics.mean(v):.3f} ± {_spread(v):.3f} ({len(v)})"
            for v in vals) + " |")
    below = [b for b in budgets if all((f, b) in cells for f in fams) and "mlr_sequence" in fams
             and statistics.mean(cells["mlr_sequence", b]) < min(
                 statistics.mean(cells[f, b]) for f in fams if f != "mlr_sequence")]
    lines += ["", f"MLR over the sequence is lowest at {len(below)} of {len(budgets)} budgets"
                  f" ({', '.join(f'{b:.2g}' for b in below) or 'none'})."]
    _try_plot(_plot_language, cells, out / "language_scaling.png")
    return lines + ["", "![language](language_scaling.png)", ""]


def _spread(v: list[float]) -> float:
    return (max(v) - min(v)) / 2 if len(v) > 1 else 0.0


def pareto(trials: list[dict]) -> list[dict]:
    pts = sorted(trials, key=lambda t: (t["flops_per_token"], t["val_loss"]))
    front, best = [], math.inf
    for t in pts:
        if t["val_loss"] < best:
            front.append(t)
            best = t["val_loss"]
    return front


# ---- plots --------------------------------------------------------------------------------
def _try_plot(plot: Any, *args: Any) -> None:
    try:
        plot(*args)
    except ImportError as exc:  # the tables matter more than the pictures
        print(f"no plot {args[-1]}: {exc}", file=sys.stderr)


def _save(plt, fig, ax, path: Path) -> None:
    """Grid, legend, tight layout, then write ``path`` (PNG, 120 dpi) and free the figure."""
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plot_curves(by: dict[str, list[dict]], path: Path, title: str) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (name, rs) in enumerate(by.items()):
        for j, r in enumerate(rs):
            ax.plot([c["flops"] for c in r["curve"]], [c["metric"] for c in r["curve"]],
                    color=f"C{i}", alpha=0.8, label=name if j == 0 else None)
    ax.axhline(0.5, color="gray", ls=":", lw=1)
    ax.axhline(0.1, color="gray", ls="--", lw=1)
    ax.set(xscale="log", ylim=(0, 1.2), xlabel="training FLOPs (non-embedding)",
           ylabel="squared error at the last point", title=title)
    _save(plt, fig, ax, path)


def _plot_front(trials: list[dict], front: list[dict], d: int, path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for high, color in ((True, "tab:green"), (False, "tab:red")):
        ts = [t for t in trials if (t["rank"] >= d) == high]
        ax.scatter([t["flops_per_token"] for t in ts], [t["val_loss"] for t in ts], c=color,
                   alpha=0.7, label=f"global rank {'>=' if high else '<'} d={d}")
    ax.plot([t["flops_per_token"] for t in front], [t["val_loss"] for t in front], "k-", lw=1,
            label="front")
    ax.set(xscale="log", xlabel="FLOPs per token", ylabel="validation loss",
           title="Rediscovery search: loss against FLOPs")
    _save(plt, fig, ax, path)


def _plot_language(cells: dict[tuple[str, float], list[float]], path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, fam in enumerate(sorted({f for f, _ in cells})):
        pts = sorted((b, v) for (f, b), v in cells.items() if f == fam)
        for b, v in pts:
            ax.scatter([b] * len(v), v, color=f"C{i}", alpha=0.5, s=12)
        ax.plot([b for b, _ in pts], [statistics.mean(v) for _, v in pts], color=f"C{i}",
                label=fam)
    ax.set(xscale="log", xlabel="training FLOPs", ylabel="validation bits per byte",
           title="Byte-level LM: loss against compute")
    _save(plt, fig, ax, path)


def report(results: dict[str, dict], out: Path, args: Any) -> str:
    """Write OUT/summary.md (and the PNGs); return its text."""
    d = 4 if args.smoke else 16
    head = [f"# GPU evidence ({'smoke, CPU' if args.smoke else args.device}, scale "
            f"{args.scale:g})", ""]
    lines = head + throughput_table(results) + icl_table(results, out) + rediscovery_table(
        results, out, d) + language_table(results, out)
    text = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(text)
    return text

"""Multi-fidelity search against a single-budget search at equal total training FLOPs.

    python benchmarks/bench_multifidelity.py [--repeats 3] [--base 5e9] [--eta 2] [--trials 16]
        [--workers 2] [--out benchmarks/results/bench_multifidelity.txt]

For each repeat (sampler seed 0, 1, 2; TPE on the text task, 64-byte context):

- multi-fidelity: ``budgets: [b, eta b, eta^2 b]``, ``promote: {eta}``, ``--trials`` architectures,
  warmup-stable-decay schedule (promoted trials continue from their weights). Its total compute
  S is measured: the ``spent_flops`` of every rung of every trial.
- single budget: the top rung's budget and ``floor(S / top)`` trials, so it spends at most S
  (each trial spends at most the top budget; the exact totals are printed).

The score is the hypervolume at the top budget, in (val_loss, log10 FLOPs per token) as
everywhere in the project: for the multi-fidelity search, the trials that reached the top
rung (their loss after the top budget); for the single-budget search, all its trials. One
reference point (``max + 10%`` of each coordinate over every point of every search) serves all
of them. The
ratio is mean hypervolume (multi-fidelity) / mean hypervolume (single budget); the issue's target
is >= 1.2. The machine's load average is printed before and after: on a shared 2-core box the
wall times move with it, the FLOPs and losses do not.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import optuna

from studies.pareto import default_reference, hv_point, hypervolume_2d
from studies.runner import run_search
from studies.space import SearchSpace

SPACE: dict[str, Any] = {
    "width": {"choice": [48, 64]},
    "train.lr": {"choice": [1e-3, 2e-3, 3e-3, 5e-3]},
    "depth": {"int": [1, 2]},
    "attention": {
        "kind": {"choice": ["standard", "mlr", "sliding_window"]},
        "heads": {"choice": [2, 4]},
        "ranks": {"choice": [[8, 4, 2, 2], [4, 4, 4, 4], [8, 8]], "when": {"kind": "mlr"}},
        "window": {"choice": [8, 16, 32], "when": {"kind": "sliding_window"}},
    },
}


def space_dict(name: str, seed: int, trials: int, workers: int, budgets: list[float],
               eta: int, multi: bool) -> dict[str, Any]:
    data: dict[str, Any] = {
        "name": name, "task": {"name": "text", "options": {"seq_len": 64}},
        "trials": trials, "workers": workers, "seed": 0,
        "sampler": {"name": "tpe", "seed": seed, "n_startup_trials": 6},
        "train": {"batch_size": 16, "eval_batches": 4, "schedule": "wsd"},
        "space": SPACE,
    }
    if multi:
        data.update(budgets=budgets, promote={"eta": eta})
    else:
        data["budget"] = budgets[-1]
    return data


def run(data: dict[str, Any], url: str) -> tuple[list[tuple[float, float]], float, float]:
    """Run one search; ``(top-budget points, total spent FLOPs, wall seconds)``."""
    space = SearchSpace.from_dict(data, source=f"{data['name']}.yaml")
    start = time.perf_counter()
    run_search(space, url)
    wall = time.perf_counter() - start
    study = optuna.load_study(study_name=data["name"], storage=url)
    points, spent = [], 0.0
    top = max(data.get("budgets") or [data["budget"]])
    for t in study.get_trials(deepcopy=False):
        ua = t.user_attrs
        rungs = json.loads(ua["rungs"]) if "rungs" in ua else None
        if rungs is not None:
            spent += sum(float(r.get("spent_flops") or 0.0) for r in rungs)
            good = [r for r in rungs if r["status"] == "ok"]
            if good and good[-1]["budget_flops"] == top and t.values:
                points.append((good[-1]["val_loss"], float(good[-1]["flops_per_token"])))
        elif t.state == optuna.trial.TrialState.COMPLETE or "train_flops" in ua:
            spent += float(ua.get("train_flops") or 0.0)
            if t.state == optuna.trial.TrialState.COMPLETE:
                points.append((t.values[0], t.values[1]))
    return points, spent, wall


def _best(points: list[tuple[float, float]]) -> str:
    return f"{min(p[0] for p in points):.4f}" if points else "-"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--base", type=float, default=5e9, help="budget of rung 0 (FLOPs)")
    parser.add_argument("--eta", type=int, default=2, help="reduction factor; 3 rungs")
    parser.add_argument("--trials", type=int, default=16, help="multi-fidelity architectures")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--workdir", type=Path, default=None,
                        help="keep the studies (SQLite) and artifacts here (default: a temp dir)")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    ray.init(num_cpus=args.workers, include_dashboard=False, log_to_driver=False)
    lines = [f"load average before: {os.getloadavg()}"]
    results = []
    budgets = [args.base, args.eta * args.base, args.eta ** 2 * args.base]
    top = budgets[-1]
    with tempfile.TemporaryDirectory(prefix="mlbtc-bench-mf-") as scratch:
        tmp = str(args.workdir or scratch)
        Path(tmp).mkdir(parents=True, exist_ok=True)
        os.environ["MLBTC_ARTIFACTS"] = str(Path(tmp) / "artifacts")
        for seed in range(args.repeats):
            url = f"sqlite:///{tmp}/bench-{seed}.db"
            mf = space_dict(f"mf-{seed}", seed, args.trials, args.workers, budgets, args.eta,
                            True)
            mf_points, mf_spent, mf_wall = run(mf, url)
            n_single = max(1, int(mf_spent // top))
            single = space_dict(f"single-{seed}", seed, n_single, args.workers, budgets,
                                args.eta, False)
            sb_points, sb_spent, sb_wall = run(single, url)
            results.append({"seed": seed, "mf": mf_points, "mf_spent": mf_spent,
                            "mf_wall": mf_wall, "single": sb_points, "single_spent": sb_spent,
                            "single_trials": n_single, "single_wall": sb_wall})
            print(f"repeat {seed}: multi-fidelity {len(mf_points)} top-rung trials, "
                  f"{mf_spent:.3g} FLOPs, {mf_wall:.0f} s; single budget {n_single} trials, "
                  f"{sb_spent:.3g} FLOPs, {sb_wall:.0f} s", file=sys.stderr, flush=True)
    ray.shutdown()
    every = [hv_point(*p) for r in results for p in r["mf"] + r["single"]]
    ref = default_reference(every)
    mf_hv, sb_hv = [], []
    for r in results:
        a = hypervolume_2d([hv_point(*p) for p in r["mf"]], ref)
        b = hypervolume_2d([hv_point(*p) for p in r["single"]], ref)
        mf_hv.append(a)
        sb_hv.append(b)
        lines.append(
            f"seed {r['seed']}: multi-fidelity HV {a:.4f} ({len(r['mf'])} trials at the top "
            f"rung of {args.trials}; {r['mf_spent']:.3g} FLOPs; {r['mf_wall']:.0f} s) | single "
            f"budget HV {b:.4f} ({r['single_trials']} trials; {r['single_spent']:.3g} FLOPs; "
            f"{r['single_wall']:.0f} s) | best loss {_best(r['mf'])} vs {_best(r['single'])}")
    ratio = statistics.mean(mf_hv) / statistics.mean(sb_hv) if statistics.mean(sb_hv) else 0.0
    lines += [f"reference point (val_loss, log10 FLOPs/token): ({ref[0]:.4f}, {ref[1]:.4f})",
              f"budgets {' / '.join(f'{b:.3g}' for b in budgets)}, eta {args.eta}, "
              f"{args.workers} workers",
              f"hypervolume ratio multi-fidelity / single budget (means over {args.repeats} "
              f"repeats): {ratio:.3f}",
              f"load average after: {os.getloadavg()}"]
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

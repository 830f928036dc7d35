"""Multi-fidelity search against a single-budget search at equal total training FLOPs.

    python benchmarks/bench_multifidelity.py [--repeats 3] [--top 2e10] [--eta 3] [--trials 27]
        [--workers 2] [--out benchmarks/results/bench_multifidelity.txt] [--json FILE]

For each repeat (sampler seed 0, 1, 2; TPE on the text task, 64-byte context):

- multi-fidelity: ``budgets: [top / eta^2, top / eta, top]`` (ASHA's rungs ``r eta^k``),
  ``promote: {eta}`` (3, the project's default), ``--trials`` architectures (27 = eta^3, so that
  eta of them reach the top rung after two cuts), warmup-stable-decay schedule (promoted trials
  continue from their weights). Its total compute S is measured: the ``spent_flops`` of every
  rung of every trial.
- single budget: the top budget and ``round(S / top)`` trials, the count whose total is closest
  to S (the exact totals are printed).

The score is the hypervolume at the top budget in (val_loss, log10 FLOPs per token), as
everywhere in the project: for the multi-fidelity search the trials that reached the top rung
(their loss after the top budget), for the single-budget search all its trials. The reference
point's loss is the **unigram cross-entropy** of the corpus (validation bytes scored by the
training bytes' frequencies, add-one smoothed): a model at or above it has learned nothing from
context and should add no volume. Its FLOPs coordinate is the project's default rule (max + 10%
of log10 FLOPs over the top-budget points of all the searches). The ratio under the project's
default reference on both coordinates (which puts the loss at 1.1 x the worst top-budget model,
a model worse than the unigram baseline) is printed too, with the best losses, which need no
reference. Also printed: the rank correlation (Spearman) between the loss at rung 0 and at the
top budget over the architectures both searches trained (how well the lowest rung ranks), and
the load average before and after: on a shared 2-core box the wall times move with it, the
FLOPs and losses do not. docs/scaling.md discusses the numbers.
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


def run(data: dict[str, Any], url: str) -> dict[str, Any]:
    """Run one search: its top-budget points, total spent FLOPs, wall seconds, architectures
    trained, and the loss of each (architecture, training settings) at its lowest budget."""
    space = SearchSpace.from_dict(data, source=f"{data['name']}.yaml")
    start = time.perf_counter()
    run_search(space, url)
    wall = time.perf_counter() - start
    study = optuna.load_study(study_name=data["name"], storage=url)
    points, spent, first, trained = [], 0.0, {}, 0
    top = max(data.get("budgets") or [data["budget"]])
    for t in study.get_trials(deepcopy=False):
        ua = t.user_attrs
        key = f"{ua.get('hash')}:{ua.get('train')}"
        rungs = json.loads(ua["rungs"]) if "rungs" in ua else None
        if rungs is not None:
            trained += 1
            spent += sum(float(r.get("spent_flops") or 0.0) for r in rungs)
            good = [r for r in rungs if r["status"] == "ok"]
            if good and good[-1]["budget_flops"] == top and t.values:
                points.append((good[-1]["val_loss"], float(good[-1]["flops_per_token"])))
            if good and good[0]["rung"] == 0:
                first[key] = good[0]["val_loss"]
        elif t.state == optuna.trial.TrialState.COMPLETE or "train_flops" in ua:
            trained += 1
            spent += float(ua.get("train_flops") or 0.0)
            if t.state == optuna.trial.TrialState.COMPLETE:
                points.append((t.values[0], t.values[1]))
                first[key] = t.values[0]
    return {"points": points, "spent": spent, "wall": wall, "trained": trained, "first": first}


def unigram_loss(seq_len: int) -> float:
    """Cross-entropy (nats) of the text task's validation bytes under the training bytes'
    frequencies (add-one smoothed): the loss of the best model that ignores the context."""
    import numpy as np

    from trainers.tasks import get_task

    task = get_task("text", seq_len=seq_len)
    counts = np.bincount(np.asarray(task.train_data), minlength=256).astype(float) + 1.0
    val = np.bincount(np.asarray(task.val_data), minlength=256).astype(float)
    return float(-(val * np.log(counts / counts.sum())).sum() / val.sum())


def spearman(pairs: list[tuple[float, float]]) -> float:
    """Spearman's rank correlation (no ties expected among float losses)."""
    import numpy as np

    if len(pairs) < 3:
        return float("nan")
    ranks = [np.argsort(np.argsort(np.asarray(col))) for col in zip(*pairs, strict=True)]
    return float(np.corrcoef(ranks[0], ranks[1])[0, 1])


def _best(points: list[tuple[float, float]]) -> float:
    return min((p[0] for p in points), default=float("nan"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--top", type=float, default=2e10, help="top budget (FLOPs)")
    parser.add_argument("--eta", type=int, default=3, help="reduction factor; 3 rungs")
    parser.add_argument("--trials", type=int, default=27, help="multi-fidelity architectures")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None, help="write every point here")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="keep the studies (SQLite) and artifacts here (default: a temp dir)")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    ray.init(num_cpus=args.workers, include_dashboard=False, log_to_driver=False)
    lines = [f"load average before: {os.getloadavg()}"]
    results = []
    budgets = [args.top / args.eta ** 2, args.top / args.eta, args.top]
    with tempfile.TemporaryDirectory(prefix="mlbtc-bench-mf-") as scratch:
        tmp = str(args.workdir or scratch)
        Path(tmp).mkdir(parents=True, exist_ok=True)
        os.environ["MLBTC_ARTIFACTS"] = str(Path(tmp) / "artifacts")
        for seed in range(args.repeats):
            url = f"sqlite:///{tmp}/bench-{seed}.db"
            mf = run(space_dict(f"mf-{seed}", seed, args.trials, args.workers, budgets,
                                args.eta, True), url)
            n_single = max(1, round(mf["spent"] / args.top))
            sb = run(space_dict(f"single-{seed}", seed, n_single, args.workers, budgets,
                                args.eta, False), url)
            results.append({"seed": seed, "mf": mf, "single": sb, "single_trials": n_single})
            print(f"repeat {seed}: multi-fidelity {len(mf['points'])} top-rung trials, "
                  f"{mf['spent']:.3g} FLOPs, {mf['wall']:.0f} s; single budget {n_single} "
                  f"trials, {sb['spent']:.3g} FLOPs, {sb['wall']:.0f} s", file=sys.stderr,
                  flush=True)
    ray.shutdown()
    lines += report(results, budgets, args)
    lines.append(f"load average after: {os.getloadavg()}")
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    if args.json:
        args.json.write_text(json.dumps({"budgets": budgets, "eta": args.eta, "repeats": [
            {"seed": r["seed"], "multi_fidelity": r["mf"], "single_budget": r["single"]}
            for r in results]}, indent=1) + "\n")
    return 0


def report(results: list[dict[str, Any]], budgets: list[float], args: Any) -> list[str]:
    every = [hv_point(*p) for r in results for p in r["mf"]["points"] + r["single"]["points"]]
    old = default_reference(every)
    new = (unigram_loss(64), old[1])
    hv: dict[str, list[tuple[float, float]]] = {"unigram": [], "old": []}
    lines = []
    for r in results:
        mf, sb = r["mf"], r["single"]
        for name, ref in (("unigram", new), ("old", old)):
            hv[name].append(tuple(hypervolume_2d([hv_point(*p) for p in x["points"]], ref)
                                  for x in (mf, sb)))
        (a, b), (a0, b0) = hv["unigram"][-1], hv["old"][-1]
        lines.append(
            f"seed {r['seed']}: multi-fidelity HV {a:.4f} (old reference {a0:.4f}; "
            f"{len(mf['points'])} of {mf['trained']} architectures at the top rung; "
            f"{mf['spent']:.3g} FLOPs; {mf['wall']:.0f} s) | single budget HV {b:.4f} (old "
            f"{b0:.4f}; {r['single_trials']} trials; {sb['spent']:.3g} FLOPs; "
            f"{sb['wall']:.0f} s) | best loss {_best(mf['points']):.4f} vs "
            f"{_best(sb['points']):.4f} | ratio {a / b if b else float('nan'):.3f}")
    pairs = [(r["mf"]["first"][k], r["single"]["first"][k]) for r in results
             for k in set(r["mf"]["first"]) & set(r["single"]["first"])]
    gain = statistics.mean(_best(r["single"]["points"]) - _best(r["mf"]["points"])
                           for r in results)

    def ratio(name: str) -> float:
        return statistics.mean(a for a, _ in hv[name]) / statistics.mean(b for _, b in hv[name])

    return lines + [
        f"budgets {' / '.join(f'{b:.3g}' for b in budgets)}, eta {args.eta}, "
        f"{args.trials} architectures, {args.workers} workers",
        f"reference point (val_loss, log10 FLOPs/token): ({new[0]:.4f}, {new[1]:.4f}); "
        f"loss = unigram cross-entropy of the corpus",
        f"old reference (max + 10% of every top-budget point): ({old[0]:.4f}, {old[1]:.4f})",
        f"best loss at the top budget, single budget minus multi-fidelity (mean over repeats): "
        f"{gain:.4f} nats",
        f"rank correlation, rung-0 loss (multi-fidelity) vs top-budget loss (single budget), "
        f"{len(pairs)} architectures trained by both: {spearman(pairs):.3f}",
        f"hypervolume ratio under the old reference: {ratio('old'):.3f}",
        f"hypervolume ratio multi-fidelity / single budget (means over {args.repeats} "
        f"repeats): {ratio('unigram'):.3f}",
    ]
if __name__ == "__main__":
    sys.exit(main())

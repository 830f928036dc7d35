"""Evidence: in-context regression at equal training FLOPs (the paper's section 4, CPU scale).

Standard attention with head dimension below d (d=16, D=64, 8 heads of 8) against 1-head standard
attention (head dim 64), bilinear BTT and bilinear MLR, several seeds, with the curriculum. Each
run trains for the steps its budget buys at its own cost; runs execute two at a time with one
thread each. Results append to benchmarks/out/icl_evidence.jsonl (so an interrupted benchmark
resumes), then a table is printed and a plot saved to benchmarks/out/icl_evidence.png.

    python benchmarks/icl_evidence.py --budget 2.5e13 --seeds 0 1
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "out"
MODELS = ["standard", "standard_1head", "bilinear_btt", "bilinear_mlr"]


def run_one(job: tuple[str, int, float, float]) -> dict:
    name, seed, budget, lr = job
    import torch

    torch.set_num_threads(1)
    from mlbtc_search.model import ModelSpec
    from mlbtc_search.yamlio import load_yaml
    from trainers.tasks import get_task
    from trainers.train import TrainConfig, train

    doc = load_yaml(ROOT / "examples" / "models" / f"{name}.yaml").data
    task = get_task("icl_regression", n_dims=16, curriculum=True, curriculum_start_dims=4,
                    curriculum_interval=200)
    spec = ModelSpec.from_dict(doc)
    t0 = time.time()
    res = train(spec, task, budget, seed=seed,
                config=TrainConfig(lr=lr, batch_size=64, eval_batches=16, eval_every=250))
    return {"model": name, "seed": seed, "budget": budget, "lr": lr,
            "status": res.status, "metric": res.metric, "val_loss": res.val_loss,
            "steps": res.steps, "train_flops": res.train_flops,
            "flops_per_token": res.flops_per_token, "params": res.params,
            "seconds": time.time() - t0,
            "curve": [{k: c.get(k) for k in ("step", "flops", "metric", "val_loss")}
                      for c in res.curve if c.get("metric") is not None]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=float, default=2.5e13)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--models", nargs="+", default=MODELS)
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    log = OUT / "icl_evidence.jsonl"
    done = []
    if log.exists():
        done = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    have = {(r["model"], r["seed"], r["budget"], r["lr"]) for r in done}
    jobs = [(m, s, args.budget, args.lr) for s in args.seeds for m in args.models
            if (m, s, args.budget, args.lr) not in have]
    if jobs:
        with mp.get_context("spawn").Pool(args.procs) as pool:
            for r in pool.imap_unordered(run_one, jobs):
                with log.open("a") as f:
                    f.write(json.dumps(r) + "\n")
                done.append(r)
                sys.stderr.write(f"{r['model']:<15} seed {r['seed']}: last_sq_error "
                                 f"{r['metric']:.3f} ({r['steps']} steps, {r['seconds']:.0f} s)\n")
    rows = [r for r in done if r["budget"] == args.budget and r["lr"] == args.lr]
    report(rows, args.budget)
    return 0


def report(rows: list[dict], budget: float) -> None:
    import statistics

    print(f"in-context regression, d=16, D=64, depth 3, budget {budget:.2g} training FLOPs")
    print(f"{'model':<16}{'seeds':>6}{'FLOPs/token':>13}{'steps':>8}"
          f"{'last_sq_error (mean)':>22}{'per seed':>28}")
    by: dict[str, list[dict]] = {}
    for r in rows:
        by.setdefault(r["model"], []).append(r)
    for name in MODELS:
        rs = sorted(by.get(name, []), key=lambda r: r["seed"])
        if not rs:
            continue
        errs = [r["metric"] for r in rs]
        print(f"{name:<16}{len(rs):>6}{rs[0]['flops_per_token']:>13,.0f}"
              f"{int(statistics.mean(r['steps'] for r in rs)):>8}"
              f"{statistics.mean(errs):>22.3f}{'  '.join(f'{e:.3f}' for e in errs):>28}")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = dict(zip(MODELS, ["tab:blue", "tab:gray", "tab:red", "tab:green"], strict=True))
    for name in MODELS:
        for i, r in enumerate(sorted(by.get(name, []), key=lambda r: r["seed"])):
            xs = [c["flops"] for c in r["curve"]]
            ys = [c["metric"] for c in r["curve"]]
            ax.plot(xs, ys, color=colors[name], alpha=0.8, label=name if i == 0 else None)
    ax.set_xlabel("training FLOPs (non-embedding)")
    ax.set_ylabel("squared error at the last point")
    ax.set_title("In-context regression, d=16, D=64: equal-compute comparison")
    ax.set_ylim(0, 1.2)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(OUT / "icl_evidence.png", dpi=120)
    print(f"plot: {OUT / 'icl_evidence.png'}")


if __name__ == "__main__":
    sys.exit(main())

"""Evidence: MLR attention against standard and sliding-window attention on byte-level text.

Equal training FLOPs, small (CPU scale): width 64, depth 2, 4 heads, 128-byte contexts on the
embedded corpus. MLR uses ranks [8, 4, 2, 2] over block sizes (128, 64, 32, 16); sliding window
w=32. Each model trains for the steps the budget buys at its own cost (one thread each, two
runs at a time); prints validation bits per byte and saves the curves to
benchmarks/out/text_evidence.png.

    python benchmarks/text_evidence.py --budget 1e12 --seeds 0
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
MODELS = {
    "standard": {"kind": "standard", "heads": 4},
    "mlr": {"kind": "mlr", "heads": 4, "ranks": [8, 4, 2, 2]},
    "sliding_window": {"kind": "sliding_window", "heads": 4, "window": 32},
}


def run_one(job: tuple[str, int, float]) -> dict:
    name, seed, budget = job
    import torch

    torch.set_num_threads(1)
    from mlbtc_search.model import ModelSpec
    from trainers.tasks import get_task
    from trainers.train import TrainConfig, train

    task = get_task("text", seq_len=128)
    spec = ModelSpec.from_dict({"width": 64, "depth": 2, "attention": MODELS[name],
                                "max_seq_len": 128})
    t0 = time.time()
    res = train(spec, task, budget, seed=seed,
                config=TrainConfig(lr=3e-3, batch_size=32, eval_batches=16))
    return {"model": name, "seed": seed, "budget": budget, "status": res.status,
            "bits_per_byte": res.metric, "val_loss": res.val_loss, "steps": res.steps,
            "flops_per_token": res.flops_per_token, "seconds": time.time() - t0,
            "curve": [{"flops": c["flops"], "metric": c["metric"]} for c in res.curve
                      if c.get("metric") is not None]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=float, default=1e12)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--procs", type=int, default=2)
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    jobs = [(m, s, args.budget) for s in args.seeds for m in MODELS]
    with mp.get_context("spawn").Pool(args.procs) as pool:
        rows = list(pool.imap(run_one, jobs))
    (OUT / "text_evidence.json").write_text(json.dumps(rows, indent=1))
    print(f"byte-level LM, embedded corpus, T=128, width 64, depth 2, 4 heads, "
          f"budget {args.budget:.2g} training FLOPs")
    print(f"{'model':<16}{'seed':>5}{'FLOPs/token':>13}{'steps':>7}{'val bits/byte':>15}"
          f"{'seconds':>9}")
    for r in rows:
        print(f"{r['model']:<16}{r['seed']:>5}{r['flops_per_token']:>13,.0f}{r['steps']:>7}"
              f"{r['bits_per_byte']:>15.3f}{r['seconds']:>9.0f}")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        ax.plot([c["flops"] for c in r["curve"]], [c["metric"] for c in r["curve"]],
                label=f"{r['model']} (seed {r['seed']})")
    ax.set_xlabel("training FLOPs (non-embedding)")
    ax.set_ylabel("validation bits per byte")
    ax.set_title("Byte-level LM at equal compute")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(OUT / "text_evidence.png", dpi=120)
    print(f"plot: {OUT / 'text_evidence.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

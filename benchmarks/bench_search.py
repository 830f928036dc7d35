"""Search-runner overhead and parallel speed-up on local Ray, measured in one run.

    python benchmarks/bench_search.py [--trials 16] [--batch 8] [--budget 2e9] [--cpus 2]

(a) Overhead per trial: a 1-worker search of ``--trials`` trivially small trials (width 16, one
    layer, a 2e7-FLOP budget). Per trial: the driver's wall time from handing the trial to Ray
    to having recorded it (``wall_s``) minus the training time measured inside ``train``
    (``duration_s``); the table gives the median. Aggregate: (search wall time - sum of training
    seconds) / trials, where the search wall time runs from the first submitted trial to the last
    recorded one (Ray start-up is reported on its own line).
(b) Parallel speed-up: the same batch of ``--batch`` equal trials (one architecture, eight
    learning rates: equal cost, distinct trials) with 1 and then 2 workers; wall time of each and
    the ratio. "workers busy" = sum of training seconds / (workers x wall): the share of the
    wall time the workers spent training, i.e. the runner's efficiency whatever the machine
    does. When other processes load the CPUs, two concurrent trainings each slow down (compare
    the train s/trial of the two lines) and the ratio says more about the machine than about
    the runner; "of a core" (CPU seconds / wall seconds of each training) shows how much CPU
    the trials actually got.

All searches share one Ray session whose worker processes are warmed up first (torch imported),
as in any search longer than a few trials. Each search writes a fresh SQLite study in a temp dir.
The machine's load average is printed: on a shared 2-core box the numbers move with it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import optuna
import yaml

from studies.runner import SearchOutcome, run_search
from studies.space import load_space

LRS = [1e-3, 1.5e-3, 2e-3, 2.5e-3, 3e-3, 3.5e-3, 4e-3, 4.5e-3]


def space_dict(name: str, trials: int, workers: int, budget: float, width: int,
               equal: bool) -> dict[str, Any]:
    space: dict[str, Any] = {
        "name": name,
        "task": {"name": "icl_regression", "options": {"n_dims": 4, "n_points": 8}},
        "budget": budget, "trials": trials, "workers": workers,
        "sampler": {"name": "random", "seed": 0},
        "train": {"batch_size": 16, "eval_batches": 2},
        "space": {"width": width, "depth": 1, "mlp_ratio": 2,
                  "attention": {"kind": "standard", "heads": 2}},
    }
    if equal:  # one architecture, distinct learning rates: equal cost per trial
        space["space"]["train.lr"] = {"choice": LRS}
        space["baselines"] = [{"train.lr": lr} for lr in LRS]
    else:  # many cheap distinct trials: learning rate from a continuum
        space["space"]["train.lr"] = {"float": [1e-4, 1e-2], "log": True}
    return space


def search(tmp: Path, name: str, **kwargs: Any) -> tuple[SearchOutcome, list]:
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(space_dict(name, **kwargs), sort_keys=False))
    url = f"sqlite:///{tmp}/{name}.db"
    outcome = run_search(load_space(path, {"storage": url}))
    study = optuna.load_study(study_name=name, storage=url)
    return outcome, [t for t in study.get_trials(deepcopy=False) if "duration_s" in t.user_attrs]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=16, help="trials for (a)")
    parser.add_argument("--batch", type=int, default=8, choices=range(2, 9), metavar="2..8",
                        help="equal trials for (b)")
    parser.add_argument("--budget", type=float, default=2e9, help="FLOPs per trial for (b)")
    parser.add_argument("--width", type=int, default=32, help="model width for (b)")
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray")
    args = parser.parse_args(argv)

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    import ray

    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False,
             logging_level="WARNING")
    ray_start = time.perf_counter() - start
    rows: list[tuple[str, str]] = [("Ray start-up (ray.init)", f"{ray_start:.2f} s")]
    try:
        with tempfile.TemporaryDirectory(prefix="bench-search-") as d:
            tmp = Path(d)
            warm, _ = search(tmp, "warmup", trials=2, workers=2, budget=2e7, width=16,
                             equal=False)
            rows.append(("warm-up search (2 trials, 2 workers, cold workers)",
                         f"{warm.wall_s:.2f} s"))

            a, trials_a = search(tmp, "overhead", trials=args.trials, workers=1, budget=2e7,
                                 width=16, equal=False)
            per_trial = [t.user_attrs["wall_s"] - t.user_attrs["duration_s"] for t in trials_a]
            train_sum = sum(t.user_attrs["duration_s"] for t in trials_a)
            n = len(trials_a)
            rows += [
                ("(a) trials trained (1 worker)", f"{n}"),
                ("(a) mean training time per trial", f"{train_sum / n:.3f} s"),
                ("(a) median overhead per trial (wall_s - duration_s)",
                 f"{statistics.median(per_trial) * 1e3:.0f} ms"),
                ("(a) aggregate overhead: (search wall - sum train) / trials",
                 f"{(a.wall_s - train_sum) / n * 1e3:.0f} ms"),
            ]

            walls = {}
            for workers in (1, 2):
                out, ts = search(tmp, f"batch{workers}", trials=args.batch, workers=workers,
                                 budget=args.budget, width=args.width, equal=True)
                walls[workers] = out.wall_s
                train = [t.user_attrs["duration_s"] for t in ts]
                share = sum(t.user_attrs["cpu_s"] for t in ts) / sum(train)
                busy = sum(train) / (workers * out.wall_s)
                rows.append((f"(b) {args.batch} equal trials, {workers} worker(s): wall",
                             f"{out.wall_s:.2f} s (train {statistics.mean(train):.2f} s/trial "
                             f"at {share:.0%} of a core; workers busy {busy:.0%})"))
            rows.append(("(b) speed-up 2 workers vs 1", f"{walls[1] / walls[2]:.2f}x"))
    finally:
        ray.shutdown()
    rows.append(("load average (1 min) before / after",
                 f"{load_before:.2f} / {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs"))
    width = max(len(k) for k, _ in rows)
    print(f"{'measure'.ljust(width)}  value")
    print(f"{'-' * width}  -----")
    for k, v in rows:
        print(f"{k.ljust(width)}  {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

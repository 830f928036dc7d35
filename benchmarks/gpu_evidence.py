"""Device evidence for issue 13, one resumable script: throughput, ICL, rediscovery, language.

Phases (``--phases``, in this order by default; each with its own time limit):

- ``throughput``: trials/hour and achieved model FLOP/s for in-context regression trials (the
  ICL space's five baseline architectures, cycled) on one GPU with 1, 4 and 8 concurrent trials,
  against the same trials on 2 CPU cores (2 processes pinned to cores 0 and 1, one thread each).
  Every trial is a new process (as Ray runs GPU trials), so process start-up is included.
- ``icl``: the paper's in-context regression at equal training FLOPs: d=16, width 64, depth 3;
  8-head standard (head dim 8 < d), 1-head standard, bilinear BTT, bilinear MLR, MLR over the
  sequence; with the curriculum; 2 seeds; a budget that buys the costliest model ~20k steps.
- ``rediscovery``: ``mlbtc search`` of ``search_spaces/mlbtc_icl.yaml`` (or, when that file is
  not there, ``search_spaces/icl_regression.yaml``, and the summary says so) with trials packed
  on the GPU (``resources.gpus = 1/workers``); the front, and whether low loss goes with a global
  bilinear form of rank >= d.
- ``language``: byte-level LM on the ``stdlib`` corpus (trainers/tasks/corpus.py, ~31 MB): MLR
  over the sequence vs standard vs sliding-window attention at 3 budgets, 2 seeds.

Each training run is its own subprocess with a timeout; its result is appended to
``OUT/results.jsonl`` as soon as it finishes, and a rerun skips every key already there (runs that
timed out are skipped too unless ``--retry-failed``). At the end ``OUT/summary.md`` gets the tables
and ``OUT/*.png`` the plots (benchmarks/gpu_evidence_report.py). The plan, with a time estimate
per phase from FLOPs and a conservative step time, is printed first; ``--scale`` multiplies every
budget, ``--plan`` only prints the plan. Sized to fit ~12 minutes of one H200 at ``--scale 1``.

    python benchmarks/gpu_evidence.py                      # on the device: everything
    python benchmarks/gpu_evidence.py --phases icl --scale 0.5
    python benchmarks/gpu_evidence.py --smoke              # CPU, tiny, proves the plumbing
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PHASES = ("throughput", "icl", "rediscovery", "language")
# Conservative guesses for the plan (the GPU step time is replaced by the throughput phase's
# measurement when there). A small model's step is ~350 kernels: one process is bound by their
# launch cost on the CPU (STEP_FLOOR_S), concurrent processes together by their run time on the
# GPU, which executes one process's kernels at a time (STEP_GPU_S per step, shared by all), or by
# FLOPs for bigger steps (AGGREGATE FLOP/s over all processes).
STEP_FLOOR_S = {"cuda": 0.006, "cpu": 0.0}
STEP_GPU_S = {"cuda": 0.002, "cpu": 0.0}
ACHIEVED = {"cuda": 2e12, "cpu": 8e9}  # model FLOP/s of one process (CPU: one thread)
AGGREGATE = {"cuda": 3e13, "cpu": 1.6e10}  # all processes together (CPU: 2 cores)
START_S = {"cuda": 12.0, "cpu": 6.0}  # process start: python, torch import, CUDA context


@dataclass
class Job:
    key: str
    phase: str
    spec: dict[str, Any]
    task: dict[str, Any]
    budget: float
    seed: int = 0
    train: dict[str, Any] = field(default_factory=dict)
    label: str = ""
    cpus: list[int] | None = None  # pin the process to these cores (the 2-core CPU baseline)


@dataclass
class Group:
    """Jobs run ``concurrency`` at a time; ``key`` set: one timed group (throughput)."""

    phase: str
    jobs: list[Job]
    concurrency: int
    timeout_s: float
    key: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)


# ---- models -------------------------------------------------------------------------------
def icl_models(width: int, depth: int, heads: int, seq_len: int) -> dict[str, dict]:
    """The paper's ICL structures at one width; MLR ranks split the head dim 1/2, 1/4, 1/8, 1/8."""
    hd = width // heads
    ranks = [hd // 2, hd // 4, hd // 8, hd // 8]
    base = {"width": width, "depth": depth, "mlp": {"dense": {}}, "mlp_ratio": 4,
            "max_seq_len": seq_len}
    return {
        "standard_8head": {**base, "attention": {"kind": "standard", "heads": heads}},
        "standard_1head": {**base, "attention": {"kind": "standard", "heads": 1}},
        "bilinear_btt": {**base, "attention": {"kind": "bilinear_btt", "heads": heads,
                                               "rank": 1}},
        "bilinear_mlr": {**base, "attention": {"kind": "bilinear_mlr", "heads": heads,
                                               "ranks": ranks}},
        "mlr_sequence": {**base, "attention": {"kind": "mlr", "heads": heads, "ranks": ranks}},
    }


def text_models(width: int, depth: int, heads: int, seq_len: int, window: int) -> dict[str, dict]:
    hd = width // heads
    base = {"width": width, "depth": depth, "mlp": {"dense": {}}, "mlp_ratio": 4,
            "max_seq_len": seq_len}
    return {
        "standard": {**base, "attention": {"kind": "standard", "heads": heads}},
        "mlr_sequence": {**base, "attention": {"kind": "mlr", "heads": heads,
                                               "ranks": [hd // 2, hd // 4, hd // 8, hd // 8]}},
        "sliding_window": {**base, "attention": {"kind": "sliding_window", "heads": heads,
                                                 "window": window}},
    }


# ---- the plan -----------------------------------------------------------------------------
def sizes(smoke: bool) -> dict[str, Any]:
    if smoke:
        return {"d": 4, "width": 16, "depth": 1, "heads": 2, "icl_budget": 3e8, "seeds": [0],
                "icl_interval": 10, "tp_budget": 1e8, "tp_counts": {1: 1, 2: 2}, "cpu_trials": 2,
                "text": dict(width=16, depth=1, heads=2, seq_len=32, window=8, batch=8),
                "text_budgets": [5e7, 1.5e8], "text_seeds": [0], "corpus": "pydoc",
                "search": {"trials": 3, "workers": 1, "budget": 5e8}}
    return {"d": 16, "width": 64, "depth": 3, "heads": 8, "icl_budget": 6e13, "seeds": [0, 1],
            "icl_interval": 200, "tp_budget": 3e11, "tp_counts": {1: 2, 4: 4, 8: 8},
            "cpu_trials": 2,
            "text": dict(width=128, depth=4, heads=4, seq_len=256, window=64, batch=32),
            "text_budgets": [3e13, 1e14, 3e14], "text_seeds": [0, 1], "corpus": "stdlib",
            "search": {"trials": 24, "workers": 8, "budget": 2e12}}


def make_plan(args: argparse.Namespace) -> list[Group]:
    s, dev, scale = sizes(args.smoke), args.device, args.scale
    d, T = s["d"], 4 * s["d"]
    icl_task = {"name": "icl_regression", "options": {"n_dims": d, "curriculum_interval":
                                                      s["icl_interval"]}}
    models = icl_models(s["width"], s["depth"], s["heads"], T)
    groups: list[Group] = []
    if "throughput" in args.phases:
        names = list(models)
        for c, n in s["tp_counts"].items():
            jobs = [Job(f"throughput/{dev}-c{c}/{i}", "throughput", models[names[i % 5]],
                        icl_task, s["tp_budget"], train={"device": dev, "threads": 1},
                        label=names[i % 5]) for i in range(n)]
            groups.append(Group("throughput", jobs, c, 240, key=f"throughput/{dev}-c{c}",
                                meta={"device": dev, "concurrency": c}))
        jobs = [Job(f"throughput/cpu2/{i}", "throughput", models[names[i % 5]], icl_task,
                    s["tp_budget"], train={"device": "cpu", "threads": 1},
                    label=names[i % 5], cpus=[i % 2]) for i in range(s["cpu_trials"])]
        groups.append(Group("throughput", jobs, 2, 240, key="throughput/cpu2",
                            meta={"device": "cpu (2 cores)", "concurrency": 2}))
    if "icl" in args.phases:
        b = s["icl_budget"] * scale
        jobs = [Job(f"icl/{name}/b{b:.3g}/s{seed}", "icl", spec, icl_task, b, seed,
                    {"device": dev, "lr": 1e-3, "batch_size": 64, "eval_batches": 16,
                     "threads": 1}, label=name)
                for seed in s["seeds"] for name, spec in models.items()]
        groups.append(Group("icl", jobs, len(jobs), 330))
    if "rediscovery" in args.phases:
        key = f"rediscovery/b{s['search']['budget'] * scale:.3g}"
        groups.append(Group("rediscovery", [], 1, 200, key=key,
                            meta={**s["search"], "budget": s["search"]["budget"] * scale}))
    if "language" in args.phases:
        t = s["text"]
        task = {"name": "text", "options": {"seq_len": t["seq_len"], "corpus": s["corpus"]}}
        lm = text_models(t["width"], t["depth"], t["heads"], t["seq_len"], t["window"])
        jobs = [Job(f"language/{name}/b{b * scale:.3g}/s{seed}", "language", spec, task, b * scale,
                    seed, {"device": dev, "lr": 3e-3, "batch_size": t["batch"],
                           "eval_batches": 16, "threads": 1}, label=name)
                for b in s["text_budgets"] for seed in s["text_seeds"]
                for name, spec in lm.items()]
        groups.append(Group("language", jobs, min(len(jobs), 9), 200))
    return groups


def job_steps(job: Job) -> tuple[float, float]:
    """``(steps, FLOPs per step)`` of a job at the task's full sequence length."""
    from mlbtc_search.model import ModelSpec, model_flops
    from trainers.tasks import get_task

    task = get_task(job.task["name"], **job.task["options"])
    spec = ModelSpec.from_dict(job.spec, seq_len=task.adapter.seq_len)
    T, batch = task.adapter.seq_len, job.train.get("batch_size", 64)
    per_step = 3 * model_flops(spec, T) * batch * T
    return job.budget / per_step, per_step  # the curriculum only makes early steps cheaper


def search_stack() -> bool:
    """Whether ``mlbtc search`` can run here (the GPU image may hold torch alone)."""
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in ("optuna", "ray", "sqlalchemy"))


def group_estimate_s(g: Group, device: str, step_gpu_s: float | None) -> float:
    """Seconds a group should take: the slowest of (one process's launch-bound time, the GPU's
    serial kernel time of all steps, FLOPs at the aggregate rate), plus process starts."""
    dev = "cuda" if device.startswith("cuda") else "cpu"
    if g.phase == "rediscovery":
        if not search_stack():
            return 0.0  # recorded as skipped at once
        m = g.meta
        steps = m["trials"] * m["budget"] / 4e9  # ~4e9 FLOPs per step in the ICL space
        waves = -(-m["trials"] // m["workers"])
        return 20 + waves * START_S[dev] + steps * max(
            STEP_FLOOR_S[dev] / m["workers"], step_gpu_s or STEP_GPU_S[dev], 4e9 / AGGREGATE[dev])
    if g.key == "throughput/cpu2":
        dev = "cpu"
    shapes = [job_steps(j) for j in g.jobs]
    alone = max(n * max(STEP_FLOOR_S[dev], f / ACHIEVED[dev]) for n, f in shapes)
    shared = sum(n * max(step_gpu_s or STEP_GPU_S[dev], f / AGGREGATE[dev]) for n, f in shapes)
    waves = -(-len(shapes) // max(1, g.concurrency))
    return max(alone, shared) + waves * START_S[dev]


# ---- running ------------------------------------------------------------------------------
def load_results(log: Path) -> dict[str, dict]:
    if not log.exists():
        return {}
    rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    return {r["key"]: r for r in rows}


def append(log: Path, row: dict) -> None:
    with log.open("a") as f:
        f.write(json.dumps(row, allow_nan=False, default=str) + "\n")


CHILDREN: set[subprocess.Popen] = set()
LOGS = ROOT / "benchmarks" / "out" / "gpu_evidence_logs"  # set under --out by main
STOP_AT = math.inf  # time.monotonic() at which everything stops (--stop-after)


def spawn(cmd: list[str], log: Path) -> subprocess.Popen:
    """Start ``cmd`` in its own session, stdout/stderr to ``log.out``/``log.err``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{log}.out", "w") as out, open(f"{log}.err", "w") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, cwd=ROOT, start_new_session=True,
                                env={**os.environ, "PYTHONPATH": str(ROOT),
                                     "RAY_AUTH_MODE": "disabled"})
    proc.args_log = str(log)  # type: ignore[attr-defined]
    CHILDREN.add(proc)
    return proc


def kill(proc: subprocess.Popen) -> None:
    """Kill ``proc`` and everything it started (its session)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
    CHILDREN.discard(proc)


def run_jobs(jobs: list[Job], concurrency: int, timeout_s: float, deadline: float,
             log: Path | None) -> list[dict]:
    """Run ``jobs`` as subprocesses, ``concurrency`` at a time; each result is appended to
    ``log`` as it arrives. A job past ``timeout_s`` is killed and recorded as ``timeout``; jobs
    still running at ``deadline`` (the phase's limit) are killed and, like those not started,
    left for a rerun."""
    todo, running, out = list(jobs), {}, []
    while todo or running:
        while todo and len(running) < concurrency and time.monotonic() < deadline:
            job = todo.pop(0)
            cmd = [sys.executable, str(Path(__file__).resolve()), "--job",
                   json.dumps(job.__dict__)]
            proc = spawn(cmd, LOGS / job.key.replace("/", "_"))
            running[proc] = (job, time.monotonic())
        if not running:
            break
        time.sleep(0.1)
        for proc, (job, t0) in list(running.items()):
            wall = time.monotonic() - t0
            cut = time.monotonic() >= deadline
            if proc.poll() is None and wall < timeout_s and not cut:
                continue
            if proc.poll() is None:
                kill(proc)
                if cut and wall < timeout_s:  # the phase ran out: not this job's fault
                    del running[proc]
                    print(f"  {job.key}: cut at the phase limit (left for a rerun)",
                          file=sys.stderr, flush=True)
                    continue
                row = {"status": "timeout", "reason": f"killed after {timeout_s:.0f} s"}
            else:
                CHILDREN.discard(proc)
                stdout, stderr = (Path(f"{proc.args_log}.{x}").read_text() for x in ("out", "err"))
                lines = [ln for ln in stdout.splitlines() if ln.startswith("{")]
                row = (json.loads(lines[-1]) if lines and proc.returncode == 0 else
                       {"status": "error", "reason": (stderr.strip().splitlines() or ["?"])[-1]})
            row = {"key": job.key, "phase": job.phase, "label": job.label, "seed": job.seed,
                   "budget": job.budget, "wall_s": wall, "t_start": t0, "t_end": time.monotonic(),
                   **row}
            del running[proc]
            out.append(row)
            if log is not None:
                append(log, row)
            print(f"  {job.key}: {row['status']} {row.get('metric', '')} ({wall:.0f} s)",
                  file=sys.stderr, flush=True)
    return out


def run_job(job: dict) -> dict:
    """The child: train one job, return its result row (one JSON line on stdout)."""
    t0 = time.time()
    pinned = None
    if job.get("cpus") and hasattr(os, "sched_setaffinity"):
        try:
            os.sched_setaffinity(0, set(job["cpus"]))
            pinned = sorted(os.sched_getaffinity(0))
        except OSError:  # a sandbox may refuse: the row says it ran unpinned
            pinned = None
    import torch

    from mlbtc_search.model import ModelSpec
    from trainers.tasks import get_task
    from trainers.train import StepCosts, TrainConfig, resolve_spec, train

    torch.set_num_threads(int(job["train"].get("threads") or 1))
    task = get_task(job["task"]["name"], **job["task"]["options"])
    spec = resolve_spec(ModelSpec.from_dict(job["spec"], seq_len=task.adapter.seq_len), task)
    config = TrainConfig(**job["train"])
    steps, _ = StepCosts(spec, task, config.batch_size).plan(job["budget"])
    config = TrainConfig(**{**job["train"], "eval_every": max(1, steps // 25)})  # ~25 points
    t1 = time.time()
    res = train(spec, task, job["budget"], seed=job["seed"], config=config)
    device = next(res.model.parameters()).device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {"status": res.status, "reason": res.reason, "metric": res.metric,
            "metric_name": res.metric_name, "val_loss": res.val_loss, "steps": res.steps,
            "train_flops": res.train_flops, "flops_per_token": res.flops_per_token,
            "params": res.params, "train_s": res.seconds, "start_s": t1 - t0,
            "device": name, "spec": spec.to_dict(), "task": job["task"], "pinned": pinned,
            "curve": [{k: c.get(k) for k in ("step", "flops", "metric", "val_loss")}
                      for c in res.curve if c.get("metric") is not None]}


# ---- main ---------------------------------------------------------------------------------
def measured_step_s(results: dict[str, dict], device: str) -> float | None:
    """GPU seconds per step shared by concurrent processes, from the throughput phase's group of
    8: (its wall time less the mean process start) / (all its steps)."""
    group = results.get(f"throughput/{device}-c8")
    rows = [r for k, r in results.items()
            if k.startswith(f"throughput/{device}-c8/") and r.get("status") == "ok"]
    if not group or not rows:
        return None
    start = sum(r["start_s"] for r in rows) / len(rows)
    return max(1e-4, group["wall_s"] - start) / sum(r["steps"] for r in rows)


def print_plan(groups: list[Group], args: argparse.Namespace, step_s: float | None) -> float:
    src = f"measured {step_s * 1e3:.2f} ms" if step_s else "a conservative guess"
    print(f"plan (device {args.device}, scale {args.scale:g}, shared GPU time per step from "
          f"{src}):")
    total = 0.0
    for g in groups:
        est = group_estimate_s(g, args.device, step_s)
        total += est
        what = g.key or f"{len(g.jobs)} runs, {g.concurrency} at a time"
        budgets = sorted({j.budget for j in g.jobs}) or [g.meta.get("budget")]
        print(f"  {g.phase:<12} {what:<34} budgets {', '.join(f'{b:.2g}' for b in budgets)}"
              f"  ~{est / 60:.1f} min (limit {g.timeout_s / 60:.1f} min)")
    print(f"  total ~{total / 60:.1f} min")
    return total


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--job", help=argparse.SUPPRESS)
    ap.add_argument("--phases", nargs="+", choices=PHASES, default=list(PHASES))
    ap.add_argument("--scale", type=float, default=1.0,
                    help="multiplies the budgets of the icl, rediscovery and language phases")
    ap.add_argument("--fit", type=float, metavar="MINUTES",
                    help="lower --scale until the plan's estimate fits MINUTES (re-fitted with "
                         "the measured step time once the throughput phase has run)")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU, one seed")
    ap.add_argument("--device", help="cuda (default) or cpu (default with --smoke)")
    ap.add_argument("--out", type=Path, help="results directory (default "
                    "benchmarks/results/gpu_evidence, or benchmarks/out/gpu_evidence_smoke)")
    ap.add_argument("--plan", action="store_true", help="print the plan and stop")
    ap.add_argument("--stop-after", type=float, metavar="MINUTES",
                    help="stop everything after MINUTES (runs cut short are left for a rerun) "
                         "and write the summary; use it under a command time limit")
    ap.add_argument("--retry-failed", action="store_true", help="rerun timed-out/failed runs")
    args = ap.parse_args(argv)
    if args.job:
        print(json.dumps(run_job(json.loads(args.job)), allow_nan=False, default=str))
        return 0
    args.device = args.device or ("cpu" if args.smoke else "cuda")
    args.scale0 = args.scale
    global LOGS, STOP_AT
    if args.stop_after:
        STOP_AT = time.monotonic() + 60 * args.stop_after
    signal.signal(signal.SIGTERM, _terminate)
    try:
        return _main(args)
    finally:
        for proc in list(CHILDREN):  # never leave training processes behind
            kill(proc)


def _terminate(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def _main(args: argparse.Namespace) -> int:
    global LOGS
    out = args.out or ROOT / "benchmarks" / ("out/gpu_evidence_smoke" if args.smoke
                                             else "results/gpu_evidence")
    out.mkdir(parents=True, exist_ok=True)
    LOGS = out / "logs"
    log = out / "results.jsonl"
    results = load_results(log)
    if args.retry_failed:
        results = {k: r for k, r in results.items() if r.get("status") == "ok"}
    fit_s = args.fit * 60 if args.fit else None
    groups = fit_plan(args, results, fit_s)
    print_plan(groups, args, measured_step_s(results, args.device))
    if args.plan:
        return 0
    t0 = time.monotonic()
    run_groups([g for g in groups if g.phase == "throughput"], args, out, log, results)
    rest = [p for p in args.phases if p != "throughput"]
    if rest:
        results = load_results(log)
        if fit_s is not None and "throughput" in args.phases:  # re-fit with the measurement
            groups = fit_plan(args, results, fit_s - (time.monotonic() - t0), rest)
            print_plan(groups, args, measured_step_s(results, args.device))
        run_groups([g for g in groups if g.phase != "throughput"], args, out, log, results)
    from gpu_evidence_report import report

    print(report(load_results(log), out, args))
    return 0


def done(g: Group, results: dict[str, dict]) -> bool:
    return (g.key in results) if g.key else all(j.key in results for j in g.jobs)


def fit_plan(args: argparse.Namespace, results: dict[str, dict], seconds: float | None,
             phases: list[str] | None = None) -> list[Group]:
    """The plan of ``phases``; with ``seconds``, ``args.scale`` (at most ``--scale``) is set to
    the largest value whose estimate for the groups not yet done fits in ``seconds``."""
    step = measured_step_s(results, args.device)

    def plan(scale: float) -> list[Group]:
        return make_plan(argparse.Namespace(**{**vars(args), "scale": scale,
                                               "phases": phases or args.phases}))

    def estimate(groups: list[Group]) -> float:
        return sum(group_estimate_s(g, args.device, step) for g in groups if not done(g, results))

    top = args.scale0
    if seconds is None or estimate(plan(top)) <= seconds:
        args.scale = top
        return plan(top)
    lo, hi = 0.01, top
    for _ in range(14):
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if estimate(plan(mid)) <= seconds else (lo, mid)
    lo = float(f"{lo * 0.999:.2g}")  # two digits, rounded down: budgets read well in keys
    args.scale = lo
    print(f"--fit: scale {lo:.3g} fits {seconds / 60:.1f} min", file=sys.stderr)
    return plan(lo)


def run_groups(groups: list[Group], args: argparse.Namespace, out: Path, log: Path,
               results: dict[str, dict]) -> None:
    step = measured_step_s(results, args.device)
    for g in groups:
        if done(g, results):
            continue
        g.timeout_s = max(g.timeout_s, 1.5 * group_estimate_s(g, args.device, step))
        deadline = min(time.monotonic() + g.timeout_s, STOP_AT)
        if time.monotonic() >= STOP_AT:
            print(f"{g.phase}: not started (--stop-after)", file=sys.stderr)
            continue
        if g.phase == "rediscovery":
            from gpu_evidence_report import run_rediscovery

            row = run_rediscovery(g.meta, args, out, deadline - time.monotonic(), spawn, kill)
            if row["status"] == "ok":  # otherwise a rerun resumes the study
                append(log, {"key": g.key, "phase": g.phase, **row})
            else:
                append(log, {"key": f"{g.key}/partial-{int(time.time())}", "phase": g.phase,
                             **row})
            continue
        if g.key is not None:  # a timed group: all of it or nothing
            t0 = time.monotonic()
            rows = run_jobs(g.jobs, g.concurrency, g.timeout_s, deadline, None)
            wall = time.monotonic() - t0
            for r in rows:
                append(log, r)
            ok = [r for r in rows if r["status"] == "ok"]
            append(log, {"key": g.key, "phase": g.phase, **g.meta, "trials": len(rows),
                         "ok": len(ok), "wall_s": wall,
                         "train_flops": sum(r["train_flops"] for r in ok),
                         "status": "ok" if len(ok) == len(g.jobs) else "partial"})
            continue
        todo = [j for j in g.jobs if j.key not in results]
        print(f"{g.phase}: {len(todo)} of {len(g.jobs)} runs to do", file=sys.stderr)
        run_jobs(todo, g.concurrency, g.timeout_s, deadline, log)


if __name__ == "__main__":
    sys.exit(main())

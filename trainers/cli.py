"""``mlbtc train MODEL.yaml --budget 1e12``: train one model spec under a FLOP budget.

The task is ``--task``, else the file's ``task: {name, options}`` (exported architectures carry
it), else ``icl_regression``; ``--task-option KEY=VALUE`` values are read as YAML scalars
(``n_dims=16`` is an int) and override the file's options (which apply only when the task is the
file's). Progress goes to stderr, throttled, unless ``--quiet``; the last stdout line is one JSON
object with the results. ``--out DIR`` (new or empty) receives ``architecture.yaml`` (the spec
with its adapter and task: ``ModelSpec.from_dict`` of it rebuilds the model),
``model.safetensors``, ``metrics.json`` and ``curve.csv``; it is checked first and created only
after the run (a refused budget leaves nothing behind). Without ``--out`` nothing is saved, and the
last stderr line says so (unless ``--quiet``).

Exit codes: 0 trained, 1 training failed (status ``nan`` or ``diverged``, see ``reason``),
2 bad input (one stderr line), 130 interrupted (the JSON line still reports what was done).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mlbtc_search.checks import check_new_dir
from mlbtc_search.errors import SpecError, UsageError
from mlbtc_search.model import AdapterSpec, ModelSpec
from mlbtc_search.yamlio import Located, dump_yaml, load_yaml, yaml_scalar

from .device import resolve_device
from .tasks import Task, get_task
from .train import TrainConfig, TrainResult
from .train import train as train_model

DEFAULT_TASK = "icl_regression"
CURVE_COLUMNS = ("step", "tokens", "flops", "train_loss", "lr", "val_loss", "metric")
EXIT_FAILED = 1
EXIT_INTERRUPTED = 130


def parse_task_options(pairs: list[str]) -> dict[str, Any]:
    """``["n_dims=16", "path=a.txt"]`` -> ``{"n_dims": 16, "path": "a.txt"}`` (YAML scalars)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UsageError(f"--task-option must look like KEY=VALUE (e.g. n_dims=16), "
                             f"got {pair!r}")
        out[key] = yaml_scalar(raw)
    return out


def resolve_task(args: argparse.Namespace, doc: Located) -> Task:
    """The task from the command line, else the file, else the default; errors located."""
    file_task = doc.data.get("task") if isinstance(doc.data, dict) else None
    if file_task is not None and not isinstance(file_task, dict):
        raise doc.locate(SpecError("task must be a mapping {name, options}", ("task",)))
    file_task = file_task or {}
    file_options = file_task.get("options") or {}
    if not isinstance(file_options, dict):
        raise doc.locate(SpecError("task options must be a mapping", ("task", "options")))
    name = args.task or file_task.get("name") or DEFAULT_TASK
    options = dict(file_options) if name == file_task.get("name") else {}
    cli_options = parse_task_options(args.task_option)
    options.update(cli_options)
    try:
        return get_task(name, **options)
    except SpecError as err:
        if err.path == ("name",):
            if args.task:
                raise SpecError(err.message, source="--task") from None
            raise doc.locate(err.prefixed(("task",))) from None
        if err.path and err.path[0] in cli_options:
            raise SpecError(err.message, err.path, source="--task-option") from None
        if err.path and err.path[0] in file_options:
            raise doc.locate(err.prefixed(("task", "options"))) from None
        raise


def check_out_dir(out: str | None) -> Path | None:
    """``out`` as a new or empty directory we can create (nothing is created yet), else a
    one-line UsageError."""
    return None if out is None else check_new_dir(out, "--out")


def write_outputs(out: Path, result: TrainResult) -> None:
    """architecture.yaml, model.safetensors, metrics.json and curve.csv in ``out`` (created
    now: only after the run, so a refused budget or a bad spec leaves no directory)."""
    from safetensors.torch import save_file

    check_new_dir(out, "--out")  # still free after the run?
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"--out {out} cannot be created: {exc.strerror or exc}") from None
    arch = result.spec.to_dict()
    arch["task"] = result.task
    (out / "architecture.yaml").write_text(dump_yaml(arch), encoding="utf-8")
    save_file(result.state_dict(), str(out / "model.safetensors"),
              metadata={"hash": result.hash, "family": result.family})
    (out / "metrics.json").write_text(
        json.dumps(result.to_json(), indent=2, allow_nan=False) + "\n", encoding="utf-8")
    with (out / "curve.csv").open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=CURVE_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in result.to_json()["curve"]:
            writer.writerow(row)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def progress_line(p: dict[str, Any]) -> str:
    """One human progress line: step/steps, loss, tokens/s, ETA (and the last eval)."""
    line = (f"step {p['step']}/{p['steps']}  loss {p['loss']:.4f}  "
            f"{p['tokens_per_s']:,.0f} tok/s  {p['flops']:.3g}/{p['budget_flops']:.3g} FLOPs  "
            f"ETA {_duration(p['eta_s'])}")
    if "val_loss" in p:
        line += f"  val_loss {p['val_loss']:.4f}  metric {p['metric']:.4g}"
    return line


def summary(result: TrainResult, out: Path | None) -> dict[str, Any]:
    """The JSON line: results without the curve and the config."""
    full = result.to_json()
    keys = ("status", "reason", "val_loss", "metric", "metric_name", "flops_per_token",
            "params", "steps", "tokens", "train_flops", "budget_flops", "seconds", "seed",
            "hash", "family", "task")
    line = {k: full[k] for k in keys}
    line["out"] = None if out is None else str(out)
    return line


@contextlib.contextmanager
def _answer_ctrl_c() -> Iterator[None]:
    """The first Ctrl-C says at once what happens (the run stops after the current step and
    evaluates the model once); a second one skips that evaluation."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def first(signum: int, frame: Any) -> None:
        sys.stderr.write("interrupted: stopping, then evaluating once (Ctrl-C again to skip "
                         "the evaluation)\n")
        sys.stderr.flush()
        signal.signal(signal.SIGINT, signal.default_int_handler)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, first)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def train(args: argparse.Namespace) -> int:
    """``mlbtc train``: see the module doc."""
    doc = load_yaml(args.model)
    if not isinstance(doc.data, dict):
        raise doc.locate(SpecError("a model spec must be a mapping (width, depth, attention, "
                                   "...)", ()))
    task = resolve_task(args, doc)
    a = task.adapter
    data = {k: v for k, v in doc.data.items() if k != "task"}  # the run records its own task
    try:
        spec = ModelSpec.from_dict(data, adapter=AdapterSpec(a.input_kind, a.input_dim,
                                                             a.output_dim), seq_len=a.seq_len)
    except SpecError as err:
        raise doc.locate(err) from None
    flags = (("lr", args.lr), ("batch_size", args.batch_size), ("device", args.device),
             ("autocast", args.autocast), ("compile", args.compile))
    overrides = {k: v for k, v in flags if v is not None}
    try:
        config = TrainConfig(**overrides)
    except SpecError as err:
        flag = f"--{str(err.path[0]).replace('_', '-')}" if err.path else None
        raise SpecError(err.message, source=flag) from None
    resolve_device(config.device)  # no CUDA for --device cuda: one line, exit 2, before training
    out = check_out_dir(args.out)

    shown = [-1]  # the last step shown: the final report repeats it when nothing changed

    def show(p: dict[str, Any]) -> None:
        if p["final"] and p["step"] == shown[0]:
            return
        shown[0] = p["step"]
        sys.stderr.write(progress_line(p) + "\n")
        sys.stderr.flush()

    try:
        with _answer_ctrl_c():
            result = train_model(spec, task, args.budget, seed=args.seed, config=config,
                                 progress=None if args.quiet else show)
    except SpecError as err:
        raise (doc.locate(err) if err.source is None else err) from None
    if out is not None:
        write_outputs(out, result)
    if not args.quiet:
        sys.stderr.write(f"{result.status}: {result.steps} steps, {result.train_flops:.3g} "
                         f"FLOPs, val_loss {result.val_loss:.4g}, {result.metric_name} "
                         f"{result.metric:.4g}, {result.seconds:.1f}s"
                         + (f" ({result.reason})" if result.reason else "") + "\n")
        sys.stderr.write(f"saved architecture.yaml, model.safetensors, metrics.json and "
                         f"curve.csv in {out}\n" if out is not None else
                         "nothing saved: give --out DIR to keep the architecture, weights and "
                         "metrics\n")
    sys.stdout.write(json.dumps(summary(result, out), allow_nan=False) + "\n")
    if result.status == "interrupted":
        return EXIT_INTERRUPTED
    return 0 if result.status == "ok" else EXIT_FAILED

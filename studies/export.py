"""``mlbtc export``: one trial of a study -> a self-contained directory the core alone can load.

The directory (see docs/export.md)::

    architecture.yaml    complete ModelSpec (adapter, max_seq_len) + ``task: {name, options}``
    model.safetensors    the trial's trained weights (the artifact ``weights_artifact_id``)
    metrics.json         val_loss, metric, FLOPs/token, params, budget, seed, hash, provenance
    README.md            a short model card: what it is, where it sits on the front, how to use it
    model.pt2            only with ``--format exported-program`` (torch.export)
    model.onnx           only with ``--format onnx`` (needs the onnx packages)

Everything is written into a temporary directory beside the target and renamed into place at the
end, so a failed export leaves nothing behind. Trials are chosen by number or by a pick:
``min-loss``, ``knee`` or a bound such as ``flops<=1e6`` (parsed, never evaluated).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import optuna
import torch
from optuna.trial import FrozenTrial, TrialState

from mlbtc_search.checks import check_new_dir
from mlbtc_search.errors import MlbtcError, SpecError, UsageError
from mlbtc_search.load import ARCHITECTURE, WEIGHTS, check_state_dict
from mlbtc_search.model import ModelSpec, build_model
from mlbtc_search.yamlio import dump_yaml, json_safe

FORMATS = ("safetensors", "exported-program", "onnx")
_BOUND = re.compile(r"^\s*(flops|params)\s*(<=|<)\s*([0-9][0-9_]*(?:\.[0-9_]*)?(?:e[+-]?[0-9]+)?)"
                    r"\s*$", re.IGNORECASE)
PICK_HELP = ("min-loss, knee, or a bound 'flops<=X', 'flops<X', 'params<=X', 'params<X' "
             "(X a number such as 2e6)")


# ---- choosing a trial ------------------------------------------------------------------------
def exportable(trial: FrozenTrial) -> bool:
    """A COMPLETE trial with a finite loss and FLOPs and a weights artifact."""
    return (trial.state == TrialState.COMPLETE and trial.values is not None
            and len(trial.values) >= 2 and "weights_artifact_id" in trial.user_attrs
            and all(math.isfinite(v) for v in trial.values[:2]))


def _cost(t: FrozenTrial) -> tuple[float, float]:
    """(val_loss, flops_per_token): the two objectives of the storage contract."""
    return float(t.values[0]), float(t.values[1])


def pareto_front(trials: Sequence[FrozenTrial]) -> list[FrozenTrial]:
    """The non-dominated trials (minimizing val_loss and FLOPs/token), cheapest first.

    Same front as ``mlbtc pareto`` and the dashboard (:func:`studies.pareto.pareto_front`).
    """
    from .pareto import pareto_front as front_indices

    front = [trials[i] for i in front_indices([_cost(t) for t in trials])]
    return sorted(front, key=lambda t: (_cost(t)[1], _cost(t)[0], t.number))


def knee(front: Sequence[FrozenTrial]) -> FrozenTrial:
    """The front point farthest below the chord joining the front's endpoints.

    Coordinates are x = log10(FLOPs/token) and y = val_loss, each rescaled to [0, 1] over the
    front so neither unit dominates. With fewer than three points, or when no point lies below
    the chord, there is no knee and the lowest-loss point is returned.
    """
    if not front:
        raise UsageError("the study has no COMPLETE trials with weights")
    best = min(front, key=lambda t: (_cost(t)[0], t.number))
    if len(front) < 3:
        return best
    xs = [math.log10(max(_cost(t)[1], 1e-300)) for t in front]
    ys = [_cost(t)[0] for t in front]
    sx, sy = (max(xs) - min(xs)) or 1.0, (max(ys) - min(ys)) or 1.0
    pts = [((x - min(xs)) / sx, (y - min(ys)) / sy) for x, y in zip(xs, ys, strict=True)]
    (x0, y0), (x1, y1) = pts[0], pts[-1]
    length = math.hypot(x1 - x0, y1 - y0) or 1.0
    # Signed distance, positive below the chord (towards lower loss at the same FLOPs).
    dist = [((x1 - x0) * (y0 - y) - (x0 - x) * (y1 - y0)) / length for x, y in pts]
    i = max(range(len(front)), key=lambda k: (dist[k], -k))
    return front[i] if dist[i] > 1e-12 else best


def parse_bound(pick: str) -> tuple[str, str, float]:
    """``"flops<=1e6"`` -> ``("flops", "<=", 1e6)``; anything else is a UsageError."""
    m = _BOUND.match(pick)
    if m is None:
        raise UsageError(f"--pick must be {PICK_HELP}; got {pick!r}")
    return m.group(1).lower(), m.group(2), float(m.group(3).replace("_", ""))


def pick_trial(study: optuna.Study, pick: str) -> FrozenTrial:
    """The exportable trial that ``pick`` selects (see :data:`PICK_HELP`)."""
    candidates = [t for t in study.get_trials(deepcopy=False) if exportable(t)]
    name = pick.strip().lower()
    if name not in ("min-loss", "knee"):
        key, op, bound = parse_bound(pick)  # validate before looking at the trials
    if not candidates:
        raise UsageError(f"study {study.study_name!r} has no COMPLETE trials with weights to "
                         "pick from")
    if name == "min-loss":
        return min(candidates, key=lambda t: (_cost(t)[0], t.number))
    if name == "knee":
        return knee(pareto_front(candidates))
    attr = "flops_per_token" if key == "flops" else "params"

    def value(t: FrozenTrial) -> float:
        return _cost(t)[1] if key == "flops" else float(t.user_attrs.get("params", math.inf))

    ok = [t for t in candidates if (value(t) <= bound if op == "<=" else value(t) < bound)]
    if not ok:
        low = min(value(t) for t in candidates)
        raise UsageError(f"no trial of study {study.study_name!r} has {attr} {op} {bound:g} "
                         f"(the smallest is {low:g}); raise the bound")
    return min(ok, key=lambda t: (_cost(t)[0], t.number))


def get_trial(study: optuna.Study, number: int) -> FrozenTrial:
    """Trial ``number``, which must be exportable (else a UsageError that says why not)."""
    trials = study.get_trials(deepcopy=False)
    found = [t for t in trials if t.number == number]
    if not found:
        raise UsageError(f"study {study.study_name!r} has no trial {number} (trials are "
                         f"numbered 0..{len(trials) - 1})" if trials else
                         f"study {study.study_name!r} has no trials")
    t = found[0]
    if t.state != TrialState.COMPLETE:
        status, reason = t.user_attrs.get("status"), t.user_attrs.get("reason")
        why = f"status {status}" if status else "no status"
        if reason:
            why += f": {reason}"
        if "duplicate_of" in t.user_attrs:
            why += f" (duplicate of trial {t.user_attrs['duplicate_of']})"
        raise UsageError(f"trial {number} of study {study.study_name!r} is {t.state.name}, not "
                         f"COMPLETE ({why}); only trained trials can be exported")
    if not exportable(t):
        raise UsageError(f"trial {number} of study {study.study_name!r} has no weights artifact "
                         f"(status {t.user_attrs.get('status')}); it cannot be exported")
    return t


# ---- writing the directory -------------------------------------------------------------------
def export_trial(study: optuna.Study, trial: FrozenTrial | int, out_dir: str | os.PathLike[str],
                 fmt: str = "safetensors") -> Path:
    """Export ``trial`` of ``study`` into ``out_dir`` (new or empty); returns its path."""
    if fmt not in FORMATS:
        raise UsageError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if fmt == "onnx":
        _check_onnx()
    t = get_trial(study, trial if isinstance(trial, int) else trial.number)
    out = Path(out_dir).expanduser().absolute()
    _check_target(out)
    info = study.user_attrs.get("mlbtc") or {}
    spec = _spec(t)
    task = _task(info, t)
    created: list[Path] = []
    try:
        created = _make_parents(out.parent)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.export-", dir=out.parent))
    except OSError as exc:
        for d in reversed(created):
            shutil.rmtree(d, ignore_errors=True)
        raise UsageError(f"cannot create a directory in {out.parent}: {exc.strerror or exc}"
                         ) from None
    try:
        weights = tmp / WEIGHTS
        _download_weights(study, t, weights)
        state = _verified_state(spec, weights)
        arch = {**spec.to_dict(), "task": task}
        (tmp / ARCHITECTURE).write_text(_architecture_header(study, t) + dump_yaml(arch),
                                        encoding="utf-8")
        metrics = _metrics(study, t, spec, info)
        if fmt != "safetensors":
            _write_program(fmt, spec, task, state, tmp)
            metrics["extra_format"] = fmt
        (tmp / "metrics.json").write_text(
            json.dumps(metrics, indent=2, allow_nan=False) + "\n", encoding="utf-8")
        (tmp / "README.md").write_text(model_card(study, t, spec, metrics, Path(out_dir)),
                                       encoding="utf-8")
        os.chmod(tmp, 0o777 & ~_umask())
        _move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for d in reversed(created):
            shutil.rmtree(d, ignore_errors=True)
        raise
    return out


def _check_target(out: Path) -> None:
    check_new_dir(out, "--out")  # a file, a non-empty directory, a path under a regular file


def _make_parents(parent: Path) -> list[Path]:
    """Create missing parent directories; returns those created (outermost first)."""
    missing = [p for p in (parent, *parent.parents) if not p.exists()][::-1]
    for p in missing:
        p.mkdir()
    return missing


def _move_into_place(tmp: Path, out: Path) -> None:
    try:
        os.rename(tmp, out)  # POSIX: also replaces an existing empty directory, atomically
    except OSError:
        if out.is_dir() and not any(out.iterdir()):
            out.rmdir()
            os.rename(tmp, out)
        else:
            raise UsageError(f"--out {out} appeared or filled up during the export; nothing "
                             "was written") from None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _spec(t: FrozenTrial) -> ModelSpec:
    raw = t.user_attrs.get("spec")
    try:
        spec = ModelSpec.from_dict(raw, path=("spec",))
    except SpecError as err:
        raise UsageError(f"trial {t.number}'s recorded spec is invalid: {err}") from None
    if spec.adapter is None:
        raise UsageError(f"trial {t.number}'s recorded spec has no adapter; it cannot be "
                         "rebuilt on its own")
    return spec


def _task(info: dict, t: FrozenTrial) -> dict:
    task = info.get("task")
    if not isinstance(task, dict) or "name" not in task:
        raise UsageError(f"the study has no task recorded (user attr mlbtc.task); trial "
                         f"{t.number} cannot be exported with its task")
    return {"name": task["name"], "options": dict(task.get("options") or {})}


def _download_weights(study: optuna.Study, t: FrozenTrial, dest: Path) -> None:
    from optuna.artifacts import download_artifact
    from optuna.artifacts.exceptions import ArtifactNotFound

    from .storage import artifact_store

    artifact_id = t.user_attrs["weights_artifact_id"]
    try:
        store = artifact_store(study)
        download_artifact(artifact_store=store, file_path=str(dest), artifact_id=artifact_id)
    except (ArtifactNotFound, FileNotFoundError) as exc:
        where = (study.user_attrs.get("mlbtc") or {}).get("artifact_dir")
        raise UsageError(f"the weights of trial {t.number} (artifact {artifact_id}) are not in "
                         f"the artifact store {where}: {exc}") from None


def _verified_state(spec: ModelSpec, weights: Path) -> dict[str, torch.Tensor]:
    from mlbtc_search.load import _read_safetensors

    state = _read_safetensors(weights)
    with torch.device("meta"):
        model = build_model(spec)
    check_state_dict(model, state, f"the trial's weights artifact ({weights.name})")
    return state


def _architecture_header(study: optuna.Study, t: FrozenTrial) -> str:
    return (f"# Exported by `mlbtc export` from study {study.study_name!r}, trial {t.number}.\n"
            "# Load:    import mlbtc_search; model = mlbtc_search.load(THIS_DIRECTORY)\n"
            "# Retrain: mlbtc train architecture.yaml --budget FLOPS\n")


def _metrics(study: optuna.Study, t: FrozenTrial, spec: ModelSpec, info: dict) -> dict:
    ua = t.user_attrs
    code_version = ua.get("code_version", info.get("code_version"))
    out = {
        "study": study.study_name, "trial": t.number,
        "val_loss": json_safe(ua.get("val_loss", t.values[0])),
        "metric": json_safe(ua.get("metric")),
        "metric_name": ua.get("metric_name"),
        "flops_per_token": json_safe(ua.get("flops_per_token", t.values[1])),
        "params": ua.get("params"),
        "kv_cache_bytes_per_token": json_safe(ua.get("kv_cache_bytes_per_token")),
        "budget_flops": json_safe(ua.get("budget_flops", info.get("budget_flops"))),
        "seed": ua.get("seed"), "steps": ua.get("steps"),
        "train_flops": json_safe(ua.get("train_flops")),
        "family": ua.get("family", spec.family), "hash": ua.get("hash", spec.hash()),
        "code_version": code_version,
        "exported_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "train": dict(ua.get("train") or {}),
        "evaluation": evaluation_settings(ua.get("train") or {}),
    }
    return out


def evaluation_settings(train: dict[str, Any]) -> dict[str, int]:
    """How the training loop scored the trial, as ``Task.evaluate`` keyword arguments.

    ``train`` is the trial's ``train`` user attr (its TrainConfig overrides); evaluating the
    loaded model with ``task.evaluate(model, **evaluation_settings(train))`` reproduces the
    recorded val_loss and metric.
    """
    import dataclasses

    from trainers.train import TrainConfig

    names = {f.name for f in dataclasses.fields(TrainConfig)}
    config = TrainConfig(**{k: v for k, v in train.items() if k in names})
    return {"batches": config.eval_batches,
            "batch_size": config.eval_batch_size or config.batch_size, "seed": config.eval_seed}


# ---- extra formats ---------------------------------------------------------------------------
def _check_onnx() -> None:
    import importlib.util

    missing = [m for m in ("onnx", "onnxscript") if importlib.util.find_spec(m) is None]
    if missing:
        raise UsageError(f"--format onnx needs the {' and '.join(missing)} package(s), which "
                         f"are not installed: pip install {' '.join(missing)}")


def _write_program(fmt: str, spec: ModelSpec, task: dict, state: dict, tmp: Path) -> None:
    """Write model.pt2 (torch.export) or model.onnx; unsupported models are UsageErrors."""
    from trainers.tasks import get_task

    model = build_model(spec)
    model.load_state_dict(state, strict=True)
    model.eval()
    inputs, _ = get_task(task["name"], **task["options"]).batch(
        "val", 2, torch.Generator().manual_seed(0))
    what = "torch.export" if fmt == "exported-program" else "torch.onnx.export"
    try:
        with torch.no_grad():
            if fmt == "exported-program":
                program = torch.export.export(model, (inputs,))
                if not torch.allclose(program.module()(inputs), model(inputs), atol=1e-5):
                    raise RuntimeError("the exported program's outputs differ from the model's")
                torch.export.save(program, str(tmp / "model.pt2"))
            else:
                torch.onnx.export(model, (inputs,), str(tmp / "model.onnx"), dynamo=True)
    except MlbtcError:
        raise
    except Exception as exc:  # noqa: BLE001 - any tracer failure means "unsupported here"
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UsageError(f"--format {fmt} is not supported for this model: {what} failed "
                         f"({type(exc).__name__}: {first[:200]}); export without --format"
                         ) from None


# ---- the model card --------------------------------------------------------------------------
def _describe(spec: ModelSpec) -> str:
    layers = [f"{a.kind}, {a.heads} heads of dim {a.head_dim}" for a in spec.layers]
    if len(set(layers)) == 1:
        attn = f"{layers[0]} in every layer"
    else:
        attn = "; ".join(f"layer {i}: {s}" for i, s in enumerate(layers))
    a = spec.adapter
    return (f"- family: `{spec.family}`\n- width {spec.width}, depth {spec.depth}, MLP "
            f"{spec.mlp_up.family} x{spec.mlp_up.n_out // spec.width}, max_seq_len "
            f"{spec.max_seq_len}\n- attention: {attn}\n- adapter: {a.input_kind} input of dim "
            f"{a.input_dim} -> {a.output_dim} output(s) per position")


def front_position(study: optuna.Study, t: FrozenTrial) -> str:
    """One sentence: the trial's rank by loss on the Pareto front and its relative FLOPs."""
    front = pareto_front([x for x in study.get_trials(deepcopy=False) if exportable(x)])
    lo, hi = _cost(front[0])[1], _cost(front[-1])[1]
    flops = _cost(t)[1]
    rel = f"{flops / lo:.3g}x the FLOPs/token of the cheapest front point and " \
          f"{flops / hi:.3g}x those of the most expensive"
    by_loss = sorted(front, key=lambda x: (_cost(x)[0], x.number))
    numbers = [x.number for x in by_loss]
    if t.number in numbers:
        return (f"On the Pareto front of {len(front)} non-dominated trials: rank "
                f"{numbers.index(t.number) + 1} of {len(front)} by loss (1 = lowest), {rel}.")
    return (f"Not on the Pareto front (dominated); the front has {len(front)} trials. "
            f"It costs {rel}.")


def retrain_command(out: Path, metrics: dict) -> str:
    """``mlbtc train OUT/architecture.yaml --budget B`` with the trial's seed, lr, batch size."""
    budget = metrics.get("budget_flops")
    train = metrics.get("train") or {}
    cmd = f"mlbtc train {out / ARCHITECTURE} --budget {_fmt(budget) if budget else 'B'}"
    for flag, value in (("--lr", train.get("lr")), ("--batch-size", train.get("batch_size")),
                        ("--seed", metrics.get("seed"))):
        if value is not None:
            cmd += f" {flag} {value}"
    return cmd


def model_card(study: optuna.Study, t: FrozenTrial, spec: ModelSpec, metrics: dict,
               out: Path) -> str:
    """README.md of an export directory."""
    task = (study.user_attrs.get("mlbtc") or {}).get("task", {})
    rows = [(k, metrics.get(k)) for k in ("val_loss", "metric", "flops_per_token", "params",
                                          "kv_cache_bytes_per_token", "budget_flops", "seed",
                                          "steps", "hash", "code_version")]
    table = "\n".join(f"| {k} | {_fmt(v)} |" for k, v in rows if v is not None)
    ev = metrics["evaluation"]
    return f"""# {spec.family} transformer, trial {t.number} of study `{study.study_name}`

A {spec.family} model (width {spec.width}, depth {spec.depth}) trained on the
`{task.get("name")}` task for {_fmt(metrics.get("budget_flops"))} FLOPs by `mlbtc search`.

{_describe(spec)}

{front_position(study, t)}

| metric | value |
|---|---|
| metric_name | {metrics.get("metric_name")} |
{table}

## Load

```python
import mlbtc_search
model = mlbtc_search.load("{out}")   # eval mode; needs only the core (torch, pyyaml, safetensors)
```

`architecture.yaml` is the complete model spec, `model.safetensors` its weights; nothing here is
unpickled. The recorded validation numbers are reproduced by

```python
from trainers.tasks import get_task
spec_task = model.spec.to_dict()["task"]
task = get_task(spec_task["name"], **spec_task["options"])
task.evaluate(model, batches={ev["batches"]}, batch_size={ev["batch_size"]}, seed={ev["seed"]})
```

## Retrain

```sh
{retrain_command(out, metrics)}
```

The `task` key of `architecture.yaml` selects the task and its options; `metrics.json` has the
trial's full training settings (`train`).
"""


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, int) and not isinstance(v, bool) and abs(v) >= 10_000:
        return f"{v:,}"
    return str(v)


# ---- CLI -------------------------------------------------------------------------------------
def open_study(name: str, storage_url: str | None) -> optuna.Study:
    """Study ``name`` in the storage (never created); an unknown name lists the studies."""
    from .storage import load_study, open_storage

    return load_study(open_storage(storage_url, create=False), name)


def run(args: argparse.Namespace) -> int:
    """``mlbtc export STUDY (--trial N | --pick P) --out DIR [--format F]``."""
    fmt = getattr(args, "format", "safetensors") or "safetensors"
    if fmt == "onnx":
        _check_onnx()
    if args.pick is not None and args.pick.strip().lower() not in ("min-loss", "knee"):
        parse_bound(args.pick)
    target = Path(args.out).expanduser().absolute()
    _check_target(target)
    study = open_study(args.study, args.storage)
    trial = get_trial(study, args.trial) if args.trial is not None else pick_trial(study,
                                                                                   args.pick)
    path = export_trial(study, trial, target, fmt)
    v = trial.values
    sys.stdout.write(f"exported trial {trial.number} of study {study.study_name!r} "
                     f"(val_loss {v[0]:.6g}, {v[1]:.4g} FLOPs/token) to {path}\n")
    return 0

"""The one exporter: a trial of a study -> the files the core alone can load (docs/export.md).

``mlbtc export`` writes them to a directory (:func:`export_trial`); the dashboard's download
serves them as a zip (:func:`export_zip`). Both build the same files with :func:`export_files`,
which always checks the weights against the recorded spec before anything is written::

    architecture.yaml    complete ModelSpec (adapter, max_seq_len) + ``task: {name, options}``
    model.safetensors    the trial's trained weights (the artifact ``weights_artifact_id``)
    metrics.json         val_loss, metric, FLOPs/token, params, budget, seed, hash, provenance
    README.md            a short model card: what it is, where it sits on the front, how to use it
    model.pt2            only with ``--format exported-program`` (torch.export)
    model.onnx           only with ``--format onnx`` (needs the onnx packages)

A directory is written into a temporary directory beside the target and renamed into place at
the end, so a failed export leaves nothing behind. Trials are chosen by number or by a pick:
``min-loss``, ``knee`` or a bound such as ``flops<=1e6`` (parsed, never evaluated).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import io
import json
import math
import os
import re
import shutil
import sys
import tempfile
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna

from mlbtc_search.checks import check_new_dir
from mlbtc_search.errors import MlbtcError, SpecError, UsageError
from mlbtc_search.load import ARCHITECTURE, WEIGHTS, check_state_dict
from mlbtc_search.model import ModelSpec, build_model
from mlbtc_search.yamlio import dump_yaml

from .model_card import model_card
from .pareto import front as pareto_front
from .record import StudyInfo, TrialRecord, json_safe
from .storage import load_records, read_artifact, study_info

FORMATS = ("safetensors", "exported-program", "onnx")
_BOUND = re.compile(r"^\s*(flops|params)\s*(<=|<)\s*([0-9][0-9_]*(?:\.[0-9_]*)?(?:e[+-]?[0-9]+)?)"
                    r"\s*$", re.IGNORECASE)
PICK_HELP = ("min-loss, knee, or a bound 'flops<=X', 'flops<X', 'params<=X', 'params<X' "
             "(X a number such as 2e6)")


# ---- choosing a trial ------------------------------------------------------------------------
def _cost(t: TrialRecord) -> tuple[float, float]:
    """(val_loss, flops_per_token) of an exportable record."""
    assert t.point is not None
    return t.point


def knee(front: Sequence[TrialRecord]) -> TrialRecord:
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


def pick_trial(recs: Sequence[TrialRecord], pick: str, study_name: str = "the study"
               ) -> TrialRecord:
    """The exportable record that ``pick`` selects (see :data:`PICK_HELP`)."""
    candidates = [t for t in recs if t.exportable]
    name = pick.strip().lower()
    if name not in ("min-loss", "knee"):
        key, op, bound = parse_bound(pick)  # validate before looking at the trials
    if not candidates:
        raise UsageError(f"study {study_name!r} has no COMPLETE trials with weights to pick "
                         "from")
    if name == "min-loss":
        return min(candidates, key=lambda t: (_cost(t)[0], t.number))
    if name == "knee":
        return knee(pareto_front(candidates))
    attr = "flops_per_token" if key == "flops" else "params"

    def value(t: TrialRecord) -> float:
        v = _cost(t)[1] if key == "flops" else t.params
        return math.inf if v is None else float(v)

    ok = [t for t in candidates if (value(t) <= bound if op == "<=" else value(t) < bound)]
    if not ok:
        low = min(value(t) for t in candidates)
        raise UsageError(f"no trial of study {study_name!r} has {attr} {op} {bound:g} "
                         f"(the smallest is {low:g}); raise the bound")
    return min(ok, key=lambda t: (_cost(t)[0], t.number))


def get_trial(recs: Sequence[TrialRecord], number: int, study_name: str = "the study"
              ) -> TrialRecord:
    """Record ``number``, which must be exportable (else a UsageError that says why not)."""
    found = [t for t in recs if t.number == number]
    if not found:
        raise UsageError(f"study {study_name!r} has no trial {number} (trials are numbered "
                         f"0..{len(recs) - 1})" if recs else f"study {study_name!r} has no trials")
    t = found[0]
    if t.state != "complete":
        parts = [p for p in (t.reason, None if t.duplicate_of is None else
                             f"duplicate of trial {t.duplicate_of}") if p]
        why = "; ".join(parts) or "no reason recorded"
        raise UsageError(f"trial {number} of study {study_name!r} is {t.state}, not complete "
                         f"({why}); only trained trials can be exported")
    if not t.exportable:
        raise UsageError(f"trial {number} of study {study_name!r} has no usable weights "
                         "artifact; it cannot be exported")
    return t


# ---- the files ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Exported:
    """What an export is made of: the chosen record, the study's, and the files' bytes."""

    study_name: str
    info: StudyInfo
    trial: TrialRecord
    files: dict[str, bytes]


def export_files(study_name: str, info: StudyInfo, recs: Sequence[TrialRecord], number: int,
                 fmt: str = "safetensors", weights: bytes | None = None,
                 out: Path | None = None, exported_by: str = "mlbtc export") -> Exported:
    """The export of trial ``number``: architecture.yaml, model.safetensors (checked against the
    recorded spec), metrics.json, README.md (and model.pt2/model.onnx for ``fmt``).

    ``weights`` default to the trial's weights artifact; ``out`` is where the files will be
    (for the model card's commands).
    """
    if fmt not in FORMATS:
        raise UsageError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if fmt == "onnx":
        _check_onnx()
    t = get_trial(recs, number, study_name)
    spec = _spec(t)
    task = _task(info, t)
    if weights is None:
        weights = read_artifact(info, str(t.weights_artifact_id),
                                f"the weights of trial {t.number}")
    state = _verified_state(spec, weights)
    files = {WEIGHTS: weights}
    arch = {**spec.to_dict(), "task": task}
    files[ARCHITECTURE] = (_architecture_header(study_name, t, exported_by)
                           + dump_yaml(arch)).encode()
    metrics = _metrics(study_name, t, spec, info, exported_by)
    if fmt != "safetensors":
        files.update(_program(fmt, spec, task, state))
        metrics["extra_format"] = fmt
    files["metrics.json"] = (json.dumps(json_safe(metrics), indent=2, allow_nan=False)
                             + "\n").encode()
    where = out if out is not None else Path("THIS_DIRECTORY")
    files["README.md"] = model_card(study_name, info, recs, t, spec, metrics, where).encode()
    return Exported(study_name, info, t, files)


def export_zip(study_name: str, info: StudyInfo, recs: Sequence[TrialRecord], number: int
               ) -> bytes:
    """The export of trial ``number`` as a zip archive (the dashboard's download)."""
    done = export_files(study_name, info, recs, number, exported_by="the mlbtc dashboard")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for name, blob in done.files.items():
            z.writestr(name, blob)
    return buf.getvalue()


def archive_name(study_name: str, number: int) -> str:
    """A file name for a zip download (only ``[A-Za-z0-9_.-]`` from the study name)."""
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", study_name).strip("-.")[:60] or "study"
    return f"{slug}-trial{number}.zip"


# ---- writing the directory -------------------------------------------------------------------
def export_trial(study: optuna.Study, trial: TrialRecord | int, out_dir: str | os.PathLike[str],
                 fmt: str = "safetensors") -> Path:
    """Export ``trial`` of ``study`` into ``out_dir`` (new or empty); returns its path."""
    if fmt not in FORMATS:
        raise UsageError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if fmt == "onnx":
        _check_onnx()
    number = trial if isinstance(trial, int) else trial.number
    recs = load_records(study)
    get_trial(recs, number, study.study_name)
    out = Path(out_dir).expanduser().absolute()
    _check_target(out)
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
        done = export_files(study.study_name, study_info(study), recs, number, fmt,
                            out=Path(out_dir))
        for name, blob in done.files.items():
            (tmp / name).write_bytes(blob)
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


def _spec(t: TrialRecord) -> ModelSpec:
    try:
        spec = ModelSpec.from_dict(t.spec, path=("spec",))
    except SpecError as err:
        raise UsageError(f"trial {t.number}'s recorded spec is invalid: {err}") from None
    if spec.adapter is None:
        raise UsageError(f"trial {t.number}'s recorded spec has no adapter; it cannot be "
                         "rebuilt on its own")
    return spec


def _task(info: StudyInfo, t: TrialRecord) -> dict:
    if not info.task_name:
        raise UsageError(f"the study has no task recorded (user attr mlbtc.task); trial "
                         f"{t.number} cannot be exported with its task")
    return {"name": info.task_name, "options": dict(info.task.get("options") or {})}


def _verified_state(spec: ModelSpec, weights: bytes) -> dict[str, Any]:
    """The weights as tensors, checked against the spec (names, shapes, dtypes)."""
    import safetensors.torch
    import torch

    try:
        state = safetensors.torch.load(weights)
    except Exception as exc:  # noqa: BLE001 - a corrupt file: say so in one line
        raise UsageError(f"the trial's weights artifact is not a safetensors file: "
                         f"{' '.join(str(exc).split())[:200]}") from None
    with torch.device("meta"):
        model = build_model(spec)
    check_state_dict(model, state, "the trial's weights artifact")
    return state


def _architecture_header(study_name: str, t: TrialRecord, by: str) -> str:
    return (f"# Exported by {by} from study {study_name!r}, trial {t.number}.\n"
            "# Load:    import mlbtc_search; model = mlbtc_search.load(THIS_DIRECTORY)\n"
            "# Retrain: mlbtc train architecture.yaml --budget FLOPS\n")


def _metrics(study_name: str, t: TrialRecord, spec: ModelSpec, info: StudyInfo,
             by: str) -> dict:
    return {
        "study": study_name, "trial": t.number, "val_loss": t.val_loss, "metric": t.metric,
        "metric_name": t.metric_name, "flops_per_token": t.flops_per_token, "params": t.params,
        "kv_cache_bytes_per_token": t.kv_cache_bytes_per_token,
        "budget_flops": t.budget_flops if t.budget_flops is not None else info.budget_flops,
        "seed": t.seed, "steps": t.steps, "train_flops": t.train_flops,
        "family": t.family or spec.family, "hash": t.hash or spec.hash(),
        "code_version": t.code_version or info.code_version,
        "exported_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "exported_by": by, "train": dict(t.train), "evaluation": evaluation_settings(t.train),
    }


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


def _program(fmt: str, spec: ModelSpec, task: dict, state: dict) -> dict[str, bytes]:
    """model.pt2 (torch.export) or model.onnx; unsupported models are UsageErrors."""
    with tempfile.TemporaryDirectory(prefix="mlbtc-program-") as tmp:
        name = _write_program(fmt, spec, task, state, Path(tmp))
        return {name: (Path(tmp) / name).read_bytes()}


def _write_program(fmt: str, spec: ModelSpec, task: dict, state: dict, tmp: Path) -> str:
    import torch

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
                return "model.pt2"
            torch.onnx.export(model, (inputs,), str(tmp / "model.onnx"), dynamo=True)
            return "model.onnx"
    except MlbtcError:
        raise
    except Exception as exc:  # noqa: BLE001 - any tracer failure means "unsupported here"
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UsageError(f"--format {fmt} is not supported for this model: {what} failed "
                         f"({type(exc).__name__}: {first[:200]}); export without --format"
                         ) from None


# ---- CLI ---------------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> int:
    """``mlbtc export STUDY (--trial N | --pick P) --out DIR [--format F]``."""
    from .storage import load_study, open_storage

    fmt = getattr(args, "format", "safetensors") or "safetensors"
    if fmt == "onnx":
        _check_onnx()
    if args.pick is not None and args.pick.strip().lower() not in ("min-loss", "knee"):
        parse_bound(args.pick)
    target = Path(args.out).expanduser().absolute()
    _check_target(target)
    study = load_study(open_storage(args.storage, create=False), args.study)
    recs = load_records(study)
    trial = (get_trial(recs, args.trial, study.study_name) if args.trial is not None
             else pick_trial(recs, args.pick, study.study_name))
    path = export_trial(study, trial, target, fmt)
    sys.stdout.write(f"exported trial {trial.number} of study {study.study_name!r} "
                     f"(val_loss {trial.val_loss:.6g}, {trial.flops_per_token:.4g} FLOPs/token) "
                     f"to {path}\n")
    return 0

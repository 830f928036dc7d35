"""The ``mlbtc search``, ``mlbtc studies``, ``mlbtc pareto`` and ``mlbtc export`` commands.

Each takes the parsed ``argparse.Namespace`` of :mod:`mlbtc_search.cli` and returns an exit
code. Errors the user can fix are raised as MlbtcError subclasses, which the top-level CLI turns
into one stderr line and exit code 2. Tables and JSON go to stdout; live progress to stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from mlbtc_search.yamlio import json_safe

from .progress import format_table

EXIT_INTERRUPTED = 130


def _write_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(json_safe(obj), allow_nan=False, default=str) + "\n")


def search(args: argparse.Namespace) -> int:
    """Run or resume the search of a space file; exit 130 when interrupted with Ctrl-C."""
    from .progress import Progress, format_summary
    from .runner import run_search
    from .space import load_space

    overrides = {key: getattr(args, key, None)
                 for key in ("trials", "workers", "storage", "name", "budget", "seeds")}
    space = load_space(args.space, overrides).prepare()  # checked before the storage opens
    progress = Progress()
    outcome = run_search(space, address=getattr(args, "address", None), progress=progress)
    note = None
    if outcome.already_complete:
        note = (f"the study already had its {outcome.snapshot.done} trials: nothing was run "
                "(raise --trials to continue it)")
    elif outcome.exhausted:
        note = ("stopped early: the sampler kept proposing infeasible or duplicate candidates "
                "(the space may be exhausted; widen it or lower trials)")
    elif outcome.resumed:
        note = f"resumed: this run trained {outcome.new_trials} trial(s)"
    sys.stdout.write(format_summary(
        study_name=outcome.study_name, storage_url=outcome.storage_url,
        artifact_dir=str(outcome.artifact_dir), snapshot=outcome.snapshot,
        front=[r.row() for r in outcome.front], interrupted=outcome.interrupted, note=note,
        default_storage=space.storage is None) + "\n")
    if outcome.snapshot.ok:
        from .storage import load_study, open_storage

        study = load_study(open_storage(outcome.storage_url, create=False), outcome.study_name)
        sys.stdout.write(_answer(study, outcome.storage_url) + "\n")
    sys.stdout.flush()
    return EXIT_INTERRUPTED if outcome.interrupted else 0


def _answer(study: Any, url: str, recs: Any = None) -> str:
    """The per-family table, the front, the sentence; writes the PNG (see studies.answer)."""
    from .answer import entries, format_answer, plot_front, png_path
    from .storage import load_records, study_info

    ents = entries(recs if recs is not None else load_records(study))
    png = None
    if ents:
        where = png_path(url, study.study_name, study_info(study).artifact_dir)
        png = plot_front(ents, where,
                         title=f"{study.study_name}: loss against FLOPs per token")
    return format_answer(ents, png)


STUDY_COLUMNS = (("study", "name", ""), ("task", "task", ""), ("trials", "trials", ""),
                 ("ok", "complete", ""), ("failed", "failed", ""),
                 ("interrupted", "interrupted", ""), ("infeasible", "infeasible", ""),
                 ("duplicate", "duplicate", ""), ("running", "running", ""),
                 ("best loss", "best_loss", ".4g"), ("front", "front_size", ""),
                 ("hypervolume", "hypervolume", ".4g"), ("last update", "last_update", ""))


def studies(args: argparse.Namespace) -> int:
    """List the studies of a storage (``--json``: a list of :func:`study_summary` objects)."""
    from .storage import list_studies, mask_url, open_storage

    storage = open_storage(getattr(args, "storage", None), create=False)
    rows = list_studies(storage)
    if getattr(args, "json", False):
        _write_json(rows)
        return 0
    if not rows:
        sys.stdout.write(f"no studies in {mask_url(storage.url)}\n")
        return 0
    table = [{**r, **r["states"], "last_update": (r["last_update"] or "-")[:19].replace("T", " ")}
             for r in rows]
    sys.stdout.write(format_table(table, STUDY_COLUMNS) + "\n")
    return 0


def pareto(args: argparse.Namespace) -> int:
    """The non-dominated COMPLETE trials of a study and its hypervolume."""
    from .pareto import front, hypervolume
    from .progress import FRONT_COLUMNS
    from .storage import load_records, load_study, open_storage

    storage = open_storage(getattr(args, "storage", None), create=False)
    study = load_study(storage, args.study)
    recs = load_records(study)
    best = front(recs)
    hv = hypervolume(recs)
    if getattr(args, "json", False):
        _write_json([{**r.row(), "hypervolume": hv} for r in best])
        return 0
    done = sum(1 for r in recs if r.state == "complete")
    hv_text = "-" if hv is None else f"{hv:.4g}"
    sys.stdout.write(f"study {study.study_name!r}: {len(best)} non-dominated of {done} "
                     f"completed trials; hypervolume {hv_text} (val_loss x log10 FLOPs/token)\n")
    if best:
        sys.stdout.write(format_table([r.row() for r in best], FRONT_COLUMNS) + "\n")
        sys.stdout.write(_answer(study, storage.url, recs) + "\n")
    return 0


def importance(args: argparse.Namespace) -> int:
    """PED-ANOVA importances of the parameters and of the structure descriptors, per objective
    (``--json``: ``{"params": {objective: {name: value}}, "descriptors": {...}}``)."""
    from .importance import descriptor_importances, format_importances, param_importances
    from .storage import load_records, load_study, open_storage, study_info

    storage = open_storage(getattr(args, "storage", None), create=False)
    study = load_study(storage, args.study)
    objectives = list(study_info(study).objectives)
    params = param_importances(study, objectives)
    done = [r for r in load_records(study) if r.state == "complete" and r.values
            and r.descriptors.get("summary")]
    descs = descriptor_importances([r.values for r in done],
                                   [r.descriptors["summary"] for r in done], objectives)
    if getattr(args, "json", False):
        _write_json({"params": params, "descriptors": descs})
        return 0
    top = getattr(args, "top", None) or 10
    sys.stdout.write(format_importances(params, top) + "\n")
    sys.stdout.write(format_importances(descs, top, "Structure descriptor importances "
                                                     "(PED-ANOVA)") + "\n")
    return 0


def export(args: argparse.Namespace) -> int:
    """``mlbtc export`` (implemented in :mod:`studies.export`)."""
    from .export import run

    return run(args)


__all__ = ["export", "importance", "pareto", "search", "studies"]

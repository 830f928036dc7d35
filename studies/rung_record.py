"""What one finished rung writes on its trial: pure data from a rung worker's answer.

:func:`rung_entry` turns the answer of :func:`studies.rung_worker.run_rung` into one entry of
the trial's ``rungs`` attr (docs/scaling.md has the table). With ``seeds: k`` every rung trains
k seeds: the entry's ``val_loss`` and ``metric`` are the means over the seeds (the rung's loss,
which promotion and the objective use), ``loss_std`` their spread, ``seed_results`` one row per
seed, ``spent_flops`` the compute of every seed, as :func:`studies.trials.seed_summary` does for
a single-budget ``seeds:`` search. A rung succeeds only if every seed does; the first seed
that fails names the reason. :func:`confirm_summary` is the ``confirm`` attr's summary over
the top rung's seeds and the confirmation seeds.
"""

from __future__ import annotations

import math
import os
import statistics
import tempfile
from typing import Any

from .record import encode_attr
from .trials import quiet_optuna, seed_summary


def _bad(row: dict[str, Any]) -> bool:
    loss = row.get("val_loss")
    return row.get("status") != "ok" or loss is None or not math.isfinite(loss)


def seed_rows(out: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per seed the worker trained (an answer without ``seed_results``: its result)."""
    rows = out.get("seed_results")
    if isinstance(rows, list) and rows:
        return rows
    res = out.get("result") or {}
    return [{**res, "spent_flops": out.get("spent_flops", 0.0),
             "continued": bool(out.get("continued"))}] if res else []


def interrupted(out: dict[str, Any]) -> bool:
    """Whether the worker was interrupted (Ctrl-C), rather than failing."""
    return out.get("error") == "interrupted" or any(
        r.get("status") == "interrupted" for r in seed_rows(out))


def rung_entry(out: dict[str, Any], rung: int, budget: float, seeds: int,
               known_flops: float | None = None) -> dict[str, Any]:
    """The ``rungs`` entry of a rung that trained ``seeds`` seeds (see the module doc).

    ``known_flops``: the trial's FLOPs per token, for an answer that carries none (an error).
    """
    res = out.get("result") or {}
    rows = seed_rows(out)
    bad = next((r for r in rows if _bad(r)), None)
    ok = "error" not in out and len(rows) == seeds and bad is None
    reason = out.get("error")
    if reason is None and not ok:
        if bad is None:
            reason = f"only {len(rows)} of {seeds} seeds trained"
        else:
            reason = bad.get("reason") or f"training ended with status {bad.get('status')}"
            if seeds > 1:
                reason = f"seed {bad.get('seed')}: {reason}"
    flops = res.get("flops_per_token") or known_flops or math.nan
    summary = seed_summary(rows) if ok else {}
    entry: dict[str, Any] = {
        "rung": rung, "budget_flops": budget,
        "val_loss": summary.get("val_loss"), "metric": summary.get("metric", res.get("metric")),
        "flops_per_token": flops, "steps": res.get("steps"),
        "train_flops": res.get("train_flops"),
        "spent_flops": float(out.get("spent_flops") or 0.0),
        "continued": bool(out.get("continued")),
        "seconds": summary.get("seconds", sum(float(r.get("seconds") or 0.0) for r in rows)),
        "status": "ok" if ok else "failed", "reason": None if ok else reason,
        "note": out.get("note"), "latency_s": out.get("latency_s"),
    }
    if seeds > 1:
        entry["loss_std"] = summary.get("loss_std")
        entry["seed_results"] = rows
    return entry


def confirm_summary(top: dict[str, Any], confirm: dict[str, Any], seed: int
                    ) -> dict[str, Any]:
    """``confirm`` with ``seeds``, ``mean``, ``std`` (n - 1), ``min``, ``max`` over the seeds
    of the ``top`` rung entry (its ``seed_results``, else its loss as ``seed``) and the
    confirmation ``runs``."""
    first = top.get("seed_results") or [{"seed": seed, "val_loss": top.get("val_loss")}]
    losses = [float(r["val_loss"]) for r in [*first, *confirm.get("runs", [])]
              if r.get("val_loss") is not None]
    std = statistics.stdev(losses) if len(losses) > 1 else 0.0
    return {**confirm, "seeds": len(losses), "mean": statistics.fmean(losses), "std": std,
            "min": min(losses), "max": max(losses)}


def best_rung_attrs(trial: Any, out: dict[str, Any], entry: dict[str, Any], seeds: int,
                    version: str) -> dict[str, Any]:
    """The record fields of an open ``trial`` (:class:`studies.multifidelity.OpenTrial`) whose
    rung ``entry`` just succeeded (its highest so far), from the worker's answer ``out``: what a
    single-budget trial records, with the loss of the rung, ``rung``, ``spent_flops`` and
    ``duration_s`` over all its rungs and ``curve`` of all its rungs (artifacts apart)."""
    res = out["result"]
    attrs = {
        "spec": res["spec"], "hash": res["hash"], "family": res["family"],
        "flops_per_token": res["flops_per_token"], "params": res["params"],
        "val_loss": entry["val_loss"], "metric": entry["metric"],
        "metric_name": res["metric_name"], "seed": res["seed"],
        "budget_flops": res["budget_flops"], "steps": res["steps"],
        "tokens": res["tokens"], "train_flops": res["train_flops"],
        "train_status": res["status"], "rung": entry["rung"], "curve": trial.curve,
        "duration_s": sum(float(r.get("seconds") or 0.0) for r in trial.rungs),
        "spent_flops": sum(float(r.get("spent_flops") or 0.0) for r in trial.rungs),
        "code_version": version,
        **{k: out[k] for k in ("node", "host", "pid", "latency_s", "cpu_s", "gpu")
           if out.get(k) is not None},
    }
    if seeds > 1:  # as a single-budget seeds: search records them
        attrs.update(loss_std=entry["loss_std"], seed_results=entry["seed_results"])
    if entry["rung"] == 0 and trial.pending is not None:
        attrs["kv_cache_bytes_per_token"] = trial.pending.candidate.kv_cache_bytes
    return attrs


def write_attrs(recorder: Any, trial_id: int, attrs: dict[str, Any]) -> None:
    """Write ``attrs`` on a RUNNING trial (through the storage: the driver holds no
    ``optuna.Trial`` of a resumed one)."""
    with quiet_optuna():
        for key, value in attrs.items():
            recorder.storage.set_trial_user_attr(trial_id, key, encode_attr(value))


def upload(recorder: Any, trial_id: int, filename: str, blob: bytes, mimetype: str) -> str:
    """Upload ``blob`` as an artifact of the trial; its artifact id."""
    from optuna.artifacts import upload_artifact

    storage = recorder.storage
    with tempfile.TemporaryDirectory(prefix="mlbtc-artifact-") as tmp:
        path = os.path.join(tmp, filename)
        with open(path, "wb") as fh:
            fh.write(blob)
        with quiet_optuna():
            return upload_artifact(artifact_store=recorder.store, file_path=path,
                                   study_or_trial=storage.get_trial(trial_id),
                                   storage=storage, mimetype=mimetype)


__all__ = ["best_rung_attrs", "confirm_summary", "interrupted", "rung_entry", "seed_rows",
           "upload", "write_attrs"]

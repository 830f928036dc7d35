"""What runs on a Ray worker for one rung of a multi-fidelity trial (see
:mod:`studies.multifidelity`): build the task, train or continue the rung for each seed, return
the results, the weights and the states to continue from. Like :func:`studies.worker.run_trial`
it takes and returns plain data, never touches the storage, caps the CUDA allocator at the
trial's GPU share and measures the ``latency`` objective when the study has it (both through
the same code as :func:`~studies.worker.run_trial`).

Returned dict: ``result`` (``TrainResult.to_json()`` of the first seed), ``seed_results`` (one
``{seed, status, val_loss, metric, steps, seconds, reason, train_flops, spent_flops,
continued, note}`` per seed, trained one after the other; the first one that does not end
``ok`` ends the rung), ``spent_flops`` (the compute of every seed), ``continued`` (every seed
continued from its state), ``note``, ``weights`` (first seed), ``states`` (one per seed, when
``keep_state`` and every seed ended ``ok``), ``latency_s``, ``gpu``, ``cpu_s`` and where it ran.
"""

from __future__ import annotations

import time
from typing import Any


def _seed_entry(seed: int, run: Any, note: str | None) -> dict[str, Any]:
    res = run.result.to_json()  # JSON-safe: a NaN loss is None
    keys = ("status", "val_loss", "metric", "steps", "seconds", "reason", "train_flops")
    return {"seed": seed, **{k: res[k] for k in keys}, "spent_flops": run.spent_flops,
            "continued": run.continued, "note": note}


def run_rung(payload: dict[str, Any]) -> dict[str, Any]:
    """Train one rung of one trial on a Ray worker (plain data in, plain data out).

    ``payload``: that of :func:`studies.worker.run_trial` (``seed``, ``seeds``, ``gpus``,
    ``objectives``, ...) plus ``budgets`` (all rungs; the chain's warmup is that of the lowest),
    ``budget_flops`` (this rung), ``states`` (one per seed: bytes of a
    :class:`~trainers.continuation.TrainState`, or None to train from scratch; None for all)
    and ``keep_state``. Never raises for a training problem: ``{"error": ...}``.
    """
    from .worker import GpuShare, _where, add_model_outputs, setup

    where = _where()
    share = GpuShare(payload)
    try:
        task, spec, config = setup(payload, share)
        cpu = time.process_time()
        seed0, k = int(payload["seed"]), int(payload.get("seeds") or 1)
        states = list(payload.get("states") or [])[:k]
        states += [None] * (k - len(states))  # a seed without a state trains from scratch
        runs, entries = [], []
        for i in range(k):
            run, note = _train_seed(spec, task, payload, config, seed0 + i, states[i])
            runs.append(run)
            entries.append(_seed_entry(seed0 + i, run, note))
            if run.result.status != "ok":
                break
        first = runs[0].result
        notes = [f"seed {e['seed']}: {e['note']}" if k > 1 else e["note"]
                 for e in entries if e["note"]]
        out: dict[str, Any] = {
            **where, "result": first.to_json(), "seed_results": entries,
            "spent_flops": sum(e["spent_flops"] for e in entries),
            "continued": all(e["continued"] for e in entries),
            "note": "; ".join(notes) or None, "cpu_s": time.process_time() - cpu}
        add_model_outputs(out, first, share, payload, task)
        ok = len(runs) == k and all(r.result.status == "ok" for r in runs)
        if ok and payload.get("keep_state", True) and all(r.state is not None for r in runs):
            out["states"] = [r.state.to_bytes() for r in runs]
        return out
    except KeyboardInterrupt:
        return {**where, "error": "interrupted"}
    except Exception as exc:  # noqa: BLE001 - reported to the driver, recorded on the trial
        return {**where, "error": share.error(exc)}


def _train_seed(spec: Any, task: Any, payload: dict[str, Any], config: Any, seed: int,
                blob: bytes | None) -> tuple[Any, str | None]:
    """One seed's rung: continue from ``blob`` when it is a usable state of this seed's chain,
    else retrain (the note says why)."""
    from mlbtc_search.errors import TrainingError
    from trainers.continuation import TrainState, rung_warmup, train_rung

    warmup = rung_warmup(spec, task, float(payload["budgets"][0]), config)
    budget = float(payload["budget_flops"])
    state, note = None, None
    if blob:
        try:
            state = TrainState.from_bytes(blob)
        except TrainingError as exc:
            note = f"retrained: {exc}"
    try:
        return train_rung(spec, task, budget, seed, config, warmup=warmup, state=state), note
    except TrainingError as exc:
        if state is None:
            raise
        note = f"retrained: {exc}"
        return train_rung(spec, task, budget, seed, config, warmup=warmup), note


__all__ = ["run_rung"]

"""What runs on a Ray worker for one rung of a multi-fidelity trial (see
:mod:`studies.multifidelity`): build the task, train or continue the rung, return the result,
the weights and the state to continue from. Like :func:`studies.worker.run_trial` it takes and
returns plain data and never touches the storage.
"""

from __future__ import annotations

import time
from typing import Any


def run_rung(payload: dict[str, Any]) -> dict[str, Any]:
    """Train one rung of one trial on a Ray worker (plain data in, plain data out).

    ``payload``: that of :func:`studies.worker.run_trial` plus ``budgets`` (all rungs; the chain's
    warmup is that of the lowest), ``budget_flops`` (this rung), ``state`` (bytes of a
    :class:`~trainers.continuation.TrainState` or None) and ``keep_state``. Never raises for a
    training problem: ``{"error": ...}``.
    """
    from .worker import _where

    where = _where()
    try:
        import safetensors.torch
        import torch

        from mlbtc_search.errors import TrainingError
        from mlbtc_search.model import ModelSpec
        from trainers.continuation import TrainState, rung_warmup, train_rung
        from trainers.tasks import get_task
        from trainers.train import TrainConfig

        torch.set_num_threads(int(payload.get("threads") or 1))
        task = get_task(payload["task"]["name"], **payload["task"].get("options", {}))
        spec = ModelSpec.from_dict(payload["spec"])
        config = TrainConfig(**payload.get("train", {}))
        warmup = rung_warmup(spec, task, float(payload["budgets"][0]), config)
        budget, seed = float(payload["budget_flops"]), int(payload["seed"])
        cpu = time.process_time()
        note = None
        state = None
        if payload.get("state"):
            try:
                state = TrainState.from_bytes(payload["state"])
            except TrainingError as exc:
                note = f"retrained: {exc}"
        try:
            run = train_rung(spec, task, budget, seed, config, warmup=warmup, state=state)
        except TrainingError as exc:
            if state is None:
                raise
            note = f"retrained: {exc}"
            run = train_rung(spec, task, budget, seed, config, warmup=warmup)
        out: dict[str, Any] = {**where, "result": run.result.to_json(),
                               "spent_flops": run.spent_flops, "continued": run.continued,
                               "note": note, "cpu_s": time.process_time() - cpu}
        if run.result.status == "ok":
            out["weights"] = safetensors.torch.save(run.result.state_dict())
            if run.state is not None and payload.get("keep_state", True):
                out["state"] = run.state.to_bytes()
        return out
    except KeyboardInterrupt:
        return {**where, "error": "interrupted"}
    except Exception as exc:  # noqa: BLE001 - reported to the driver, recorded on the trial
        return {**where, "error": f"{type(exc).__name__}: {' '.join(str(exc).split())}"}


__all__ = ["run_rung"]

"""Training by rungs: continue a run to a larger budget from its stable-phase checkpoint.

A multi-fidelity search trains an architecture at budget ``C_0``, then (if promoted) at
``C_1 > C_0``, and so on. With the ``"wsd"`` schedule (warmup, stable, ``1 - sqrt`` cooldown over
the last 20% of the steps; :mod:`trainers.schedule`) or ``"constant"``, the learning rate of a
step does not depend on the run's length until its cooldown starts, so the run at ``C_1`` shares
its first ``S_0`` steps (``S_0`` = the end of ``C_0``'s stable phase) with the run at ``C_0``.
:func:`train_rung` therefore keeps a :class:`TrainState` at the end of each rung's stable phase
(weights, AdamW moments, the data generator, counters) and scores the rung after a cooldown
branched off it; the next rung continues from that state. The result at ``C_1`` is the same,
bit for bit on the CPU, as an uninterrupted ``"wsd"`` run of ``C_1`` with the same warmup (the
tests check it against :func:`trainers.train`). ``"cosine"`` depends on the horizon from the
first step, so under it every rung retrains from scratch.

Warmup: uninterrupted runs warm up over 10% of their steps, which depends on the budget; a rung
chain fixes it once (``warmup``, usually :func:`rung_warmup` of the lowest rung).

Compute: ``RungRun.spent_flops`` is what this call trained (the stable steps added plus the
cooldown branch; the whole run when it retrained); ``result.train_flops`` is the compute in the
trajectory of the model it returns (equal to an uninterrupted run's).

The steps are those of :func:`trainers.train.train` (its ``_Run``, stopped at the end of the
stable phase with ``loop(until=...)``): same learning rates, batches, checks, curve and
evaluations.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from mlbtc_search.errors import TrainingError
from mlbtc_search.model import ModelSpec

from .schedule import cooldown_steps
from .tasks import Task
from .train import (
    MAX_WARMUP,
    StepCosts,
    TrainConfig,
    TrainResult,
    _Run,
    resolve_spec,
    train,
)

CONTINUABLE = ("constant", "wsd")
STATE_FORMAT = "mlbtc-train-state/1"


@dataclass
class TrainState:
    """A run paused at the end of a stable phase: enough to continue it exactly."""

    spec_hash: str
    seed: int
    schedule: str
    lr: float
    batch_size: int
    warmup: int
    step: int
    tokens: int
    flops: float
    first_loss: float | None
    model: dict[str, torch.Tensor] = field(repr=False)
    optimizer: dict[str, Any] = field(repr=False)
    data: torch.Tensor = field(repr=False)  # the training data generator's state
    curve: list[dict[str, Any]] = field(default_factory=list, repr=False)

    def _meta(self) -> dict[str, Any]:
        return {"format": STATE_FORMAT, "spec_hash": self.spec_hash, "seed": self.seed,
                "schedule": self.schedule, "lr": self.lr, "batch_size": self.batch_size,
                "warmup": self.warmup, "step": self.step, "tokens": self.tokens,
                "flops": self.flops, "first_loss": self.first_loss, "curve": self.curve}

    def to_bytes(self) -> bytes:
        """One safetensors blob: weights, optimizer tensors, generator state; the rest (the
        optimizer's param groups, counters, curve) as JSON in its metadata. No pickle."""
        from safetensors.torch import save

        tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in self.model.items()}
        slots: dict[str, dict[str, Any]] = {}
        for idx, state in self.optimizer["state"].items():
            for key, value in state.items():
                if isinstance(value, torch.Tensor):
                    tensors[f"optimizer.{idx}.{key}"] = value.detach().cpu().contiguous()
                else:
                    slots.setdefault(str(idx), {})[key] = value
        tensors["data"] = self.data.contiguous()
        meta = {**self._meta(), "param_groups": self.optimizer["param_groups"],
                "optimizer_scalars": slots}
        return save(tensors, metadata={"mlbtc": json.dumps(meta)})

    @classmethod
    def from_bytes(cls, blob: bytes, what: str = "the state") -> TrainState:
        from safetensors.torch import load

        meta: dict[str, Any] = {}
        try:
            n = int.from_bytes(blob[:8], "little")
            header = json.loads(blob[8:8 + n])
            meta = json.loads(header.get("__metadata__", {}).get("mlbtc", "{}"))
            tensors = load(blob)
        except (ValueError, TypeError, AttributeError) as exc:
            raise TrainingError(f"{what} is not a training state ({STATE_FORMAT}): "
                                f"{' '.join(str(exc).split())[:200]}") from None
        if not isinstance(meta, dict) or meta.get("format") != STATE_FORMAT:
            fmt = meta.get("format") if isinstance(meta, dict) else None
            raise TrainingError(f"{what} is not a training state ({STATE_FORMAT}), got "
                                f"format={fmt!r}")
        state: dict[int, dict[str, Any]] = {}
        for key, value in tensors.items():
            if key.startswith("optimizer."):
                _, idx, name = key.split(".", 2)
                state.setdefault(int(idx), {})[name] = value
        for idx, scalars in meta.pop("optimizer_scalars").items():
            state.setdefault(int(idx), {}).update(scalars)
        optimizer = {"state": state, "param_groups": meta.pop("param_groups")}
        model = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
        meta.pop("format")
        return cls(**meta, model=model, optimizer=optimizer, data=tensors["data"])

    def save(self, path: str | Path) -> None:
        Path(path).write_bytes(self.to_bytes())

    @classmethod
    def load(cls, path: str | Path) -> TrainState:
        return cls.from_bytes(Path(path).read_bytes(), str(path))


@dataclass
class RungRun:
    """One rung: its result, the state to continue from (None when it cannot continue), the
    compute this call spent, and whether it continued from a previous rung's state."""

    result: TrainResult
    state: TrainState | None
    spent_flops: float
    continued: bool


def rung_warmup(spec: ModelSpec, task: Task, budget: float, config: TrainConfig) -> int:
    """The warmup a rung chain keeps: ``config.warmup_steps``, else that of an uninterrupted run
    at ``budget`` (10% of its steps, at most ``MAX_WARMUP``)."""
    if config.warmup_steps is not None:
        return config.warmup_steps
    total, _ = StepCosts(resolve_spec(spec, task), task, config.batch_size).plan(
        float(budget), config.max_steps)
    return min(MAX_WARMUP, total // 10)


def _snapshot(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return weights, copy.deepcopy(optimizer.state_dict())


def train_rung(
    model_spec: ModelSpec,
    task: Task,
    budget_flops: float,
    seed: int = 0,
    config: TrainConfig | None = None,
    *,
    warmup: int,
    state: TrainState | None = None,
) -> RungRun:
    """Train (or continue ``state`` to) ``budget_flops``; see the module doc.

    A ``state`` from a different spec, seed or optimisation setting, or one past this budget's
    stable phase, is refused with a TrainingError (the caller retrains without it).
    """
    config = config or TrainConfig()
    if config.schedule not in CONTINUABLE:  # cosine depends on the horizon: retrain
        result = train(model_spec, task, budget_flops, seed, config)
        return RungRun(result, None, result.train_flops, False)
    start = time.perf_counter()
    spec = resolve_spec(model_spec, task)
    config = replace(config, warmup_steps=warmup)
    run = _Run(spec, task, float(budget_flops), seed, config, None)  # train()'s own loop
    stable_end = run.total - cooldown_steps(run.total, warmup, config.schedule)
    if state is not None:
        _check_state(state, spec, seed, config, warmup, stable_end)
        run.model.load_state_dict(state.model)
        run.optimizer.load_state_dict(state.optimizer)
        run.data.set_state(state.data)
        run.step, run.tokens, run.flops = state.step, state.tokens, state.flops
        run.first_loss, run.curve = state.first_loss, list(state.curve)
    resumed_flops = run.flops
    run.loop(until=stable_end)
    kept = None
    if run.status == "ok":
        weights, opt = _snapshot(run.model, run.optimizer)
        kept = TrainState(spec.hash(), seed, config.schedule, config.lr, config.batch_size,
                          warmup, run.step, run.tokens, run.flops, run.first_loss, weights, opt,
                          run.data.get_state(), list(run.curve))
        run.loop()  # the cooldown branch
    result = run.result(start)
    if result.status != "ok":
        kept = None
    return RungRun(result, kept, run.flops - resumed_flops, state is not None)


def _check_state(state: TrainState, spec: ModelSpec, seed: int, config: TrainConfig,
                 warmup: int, stable_end: int) -> None:
    want = {"spec_hash": spec.hash(), "seed": seed, "schedule": config.schedule,
            "lr": config.lr, "batch_size": config.batch_size, "warmup": warmup}
    for key, value in want.items():
        if getattr(state, key) != value:
            raise TrainingError(f"cannot continue: the saved state has {key}="
                                f"{getattr(state, key)!r}, this run needs {value!r}")
    if state.step > stable_end:
        raise TrainingError(f"cannot continue: the saved state is at step {state.step}, past "
                            f"this budget's stable phase ({stable_end} steps)")


__all__ = ["CONTINUABLE", "RungRun", "TrainState", "rung_warmup", "train_rung"]

"""The compute-budgeted training loop: spec + task + budget + seed -> metrics, curve, weights.

A run trains for the number of steps ``budget_flops`` buys at the model's *own* cost (DESIGN.md
section 3), so cheap architectures see more data. One step at sequence length ``T`` (the task's
curriculum may shorten early sequences, and then such steps are charged less) costs

    3 * model_flops(spec, T) * batch_size * T

(forward + backward = 3 x forward, non-embedding FLOPs per token at ``T``). The step count is
fixed before the first step: steps are taken while the cumulative cost stays within the budget,
so ``budget - one step < train_flops <= budget``. Evaluation is not charged.

AdamW with the µP parameter groups of :func:`mlbtc_search.mup.make_adamw` (betas 0.9/0.95;
the read-in and the position table keep multiplier 1), linear warmup then constant or cosine
(:mod:`trainers.schedule`), gradient clipping. Deterministic on the CPU for a seed: the seed
initialises the weights and a separate ``torch.Generator`` drives the training data; the
held-out data depend only on ``TrainConfig.eval_seed``, so every trial and seed is scored on the
same validation batches.

A non-finite training loss stops the run with status ``"nan"``, a loss above
``DIVERGENCE_FACTOR`` times the first step's loss with ``"diverged"``, Ctrl-C with
``"interrupted"``: no exception, the result says what was done and why it stopped. The loop knows
nothing about Optuna or Ray and prints nothing; ``progress`` receives a dict at most every
``PROGRESS_INTERVAL_S`` seconds and once at the end.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from mlbtc_search.errors import SpecError, TrainingError
from mlbtc_search.model import AdapterSpec, ModelSpec, build_model, model_flops, model_params
from mlbtc_search.mup import make_adamw

from .schedule import check_schedule, lr_factor
from .tasks import Task

STATUSES = ("ok", "diverged", "nan", "interrupted")
DIVERGENCE_FACTOR = 1e4
PROGRESS_INTERVAL_S = 0.5
FIXED_MULT = ("read_in.", "pos")  # µP multiplier 1 whatever the shape (small input dims)
MAX_WARMUP = 1000  # the paper's ICL warmup; shorter runs warm up over 10% of their steps
CURVE_POINTS = 100  # about this many curve entries per run (plus the eval points)


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings of one run (the budget and the seed are arguments of ``train``).

    ``warmup_steps=None`` warms up over 10% of the run's steps, at most ``MAX_WARMUP``.
    ``eval_every=None`` evaluates about 10 times per run; the end of the run is always evaluated.
    ``eval_batch_size=None`` uses ``batch_size``. ``max_steps`` caps the steps the budget buys.
    ``threads`` sets ``torch.set_num_threads`` (process-wide) when given.
    """

    lr: float = 1e-3
    batch_size: int = 64
    warmup_steps: int | None = None
    schedule: str = "constant"
    grad_clip: float = 1.0
    weight_decay: float = 0.0
    eval_batches: int = 8
    eval_batch_size: int | None = None
    eval_every: int | None = None
    eval_seed: int = 1234
    max_steps: int | None = None
    device: str = "cpu"
    threads: int | None = None

    def __post_init__(self) -> None:
        check_schedule(self.schedule)
        if not (isinstance(self.lr, (int, float)) and self.lr > 0 and math.isfinite(self.lr)):
            raise SpecError(f"lr must be a positive number, got {self.lr!r}", ("lr",))
        for name in ("batch_size", "eval_batches"):
            _check_int(name, getattr(self, name), 1)
        for name in ("eval_batch_size", "eval_every", "max_steps", "threads"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), 1)
        if self.warmup_steps is not None:
            _check_int("warmup_steps", self.warmup_steps, 0)
        for name in ("grad_clip", "weight_decay"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and value >= 0):
                raise SpecError(f"{name} must be a number >= 0, got {value!r}", (name,))


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise SpecError(f"{name} must be an integer >= {minimum}, got {value!r}", (name,))


@dataclass(kw_only=True)
class TrainResult:
    """Everything one run produced. ``to_json()`` is all of it but the module, JSON-safe."""

    status: str
    reason: str | None
    val_loss: float
    metric: float
    metric_name: str
    flops_per_token: float
    params: int
    steps: int
    tokens: int
    train_flops: float
    budget_flops: float
    seconds: float
    curve: list[dict[str, Any]]
    spec: ModelSpec
    task: dict[str, Any]
    seed: int
    config: TrainConfig = field(default_factory=TrainConfig)
    model: nn.Module | None = field(default=None, repr=False)

    @property
    def hash(self) -> str:
        return self.spec.hash()

    @property
    def family(self) -> str:
        return self.spec.family

    def to_json(self) -> dict[str, Any]:
        """A JSON-able dict (non-finite floats become ``None``) of every field but ``model``."""
        out = {
            "status": self.status, "reason": self.reason, "val_loss": self.val_loss,
            "metric": self.metric, "metric_name": self.metric_name,
            "flops_per_token": self.flops_per_token, "params": self.params,
            "steps": self.steps, "tokens": self.tokens, "train_flops": self.train_flops,
            "budget_flops": self.budget_flops, "seconds": self.seconds, "seed": self.seed,
            "hash": self.hash, "family": self.family, "task": self.task,
            "spec": self.spec.to_dict(), "config": asdict(self.config), "curve": self.curve,
        }
        return _json_safe(out)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The trained weights: contiguous CPU tensors sharing no memory (safetensors-ready)."""
        if self.model is None:
            raise TrainingError("this result carries no model (it was not trained here)")
        return {k: v.detach().cpu().contiguous().clone() for k, v in
                self.model.state_dict().items()}


def _json_safe(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


# ---- spec, budget and optimizer -----------------------------------------------------------
def resolve_spec(spec: ModelSpec, task: Task) -> ModelSpec:
    """``spec`` with the task's adapter; a SpecError if the model does not fit the task.

    The spec keeps its own ``max_seq_len`` (it sized the position table and the default MLR block
    sizes), which must be at least the task's sequence length.
    """
    a = task.adapter
    adapter = AdapterSpec(a.input_kind, a.input_dim, a.output_dim)
    if spec.adapter is not None and spec.adapter != adapter:
        raise SpecError(f"the model's adapter {spec.adapter.to_dict()} does not fit task "
                        f"{task.name!r}, which needs {adapter.to_dict()}", ("adapter",))
    if spec.max_seq_len < a.seq_len:
        raise SpecError(f"max_seq_len >= the task's sequence length {a.seq_len} must hold, got "
                        f"max_seq_len={spec.max_seq_len} (task {task.name!r})", ("max_seq_len",))
    return spec if spec.adapter is not None else spec.with_adapter(adapter)


class StepCosts:
    """Training FLOPs of each step: ``3 * model_flops(spec, T) * batch_size * T`` at ``T`` =
    ``task.seq_len_at(step)``, with ``model_flops`` cached per ``T``."""

    def __init__(self, spec: ModelSpec, task: Task, batch_size: int):
        self.spec, self.task, self.batch_size = spec, task, batch_size
        self._per_T: dict[int, float] = {}

    def at_len(self, T: int) -> float:
        if T not in self._per_T:
            # FLOPs are integers; rounding keeps cumulative sums exact (no float drift past budget)
            self._per_T[T] = float(round(3 * model_flops(self.spec, T) * self.batch_size * T))
        return self._per_T[T]

    def __call__(self, step: int) -> float:
        return self.at_len(self.task.seq_len_at(step))

    def plan(self, budget: float, max_steps: int | None = None) -> tuple[int, float]:
        """``(steps, flops)``: the most steps whose cumulative cost stays within ``budget``.

        Once a step is at the task's full sequence length the curriculum is over (curricula only
        shorten early sequences), so the remaining steps are counted in one division.
        """
        first = self(0)
        if first > budget:
            raise TrainingError(
                f"budget too small for one step: one step costs {first:.4g} FLOPs, budget is "
                f"{budget:.4g}; use --budget >= {first:.4g}")
        full_T = self.task.adapter.seq_len
        limit = math.inf if max_steps is None else max_steps
        steps, spent = 0, 0.0
        while steps < limit:
            T = self.task.seq_len_at(steps)
            cost = self.at_len(T)
            if spent + cost > budget:
                break
            if T == full_T:
                n = min(int((budget - spent) // cost), limit - steps)
                while n > 0 and spent + n * cost > budget:  # float rounding
                    n -= 1
                steps, spent = steps + int(n), spent + n * cost
                break
            steps, spent = steps + 1, spent + cost
        return steps, spent


def make_optimizer(model: nn.Module, spec: ModelSpec, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the µP groups (each group keeps its ``lr_mult`` for the schedule)."""
    return make_adamw(model, config.lr, base_width=spec.base_width,
                      weight_decay=config.weight_decay, betas=(0.9, 0.95),
                      fixed_mult=list(FIXED_MULT))


# ---- the loop -----------------------------------------------------------------------------
def train(
    model_spec: ModelSpec,
    task: Task,
    budget_flops: float,
    seed: int = 0,
    config: TrainConfig | None = None,
    progress: Callable[[dict[str, Any]], None] | None = None,
) -> TrainResult:
    """Train ``model_spec`` on ``task`` for the steps ``budget_flops`` buys; see the module doc.

    Raises SpecError if the model does not fit the task and TrainingError if the budget does not
    buy one step; training failures (NaN, divergence, Ctrl-C) are reported in the result.
    """
    config = config or TrainConfig()
    start = time.perf_counter()
    if not (isinstance(budget_flops, (int, float)) and budget_flops > 0):
        raise TrainingError(f"budget_flops must be a positive number, got {budget_flops!r}")
    spec = resolve_spec(model_spec, task)
    costs = StepCosts(spec, task, config.batch_size)
    total, planned_flops = costs.plan(float(budget_flops), config.max_steps)
    warmup = (min(MAX_WARMUP, total // 10) if config.warmup_steps is None
              else config.warmup_steps)
    eval_every = config.eval_every or max(1, total // 10)
    log_every = max(1, total // CURVE_POINTS)
    if config.threads is not None:
        torch.set_num_threads(config.threads)

    device = torch.device(config.device)
    torch.manual_seed(seed)
    model = build_model(spec).to(device)
    optimizer = make_optimizer(model, spec, config)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    data = torch.Generator().manual_seed(seed)

    def evaluate() -> dict[str, float]:
        return task.evaluate(model, batches=config.eval_batches,
                             batch_size=config.eval_batch_size or config.batch_size,
                             seed=config.eval_seed)

    status, reason = "ok", None
    curve: list[dict[str, Any]] = []
    step = tokens = 0
    flops = 0.0
    first_loss: float | None = None
    window: list[float] = []  # train losses since the last curve entry
    last_eval: dict[str, float] = {}
    loop_start = last_report = time.perf_counter()

    def report(loss: float, final: bool = False) -> None:
        elapsed = time.perf_counter() - loop_start
        eta = elapsed * (planned_flops - flops) / flops if flops > 0 else None
        progress({"step": step, "steps": total, "loss": loss, "tokens": tokens,
                  "tokens_per_s": tokens / elapsed if elapsed > 0 else 0.0,
                  "eta_s": 0.0 if final else eta, "elapsed_s": elapsed, "flops": flops,
                  "budget_flops": float(budget_flops), "final": final, **last_eval})

    model.train()
    try:
        while step < total:
            factor = lr_factor(step, total, warmup, config.schedule)
            for group in optimizer.param_groups:
                group["lr"] = config.lr * group["lr_mult"] * factor
            inputs, targets = task.batch("train", config.batch_size, data, step)
            inputs, targets = inputs.to(device), targets.to(device)
            loss = task.loss(model(inputs), targets)
            value = float(loss.detach())
            if not math.isfinite(value):
                status = "nan"
                reason = f"the training loss became {value} at step {step + 1} of {total}"
                break
            if first_loss is None:
                first_loss = value
            if value > DIVERGENCE_FACTOR * max(first_loss, 1e-12):
                status = "diverged"
                reason = (f"the training loss {value:.4g} at step {step + 1} of {total} exceeds "
                          f"{DIVERGENCE_FACTOR:g} x the first step's {first_loss:.4g}")
                break
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
            optimizer.step()

            T = inputs.shape[1]
            step, tokens, flops = step + 1, tokens + config.batch_size * T, flops + costs.at_len(T)
            window.append(value)
            is_eval = step % eval_every == 0 or step == total
            if is_eval or step % log_every == 0:
                entry: dict[str, Any] = {"step": step, "tokens": tokens, "flops": flops,
                                         "train_loss": sum(window) / len(window),
                                         "lr": config.lr * factor}
                window = []
                if is_eval:
                    last_eval = evaluate()
                    entry.update(last_eval)
                curve.append(entry)
            if progress is not None and time.perf_counter() - last_report >= PROGRESS_INTERVAL_S:
                last_report = time.perf_counter()
                report(value)
    except KeyboardInterrupt:
        status = "interrupted"
        reason = f"interrupted (KeyboardInterrupt) after step {step} of {total}"

    val_loss = metric = math.nan
    if status in ("ok", "interrupted") and step > 0:
        if curve and curve[-1]["step"] == step and "val_loss" in curve[-1]:
            val_loss, metric = curve[-1]["val_loss"], curve[-1]["metric"]
        else:
            try:
                last_eval = evaluate()
                val_loss, metric = last_eval["val_loss"], last_eval["metric"]
                curve.append({"step": step, "tokens": tokens, "flops": flops,
                              "train_loss": sum(window) / len(window) if window else math.nan,
                              **last_eval})
            except KeyboardInterrupt:
                status = "interrupted"
                reason = f"interrupted (KeyboardInterrupt) after step {step} of {total}"
        if status == "ok" and not math.isfinite(val_loss):
            status, reason = "nan", f"the validation loss is {val_loss} after {step} steps"
    model.eval()
    if progress is not None:
        report(curve[-1]["train_loss"] if curve else math.nan, final=True)
    return TrainResult(
        status=status, reason=reason, val_loss=float(val_loss), metric=float(metric),
        metric_name=task.metric_name,
        flops_per_token=float(model_flops(spec, task.adapter.seq_len)),
        params=int(model_params(spec)), steps=step, tokens=tokens, train_flops=flops,
        budget_flops=float(budget_flops), seconds=time.perf_counter() - start, curve=curve,
        spec=spec, task={"name": task.name, "options": dict(task.options)}, seed=seed,
        config=config, model=model,
    )

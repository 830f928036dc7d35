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
same validation batches. On CUDA (:mod:`trainers.device`: bf16 autocast, optional compile) the
batches are made on the device from the same seeds (deterministic, other numbers than the CPU's)
and the kernels are not bitwise deterministic.

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

from mlbtc_search.checks import check_int
from mlbtc_search.errors import SpecError, TrainingError
from mlbtc_search.malloc import reuse_freed_memory
from mlbtc_search.model import AdapterSpec, ModelSpec, build_model, model_flops, model_params
from mlbtc_search.mup import make_adamw
from mlbtc_search.yamlio import json_safe

from .device import (
    autocast,
    autocast_dtype,
    check_autocast,
    check_compile,
    check_device,
    compiled,
    resolve_device,
)
from .schedule import check_schedule, lr_factor
from .tasks import Task

STATUSES = ("ok", "diverged", "nan", "interrupted")
DIVERGENCE_FACTOR = 1e4
PROGRESS_INTERVAL_S = 0.5
FIXED_MULT = ("read_in.", "pos")  # µP multiplier 1 whatever the shape (small input dims)
MAX_WARMUP = 1000  # the paper's ICL warmup; shorter runs warm up over 10% of their steps
MAX_BATCH = 1 << 16  # batch sizes and eval batches: refused before anything is allocated
CURVE_POINTS = 100  # about this many curve entries per run (plus the eval points)


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings of one run (the budget and the seed are arguments of ``train``).

    ``warmup_steps=None`` warms up over 10% of the run's steps, at most ``MAX_WARMUP``.
    ``eval_every=None`` evaluates about 10 times per run; the end of the run is always evaluated.
    ``eval_batch_size=None`` uses ``batch_size``. ``max_steps`` caps the steps the budget buys.
    ``threads`` sets ``torch.set_num_threads`` (process-wide) when given. ``device``
    (``cpu``/``cuda``/``cuda:N``/``auto``), ``autocast`` (``auto``: bf16 on CUDA) and ``compile``
    are described in :mod:`trainers.device`.
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
    autocast: str = "auto"
    compile: bool | str = False

    def __post_init__(self) -> None:
        check_schedule(self.schedule)
        check_device(self.device)
        check_autocast(self.autocast)
        check_compile(self.compile)
        if not (isinstance(self.lr, (int, float)) and self.lr > 0 and math.isfinite(self.lr)):
            raise SpecError(f"lr must be a positive number, got {self.lr!r}", ("lr",))
        for name in ("batch_size", "eval_batches"):
            check_int(getattr(self, name), (name,), name, high=MAX_BATCH)
        for name in ("eval_batch_size", "eval_every", "max_steps", "threads"):
            if getattr(self, name) is not None:
                high = MAX_BATCH if name == "eval_batch_size" else None
                check_int(getattr(self, name), (name,), name, high=high)
        if self.warmup_steps is not None:
            check_int(self.warmup_steps, ("warmup_steps",), "warmup_steps", 0)
        for name in ("grad_clip", "weight_decay"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and value >= 0):
                raise SpecError(f"{name} must be a number >= 0, got {value!r}", (name,))


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
        return json_safe(out)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The trained weights: contiguous CPU tensors sharing no memory (safetensors-ready)."""
        if self.model is None:
            raise TrainingError("this result carries no model (it was not trained here)")
        return {k: v.detach().cpu().contiguous().clone() for k, v in
                self.model.state_dict().items()}


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
    run = _Run(spec, task, float(budget_flops), seed, config, progress)
    run.loop()
    return run.result(start)


class _Run:
    """The state of one training run: the plan (steps, warmup, eval and log cadence), the model
    and optimizer, and what the loop has done so far (step, tokens, FLOPs, curve, status)."""

    def __init__(self, spec: ModelSpec, task: Task, budget: float, seed: int,
                 config: TrainConfig, progress: Callable[[dict[str, Any]], None] | None):
        self.task, self.budget, self.config, self.progress = task, budget, config, progress
        self.spec, self.seed = spec, seed
        self.costs = StepCosts(spec, task, config.batch_size)
        self.total, self.planned_flops = self.costs.plan(budget, config.max_steps)
        self.warmup = (min(MAX_WARMUP, self.total // 10) if config.warmup_steps is None
                       else config.warmup_steps)
        self.eval_every = config.eval_every or max(1, self.total // 10)
        self.log_every = max(1, self.total // CURVE_POINTS)
        if config.threads is not None:
            torch.set_num_threads(config.threads)
        self.device = resolve_device(config.device)
        if self.device.type == "cpu":  # freed activations stay in the heap for the next step
            reuse_freed_memory()
        self.amp = autocast_dtype(config.autocast, self.device)
        self.on_device = {} if self.device.type == "cpu" else {"device": self.device}
        torch.manual_seed(seed)
        self.model = build_model(spec).to(self.device)
        self.forward = compiled(self.model, config.compile)  # self.model keeps the state dict
        self.optimizer = make_optimizer(self.model, spec, config)
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]
        self.data = torch.Generator().manual_seed(seed)
        self.status: str = "ok"
        self.reason: str | None = None
        self.curve: list[dict[str, Any]] = []
        self.step = self.tokens = 0
        self.flops = 0.0
        self.first_loss: float | None = None
        self.window: list[float] = []  # train losses since the last curve entry
        self.last_eval: dict[str, float] = {}
        self.loop_start = self.last_report = time.perf_counter()

    def evaluate(self) -> dict[str, float]:
        c = self.config
        with autocast(self.amp, self.device):
            return self.task.evaluate(self.forward, batches=c.eval_batches,
                                      batch_size=c.eval_batch_size or c.batch_size,
                                      seed=c.eval_seed)

    def report(self, loss: float, final: bool = False) -> None:
        if self.progress is None:
            return
        elapsed = time.perf_counter() - self.loop_start
        flops = self.flops
        eta = elapsed * (self.planned_flops - flops) / flops if flops > 0 else None
        self.progress({"step": self.step, "steps": self.total, "loss": loss,
                       "tokens": self.tokens,
                       "tokens_per_s": self.tokens / elapsed if elapsed > 0 else 0.0,
                       "eta_s": 0.0 if final else eta, "elapsed_s": elapsed, "flops": flops,
                       "budget_flops": self.budget, "final": final, **self.last_eval})

    def _interrupted(self) -> None:
        self.status = "interrupted"
        self.reason = f"interrupted (KeyboardInterrupt) after step {self.step} of {self.total}"

    def result(self, start: float) -> TrainResult:
        """Evaluate once more if the curve's last point is not the last step, then the result
        (``start``: ``time.perf_counter()`` when the run began, for ``seconds``)."""
        val_loss, metric = self.final_eval()
        self.model.eval()
        if self.progress is not None:
            self.report(self.curve[-1]["train_loss"] if self.curve else math.nan, final=True)
        spec, task = self.spec, self.task
        return TrainResult(
            status=self.status, reason=self.reason, val_loss=float(val_loss),
            metric=float(metric), metric_name=task.metric_name,
            flops_per_token=float(model_flops(spec, task.adapter.seq_len)),
            params=int(model_params(spec)), steps=self.step, tokens=self.tokens,
            train_flops=self.flops, budget_flops=self.budget,
            seconds=time.perf_counter() - start, curve=self.curve, spec=spec,
            task={"name": task.name, "options": dict(task.options)}, seed=self.seed,
            config=self.config, model=self.model)

    def loop(self, until: int | None = None) -> None:
        """Take the planned steps (up to step ``until``: a rung's stable phase, see
        :mod:`trainers.continuation`); stop early on NaN, divergence or Ctrl-C (status says
        which)."""
        self.model.train()
        stop = self.total if until is None else until
        try:
            while self.step < stop and self._one_step():
                pass
        except KeyboardInterrupt:
            self._interrupted()

    def _one_step(self) -> bool:
        """One optimizer step (and its curve entry); False when the loss says stop."""
        c = self.config
        factor = lr_factor(self.step, self.total, self.warmup, c.schedule)
        for group in self.optimizer.param_groups:
            group["lr"] = c.lr * group["lr_mult"] * factor
        inputs, targets = self.task.batch("train", c.batch_size, self.data, self.step,
                                          **self.on_device)  # made on the device
        with autocast(self.amp, self.device):  # the tasks' losses are float32
            loss = self.task.loss(self.forward(inputs), targets)
        value = float(loss.detach())
        if not self._loss_ok(value):
            return False
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if c.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, c.grad_clip)
        self.optimizer.step()
        T = inputs.shape[1]
        self.step += 1
        self.tokens += c.batch_size * T
        self.flops += self.costs.at_len(T)
        self.window.append(value)
        self._record(c.lr * factor)
        if (self.progress is not None
                and time.perf_counter() - self.last_report >= PROGRESS_INTERVAL_S):
            self.last_report = time.perf_counter()
            self.report(value)
        return True

    def _loss_ok(self, value: float) -> bool:
        where = f"at step {self.step + 1} of {self.total}"
        if not math.isfinite(value):
            self.status, self.reason = "nan", f"the training loss became {value} {where}"
            return False
        if self.first_loss is None:
            self.first_loss = value
        if value > DIVERGENCE_FACTOR * max(self.first_loss, 1e-12):
            self.status = "diverged"
            self.reason = (f"the training loss {value:.4g} {where} exceeds "
                           f"{DIVERGENCE_FACTOR:g} x the first step's {self.first_loss:.4g}")
            return False
        return True

    def _record(self, lr: float) -> None:
        """A curve entry every ``log_every`` steps, with an evaluation every ``eval_every``."""
        is_eval = self.step % self.eval_every == 0 or self.step == self.total
        if not (is_eval or self.step % self.log_every == 0):
            return
        entry: dict[str, Any] = {"step": self.step, "tokens": self.tokens, "flops": self.flops,
                                 "train_loss": sum(self.window) / len(self.window), "lr": lr}
        self.window = []
        if is_eval:
            self.last_eval = self.evaluate()
            entry.update(self.last_eval)
        self.curve.append(entry)

    def final_eval(self) -> tuple[float, float]:
        """``(val_loss, metric)`` at the last step (NaN when nothing was trained or it failed);
        evaluates once more unless the last curve entry already did."""
        if self.status not in ("ok", "interrupted") or self.step == 0:
            return math.nan, math.nan
        val_loss = metric = math.nan
        last = self.curve[-1] if self.curve else {}
        if last.get("step") == self.step and "val_loss" in last:
            val_loss, metric = last["val_loss"], last["metric"]
        else:
            try:
                self.last_eval = self.evaluate()
                val_loss, metric = self.last_eval["val_loss"], self.last_eval["metric"]
                w = self.window
                self.curve.append({"step": self.step, "tokens": self.tokens, "flops": self.flops,
                                   "train_loss": sum(w) / len(w) if w else math.nan,
                                   **self.last_eval})
            except KeyboardInterrupt:
                self._interrupted()
        if self.status == "ok" and not math.isfinite(val_loss):
            self.status = "nan"
            self.reason = f"the validation loss is {val_loss} after {self.step} steps"
        return val_loss, metric

"""The budgeted training loop: budget -> steps, determinism, µP groups, failures, schedule."""

from __future__ import annotations

import importlib
import json
import math
from dataclasses import replace

import pytest
import torch

from mlbtc_search.errors import SpecError, TrainingError
from mlbtc_search.model import AdapterSpec, ModelSpec, build_model, model_flops
from trainers import StepCosts, TrainConfig, get_task, lr_factor, resolve_spec, train
from trainers.tasks import IclRegressionTask

# ``trainers.train`` is the function (re-exported); the module is reached through importlib.
train_module = importlib.import_module("trainers.train")
FAST = TrainConfig(batch_size=8, eval_batches=1, threads=1)


def tiny_spec(kind: str = "standard", width: int = 16, **attention) -> ModelSpec:
    return ModelSpec.from_dict({"width": width, "depth": 1,
                                "attention": {"kind": kind, "heads": 2, **attention},
                                "max_seq_len": 8})


def tiny_task(**options) -> IclRegressionTask:
    options = {"n_dims": 2, "n_points": 4, "curriculum": False, "curriculum_start_dims": 1,
               **options}
    return get_task("icl_regression", **options)


def step_cost(spec: ModelSpec, task, batch_size: int = 8) -> float:
    return StepCosts(resolve_spec(spec, task), task, batch_size)(0)


# ---- the budget -----------------------------------------------------------------------------
def test_step_cost_is_three_forward_passes_at_the_models_own_cost():
    spec, task = tiny_spec(), tiny_task()
    T = task.adapter.seq_len
    assert step_cost(spec, task) == pytest.approx(3 * model_flops(resolve_spec(spec, task), T)
                                                  * 8 * T)


def test_steps_follow_the_budget():
    spec, task = tiny_spec(), tiny_task()
    cost = step_cost(spec, task)
    budget = 10.5 * cost
    result = train(spec, task, budget, config=FAST)
    assert result.status == "ok"
    assert result.steps == 10
    assert budget - cost < result.train_flops <= budget
    assert result.tokens == 10 * 8 * task.adapter.seq_len
    assert result.curve[-1]["flops"] == result.train_flops
    doubled = StepCosts(resolve_spec(spec, task), task, 8).plan(2 * budget)[0]
    assert doubled in (20, 21)


def test_a_cheaper_model_gets_more_steps_at_equal_budget():
    task = tiny_task()
    cheap, dear = tiny_spec(width=16), tiny_spec(width=32)
    budget = 20 * step_cost(dear, task)
    n_cheap = StepCosts(resolve_spec(cheap, task), task, 8).plan(budget)[0]
    n_dear = StepCosts(resolve_spec(dear, task), task, 8).plan(budget)[0]
    assert n_dear == 20
    assert n_cheap > 2 * n_dear


def test_curriculum_steps_are_charged_at_their_shorter_length():
    spec = ModelSpec.from_dict({"width": 16, "depth": 1, "attention": {"kind": "standard",
                                                                        "heads": 2},
                                "max_seq_len": 16})
    task = get_task("icl_regression", n_dims=4, curriculum_start_dims=2, curriculum_interval=3)
    costs = StepCosts(resolve_spec(spec, task), task, 8)
    assert task.seq_len_at(0) < task.adapter.seq_len
    assert costs(0) < costs(100)
    budget = 12 * costs(100)
    steps, flops = costs.plan(budget)
    assert steps > 12
    assert flops == pytest.approx(sum(costs(s) for s in range(steps)))
    assert budget - costs(steps) < flops <= budget
    result = train(spec, task, budget, config=FAST)
    assert (result.steps, result.train_flops) == (steps, flops)


def test_max_steps_caps_the_budget():
    spec, task = tiny_spec(), tiny_task()
    result = train(spec, task, 100 * step_cost(spec, task),
                   config=replace(FAST, max_steps=3))
    assert result.steps == 3


def test_a_budget_below_one_step_is_a_training_error():
    spec, task = tiny_spec(), tiny_task()
    cost = step_cost(spec, task)
    with pytest.raises(TrainingError, match=r"budget too small for one step: one step costs "
                                            r".* FLOPs, budget is .*; use --budget >= "):
        train(spec, task, cost / 2, config=FAST)


# ---- fitting the task ------------------------------------------------------------------------
def test_a_model_for_another_adapter_does_not_fit_the_task():
    spec = tiny_spec().with_adapter(AdapterSpec("tokens", 256, 256))
    with pytest.raises(SpecError, match=r"adapter.*does not fit task 'icl_regression'"):
        train(spec, tiny_task(), 1e12, config=FAST)


def test_a_model_shorter_than_the_task_does_not_fit():
    with pytest.raises(SpecError, match=r"max_seq_len >= the task's sequence length 16"):
        train(tiny_spec(), tiny_task(n_points=8), 1e12, config=FAST)


def test_the_resolved_spec_carries_the_tasks_adapter():
    result = train(tiny_spec(), tiny_task(), 2 * step_cost(tiny_spec(), tiny_task()),
                   config=FAST)
    assert result.spec.adapter == AdapterSpec("vector", 2, 1)
    assert result.spec.max_seq_len == 8
    assert result.task == {"name": "icl_regression", "options": tiny_task().options}


# ---- determinism, results ---------------------------------------------------------------------
def test_a_seed_determines_the_run():
    spec, task = tiny_spec(), tiny_task()
    budget = 6 * step_cost(spec, task)
    a, b = (train(spec, task, budget, seed=3, config=FAST) for _ in range(2))
    c = train(spec, task, budget, seed=4, config=FAST)
    assert a.curve == b.curve
    assert a.val_loss == b.val_loss
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_result_fields_json_and_state_dict():
    spec, task = tiny_spec(), tiny_task()
    result = train(spec, task, 20.5 * step_cost(spec, task),
                   config=replace(FAST, eval_every=5))
    data = json.loads(json.dumps(result.to_json(), allow_nan=False))
    for key in ("status", "reason", "val_loss", "metric", "metric_name", "flops_per_token",
                "params", "steps", "tokens", "train_flops", "seconds", "curve", "spec", "task",
                "seed", "hash", "family", "budget_flops"):
        assert key in data
    assert data["metric_name"] == "last_sq_error"
    assert data["flops_per_token"] == model_flops(result.spec, 8)
    assert ModelSpec.from_dict(data["spec"]) == result.spec
    assert [e["step"] for e in result.curve if "val_loss" in e] == [5, 10, 15, 20]
    assert all({"step", "tokens", "flops", "train_loss"} <= set(e) for e in result.curve)
    assert result.curve[-1]["val_loss"] == result.val_loss
    assert not result.model.training
    state = result.state_dict()
    assert all(t.device.type == "cpu" and t.is_contiguous() for t in state.values())
    fresh = build_model(result.spec)
    fresh.load_state_dict(state, strict=True)
    x = task.batch("val", 2, torch.Generator().manual_seed(0))[0]
    assert torch.equal(fresh.eval()(x), result.model(x))


@pytest.mark.slow
def test_the_loss_decreases_on_icl_regression():
    spec = ModelSpec.from_dict({"width": 32, "depth": 2, "attention": {"kind": "standard",
                                                                        "heads": 1},
                                "max_seq_len": 16})
    task = get_task("icl_regression", n_dims=1, n_points=8, curriculum=False,
                    curriculum_start_dims=1)
    config = TrainConfig(lr=5e-4, batch_size=32, eval_batches=4, threads=1)
    untrained = task.evaluate(build_model(resolve_spec(spec, task)), batches=4, batch_size=32,
                              seed=config.eval_seed)["val_loss"]
    result = train(spec, task, 300 * step_cost(spec, task, 32), config=config)
    assert result.status == "ok" and result.steps == 300
    assert result.val_loss < 0.8 * untrained


# ---- µP and the schedule -----------------------------------------------------------------------
def test_the_optimizer_uses_the_mup_groups_and_the_schedule(monkeypatch):
    made = []

    def spy(model, spec, config):
        made.append(optimizer := real(model, spec, config))
        return optimizer

    real = train_module.make_optimizer
    monkeypatch.setattr(train_module, "make_optimizer", spy)
    spec, task = tiny_spec(width=32), tiny_task()
    config = replace(FAST, lr=2e-3, warmup_steps=4)
    result = train(spec, task, 2.5 * step_cost(spec, task), config=config)
    (optimizer,) = made
    groups = optimizer.param_groups
    assert len({g["lr_mult"] for g in groups}) >= 3  # hidden 64/32, MLP down 64/128, fixed 1
    assert optimizer.defaults["betas"] == (0.9, 0.95)
    factor = lr_factor(1, 2, 4)  # the last step's warmup factor: 2/4
    for g in groups:
        assert g["lr"] == pytest.approx(2e-3 * g["lr_mult"] * factor)
    names = {id(p): n for n, p in result.model.named_parameters()}
    mult = {names[id(p)]: g["lr_mult"] for g in groups for p in g["params"]}
    assert mult["read_in.weight"] == mult["pos"] == 1.0
    assert mult["blocks.0.mlp.up.cores.0"] == pytest.approx(64 / 32)
    assert mult["blocks.0.mlp.down.cores.0"] == pytest.approx(64 / 128)
    assert mult["read_out.weight"] == pytest.approx(64 / 32)


def test_lr_factor_warmup_constant_and_cosine():
    assert [lr_factor(s, 10, 4) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert lr_factor(9, 10, 4, "constant") == 1.0
    cosine = [lr_factor(s, 10, 2, "cosine") for s in range(10)]
    assert cosine[:3] == [0.5, 1.0, 1.0]
    assert cosine[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(cosine[2:], cosine[3:], strict=False))
    assert lr_factor(0, 1, 0, "cosine") == 1.0
    with pytest.raises(SpecError, match="schedule must be one of 'constant', 'cosine'"):
        lr_factor(0, 10, 1, "linear")


def test_bad_config_values_are_spec_errors():
    with pytest.raises(SpecError, match="lr must be a positive number"):
        TrainConfig(lr=0)
    with pytest.raises(SpecError, match="batch_size must be an integer >= 1"):
        TrainConfig(batch_size=0)


# ---- failures end the run with a status, not an exception -------------------------------------
class NanAfter(IclRegressionTask):
    """An ICL task whose loss turns NaN from the ``k``-th training batch on."""

    def __init__(self, k: int, **options):
        super().__init__(**options)
        self.k, self.calls = k, 0

    def loss(self, outputs, targets):
        loss = super().loss(outputs, targets)
        if outputs.requires_grad:
            self.calls += 1
            if self.calls >= self.k:
                return loss * math.nan
        return loss


class InterruptAt(IclRegressionTask):
    """An ICL task that raises KeyboardInterrupt when asked for training batch ``step``."""

    def __init__(self, step: int, **options):
        super().__init__(**options)
        self.stop = step

    def batch(self, split, batch_size, generator, step=0):
        if split == "train" and step == self.stop:
            raise KeyboardInterrupt
        return super().batch(split, batch_size, generator, step)


TINY_OPTIONS = {"n_dims": 2, "n_points": 4, "curriculum": False, "curriculum_start_dims": 1}


def test_a_nan_loss_stops_the_run_with_a_reason():
    spec, task = tiny_spec(), NanAfter(3, **TINY_OPTIONS)
    result = train(spec, task, 10 * step_cost(spec, task), config=FAST)
    assert result.status == "nan"
    assert "the training loss became nan at step 3 of 10" in result.reason
    assert result.steps == 2
    assert math.isnan(result.val_loss)
    assert result.to_json()["val_loss"] is None
    json.dumps(result.to_json(), allow_nan=False)


def test_a_huge_learning_rate_diverges_without_an_exception():
    spec, task = tiny_spec(), tiny_task()
    result = train(spec, task, 30 * step_cost(spec, task),
                   config=replace(FAST, lr=1e6, warmup_steps=0, grad_clip=0.0))
    assert result.status in ("nan", "diverged")
    assert result.reason and "step" in result.reason
    assert result.steps < 30


def test_ctrl_c_returns_what_was_done():
    spec, task = tiny_spec(), InterruptAt(4, **TINY_OPTIONS)
    result = train(spec, task, 10 * step_cost(spec, task), config=FAST)
    assert result.status == "interrupted"
    assert "after step 4 of 10" in result.reason
    assert result.steps == 4
    assert math.isfinite(result.val_loss)
    assert result.curve[-1]["step"] == 4 and "val_loss" in result.curve[-1]


def test_progress_is_reported_and_ends_with_a_final_report(monkeypatch):
    monkeypatch.setattr(train_module, "PROGRESS_INTERVAL_S", 0.0)
    spec, task = tiny_spec(), tiny_task()
    reports: list[dict] = []
    train(spec, task, 5 * step_cost(spec, task), config=FAST, progress=reports.append)
    assert [r["step"] for r in reports] == [1, 2, 3, 4, 5, 5]
    assert reports[-1]["final"] and reports[-1]["eta_s"] == 0.0
    for key in ("step", "steps", "loss", "tokens_per_s", "eta_s", "flops", "budget_flops"):
        assert key in reports[0]
    assert reports[0]["steps"] == 5

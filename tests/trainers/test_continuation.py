"""Training by rungs: continuing from a stable-phase state equals uninterrupted training."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from mlbtc_search.errors import TrainingError
from mlbtc_search.model import ModelSpec
from trainers import StepCosts, TrainConfig, get_task, lr_factor, resolve_spec, train
from trainers.continuation import TrainState, rung_warmup, train_rung
from trainers.schedule import cooldown_steps

FAST = TrainConfig(batch_size=8, eval_batches=1, threads=1)


def setup():
    spec = ModelSpec.from_dict({"width": 16, "depth": 1, "max_seq_len": 8,
                                "attention": {"kind": "standard", "heads": 2}})
    task = get_task("icl_regression", n_dims=2, n_points=4, curriculum=False,
                    curriculum_start_dims=1)
    step = StepCosts(resolve_spec(spec, task), task, FAST.batch_size)(0)
    return spec, task, step


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_wsd_schedule_is_stable_until_its_cooldown():
    total, warmup = 50, 5
    cool = cooldown_steps(total, warmup, "wsd")
    assert cool == 10
    factors = [lr_factor(s, total, warmup, "wsd") for s in range(total)]
    assert factors[warmup:total - cool] == [1.0] * (total - cool - warmup)
    assert all(a > b > 0 for a, b in zip(factors[-cool:], factors[-cool + 1:], strict=False))
    # the stable part does not depend on the horizon: a longer run shares it
    assert [lr_factor(s, 80, warmup, "wsd") for s in range(total - cool)] == factors[:-cool]


@pytest.mark.parametrize("schedule", ["wsd", "constant"])
def test_continuing_equals_uninterrupted_training(schedule, tmp_path):
    spec, task, step = setup()
    config = replace(FAST, schedule=schedule)
    budgets = (20.5 * step, 45.5 * step, 90.5 * step)
    warmup = rung_warmup(spec, task, budgets[0], config)
    assert warmup == 2
    runs, state = [], None
    for i, budget in enumerate(budgets):
        run = train_rung(spec, task, budget, seed=3, config=config, warmup=warmup, state=state)
        runs.append(run)
        if i == 1:  # through a file, as a promoted trial on another worker would
            run.state.save(tmp_path / "state.safetensors")
            state = TrainState.load(tmp_path / "state.safetensors")
        else:
            state = run.state
    whole = train(spec, task, budgets[-1], seed=3, config=replace(config, warmup_steps=warmup))
    last = runs[-1].result
    assert whole.status == last.status == "ok" and last.steps == whole.steps == 90
    assert same_weights(last.state_dict(), whole.state_dict())
    assert last.val_loss == whole.val_loss and last.train_flops == whole.train_flops
    assert [r.continued for r in runs] == [False, True, True]
    # FLOPs spent: the stable steps added plus each rung's cooldown branch
    cools = [cooldown_steps(n, warmup, schedule) for n in (20, 45, 90)]
    assert [r.spent_flops for r in runs] == [
        20 * step, (45 - 20 + cools[0]) * step, (90 - 45 + cools[1]) * step]
    assert sum(r.spent_flops for r in runs) < sum(r.result.train_flops for r in runs)
    assert [r.state.step for r in runs] == [n - c for n, c in zip((20, 45, 90), cools,
                                                                  strict=True)]


def test_a_rung_on_its_own_equals_train_with_the_same_warmup():
    spec, task, step = setup()
    config = replace(FAST, schedule="wsd")
    run = train_rung(spec, task, 30.5 * step, seed=1, config=config, warmup=3)
    whole = train(spec, task, 30.5 * step, seed=1, config=replace(config, warmup_steps=3))
    assert same_weights(run.result.state_dict(), whole.state_dict())
    assert run.result.val_loss == whole.val_loss and run.spent_flops == 30 * step


def test_cosine_retrains_and_counts_the_whole_run():
    spec, task, step = setup()
    config = replace(FAST, schedule="cosine")
    run = train_rung(spec, task, 20.5 * step, seed=0, config=config, warmup=2)
    assert run.state is None and not run.continued and run.spent_flops == 20 * step


def test_a_state_from_another_run_is_refused():
    spec, task, step = setup()
    config = replace(FAST, schedule="wsd")
    first = train_rung(spec, task, 20.5 * step, seed=0, config=config, warmup=2)
    with pytest.raises(TrainingError, match=r"saved state has seed=0, this run needs 1"):
        train_rung(spec, task, 40.5 * step, seed=1, config=config, warmup=2, state=first.state)
    with pytest.raises(TrainingError, match=r"saved state has warmup=2, this run needs 3"):
        train_rung(spec, task, 40.5 * step, seed=0, config=config, warmup=3, state=first.state)
    with pytest.raises(TrainingError, match=r"past this budget's stable phase \(8 steps\)"):
        train_rung(spec, task, 10.5 * step, seed=0, config=config, warmup=2, state=first.state)


def test_a_file_that_is_not_a_state_is_refused(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "weights.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(TrainingError, match=r"is not a training state"):
        TrainState.load(path)

"""The rung worker without Ray (plain data in, plain data out): every seed trains and continues
its own chain, the latency objective is measured, and the GPU share goes through the same code
as the single-budget worker (studies.worker.GpuShare)."""

from __future__ import annotations

import math

import pytest
import torch

from mlbtc_search.model import ModelSpec
from studies.rung_record import rung_entry
from studies.rung_worker import run_rung
from studies.worker import GpuShare
from trainers import StepCosts, TrainConfig, get_task, resolve_spec

TASK = {"name": "icl_regression", "options": {"n_dims": 2, "n_points": 4, "curriculum": False,
                                               "curriculum_start_dims": 1}}
SPEC = {"width": 16, "depth": 1, "max_seq_len": 8, "attention": {"kind": "standard", "heads": 2}}
TRAIN = {"batch_size": 8, "eval_batches": 1, "schedule": "wsd"}


@pytest.fixture(autouse=True)
def _threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def budgets() -> list[float]:
    task = get_task(TASK["name"], **TASK["options"])
    spec = resolve_spec(ModelSpec.from_dict(SPEC), task)
    step = StepCosts(spec, task, TrainConfig(**TRAIN).batch_size)(0)
    return [40 * step, 100 * step]


def payload(rung: int, states=None, **changes) -> dict:
    b = budgets()
    return {"trial": 0, "spec": SPEC, "task": TASK, "seed": 0, "seeds": 2, "train": TRAIN,
            "threads": 1, "gpus": 0.0, "objectives": ["val_loss", "flops_per_token", "latency"],
            "budgets": b, "budget_flops": b[rung], "states": states, "keep_state": True,
            **changes}


def test_every_seed_trains_and_continues_its_own_chain():
    out0 = run_rung(payload(0))
    assert "error" not in out0, out0.get("error")
    rows = out0["seed_results"]
    assert [r["seed"] for r in rows] == [0, 1] and all(r["status"] == "ok" for r in rows)
    assert rows[0]["val_loss"] != rows[1]["val_loss"]  # two seeds, two runs
    assert out0["spent_flops"] == pytest.approx(sum(r["spent_flops"] for r in rows))
    assert len(out0["states"]) == 2 and out0["states"][0] != out0["states"][1]
    assert out0["latency_s"] > 0 and "gpu" not in out0  # measured; a CPU run has no GPU entry
    entry = rung_entry(out0, 0, budgets()[0], seeds=2)
    assert entry["val_loss"] == pytest.approx((rows[0]["val_loss"] + rows[1]["val_loss"]) / 2)
    assert entry["loss_std"] > 0 and entry["latency_s"] == out0["latency_s"]

    out1 = run_rung(payload(1, states=out0["states"], keep_state=False))
    assert out1["continued"] and "states" not in out1
    top = budgets()[1]
    for r in out1["seed_results"]:  # each seed paid only what it added to its own chain
        assert r["continued"] and r["spent_flops"] < 0.9 * top and r["train_flops"] <= top
    assert out1["spent_flops"] == pytest.approx(sum(r["spent_flops"]
                                                    for r in out1["seed_results"]))
    # seed 1 handed seed 0's state: refused (another seed's chain), so seed 1 retrains
    mixed = run_rung(payload(1, states=[out0["states"][0]] * 2, keep_state=False))
    a, b = mixed["seed_results"]
    assert a["continued"] and a["val_loss"] == out1["seed_results"][0]["val_loss"]
    assert not b["continued"] and "seed=0" in b["note"] and b["spent_flops"] > 0.9 * top
    assert b["val_loss"] == pytest.approx(out1["seed_results"][1]["val_loss"], abs=0.5)
    assert not mixed["continued"] and mixed["note"].startswith("seed 1: retrained:")


def test_one_seed_is_the_rung_and_a_failing_seed_fails_it():
    out = run_rung(payload(0, seeds=1, objectives=["val_loss", "flops_per_token"]))
    assert len(out["seed_results"]) == 1 and "latency_s" not in out
    entry = rung_entry(out, 0, budgets()[0], seeds=1)
    assert entry["status"] == "ok" and "loss_std" not in entry
    assert entry["val_loss"] == out["seed_results"][0]["val_loss"]
    bad = {**out, "seed_results": [*out["seed_results"], {
        "seed": 1, "status": "diverged", "val_loss": None, "reason": "loss is NaN at step 3"}]}
    entry = rung_entry(bad, 0, budgets()[0], seeds=2)
    assert entry["status"] == "failed" and entry["reason"] == "seed 1: loss is NaN at step 3"
    assert entry["val_loss"] is None and math.isfinite(entry["flops_per_token"])


def test_gpu_share_names_the_share_and_cap_on_out_of_memory():
    share = GpuShare({"gpus": 0.25})
    share.cap("cpu")  # nothing to cap on the CPU
    assert share.cap_bytes is None and share.record(torch.device("cpu")) is None
    share.cap_bytes = 33.5 * 2**30
    err = torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0")
    assert share.error(err).startswith("CUDA out of memory with a GPU share of 0.25 "
                                       "(allocator cap 33.5 GiB)")
    assert share.error(ValueError("bad\n  value")) == "ValueError: bad value"


@pytest.mark.gpu
def test_a_rung_on_a_gpu_share_caps_the_allocator():
    out = run_rung(payload(0, seeds=1, gpus=0.25, train={**TRAIN, "device": "cuda"}))
    assert "error" not in out, out.get("error")
    total = torch.cuda.get_device_properties(0).total_memory
    assert out["gpu"]["share"] == 0.25
    assert out["gpu"]["cap_bytes"] == pytest.approx(0.95 * 0.25 * total)
    assert out["latency_s"] > 0

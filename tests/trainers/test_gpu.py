"""Devices, autocast and compile for training (trainers/device.py and the tasks' device data).

The CPU tests pin what must not change (batches made with ``device="cpu"`` are the batches the
tasks made before devices existed: fingerprints recorded from that code) and check the settings
and errors. The ``gpu`` tests run only with CUDA (tests/conftest.py skips them otherwise): a bf16
run against fp32, device data determinism, resident text data, compile.
"""

from __future__ import annotations

import math
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch

from mlbtc_search.cli import main
from mlbtc_search.errors import SpecError, UsageError
from mlbtc_search.model import ModelSpec
from trainers.device import (
    autocast_dtype,
    cap_memory,
    check_compile,
    oom_reason,
    resolve_device,
)
from trainers.tasks import get_task
from trainers.tasks.corpus import describe, stdlib_files
from trainers.tasks.text import gather_windows
from trainers.train import TrainConfig, train

NO_CUDA = not torch.cuda.is_available()
ICL = {"name": "icl_regression", "options": {"n_dims": 4, "n_points": 8}}
SPEC = {"width": 16, "depth": 1, "attention": {"kind": "standard", "heads": 2}, "mlp_ratio": 2}


def _fp(t: torch.Tensor) -> tuple[float, float]:
    t = t.double().cpu()
    return float(t.sum()), float((t**2).sum())


# (sum, sum of squares) of inputs and targets, recorded from the tasks before `device=` existed.
BEFORE = {
    ("icl", 0): ((6.681748524642899, 46.41344837622332), (-0.5520297437906265, 20.71360122353779)),
    ("icl", 25): ((-2.411954930750653, 69.39461655376931), (0.448107086122036, 23.24959297597749)),
    ("icl", "val"): ((-9.83434848068282, 112.94576777113336),
                     (0.4133562296628952, 46.98647164174223)),
    ("text", "train"): ((3853.0, 297463.0), (3860.0, 299884.0)),
    ("text", "val"): ((5742.0, 586938.0), (5581.0, 563647.0)),
    ("ts", "train"): ((12.661295490339398, 19.001951619219675),
                      (3.8773058746010065, 30.309155857946642)),
}


@pytest.mark.parametrize("device", [None, "cpu"])
def test_cpu_batches_are_the_batches_from_before_devices(device) -> None:
    on = {} if device is None else {"device": device}
    icl = get_task("icl_regression", n_dims=8, curriculum_interval=10)
    g = torch.Generator().manual_seed(7)
    got = {("icl", s): icl.batch("train", 4, g, s, **on) for s in (0, 25)}
    got["icl", "val"] = icl.batch("val", 4, g, **on)
    text = get_task("text", seq_len=16)
    g = torch.Generator().manual_seed(7)
    got["text", "train"] = text.batch("train", 4, g, **on)
    got["text", "val"] = text.batch("val", 4, g, **on)
    series = get_task("timeseries", lookback=8, horizon=4)
    g = torch.Generator().manual_seed(7)
    got["ts", "train"] = series.batch("train", 4, g, **on)
    for key, (x_fp, y_fp) in BEFORE.items():
        x, y = got[key]
        assert x.device.type == "cpu"
        assert _fp(x) == pytest.approx(x_fp, rel=1e-12), key
        assert _fp(y) == pytest.approx(y_fp, rel=1e-12), key


def test_resident_gather_matches_the_host_gather() -> None:
    text = get_task("text", seq_len=16)
    tokens = text.resident("train", text.train_data, torch.device("cpu"))
    assert text.resident("train", text.train_data, torch.device("cpu")) is tokens  # cached
    starts = torch.tensor([0, 5, 1000, len(text.train_data) - 17])
    windows = gather_windows(tokens, starts, 17)
    expect = text.train_data[starts.numpy()[:, None] + np.arange(17)].astype(np.int64)
    assert windows.dtype == torch.int64 and torch.equal(windows, torch.from_numpy(expect))
    ids = np.array([0, 1, 40000, 65535], dtype=np.uint16)  # uint16 tokens: int16 bit patterns
    resident = text.resident("ids", ids, torch.device("cpu"))
    assert resident.dtype == torch.int16
    assert gather_windows(resident, torch.tensor([0]), 4).tolist() == [[0, 1, 40000, 65535]]


def test_stdlib_corpus_option_and_checks(tmp_path) -> None:
    root = Path(sysconfig.get_paths()["stdlib"])
    rel = [f.relative_to(root).as_posix() for f in stdlib_files()]
    assert len(rel) > 500 and rel == sorted(rel)  # deterministic order
    assert not any(p.startswith(("site-packages/", "pydoc_data/")) for p in rel)
    with pytest.raises(SpecError, match="corpus must be one of 'pydoc', 'stdlib'"):
        get_task("text", corpus="wiki")
    path = tmp_path / "a.txt"
    path.write_text("x" * 1000)
    with pytest.raises(SpecError, match="give either path or corpus"):
        get_task("text", path=str(path), corpus="stdlib")
    assert describe(b"abc") == {"bytes": 3, "sha256": "ba7816bf8f01cfea414140de5dae2223b00361a3"
                                                      "96177a9cb410ff61f20015ad"}


@pytest.mark.slow
def test_stdlib_corpus_is_tens_of_megabytes() -> None:
    task = get_task("text", corpus="stdlib", seq_len=64)
    assert task.options["corpus"] == "stdlib"
    assert len(task.train_data) + len(task.val_data) > 20_000_000


@pytest.mark.parametrize(("options", "match"), [
    ({"device": "gpu"}, "at device: device must be one of cpu, cuda, cuda:N, auto, got 'gpu'"),
    ({"device": 0}, "device must be one of"),
    ({"autocast": "fp16"}, "at autocast: autocast must be one of auto, bf16, off, got 'fp16'"),
    ({"compile": "fast"}, "at compile: compile must be true, false or one of default, "
                          "reduce-overhead, max-autotune, got 'fast'"),
])
def test_device_settings_are_checked(options, match) -> None:
    with pytest.raises(SpecError, match=match):
        TrainConfig(**options)


def test_device_settings_accepted() -> None:
    for value in ("cpu", "cuda", "cuda:1", "auto"):
        assert TrainConfig(device=value).device == value  # availability is checked at run time
    assert check_compile(True) is True and check_compile("reduce-overhead") == "reduce-overhead"
    cpu = torch.device("cpu")
    assert autocast_dtype("auto", cpu) is None and autocast_dtype("off", cpu) is None
    assert autocast_dtype("bf16", cpu) == torch.bfloat16
    assert autocast_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert resolve_device("auto").type == ("cpu" if NO_CUDA else "cuda")
    assert cap_memory(0.25, cpu) is None


@pytest.mark.skipif(not NO_CUDA, reason="checks the error on a machine without CUDA")
def test_cuda_without_cuda_is_one_line_exit_2(tmp_path, capsys) -> None:
    with pytest.raises(UsageError, match="device 'cuda' needs CUDA, but torch .* use device "
                                         "'cpu' or 'auto'"):
        resolve_device("cuda")
    model = tmp_path / "m.yaml"
    model.write_text("width: 16\ndepth: 1\nattention: {kind: standard, heads: 2}\n")
    assert main(["train", str(model), "--budget", "1e9", "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "mlbtc train: error: device 'cuda' needs CUDA" in err
    assert main(["train", str(model), "--budget", "1e9", "--device", "tpu"]) == 2
    assert "at --device: device must be one of" in capsys.readouterr().err


@pytest.mark.parametrize(("flag", "value", "match"), [
    ("--autocast", "fp16", "--autocast invalid choice: 'fp16'"),
    ("--compile", "fast", "--compile invalid choice: 'fast'"),
    ("--device", "cuda:x", "at --device: device must be one of cpu, cuda, cuda:N, auto"),
])
def test_bad_device_flags_are_one_line(tmp_path, capsys, flag, value, match) -> None:
    model = tmp_path / "m.yaml"
    model.write_text("width: 16\ndepth: 1\nattention: {kind: standard, heads: 2}\n")
    assert main(["train", str(model), "--budget", "1e9", flag, value]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and match in err, err


def test_oom_reason_names_the_share() -> None:
    err = torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0")
    text = oom_reason(err, 33.5 * 2**30, 0.25)
    assert text.startswith("CUDA out of memory with a GPU share of 0.25 (allocator cap 33.5 GiB)")
    assert "larger resources.gpus or a smaller train.batch_size" in text
    assert oom_reason(RuntimeError("other"), None, 0.25) is None


def _run(device: str, **config) -> object:
    task = get_task(ICL["name"], **ICL["options"])
    spec = ModelSpec.from_dict(SPEC, seq_len=task.adapter.seq_len)
    cfg = TrainConfig(lr=3e-3, batch_size=16, eval_batches=2, device=device, **config)
    return train(spec, task, 4e7, seed=0, config=cfg)


def test_cpu_bf16_autocast_trains_close_to_fp32() -> None:
    fp32, bf16 = _run("cpu"), _run("cpu", autocast="bf16")
    assert fp32.status == bf16.status == "ok" and fp32.steps == bf16.steps
    assert math.isfinite(bf16.val_loss)
    assert bf16.val_loss == pytest.approx(fp32.val_loss, rel=0.1)
    assert bf16.to_json()["config"]["autocast"] == "bf16"


@pytest.mark.parametrize("attention", [
    {"kind": "bilinear_btt", "heads": 2, "rank": 1},  # custom-backward BTT cores
    {"kind": "bilinear_mlr", "heads": 2, "ranks": [4, 2, 1, 1]},
    {"kind": "mlr", "heads": 2, "ranks": [4, 2, 1, 1]},  # the CPU region kernel
    {"kind": "sliding_window", "heads": 2, "window": 4},
])
def test_every_structure_trains_under_bf16_autocast(attention) -> None:
    """Custom autograd functions see the mixed dtypes autocast makes (and no autocast in their
    backward): each structure family with a BTT MLP must train in bf16 as in fp32."""
    task = get_task(ICL["name"], **ICL["options"])
    spec = ModelSpec.from_dict({**SPEC, "attention": attention, "mlp": {"btt": {"rank": 1}}},
                               seq_len=task.adapter.seq_len)
    runs = [train(spec, task, 2e7, config=TrainConfig(batch_size=16, eval_batches=2,
                                                      autocast=amp)) for amp in ("off", "bf16")]
    assert [r.status for r in runs] == ["ok", "ok"]
    assert runs[1].val_loss == pytest.approx(runs[0].val_loss, rel=0.05)


@pytest.mark.slow
def test_compile_on_cpu_gives_the_same_run() -> None:
    eager, comp = _run("cpu"), _run("cpu", compile=True)
    assert comp.status == "ok" and comp.steps == eager.steps
    assert comp.val_loss == pytest.approx(eager.val_loss, rel=1e-3)
    assert set(comp.state_dict()) == set(eager.state_dict())  # no _orig_mod. prefix


# ---- CUDA ------------------------------------------------------------------------------------
@pytest.mark.gpu
def test_cuda_bf16_run_matches_fp32_loosely() -> None:
    fp32, bf16 = _run("cuda", autocast="off"), _run("cuda")
    assert fp32.status == bf16.status == "ok" and fp32.steps == bf16.steps
    assert bf16.val_loss == pytest.approx(fp32.val_loss, rel=0.1)
    assert next(iter(bf16.model.parameters())).dtype == torch.float32  # weights stay fp32


@pytest.mark.gpu
def test_cuda_icl_data_is_made_on_the_device_and_deterministic() -> None:
    task = get_task("icl_regression", n_dims=16)
    cuda = torch.device("cuda")

    def draw(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        return task.batch("train", 64, torch.Generator().manual_seed(seed), 0, device=cuda)

    x1, y1 = draw(3)
    x2, y2 = draw(3)
    assert x1.device.type == "cuda" and y1.device.type == "cuda"
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert not torch.equal(draw(4)[0], x1)
    x = x1[:, 0::2, :4]  # first curriculum dims of the x positions: E |x|^2 = 1
    assert float((x**2).sum(-1).mean()) == pytest.approx(1.0, abs=0.15)
    a, b = (_run("cuda").curve for _ in range(2))
    assert [c["train_loss"] for c in a] == pytest.approx([c["train_loss"] for c in b], rel=1e-3)


@pytest.mark.gpu
def test_cuda_text_batches_are_gathered_on_the_device() -> None:
    task = get_task("text", seq_len=32)
    x, y = task.batch("train", 8, torch.Generator().manual_seed(0), device="cuda")
    assert x.device.type == "cuda" and x.dtype == torch.int64 and tuple(x.shape) == (8, 32)
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert task.resident("train", task.train_data, torch.device("cuda")).device.type == "cuda"


@pytest.mark.gpu
def test_cuda_compile_runs() -> None:
    result = _run("cuda", compile=True)
    assert result.status == "ok" and math.isfinite(result.val_loss)

"""Tests of the training tasks: data, loss, metric and option handling."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from mlbtc_search.errors import SpecError, TrainingError, UsageError
from trainers.tasks import TASKS, Adapter, Task, get_task, task_options
from trainers.tasks.text import default_corpus


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def zeros_model(task: Task):
    """A model that predicts zeros (the trivial predictor) with the task's output width."""

    def model(inputs: Tensor) -> Tensor:
        return torch.zeros(inputs.shape[0], inputs.shape[1], task.adapter.output_dim)

    return model


# ---------------------------------------------------------------------------------------------
# get_task and the common contract


@pytest.mark.parametrize("name", sorted(TASKS))
def test_options_round_trip(name: str) -> None:
    task = get_task(name)
    again = get_task(name, **task.options)
    assert again.options == task.options
    assert again.adapter == task.adapter
    assert set(task.options) == set(task_options(name))
    assert task.name == name


@pytest.mark.parametrize("name", sorted(TASKS))
def test_batch_shapes_and_adapter(name: str) -> None:
    task = get_task(name)
    inputs, targets = task.batch("train", 3, gen())
    adapter = task.adapter
    assert isinstance(adapter, Adapter)
    T = task.seq_len_at(0)
    if adapter.input_kind == "tokens":
        assert inputs.shape == (3, T) and inputs.dtype == torch.long
    else:
        assert inputs.shape == (3, T, adapter.input_dim) and inputs.dtype == torch.float32
    outputs = torch.zeros(3, T, adapter.output_dim, requires_grad=True)
    loss = task.loss(outputs, targets)
    assert loss.shape == () and torch.isfinite(loss)
    loss.backward()
    assert outputs.grad is not None
    assert math.isfinite(task.metric(outputs.detach(), targets))
    with pytest.raises(TrainingError, match="model outputs must have shape"):
        task.loss(torch.zeros(3, T, adapter.output_dim + 1), targets)
    with pytest.raises(SpecError, match="split must be one of 'train', 'val'"):
        task.batch("test", 3, gen())


@pytest.mark.parametrize("name", sorted(TASKS))
def test_evaluate_is_deterministic_and_restores_mode(name: str) -> None:
    task = get_task(name)

    class Zero(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.zeros(()))
            self.seen_training: bool | None = None

        def forward(self, inputs: Tensor) -> Tensor:
            self.seen_training = self.training
            B, T = inputs.shape[:2]
            return self.scale * torch.ones(B, T, task.adapter.output_dim)

    model = Zero()
    first = task.evaluate(model, batches=2, batch_size=8, seed=7)
    assert first == task.evaluate(model, batches=2, batch_size=8, seed=7)
    assert set(first) == {"val_loss", "metric"}
    assert model.seen_training is False and model.training is True


def test_unknown_task_lists_valid_names() -> None:
    with pytest.raises(SpecError, match="unknown task 'icl'; valid tasks: icl_regression, text"):
        get_task("icl")


def test_unknown_option_lists_valid_options() -> None:
    with pytest.raises(SpecError, match="unknown option 'dims'.*valid options: n_dims, n_points"):
        get_task("icl_regression", dims=8)
    with pytest.raises(SpecError, match="valid options: path, lookback, horizon, columns"):
        get_task("timeseries", window=8)


@pytest.mark.parametrize(
    ("name", "options", "match"),
    [
        ("icl_regression", {"n_dims": 0}, "at n_dims: n_dims must be an integer >= 1 and <= 6"),
        ("icl_regression", {"n_dims": 10**12}, "n_dims must be an integer >= 1 and <= 65536"),
        ("icl_regression", {"n_dims": 2.5}, "n_dims must be an integer"),
        ("icl_regression", {"curriculum": "yes"}, "curriculum must be true or false"),
        ("icl_regression", {"n_dims": 4, "curriculum_start_dims": 5}, "curriculum_start_dims <="),
        ("text", {"val_fraction": 1.0}, "at val_fraction: 0 < val_fraction < 1 must hold"),
        ("text", {"format": "csv"}, "format must be one of 'auto', 'text', 'nanogpt'"),
        ("text", {"format": "nanogpt"}, "format 'nanogpt' needs path"),
        ("timeseries", {"horizon": 0}, "at horizon: horizon must be an integer >= 1"),
        ("timeseries", {"columns": "OT"}, "columns must be null"),
        ("timeseries", {"columns": ["ch0", "OT"]}, "'OT' is not a numeric column.*ch0, ch1"),
    ],
)
def test_bad_option_values(name: str, options: dict, match: str) -> None:
    with pytest.raises(SpecError, match=match):
        get_task(name, **options)


# ---------------------------------------------------------------------------------------------
# icl_regression


def icl_split(inputs: Tensor) -> tuple[Tensor, Tensor]:
    """Interleaved inputs (B, 2n, d) -> x (B, n, d) and y (B, n)."""
    return inputs[:, 0::2, :], inputs[:, 1::2, 0]


def test_icl_moments_and_layout() -> None:
    task = get_task("icl_regression", n_dims=16)
    assert task.adapter == Adapter("vector", 16, 1, 64)
    inputs, targets = task.batch("val", 2048, gen())
    assert inputs.shape == (2048, 64, 16) and targets.shape == (2048, 32)
    x, y = icl_split(inputs)
    assert torch.equal(y, targets)
    assert torch.all(inputs[:, 1::2, 1:] == 0)
    assert float((x**2).sum(-1).mean()) == pytest.approx(1.0, rel=0.05)
    assert float((targets**2).mean()) == pytest.approx(1.0, rel=0.05)


def test_icl_is_solvable_by_least_squares() -> None:
    task = get_task("icl_regression", n_dims=16)
    inputs, targets = task.batch("val", 16, gen(3))
    x, y = icl_split(inputs.double())
    n = task.n_points
    w = torch.linalg.lstsq(x[:, : n - 1], y[:, : n - 1, None]).solution  # (B, d, 1)
    prediction = (x[:, n - 1 : n] @ w)[:, 0, 0]
    assert float(((prediction - targets[:, -1].double()) ** 2).max()) < 1e-8


def test_icl_curriculum_schedule() -> None:
    task = get_task("icl_regression", n_dims=16, curriculum_interval=200)
    assert (task.dims_at(0), task.points_at(0), task.seq_len_at(0)) == (4, 8, 16)
    assert (task.dims_at(199), task.points_at(199)) == (4, 8)
    assert (task.dims_at(200), task.points_at(200)) == (5, 10)
    assert (task.dims_at(5 * 200 + 7), task.points_at(5 * 200 + 7)) == (9, 18)
    assert (task.dims_at(12 * 200), task.points_at(12 * 200), task.seq_len_at(12 * 200)) == (
        16,
        32,
        64,
    )
    assert (task.dims_at(10**7), task.points_at(10**7)) == (16, 32)
    inputs, targets = task.batch("train", 64, gen(), step=400)
    assert inputs.shape == (64, 24, 16) and targets.shape == (64, 12)
    x, _ = icl_split(inputs)
    assert torch.all(x[..., 6:] == 0) and torch.all(x[..., :6] != 0)
    assert float((x**2).sum(-1).mean()) == pytest.approx(1.0, rel=0.1)
    val_inputs, _ = task.batch("val", 4, gen(), step=400)
    assert val_inputs.shape == (4, 64, 16)
    flat = get_task("icl_regression", n_dims=8, n_points=12, curriculum=False)
    assert [flat.seq_len_at(s) for s in (0, 10**6)] == [24, 24]
    assert flat.batch("train", 2, gen())[0].shape == (2, 24, 8)


def test_icl_zero_predictor_metric_is_about_one() -> None:
    task = get_task("icl_regression", n_dims=16)
    result = task.evaluate(zeros_model(task), batches=32, batch_size=64)
    assert result["metric"] == pytest.approx(1.0, abs=0.15)
    assert result["val_loss"] == pytest.approx(1.0, abs=0.1)
    inputs, targets = task.batch("val", 8, gen())
    outputs = torch.zeros(8, 64, 1)
    outputs[:, 0::2, 0] = targets  # perfect predictions at the x positions
    outputs[:, 1::2, 0] = 123.0  # ignored: the y positions predict nothing
    assert task.metric(outputs, targets) == 0.0 and float(task.loss(outputs, targets)) == 0.0


def test_icl_val_differs_from_train_and_is_deterministic() -> None:
    task = get_task("icl_regression", n_dims=8, curriculum=False)
    train, _ = task.batch("train", 4, gen(5))
    val, _ = task.batch("val", 4, gen(5))
    assert not torch.allclose(train, val)
    assert torch.equal(train, task.batch("train", 4, gen(5))[0])
    g = gen(5)
    first, second = task.batch("train", 4, g)[0], task.batch("train", 4, g)[0]
    assert not torch.allclose(first, second)


def test_icl_pool_is_a_fixed_finite_dataset() -> None:
    task = get_task("icl_regression", n_dims=4, curriculum=False, pool_size=2)
    _, targets = task.batch("train", 32, gen(1))
    _, again = task.batch("train", 32, gen(2))
    rows = {tuple(np.round(r.numpy(), 6)) for r in torch.cat((targets, again))}
    assert len(rows) == 2  # every training sample comes from the pool of two
    _, val = task.batch("val", 8, gen(1))
    assert not {tuple(np.round(r.numpy(), 6)) for r in val} & rows


# ---------------------------------------------------------------------------------------------
# text


def test_text_default_corpus_and_batches() -> None:
    assert len(default_corpus()) > 400_000
    task = get_task("text", seq_len=64)
    assert task.adapter == Adapter("tokens", 256, 256, 64)
    assert len(task.val_data) == int(len(default_corpus()) * 0.05)
    inputs, targets = task.batch("train", 8, gen())
    assert inputs.shape == targets.shape == (8, 64)
    assert inputs.dtype == targets.dtype == torch.long
    assert torch.equal(inputs[:, 1:], targets[:, :-1])
    data = bytes(task.train_data)
    for row, target in zip(inputs, targets, strict=True):
        window = bytes(row.tolist()) + bytes(target[-1:].tolist())
        assert window in data
    text = bytes(task.batch("val", 4, gen())[0][0].tolist())
    assert text in bytes(task.val_data)


def test_text_uniform_predictor_scores_eight_bits() -> None:
    task = get_task("text", seq_len=32)
    inputs, targets = task.batch("val", 4, gen())
    outputs = torch.zeros(4, 32, 256)
    assert task.metric(outputs, targets) == pytest.approx(8.0, abs=1e-12)
    assert float(task.loss(outputs, targets)) == pytest.approx(math.log(256), rel=1e-6)
    assert task.evaluate(zeros_model(task), batches=2, batch_size=4)["metric"] == pytest.approx(8)


def test_text_file(tmp_path: Path) -> None:
    path = tmp_path / "corpus.txt"
    path.write_text("héllo wörld " * 100, encoding="utf-8")
    task = get_task("text", path=str(path), seq_len=16, val_fraction=0.1)
    assert task.options["format"] == "text" and task.options["path"] == str(path)
    inputs, targets = task.batch("train", 4, gen())
    assert inputs.shape == (4, 16) and int(inputs.max()) < 256


def test_text_nanogpt_round_trip(tmp_path: Path) -> None:
    (np.arange(500, dtype=np.uint16) % 300).tofile(tmp_path / "train.bin")
    (np.arange(100, dtype=np.uint16) + 1000).tofile(tmp_path / "val.bin")
    task = get_task("text", path=str(tmp_path), seq_len=20)
    assert task.options["format"] == "nanogpt"
    assert task.adapter == Adapter("tokens", 1100, 1100, 20)
    inputs, targets = task.batch("train", 16, gen())
    assert torch.equal(targets, (inputs + 1) % 300)
    inputs, targets = task.batch("val", 16, gen())
    assert torch.equal(targets, inputs + 1) and int(inputs.min()) >= 1000
    outputs = torch.zeros(16, 20, 1100)
    assert task.metric(outputs, targets) == pytest.approx(math.log2(1100))


def test_text_errors(tmp_path: Path) -> None:
    missing = tmp_path / "nope.txt"
    with pytest.raises(UsageError, match="nope.txt' does not exist"):
        get_task("text", path=str(missing))
    short = tmp_path / "short.txt"
    short.write_bytes(b"x" * 1000)
    with pytest.raises(SpecError, match=r"short.txt.*val split has 50 bytes.*seq_len \+ 1 = 129"):
        get_task("text", path=str(short))
    with pytest.raises(SpecError, match="at path: .*must contain train.bin and val.bin"):
        get_task("text", path=str(tmp_path), format="nanogpt")
    with pytest.raises(SpecError, match="format 'text' needs path to be a text file"):
        get_task("text", path=str(tmp_path), format="text")
    np.zeros(300, dtype=np.uint16).tofile(tmp_path / "train.bin")
    np.zeros(5, dtype=np.uint16).tofile(tmp_path / "val.bin")
    with pytest.raises(SpecError, match=r"val split has 5 tokens.*seq_len \+ 1 = 129"):
        get_task("text", path=str(tmp_path))


# ---------------------------------------------------------------------------------------------
# timeseries


def test_timeseries_default_data_and_normalization() -> None:
    task = get_task("timeseries")
    assert task.adapter == Adapter("series", 1, 1, 120)
    assert task.columns == [f"ch{i}" for i in range(7)]
    assert len(task.train_data) + len(task.val_data) == 17420
    assert task.train_data.shape == (17420 - 3484, 7) and task.val_data.shape == (3484, 7)
    train = task.train_data.double()
    assert torch.allclose(train.mean(0), torch.zeros(7, dtype=torch.float64), atol=1e-5)
    assert torch.allclose(
        train.std(0, unbiased=False), torch.ones(7, dtype=torch.float64), atol=1e-5
    )
    assert float(task.val_data.double().mean(0).abs().max()) > 0.1  # val statistics unused


def test_timeseries_batch_layout_and_zero_metric() -> None:
    task = get_task("timeseries", lookback=12, horizon=4)
    inputs, targets = task.batch("val", 64, gen())
    assert inputs.shape == (64, 16, 1) and targets.shape == (64, 16)
    assert torch.all(inputs[:, 12:] == 0)
    assert torch.equal(targets[:, :11], inputs[:, 1:12, 0])  # next step over the lookback
    windows = task.val_data.T.unfold(1, 16, 1)  # (C, N - 15, 16): every window of a channel
    assert torch.equal(targets[:, 11], targets[:, 12])  # position L-1 and L both predict v_L
    for row_in, row_target in zip(inputs[:, :, 0], targets, strict=True):
        window = torch.cat((row_in[:12], row_target[12:]))  # v_0 .. v_15
        assert bool((windows == window).all(-1).any())
    outputs = torch.zeros(64, 16, 1)
    expected = float((targets[:, 12:].double() ** 2).mean())
    assert task.metric(outputs, targets) == pytest.approx(expected)
    outputs[:, 12:, 0] = targets[:, 12:]
    assert task.metric(outputs, targets) == 0.0 and float(task.loss(outputs, targets)) > 0


def write_csv(path: Path, rows: int) -> None:
    lines = ["id,label,date,load,temp"]
    for i in range(rows):
        lines.append(f"{i},r{i},2016-07-01 {i % 24:02d}:00:00,{i * 0.5},{10 + (i % 7)}")
    path.write_text("\n".join(lines) + "\n")


def test_timeseries_csv(tmp_path: Path) -> None:
    path = tmp_path / "ett.csv"
    write_csv(path, 100)
    task = get_task("timeseries", path=str(path), lookback=8, horizon=4, val_fraction=0.25)
    assert task.columns == ["id", "load", "temp"]  # date and text columns skipped
    load = np.arange(100) * 0.5
    assert task.mean[1] == pytest.approx(load[:75].mean())
    assert task.std[1] == pytest.approx(load[:75].std())
    assert float(task.val_data[0, 1]) == pytest.approx(
        (load[75] - load[:75].mean()) / load[:75].std()
    )
    only = get_task("timeseries", path=str(path), lookback=8, horizon=4, columns=["temp"])
    assert only.columns == ["temp"] and only.train_data.shape == (80, 1)
    assert only.batch("train", 5, gen())[0].shape == (5, 12, 1)


def test_timeseries_errors(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="missing.csv' does not exist"):
        get_task("timeseries", path=str(tmp_path / "missing.csv"))
    text_only = tmp_path / "text.csv"
    text_only.write_text("date,name\n2016-07-01,a\n2016-07-02,b\n")
    with pytest.raises(SpecError, match="text.csv' has no numeric column besides the date column"):
        get_task("timeseries", path=str(text_only))
    short = tmp_path / "short.csv"
    write_csv(short, 100)
    with pytest.raises(SpecError, match=r"short.csv' has 100 rows.*lookback \+ horizon = 120"):
        get_task("timeseries", path=str(short))
    with pytest.raises(SpecError, match="'label' is not a numeric column.*id, load, temp"):
        get_task("timeseries", path=str(short), lookback=4, horizon=2, columns=["label"])
    ragged = tmp_path / "ragged.csv"
    ragged.write_text("date,a\n2016-07-01,1\n2016-07-02,2,3\n")
    with pytest.raises(SpecError, match="ragged.csv' line 3 has 3 fields"):
        get_task("timeseries", path=str(ragged))

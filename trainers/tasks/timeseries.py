"""Channel-independent univariate forecasting on an ETT-style CSV or synthetic multi-scale series.

Data (option ``path``):

- a CSV with a header row, a date column (the column named ``date``, case-insensitive, else the
  first column; it is never used as a value) and numeric columns (all of them, or those named in
  ``columns``): the ETT layout (``date,HUFL,HULL,MUFL,MULL,LUFL,LULL,OT``);
- ``None``: 7 synthetic channels of 17,420 hourly steps (the size of ETTh1), generated
  deterministically at load time: level + linear trend + yearly, weekly and daily seasonality +
  AR(1) noise, with a last channel that mixes the others (like ETT's oil temperature).

The split is chronological: the first ``1 - val_fraction`` of the rows train, the rest validate.
Every channel is normalized with the mean and standard deviation of its *training* rows only, so
validation data may have a nonzero mean (the series trend); metrics are on this normalized scale,
as ETT results are usually reported.

Samples (channel-independent): one channel's window of ``T = lookback + horizon`` consecutive
values ``v_0 .. v_{T-1}``, channel and start uniform at random. Design, for a causal model:

- inputs ``(B, T, 1)``: ``v_0 .. v_{L-1}`` (the lookback, ``L = lookback``), then zeros at the
  ``horizon`` positions, so nothing from the future leaks in;
- targets ``(B, T)``: at a lookback position ``t < L`` the next value ``v_{t+1}`` (next-step
  prediction, which gives a causal model a training signal at every position; position ``L - 1``
  predicts the first future value ``v_L``); at a horizon position ``t >= L`` the true value
  ``v_t`` (the forecast, made from the lookback alone, the inputs there being zeros).

Loss: MSE over all ``T`` positions. Metric ``mse``: MSE over the ``horizon`` positions only, the
usual direct multi-step forecasting error.
"""

from __future__ import annotations

import csv
import functools
import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from mlbtc_search.checks import read_text
from mlbtc_search.errors import SpecError

from .base import (
    MAX_SIZE,
    Adapter,
    Task,
    as_device,
    check_fraction,
    check_int,
    check_outputs,
    check_path,
    check_split,
    device_generator,
)

SYNTHETIC_STEPS = 17420
MAX_CSV_BYTES = 1 << 30  # ETTh1 is 2.6 MB; the whole file is read into memory
SYNTHETIC_CHANNELS = 7


class TimeseriesTask(Task):
    """Forecast ``horizon`` steps of one channel from its previous ``lookback`` steps."""

    name = "timeseries"
    metric_name = "mse"

    def __init__(
        self,
        *,
        path: str | None = None,
        lookback: int = 96,
        horizon: int = 24,
        columns: Sequence[str] | None = None,
        val_fraction: float = 0.2,
    ) -> None:
        self.lookback = check_int(lookback, ("lookback",), "lookback", high=MAX_SIZE)
        self.horizon = check_int(horizon, ("horizon",), "horizon", high=MAX_SIZE)
        self.val_fraction = check_fraction("val_fraction", val_fraction)
        wanted = _check_columns(columns)
        self.path = check_path("path", path, "CSV file")
        if self.path is None:
            values, names = synthetic_series(), [f"ch{i}" for i in range(SYNTHETIC_CHANNELS)]
            values, names = _select(values, names, wanted, "the synthetic default data")
            source = "the synthetic default data"
        else:
            values, names = load_csv(self.path, wanted)
            source = f"CSV {str(self.path)!r}"
        self.columns = names
        n_rows = len(values)
        n_train = n_rows - int(n_rows * self.val_fraction)
        need = self.lookback + self.horizon
        if min(n_train, n_rows - n_train) < need:
            raise SpecError(
                f"{source} has {n_rows} rows, so the train/val splits (val_fraction="
                f"{self.val_fraction}) have {n_train} and {n_rows - n_train} rows, but each needs "
                f"at least lookback + horizon = {need} rows",
                path=("path",),
            )
        train = values[:n_train]
        self.mean = train.mean(axis=0)  # (C,)
        std = train.std(axis=0)
        self.std = np.where(std > 0, std, 1.0)  # (C,); constant channels stay centred
        normalized = torch.from_numpy(((values - self.mean) / self.std).astype(np.float32))
        self.train_data, self.val_data = normalized[:n_train], normalized[n_train:]  # (N, C)
        self.options: dict[str, Any] = {
            "path": None if self.path is None else str(self.path),
            "lookback": self.lookback,
            "horizon": self.horizon,
            "columns": None if wanted is None else list(wanted),
            "val_fraction": self.val_fraction,
        }
        self.adapter = Adapter("series", 1, 1, need)

    # -- data --------------------------------------------------------------------------------

    def batch(
        self,
        split: str,
        batch_size: int,
        generator: torch.Generator,
        step: int = 0,
        *,
        device: torch.device | str | None = None,
    ) -> tuple[Tensor, Tensor]:
        check_split(split)
        batch_size = check_int(batch_size, ("batch_size",), "batch_size", high=MAX_SIZE)
        device = as_device(device)
        data = self.train_data if split == "train" else self.val_data
        N, C = data.shape
        L, T = self.lookback, self.lookback + self.horizon
        if device.type != "cpu":  # draws and data on the device (module doc of tasks.base)
            data = self.resident(split, data, device)
            generator = device_generator(generator, device)
        channel = torch.randint(0, C, (batch_size,), generator=generator, device=device)
        start = torch.randint(0, N - T + 1, (batch_size,), generator=generator, device=device)
        values = data[start[:, None] + torch.arange(T, device=device), channel[:, None]]  # (B, T)
        inputs = values.new_zeros(batch_size, T, 1)
        inputs[:, :L, 0] = values[:, :L]
        targets = values.clone()
        targets[:, :L] = values[:, 1 : L + 1]  # next-step over the lookback
        return inputs, targets

    # -- loss and metric ---------------------------------------------------------------------

    def _predictions(self, outputs: Tensor, targets: Tensor) -> Tensor:
        B, T = targets.shape
        check_outputs(outputs, B, T, 1)
        return outputs[:, :, 0].float()  # (B, T)

    def loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        return F.mse_loss(self._predictions(outputs, targets), targets.float())

    def metric(self, outputs: Tensor, targets: Tensor) -> float:
        preds = self._predictions(outputs, targets)[:, self.lookback :].double()  # (B, H)
        return float(((preds - targets[:, self.lookback :].double()) ** 2).mean())


def _check_columns(columns: Any) -> tuple[str, ...] | None:
    """``None`` or a non-empty list of distinct column names."""
    if columns is None:
        return None
    if (
        isinstance(columns, str)
        or not isinstance(columns, Sequence)
        or not columns
        or not all(isinstance(c, str) for c in columns)
    ):
        raise SpecError(
            f"columns must be null (all numeric columns) or a non-empty list of column names, "
            f"got {columns!r}",
            path=("columns",),
        )
    if len(set(columns)) != len(columns):
        raise SpecError(f"columns must be distinct, got {list(columns)!r}", path=("columns",))
    return tuple(columns)


def _select(
    values: np.ndarray, names: list[str], wanted: tuple[str, ...] | None, source: str
) -> tuple[np.ndarray, list[str]]:
    """The ``wanted`` columns of ``values`` (all when ``None``)."""
    if wanted is None:
        return values, names
    missing = [c for c in wanted if c not in names]
    if missing:
        raise SpecError(
            f"column {missing[0]!r} is not a numeric column of {source}; "
            f"valid columns: {', '.join(names)}",
            path=("columns",),
        )
    return values[:, [names.index(c) for c in wanted]], list(wanted)


def load_csv(path: Path, wanted: tuple[str, ...] | None = None) -> tuple[np.ndarray, list[str]]:
    """The numeric columns of an ETT-style CSV as float64 ``(rows, columns)`` and their names."""
    where = f"CSV {str(path)!r}"
    text = read_text(path, "CSV file", max_bytes=MAX_CSV_BYTES)  # binary/non-UTF-8: one line
    try:
        reader = csv.reader(io.StringIO(text, newline=""))
        header = [h.strip() for h in next(reader, [])]
        rows = [row for row in reader if row]
    except csv.Error as exc:
        raise SpecError(
            f"{where} is not a readable CSV file (line {reader.line_num}: {exc})", path=("path",)
        ) from None
    if not header:
        raise SpecError(
            f"{where} is empty; it needs a header row (date, then numeric columns)", path=("path",)
        )
    for i, row in enumerate(rows):
        if len(row) != len(header):
            raise SpecError(
                f"{where} line {i + 2} has {len(row)} fields, but the header has {len(header)}",
                path=("path",),
            )
    lower = [h.lower() for h in header]
    date = lower.index("date") if "date" in lower else 0
    numeric: dict[str, np.ndarray] = {}
    for j, name in enumerate(header):
        if j != date and name not in numeric:
            column = _parse_column(rows, j)
            if column is not None:
                numeric[name] = column
    if not numeric:
        raise SpecError(
            f"{where} has no numeric column besides the date column {header[date]!r}; it needs "
            "a header row, a date column and at least one numeric column (ETT layout)",
            path=("path",),
        )
    names = list(numeric)
    values = np.stack([numeric[n] for n in names], axis=1) if rows else np.zeros((0, len(names)))
    return _select(values, names, wanted, where)


def _parse_column(rows: list[list[str]], j: int) -> np.ndarray | None:
    """Column ``j`` as finite floats, or ``None`` if any entry is not a finite number."""
    try:
        column = np.array([float(row[j]) for row in rows], dtype=np.float64)
    except ValueError:
        return None
    return column if np.isfinite(column).all() else None


@functools.lru_cache(maxsize=1)
def synthetic_series(
    n_steps: int = SYNTHETIC_STEPS, n_channels: int = SYNTHETIC_CHANNELS, seed: int = 0
) -> np.ndarray:
    """Deterministic hourly multi-scale series ``(n_steps, n_channels)`` in float64.

    Each channel: level + linear trend + yearly, weekly and daily sinusoids (random amplitudes
    and phases, plus a daily second harmonic) + AR(1) noise; the last channel is a smoothed mix of
    the others plus its own noise. Read-only: callers share the cached array.
    """
    rng = np.random.default_rng(seed)
    t = np.arange(n_steps, dtype=np.float64)[:, None]  # (N, 1)
    C = n_channels

    def wave(period: float, low: float, high: float) -> np.ndarray:
        amplitude, phase = rng.uniform(low, high, C), rng.uniform(0, 2 * math.pi, C)
        return amplitude * np.sin(2 * math.pi * t / period + phase)  # (N, C)

    level, slope = rng.normal(0.0, 3.0, C), rng.normal(0.0, 2.0, C)
    series = level + slope * t / n_steps
    series = series + wave(24 * 365.25, 0.5, 2.0) + wave(24 * 7, 0.3, 1.0)
    series = series + wave(24, 0.5, 2.0) + wave(12, 0.1, 0.5)
    phi, sigma = rng.uniform(0.8, 0.98, C), rng.uniform(0.1, 0.3, C)
    shocks = rng.normal(0.0, 1.0, (n_steps, C)) * sigma
    noise = np.empty((n_steps, C))
    state = np.zeros(C)
    for i in range(n_steps):
        state = phi * state + shocks[i]
        noise[i] = state
    series = series + noise
    if C > 1:
        mix = rng.dirichlet(np.ones(C - 1))  # (C-1,) convex weights
        kernel = np.ones(12) / 12.0
        blended = np.convolve(series[:, :-1] @ mix, kernel, mode="same")
        series[:, -1] = 0.5 * series[:, -1] + blended
    series.setflags(write=False)
    return series

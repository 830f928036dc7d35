"""In-context linear regression (Garg et al. 2022, as set up in the structured-attention paper).

Each sample draws a weight vector ``w ~ N(0, I_d)`` and ``n`` points ``x_i ~ N(0, I / d_cur)`` on
the first ``d_cur`` coordinates (zeros beyond, so ``E ||x||^2 = 1``), with ``y_i = w . x_i`` and no
noise (so ``E y^2 = 1``). The sequence interleaves ``x_i`` and ``[y_i, 0, ..., 0]``::

    inputs  (B, 2n, d): x_0, [y_0, 0..], x_1, [y_1, 0..], ...
    targets (B, n):     y_0, y_1, ...

The prediction of ``y_i`` is the model output at the position of ``x_i`` (even positions), so a
causal model predicts it from the pairs before it. Loss: MSE over all points. Metric
``last_sq_error``: squared error at the last point averaged over the batch (0 = solved, since with
more points than dimensions least squares is exact; about 1 = the trivial zero predictor).

Curriculum (train split only): ``d_cur`` starts at ``curriculum_start_dims`` and grows by 1 every
``curriculum_interval`` steps up to ``n_dims``; the number of points starts at twice that and grows
by 2 per interval up to ``n_points``. The val split always uses the full ``n_dims`` and
``n_points``.

Randomness: every batch comes from a fresh generator seeded from one draw of the passed generator
mixed with the split, so train and val batches are disjoint streams even for the same generator
state, and everything is deterministic given it. With ``pool_size`` (the paper's finite training
set) train samples are drawn uniformly from a fixed pool of ``pool_size`` samples (sample ``s`` is
generated from seeds derived from ``s`` alone, independently of the training seed, so the pool is
one dataset); val samples never come from the pool.

On a device (``batch(..., device=...)``) the sub-generator lives on that device, so a batch is
drawn there with no host-to-device copy; on the CPU this is the same code as always. The pool is
the exception: its samples are drawn on the CPU (one generator per sample, as the pool defines
them) and copied.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from mlbtc_search.errors import SpecError

from .base import (
    MAX_POOL,
    MAX_SIZE,
    Adapter,
    Task,
    as_device,
    check_bool,
    check_int,
    check_outputs,
    check_split,
    derive_seed,
    draw_seed,
)

_SPLIT_SALT = {"train": 0x7A11, "val": 0x5A1D}
_POOL_SALT = 0x9001


class IclRegressionTask(Task):
    """In-context linear regression with an optional dimension/points curriculum."""

    name = "icl_regression"
    metric_name = "last_sq_error"

    def __init__(
        self,
        *,
        n_dims: int = 16,
        n_points: int | None = None,
        curriculum: bool = True,
        curriculum_start_dims: int = 4,
        curriculum_interval: int = 200,
        pool_size: int | None = None,
    ) -> None:
        self.n_dims = check_int(n_dims, ("n_dims",), "n_dims", high=MAX_SIZE)
        self.n_points = (
            2 * self.n_dims
            if n_points is None
            else check_int(n_points, ("n_points",), "n_points", high=MAX_SIZE)
        )
        self.curriculum = check_bool("curriculum", curriculum)
        self.start_dims = check_int(
            curriculum_start_dims,
            ("curriculum_start_dims",),
            "curriculum_start_dims",
            high=MAX_SIZE,
        )
        if self.start_dims > self.n_dims:
            raise SpecError(
                "curriculum_start_dims <= n_dims must hold, got "
                f"curriculum_start_dims={self.start_dims} > n_dims={self.n_dims}",
                path=("curriculum_start_dims",),
            )
        self.interval = check_int(
            curriculum_interval, ("curriculum_interval",), "curriculum_interval", high=MAX_SIZE
        )
        self.pool_size = (
            None
            if pool_size is None
            else check_int(pool_size, ("pool_size",), "pool_size", high=MAX_POOL)
        )
        self.options: dict[str, Any] = {
            "n_dims": self.n_dims,
            "n_points": self.n_points,
            "curriculum": self.curriculum,
            "curriculum_start_dims": self.start_dims,
            "curriculum_interval": self.interval,
            "pool_size": self.pool_size,
        }
        self.adapter = Adapter("vector", self.n_dims, 1, 2 * self.n_points)

    # -- curriculum --------------------------------------------------------------------------

    def dims_at(self, step: int) -> int:
        """Active dimensions ``d_cur`` of training batches at ``step``."""
        if not self.curriculum:
            return self.n_dims
        return min(self.n_dims, self.start_dims + max(step, 0) // self.interval)

    def points_at(self, step: int) -> int:
        """Number of (x, y) points in training batches at ``step``."""
        if not self.curriculum:
            return self.n_points
        return min(self.n_points, 2 * self.start_dims + 2 * (max(step, 0) // self.interval))

    def seq_len_at(self, step: int) -> int:
        return 2 * self.points_at(step)

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
        device = as_device(device)
        batch_size = check_int(batch_size, ("batch_size",), "batch_size", high=MAX_SIZE)
        if split == "train":
            d_cur, n = self.dims_at(step), self.points_at(step)
        else:
            d_cur, n = self.n_dims, self.n_points
        seed = derive_seed(draw_seed(generator), _SPLIT_SALT[split])
        if split == "train" and self.pool_size is not None:
            sub = torch.Generator().manual_seed(seed)
            x, w = self._pool_samples(self.pool_size, batch_size, d_cur, n, sub)
            x, w = x.to(device), w.to(device)
        else:
            sub = torch.Generator(device=device).manual_seed(seed)
            x = torch.randn(batch_size, n, d_cur, generator=sub, device=device)  # (B, n, d_cur)
            w = torch.randn(batch_size, d_cur, generator=sub, device=device)  # (B, d_cur)
        x = x / math.sqrt(d_cur)
        y = torch.einsum("bnd,bd->bn", x, w)  # (B, n)
        return self._interleave(x, y), y

    def _pool_samples(
        self, pool_size: int, batch_size: int, d_cur: int, n: int, generator: torch.Generator
    ) -> tuple[Tensor, Tensor]:
        """Samples drawn from the fixed pool, truncated to the current dims and points."""
        index = torch.randint(0, pool_size, (batch_size,), generator=generator)
        xs, ws = [], []
        for s in index.tolist():
            gx = torch.Generator().manual_seed(derive_seed(_POOL_SALT, s, 0))
            gw = torch.Generator().manual_seed(derive_seed(_POOL_SALT, s, 1))
            xs.append(torch.randn(self.n_points, self.n_dims, generator=gx)[:n, :d_cur])
            ws.append(torch.randn(self.n_dims, generator=gw)[:d_cur])
        return torch.stack(xs), torch.stack(ws)  # (B, n, d_cur), (B, d_cur)

    def _interleave(self, x: Tensor, y: Tensor) -> Tensor:
        """``x`` (B, n, d_cur) and ``y`` (B, n) -> inputs (B, 2n, n_dims), zero-padded."""
        B, n, d_cur = x.shape
        xs = x.new_zeros(B, n, self.n_dims)
        xs[:, :, :d_cur] = x
        ys = x.new_zeros(B, n, self.n_dims)
        ys[:, :, 0] = y
        return torch.stack((xs, ys), dim=2).reshape(B, 2 * n, self.n_dims)  # (B, n, 2, d)

    # -- loss and metric ---------------------------------------------------------------------

    def _predictions(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """Model outputs at the x positions: (B, 2n, 1) -> (B, n), in float32."""
        B, n = targets.shape
        check_outputs(outputs, B, 2 * n, 1)
        return outputs[:, 0::2, 0].float()  # (B, n)

    def loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        return F.mse_loss(self._predictions(outputs, targets), targets.float())

    def metric(self, outputs: Tensor, targets: Tensor) -> float:
        preds = self._predictions(outputs, targets).double()
        return float(((preds[:, -1] - targets[:, -1].double()) ** 2).mean())

"""The task abstraction: a task owns its data, its loss and its metric, and nothing else.

A task tells the model builder which input/output adapters it needs (:class:`Adapter`), hands out
``(inputs, targets)`` batches for the ``"train"`` and ``"val"`` splits from an explicit
``torch.Generator``, and turns model outputs into a training loss and a task metric. It knows
nothing about models, optimizers, budgets, Optuna or Ray.

The generator passed to :meth:`Task.batch` is always a CPU generator; ``device=`` says where the
batch is made. On the CPU (the default) batches are exactly what they were before devices
existed. On another device the data never crosses from the host per step: every random draw
runs on the device, from a device generator seeded by one draw of the CPU generator (so batches
are deterministic for a seed on a given device, but differ from the CPU's, which uses another
random number generator), and the data a task reads (a text corpus, a series) is copied to the
device once and kept there (:meth:`Task.resident`). :meth:`Task.evaluate` makes its batches on
the device of the model's first parameter.

Option validation helpers live here too, so every task reports a bad option the same way: a
:class:`~mlbtc_search.errors.SpecError` whose path is the option name (callers that know where the
options came from re-locate it with ``err.prefixed(("task", "options"))``).
"""

from __future__ import annotations

import abc
import os
import warnings
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from mlbtc_search.checks import check_int
from mlbtc_search.errors import SpecError, TrainingError, UsageError

SPLITS = ("train", "val")
INPUT_KINDS = ("vector", "tokens", "series")
MAX_SIZE = 1 << 16  # dims, lengths and batch sizes: checked before anything is allocated
MAX_POOL = 1 << 20  # pre-drawn regression tasks


@dataclass(frozen=True)
class Adapter:
    """What the model's input and output adapters must be for a task.

    ``input_kind`` is ``"vector"`` (a linear read-in of R^input_dim at every position),
    ``"tokens"`` (an embedding with vocabulary ``input_dim``) or ``"series"`` (a linear read-in of
    each step's ``input_dim`` values). ``output_dim`` is the size of the linear read-out at every
    position; ``seq_len`` is the task's maximum sequence length T.
    """

    input_kind: str
    input_dim: int
    output_dim: int
    seq_len: int

    def __post_init__(self) -> None:
        if self.input_kind not in INPUT_KINDS:
            raise SpecError(
                f"input_kind must be one of {', '.join(INPUT_KINDS)}, got {self.input_kind!r}",
                path=("input_kind",),
            )
        for field in ("input_dim", "output_dim", "seq_len"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise SpecError(f"{field} must be an integer >= 1, got {value!r}", path=(field,))


class Task(abc.ABC):
    """Data + loss + metric for one training problem.

    Subclasses set the class attributes ``name`` and ``metric_name``, take their options as
    keyword-only ``__init__`` arguments (validated there), and set ``self.adapter`` and
    ``self.options`` (the validated, JSON-able options: ``get_task(name, **options)`` recreates
    the task).
    """

    name: ClassVar[str]
    metric_name: ClassVar[str]
    adapter: Adapter
    options: dict[str, Any]

    @abc.abstractmethod
    def batch(
        self,
        split: str,
        batch_size: int,
        generator: torch.Generator,
        step: int = 0,
        *,
        device: torch.device | str | None = None,
    ) -> tuple[Tensor, Tensor]:
        """One batch ``(inputs, targets)`` of the ``"train"`` or ``"val"`` split, made on
        ``device`` (default: the CPU) as the module doc describes.

        ``inputs`` is float ``(B, T_step, input_dim)`` for vector/series adapters and long
        ``(B, T_step)`` for tokens, with ``T_step == self.seq_len_at(step)`` for the train split
        (curriculum) and ``adapter.seq_len`` for the val split.
        """

    @abc.abstractmethod
    def loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """The scalar training loss of model ``outputs`` ``(B, T_step, output_dim)``."""

    @abc.abstractmethod
    def metric(self, outputs: Tensor, targets: Tensor) -> float:
        """The task metric (``metric_name``) on one batch."""

    def seq_len_at(self, step: int) -> int:
        """Sequence length of training batches at ``step``; constant without a curriculum."""
        return self.adapter.seq_len

    def resident(self, name: str, data: Any, device: torch.device) -> Tensor:
        """``data`` (an array or tensor) as a tensor on ``device``, copied once and cached under
        ``name`` (uint16 token ids are kept as their int16 bit pattern: see ``as_long``)."""
        cache: dict[tuple[str, torch.device], Tensor] = self.__dict__.setdefault("_resident", {})
        key = (name, device)
        if key not in cache:
            if isinstance(data, np.ndarray):
                array = np.ascontiguousarray(data.view(np.int16) if data.dtype == np.uint16
                                             else data)
                with warnings.catch_warnings():  # a read-only memmap: the tensor is never written
                    warnings.simplefilter("ignore", UserWarning)
                    data = torch.from_numpy(array)
            cache[key] = data.to(device)
        return cache[key]

    def evaluate(
        self,
        model: Callable[[Tensor], Tensor],
        *,
        batches: int = 8,
        batch_size: int = 64,
        seed: int = 1234,
    ) -> dict[str, float]:
        """Mean loss and metric of ``model`` over ``batches`` held-out (``"val"``) batches.

        The model runs in eval mode under ``torch.no_grad`` (its previous mode is restored) on the
        device of its first parameter. The batches depend only on ``seed``, so two calls with the
        same seed see the same data. Batches have equal size, so the mean of per-batch values is
        the mean over all samples.
        """
        batches = check_int(batches, ("batches",), "batches", high=MAX_SIZE)
        batch_size = check_int(batch_size, ("batch_size",), "batch_size", high=MAX_SIZE)
        generator = torch.Generator().manual_seed(seed)
        device = _device_of(model)
        on_device = {} if device.type == "cpu" else {"device": device}  # older tasks: CPU only
        was_training = model.training if isinstance(model, nn.Module) else None
        if isinstance(model, nn.Module):
            model.eval()
        losses: list[float] = []
        metrics: list[float] = []
        try:
            with torch.no_grad():
                for _ in range(batches):
                    inputs, targets = self.batch("val", batch_size, generator, **on_device)
                    inputs, targets = inputs.to(device), targets.to(device)
                    outputs = model(inputs)
                    losses.append(float(self.loss(outputs, targets)))
                    metrics.append(float(self.metric(outputs, targets)))
        finally:
            if isinstance(model, nn.Module) and was_training is not None:
                model.train(was_training)
        return {"val_loss": sum(losses) / len(losses), "metric": sum(metrics) / len(metrics)}

    def __repr__(self) -> str:
        args = ", ".join(f"{key}={value!r}" for key, value in self.options.items())
        return f"{type(self).__name__}({args})"


def _device_of(model: Callable[[Tensor], Tensor]) -> torch.device:
    """The device of a module's first parameter or buffer; the CPU for plain callables."""
    if isinstance(model, nn.Module):
        for tensor in model.parameters():
            return tensor.device
        for tensor in model.buffers():
            return tensor.device
    return torch.device("cpu")


# ---------------------------------------------------------------------------------------------
# Shared helpers for the tasks: option checks, split checks, output shape checks, seeds.


def check_fraction(name: str, value: Any) -> float:
    """``value`` as a float strictly between 0 and 1."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)):
        raise SpecError(f"{name} must be a number in (0, 1), got {value!r}", path=(name,))
    if not 0.0 < float(value) < 1.0:
        raise SpecError(f"0 < {name} < 1 must hold, got {name}={value}", path=(name,))
    return float(value)


def check_bool(name: str, value: Any) -> bool:
    """``value`` if it is a bool (YAML ``true``/``false``)."""
    if not isinstance(value, bool):
        raise SpecError(f"{name} must be true or false, got {value!r}", path=(name,))
    return value


def check_choice(name: str, value: Any, choices: Collection[str]) -> str:
    """``value`` if it is one of ``choices``."""
    if value not in choices:
        raise SpecError(
            f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}", path=(name,)
        )
    return str(value)


def check_path(name: str, value: Any, what: str) -> Path | None:
    """``None``, or ``value`` as an absolute path that exists (else a UsageError naming it)."""
    if value is None:
        return None
    if not isinstance(value, (str, os.PathLike)):
        raise SpecError(f"{name} must be a file path or null, got {value!r}", path=(name,))
    path = Path(value).expanduser().resolve()
    if not path.exists():
        raise UsageError(f"{what} {str(value)!r} does not exist (task option {name}={value!r})")
    return path


def check_split(split: str) -> None:
    """Raise unless ``split`` is ``"train"`` or ``"val"``."""
    if split not in SPLITS:
        raise SpecError(f"split must be one of 'train', 'val', got {split!r}", path=("split",))


def check_outputs(outputs: Tensor, batch: int, seq_len: int, output_dim: int) -> None:
    """Raise a TrainingError unless ``outputs`` has shape ``(batch, seq_len, output_dim)``."""
    expected = (batch, seq_len, output_dim)
    if tuple(outputs.shape) != expected:
        raise TrainingError(
            f"model outputs must have shape (B, T, output_dim) = {expected} for these targets, "
            f"got {tuple(outputs.shape)}"
        )


def derive_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from integer ``parts`` (same on every platform)."""
    state = np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def draw_seed(generator: torch.Generator) -> int:
    """One 62-bit integer drawn from ``generator`` (advances it)."""
    return int(torch.randint(0, 2**62, (1,), generator=generator))


def as_device(device: torch.device | str | None) -> torch.device:
    """``device`` as a ``torch.device`` (``None``: the CPU)."""
    return torch.device("cpu") if device is None else torch.device(device)


def device_generator(generator: torch.Generator, device: torch.device) -> torch.Generator:
    """A generator on ``device`` seeded by one draw of the CPU ``generator`` (advances it)."""
    return torch.Generator(device=device).manual_seed(draw_seed(generator))


def as_long(window: Tensor) -> Tensor:
    """Token ids gathered from a resident tensor as int64 (int16 holds uint16 bit patterns)."""
    if window.dtype == torch.int16:
        return window.long() & 0xFFFF
    return window.long()

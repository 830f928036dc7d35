"""Language modeling on bytes of a UTF-8 text file, or on nanoGPT ``train.bin``/``val.bin`` tokens.

Sources (option ``path``):

- ``None``: a corpus built at run time from what CPython ships (no download, no copy shipped),
  named by option ``corpus`` (:mod:`trainers.tasks.corpus`): ``"pydoc"`` (default), real English
  text, CPython's reference documentation topics (about 465 KB); ``"stdlib"``, that text plus the
  standard library's sources (about 32 MB, too big for our models to memorise). Their exact bytes
  follow the running CPython version, so compare results on one Python version.
- a file (``format`` ``"text"`` or ``"auto"``): its raw bytes, vocabulary 256. The last
  ``val_fraction`` of the bytes is the validation split.
- a directory (``format`` ``"nanogpt"`` or ``"auto"``): ``train.bin`` and ``val.bin`` as written
  by nanoGPT's ``prepare.py`` (flat uint16 token ids), memory-mapped; the vocabulary is
  ``max token id + 1`` over both files and ``val_fraction`` is unused.

Batches are random windows of ``seq_len + 1`` tokens: inputs ``(B, T)`` long, targets ``(B, T)``
the next tokens. Loss: cross entropy in nats. Metric ``bits_per_byte``: the cross entropy in bits
(nats / ln 2), computed in float64 so a uniform predictor over 256 bytes scores exactly 8. For
token files the same number is bits per *token*; the metric keeps its name so that every text
task reports one metric.

On a device (``batch(..., device=...)``) the tokens are copied to it once (kept as a resident
tensor, up to ``RESIDENT_MAX`` bytes) and each batch is gathered there: the window starts come
from a device generator (module doc of :mod:`trainers.tasks.base`). Larger token files are
gathered on the CPU and each batch is copied.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from mlbtc_search.errors import SpecError, UsageError

from .base import (
    MAX_SIZE,
    Adapter,
    Task,
    as_device,
    as_long,
    check_choice,
    check_fraction,
    check_int,
    check_outputs,
    check_path,
    check_split,
    device_generator,
)
from .corpus import CORPORA, pydoc_corpus
from .corpus import corpus as corpus_bytes

FORMATS = ("auto", "text", "nanogpt")
BYTE_VOCAB = 256
RESIDENT_MAX = 1 << 31  # bytes of tokens kept on a device; larger data is gathered on the CPU
default_corpus = pydoc_corpus  # the default corpus (kept under its old name)


class TextTask(Task):
    """Byte-level (or nanoGPT token-level) next-token prediction."""

    name = "text"
    metric_name = "bits_per_byte"

    def __init__(
        self,
        *,
        path: str | None = None,
        format: str = "auto",
        seq_len: int = 128,
        val_fraction: float = 0.05,
        corpus: str = "pydoc",
    ) -> None:
        fmt = check_choice("format", format, FORMATS)
        self.corpus = check_choice("corpus", corpus, CORPORA)
        self.seq_len = check_int(seq_len, ("seq_len",), "seq_len", high=MAX_SIZE)
        self.val_fraction = check_fraction("val_fraction", val_fraction)
        self.path = check_path("path", path, "text data path")
        if self.path is not None and self.corpus != "pydoc":
            raise SpecError(f"give either path or corpus, not both (got path={path!r} and "
                            f"corpus={corpus!r})", path=("corpus",))
        fmt = self._resolve_format(fmt)
        if fmt == "nanogpt" and self.path is not None:  # _resolve_format ensures a path
            self.train_data, self.val_data = _load_nanogpt(self.path)
            self._check_lengths(f"token files in {str(self.path)!r}", "tokens")
            vocab = int(max(self.train_data.max(), self.val_data.max())) + 1
        else:
            data = _load_bytes(self.path, self.corpus)
            n_val = int(len(data) * self.val_fraction)
            self.train_data, self.val_data = data[: len(data) - n_val], data[len(data) - n_val :]
            where = (f"the {self.corpus!r} corpus" if self.path is None
                     else f"text file {str(self.path)!r}")
            self._check_lengths(where, "bytes")
            vocab = BYTE_VOCAB
        self.vocab_size = vocab
        self.options: dict[str, Any] = {
            "path": None if self.path is None else str(self.path),
            "format": fmt,
            "seq_len": self.seq_len,
            "val_fraction": self.val_fraction,
            "corpus": self.corpus,
        }
        self.adapter = Adapter("tokens", vocab, vocab, self.seq_len)

    def _resolve_format(self, fmt: str) -> str:
        """``"auto"`` -> ``"nanogpt"`` for a directory, ``"text"`` otherwise; check the path."""
        if self.path is None:
            if fmt == "nanogpt":
                raise SpecError(
                    "format 'nanogpt' needs path to name a directory with train.bin and val.bin",
                    path=("path",),
                )
            return "text"
        if fmt == "auto":
            return "nanogpt" if self.path.is_dir() else "text"
        if fmt == "nanogpt" and not self.path.is_dir():
            raise SpecError(
                f"format 'nanogpt' needs path to be a directory with train.bin and val.bin, "
                f"got the file {str(self.path)!r}",
                path=("path",),
            )
        if fmt == "text" and self.path.is_dir():
            raise SpecError(
                "format 'text' needs path to be a text file, "
                f"got the directory {str(self.path)!r}",
                path=("path",),
            )
        return fmt

    def _check_lengths(self, source: str, unit: str) -> None:
        """Each split must hold at least one window of ``seq_len + 1`` tokens."""
        need = self.seq_len + 1
        for split, data in (("train", self.train_data), ("val", self.val_data)):
            if len(data) < need:
                raise SpecError(
                    f"{source}: the {split} split has {len(data)} {unit}, but "
                    f"seq_len + 1 = {need} are needed (one window of inputs and next-token "
                    "targets); use more data, a larger val_fraction or a smaller seq_len",
                    path=("path",),
                )

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
        T = self.seq_len
        if device.type != "cpu" and data.nbytes <= RESIDENT_MAX:
            tokens = self.resident(split, data, device)  # (N,) on the device, copied once
            sub = device_generator(generator, device)
            starts = torch.randint(0, len(data) - T, (batch_size,), generator=sub, device=device)
            window = gather_windows(tokens, starts, T + 1)  # (B, T+1)
        else:
            starts = torch.randint(0, len(data) - T, (batch_size,), generator=generator)
            index = starts.numpy()[:, None] + np.arange(T + 1)  # (B, T+1)
            window = torch.from_numpy(data[index].astype(np.int64))  # (B, T+1)
            if device.type != "cpu":
                window = window.pin_memory().to(device, non_blocking=True)
        return window[:, :-1], window[:, 1:]

    # -- loss and metric ---------------------------------------------------------------------

    def loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        B, T = targets.shape
        check_outputs(outputs, B, T, self.vocab_size)
        return F.cross_entropy(outputs.reshape(B * T, -1).float(), targets.reshape(B * T))

    def metric(self, outputs: Tensor, targets: Tensor) -> float:
        B, T = targets.shape
        check_outputs(outputs, B, T, self.vocab_size)
        nats = F.cross_entropy(outputs.reshape(B * T, -1).double(), targets.reshape(B * T))
        return float(nats) / math.log(2)


def gather_windows(tokens: Tensor, starts: Tensor, length: int) -> Tensor:
    """Windows ``tokens[s : s + length]`` for each start, as int64: (N,), (B,) -> (B, length)."""
    index = starts[:, None] + torch.arange(length, device=starts.device)  # (B, length)
    return as_long(tokens[index])


def _load_bytes(path: Path | None, name: str = "pydoc") -> np.ndarray:
    """The bytes of a text file (memory-mapped) or of corpus ``name``, as uint8."""
    if path is None:
        return np.frombuffer(corpus_bytes(name), dtype=np.uint8)
    return _memmap(path, np.uint8)


def _memmap(path: Path, dtype: Any) -> np.ndarray:
    """``path`` memory-mapped read-only (empty files give an empty array); unreadable or special
    files are one-line UsageErrors."""
    try:
        if not path.is_file():
            raise UsageError(
                f"{str(path)!r} is not a regular file (give a text file or a nanoGPT "
                "data directory)"
            )
        if path.stat().st_size == 0:
            return np.zeros(0, dtype=dtype)
        return np.memmap(path, dtype=dtype, mode="r")
    except OSError as exc:
        raise UsageError(f"cannot read {str(path)!r}: {exc.strerror or exc}") from None


def _load_nanogpt(directory: Path) -> tuple[np.ndarray, np.ndarray]:
    """``train.bin`` and ``val.bin`` of a nanoGPT data directory, memory-mapped as uint16."""
    splits = []
    for name in ("train.bin", "val.bin"):
        file = directory / name
        if not file.is_file():
            raise SpecError(
                f"nanoGPT data directory {str(directory)!r} must contain train.bin and val.bin, "
                f"but {name} is missing",
                path=("path",),
            )
        size = file.stat().st_size
        if size % 2:
            raise SpecError(
                f"{str(file)!r} must hold uint16 tokens (an even number of bytes), "
                f"got {size} bytes",
                path=("path",),
            )
        splits.append(_memmap(file, np.uint16))
    return splits[0], splits[1]

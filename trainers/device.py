"""Where a run executes: the device, bf16 autocast, optional ``torch.compile``, GPU memory caps.

``TrainConfig.device`` is ``"cpu"`` (the default: runs are what they were before GPUs), ``"cuda"``,
``"cuda:N"`` or ``"auto"`` (CUDA when torch sees a GPU, else the CPU). The spelling is checked when
the config is built (:func:`check_device`); whether CUDA is there is checked only when a run starts
(:func:`resolve_device`), because a search driver without a GPU builds the configs of trials that
run on GPU workers.

``TrainConfig.autocast`` is ``"auto"`` (bf16 on CUDA, off on the CPU), ``"bf16"`` or ``"off"``.
Under bf16 autocast the matmuls, einsums and bmms of the forward pass run in bfloat16; what stays
in float32 (and why it is safe):

- the weights and AdamW's moments (autocast casts copies for the matmuls; the update is fp32);
- softmax, log-softmax, layer norm and the cross entropy (on autocast's float32 list), and the
  log-sum-exp merge of the multi-level attention kernel (its accumulators are float32 whatever the
  input dtype);
- the losses and metrics: the tasks take ``outputs.float()`` (``.double()`` for the metrics), so
  the read-out is rounded to bf16 once (relative error 2^-9: a floor near 1e-5 for the in-context
  regression error, far below the 0.1 that separates the structures);
- the µP logit scales (1/d) multiply q in bf16, which keeps 8 exponent bits: no underflow at any
  width we build, and the relative rounding of a logit is the same 2^-9 as any bf16 matmul.

The backward pass runs outside the autocast context (as PyTorch recommends); bf16 needs no loss
scaling. Autocast does not reach the backward of a custom autograd function, so ours compute it
in the dtype of their saved activations (the BTT cores), or run with autocast off on operands
cast to the autocast dtype (the attention kernels' functions, so attention runs in bf16 with
float32 log-sum-exp accumulators); ``tests/trainers/test_gpu.py`` trains every structure family
under bf16.
CPU autocast is off under ``"auto"``: bf16 matmuls are slower than fp32 on CPUs without AMX,
and CPU runs must stay bit-for-bit what they were.

``TrainConfig.compile`` is ``False`` (default), ``True`` (``torch.compile`` with the default mode),
or a mode name: ``"reduce-overhead"`` (CUDA graphs: removes the per-kernel launch cost that
dominates small models) or ``"max-autotune"``. Whether it pays must be measured on the device
(``benchmarks/gpu_evidence.py --phases throughput``): compilation costs tens of seconds per
process, Ray starts a new process per GPU trial, and the curriculum changes the sequence length
(one recompilation, then dynamic shapes).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator
from typing import Any

import torch

from mlbtc_search.errors import SpecError, UsageError

DEVICES = ("cpu", "cuda", "cuda:N", "auto")
AUTOCAST = ("auto", "bf16", "off")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")
MEMORY_MARGIN = 0.95  # allocator cap = this x the GPU share (the CUDA context lives outside it)
_DEVICE = re.compile(r"^(cpu|auto|cuda(:\d+)?)$")


def check_device(value: Any) -> str:
    """``value`` if it spells a device (``cpu``, ``cuda``, ``cuda:N``, ``auto``), else a
    SpecError."""
    if not isinstance(value, str) or not _DEVICE.match(value):
        raise SpecError(f"device must be one of {', '.join(DEVICES)}, got {value!r}", ("device",))
    return value


def check_autocast(value: Any) -> str:
    if value not in AUTOCAST:
        raise SpecError(f"autocast must be one of {', '.join(AUTOCAST)}, got {value!r}",
                        ("autocast",))
    return value


def check_compile(value: Any) -> bool | str:
    if isinstance(value, bool) or value in COMPILE_MODES:
        return value
    raise SpecError(f"compile must be true, false or one of {', '.join(COMPILE_MODES)}, got "
                    f"{value!r}", ("compile",))


def cuda_summary() -> str:
    """Why CUDA is (not) usable, in a few words: torch build and device count."""
    built = torch.version.cuda
    if built is None:
        return f"torch {torch.__version__} is a CPU-only build"
    return f"torch {torch.__version__} (CUDA {built}) sees {torch.cuda.device_count()} GPU(s)"


def resolve_device(value: str) -> torch.device:
    """The device a run uses; a one-line UsageError when CUDA is asked for and is not there."""
    value = check_device(value)
    if value == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(value)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"device {value!r} needs CUDA, but {cuda_summary()}; use device "
                             "'cpu' or 'auto'")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"device {value!r} does not exist: {cuda_summary()}")
    return device


def autocast_dtype(setting: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of a run (``None``: no autocast)."""
    setting = check_autocast(setting)
    if setting == "off" or (setting == "auto" and device.type != "cuda"):
        return None
    return torch.bfloat16


@contextlib.contextmanager
def autocast(dtype: torch.dtype | None, device: torch.device) -> Iterator[None]:
    """``torch.autocast`` for ``dtype`` on ``device``, or nothing when ``dtype`` is None."""
    if dtype is None:
        yield
        return
    with torch.autocast(device_type=device.type, dtype=dtype):
        yield


def compiled(model: torch.nn.Module, setting: bool | str) -> Callable[..., Any]:
    """``model`` or ``torch.compile(model)`` (it shares the parameters; keep ``model`` for the
    state dict, whose keys the compiled wrapper would prefix with ``_orig_mod.``)."""
    setting = check_compile(setting)
    if setting is False:
        return model
    mode = None if setting is True or setting == "default" else setting
    return torch.compile(model, mode=mode)


def cap_memory(fraction: float, device: torch.device) -> float | None:
    """Cap this process's CUDA caching allocator at ``MEMORY_MARGIN x fraction`` of the GPU (Ray's
    fractional GPUs are bookkeeping only: nothing else stops one trial from taking the whole GPU).
    Returns the cap in bytes, or None when nothing was capped (CPU, or a whole GPU or more)."""
    if device.type != "cuda" or not 0 < fraction < 1:
        return None
    share = MEMORY_MARGIN * fraction
    torch.cuda.set_per_process_memory_fraction(share, device)
    return share * torch.cuda.get_device_properties(device).total_memory


def oom_reason(exc: BaseException, cap_bytes: float | None, fraction: float) -> str | None:
    """A one-line failure reason when ``exc`` is a CUDA out-of-memory error, else None."""
    if not isinstance(exc, torch.cuda.OutOfMemoryError):
        return None
    cap = f"{cap_bytes / 2**30:.1f} GiB" if cap_bytes else "no cap"
    first = str(exc).split(". ")[0].strip()
    return (f"CUDA out of memory with a GPU share of {fraction:g} (allocator cap {cap}): {first}; "
            "give each trial a larger resources.gpus or a smaller train.batch_size")


__all__ = ["AUTOCAST", "COMPILE_MODES", "DEVICES", "autocast", "autocast_dtype", "cap_memory",
           "check_autocast", "check_compile", "check_device", "compiled", "cuda_summary",
           "oom_reason", "resolve_device"]

"""Keep freed CPU memory for reuse instead of returning it to the kernel (glibc's ``mallopt``).

glibc serves every allocation above its mmap threshold (128 KiB, adapting up to 32 MiB) with a
fresh ``mmap`` and unmaps it on free; a training step that allocates the same activations every
step then page-faults (and the kernel zeroes) every page of them again, every step. Raising the
mmap and trim thresholds to 1 GiB keeps freed blocks in the heap for the next step. Measured on
the 2-core machine (one thread, CPU time, forward+backward): a BTT matrix at D=4096, 4096 rows,
334 -> 228 ms; a bilinear-BTT attention layer (T=1024, width 512) 1404 -> 1117 ms, with the plain
SDPA layer unchanged (396 -> 405 ms). The cost: a process keeps its peak heap instead of shrinking
after it. Trainers call ``reuse_freed_memory()`` when a run starts on the CPU, benchmarks for every
row at once. A no-op (False) where the C library has no ``mallopt`` (musl, macOS).
"""

from __future__ import annotations

import ctypes

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
THRESHOLD = 1 << 30  # bytes

_state: dict[str, bool] = {}


def reuse_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds (once per process); True when they are set."""
    if "ok" not in _state:
        try:
            mallopt = ctypes.CDLL(None).mallopt
        except (OSError, AttributeError):
            _state["ok"] = False
        else:
            mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
            _state["ok"] = (mallopt(M_MMAP_THRESHOLD, THRESHOLD) == 1
                            and mallopt(M_TRIM_THRESHOLD, THRESHOLD) == 1)
    return _state["ok"]

"""Compiling our C++ CPU kernels (``csrc/*.cpp``) on first use, for ``attention_cpu`` and
``linear_cpu``.

Each kernel is built with torch's C++ extension loader (a C++ compiler and ninja), once per
machine: the build is cached under ``TORCH_EXTENSIONS_DIR`` (default
``~/.cache/torch_extensions``) by a name that hashes the source text, the flags and the CPU's
feature flags (the build is -march=native). ``MLBTC_CPU_KERNEL=0`` turns every kernel off;
without a compiler each kernel warns once and its PyTorch path runs.
"""

from __future__ import annotations

import hashlib
import os
import platform
import sys
import threading
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

ENV = "MLBTC_CPU_KERNEL"
# -fopenmp: ATen's parallel_for is inline OpenMP pragmas (without it the kernel runs on one thread;
# torch's CPU wheels use the same GNU OpenMP runtime)
FLAGS = ["-O3", "-march=native", "-ffast-math", "-fopenmp"]


def enabled() -> bool:
    """False when ``MLBTC_CPU_KERNEL=0``."""
    return os.environ.get(ENV, "1") != "0"


def tracing() -> bool:
    """Inside torch.compile / torch.export tracing, where the kernels' ops are not traceable:
    their callers take the PyTorch paths."""
    compiling = getattr(torch.compiler, "is_compiling", lambda: False)
    return compiling()


def cpu_tag() -> str:
    """The build is -march=native: machines with other CPUs sharing a cache get their own."""
    try:
        info = Path("/proc/cpuinfo").read_text()
        flags = next((ln for ln in info.splitlines() if ln.startswith("flags")), "")
    except OSError:
        flags = platform.processor()
    return hashlib.sha1((flags + platform.machine()).encode()).hexdigest()[:10]


def build_name(source: Path, prefix: str) -> str:
    digest = hashlib.sha1(source.read_bytes() + " ".join(FLAGS).encode()).hexdigest()[:10]
    return f"{prefix}_{digest}_{cpu_tag()}"


def build(source: Path, prefix: str, what: str, probe: Callable[[], bool]) -> bool:
    """Compile (or load the cached build of) ``source``; says so on stderr while compiling.
    ``probe()`` tells whether its ops are now registered."""
    from torch.utils import cpp_extension

    name = build_name(source, prefix)
    try:  # (torch's own rule for where the build goes; says nothing if it moved)
        built = (Path(cpp_extension._get_build_directory(name, verbose=False))
                 / f"{name}.so").exists()
    except Exception:
        built = True
    if not built:
        print(f"mlbtc: compiling the {what} (once per machine, under a minute)...",
              file=sys.stderr, flush=True)
    # inline: torch writes the source into the build directory, so the build does not depend on
    # where this checkout lives (``load(sources=[path])`` rebuilt, silently, for every new path)
    cpp_extension.load_inline(name=name, cpp_sources=[source.read_text()], extra_cflags=FLAGS,
                              extra_ldflags=["-fopenmp"], is_python_module=False,
                              no_implicit_headers=True, verbose=False)
    return probe()


def load_once(state: dict[str, bool], lock: threading.Lock, source: Path, prefix: str,
              what: str, fallback: str, probe: Callable[[], bool]) -> bool:
    """Whether the kernel runs, building it on the first call (the answer is kept in
    ``state``); False when disabled or when it cannot be built (warns once, with the reason)."""
    if not enabled():
        return False
    if "ok" not in state:
        with lock:
            if "ok" not in state:
                try:
                    state["ok"] = build(source, prefix, what, probe)
                except Exception as e:  # no compiler, no ninja, no BLAS symbols: fall back
                    warnings.warn(f"mlbtc: the {what} could not be built ({type(e).__name__}: "
                                  f"{str(e).splitlines()[0][:200]}); {fallback} (same results, "
                                  f"slower). Set {ENV}=0 to skip the attempt.", RuntimeWarning,
                                  stacklevel=3)
                    state["ok"] = False
    return state["ok"]

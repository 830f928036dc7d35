"""Fixtures shared by the core tests."""

from __future__ import annotations

import os

import pytest
import torch

from mlbtc_search import attention_cpu, linear_cpu


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: one intra-op thread is faster than two, and immune to OpenMP spin
    contention when other processes load a 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _require_built(module, what: str) -> None:
    """Skip unless ``module``'s C++ kernel is built; in CI (``MLBTC_REQUIRE_SERVICES=1``, which
    installs g++ and ninja) a kernel that did not build fails instead."""
    if module.available():
        return
    if os.environ.get("MLBTC_REQUIRE_SERVICES") == "1":
        pytest.fail(f"the fused CPU {what} kernel did not build (CI installs g++ and ninja)")
    pytest.skip(f"the fused CPU {what} kernel is not built")


@pytest.fixture
def attention_kernel():
    """Use as ``pytest.mark.usefixtures("attention_kernel")``: ``attention_cpu`` is built."""
    _require_built(attention_cpu, "attention")


@pytest.fixture
def btt_kernel():
    """Use as ``pytest.mark.usefixtures("btt_kernel")``: ``linear_cpu`` is built."""
    _require_built(linear_cpu, "BTT")

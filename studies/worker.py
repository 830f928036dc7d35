"""What runs on a Ray worker for one trial: build the task, train, return results and weights.

:func:`run_trial` takes a plain JSON-able payload (made by the driver, see
``studies.trials.Recorder.payload``) and returns a plain dict; it never touches the study
storage (the driver is its only writer). Errors inside training come back as
``{"error": "..."}``; only a dead worker process makes the Ray call itself fail.

Returned dict: ``result`` (``TrainResult.to_json()`` of the first seed), ``weights``
(safetensors bytes of its state dict, for status ``ok``), ``seed_results`` (with ``seeds: k`` in
the payload: one ``{seed, status, val_loss, metric, steps, seconds, reason}`` per seed, trained
one after the other in this task; the first one that does not end ``ok`` ends the trial),
``gpu`` (for GPU trials: ``share`` of the GPU, allocator ``cap_bytes``, device ``name``, and
the wall-clock ``start``/``end`` of the worker call, which show whether trials really shared
the GPU at the same time), ``cpu_s`` (process CPU seconds of the training: compared with its
wall time it shows how much of a core the trial got), ``latency_s`` (when the objectives ask
for it), and where it ran: ``node`` (Ray node id), ``host``, ``pid``.

GPU trials (``payload["gpus"]`` > 0, device ``cuda``): Ray's fractional GPUs are bookkeeping only,
so the worker caps its CUDA caching allocator a little under its share
(:func:`trainers.device.cap_memory`); running out of memory then fails the trial with a one-line
reason that names the share and the cap instead of taking the other trials on the GPU down.

The driver names each Ray task ``mlbtc-trial-<number>``; Ray shows that name in its state API
and as the worker's process title (``ray::mlbtc-trial-3``) while the trial trains, which is how
an operator (or a test) finds the process of a trial.
"""

from __future__ import annotations

import os
import socket
import time
import traceback
from typing import Any

LATENCY_REPEATS = 5


def _where() -> dict[str, Any]:
    out: dict[str, Any] = {"host": socket.gethostname(), "pid": os.getpid(), "node": None}
    try:
        import ray

        if ray.is_initialized():
            out["node"] = ray.get_runtime_context().get_node_id()
    except Exception:  # noqa: BLE001 - where we ran is informative only
        pass
    return out


def measure_latency(model: Any, task: Any, device: str) -> float:
    """Median seconds of one forward pass on a batch of one full-length validation sequence."""
    import torch

    inputs, _ = task.batch("val", 1, torch.Generator().manual_seed(0))
    inputs = inputs.to(device)
    cuda = torch.device(device).type == "cuda"
    times = []
    with torch.no_grad():
        model(inputs)  # warm-up
        for _ in range(LATENCY_REPEATS):
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            model(inputs)
            if cuda:  # kernels run asynchronously: wait for them
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def add_model_outputs(out: dict[str, Any], result: Any, share: Any, payload: dict[str, Any],
                      task: Any) -> None:
    """Into a worker's answer: the GPU entry of ``share``, and for a run that finished, its
    weights (safetensors) and, when ``latency`` is an objective, its measured latency."""
    import safetensors.torch

    device = next(result.model.parameters()).device
    gpu = share.record(device)
    if gpu is not None:
        out["gpu"] = gpu
    if result.status == "ok":
        out["weights"] = safetensors.torch.save(result.state_dict())
        if "latency" in payload.get("objectives", ()):
            out["latency_s"] = measure_latency(result.model, task, device)


def _seed_result(res: dict[str, Any]) -> dict[str, Any]:
    keys = ("seed", "status", "val_loss", "metric", "steps", "seconds", "reason")
    return {k: res.get(k) for k in keys}


class GpuShare:
    """A trial's share of a GPU (``payload["gpus"]``), for both workers (this one and
    :func:`studies.rung_worker.run_rung`): :meth:`cap` caps the CUDA caching allocator a little
    under the share (:func:`trainers.device.cap_memory`), :meth:`record` is the ``gpu`` entry of
    the answer, :meth:`error` the one-line answer to an exception (naming the share and the cap
    when it is a CUDA out-of-memory error)."""

    def __init__(self, payload: dict[str, Any]):
        self.fraction = float(payload.get("gpus") or 0.0)
        self.cap_bytes: float | None = None
        self.start = time.time()

    def cap(self, device_setting: str) -> None:
        """Apply the cap for a run on ``device_setting`` (``TrainConfig.device``); nothing on
        the CPU or with a whole GPU."""
        from trainers.device import cap_memory, resolve_device

        self.cap_bytes = cap_memory(self.fraction, resolve_device(device_setting))

    def record(self, device: Any) -> dict[str, Any] | None:
        """``{share, cap_bytes, name, start, end}`` for a run on a CUDA ``device``, else None."""
        if device.type != "cuda":
            return None
        import torch

        return {"share": self.fraction, "cap_bytes": self.cap_bytes, "start": self.start,
                "name": torch.cuda.get_device_name(device), "end": time.time()}

    def error(self, exc: BaseException) -> str:
        oom = _oom_reason(exc, self.cap_bytes, self.fraction)
        if oom is not None:
            return oom
        detail = " ".join(str(exc).split()) or "".join(
            traceback.format_exception_only(type(exc), exc)).strip()
        return f"{type(exc).__name__}: {detail}"


def setup(payload: dict[str, Any], share: GpuShare) -> tuple[Any, Any, Any]:
    """(task, model spec, TrainConfig) of a worker payload; sets the thread count and applies
    the GPU share's memory cap. Imports torch (the worker's first use of it)."""
    import torch

    from mlbtc_search.model import ModelSpec
    from trainers.tasks import get_task
    from trainers.train import TrainConfig

    torch.set_num_threads(int(payload.get("threads") or 1))
    task = get_task(payload["task"]["name"], **payload["task"].get("options", {}))
    spec = ModelSpec.from_dict(payload["spec"])
    config = TrainConfig(**payload.get("train", {}))
    share.cap(config.device)
    return task, spec, config


def run_trial(payload: dict[str, Any]) -> dict[str, Any]:
    """Train one trial (see the module doc); never raises for a training problem."""
    where = _where()
    share = GpuShare(payload)
    try:
        from trainers.train import train

        task, spec, config = setup(payload, share)
        cpu = time.process_time()
        seed0 = int(payload["seed"])
        result = train(spec, task, float(payload["budget_flops"]), seed=seed0, config=config)
        out: dict[str, Any] = {**where, "result": result.to_json()}
        seeds = [_seed_result(out["result"])]
        for seed in range(seed0 + 1, seed0 + int(payload.get("seeds") or 1)):
            if seeds[-1]["status"] != "ok":
                break
            seeds.append(_seed_result(train(spec, task, float(payload["budget_flops"]),
                                            seed=seed, config=config).to_json()))
        out["seed_results"] = seeds
        out["cpu_s"] = time.process_time() - cpu
        add_model_outputs(out, result, share, payload, task)
        return out
    except KeyboardInterrupt:
        return {**where, "error": "interrupted"}
    except Exception as exc:  # noqa: BLE001 - reported to the driver, recorded on the trial
        return {**where, "error": share.error(exc)}


def _oom_reason(exc: BaseException, cap: float | None, fraction: float) -> str | None:
    try:
        from trainers.device import oom_reason
    except ImportError:  # torch itself failed to import: not an OOM
        return None
    return oom_reason(exc, cap, fraction)


__all__ = ["GpuShare", "measure_latency", "run_trial"]

"""Load an exported model directory with the core alone (torch, pyyaml, safetensors).

An export directory (written by ``mlbtc export``, see docs/export.md) holds::

    architecture.yaml    the complete ModelSpec (adapter and max_seq_len included) + task
    model.safetensors    the trained weights (the model's state_dict, safetensors only)

:func:`load` rebuilds the module from the spec and fills in the weights. It never unpickles
anything: the YAML goes through ``yaml.safe_load`` and the weights through safetensors, so loading
a directory from someone else cannot run code. Optuna, Ray, Dash and SQLAlchemy are not imported.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from .errors import SpecError, UsageError
from .model import ModelSpec, Transformer, build_model
from .yamlio import load_yaml

ARCHITECTURE = "architecture.yaml"
WEIGHTS = "model.safetensors"


def load_spec(path: str | os.PathLike[str]) -> ModelSpec:
    """The :class:`ModelSpec` in ``path/architecture.yaml`` (it must include the adapter)."""
    directory = _directory(path)
    located = load_yaml(_file(directory, ARCHITECTURE))
    try:
        spec = ModelSpec.from_dict(located.data)
    except SpecError as err:
        raise located.locate(err) from None
    if spec.adapter is None:
        raise SpecError("an exported architecture must give its adapter {input_kind, "
                        "input_dim, output_dim} (re-export it with `mlbtc export`)",
                        ("adapter",), located.source(()))
    return spec


def load(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> Transformer:
    """Rebuild the exported model in directory ``path``, in eval mode, on ``device``.

    ``path/architecture.yaml`` gives the architecture and ``path/model.safetensors`` the weights,
    which must match it exactly (same parameter names and shapes); anything else is a
    :class:`~mlbtc_search.errors.UsageError` that says what differs.
    """
    spec = load_spec(path)
    weights = _file(_directory(path), WEIGHTS)
    state = _read_safetensors(weights)
    model = build_model(spec)
    check_state_dict(model, state, str(weights))
    model.load_state_dict(state, strict=True)
    return model.to(device).eval()


def check_state_dict(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Raise a UsageError unless ``state`` has exactly ``model``'s parameter names and shapes."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} tensor(s) ({', '.join(missing[:3])}"
                        f"{', ...' if len(missing) > 3 else ''})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensor(s) ({', '.join(unexpected[:3])}"
                        f"{', ...' if len(unexpected) > 3 else ''})")
    for name in sorted(set(expected) & set(state)):
        got = tuple(state[name].shape)
        if got != expected[name]:
            problems.append(f"{name} has shape {list(got)} but the architecture needs "
                            f"{list(expected[name])}")
            break
    if problems:
        raise UsageError(f"the weights in {source} do not match the architecture: "
                         + "; ".join(problems))


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise UsageError(f"cannot read {path} as safetensors: {exc}") from None


def _directory(path: str | os.PathLike[str]) -> Path:
    directory = Path(path)
    if not directory.is_dir():
        what = "is a file" if directory.exists() else "does not exist"
        raise UsageError(f"export directory {directory} {what}; give the directory that holds "
                         f"{ARCHITECTURE} and {WEIGHTS} (written by `mlbtc export`)")
    return directory


def _file(directory: Path, name: str) -> Path:
    path = directory / name
    if not path.is_file():
        raise UsageError(f"{path} not found: an export directory must hold {ARCHITECTURE} and "
                         f"{WEIGHTS} (written by `mlbtc export`)")
    return path

"""µP: per-core learning-rate multipliers and AdamW parameter groups for a whole model.

Any module with a ``mup_cores()`` method (``StructuredLinear``, the attention score features)
names its cores with their fan-in. Initialization lives with the cores (std
sqrt(min(fan_in, fan_out)) / fan_in). Here each core gets the Adam multiplier

    base_width / (fan_in * n_cores)

(1/fan-in, split across the cores of the layer), which for a dense layer is the usual
base_width / d_in. A plain ``nn.Linear`` weight counts as one dense core. Embeddings, norms,
biases and position tables get multiplier 1 and no weight decay.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

DEFAULT_BASE_WIDTH = 64


@dataclass(frozen=True)
class ParamRule:
    name: str
    lr_mult: float
    weight_decay: bool


def param_rules(model: nn.Module, base_width: int = DEFAULT_BASE_WIDTH,
                fixed_mult: Iterable[str] = ()) -> dict[str, ParamRule]:
    """One rule per named parameter. ``fixed_mult`` names parameters (prefixes) that keep
    multiplier 1 whatever their shape, e.g. a read-in from a small input dimension."""
    fixed = tuple(fixed_mult)
    rules: dict[str, ParamRule] = {}
    for mod_name, module in model.named_modules():
        prefix = f"{mod_name}." if mod_name else ""
        if hasattr(module, "mup_cores"):  # StructuredLinear, attention score features
            for p_name, fan_in, n_cores in module.mup_cores():
                name = f"{prefix}{p_name}"
                rules[name] = ParamRule(name, base_width / (fan_in * n_cores), True)
        elif isinstance(module, nn.Linear):
            name = f"{prefix}weight"
            rules[name] = ParamRule(name, base_width / module.in_features, True)
    for name, _ in model.named_parameters():
        if name not in rules or name.startswith(fixed):
            rules[name] = ParamRule(name, 1.0, False)
    return rules


def param_groups(model: nn.Module, lr: float, base_width: int = DEFAULT_BASE_WIDTH,
                 weight_decay: float = 0.0, fixed_mult: Iterable[str] = ()) -> list[dict]:
    """AdamW parameter groups (one per distinct multiplier) for a whole model."""
    rules = param_rules(model, base_width, fixed_mult)
    groups: dict[tuple[float, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        rule = rules[name]
        key = (rule.lr_mult, rule.weight_decay)
        if key not in groups:
            groups[key] = {"params": [], "names": [], "lr": lr * rule.lr_mult,
                           "lr_mult": rule.lr_mult,
                           "weight_decay": weight_decay if rule.weight_decay else 0.0}
        groups[key]["params"].append(p)
        groups[key]["names"].append(name)
    return list(groups.values())


def make_adamw(model: nn.Module, lr: float, base_width: int = DEFAULT_BASE_WIDTH,
               weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.95),
               fixed_mult: Iterable[str] = ()) -> torch.optim.AdamW:
    groups = param_groups(model, lr, base_width, weight_decay, fixed_mult)
    for g in groups:
        g.pop("names")
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=1e-12)

"""AttentionSpec: sequence levels over positions, a MatrixSpec bilinear form per level, per head.

For one head, the score between positions t and t' is

    S[t, t'] = sum_l 1[block_l(t) == block_l(t')] * scale_l * x_t^T M_l x_t'

with contiguous blocks of ``block_size`` positions at level l (None: one global block) and M_l a
D x D MatrixSpec. Heads come in groups; each group has its own levels (heterogeneous heads). W_V
and W_O are MatrixSpecs too. The YAML form, its presets (standard, bilinear_btt, bilinear_mlr,
mlr, sliding_window, global_window; one function each in ``attention_presets``) and the explicit
``groups`` form are in docs/models.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .errors import SpecError
from .matrix import MatrixSpec


def check_keys(d: Any, allowed: set[str], path: tuple, what: str) -> dict:
    if not isinstance(d, dict):
        raise SpecError(f"{what} must be a mapping, got {type(d).__name__}", path)
    for key in d:
        if key not in allowed:
            raise SpecError(f"unknown key {key!r} in {what}; valid keys: "
                            f"{', '.join(sorted(allowed))}", path + (key,))
    return d


@dataclass(frozen=True)
class ScoreLevel:
    """One sequence level: blocks of ``block_size`` positions (None = global), score matrix,
    logit scale (None = ``logit_mult / width`` of this level's q.k, the µP 1/d rule)."""

    block_size: int | None
    score: MatrixSpec
    scale: float | None = None

    def to_dict(self) -> dict:
        d: dict[str, Any] = {"block_size": self.block_size, "score": self.score.to_dict()}
        if self.scale is not None:
            d["scale"] = self.scale
        return d


@dataclass(frozen=True)
class HeadGroup:
    """``heads`` heads sharing one scoring structure; ``window`` makes it sliding-window."""

    heads: int
    levels: tuple[ScoreLevel, ...]
    window: int | None = None

    def to_dict(self) -> dict:
        d: dict[str, Any] = {"heads": self.heads, "levels": [lv.to_dict() for lv in self.levels]}
        if self.window is not None:
            d["window"] = self.window
        return d


OPTION_KEYS = ("qk_norm_per_level", "mean_over_shared_levels")


@dataclass(frozen=True)
class AttentionSpec:
    width: int
    groups: tuple[HeadGroup, ...]
    value: MatrixSpec
    output: MatrixSpec
    qk_norm: bool = True
    causal: bool = True
    logit_mult: float = 8.0
    kind: str = "general"
    # paper-faithful options (docs/models.md section 2.5): one QK-LayerNorm and logit scale per
    # score part (matrix level) instead of per head; MLR over the sequence averaging the shared
    # levels' scores instead of summing them
    qk_norm_per_level: bool = False
    mean_over_shared_levels: bool = False

    def __post_init__(self) -> None:
        D = self.width
        heads = self.heads
        if D % heads:
            raise SpecError(f"the total number of heads ({heads}) must divide width={D}",
                            ("heads",))
        for g, group in enumerate(self.groups):
            path = ("groups", g)
            if not group.levels:
                raise SpecError("a head group needs at least one level", path + ("levels",))
            prev: int | None = None
            for l, lv in enumerate(group.levels):
                if lv.score.n_in != D or lv.score.n_out != D:
                    raise SpecError(f"score matrices must be {D} x {D} (width), got "
                                    f"{lv.score.n_out} x {lv.score.n_in}",
                                    path + ("levels", l, "score"))
                bs = lv.block_size
                if bs is None and l > 0:
                    raise SpecError("only the first level may be global (block_size: null); "
                                    "levels must be nested from coarse to fine",
                                    path + ("levels", l, "block_size"))
                if bs is not None and prev is not None and (bs > prev or prev % bs):
                    raise SpecError(f"block sizes must be nested: each must divide the previous "
                                    f"level's ({prev}), got {bs}",
                                    path + ("levels", l, "block_size"))
                if bs is not None:
                    prev = bs
            if group.window is not None and (len(group.levels) != 1 or
                                             group.levels[0].block_size is not None):
                raise SpecError("a sliding window goes with exactly one global level",
                                path + ("window",))
        for name, m in (("value", self.value), ("output", self.output)):
            if m.n_in != D or m.n_out != D:
                raise SpecError(f"{name} must be a {D} x {D} matrix", (name,))

    @property
    def heads(self) -> int:
        return sum(g.heads for g in self.groups)

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    def to_dict(self) -> dict:
        d = {"kind": "general", "family": self.kind,
             "groups": [g.to_dict() for g in self.groups],
             "value": self.value.to_dict(), "output": self.output.to_dict(),
             "qk_norm": self.qk_norm, "causal": self.causal, "logit_mult": self.logit_mult}
        for key in OPTION_KEYS:  # written only when on: specs without them keep their hash
            if getattr(self, key):
                d[key] = True
        return d

    @classmethod
    def from_dict(cls, d: Any, width: int, seq_len: int | None, path: tuple = ()) -> AttentionSpec:
        """Presets (``kind``, from ``attention_presets.ATTENTION_PRESETS``) expand into the
        explicit ``groups`` form. ``seq_len`` gives the default block sizes of ``mlr``."""
        from .attention_presets import ATTENTION_PRESETS  # the presets build on this module

        if isinstance(d, str):
            d = {"kind": d}
        every = {k for p in ATTENTION_PRESETS.values() for k in p.keys}
        d = check_keys(d, every, path, "attention")
        kind = d.get("kind", "general")
        if kind not in ATTENTION_PRESETS:
            raise SpecError(f"unknown attention kind {kind!r}; valid kinds: "
                            f"{', '.join(ATTENTION_PRESETS)}", path + ("kind",))
        preset = ATTENTION_PRESETS[kind]
        check_keys(d, set(preset.keys), path, f"{kind} attention")
        common = {
            "qk_norm": d.get("qk_norm", True), "causal": d.get("causal", True),
            "logit_mult": d.get("logit_mult", 8.0),
            **{key: d.get(key, False) for key in OPTION_KEYS},
        }
        for key in ("qk_norm", "causal", *OPTION_KEYS):
            if not isinstance(common[key], bool):
                raise SpecError(f"{key} must be true or false", path + (key,))
        if isinstance(common["logit_mult"], bool) or not isinstance(
                common["logit_mult"], int | float) or common["logit_mult"] <= 0:
            raise SpecError("logit_mult must be a positive number", path + ("logit_mult",))
        value = MatrixSpec.from_dict(d.get("value", {"dense": {}}), path + ("value",),
                                     width, width)
        output = MatrixSpec.from_dict(d.get("output", {"dense": {}}), path + ("output",),
                                      width, width)
        groups = preset.expand(d, width, seq_len, path)
        family = d.get("family", kind) if kind == "general" else kind
        if family not in ATTENTION_PRESETS:
            raise SpecError(f"family must be one of {', '.join(ATTENTION_PRESETS)}",
                            path + ("family",))
        try:
            return cls(width, groups, value, output, kind=family, **common)
        except SpecError as err:
            raise err.prefixed(path) from None

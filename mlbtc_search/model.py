"""ModelSpec -> a pre-LayerNorm transformer with the task's input/output adapters.

YAML (documented in docs/models.md)::

    width: 64
    depth: 3
    attention: {kind: mlr, heads: 8, ranks: [4, 2, 1, 1]}   # every layer (or `layers:` per layer)
    mlp: {dense: {}}            # both MLP matrices (D -> ratio*D -> D), or {up: SPEC, down: SPEC}
    mlp_ratio: 4
    max_seq_len: 64             # default: the task's sequence length
    adapter: {input_kind: vector, input_dim: 16, output_dim: 1}   # filled in from the task

FLOPs follow DESIGN.md section 3: forward, per token, at the sequence length, embedding/readout
excluded unless asked for; ``model_flops(spec, T, embedding=True) * batch * T`` equals what
FlopCounterMode counts on ``Transformer.forward``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import sys
from dataclasses import MISSING, dataclass, fields, replace
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import kv_cache
from .attention import Attention
from .attention_plan import attention_plan
from .attention_spec import AttentionSpec
from .btc import MAX_SIZE
from .checks import check_int as _int
from .errors import SpecError
from .linear import StructuredLinear
from .matrix import MatrixSpec
from .plan import flops as matrix_flops

INPUT_KINDS = ("vector", "tokens", "series")
MAX_DEPTH = 1024
MAX_BUILD_PARAMS = 10**10  # 40 GB of float32 weights: checked before anything is allocated


@dataclass(frozen=True)
class AdapterSpec:
    """How task data enters and leaves the model (chosen by the task)."""

    input_kind: str
    input_dim: int
    output_dim: int

    def __post_init__(self) -> None:
        if self.input_kind not in INPUT_KINDS:
            raise SpecError(f"input_kind must be one of {', '.join(INPUT_KINDS)}, got "
                            f"{self.input_kind!r}", ("adapter", "input_kind"))
        for name in ("input_dim", "output_dim"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise SpecError(f"{name} must be an integer >= 1, got {v!r}", ("adapter", name))

    def to_dict(self) -> dict:
        return {"input_kind": self.input_kind, "input_dim": self.input_dim,
                "output_dim": self.output_dim}

    @classmethod
    def from_dict(cls, d: Any, path: tuple = ("adapter",)) -> AdapterSpec:
        if not isinstance(d, dict):
            raise SpecError("adapter must be a mapping {input_kind, input_dim, output_dim}", path)
        extra = set(d) - {"input_kind", "input_dim", "output_dim", "seq_len"}
        if extra:
            raise SpecError(f"unknown key {sorted(extra)[0]!r}; adapter takes input_kind, "
                            "input_dim, output_dim", path + (sorted(extra)[0],))
        try:
            return cls(d.get("input_kind"), d.get("input_dim"), d.get("output_dim"))
        except SpecError as err:
            raise SpecError(err.message, path + err.path[1:]) from None


MODEL_KEYS = ("width", "depth", "attention", "layers", "mlp", "mlp_ratio", "max_seq_len",
              "adapter", "positions", "base_width", "rms_cap", "task")


@dataclass(frozen=True)
class ModelSpec:
    width: int
    depth: int
    layers: tuple[AttentionSpec, ...]
    mlp_up: MatrixSpec
    mlp_down: MatrixSpec
    max_seq_len: int
    adapter: AdapterSpec | None = None
    positions: str = "learned"
    base_width: int = 64
    rms_cap: bool = False
    task: tuple[tuple[str, Any], ...] | None = None  # {name, options} the model was made for

    # defaults of the YAML keys that are not fields (``depth`` and ``mlp_ratio`` shape ``layers``
    # and the MLP matrices)
    DEFAULT_DEPTH: ClassVar[int] = 2
    DEFAULT_MLP_RATIO: ClassVar[int] = 4
    DEFAULT_MLP: ClassVar[dict] = {"dense": {}}

    def __post_init__(self) -> None:
        if len(self.layers) != self.depth:
            raise SpecError(f"layers must have depth={self.depth} entries, got "
                            f"{len(self.layers)}", ("layers",))
        if self.positions not in ("learned", "none"):
            raise SpecError(f"positions must be 'learned' or 'none', got {self.positions!r}",
                            ("positions",))

    # ---- serialization -----------------------------------------------------------------
    @property
    def attention_family(self) -> str:
        kinds = list(dict.fromkeys(a.kind for a in self.layers))
        return kinds[0] if len(kinds) == 1 else "+".join(kinds)

    @property
    def family(self) -> str:
        """Structure family for plots: the attention kind, plus the MLP's if not dense."""
        mlp = self.mlp_up.family
        if self.mlp_down.family != mlp:
            mlp = f"{mlp}+{self.mlp_down.family}"
        return self.attention_family + ("" if mlp == "dense" else f"/mlp:{mlp}")

    def to_dict(self) -> dict:
        d: dict[str, Any] = {"width": self.width, "depth": self.depth}
        if all(a == self.layers[0] for a in self.layers):
            d["attention"] = self.layers[0].to_dict()
        else:
            d["layers"] = [a.to_dict() for a in self.layers]
        ratio = self.mlp_up.n_out // self.width
        d["mlp"] = _mlp_to_dict(self.mlp_up, self.mlp_down)
        d["mlp_ratio"] = ratio
        d["max_seq_len"] = self.max_seq_len
        if self.adapter is not None:
            d["adapter"] = self.adapter.to_dict()
        d["positions"] = self.positions
        d["base_width"] = self.base_width
        d["rms_cap"] = self.rms_cap
        if self.task is not None:
            d["task"] = _thaw(self.task)
        return d

    def canonical(self) -> dict:
        """The architecture only (no task metadata), structure-canonical matrices."""
        return {
            "width": self.width, "depth": self.depth,
            "layers": [_attention_canonical(a) for a in self.layers],
            "mlp_up": self.mlp_up.canonical(), "mlp_down": self.mlp_down.canonical(),
            "max_seq_len": self.max_seq_len, "positions": self.positions,
            "adapter": None if self.adapter is None else self.adapter.to_dict(),
            "base_width": self.base_width, "rms_cap": self.rms_cap,
        }

    def hash(self) -> str:
        blob = json.dumps(self.canonical(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def with_adapter(self, adapter: AdapterSpec, seq_len: int | None = None) -> ModelSpec:
        return replace(self, adapter=adapter, max_seq_len=seq_len or self.max_seq_len)

    @classmethod
    def from_dict(cls, d: Any, adapter: AdapterSpec | dict | None = None,
                  seq_len: int | None = None, path: tuple = ()) -> ModelSpec:
        """Validate and build. ``adapter``/``seq_len`` come from the task when the document
        does not give them (a document that gives them must agree on the adapter)."""
        if not isinstance(d, dict):
            raise SpecError(f"a model spec must be a mapping, got {type(d).__name__}", path)
        if "model" in d and isinstance(d["model"], dict) and len(d) == 1:
            return cls.from_dict(d["model"], adapter, seq_len, path + ("model",))
        for key in d:
            if key not in MODEL_KEYS:
                raise SpecError(f"unknown key {key!r}; valid keys: {', '.join(MODEL_KEYS)}",
                                path + (key,))
        width = _int(d.get("width"), path + ("width",), "width", high=MAX_SIZE)
        depth = _int(d.get("depth", cls.DEFAULT_DEPTH), path + ("depth",), "depth", high=MAX_DEPTH)
        T = d.get("max_seq_len", seq_len)
        if T is None:
            raise SpecError("max_seq_len is needed (or train with a task, which sets it)",
                            path + ("max_seq_len",))
        T = _int(T, path + ("max_seq_len",), "max_seq_len", high=MAX_SIZE)
        doc_adapter = d.get("adapter")
        if isinstance(adapter, dict):
            adapter = AdapterSpec.from_dict(adapter)
        ad = AdapterSpec.from_dict(doc_adapter, path + ("adapter",)) if doc_adapter else None
        if ad is not None and adapter is not None and ad != adapter:
            raise SpecError(f"the model's adapter {ad.to_dict()} does not fit the task, which "
                            f"needs {adapter.to_dict()}", path + ("adapter",))
        ad = ad or adapter
        if ("attention" in d) == ("layers" in d):
            raise SpecError("give exactly one of attention (every layer) or layers (a list of "
                            "per-layer attention specs)", path)
        if "attention" in d:
            a = AttentionSpec.from_dict(d["attention"], width, T, path + ("attention",))
            layers = (a,) * depth
        else:
            raw = d["layers"]
            if not isinstance(raw, list) or len(raw) != depth:
                raise SpecError(f"layers must be a list of depth={depth} attention specs",
                                path + ("layers",))
            layers = tuple(AttentionSpec.from_dict(a, width, T, path + ("layers", i))
                           for i, a in enumerate(raw))
        ratio = _int(d.get("mlp_ratio", cls.DEFAULT_MLP_RATIO), path + ("mlp_ratio",),
                     "mlp_ratio", high=MAX_SIZE // width)
        up, down = _mlp_from_dict(d.get("mlp", cls.DEFAULT_MLP), path + ("mlp",), width,
                                  ratio * width)
        task = d.get("task")
        if task is not None and not isinstance(task, dict):
            raise SpecError("task must be a mapping {name, options}", path + ("task",))
        base = _int(d.get("base_width", _DEFAULTS["base_width"]), path + ("base_width",),
                    "base_width", high=MAX_SIZE)
        rms_cap = d.get("rms_cap", _DEFAULTS["rms_cap"])
        if not isinstance(rms_cap, bool):
            raise SpecError("rms_cap must be true or false", path + ("rms_cap",))
        try:
            return cls(width, depth, layers, up, down, T, ad,
                       d.get("positions", _DEFAULTS["positions"]), base, rms_cap,
                       _freeze(task) if task is not None else None)
        except SpecError as err:
            raise err.prefixed(path) from None


_DEFAULTS = {f.name: f.default for f in fields(ModelSpec) if f.default is not MISSING}


def _mlp_from_dict(mlp: Any, path: tuple, width: int, hidden: int
                   ) -> tuple[MatrixSpec, MatrixSpec]:
    """The MLP's up (width -> hidden) and down (hidden -> width) matrices: one spec for both
    (shape-agnostic: ``{btt: {rank: 1}}``) or ``{up: SPEC, down: SPEC}`` (a contraction graph
    has one shape, so a ``btc`` MLP gives each projection its own)."""
    if isinstance(mlp, str):
        mlp = {mlp: {}}
    if not isinstance(mlp, dict):
        raise SpecError("mlp must be a matrix structure, e.g. {dense: {}} or {btt: {rank: 1}}, "
                        "or {up: SPEC, down: SPEC}", path)
    if not ({"up", "down"} & set(mlp)):
        return (MatrixSpec.from_dict(mlp, path, width, hidden),
                MatrixSpec.from_dict(mlp, path, hidden, width))
    if set(mlp) != {"up", "down"}:
        bad = sorted(set(mlp) - {"up", "down"}) or ["down" if "up" in mlp else "up"]
        raise SpecError(f"a split MLP takes exactly the keys up and down (one matrix spec "
                        f"each), got {sorted(mlp)}", path + (bad[0],))
    specs = []
    for key, n_in, n_out in (("up", width, hidden), ("down", hidden, width)):
        m = mlp[key]
        if isinstance(m, str):
            m = {m: {}}
        if not isinstance(m, dict):
            raise SpecError(f"mlp.{key} must be a matrix structure, e.g. {{dense: {{}}}} or "
                            "{btc: {...}}", path + (key,))
        specs.append(MatrixSpec.from_dict(m, path + (key,), n_in, n_out))
    return specs[0], specs[1]


def _mlp_to_dict(up: MatrixSpec, down: MatrixSpec) -> dict:
    """One spec when the up spec, rebuilt at the down shape, is the down matrix (the form
    every one-spec MLP had); else ``{up, down}``."""
    def strip(m: MatrixSpec) -> dict:
        return {k: v for k, v in m.to_dict().items() if k not in ("in", "out")}

    one = strip(up)
    try:
        if MatrixSpec.from_dict(one, (), down.n_in, down.n_out) == down:
            return one
    except SpecError:
        pass
    return {"up": strip(up), "down": strip(down)}


def _freeze(value: Any) -> Any:
    if isinstance(value, dict):  # sorted: key order carries no meaning (and safe_dump sorts)
        return tuple((k, _freeze(v)) for k, v in sorted(value.items(), key=lambda kv: str(kv[0])))
    if isinstance(value, list):
        return ("__list__",) + tuple(_freeze(v) for v in value)
    return value


def _thaw(value: Any) -> Any:
    if isinstance(value, tuple):
        if value and value[0] == "__list__":
            return [_thaw(v) for v in value[1:]]
        return {k: _thaw(v) for k, v in value}
    return value


def _attention_canonical(a: AttentionSpec) -> dict:
    d = a.to_dict()
    d.pop("family")
    for g in d["groups"]:
        for lv in g["levels"]:
            lv["score"] = MatrixSpec.from_dict(lv["score"]).canonical()
    d["value"] = a.value.canonical()
    d["output"] = a.output.canonical()
    return d


# ---- the module ---------------------------------------------------------------------------
class MLP(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.up = StructuredLinear(spec.mlp_up, rms_cap=spec.rms_cap)
        self.down = StructuredLinear(spec.mlp_down, zero_init=True, rms_cap=spec.rms_cap)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(F.gelu(self.up(x)))


class Block(nn.Module):
    def __init__(self, spec: ModelSpec, attn: AttentionSpec):
        super().__init__()
        self.ln_1 = nn.LayerNorm(spec.width, bias=False)
        self.attn = Attention(attn, rms_cap=spec.rms_cap)
        self.ln_2 = nn.LayerNorm(spec.width, bias=False)
        self.mlp = MLP(spec)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    """Pre-LN transformer: read-in (+ positions) -> blocks -> LN -> zero-init read-out."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        if spec.adapter is None:
            raise SpecError("the model has no adapter: build it for a task (ModelSpec."
                            "from_dict(..., adapter=task adapter)) or give adapter in the spec",
                            ("adapter",))
        n = model_params(spec, embedding=True)
        if n > MAX_BUILD_PARAMS:
            raise SpecError(f"the model has {n:,} parameters ({4 * n / 1e9:,.0f} GB in "
                            f"float32); at most {MAX_BUILD_PARAMS:,} can be built", ("width",))
        self.spec = spec
        a, D = spec.adapter, spec.width
        if a.input_kind == "tokens":
            self.read_in: nn.Module = nn.Embedding(a.input_dim, D)
            nn.init.normal_(self.read_in.weight, 0.0, 0.02)
        else:
            self.read_in = nn.Linear(a.input_dim, D, bias=False)
            nn.init.normal_(self.read_in.weight, 0.0, 1.0 / math.sqrt(a.input_dim))
        self.pos = (nn.Parameter(torch.randn(spec.max_seq_len, D) * 0.02)
                    if spec.positions == "learned" else None)
        self.blocks = nn.ModuleList(Block(spec, attn) for attn in spec.layers)
        self.ln_f = nn.LayerNorm(D, bias=False)
        self.read_out = nn.Linear(D, a.output_dim, bias=False)
        nn.init.zeros_(self.read_out.weight)

    def embed(self, inputs: Tensor, start: int = 0) -> Tensor:
        x = self.read_in(inputs)  # (B, T, D)
        T = x.shape[1]
        if start + T > self.spec.max_seq_len:
            raise SpecError(f"sequence length {start + T} exceeds max_seq_len="
                            f"{self.spec.max_seq_len}", ("max_seq_len",))
        if self.pos is not None:
            x = x + self.pos[start:start + T]
        return x

    def forward(self, inputs: Tensor) -> Tensor:
        """(B, T[, input_dim]) -> (B, T, output_dim)."""
        x = self.embed(inputs)
        for block in self.blocks:
            x = block(x)
        return self.read_out(self.ln_f(x))

    # ---- incremental decoding -----------------------------------------------------------
    def init_cache(self, batch: int, max_len: int | None = None) -> list[list[Any]]:
        """One KV cache per (layer, head group)."""
        p = self.read_out.weight
        max_len = max_len or self.spec.max_seq_len
        caches = []
        for block in self.blocks:
            attn = block.attn
            layer = []
            for g, f in zip(attn.spec.groups, attn.features, strict=True):
                if g.window is not None:
                    layer.append(kv_cache.WindowKVCache(
                        batch, f.heads, f.total_width, attn.head_dim, g.window, p.dtype,
                        p.device))
                else:
                    layer.append(kv_cache.MultilevelKVCache(
                        f.level_widths, [lv.block_size for lv in g.levels], batch, f.heads,
                        attn.head_dim, p.dtype, p.device, max_len,
                        attn.spec.mean_over_shared_levels))
            caches.append(layer)
        return caches

    @torch.no_grad()
    def step(self, inputs: Tensor, caches: list[list[Any]], position: int) -> Tensor:
        """One position (B, 1[, input_dim]) -> (B, 1, output_dim), appending to the caches."""
        x = self.embed(inputs, start=position)
        for block, layer in zip(self.blocks, caches, strict=True):
            h = block.ln_1(x)
            attn = block.attn
            ys = [cache.step(q, k, v) for (q, k, v), cache in zip(attn.qkv(h), layer,
                                                                   strict=True)]
            B = x.shape[0]
            y = torch.cat(ys, dim=1).transpose(1, 2).reshape(B, 1, self.spec.width)
            x = x + attn.output(y)
            x = x + block.mlp(block.ln_2(x))
        return self.read_out(self.ln_f(x))

    @torch.no_grad()
    def generate(self, prompt: Tensor, new_tokens: int, temperature: float = 0.0,
                 generator: torch.Generator | None = None) -> Tensor:
        """Token models: extend (B, T0) by ``new_tokens`` (greedy at temperature 0)."""
        if self.spec.adapter.input_kind != "tokens":
            raise SpecError("generate needs a token model (input_kind: tokens)",
                            ("adapter", "input_kind"))
        B, T0 = prompt.shape
        caches = self.init_cache(B, T0 + new_tokens)
        out = [prompt]
        logits = None
        for t in range(T0):
            logits = self.step(prompt[:, t:t + 1], caches, t)
        for t in range(T0, T0 + new_tokens):
            last = logits[:, -1]
            if temperature > 0:
                probs = torch.softmax(last / temperature, dim=-1)
                nxt = torch.multinomial(probs, 1, generator=generator)
            else:
                nxt = last.argmax(dim=-1, keepdim=True)
            out.append(nxt)
            if t < T0 + new_tokens - 1:
                logits = self.step(nxt, caches, t)
        return torch.cat(out, dim=1)

    def extra_repr(self) -> str:
        return f"family={self.spec.family}, hash={self.spec.hash()}"


def build_model(spec: ModelSpec) -> Transformer:
    return Transformer(spec)


# ---- analytic costs (pure data: attention_plan, plan) --------------------------------------
def layer_costs(spec: ModelSpec, seq_len: int | None = None) -> list[dict]:
    """Params, FLOPs per token (forward; ``train_flops_per_token``: forward + backward) and
    KV-cache bytes per token of each layer at ``seq_len``.

    Cached per (spec, length): model_flops, model_params and kv_cache_bytes all read it, and the
    search and the training loop ask for the same specs many times.
    """
    T = seq_len or spec.max_seq_len
    if not 1 <= T <= spec.max_seq_len:
        raise SpecError(f"the sequence length must be between 1 and max_seq_len="
                        f"{spec.max_seq_len} (the model cannot run longer ones), got {T}",
                        ("max_seq_len",))
    return [dict(c) for c in _layer_costs(spec, T)]


@functools.lru_cache(maxsize=256)
def _layer_costs(spec: ModelSpec, T: int) -> tuple[dict, ...]:
    mlp_f = matrix_flops(spec.mlp_up) + matrix_flops(spec.mlp_down)
    mlp_p = spec.mlp_up.params + spec.mlp_down.params
    out = []
    for a in spec.layers:
        plan = attention_plan(a)
        attn_f = plan.flops_per_token(T)
        attn_train = plan.flops_per_token(T, backward=True)
        out.append({
            "attention": a.kind, "heads": a.heads,
            "params": plan.params + mlp_p + 2 * spec.width,
            "attention_params": plan.params, "mlp_params": mlp_p,
            "flops_per_token": attn_f + mlp_f,
            "attention_flops_per_token": attn_f,
            "mlp_flops_per_token": mlp_f,
            "train_flops_per_token": attn_train + 3 * mlp_f,
            "kv_cache_bytes_per_token": plan.kv_cache_bytes_per_token(T),
        })
    return tuple(out)


def embedding_flops_per_token(spec: ModelSpec, backward: bool = False) -> int:
    """Read-in (none for token embeddings) and read-out FLOPs per token. Backward: the read-out
    twice (input and weight gradients), a vector read-in once (its input needs no gradient)."""
    a = spec.adapter
    if a is None:
        return 0
    read_in = 0 if a.input_kind == "tokens" else 2 * a.input_dim * spec.width
    read_out = 2 * spec.width * a.output_dim
    return 2 * read_in + 3 * read_out if backward else read_in + read_out


def model_flops(spec: ModelSpec, seq_len: int | None = None, embedding: bool = False,
                backward: bool = False) -> float:
    """FLOPs per token at ``seq_len`` (default max_seq_len): forward, or with ``backward`` one
    training step's forward + backward; non-embedding by default."""
    key = "train_flops_per_token" if backward else "flops_per_token"
    total = sum(c[key] for c in layer_costs(spec, seq_len))
    return total + (embedding_flops_per_token(spec, backward) if embedding else 0)


def model_params(spec: ModelSpec, embedding: bool = False) -> int:
    total = sum(c["params"] for c in layer_costs(spec)) + spec.width  # + ln_f
    if embedding and spec.adapter is not None:
        a = spec.adapter
        total += a.input_dim * spec.width + spec.width * a.output_dim
        total += spec.max_seq_len * spec.width if spec.positions == "learned" else 0
    return total


def kv_cache_bytes(spec: ModelSpec, seq_len: int | None = None) -> float:
    return sum(c["kv_cache_bytes_per_token"] for c in layer_costs(spec, seq_len))


def model_report(spec: ModelSpec, seq_len: int | None = None) -> dict:
    T = seq_len or spec.max_seq_len
    layers = layer_costs(spec, T)
    standard = replace(spec, layers=tuple(
        AttentionSpec.from_dict({"kind": "standard", "heads": a.heads}, spec.width, T)
        for a in spec.layers))
    return {
        "kind": "model", "family": spec.family, "hash": spec.hash(), "width": spec.width,
        "depth": spec.depth, "seq_len": T,
        "params": model_params(spec),
        "params_with_embedding": model_params(spec, embedding=True),
        "flops_per_token": model_flops(spec, T),
        "kv_cache_bytes_per_token": kv_cache_bytes(spec, T),
        "kv_cache_bytes_per_token_standard": kv_cache_bytes(standard, T),
        "layers": layers,
    }


def format_model_report(r: dict) -> str:
    lines = [
        f"model {r['family']}  (hash {r['hash']}): width {r['width']}, depth {r['depth']}, "
        f"seq_len {r['seq_len']}",
        f"  params (non-embedding)      {r['params']:,}",
        f"  FLOPs / token (forward)     {r['flops_per_token']:,.0f}",
        f"  KV cache bytes / token      {r['kv_cache_bytes_per_token']:,.1f}  (standard "
        f"attention: {r['kv_cache_bytes_per_token_standard']:,.1f})",
        "  layer  attention        heads      params   FLOPs/token   KV bytes/token",
    ]
    for i, c in enumerate(r["layers"]):
        lines.append(f"  {i:>5}  {c['attention']:<15} {c['heads']:>6} {c['params']:>11,} "
                     f"{c['flops_per_token']:>13,.0f} {c['kv_cache_bytes_per_token']:>16,.1f}")
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use: mlbtc inspect MODEL.yaml")

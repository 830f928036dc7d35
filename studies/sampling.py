"""The ``space:`` tree of a search-space YAML: parse it into nodes, sample it define-by-run.

A tree mirrors a model spec. Each leaf is a fixed value or a distribution::

    width: {choice: [32, 64]}                  # categorical; values may be lists or mappings
    depth: {int: [2, 4]}                       # integers lo..hi, optional step / log
    train.lr: {float: [3.0e-4, 3.0e-3], log: true}
    attention:
      kind: {choice: [standard, bilinear_btt]}
      rank: {int: [1, 2], when: {kind: bilinear_btt}}   # only sampled when the sibling matches
      window: {fixed: 16, when: {kind: sliding_window}} # a fixed value under a condition
    layers: {per_layer: {kind: {choice: [standard, mlr]}, heads: 4}}   # one subtree per layer

Dotted keys nest (``attention.kind: ...`` is ``attention: {kind: ...}``). Optuna parameter names
are the dotted paths (``attention.rank``, ``layers.2.kind``). Categorical choices that are not
Optuna primitives (lists, mappings) are stored as their canonical JSON text, so a study keeps the
same parameter distributions across runs of the same space.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import optuna

from mlbtc_search.errors import PathPart, SpecError
from studies.structures.leaf import is_structure, parse_structure, sample_structure

MARKERS = ("choice", "int", "float", "fixed")
MODIFIERS = ("when", "log", "step")
PER_LAYER = "per_layer"
MAX_LAYERS = 4096  # per-layer subtrees are built only for depths up to this
ABSENT: Any = object()  # the value of a leaf whose `when` is false
_PRIMITIVES = (type(None), bool, int, float, str)

Path = tuple[PathPart, ...]


def param_name(path: Path) -> str:
    """``("layers", 2, "rank")`` -> ``"layers.2.rank"`` (the Optuna parameter name)."""
    return ".".join(str(p) for p in path)


def split_key(key: str) -> tuple[PathPart, ...]:
    """``"layers.2.rank"`` -> ``("layers", 2, "rank")``; digit parts are list indices."""
    return tuple(int(p) if p.isdigit() else p for p in key.split("."))


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _number(value: Any, path: Path, what: str) -> float:
    """A finite YAML number (``3e-4`` is one: the project's loader reads it as a float)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise SpecError(f"{what} must be a finite number, got {value!r}", path)
    return value


# ---- nodes --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ref:
    """A ``when`` reference: ``kind`` (a sibling) or ``/attention.kind`` (from the root)."""

    parts: Path
    absolute: bool
    text: str

    def target(self, parent: Path) -> Path:
        return self.parts if self.absolute else parent + self.parts


@dataclass(frozen=True)
class Leaf:
    """A fixed value or a distribution, maybe under a ``when`` condition."""

    kind: str  # "choice" | "int" | "float" | "fixed"
    src: Path  # where it is written in the YAML document
    value: Any = None  # fixed
    choices: tuple = ()  # original choice values
    encoded: tuple = ()  # the Optuna-side choices (primitives)
    low: float = 0
    high: float = 0
    step: float | None = None
    log: bool = False
    when: tuple[tuple[Ref, tuple], ...] = ()  # (reference, allowed values), all must hold

    @property
    def is_param(self) -> bool:
        return self.kind != "fixed"

    def distribution(self) -> optuna.distributions.BaseDistribution:
        if self.kind == "choice":
            return optuna.distributions.CategoricalDistribution(list(self.encoded))
        if self.kind == "int":
            return optuna.distributions.IntDistribution(
                int(self.low), int(self.high), log=self.log, step=int(self.step or 1))
        return optuna.distributions.FloatDistribution(self.low, self.high, log=self.log,
                                                      step=self.step)

    def suggest(self, trial: Any, name: str) -> tuple[Any, Any]:
        """``(value, param)``: the model-side value and the value Optuna records."""
        if self.kind == "choice":
            param = trial.suggest_categorical(name, list(self.encoded))
            return self.choices[self.encoded.index(param)], param
        if self.kind == "int":
            param = trial.suggest_int(name, int(self.low), int(self.high),
                                      step=int(self.step or 1), log=self.log)
            return param, param
        param = trial.suggest_float(name, self.low, self.high, step=self.step, log=self.log)
        return param, param

    def contains(self, value: Any) -> bool:
        if self.kind == "structure":
            return False  # a sampled structure is not a value to match or to give
        if self.kind == "fixed":
            return _same(value, self.value)
        if self.kind == "choice":
            return any(_same(value, c) for c in self.choices)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if not self.low <= value <= self.high:
            return False
        if self.kind == "int":
            return isinstance(value, int) and (value - self.low) % int(self.step or 1) == 0
        if self.step is not None:
            k = (value - self.low) / self.step
            return abs(k - round(k)) < 1e-8
        return True

    def encode(self, value: Any, path: Path) -> Any:
        """The Optuna parameter value of model-side ``value`` (a SpecError if out of range)."""
        if not self.contains(value):
            raise SpecError(f"{value!r} is not in the distribution {self.describe()}", path)
        if self.kind == "choice":
            i = next(i for i, c in enumerate(self.choices) if _same(value, c))
            return self.encoded[i]
        return float(value) if self.kind == "float" else value

    def describe(self) -> str:
        if self.kind == "structure":
            return f"structure {self.value.to_dict()['structure']} (its own parameters)"
        if self.kind == "fixed":
            return f"fixed {self.value!r}"
        if self.kind == "choice":
            return f"choice {list(self.choices)!r}"
        extra = (", log" if self.log else "") + (f", step {self.step}" if self.step else "")
        return f"{self.kind} [{self.low}, {self.high}]{extra}"


def _same(a: Any, b: Any) -> bool:
    """Equality that tells ``true`` from ``1`` (``1 == True`` in Python, not in YAML)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    return bool(a == b)


@dataclass(frozen=True)
class Tree:
    """A mapping of keys to subtrees or leaves (a model spec section)."""

    children: dict[str, Node]
    src: Path


@dataclass(frozen=True)
class Items:
    """A list with distributions inside it (a list without any is a fixed leaf)."""

    items: tuple[Node, ...]
    src: Path


@dataclass(frozen=True)
class PerLayer:
    """``{per_layer: subtree}``: the subtree once per layer, ``depth`` times."""

    body: Node
    src: Path


Node = Tree | Items | PerLayer | Leaf


# ---- parsing ------------------------------------------------------------------------------


def parse_tree(raw: Any, src: Path) -> Tree:
    """The ``space:`` mapping -> a :class:`Tree` (dotted keys nested, leaves validated)."""
    if not isinstance(raw, dict) or not raw:
        raise SpecError("space must be a non-empty mapping of model keys to values or "
                        "distributions", src)
    return _parse_mapping(raw, src)


def expand(raw: Any) -> Any:
    """The tree with dotted keys nested (for hashing and ``to_dict``)."""
    if isinstance(raw, dict) and not _is_leaf_mapping(raw):
        out: dict = {}
        for key, value in raw.items():
            parts = str(key).split(".")
            cur = out
            for p in parts[:-1]:
                cur = cur.setdefault(p, {})
            cur[parts[-1]] = expand(value)
        return out
    if isinstance(raw, list):
        return [expand(v) for v in raw]
    return raw


def _is_leaf_mapping(raw: dict) -> bool:
    return any(k in MARKERS for k in raw) or any(k in MODIFIERS for k in raw)


@dataclass
class _Pending:
    """A mapping being assembled from dotted keys (``attention.kind``, ``attention.heads``)."""

    children: dict
    src: Path


def _parse_mapping(raw: dict, src: Path) -> Tree:
    top = _Pending({}, src)
    for key, value in raw.items():
        if not isinstance(key, str) or any(not p or p.isdigit() for p in key.split(".")):
            raise SpecError(f"keys must be names or dotted paths of names, got {key!r} (write "
                            "lists as YAML lists)", src + (key,))
        parts = key.split(".")
        cur = top
        for part in parts[:-1]:
            nxt = cur.children.setdefault(part, _Pending({}, src + (key,)))
            if not isinstance(nxt, _Pending):
                raise SpecError(f"{part!r} is given both as a key and as the start of dotted "
                                "keys; use one form", src + (key,))
            cur = nxt
        if parts[-1] in cur.children:
            raise SpecError(f"{key!r} is given twice (check dotted keys)", src + (key,))
        cur.children[parts[-1]] = _parse_node(value, src + (key,))
    return _close(top)


def _close(pending: _Pending) -> Tree:
    return Tree({k: _close(v) if isinstance(v, _Pending) else v
                 for k, v in pending.children.items()}, pending.src)


def _parse_node(raw: Any, src: Path) -> Node:
    if isinstance(raw, dict):
        if PER_LAYER in raw:
            if len(raw) != 1:
                raise SpecError("per_layer takes one subtree and nothing else: "
                                "{per_layer: {kind: ..., heads: ...}}", src)
            body = raw[PER_LAYER]
            if not isinstance(body, dict):
                raise SpecError("per_layer must be a mapping (one layer's attention spec)",
                                src + (PER_LAYER,))
            return PerLayer(_parse_node(body, src + (PER_LAYER,)), src)
        if is_structure(raw):  # {structure: matrix | attention, ...}: studies.structures
            when = _parse_when(raw["when"], src + ("when",)) if "when" in raw else ()
            return Leaf("structure", src, value=parse_structure(raw, src), when=when)
        if _is_leaf_mapping(raw):
            return _parse_leaf(raw, src)
        return _parse_mapping(raw, src)
    if isinstance(raw, list):
        items = tuple(_parse_node(v, src + (i,)) for i, v in enumerate(raw))
        if all(isinstance(n, Leaf) and n.kind == "fixed" and not n.when for n in items):
            return Leaf("fixed", src, value=raw)
        for n in items:
            if isinstance(n, Leaf) and n.when:
                raise SpecError("when is not allowed on list items (dropping one would shift "
                                "the others)", n.src + ("when",))
        return Items(items, src)
    return Leaf("fixed", src, value=raw)


def _parse_leaf(raw: dict, src: Path) -> Leaf:
    markers = [k for k in raw if k in MARKERS]
    if len(markers) != 1:
        got = ", ".join(markers) if markers else "none"
        raise SpecError(f"a distribution needs exactly one of choice, int, float, fixed; "
                        f"got {got}", src)
    kind = markers[0]
    for key in raw:
        if key not in MARKERS and key not in MODIFIERS:
            raise SpecError(f"unknown key {key!r} in a {kind} distribution; valid keys: {kind}, "
                            "when" + ("" if kind in ("choice", "fixed") else ", log, step"),
                            src + (key,))
        if key in ("log", "step") and kind in ("choice", "fixed"):
            raise SpecError(f"{key} only applies to int and float distributions", src + (key,))
    when = _parse_when(raw.get("when"), src + ("when",)) if "when" in raw else ()
    body = raw[kind]
    if kind == "fixed":
        return Leaf("fixed", src, value=body, when=when)
    if kind == "choice":
        return _parse_choice(body, src, when)
    return _parse_range(kind, body, raw, src, when)


def _parse_choice(body: Any, src: Path, when: tuple) -> Leaf:
    p = src + ("choice",)
    if not isinstance(body, list) or not body:
        raise SpecError(f"choice must be a non-empty list of values, got {body!r}", p)
    encoded = []
    for i, c in enumerate(body):
        if isinstance(c, dict) and _is_leaf_mapping(c):
            raise SpecError("choices are plain values; a distribution inside a choice is not "
                            "supported (use a sibling parameter with `when`)", p + (i,))
        encoded.append(c if isinstance(c, _PRIMITIVES) else canonical_json(c))
    for i, e in enumerate(encoded):
        if any(_same(e, encoded[j]) for j in range(i)):
            raise SpecError(f"choices must be distinct, got {body[i]!r} twice", p + (i,))
    if any(isinstance(e, float) and math.isnan(e) for e in encoded):
        raise SpecError("choices cannot be NaN", p)
    return Leaf("choice", src, choices=tuple(body), encoded=tuple(encoded), when=when)


def _parse_range(kind: str, body: Any, raw: dict, src: Path, when: tuple) -> Leaf:
    p = src + (kind,)
    if not isinstance(body, list) or len(body) != 2:
        raise SpecError(f"{kind} must be a list [lo, hi], got {body!r}", p)
    if kind == "int":
        for i, v in enumerate(body):
            if isinstance(v, bool) or not isinstance(v, int):
                raise SpecError(f"int bounds must be integers, got {v!r}", p + (i,))
        lo, hi = body
    else:
        lo, hi = (float(_number(v, p + (i,), "float bounds")) for i, v in enumerate(body))
    if lo > hi:
        raise SpecError(f"lo <= hi must hold, got [{lo}, {hi}]", p)
    log = raw.get("log", False)
    if not isinstance(log, bool):
        raise SpecError(f"log must be true or false, got {log!r}", src + ("log",))
    if log and lo <= 0:
        raise SpecError(f"log needs lo > 0, got [{lo}, {hi}]", p)
    step = raw.get("step")
    if step is not None:
        if kind == "int" and (isinstance(step, bool) or not isinstance(step, int) or step < 1):
            raise SpecError(f"step must be an integer >= 1, got {step!r}", src + ("step",))
        if kind == "float":
            step = float(_number(step, src + ("step",), "step"))
            if step <= 0:
                raise SpecError(f"step must be > 0, got {step}", src + ("step",))
        if log and (kind == "float" or step != 1):
            raise SpecError("log and step cannot be combined", src + ("step",))
        if kind == "int" and (hi - lo) % step:
            raise SpecError(f"hi - lo must be a multiple of step={step}, got [{lo}, {hi}]", p)
    leaf = Leaf(kind, src, low=lo, high=hi, step=step, log=log, when=when)
    leaf.distribution()  # Optuna's own checks
    return leaf


def _parse_when(raw: Any, src: Path) -> tuple[tuple[Ref, tuple], ...]:
    if not isinstance(raw, dict) or not raw:
        raise SpecError("when must be a mapping {key: value or [values]}, e.g. "
                        "{kind: bilinear_btt} or {/depth: [3, 4]}", src)
    out = []
    for key, value in raw.items():
        text = str(key)
        absolute = text.startswith("/")
        body = text[1:] if absolute else text
        if not body or any(not part for part in body.split(".")):
            raise SpecError(f"when keys are sibling names or /absolute.paths, got {key!r}",
                            src + (key,))
        allowed = tuple(value) if isinstance(value, list) else (value,)
        if not allowed:
            raise SpecError("when needs at least one value", src + (key,))
        out.append((Ref(split_key(body), absolute, text), allowed))
    return tuple(out)


# ---- walking ------------------------------------------------------------------------------


def node_at(root: Node, path: Path) -> Node | None:
    """The node at a concrete path below ``root`` (layer indices are ints), or None."""
    node: Node | None = root
    for part in path:
        if isinstance(node, Tree) and isinstance(part, str):
            node = node.children.get(part)
        elif isinstance(node, Items) and isinstance(part, int) and part < len(node.items):
            node = node.items[part]
        elif isinstance(node, PerLayer) and isinstance(part, int):
            node = node.body
        else:
            return None
    return node


def leaves(node: Node, path: Path = ()) -> Iterator[tuple[Path, Leaf]]:
    """Every leaf with its template path (layer index 0 under ``per_layer``)."""
    if isinstance(node, Leaf):
        yield path, node
    elif isinstance(node, Tree):
        for key, child in node.children.items():
            yield from leaves(child, path + (key,))
    elif isinstance(node, Items):
        for i, child in enumerate(node.items):
            yield from leaves(child, path + (i,))
    else:
        yield from leaves(node.body, path + (0,))


def source_of(root: Tree, path: Path) -> Path:
    """The YAML path of the node a model-spec path ``path`` falls in (for error messages)."""
    node: Node = root
    for i, part in enumerate(path):
        nxt = node_at(node, (part,))
        if nxt is None:
            if isinstance(node, Leaf):
                suffix = (node.kind,) if node.kind != "fixed" else tuple(path[i:])
                return node.src + suffix
            return node.src + tuple(path[i:])
        node = nxt
    return node.src + ((node.kind,) if isinstance(node, Leaf) and node.is_param else ())


@dataclass
class Walk:
    """One define-by-run pass over the tree: suggests every active parameter once."""

    root: Tree
    trial: Any
    seq_len: int = 0  # the task's, for structure leaves (sequence levels)
    params: dict[str, Any] = field(default_factory=dict)
    _memo: dict[Path, Any] = field(default_factory=dict)

    def build(self) -> dict:
        return self._build(self.root, ())

    def _build(self, node: Node, path: Path) -> Any:
        if isinstance(node, Leaf):
            return self.value(path)
        if isinstance(node, Tree):
            out = {}
            for key, child in node.children.items():
                v = self._build(child, path + (key,))
                if v is not ABSENT:
                    out[key] = v
            return out
        if isinstance(node, Items):
            return [self._build(child, path + (i,)) for i, child in enumerate(node.items)]
        return [self._build(node.body, path + (i,)) for i in range(self._depth())]

    def _depth(self) -> int:
        depth = self.value(("depth",))
        if isinstance(depth, bool) or not isinstance(depth, int) or not 1 <= depth <= MAX_LAYERS:
            return 0  # the spec check reports the bad depth (no 10**9 per-layer subtrees)
        return depth

    def value(self, path: Path) -> Any:
        """The value of the leaf at ``path`` (suggesting it on first use), or ABSENT."""
        if path in self._memo:
            return self._memo[path]
        self._memo[path] = ABSENT  # no cycles (checked at load); absent while resolving
        node = node_at(self.root, path)
        if not isinstance(node, Leaf) or not self._in_range(path):
            return ABSENT
        parent = path[:-1]
        for ref, allowed in node.when:
            got = self.value(ref.target(parent))
            if got is ABSENT or not any(_same(got, a) for a in allowed):
                return ABSENT
        if node.kind == "structure":
            ratio = self.value(("mlp_ratio",))
            value = sample_structure(self.trial, param_name(path), node.value, self.params,
                                     self.value(("width",)), self.seq_len,
                                     4 if ratio is ABSENT else ratio)
        elif node.is_param:
            value, param = node.suggest(self.trial, param_name(path))
            self.params[param_name(path)] = param
        else:
            value = node.value
        self._memo[path] = value
        return value

    def _in_range(self, path: Path) -> bool:
        """False for a path into a layer beyond the sampled depth."""
        node: Node | None = self.root
        for part in path:
            if isinstance(node, PerLayer) and isinstance(part, int) and part >= self._depth():
                return False
            node = node_at(node, (part,)) if node is not None else None
        return True


class ReplayTrial:
    """A trial that answers from a dict; unknown names get a placeholder and are recorded."""

    def __init__(self, params: dict[str, Any]):
        self.params = params
        self.used: set[str] = set()
        self.missing: list[str] = []

    def _get(self, name: str, placeholder: Any) -> Any:
        if name in self.params:
            self.used.add(name)
            return self.params[name]
        self.missing.append(name)
        return placeholder

    def suggest_categorical(self, name: str, choices: list) -> Any:
        return self._get(name, choices[0])

    def suggest_int(self, name: str, low: int, high: int, step: int = 1, log: bool = False) -> int:
        return self._get(name, low)

    def suggest_float(self, name: str, low: float, high: float, step: float | None = None,
                      log: bool = False) -> float:
        return self._get(name, low)


# ---- checks and assignments ---------------------------------------------------------------


def check_per_layer(node: Node, at_layers: bool = False) -> None:
    if isinstance(node, PerLayer):
        if not at_layers:
            raise SpecError("per_layer is only allowed as the value of layers", node.src)
        check_per_layer(node.body)
    elif isinstance(node, Tree):
        for key, child in node.children.items():
            check_per_layer(child, key == "layers" and node.src == ("space",))
            if isinstance(child, PerLayer) and not isinstance(node.children.get("depth"), Leaf):
                raise SpecError("per_layer needs depth in the space (a value or a "
                                "distribution)", child.src)


def check_when(root: Tree) -> None:
    """Every `when` names a leaf that exists, with values it can take; no cycles."""
    deps: dict[Path, list[Path]] = {}
    for path, leaf in leaves(root):
        deps[path] = []
        for ref, allowed in leaf.when:
            target = ref.target(path[:-1])
            where = leaf.src + ("when", ref.text)
            node = node_at(root, target)
            if not isinstance(node, Leaf):
                hint = ("absolute paths start at space:, e.g. /depth" if ref.absolute
                        else "siblings: " + _siblings(root, path[:-1], path[-1]))
                raise SpecError(f"when refers to {ref.text!r}, which is not a value or "
                                f"parameter of the space ({hint})", where)
            for a in allowed:
                if not node.contains(a):
                    raise SpecError(f"{a!r} is not a possible value of "
                                    f"{param_name(target)} ({node.describe()})", where)
            deps[path].append(target)
    for path in deps:
        if _under_per_layer(root, path):
            deps[path].append(("depth",))
    _check_cycles(root, deps)


def _siblings(root: Tree, parent: Path, own: Any) -> str:
    node = node_at(root, parent)
    names = [k for k in node.children if k != own] if isinstance(node, Tree) else []
    return ", ".join(names) or "none"


def _under_per_layer(root: Tree, path: Path) -> bool:
    node: Node | None = root
    for part in path:
        if isinstance(node, PerLayer):
            return True
        node = node_at(node, (part,)) if node is not None else None
    return False


def _check_cycles(root: Tree, deps: dict[Path, list[Path]]) -> None:
    state: dict[Path, int] = {}

    def visit(p: Path, chain: list[Path]) -> None:
        if state.get(p) == 2:
            return
        if state.get(p) == 1:
            names = " -> ".join(param_name(q) for q in chain + [p])
            leaf = node_at(root, p)
            raise SpecError(f"`when` conditions form a cycle: {names}",
                            (leaf.src if leaf is not None else ("space",)) + ("when",))
        state[p] = 1
        for q in deps.get(p, []):
            visit(q, chain + [p])
        state[p] = 2

    for p in deps:
        visit(p, [])


def flatten_into(raw: dict, node: Node, path: Path, doc: Path,
                  out: dict[Path, tuple[Any, Path]], names: list[str]) -> None:
    for key, value in raw.items():
        here = doc + (key,)
        target: Node | None = node
        tpath = path
        for part in split_key(str(key)):
            target = node_at(target, (part,)) if not isinstance(target, Leaf) else None
            if target is None:
                raise SpecError(f"unknown parameter {param_name(tpath + (part,))!r}; the space "
                                f"has: {', '.join(names)}", here)
            tpath += (part,)
        _assign(value, target, tpath, here, out, names)


def _assign(value: Any, target: Node, tpath: Path, here: Path,
            out: dict[Path, tuple[Any, Path]], names: list[str]) -> None:
    if isinstance(target, Leaf):
        if tpath in out:
            raise SpecError(f"{param_name(tpath)} is given twice", here)
        out[tpath] = (value, here)
    elif isinstance(value, dict):
        flatten_into(value, target, tpath, here, out, names)
    elif isinstance(value, list) and not isinstance(target, Tree):
        for i, item in enumerate(value):
            sub = node_at(target, (i,))
            if sub is None:
                raise SpecError(f"{param_name(tpath)} has no item {i}", here + (i,))
            _assign(item, sub, tpath + (i,), here + (i,), out, names)
    else:
        raise SpecError(f"{param_name(tpath)} is a section of the space; give its parameters "
                        "(a mapping or dotted paths), not a value", here)

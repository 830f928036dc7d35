"""The one YAML loader: ``yaml.safe_load`` semantics plus line numbers for error messages.

Every YAML document the project reads goes through :func:`parse_yaml` (files through
:func:`load_yaml`), which adds three things to ``yaml.safe_load``:

- limits: a file is at most ``MAX_TEXT_BYTES`` and, with its aliases expanded, at most
  ``MAX_NODES`` nodes nested at most ``MAX_DEPTH`` deep, so an alias bomb (a few hundred bytes
  that expand to billions of nodes) is refused in microseconds instead of hanging whatever walks
  the result later;
- ``1e-3`` is a float (YAML 1.1, which PyYAML implements, needs a dot: ``1.0e-3``);
- duplicate keys are errors that name both lines.

:func:`json_safe` is the one conversion of loaded or computed values to strict JSON.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from .checks import MAX_TEXT_BYTES, read_text
from .errors import PathPart, SpecError

MAX_NODES = 100_000  # expanded nodes (scalars, mappings, sequences); specs have a few hundred
MAX_DEPTH = 64  # nesting; the deepest spec (a BTC graph in a layer's attention) is about 8


class _Loader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that also reads ``1e-3`` (no dot) as a float, as YAML 1.2 does."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)"
                                          r"[eE][-+]?[0-9]+$"), list("-+0123456789."))


class Located:
    """A loaded YAML document and the line of every field path in it."""

    def __init__(self, data: Any, lines: dict[tuple[PathPart, ...], int], filename: str):
        self.data = data
        self.lines = lines
        self.filename = filename

    def source(self, path: Sequence[PathPart]) -> str:
        """``file:line`` of the deepest prefix of ``path`` that the file spells out."""
        path = tuple(path)
        while path and path not in self.lines:
            path = path[:-1]
        line = self.lines.get(path, 1)
        return f"{self.filename}:{line}"

    def locate(self, err: SpecError) -> SpecError:
        return SpecError(err.message, err.path, self.source(err.path))


class _Budget:
    """Counts the nodes a walk expands (aliases included), refusing documents over the limits."""

    def __init__(self, filename: str):
        self.nodes = 0
        self.filename = filename

    def visit(self, node: yaml.Node, depth: int) -> None:
        self.nodes += 1
        where = f"{self.filename}:{node.start_mark.line + 1}"
        if self.nodes > MAX_NODES:
            raise SpecError(f"the document expands to more than {MAX_NODES:,} nodes (aliases "
                            "included); write it out without `*alias` repetition", source=where)
        if depth > MAX_DEPTH:
            raise SpecError(f"the document nests more than {MAX_DEPTH} levels deep (or an "
                            "alias refers to itself)", source=where)


def _walk(node: yaml.Node, path: tuple[PathPart, ...], lines: dict, filename: str,
          budget: _Budget) -> None:
    budget.visit(node, len(path))
    lines.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            key = key_node.value
            line = key_node.start_mark.line + 1
            if key in seen:  # safe_load would silently keep the last one
                raise SpecError(f"duplicate key {key!r} (first given on line {seen[key]}); "
                                "give each key once", path + (key,), f"{filename}:{line}")
            seen[key] = line
            lines[path + (key,)] = line
            _walk(value_node, path + (key,), lines, filename, budget)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _walk(item, path + (i,), lines, filename, budget)


def _check_depth(text: str, filename: str) -> None:
    """Refuse nesting deeper than ``MAX_DEPTH`` from the event stream (the parser is iterative;
    the composer recurses, and unwinding a RecursionError from it takes about a second)."""
    depth = 0
    for event in yaml.parse(text, Loader=_Loader):
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > MAX_DEPTH:
                raise SpecError(f"the document nests more than {MAX_DEPTH} levels deep",
                                source=f"{filename}:{event.start_mark.line + 1}")
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1


def parse_yaml(text: str, filename: str = "<string>") -> Located:
    """Parse YAML text safely (no tags, no code) and record the line of every field.

    The document is composed once, checked against the size limits (aliases expanded), then
    constructed; errors are one-line :class:`SpecError` s with ``file:line``.
    """
    if len(text) > MAX_TEXT_BYTES:
        raise SpecError(f"the document has {len(text):,} characters; YAML input must be at "
                        f"most {MAX_TEXT_BYTES:,}", source=filename)
    loader = _Loader(text)
    try:
        _check_depth(text, filename)
        node = loader.get_single_node()
        lines: dict[tuple[PathPart, ...], int] = {}
        if node is not None:
            _walk(node, (), lines, filename, _Budget(filename))
        data = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise SpecError(f"invalid YAML: {' '.join(str(problem).split())}",
                        source=f"{filename}{line}") from None
    except RecursionError:
        raise SpecError(f"invalid YAML: nested more than {MAX_DEPTH} levels deep",
                        source=filename) from None
    finally:
        loader.dispose()
    return Located(data, lines, filename)


def load_yaml(path: str | Path) -> Located:
    """Read and parse a YAML file: a missing, binary, non-UTF-8 or oversized file is a one-line
    :class:`~mlbtc_search.errors.UsageError`, bad YAML a located SpecError."""
    return parse_yaml(read_text(path, "YAML file"), str(path))


def yaml_scalar(text: str) -> Any:
    """One command-line value read as YAML (``16`` -> 16, ``1e-3`` -> 0.001, ``[a, b]`` -> a
    list); text that is not valid YAML stays the string it is."""
    if not text.strip():
        return text
    try:
        value = parse_yaml(text, "<value>").data
    except SpecError:
        return text
    return value


def json_safe(value: Any) -> Any:
    """``value`` with NaN and infinities as ``None``, tuples as lists and keys as strings, so
    ``json.dumps(..., allow_nan=False)`` accepts it (JSON has no NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k if isinstance(k, str) else str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def dump_yaml(data: Any) -> str:
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=99)

"""The one YAML loader: ``yaml.safe_load`` semantics plus line numbers for error messages."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from .errors import PathPart, SpecError, UsageError


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


def _walk(node: yaml.Node, path: tuple[PathPart, ...], lines: dict, filename: str) -> None:
    lines[path] = node.start_mark.line + 1
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
            _walk(value_node, path + (key,), lines, filename)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _walk(item, path + (i,), lines, filename)


def parse_yaml(text: str, filename: str = "<string>") -> Located:
    """Parse YAML text safely (no tags, no code) and record the line of every field."""
    try:
        data = yaml.safe_load(text)
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise SpecError(f"invalid YAML: {problem}", source=f"{filename}{line}") from None
    lines: dict[tuple[PathPart, ...], int] = {}
    if node is not None:
        _walk(node, (), lines, filename)
    return Located(data, lines, filename)


def load_yaml(path: str | Path) -> Located:
    """Read and parse a YAML file; a missing file is a :class:`UsageError`."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"file not found: {p} (give the path of an existing YAML file)")
    return parse_yaml(p.read_text(encoding="utf-8"), str(p))


def dump_yaml(data: Any) -> str:
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=99)

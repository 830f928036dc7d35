"""Checks on user input shared by every layer: integers, files we read, paths we create.

Each check either returns the value (normalized) or raises one :class:`SpecError` /
:class:`UsageError` whose message fits on one line and says what would be valid. None of them
creates anything: callers check first, then create (so bad input leaves no files behind).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import PathPart, SpecError, UsageError

MAX_TEXT_BYTES = 1 << 20  # spec and search-space YAML files are a few kB


def check_int(value: Any, path: Sequence[PathPart], name: str, low: int = 1,
              high: int | None = None) -> int:
    """``value`` as an int in ``[low, high]``, else a SpecError at ``path`` naming ``name``.

    Booleans are refused (YAML ``true`` is not 1); numpy integers are accepted.
    """
    if isinstance(value, bool) or not hasattr(value, "__index__") or isinstance(value, float):
        raise SpecError(f"{name} must be an integer >= {low}, got {value!r}", path)
    n = int(value)
    if n < low or (high is not None and n > high):
        bound = f">= {low}" if high is None else f">= {low} and <= {high}"
        raise SpecError(f"{name} must be an integer {bound}, got {value!r}", path)
    return n


def read_text(path: str | os.PathLike[str], what: str = "file",
              max_bytes: int = MAX_TEXT_BYTES) -> str:
    """The UTF-8 text of a regular file of at most ``max_bytes``; else one-line UsageError.

    A missing file, a directory, a binary file (a NUL byte) and bytes that are not UTF-8 each get
    their own message; the size is checked before the file is read.
    """
    p = Path(path)
    if not p.exists():
        raise UsageError(f"file not found: {p} (give the path of an existing {what})")
    if not p.is_file():
        raise UsageError(f"{p} is not a regular file (give the path of an existing {what})")
    try:
        size = p.stat().st_size
        if size > max_bytes:
            raise UsageError(f"{p} is {size:,} bytes; a {what} must be at most {max_bytes:,} "
                             "bytes")
        raw = p.read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read {p}: {exc.strerror or exc}") from None
    return decode_text(raw, str(p), what)


def decode_text(raw: bytes, source: str, what: str = "file") -> str:
    """``raw`` decoded as UTF-8 (a BOM is dropped), else a one-line UsageError."""
    if b"\0" in raw:
        raise UsageError(f"{source} is a binary file (it holds NUL bytes); a {what} must be "
                         "UTF-8 text")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        raise UsageError(f"{source}:{line} is not UTF-8 text (byte 0x{raw[exc.start]:02x} at "
                         f"offset {exc.start}); a {what} must be UTF-8") from None


def check_new_dir(path: str | os.PathLike[str], flag: str = "--out") -> Path:
    """``path`` as a directory we may create (or an empty one); creates nothing.

    Refused: an existing file, a non-empty directory, a path under a regular file, and a parent
    we cannot write to.
    """
    p = Path(path).expanduser()
    if p.exists() or p.is_symlink():
        if not p.is_dir():
            raise UsageError(f"{flag} {p} is a file; give a new or empty directory")
        if any(p.iterdir()):
            raise UsageError(f"{flag} {p} exists and is not empty; give a new or empty "
                             "directory")
        return p
    check_creatable(p, flag)
    return p


def check_creatable(path: str | os.PathLike[str], flag: str) -> Path:
    """``path`` (absent) can be created: its nearest existing ancestor is a writable directory.

    Creates nothing; a one-line UsageError names ``flag`` and the ancestor that is in the way.
    """
    p = Path(path).expanduser()
    ancestor = p.absolute().parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UsageError(f"{flag} {p} cannot be created: {ancestor} is a file, not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {p} cannot be created: no write permission in {ancestor}")
    return p


__all__ = ["MAX_TEXT_BYTES", "check_creatable", "check_int", "check_new_dir", "decode_text",
           "read_text"]

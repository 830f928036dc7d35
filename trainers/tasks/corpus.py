"""Text corpora that need no download, built from what every CPython installation ships.

- ``"pydoc"`` (the text task's default): CPython's reference documentation topics
  (``pydoc_data.topics``, about 465 KB of English), joined in sorted-key order with blank lines.
- ``"stdlib"``: the ``pydoc`` text followed by every ``.py`` file of the running Python's standard
  library (``sysconfig.get_paths()["stdlib"]``, its test suite included; ``site-packages``,
  ``__pycache__`` and ``pydoc_data`` excluded) in sorted order of their relative paths, each
  preceded by a line ``# ==== file: RELPATH ====``. About 32 MB on CPython 3.11 (documentation
  prose, code and comments): a byte-level model of a million parameters cannot memorise it, so
  its validation loss measures generalisation at the budgets we can afford. The validation split
  (the text task takes the last ``val_fraction`` of the bytes) is the alphabetically last files.

Both are deterministic for one CPython version (bytes and order); their size and SHA-256 follow
the version, so record them with results (``benchmarks/build_corpus.py`` prints them and writes
the file, which the text task then reads with ``path=``).
"""

from __future__ import annotations

import functools
import hashlib
import sysconfig
from pathlib import Path

from mlbtc_search.errors import TrainingError

CORPORA = ("pydoc", "stdlib")
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "pydoc_data"}  # pydoc: above


@functools.lru_cache(maxsize=1)
def pydoc_corpus() -> bytes:
    """CPython's reference documentation topics as one UTF-8 text, in sorted-key order."""
    try:
        from pydoc_data.topics import topics
    except ImportError as err:  # pragma: no cover - every CPython ships pydoc_data
        raise TrainingError(
            "the default text corpus needs CPython's pydoc_data module, which this Python lacks; "
            "pass the text task a file with option path=..."
        ) from err
    return "\n\n".join(topics[key] for key in sorted(topics)).encode("utf-8")


def stdlib_files(root: Path | None = None) -> list[Path]:
    """The standard library's ``.py`` files under ``root``, sorted by relative path."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    files = [f for f in root.rglob("*.py")
             if f.is_file() and not _SKIP_DIRS.intersection(f.relative_to(root).parts)]
    return sorted(files, key=lambda f: f.relative_to(root).as_posix())


@functools.lru_cache(maxsize=1)
def stdlib_corpus() -> bytes:
    """The ``pydoc`` text, then the standard library's sources (see the module doc)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = stdlib_files(root)
    if not files:
        raise TrainingError(f"the 'stdlib' corpus found no .py files under {str(root)!r}")
    parts = [pydoc_corpus()]
    for f in files:
        parts.append(f"\n# ==== file: {f.relative_to(root).as_posix()} ====\n".encode())
        parts.append(f.read_bytes())
    return b"".join(parts)


def corpus(name: str) -> bytes:
    """The bytes of corpus ``name`` (one of ``CORPORA``)."""
    return pydoc_corpus() if name == "pydoc" else stdlib_corpus()


def describe(data: bytes) -> dict[str, object]:
    """Size and SHA-256 of a corpus (what a result must record to be comparable)."""
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


__all__ = ["CORPORA", "corpus", "describe", "pydoc_corpus", "stdlib_corpus", "stdlib_files"]

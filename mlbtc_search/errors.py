"""One root error for the project, with a field path so messages say *where*.

Every message says what must hold, what was got, and where::

    at model.yaml:14 attention.levels[2].rank: rank must be >= 1 and <= 64, got rank=96
"""

from __future__ import annotations

from collections.abc import Sequence

PathPart = str | int


def format_path(path: Sequence[PathPart]) -> str:
    """``("levels", 2, "rank")`` -> ``"levels[2].rank"``."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


class MlbtcError(Exception):
    """Root of every error the project raises on purpose (bad input, impossible requests)."""


class SpecError(MlbtcError, ValueError):
    """A specification (matrix, attention, model, search space) is malformed or impossible.

    ``path`` is the field path inside the document; ``source`` is ``file:line`` once known.
    """

    def __init__(self, message: str, path: Sequence[PathPart] = (), source: str | None = None):
        self.message = message
        self.path = tuple(path)
        self.source = source
        super().__init__(str(self))

    def __str__(self) -> str:
        where = " ".join(p for p in (self.source, format_path(self.path)) if p)
        return f"at {where}: {self.message}" if where else self.message

    def prefixed(self, prefix: Sequence[PathPart]) -> SpecError:
        """The same error, located under ``prefix`` (used when specs nest)."""
        return SpecError(self.message, tuple(prefix) + self.path, self.source)


class UsageError(MlbtcError):
    """A command was called wrongly (missing file, unknown study, ...): CLI exit code 2."""


class TrainingError(MlbtcError):
    """Training could not proceed (budget too small for one step, data too short, ...)."""

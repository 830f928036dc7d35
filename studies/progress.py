"""Live search progress on stderr, and the summary printed when a search ends.

On a terminal the status line is rewritten in place about every 2 s; into a file or a pipe a
line is written when the counts change (and at least every 30 s), so logs stay readable.
Nothing here knows about Optuna or Ray: the runner hands over a :class:`Snapshot`.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TextIO


@dataclass(frozen=True)
class Snapshot:
    """Where a search stands: trials of the study by status plus this run's pace."""

    target: int  # trials the study should reach (trained: ok + failed)
    done: int  # trained trials so far (ok + failed, retried ones not counted)
    ok: int
    running: int
    failed: int
    interrupted: int  # Ctrl-C'd trials (re-queued; neither done nor failed)
    infeasible: int
    duplicate: int
    front_size: int
    hypervolume: float | None
    elapsed_s: float
    eta_s: float | None


def format_duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "--"
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    minutes, s = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{s:02d}s"
    hours, m = divmod(minutes, 60)
    return f"{hours}h{m:02d}m"


def format_line(s: Snapshot) -> str:
    hv = "--" if s.hypervolume is None else f"{s.hypervolume:.4g}"
    return (f"trials {s.done}/{s.target} done | ok {s.ok} | running {s.running} | "
            f"failed {s.failed} | interrupted {s.interrupted} | infeasible {s.infeasible} | "
            f"duplicate {s.duplicate} | "
            f"front {s.front_size} | hypervolume {hv} | elapsed "
            f"{format_duration(s.elapsed_s)} | ETA {format_duration(s.eta_s)}")


class Progress:
    """Writes :func:`format_line` of each snapshot it is given, rate-limited (see module doc)."""

    def __init__(self, stream: TextIO | None = None, interval_s: float = 2.0,
                 quiet_interval_s: float = 30.0, enabled: bool = True):
        self.stream = stream if stream is not None else sys.stderr
        self.interval_s = interval_s
        self.quiet_interval_s = quiet_interval_s
        self.enabled = enabled
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._last_time = -math.inf
        self._last_key: tuple | None = None
        self._live = False

    def message(self, text: str) -> None:
        """A line of its own (not overwritten)."""
        if not self.enabled:
            return
        self._clear()
        self.stream.write(text + "\n")
        self.stream.flush()

    def update(self, snap: Snapshot, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        key = (snap.done, snap.ok, snap.running, snap.failed, snap.interrupted, snap.infeasible,
               snap.duplicate)
        if self.tty:
            if force or now - self._last_time >= self.interval_s:
                self.stream.write("\r\x1b[2K" + format_line(snap))
                self.stream.flush()
                self._live = True
                self._last_time = now
        elif force or key != self._last_key or now - self._last_time >= self.quiet_interval_s:
            self.stream.write(format_line(snap) + "\n")
            self.stream.flush()
            self._last_time = now
        self._last_key = key

    def close(self) -> None:
        self._clear()

    def _clear(self) -> None:
        if self._live:
            self.stream.write("\n")
            self.stream.flush()
            self._live = False


def _num(value: Any, fmt: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return format(value, fmt)


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str, str]]) -> str:
    """A plain-text table: ``columns`` are ``(header, key, format spec or "")``."""
    cells = [[h for h, _, _ in columns]]
    for r in rows:
        cells.append([_num(r.get(k), f) if f else str(r.get(k) if r.get(k) is not None else "-")
                      for _, k, f in columns])
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
             for row in cells]
    return "\n".join(lines)


FRONT_COLUMNS = (("trial", "number", ""), ("family", "family", ""),
                 ("structure", "structure", ""), ("val_loss", "val_loss", ".4g"),
                 ("metric", "metric", ".4g"),
                 ("FLOPs/token", "flops_per_token", ",.0f"), ("params", "params", ","),
                 ("hash", "hash", ""))


def format_summary(*, study_name: str, storage_url: str, artifact_dir: str,
                   snapshot: Snapshot, front: Sequence[dict[str, Any]],
                   interrupted: bool, note: str | None = None,
                   default_storage: bool = False) -> str:
    """What ``mlbtc search`` prints at the end: counts, the front (rows of
    :meth:`studies.record.TrialRecord.row`), where to look next. ``default_storage``: the
    storage is the default one, so the next commands need no ``--storage``."""
    head = "interrupted" if interrupted else "finished"
    hv = "-" if snapshot.hypervolume is None else f"{snapshot.hypervolume:.4g}"
    lines = [
        f"search {head}: study {study_name!r}, {snapshot.done}/{snapshot.target} trials trained "
        f"(ok {snapshot.ok}, failed {snapshot.failed}), interrupted {snapshot.interrupted}, "
        f"infeasible {snapshot.infeasible}, "
        f"duplicate {snapshot.duplicate}, in {format_duration(snapshot.elapsed_s)}",
    ]
    if note:
        lines.append(note)
    lines.append(f"Pareto front (val_loss vs FLOPs/token): {len(front)} trials, hypervolume {hv} "
                 "(in val_loss x log10 FLOPs)")
    if front:
        lines.append(format_table(front, FRONT_COLUMNS))
    flag = "" if default_storage else f" --storage {storage_url}"
    lines += [
        f"storage:   {storage_url}",
        f"artifacts: {artifact_dir}",
        f"next:      mlbtc dashboard{flag}",
        f"           mlbtc pareto {study_name}{flag}",
    ]
    if interrupted:
        lines.append("resume:    run the same mlbtc search command again")
    return "\n".join(lines)


__all__ = ["FRONT_COLUMNS", "Progress", "Snapshot", "format_duration", "format_line",
           "format_summary", "format_table"]

"""Read-only access to a study storage, fast enough for 5,000-trial studies.

The dashboard never writes: it opens the storage without creating tables, never creates or
changes a study, and reads trials with short SELECT statements (SQLite readers beside a running
writer wait on a busy timeout instead of failing, and hold no lock between statements).

Storages are opened through the storage door (``studies.storage.open_storage`` with
``create=False``), and every trial comes out as the one record type,
:class:`studies.record.TrialRecord`.

Why not ``storage.get_all_trials``: Optuna's ORM builds ~23 objects per trial (params, values,
every user attribute, ...) and takes about 10 s for 5,000 contract-shaped trials on a 2-core CPU.
:class:`TrialCache` instead selects the few columns the pages need with SQLAlchemy Core, from
the tables as the database itself describes them (reflected once: no Optuna private module), skips
the large ``curve`` attribute (only the trial page needs it, and reads that one trial through
Optuna), and keeps finished trials: Optuna never changes a finished trial, so a refresh lists the
study's trial ids and states (one small SELECT) and re-reads only new trials and those whose
state changed. A test checks that it returns exactly what ``get_all_trials`` returns, on SQLite
and PostgreSQL. Storages that are not RDB storages fall back to ``get_all_trials``.
"""

from __future__ import annotations

import datetime as dt
import json
import threading
from dataclasses import dataclass
from typing import Any

from optuna.storages import BaseStorage, RDBStorage
from optuna.trial import FrozenTrial

from mlbtc_search.errors import UsageError
from studies.record import LAZY_ATTRS, StudyInfo, TrialRecord
from studies.storage import open_storage

IN_LIST_LIMIT = 500  # above this many trials to (re)read, select them by study instead


def open_reader(url: str | None) -> BaseStorage:
    """Open an existing storage for reading (``studies.storage.open_storage(create=False)``):
    a SQLite file that does not exist is an error, no tables are created."""
    return open_storage(url, create=False)


@dataclass(frozen=True)
class StudyEntry:
    """A study as the dashboard lists it: its id, name, directions and :class:`StudyInfo`."""

    study_id: int
    name: str
    info: StudyInfo
    directions: tuple[str, ...]
    metric_names: tuple[str, ...] | None


def list_studies(storage: BaseStorage) -> list[StudyEntry]:
    """Every study in the storage, by name."""
    out = []
    for s in storage.get_all_studies():
        names = s.system_attrs.get("study:metric_names")  # set by Study.set_metric_names
        out.append(StudyEntry(storage.get_study_id_from_name(s.study_name), s.study_name,
                              StudyInfo.from_attrs(s.user_attrs),
                              tuple(d.name.lower() for d in s.directions),
                              tuple(names) if names else None))
    return sorted(out, key=lambda s: s.name)


def find_study(storage: BaseStorage, name: str) -> StudyEntry:
    """The study called ``name``; a UsageError that lists the studies otherwise."""
    studies = list_studies(storage)
    for s in studies:
        if s.name == name:
            return s
    names = ", ".join(repr(s.name) for s in studies) or "none"
    raise UsageError(f"unknown study {name!r}; studies in this storage: {names}")


def study_by_id(storage: BaseStorage, study_id: int) -> StudyEntry:
    for s in list_studies(storage):
        if s.study_id == study_id:
            return s
    raise UsageError(f"no study with id {study_id} in this storage")


def _local(value: dt.datetime | None) -> dt.datetime | None:
    """Optuna stores naive UTC and shows naive local time; do the same."""
    if value is None:
        return None
    return value.replace(tzinfo=dt.timezone.utc).astimezone().replace(tzinfo=None)


class TrialCache:
    """Per-study trial records, refreshed incrementally (one instance per app, thread-safe)."""

    def __init__(self, storage: BaseStorage):
        self.storage = storage
        self._lock = threading.Lock()
        self._studies: dict[int, dict[int, TrialRecord]] = {}
        self._raw_states: dict[int, dict[int, str]] = {}  # Optuna state names as read
        self._tables = _tables(storage) if isinstance(storage, RDBStorage) else None

    def trials(self, study_id: int) -> tuple[list[TrialRecord], bool]:
        """``(records by number, changed since the last call)``."""
        with self._lock:
            known = self._studies.setdefault(study_id, {})
            if self._tables is None:
                fresh = [_record(t, self.storage, study_id) for t in
                         self.storage.get_all_trials(study_id, deepcopy=False)]
                changed = _signature(fresh) != _signature(list(known.values()))
                known.clear()
                known.update({r.trial_id: r for r in fresh})
            else:
                changed = self._refresh_rdb(study_id, known)
            return sorted(known.values(), key=lambda r: r.number), changed

    def _refresh_rdb(self, study_id: int, known: dict[int, TrialRecord]) -> bool:
        """Read the (id, state) of every trial of the study, then the values and attributes of
        the new and changed ones only. Listing every id (not just ids above the newest known)
        keeps trials whose insert committed late (concurrent PostgreSQL writers)."""
        import sqlalchemy as sa

        trials, values, attrs = self._tables
        engine = self.storage.engine
        with engine.connect() as conn:
            if engine.dialect.name == "postgresql":
                conn = conn.execution_options(postgresql_readonly=True)
            rows = conn.execute(sa.select(
                trials.c.trial_id, trials.c.number, trials.c.state, trials.c.datetime_start,
                trials.c.datetime_complete).where(trials.c.study_id == study_id)).all()
            seen = self._raw_states.setdefault(study_id, {})
            fresh = [r for r in rows if seen.get(r.trial_id) != _name(r.state)]
            if not fresh:
                return False
            if len(fresh) > IN_LIST_LIMIT:  # many (a cold start): select by study
                which = sa.select(trials.c.trial_id).where(
                    trials.c.study_id == study_id).scalar_subquery()
            else:
                which = [r.trial_id for r in fresh]
            value_rows = conn.execute(sa.select(
                values.c.trial_id, values.c.objective, values.c.value, values.c.value_type
            ).where(values.c.trial_id.in_(which))).all()
            attr_rows = conn.execute(sa.select(
                attrs.c.trial_id, attrs.c.key, attrs.c.value_json
            ).where(attrs.c.trial_id.in_(which), attrs.c.key.not_in(LAZY_ATTRS))
                .order_by(attrs.c.trial_user_attribute_id)).all()
        rows = fresh
        # Decoding happens after the connection is returned: no lock is held meanwhile.
        vals: dict[int, dict[int, float]] = {}
        for tid, objective, value, vtype in value_rows:
            vals.setdefault(tid, {})[objective] = _stored_value(value, vtype)
        user: dict[int, dict[str, Any]] = {}
        for tid, key, blob in attr_rows:
            user.setdefault(tid, {})[key] = _loads(blob)
        for r in rows:
            v = vals.get(r.trial_id)
            seen[r.trial_id] = _name(r.state)
            known[r.trial_id] = TrialRecord.from_parts(
                number=r.number, optuna_state=_name(r.state),
                values=[v[k] for k in sorted(v)] if v else None,
                user_attrs=user.get(r.trial_id, {}), started=_local(r.datetime_start),
                completed=_local(r.datetime_complete), trial_id=r.trial_id)
        return True

    def forget(self, study_id: int) -> None:
        with self._lock:
            self._studies.pop(study_id, None)
            self._raw_states.pop(study_id, None)


def _loads(blob: str) -> Any:
    """``json.loads``, through orjson when it is installed (2x faster on specs); Optuna writes
    attributes with ``json.dumps``, whose NaN/Infinity tokens only the standard parser reads."""
    if _fast_loads is not None:
        try:
            return _fast_loads(blob)
        except ValueError:
            pass
    return json.loads(blob)


try:  # optional speed-up, not a dependency
    from orjson import loads as _fast_loads
except ImportError:  # pragma: no cover - depends on the environment
    _fast_loads = None


def _tables(storage: RDBStorage) -> tuple[Any, Any, Any]:
    """Optuna's trial, value and user-attribute tables, reflected from the database."""
    import sqlalchemy as sa

    meta = sa.MetaData()
    try:
        return tuple(sa.Table(name, meta, autoload_with=storage.engine) for name in (
            "trials", "trial_values", "trial_user_attributes"))  # type: ignore[return-value]
    except sa.exc.SQLAlchemyError as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UsageError(f"the storage has no Optuna trial tables ({first[:200]}); is it a "
                         "study storage made by `mlbtc search`?") from None


def _name(state: Any) -> str:
    """A TrialState name from a reflected column (a string, or an enum on some drivers)."""
    return str(getattr(state, "name", state))


def _record(t: FrozenTrial, storage: BaseStorage, study_id: int) -> TrialRecord:
    attrs = {k: v for k, v in t.user_attrs.items() if k not in LAZY_ATTRS}
    trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, t.number)
    return TrialRecord.from_parts(number=t.number, optuna_state=t.state.name, values=t.values,
                                  user_attrs=attrs, sampled=t.params, started=t.datetime_start,
                                  completed=t.datetime_complete, trial_id=trial_id)


def _stored_value(value: float | None, vtype: Any) -> float:
    name = getattr(vtype, "name", str(vtype))
    if name == "INF_POS":
        return float("inf")
    if name == "INF_NEG":
        return float("-inf")
    return float(value) if value is not None else float("nan")


def _signature(records: list[TrialRecord]) -> tuple:
    return tuple(sorted((r.trial_id or -1, r.state) for r in records))


def load_trial(storage: BaseStorage, study_id: int, number: int) -> TrialRecord:
    """One trial with all its attributes (a UsageError if there is no such trial)."""
    try:
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, number)
    except KeyError:
        raise UsageError(f"the study has no trial {number}") from None
    t = storage.get_trial(trial_id)
    return TrialRecord.from_trial(t, trial_id)

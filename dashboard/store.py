"""Read-only access to a study storage, fast enough for 5,000-trial studies.

The dashboard never writes: it opens the storage without creating tables, never creates or
changes a study, and reads trials with short SELECT statements (SQLite readers beside a running
writer wait on a busy timeout instead of failing, and hold no lock between statements).

Why not ``storage.get_all_trials``: Optuna's ORM builds ~23 objects per trial (params, values,
every user attribute, ...) and takes about 10 s for 5,000 contract-shaped trials on a 2-core CPU.
:class:`TrialCache` instead selects the few columns the pages need from Optuna's own table
definitions (so column names follow the installed Optuna) with SQLAlchemy Core, skips the large
``curve`` attribute (only the trial page needs it, and reads that one trial through Optuna), and
keeps finished trials: Optuna never changes a finished trial, so a refresh lists the study's
trial ids and states (one small SELECT) and re-reads only new trials and those whose state
changed. A test checks that it returns exactly what ``get_all_trials`` returns, on
SQLite and PostgreSQL. Storages that are not RDB storages fall back to ``get_all_trials``.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import BaseStorage, RDBStorage
from optuna.trial import FrozenTrial, TrialState

from mlbtc_search.errors import UsageError
from studies.storage import default_storage_url, mask_url, sqlite_path

SQLITE_BUSY_TIMEOUT_S = 30.0
LAZY_ATTRS = ("curve",)  # big attributes read only for one trial at a time
IN_LIST_LIMIT = 500  # above this many trials to (re)read, select them by study instead
_ARTIFACT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,199}$")


def open_reader(url: str | None) -> BaseStorage:
    """Open an existing storage for reading; a UsageError when there is nothing to read.

    ``url`` defaults to ``$MLBTC_STORAGE``, else ``sqlite:///mlbtc.db``. Unlike
    ``studies.storage.open_storage`` this never writes: a SQLite file that does not exist is an
    error (no empty database for a typo), tables are not created, and no journal mode is set.
    SQLite connections get a busy timeout, so a reader waits for a writer's commit instead of
    failing with "database is locked".
    """
    url = url or default_storage_url()
    engine_kwargs: dict[str, Any] = {}
    db_file = sqlite_path(url)
    if db_file is not None:
        if not db_file.is_file():
            raise UsageError(f"no study storage at {db_file} ({mask_url(url)}): the SQLite file "
                             "does not exist; run `mlbtc search` first or pass --storage URL")
        engine_kwargs["connect_args"] = {"timeout": SQLITE_BUSY_TIMEOUT_S}
    elif not url.startswith("sqlite"):
        engine_kwargs["pool_pre_ping"] = True
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        return RDBStorage(url, engine_kwargs=engine_kwargs, skip_table_creation=True)
    except Exception as exc:  # noqa: BLE001 - any driver/schema error: cannot read this URL
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UsageError(f"cannot read the study storage {mask_url(url)}: {first[:300]} (is it "
                         "an Optuna storage made by `mlbtc search`?)") from None


@dataclass(frozen=True)
class StudyInfo:
    """A study as the dashboard lists it."""

    study_id: int
    name: str
    user_attrs: dict[str, Any]
    directions: tuple[str, ...]
    metric_names: tuple[str, ...] | None


def list_studies(storage: BaseStorage) -> list[StudyInfo]:
    """Every study in the storage, by name."""
    out = []
    for s in storage.get_all_studies():
        names = s.system_attrs.get("study:metric_names")
        study_id = getattr(s, "_study_id", None)  # FrozenStudy has no public id
        if study_id is None:
            study_id = storage.get_study_id_from_name(s.study_name)
        out.append(StudyInfo(study_id, s.study_name, dict(s.user_attrs),
                             tuple(d.name.lower() for d in s.directions),
                             tuple(names) if names else None))
    return sorted(out, key=lambda s: s.name)


def find_study(storage: BaseStorage, name: str) -> StudyInfo:
    """The study called ``name``; a UsageError that lists the studies otherwise."""
    studies = list_studies(storage)
    for s in studies:
        if s.name == name:
            return s
    names = ", ".join(repr(s.name) for s in studies) or "none"
    raise UsageError(f"unknown study {name!r}; studies in this storage: {names}")


def study_by_id(storage: BaseStorage, study_id: int) -> StudyInfo:
    for s in list_studies(storage):
        if s.study_id == study_id:
            return s
    raise UsageError(f"no study with id {study_id} in this storage")


@dataclass
class TrialRecord:
    """The parts of a trial the dashboard reads (a duck-typed subset of FrozenTrial)."""

    trial_id: int
    number: int
    state: TrialState
    values: list[float] | None
    datetime_start: dt.datetime | None
    datetime_complete: dt.datetime | None
    user_attrs: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_frozen(cls, t: FrozenTrial) -> TrialRecord:
        attrs = {k: v for k, v in t.user_attrs.items() if k not in LAZY_ATTRS}
        return cls(t._trial_id, t.number, t.state, None if t.values is None else list(t.values),
                   t.datetime_start, t.datetime_complete, attrs)


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
        self._tables = _tables() if isinstance(storage, RDBStorage) else None

    def trials(self, study_id: int) -> tuple[list[TrialRecord], bool]:
        """``(records by number, changed since the last call)``."""
        with self._lock:
            known = self._studies.setdefault(study_id, {})
            if self._tables is None:
                fresh = [TrialRecord.from_frozen(t) for t in
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
            fresh = [r for r in rows if r.trial_id not in known
                     or known[r.trial_id].state != r.state]
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
            known[r.trial_id] = TrialRecord(
                r.trial_id, r.number, r.state, [v[k] for k in sorted(v)] if v else None,
                _local(r.datetime_start), _local(r.datetime_complete), user.get(r.trial_id, {}))
        return True

    def forget(self, study_id: int) -> None:
        with self._lock:
            self._studies.pop(study_id, None)


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


def _tables() -> tuple[Any, Any, Any]:
    from optuna.storages._rdb import models

    return (models.TrialModel.__table__, models.TrialValueModel.__table__,
            models.TrialUserAttributeModel.__table__)


def _stored_value(value: float | None, vtype: Any) -> float:
    name = getattr(vtype, "name", str(vtype))
    if name == "INF_POS":
        return float("inf")
    if name == "INF_NEG":
        return float("-inf")
    return float(value) if value is not None else float("nan")


def _signature(records: list[TrialRecord]) -> tuple:
    return tuple(sorted((r.trial_id, r.state.name) for r in records))


def load_trial(storage: BaseStorage, study_id: int, number: int) -> FrozenTrial:
    """One trial with all its attributes (a UsageError if there is no such trial)."""
    try:
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, number)
    except KeyError:
        raise UsageError(f"the study has no trial {number}") from None
    return storage.get_trial(trial_id)


def read_weights(study_attrs: dict[str, Any], trial: FrozenTrial) -> bytes:
    """The trial's weights artifact, read through the study's artifact store.

    Only the artifact id recorded in the storage (``weights_artifact_id``) names the file, under
    the study's ``artifact_dir``; nothing from an HTTP request reaches the file system.
    """
    from optuna.artifacts import FileSystemArtifactStore
    from optuna.artifacts.exceptions import ArtifactNotFound

    artifact_id = trial.user_attrs.get("weights_artifact_id")
    if not isinstance(artifact_id, str) or not _ARTIFACT_ID.match(artifact_id) or ".." in \
            artifact_id:
        raise UsageError(f"trial {trial.number} has no usable weights artifact id")
    info = study_attrs.get("mlbtc") or {}
    base = info.get("artifact_dir") if isinstance(info, dict) else None
    if not isinstance(base, str) or not Path(base).is_dir():
        raise UsageError("the study records no artifact directory (user attr "
                         "mlbtc.artifact_dir), so its weights cannot be read")
    store = FileSystemArtifactStore(base)
    try:
        with store.open_reader(artifact_id) as f:
            return f.read()
    except (ArtifactNotFound, ValueError) as exc:
        raise UsageError(f"the weights of trial {trial.number} (artifact {artifact_id}) are "
                         f"not in the artifact store {base}: {exc}") from None

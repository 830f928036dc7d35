"""The storage door: every command opens study storages, and finds artifacts, through here.

A study is an ordinary Optuna study (the contract is :mod:`studies.record`). Decided here, once:

- the URL (:func:`resolve_url`): ``--storage``, else ``$MLBTC_STORAGE``, else
  ``sqlite:///mlbtc.db`` *in the working directory*, for every command (``search`` included;
  a search space's ``storage:`` key counts as its ``--storage``). Why the working directory
  and not beside the YAML file: ``mlbtc studies``, ``pareto``, ``dashboard`` and ``export``
  take no YAML file, so the working directory is the one place every command knows; ``mlbtc
  search X.yaml`` followed by any of them then works without flags.
- opening (:func:`open_storage`): an Optuna ``RDBStorage``. SQLite gets a 60 s busy timeout
  and WAL journaling, so a dashboard reading the file while the search writes it never fails
  with "database is locked" (optuna#820, optuna-dashboard#545); PostgreSQL and MySQL get
  ``pool_pre_ping``. ``postgresql://`` is psycopg 3 under SQLAlchemy 2.1 (a dependency);
  ``postgresql+psycopg2://`` works too. Opening is retried 3 times (two processes creating the
  schema of a new database at once collide; the schema is there on the next try). Read-only
  callers (``create=False``) never create a SQLite file, a directory or tables.
- artifacts (:func:`artifact_dir_for`, :func:`artifact_store`): beside a SQLite file
  (``<db dir>/<db stem>-artifacts/<study>``), else ``$MLBTC_ARTIFACTS/<study>`` or
  ``./mlbtc-artifacts/<study>``; recorded (absolute) in the study's ``mlbtc`` attr.
- :func:`list_studies`, :func:`load_study`, :func:`load_records` for the read commands; an
  unknown study is a :class:`~mlbtc_search.errors.UsageError` that lists the studies there are.

Only Optuna's public storage API is used.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy
from optuna.artifacts import FileSystemArtifactStore
from optuna.storages import BaseStorage, RDBStorage

from mlbtc_search.checks import check_creatable
from mlbtc_search.errors import UsageError

from .record import StudyInfo, TrialRecord, records

log = logging.getLogger(__name__)

STORAGE_ENV = "MLBTC_STORAGE"
ARTIFACTS_ENV = "MLBTC_ARTIFACTS"
DEFAULT_URL = "sqlite:///mlbtc.db"
SQLITE_TIMEOUT_S = 60.0
OPEN_ATTEMPTS = 3


def default_storage_url() -> str:
    """``$MLBTC_STORAGE`` if set, else ``sqlite:///mlbtc.db`` (in the working directory)."""
    return os.environ.get(STORAGE_ENV) or DEFAULT_URL


def resolve_url(url: str | None = None) -> str:
    """``url`` (``--storage``), else :func:`default_storage_url` -- the one precedence rule."""
    return url or default_storage_url()


def mask_url(url: str) -> str:
    """The URL with its password hidden (for messages and logs)."""
    try:
        return sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - not a URL: show it as given
        return url


def sqlite_path(url: str) -> Path | None:
    """The database file of a SQLite URL (None for other backends and in-memory SQLite)."""
    try:
        parsed = sqlalchemy.engine.make_url(url)
    except Exception as exc:  # noqa: BLE001 - sqlalchemy raises several types here
        raise UsageError(f"invalid storage URL {url!r}: {exc} (expected e.g. sqlite:///study.db "
                         "or postgresql://user@host/db)") from None
    if parsed.get_backend_name() != "sqlite":
        return None
    if not parsed.database or parsed.database == ":memory:":
        return None
    return Path(parsed.database)


def _pragmas(wal: bool) -> Any:
    def apply(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout = {int(SQLITE_TIMEOUT_S * 1000)}")
            if wal:
                cursor.execute("PRAGMA journal_mode = WAL")
                cursor.execute("PRAGMA synchronous = NORMAL")
        finally:
            cursor.close()

    return apply


def _engine_kwargs(url: str, db_file: Path | None) -> dict[str, Any]:
    if db_file is not None:
        return {"connect_args": {"timeout": SQLITE_TIMEOUT_S}}
    if url.startswith(("postgresql", "mysql")):
        return {"pool_pre_ping": True}
    return {}


def open_storage(url: str | None = None, create: bool = True) -> RDBStorage:
    """An Optuna ``RDBStorage`` for ``url`` (default :func:`resolve_url`).

    ``create=False`` is read-only use: a SQLite URL must name an existing file (no empty
    database behind a typo), and no tables are created. Problems are one-line UsageErrors.
    """
    url = resolve_url(url)
    db_file = sqlite_path(url)
    if db_file is not None:
        if not create and not db_file.is_file():
            raise UsageError(f"no study database at {db_file} (storage {mask_url(url)}); run "
                             "`mlbtc search` here first, or give --storage URL or set "
                             f"{STORAGE_ENV}")
        if create:
            if not db_file.exists():
                check_creatable(db_file, "storage file")
            _make_dir(db_file.parent)
    kwargs = _engine_kwargs(url, db_file)
    for attempt in range(OPEN_ATTEMPTS):
        try:
            with _quiet():
                storage = RDBStorage(url, engine_kwargs=kwargs, skip_table_creation=not create)
            break
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.OperationalError) as exc:
            # A schema race (see the module doc), or an unreachable server (fails thrice).
            if attempt + 1 == OPEN_ATTEMPTS:
                raise _open_error(url, exc) from None
            time.sleep(0.2 * (attempt + 1))
        except Exception as exc:  # noqa: BLE001 - driver, schema and URL errors: one line
            raise _open_error(url, exc) from None
    if db_file is not None:
        # Connections made by RDBStorage's own setup predate the listener: drop them, so every
        # connection from here on has the busy timeout; WAL is a property of the file.
        sqlalchemy.event.listen(storage.engine, "connect", _pragmas(wal=create))
        storage.engine.dispose()
    return storage


def _make_dir(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create the storage directory {folder}: "
                         f"{exc.strerror or exc}") from None


class _quiet:
    def __enter__(self) -> None:
        self.level = optuna.logging.get_verbosity()
        optuna.logging.set_verbosity(optuna.logging.WARNING)

    def __exit__(self, *exc: Any) -> None:
        optuna.logging.set_verbosity(self.level)


def _open_error(url: str, exc: BaseException) -> UsageError:
    text = str(exc).strip()
    first = text.splitlines()[0][:300] if text else type(exc).__name__
    return UsageError(f"cannot open the storage {mask_url(url)}: {first}")


def storage_label(storage: BaseStorage) -> str:
    """The storage's URL without its password (the class name for non-RDB storages)."""
    if isinstance(storage, RDBStorage):
        return storage.engine.url.render_as_string(hide_password=True)
    return type(storage).__name__


# ---- artifacts ----------------------------------------------------------------------------------
def artifact_dir_for(url: str, study_name: str) -> Path:
    """Where the artifacts (weights, curves) of ``study_name`` in storage ``url`` go, absolute.

    SQLite: ``<db dir>/<db stem>-artifacts/<study>``; other databases: ``$MLBTC_ARTIFACTS/<study>``
    or ``./mlbtc-artifacts/<study>``.
    """
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in study_name) or "study"
    db_file = sqlite_path(url)
    if db_file is not None:
        return (db_file.parent / f"{db_file.stem}-artifacts" / safe).resolve()
    base = os.environ.get(ARTIFACTS_ENV) or "mlbtc-artifacts"
    return (Path(base) / safe).resolve()


def study_info(study: optuna.Study) -> StudyInfo:
    """The study's ``mlbtc`` user attr, decoded."""
    return StudyInfo.from_attrs(study.user_attrs)


def artifact_store(info: StudyInfo | optuna.Study) -> FileSystemArtifactStore:
    """The FileSystemArtifactStore of a study made by ``mlbtc search``."""
    if isinstance(info, optuna.Study):
        name, info = info.study_name, study_info(info)
    else:
        name = "this study"
    if not info.artifact_dir:
        raise UsageError(f"{name!r} records no artifact directory (it was not made by "
                         "mlbtc search)")
    return FileSystemArtifactStore(info.artifact_dir)


def read_artifact(info: StudyInfo, artifact_id: str, what: str) -> bytes:
    """The bytes of artifact ``artifact_id`` of a study (a UsageError if it is not there).

    Only ids recorded in the storage name files, under the study's artifact directory.
    """
    from optuna.artifacts.exceptions import ArtifactNotFound

    if not info.artifact_dir or not Path(info.artifact_dir).is_dir():
        raise UsageError(f"the artifact directory of the study ({info.artifact_dir}) does not "
                         f"exist, so {what} cannot be read")
    safe = artifact_id and all(c.isalnum() or c in "-_." for c in artifact_id)
    if not safe or ".." in artifact_id or len(artifact_id) > 200:
        raise UsageError(f"{what} has no usable artifact id ({artifact_id!r})")
    try:
        with artifact_store(info).open_reader(artifact_id) as f:
            return f.read()
    except (ArtifactNotFound, FileNotFoundError, ValueError) as exc:
        raise UsageError(f"{what} (artifact {artifact_id}) not found in the artifact store "
                         f"{info.artifact_dir}: {exc}") from None


# ---- studies ----------------------------------------------------------------------------------
def study_names(storage: BaseStorage) -> list[str]:
    return sorted(s.study_name for s in storage.get_all_studies())


def load_study(storage: BaseStorage, name: str) -> optuna.Study:
    """Load study ``name``; a missing one is a UsageError listing the studies there are."""
    names = study_names(storage)
    if name not in names:
        there = ", ".join(names) if names else "none"
        raise UsageError(f"no study named {name!r} in this storage; studies: {there}")
    with _quiet():
        return optuna.load_study(study_name=name, storage=storage)


def load_records(study: optuna.Study) -> list[TrialRecord]:
    """Every trial of ``study`` as a record (one storage read)."""
    return records(study.get_trials(deepcopy=False))


def list_studies(storage: BaseStorage) -> list[dict[str, Any]]:
    """One :func:`studies.pareto.study_summary` per study, by name."""
    from .pareto import study_summary

    out = []
    for name in study_names(storage):
        study = load_study(storage, name)
        out.append(study_summary(name, study_info(study), load_records(study)))
    return out


__all__ = [
    "ARTIFACTS_ENV", "DEFAULT_URL", "STORAGE_ENV", "artifact_dir_for", "artifact_store",
    "default_storage_url", "list_studies", "load_records", "load_study", "mask_url",
    "open_storage", "read_artifact", "resolve_url", "sqlite_path", "storage_label",
    "study_info", "study_names",
]

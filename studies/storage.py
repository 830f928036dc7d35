"""Study storage: SQL databases through Optuna's RDBStorage, and each study's artifact store.

A study is an ordinary Optuna study (the STORAGE CONTRACT in ``studies/runner.py``); everything
here is a thin helper over Optuna so the runner, the CLI, export and the dashboard open storages
and find artifacts the same way:

- :func:`default_storage_url` -- ``$MLBTC_STORAGE``, else ``sqlite:///mlbtc.db``.
- :func:`open_storage` -- an ``RDBStorage``. SQLite gets a busy timeout and WAL journaling, so a
  dashboard reading the file while the search writes it never makes either fail with "database
  is locked" (optuna#820, optuna-dashboard#545). PostgreSQL gets ``pool_pre_ping``.
- :func:`artifact_dir_for` -- where a study's weights live: beside a SQLite file
  (``<db dir>/<db stem>-artifacts/<study>``), else ``$MLBTC_ARTIFACTS/<study>`` or
  ``./mlbtc-artifacts/<study>``. The absolute path is recorded in the study's ``mlbtc`` user
  attr, and :func:`artifact_store` reads it back from there.
- :func:`list_studies`, :func:`load_study` -- for ``mlbtc studies`` / ``mlbtc pareto``; an unknown
  study is a :class:`~mlbtc_search.errors.UsageError` that lists the studies there are.

Read-only commands use :func:`open_storage` with ``create=False``, which refuses to create a new
SQLite file for a mistyped path.
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
from optuna.storages import RDBStorage

from mlbtc_search.checks import check_creatable
from mlbtc_search.errors import UsageError

log = logging.getLogger(__name__)

STORAGE_ENV = "MLBTC_STORAGE"
ARTIFACTS_ENV = "MLBTC_ARTIFACTS"
DEFAULT_URL = "sqlite:///mlbtc.db"
SQLITE_TIMEOUT_S = 60.0
OPEN_ATTEMPTS = 3


def default_storage_url() -> str:
    """``$MLBTC_STORAGE`` if set, else ``sqlite:///mlbtc.db`` (in the working directory)."""
    return os.environ.get(STORAGE_ENV) or DEFAULT_URL


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


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute(f"PRAGMA busy_timeout = {int(SQLITE_TIMEOUT_S * 1000)}")
        cursor.execute("PRAGMA journal_mode = WAL")
        cursor.execute("PRAGMA synchronous = NORMAL")
    finally:
        cursor.close()


def open_storage(url: str | None = None, create: bool = True) -> RDBStorage:
    """An Optuna ``RDBStorage`` for ``url`` (default :func:`default_storage_url`).

    With ``create=False`` a SQLite URL must name an existing file (read-only commands must not
    leave an empty database behind a typo). Connection problems are UsageErrors.
    """
    url = url or default_storage_url()
    db_file = sqlite_path(url)
    engine_kwargs: dict[str, Any] = {}
    if db_file is not None:
        if not create and not db_file.is_file():
            raise UsageError(f"no study database at {db_file} (storage {url}); give an existing "
                             "file with --storage or set MLBTC_STORAGE")
        if create:
            if not db_file.exists():
                check_creatable(db_file, "storage file")
            db_file.parent.mkdir(parents=True, exist_ok=True)
        engine_kwargs["connect_args"] = {"timeout": SQLITE_TIMEOUT_S}
    elif url.startswith(("postgresql", "mysql")):
        engine_kwargs["pool_pre_ping"] = True
    for attempt in range(OPEN_ATTEMPTS):
        try:
            storage = RDBStorage(url, engine_kwargs=engine_kwargs)
            break
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.OperationalError) as exc:
            # Two processes creating the schema of a new database at once (a search and a
            # dashboard): the loser's inserts collide; the schema is there on the next try.
            # An unreachable server is an OperationalError too, and fails the same way thrice.
            if attempt + 1 == OPEN_ATTEMPTS:
                raise _open_error(url, exc) from None
            time.sleep(0.2 * (attempt + 1))
        except (sqlalchemy.exc.SQLAlchemyError, ImportError) as exc:
            raise _open_error(url, exc) from None
    if db_file is not None:
        # Connections made by RDBStorage's own setup predate the listener: drop them, so every
        # connection from here on has the busy timeout; WAL is a property of the file.
        sqlalchemy.event.listen(storage.engine, "connect", _sqlite_pragmas)
        storage.engine.dispose()
    return storage


def _open_error(url: str, exc: BaseException) -> UsageError:
    text = str(exc).strip()
    first = text.splitlines()[0] if text else type(exc).__name__
    return UsageError(f"cannot open the storage {mask_url(url)}: {first}")


def artifact_dir_for(url: str, study_name: str) -> Path:
    """Where the artifacts (weights) of ``study_name`` in storage ``url`` go, absolute.

    SQLite: ``<db dir>/<db stem>-artifacts/<study>``; other databases: ``$MLBTC_ARTIFACTS/<study>``
    or ``./mlbtc-artifacts/<study>``.
    """
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in study_name) or "study"
    db_file = sqlite_path(url)
    if db_file is not None:
        return (db_file.parent / f"{db_file.stem}-artifacts" / safe).resolve()
    base = os.environ.get(ARTIFACTS_ENV) or "mlbtc-artifacts"
    return (Path(base) / safe).resolve()


def study_info(study: optuna.Study) -> dict[str, Any]:
    """The study's ``mlbtc`` user attr (space, task, budget, objectives, artifact_dir, ...)."""
    info = study.user_attrs.get("mlbtc")
    return info if isinstance(info, dict) else {}


def artifact_store(study: optuna.Study) -> FileSystemArtifactStore:
    """The FileSystemArtifactStore of a study made by ``mlbtc search``."""
    where = study_info(study).get("artifact_dir")
    if not where:
        raise UsageError(f"study {study.study_name!r} records no artifact directory (it was not "
                         "made by mlbtc search)")
    return FileSystemArtifactStore(str(where))


def study_names(storage: optuna.storages.BaseStorage) -> list[str]:
    return sorted(s.study_name for s in storage.get_all_studies())


def load_study(storage: optuna.storages.BaseStorage, name: str) -> optuna.Study:
    """Load study ``name``; a missing one is a UsageError listing the studies there are."""
    names = study_names(storage)
    if name not in names:
        there = ", ".join(names) if names else "none"
        raise UsageError(f"no study named {name!r} in this storage; studies: {there}")
    return optuna.load_study(study_name=name, storage=storage)


def list_studies(storage: optuna.storages.BaseStorage) -> list[dict[str, Any]]:
    """One summary per study: name, task, trials by state and status, best loss, hypervolume,
    front size and last update (ISO time)."""
    from .pareto import study_summary

    out = []
    for frozen in sorted(storage.get_all_studies(), key=lambda s: s.study_name):
        study = optuna.load_study(study_name=frozen.study_name, storage=storage)
        out.append(study_summary(study))
    return out


__all__ = [
    "ARTIFACTS_ENV", "STORAGE_ENV", "artifact_dir_for", "artifact_store", "default_storage_url",
    "list_studies", "load_study", "mask_url", "open_storage", "sqlite_path", "study_info",
    "study_names",
]

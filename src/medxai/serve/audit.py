"""The service's audit log: one row per request in the table ``audit_log`` of a SQLAlchemy database.

A row says when a request was answered (UTC), its request id, endpoint, HTTP status and outcome (``"ok"`` or the
error code of ``docs/serve.md``), the SHA-256 and byte size of the uploaded input, the model (id, version, backend),
the CAM method of an explanation, the predicted label and probabilities, the domain verdict and the latency. It never
holds an image, a file name, a DICOM tag or any other patient or study identifier, nor the client's IP address: the
schema has no column that could (``tests/test_audit.py`` checks the column names), and the input is known only by its
hash, which identifies a file to whoever already holds it and reveals nothing to anyone else.

The default database is a SQLite file (``RunFolder(run).audit_db_path``, i.e. ``<run>/serve/audit.sqlite``) in WAL
mode, so that ``medxai audit`` can read while the server writes; any SQLAlchemy URL works as well
(``postgresql+psycopg://user@host/db`` after ``pip install psycopg[binary]``).

Writing never blocks a request: :meth:`AuditLog.record` puts the row on a bounded queue that one background thread
writes in batches, one transaction per batch. When the queue is full (the database is slower than the traffic) the
row is dropped, counted in :attr:`AuditLog.dropped` and reported by a rate-limited warning, so that memory stays
bounded and the service keeps answering.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import queue
import re
import threading
import time as time_module
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from medxai.errors import ConfigError

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = [
    "AUDIT_COLUMNS",
    "EXPORT_FORMATS",
    "AuditEntry",
    "AuditLog",
    "audit_url",
    "export_audit",
    "read_audit",
    "summarize_audit",
]

logger = logging.getLogger(__name__)

TABLE_NAME = "audit_log"
QUEUE_SIZE = 10_000  # rows waiting for the writer at most; beyond that they are dropped and counted
BATCH_SIZE = 256  # rows per transaction at most
BUSY_TIMEOUT_MS = 5_000  # SQLite: how long a writer or reader waits for the other's lock before failing
WARNING_INTERVAL_S = 60.0  # at most one warning about dropped or failed rows per interval
EXPORT_FORMATS = ("csv", "json", "jsonl")

# pip packages of the DBAPI drivers a user is likely to name in a URL (SQLAlchemy's driver name -> package)
_DRIVER_PACKAGES = {
    "psycopg": "psycopg[binary]",
    "psycopg2": "psycopg2-binary",
    "pg8000": "pg8000",
    "pymysql": "pymysql",
    "mysqldb": "mysqlclient",
    "oracledb": "oracledb",
    "pyodbc": "pyodbc",
}
_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")


class _UtcTimestamp(sa.types.TypeDecorator):
    """A timezone-aware UTC time on every database.

    PostgreSQL keeps it as ``timestamptz``. SQLite has no time type: SQLAlchemy stores the wall time as fixed-width text
    (``YYYY-MM-DD HH:MM:SS.ffffff``) and drops the zone, so the time is converted to UTC before it is stored and UTC is
    attached again on reading; text order is then time order, which the index and ``since`` filters rely on.
    """

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"audit times must be timezone-aware, got {value!r}")
        value = value.astimezone(timezone.utc)
        return value if dialect.name == "postgresql" else value.replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


_METADATA = sa.MetaData()
AUDIT_TABLE = sa.Table(
    TABLE_NAME,
    _METADATA,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("time", _UtcTimestamp(), nullable=False, index=True),
    sa.Column("request_id", sa.String(64), nullable=False),
    sa.Column("endpoint", sa.String(16), nullable=False),
    sa.Column("status", sa.Integer, nullable=False),
    sa.Column("outcome", sa.String(32), nullable=False),
    sa.Column("input_sha256", sa.String(64)),
    sa.Column("input_bytes", sa.BigInteger),
    sa.Column("model_id", sa.String(256)),
    sa.Column("model_version", sa.String(64)),
    sa.Column("backend", sa.String(32)),
    sa.Column("cam_method", sa.String(32)),
    sa.Column("label", sa.String(256)),
    sa.Column("probabilities", sa.Text),
    sa.Column("in_domain", sa.Boolean),
    sa.Column("domain_score", sa.Float),
    sa.Column("latency_ms", sa.Float),
)
#: The columns of ``audit_log``, in order: the whole of what is recorded about a request.
AUDIT_COLUMNS = tuple(column.name for column in AUDIT_TABLE.columns)


def _utc_now() -> datetime:
    return datetime.now(timezone.utc)


@dataclass(kw_only=True)
class AuditEntry:
    """What is recorded about one request (``None``: not known, or not applicable to this request).

    Attributes:
        request_id: the id the response carries (``request_id``), so that a row and a response can be matched.
        endpoint: ``"predict"`` or ``"explain"``.
        status: the HTTP status answered.
        outcome: ``"ok"``, or the error code of the response (``"invalid_image"``, ``"queue_full"``, ``"timeout"``,
            ``"unauthorized"``...).
        input_sha256: the SHA-256 of the uploaded bytes as 64 lower-case hex digits; ``None`` when no input was read.
        input_bytes: the size of the upload in bytes.
        model_id: the run folder's name (``"demo"``).
        model_version: the first 12 hex digits of the weights' SHA-256.
        backend: ``"torch"`` or ``"onnxruntime"``.
        cam_method: the CAM method of an explanation (``"gradcam"``); ``None`` for predict.
        label: the label the decision rule reported.
        probabilities: label name -> calibrated probability; stored as JSON text (a non-finite value as ``null``).
        in_domain: the domain guard's verdict; ``None`` for a run without a guard.
        domain_score: the domain guard's score; ``None`` for a run without a guard.
        latency_ms: from the request's arrival to its answer, in milliseconds.
        time: when the request was answered, timezone-aware (default: now, in UTC); stored in UTC.
    """

    request_id: str
    endpoint: str
    status: int
    outcome: str = "ok"
    input_sha256: str | None = None
    input_bytes: int | None = None
    model_id: str | None = None
    model_version: str | None = None
    backend: str | None = None
    cam_method: str | None = None
    label: str | None = None
    probabilities: Mapping[str, float] | None = None
    in_domain: bool | None = None
    domain_score: float | None = None
    latency_ms: float | None = None
    time: datetime = field(default_factory=_utc_now)


def _finite_or_none(value: float | None) -> float | None:
    """A float for the database; ``None`` for ``None`` and for NaN or infinity, which JSON cannot carry."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _row(entry: AuditEntry) -> dict[str, Any]:
    """``entry`` as a row of ``audit_log`` (every column but ``id``), checked against the schema.

    Raises:
        ValueError: a naive time, an ``input_sha256`` that is not 64 hex digits, or a text longer than its column.
    """
    if entry.time.tzinfo is None:
        raise ValueError(f"AuditEntry.time must be timezone-aware, got {entry.time!r}")
    sha256 = None if entry.input_sha256 is None else str(entry.input_sha256).lower()
    if sha256 is not None and not _SHA256_HEX.match(sha256):
        raise ValueError("AuditEntry.input_sha256 must be a SHA-256 as 64 hex digits")
    probabilities = None
    if entry.probabilities is not None:
        probabilities = json.dumps(
            {str(name): _finite_or_none(value) for name, value in entry.probabilities.items()}, allow_nan=False
        )
    row = {
        "time": entry.time.astimezone(timezone.utc),
        "request_id": str(entry.request_id),
        "endpoint": str(entry.endpoint),
        "status": int(entry.status),
        "outcome": str(entry.outcome),
        "input_sha256": sha256,
        "input_bytes": None if entry.input_bytes is None else int(entry.input_bytes),
        "model_id": None if entry.model_id is None else str(entry.model_id),
        "model_version": None if entry.model_version is None else str(entry.model_version),
        "backend": None if entry.backend is None else str(entry.backend),
        "cam_method": None if entry.cam_method is None else str(entry.cam_method),
        "label": None if entry.label is None else str(entry.label),
        "probabilities": probabilities,
        "in_domain": None if entry.in_domain is None else bool(entry.in_domain),
        "domain_score": _finite_or_none(entry.domain_score),
        "latency_ms": _finite_or_none(entry.latency_ms),
    }
    # SQLite ignores VARCHAR lengths and PostgreSQL rejects the whole batch: check here, where the caller learns of it
    for column in AUDIT_TABLE.columns:
        length = getattr(column.type, "length", None)
        value = row.get(column.name)
        if length is not None and isinstance(value, str) and len(value) > length:
            raise ValueError(f"AuditEntry.{column.name} has {len(value)} characters; the column holds {length}")
    return row


# -- the database ---------------------------------------------------------------------------------------------------
def audit_url(value: str | os.PathLike[str]) -> str:
    """The SQLAlchemy URL of an audit database given as a URL or as the path of a SQLite file.

    A value with ``://`` is a URL and is returned unchanged (``postgresql+psycopg://user@host/db``,
    ``sqlite:///runs/demo/serve/audit.sqlite``); anything else is a file path, made absolute:
    ``runs/demo/serve/audit.sqlite`` -> ``sqlite:////abs/runs/demo/serve/audit.sqlite``.
    """
    text = os.fspath(value)
    if "://" in text:
        return text
    return f"sqlite:///{Path(text).expanduser().resolve()}"


def _display(url: sa.URL) -> str:
    """The URL as it may appear in a message or a log: without its password."""
    return url.render_as_string(hide_password=True)


def _parse(value: str | os.PathLike[str]) -> sa.URL:
    text = audit_url(value)
    try:
        return sa.make_url(text)
    except sa.exc.ArgumentError:
        scheme = text.split("://", 1)[0]
        # the text itself is not repeated: an unparsable URL may still hold a password
        raise ConfigError(
            f"audit database: not a valid SQLAlchemy URL (scheme {scheme!r}); give a SQLite file path or a URL such "
            "as postgresql+psycopg://user@host/db"
        ) from None


def _sqlite_file(url: sa.URL) -> Path | None:
    """The file of a SQLite URL; ``None`` for other databases. An in-memory database is refused: it would vanish."""
    if url.get_backend_name() != "sqlite":
        return None
    if not url.database or url.database == ":memory:" or url.database.startswith("file::memory:"):
        raise ConfigError("audit database: an in-memory SQLite database would be lost; give a file path")
    return Path(url.database)


def _create_engine(url: sa.URL, *, writing: bool) -> sa.Engine:
    """An engine for ``url``; for SQLite with a busy timeout on every connection and, for the writer, WAL mode.

    Raises:
        ConfigError: an unknown database, or a driver that is not installed (with the ``pip install`` that fixes it).
    """
    try:
        engine = sa.create_engine(url, pool_pre_ping=url.get_backend_name() != "sqlite")
    except sa.exc.NoSuchModuleError:
        raise ConfigError(
            f"audit database {_display(url)}: SQLAlchemy has no dialect {url.drivername!r}"
        ) from None
    except ImportError as error:
        try:
            driver = url.get_dialect().driver
        except Exception:  # noqa: BLE001 - only for the hint; the import error is what matters
            driver = error.name or url.get_driver_name()
        package = _DRIVER_PACKAGES.get(driver, error.name or driver)
        raise ConfigError(
            f"audit database {_display(url)}: its driver {driver!r} is not installed: pip install {package}"
        ) from None
    if url.get_backend_name() == "sqlite":

        @sa.event.listens_for(engine, "connect")
        def _configure_sqlite(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            try:
                cursor.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
                if writing:
                    # persistent in the file: readers (medxai audit) no longer block the writer, nor it them
                    mode = cursor.execute("PRAGMA journal_mode = WAL").fetchone()[0]
                    if str(mode).lower() != "wal":
                        logger.warning("audit database %s: WAL mode unavailable (journal mode %s)", _display(url), mode)
            finally:
                cursor.close()

    return engine


def _database_error(url: sa.URL, error: sa.exc.SQLAlchemyError) -> ConfigError:
    reason = getattr(error, "orig", None) or error
    return ConfigError(f"audit database {_display(url)}: {reason}")


# -- writing --------------------------------------------------------------------------------------------------------
class _Throttle:
    """Says when a repeated warning is due again: the first time, then at most once per ``interval`` seconds."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._last = -math.inf

    def due(self) -> bool:
        now = time_module.monotonic()
        if now - self._last < self.interval:
            return False
        self._last = now
        return True


_STOP = object()  # put on the queue by close(), after every accepted row


class AuditLog:
    """The writer of the audit log: :meth:`record` is non-blocking; one background thread writes in batches.

    Args:
        url: a SQLAlchemy URL, or the path of a SQLite file (created, with its folder, when absent).
        queue_size: rows waiting to be written at most; a row recorded while the queue is full is dropped.
        batch_size: rows per transaction at most.

    Attributes:
        url: the database URL (a SQLite path made into one).
        dropped: rows not recorded because the queue was full or the log already closed.
        failed: rows that could not be written (the database unreachable, or refusing a row's values).

    Raises:
        ConfigError: the database cannot be opened or its table created, or its driver is not installed.

    Use it as a context manager, or call :meth:`close`: rows still queued at exit are lost otherwise (the thread is
    a daemon, so that a forgotten log never keeps the process alive).
    """

    def __init__(self, url: str | os.PathLike[str], *, queue_size: int = QUEUE_SIZE, batch_size: int = BATCH_SIZE):
        if queue_size < 1 or batch_size < 1:
            raise ConfigError(f"audit log: queue_size and batch_size must be >= 1, got {queue_size}, {batch_size}")
        parsed = _parse(url)
        self.url = audit_url(url)
        self._display_url = _display(parsed)
        self._batch_size = batch_size
        database_file = _sqlite_file(parsed)
        if database_file is not None:
            database_file.parent.mkdir(parents=True, exist_ok=True)
        self._engine = _create_engine(parsed, writing=True)
        try:
            _METADATA.create_all(self._engine)
        except sa.exc.SQLAlchemyError as error:
            self._engine.dispose()
            raise _database_error(parsed, error) from None
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=queue_size)
        self._accept_lock = threading.Lock()  # makes "put on the queue" and "count it" one step, and close() final
        self._progress = threading.Condition()  # the writer notifies it after each batch
        self._accepted = 0  # rows put on the queue
        self._finished = 0  # rows the writer is done with: written or failed
        self._closed = False
        self.dropped = 0
        self.failed = 0
        self._drop_warning = _Throttle(WARNING_INTERVAL_S)
        self._dropped_unreported = 0
        self._failure_warning = _Throttle(WARNING_INTERVAL_S)
        self._thread = threading.Thread(target=self._write_forever, name="medxai-audit-writer", daemon=True)
        self._thread.start()

    # the request path ------------------------------------------------------------------------------------------------
    def record(self, entry: AuditEntry) -> None:
        """Queue ``entry`` for writing and return at once; drop and count it when the queue is full.

        Raises:
            ValueError: the entry breaks the schema (a naive time, a malformed SHA-256, a text too long).
        """
        row = _row(entry)
        with self._accept_lock:
            if not self._closed:
                try:
                    self._queue.put_nowait(row)
                except queue.Full:
                    pass
                else:
                    self._accepted += 1
                    return
            self.dropped += 1
            self._dropped_unreported += 1
            if not self._drop_warning.due():
                return
            newly_dropped, self._dropped_unreported = self._dropped_unreported, 0
            total, closed = self.dropped, self._closed
        reason = "the log is closed" if closed else f"the writer is behind ({self._queue.maxsize} rows queued)"
        logger.warning(
            "audit log %s: %d request(s) not recorded because %s; %d dropped in all",
            self._display_url, newly_dropped, reason, total,
        )

    # the writer thread -----------------------------------------------------------------------------------------------
    def _write_forever(self) -> None:
        stop = False
        while not stop:
            item = self._queue.get()
            if item is _STOP:
                break
            batch = [item]
            while len(batch) < self._batch_size:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is _STOP:
                    stop = True
                    break
                batch.append(item)
            self._write(batch)
            with self._progress:
                self._finished += len(batch)
                self._progress.notify_all()

    def _write(self, batch: list[dict[str, Any]]) -> None:
        """Insert ``batch`` in one transaction. Should the database refuse a row's values (an integrity or data error),
        retry row by row, so that one bad row costs only itself; any other failure (the database unreachable) costs
        the batch, without a connection attempt per row."""
        try:
            self._insert(batch)
            return
        except Exception as error:  # noqa: BLE001 - the writer thread must outlive any database failure
            first_error: Exception = error
        failed = len(batch)
        if len(batch) > 1 and isinstance(first_error, (sa.exc.IntegrityError, sa.exc.DataError)):
            failed = 0
            for row in batch:
                try:
                    self._insert([row])
                except Exception as error:  # noqa: BLE001 - as above
                    first_error = error
                    failed += 1
        if not failed:
            return
        self.failed += failed
        if self._failure_warning.due():
            logger.error(
                "audit log %s: could not write %d row(s) (%d in all): %s",
                self._display_url, failed, self.failed, getattr(first_error, "orig", None) or first_error,
            )

    def _insert(self, rows: list[dict[str, Any]]) -> None:
        with self._engine.begin() as connection:
            connection.execute(sa.insert(AUDIT_TABLE), rows)

    # waiting and closing ---------------------------------------------------------------------------------------------
    @property
    def pending(self) -> int:
        """Rows accepted and not yet written (or failed)."""
        with self._progress:
            return self._accepted - self._finished

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every row recorded before this call is written (or has failed).

        Args:
            timeout: seconds to wait at most; ``None``: as long as it takes.

        Returns:
            whether everything was written in time.
        """
        with self._accept_lock:
            target = self._accepted
        with self._progress:
            return self._progress.wait_for(
                lambda: self._finished >= target or not self._thread.is_alive(), timeout
            ) and self._finished >= target

    def close(self, timeout: float | None = 30.0) -> None:
        """Stop accepting rows, write those queued, stop the writer and release the database.

        Args:
            timeout: seconds to wait for the queued rows at most; rows still unwritten then are reported as lost.
        """
        with self._accept_lock:
            if self._closed:
                return
            self._closed = True
        deadline = None if timeout is None else time_module.monotonic() + timeout
        try:
            self._queue.put(_STOP, timeout=timeout)  # waits only while the queue is full, i.e. the writer is busy
        except queue.Full:
            pass
        self._thread.join(None if deadline is None else max(0.0, deadline - time_module.monotonic()))
        if self._thread.is_alive():
            logger.error(
                "audit log %s: %d row(s) not written within %.0f s of closing", self._display_url, self.pending, timeout
            )
        else:
            self._engine.dispose()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


# -- reading --------------------------------------------------------------------------------------------------------
@contextmanager
def _reading(value: str | os.PathLike[str]) -> Iterator[sa.Connection]:
    """A connection to an existing audit database.

    Raises:
        ConfigError: no such SQLite file, no ``audit_log`` table, an unreachable database or a missing driver.
    """
    url = _parse(value)
    database_file = _sqlite_file(url)
    if database_file is not None and not database_file.is_file():
        raise ConfigError(f"no audit database at {database_file} (the service creates it on its first start)")
    engine = _create_engine(url, writing=False)
    try:
        with engine.connect() as connection:
            if not sa.inspect(connection).has_table(TABLE_NAME):
                raise ConfigError(f"audit database {_display(url)} has no table {TABLE_NAME!r}: not a medxai audit log")
            yield connection
    except sa.exc.SQLAlchemyError as error:
        raise _database_error(url, error) from None
    finally:
        engine.dispose()


def _as_utc(since: datetime | str) -> datetime:
    """``since`` as an aware UTC time; a naive time, or ISO text without a zone, is taken to be UTC."""
    if isinstance(since, str):
        try:
            since = datetime.fromisoformat(since)
        except ValueError:
            raise ConfigError(f"since: not an ISO 8601 time: {since!r}") from None
    if since.tzinfo is None:
        since = since.replace(tzinfo=timezone.utc)
    return since.astimezone(timezone.utc)


def _plain(row: Mapping[str, Any]) -> dict[str, Any]:
    """A database row as a plain dict of the columns; the time as ISO 8601 text with its zone (``+00:00``)."""
    plain = {name: row[name] for name in AUDIT_COLUMNS}
    plain["time"] = plain["time"].isoformat(timespec="microseconds")
    return plain


def _iter_audit(
    value: str | os.PathLike[str], *, limit: int | None, since: datetime | str | None, outcome: str | None
) -> Iterator[dict[str, Any]]:
    """The selected rows, oldest first; streamed from the database unless ``limit`` asks for the newest few."""
    if limit is not None and limit < 0:
        raise ConfigError(f"limit must be >= 0, got {limit}")
    statement = sa.select(AUDIT_TABLE)
    if since is not None:
        statement = statement.where(AUDIT_TABLE.c.time >= _as_utc(since))
    if outcome is not None:
        statement = statement.where(AUDIT_TABLE.c.outcome == outcome)
    with _reading(value) as connection:
        if limit is None:
            ordered = statement.order_by(AUDIT_TABLE.c.time, AUDIT_TABLE.c.id)
            for row in connection.execution_options(yield_per=1000).execute(ordered).mappings():
                yield _plain(row)
        else:
            newest = statement.order_by(AUDIT_TABLE.c.time.desc(), AUDIT_TABLE.c.id.desc()).limit(limit)
            rows = [_plain(row) for row in connection.execute(newest).mappings()]
            yield from reversed(rows)


def read_audit(
    url: str | os.PathLike[str],
    *,
    limit: int | None = None,
    since: datetime | str | None = None,
    outcome: str | None = None,
) -> list[dict[str, Any]]:
    """Rows of the audit log, newest last.

    Args:
        url: a SQLAlchemy URL or the path of a SQLite file.
        limit: only the newest ``limit`` rows.
        since: only rows at or after this time (a naive time, or ISO text without a zone, is UTC).
        outcome: only rows with this outcome (``"ok"``, ``"invalid_image"``...).

    Returns:
        one dict per row with the keys :data:`AUDIT_COLUMNS`, values as stored: ``time`` as ISO 8601 text in UTC
        (``2026-05-09T07:35:25.123456+00:00``), ``probabilities`` as JSON text, ``None`` for what was not known.

    Raises:
        ConfigError: no such SQLite file (named), not an audit log, an unreachable database or a missing driver.
    """
    return list(_iter_audit(url, limit=limit, since=since, outcome=outcome))


def _csv_value(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return value


def export_audit(
    url: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    format: str = "csv",  # the name of the CLI option it serves
    *,
    limit: int | None = None,
    since: datetime | str | None = None,
    outcome: str | None = None,
) -> int:
    """Write the audit log (or the rows :func:`read_audit` would select) to a file, oldest first.

    Args:
        url: a SQLAlchemy URL or the path of a SQLite file.
        out_path: the file to write; its folder is created. It is replaced only once the export is complete.
        format: ``"csv"`` (a header of :data:`AUDIT_COLUMNS`; empty for ``None``, ``true``/``false`` for the domain
            flag), ``"json"`` (one list of objects) or ``"jsonl"`` (one object per line).
        limit, since, outcome: as for :func:`read_audit`.

    Returns:
        the number of rows written.

    Raises:
        ConfigError: an unknown format, or as for :func:`read_audit`.
    """
    if format not in EXPORT_FORMATS:
        raise ConfigError(f"audit export format {format!r}: choose one of {', '.join(EXPORT_FORMATS)}")
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    partial = out_path.with_name(f".{out_path.name}.partial")
    count = 0
    rows = _iter_audit(url, limit=limit, since=since, outcome=outcome)
    try:
        with partial.open("w", encoding="utf-8", newline="") as stream:
            if format == "csv":
                writer = csv.DictWriter(stream, fieldnames=AUDIT_COLUMNS)
                writer.writeheader()
                for row in rows:
                    writer.writerow({name: _csv_value(value) for name, value in row.items()})
                    count += 1
            elif format == "json":
                stream.write("[")
                for row in rows:
                    stream.write(("\n" if count == 0 else ",\n") + json.dumps(row, allow_nan=False))
                    count += 1
                stream.write("\n]\n" if count else "]\n")
            else:
                for row in rows:
                    stream.write(json.dumps(row, allow_nan=False) + "\n")
                    count += 1
        os.replace(partial, out_path)
    finally:
        partial.unlink(missing_ok=True)
    return count


# -- summary --------------------------------------------------------------------------------------------------------
def _percentile(ordered: list[float], percent: float) -> float:
    """Linear interpolation between the two nearest ranks (NumPy's default, Hyndman and Fan's type 7)."""
    position = (len(ordered) - 1) * percent / 100.0
    lower = math.floor(position)
    upper = min(lower + 1, len(ordered) - 1)
    return ordered[lower] + (ordered[upper] - ordered[lower]) * (position - lower)


def summarize_audit(rows: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """What ``medxai audit`` prints about a set of rows (as :func:`read_audit` returns them).

    Returns:
        ``count``; ``first`` and ``last`` time (``None`` without rows); ``by_endpoint`` and ``by_outcome``: rows per
        value; ``by_endpoint_outcome``: endpoint -> outcome -> rows; ``latency_ms``: ``count``, ``p50``, ``p95`` of
        the rows with a latency (linear interpolation between ranks; ``None`` without any); ``domain``: ``judged``
        (rows with a domain verdict), ``out_of_domain`` and ``out_of_domain_share`` (of those judged; ``None`` when
        none was).
    """
    rows = list(rows)
    by_endpoint_outcome: dict[str, Counter[str]] = {}
    for row in rows:
        by_endpoint_outcome.setdefault(row["endpoint"], Counter())[row["outcome"]] += 1
    latencies = sorted(float(row["latency_ms"]) for row in rows if row.get("latency_ms") is not None)
    verdicts = [row["in_domain"] for row in rows if row.get("in_domain") is not None]
    out_of_domain = sum(1 for verdict in verdicts if not verdict)
    times = [row["time"] for row in rows if row.get("time") is not None]
    return {
        "count": len(rows),
        "first": min(times) if times else None,
        "last": max(times) if times else None,
        "by_endpoint": dict(sorted(Counter(row["endpoint"] for row in rows).items())),
        "by_outcome": dict(sorted(Counter(row["outcome"] for row in rows).items())),
        "by_endpoint_outcome": {
            endpoint: dict(sorted(outcomes.items())) for endpoint, outcomes in sorted(by_endpoint_outcome.items())
        },
        "latency_ms": {
            "count": len(latencies),
            "p50": _percentile(latencies, 50) if latencies else None,
            "p95": _percentile(latencies, 95) if latencies else None,
        },
        "domain": {
            "judged": len(verdicts),
            "out_of_domain": out_of_domain,
            "out_of_domain_share": out_of_domain / len(verdicts) if verdicts else None,
        },
    }

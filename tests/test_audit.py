"""The audit log (``medxai.serve.audit``): every row lands once with its values, nothing blocks, nothing identifies."""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import sqlite3
import sys
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from medxai.errors import ConfigError
from medxai.serve.audit import (
    AUDIT_COLUMNS,
    AuditEntry,
    AuditLog,
    audit_url,
    export_audit,
    read_audit,
    summarize_audit,
)

# The documented record of a request (docs/serve.md, the module docstring): nothing else may be stored.
DOCUMENTED_COLUMNS = (
    "id", "time", "request_id", "endpoint", "status", "outcome", "input_sha256", "input_bytes", "model_id",
    "model_version", "backend", "cam_method", "label", "probabilities", "in_domain", "domain_score", "latency_ms",
)
START = datetime(2026, 3, 1, 12, 0, 0, tzinfo=timezone.utc)
PLUS_TWO = timezone(timedelta(hours=2))


def make_entry(thread: int, index: int) -> AuditEntry:
    """A hand-built entry in which every field depends on (thread, index), some of them ``None``."""
    explain = index % 2 == 1
    failed = index % 5 == 4
    return AuditEntry(
        request_id=f"req-{thread}-{index}",
        endpoint="explain" if explain else "predict",
        status=400 if failed else 200,
        outcome="invalid_image" if failed else "ok",
        input_sha256=None if index % 7 == 6 else f"{thread:02x}{index:06x}".ljust(64, "a"),
        input_bytes=None if index % 7 == 6 else 1000 * thread + index,
        model_id=f"demo-{thread}",
        model_version="0.1.0",
        backend="torch" if thread % 2 == 0 else "onnxruntime",
        cam_method="gradcam++" if explain else None,
        label=None if failed else ("pneumonia" if index % 3 else "normal"),
        probabilities=None if failed else {"normal": index / 1000, "pneumonia": 1 - index / 1000},
        in_domain=None if index % 4 == 3 else index % 4 != 0,
        domain_score=None if index % 4 == 3 else index * 0.125 - 3.0,
        latency_ms=0.5 + index + thread / 10,
        # a zone other than UTC: the log must store and return the same instant in UTC
        time=(START + timedelta(seconds=index, microseconds=thread)).astimezone(PLUS_TWO),
    )


def expected_row(entry: AuditEntry) -> dict:
    """What reading ``entry`` back must give, every column but ``id``."""
    row = dataclasses.asdict(entry)
    row["time"] = entry.time.astimezone(timezone.utc).isoformat(timespec="microseconds")
    return row


def assert_row_matches(row: dict, entry: AuditEntry) -> None:
    expected = expected_row(entry)
    assert set(row) == set(DOCUMENTED_COLUMNS)
    probabilities = row["probabilities"]
    assert (None if probabilities is None else json.loads(probabilities)) == expected.pop("probabilities")
    for name, value in expected.items():
        assert row[name] == value, (name, row[name], value)
        assert type(row[name]) is type(value), (name, type(row[name]), type(value))


def write_entries(database: Path, entries: list[AuditEntry]) -> None:
    with AuditLog(database) as log:
        for entry in entries:
            log.record(entry)
        assert log.flush(timeout=30)


# -- the schema -----------------------------------------------------------------------------------------------------
def test_columns_are_exactly_the_documented_set(tmp_path):
    database = tmp_path / "audit.sqlite"
    write_entries(database, [make_entry(0, 0)])
    with sqlite3.connect(database) as connection:
        table = connection.execute("PRAGMA table_info(audit_log)").fetchall()
        indexes = connection.execute("PRAGMA index_list(audit_log)").fetchall()
        indexed = {connection.execute(f"PRAGMA index_info({index[1]})").fetchone()[2] for index in indexes}
        tables = {name for (name,) in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert tuple(column[1] for column in table) == DOCUMENTED_COLUMNS == AUDIT_COLUMNS
    assert tables == {"audit_log"}
    assert "time" in indexed
    # no column could hold an image: nothing binary, and only the probabilities are unbounded text (JSON of floats)
    types = {column[1]: column[2].upper() for column in table}
    assert not [name for name, kind in types.items() if "BLOB" in kind or "BINARY" in kind]
    assert [name for name, kind in types.items() if kind == "TEXT"] == ["probabilities"]
    # nor a file name, a DICOM tag, a patient or study identifier or the client's address
    for forbidden in ("image", "file", "name", "path", "dicom", "tag", "patient", "study", "series", "ip", "client"):
        assert not [name for name in DOCUMENTED_COLUMNS if forbidden in name.split("_")], forbidden
    assert [field.name for field in dataclasses.fields(AuditEntry)] == [
        name for name in DOCUMENTED_COLUMNS if name not in ("id", "time")
    ] + ["time"]


def test_entry_that_could_smuggle_a_file_name_is_refused(tmp_path):
    with AuditLog(tmp_path / "audit.sqlite") as log:
        with pytest.raises(ValueError, match="SHA-256"):
            log.record(AuditEntry(request_id="r", endpoint="predict", status=200, input_sha256="chest_PAT123.dcm"))
        with pytest.raises(ValueError, match="timezone-aware"):
            log.record(AuditEntry(request_id="r", endpoint="predict", status=200, time=datetime(2026, 1, 1)))
        with pytest.raises(ValueError, match="label has 300 characters"):
            log.record(AuditEntry(request_id="r", endpoint="predict", status=200, label="x" * 300))
        assert log.flush(timeout=10)
    assert read_audit(tmp_path / "audit.sqlite") == []


def test_non_finite_numbers_are_stored_as_null(tmp_path):
    entry = AuditEntry(
        request_id="r", endpoint="predict", status=200, probabilities={"a": float("nan"), "b": 1.0},
        domain_score=float("inf"), latency_ms=float("nan"), input_sha256="AB" * 32,
    )
    write_entries(tmp_path / "audit.sqlite", [entry])
    (row,) = read_audit(tmp_path / "audit.sqlite")
    assert json.loads(row["probabilities"]) == {"a": None, "b": 1.0}
    assert row["domain_score"] is None and row["latency_ms"] is None
    assert row["input_sha256"] == "ab" * 32


# -- writing --------------------------------------------------------------------------------------------------------
def test_records_from_many_threads_land_exactly_once_with_their_values(tmp_path):
    database = tmp_path / "serve" / "audit.sqlite"  # the folder does not exist yet
    threads, per_thread = 8, 150
    entries = {(thread, index): make_entry(thread, index) for thread in range(threads) for index in range(per_thread)}
    start = threading.Barrier(threads)
    with AuditLog(database, batch_size=64) as log:

        def produce(thread: int) -> None:
            start.wait()
            for index in range(per_thread):
                log.record(entries[thread, index])

        workers = [threading.Thread(target=produce, args=(thread,)) for thread in range(threads)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        assert log.flush(timeout=30)
        assert log.pending == 0 and log.dropped == 0 and log.failed == 0
    rows = read_audit(database)
    assert len(rows) == threads * per_thread
    by_request = {row["request_id"]: row for row in rows}
    assert len(by_request) == len(rows)  # each exactly once
    for (thread, index), entry in entries.items():
        assert_row_matches(by_request[f"req-{thread}-{index}"], entry)
    assert sorted(row["id"] for row in rows) == list(range(1, len(rows) + 1))
    assert [row["time"] for row in rows] == sorted(row["time"] for row in rows)  # newest last


def test_queue_full_drops_and_counts_without_blocking(tmp_path, monkeypatch, caplog):
    database = tmp_path / "audit.sqlite"
    inserting, release = threading.Event(), threading.Event()
    with AuditLog(database, queue_size=4) as log:
        real_insert = log._insert

        def held_insert(rows):  # the database stalls until the test releases it
            inserting.set()
            assert release.wait(timeout=30)
            real_insert(rows)

        monkeypatch.setattr(log, "_insert", held_insert)
        try:
            log.record(make_entry(0, 0))
            assert inserting.wait(timeout=10)  # the writer holds that row and is stuck in the database
            caplog.set_level(logging.WARNING, logger="medxai.serve.audit")
            began = time.perf_counter()
            for index in range(1, 5):  # fills the queue
                log.record(make_entry(0, index))
            for index in range(5, 25):  # each dropped at once
                log.record(make_entry(0, index))
            elapsed = time.perf_counter() - began
            assert elapsed < 0.5, f"record() blocked for {elapsed:.3f} s"
            assert log.dropped == 20
            assert log.pending == 5
            warnings = [record for record in caplog.records if record.levelno == logging.WARNING]
            assert len(warnings) == 1  # rate-limited: one warning for the burst, not twenty
            assert "not recorded" in warnings[0].getMessage()
        finally:
            release.set()  # also when an assertion failed, so that closing the log does not wait for the stall
        assert log.flush(timeout=30)
        assert log.dropped == 20 and log.failed == 0
    assert sorted(row["request_id"] for row in read_audit(database)) == sorted(f"req-0-{i}" for i in range(5))


def test_close_writes_everything_and_later_records_are_counted_as_dropped(tmp_path):
    database = tmp_path / "audit.sqlite"
    log = AuditLog(database, batch_size=7)
    for index in range(100):
        log.record(make_entry(1, index))
    log.close()  # no flush before: close itself must write what was queued
    assert not log._thread.is_alive()
    log.record(make_entry(1, 100))
    assert log.dropped == 1
    assert log.flush(timeout=1)
    log.close()  # a second close is harmless
    assert len(read_audit(database)) == 100


def test_a_failing_database_costs_the_rows_but_not_the_writer(tmp_path, monkeypatch):
    database = tmp_path / "audit.sqlite"
    with AuditLog(database) as log:
        real_insert = log._insert
        calls = []

        def failing_once(rows):
            calls.append(len(rows))
            if len(calls) == 1:
                raise RuntimeError("database unavailable")
            real_insert(rows)

        monkeypatch.setattr(log, "_insert", failing_once)
        log.record(make_entry(2, 0))
        assert log.flush(timeout=10)
        assert log.failed == 1
        log.record(make_entry(2, 1))
        assert log.flush(timeout=10)
        assert log.failed == 1
    assert [row["request_id"] for row in read_audit(database)] == ["req-2-1"]


def test_reading_while_writing_on_sqlite_uses_wal(tmp_path):
    database = tmp_path / "audit.sqlite"
    with AuditLog(database) as log:
        log.record(make_entry(3, 0))
        assert log.flush(timeout=10)
        with sqlite3.connect(database) as probe:
            assert probe.execute("PRAGMA journal_mode").fetchone()[0] == "wal"

        # a reader holding a snapshot open does not stop the writer (with a rollback journal, its shared lock would)
        reader = sqlite3.connect(database, isolation_level=None, timeout=0)
        reader.execute("BEGIN")
        assert reader.execute("SELECT count(*) FROM audit_log").fetchone()[0] == 1
        for index in range(1, 51):
            log.record(make_entry(3, index))
        assert log.flush(timeout=10)
        assert log.failed == 0
        assert reader.execute("SELECT count(*) FROM audit_log").fetchone()[0] == 1  # its snapshot
        reader.execute("COMMIT")
        assert reader.execute("SELECT count(*) FROM audit_log").fetchone()[0] == 51
        reader.close()

        # read_audit polling while another thread records: every read succeeds and sees a growing log
        done = threading.Event()

        def produce() -> None:
            for index in range(51, 1051):
                log.record(make_entry(3, index))
                if index % 50 == 0:
                    time.sleep(0.002)  # let batches commit between reads
            done.set()

        counts = []
        producer = threading.Thread(target=produce)
        producer.start()
        while not done.is_set() or len(counts) < 3:
            counts.append(len(read_audit(database)))
        producer.join()
        assert log.flush(timeout=30)
        assert log.failed == 0
    assert counts == sorted(counts) and counts[0] >= 51
    assert len(read_audit(database)) == 1051


# -- reading --------------------------------------------------------------------------------------------------------
def test_read_audit_filters_and_keeps_the_newest_last(tmp_path):
    database = tmp_path / "audit.sqlite"
    entries = [make_entry(4, index) for index in range(20)]
    write_entries(database, list(reversed(entries)))  # written newest first: the order must come from the time
    rows = read_audit(database)
    assert [row["request_id"] for row in rows] == [f"req-4-{index}" for index in range(20)]
    assert [row["request_id"] for row in read_audit(database, limit=3)] == ["req-4-17", "req-4-18", "req-4-19"]
    assert read_audit(database, limit=0) == []
    since = START + timedelta(seconds=15)
    expected_since = [f"req-4-{index}" for index in range(15, 20)]
    assert [row["request_id"] for row in read_audit(database, since=since)] == expected_since
    assert [row["request_id"] for row in read_audit(database, since="2026-03-01T14:00:15+02:00")] == expected_since
    assert [row["request_id"] for row in read_audit(database, since="2026-03-01T12:00:15")] == expected_since  # UTC
    failed = [row["request_id"] for row in read_audit(database, outcome="invalid_image")]
    assert failed == ["req-4-4", "req-4-9", "req-4-14", "req-4-19"]
    assert [row["request_id"] for row in read_audit(database, outcome="invalid_image", limit=1)] == ["req-4-19"]
    # a URL names the same database as its path
    assert read_audit(audit_url(database)) == rows


def test_audit_url_turns_paths_into_sqlite_urls_and_leaves_urls_alone(tmp_path, monkeypatch):
    tmp_path = tmp_path.resolve()
    monkeypatch.chdir(tmp_path)
    assert audit_url("runs/demo/serve/audit.sqlite") == f"sqlite:///{tmp_path}/runs/demo/serve/audit.sqlite"
    assert audit_url(tmp_path / "a.sqlite") == f"sqlite:///{tmp_path}/a.sqlite"
    for url in ("postgresql+psycopg://user@host/db", "sqlite:///relative.sqlite", "mysql+pymysql://u:p@h:3306/d"):
        assert audit_url(url) == url


def test_missing_database_gives_a_config_error_naming_it(tmp_path):
    missing = tmp_path / "runs" / "demo" / "serve" / "audit.sqlite"
    with pytest.raises(ConfigError, match="no audit database at") as raised:
        read_audit(missing)
    assert str(missing) in str(raised.value)
    with pytest.raises(ConfigError, match="no audit database at"):
        export_audit(missing, tmp_path / "out.csv", "csv")
    assert not missing.exists() and not missing.parent.exists()  # reading creates nothing
    assert not (tmp_path / "out.csv").exists()
    not_audit = tmp_path / "other.sqlite"
    sqlite3.connect(not_audit).close()
    with pytest.raises(ConfigError, match="not a medxai audit log"):
        read_audit(not_audit)


def test_missing_driver_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "psycopg", None)  # an import of psycopg now fails, installed or not
    with pytest.raises(ConfigError, match=r"pip install psycopg\[binary\]") as raised:
        AuditLog("postgresql+psycopg://auditor:s3cret@127.0.0.1/audit")
    assert "s3cret" not in str(raised.value)
    with pytest.raises(ConfigError, match=r"pip install psycopg\[binary\]"):
        read_audit("postgresql+psycopg://auditor@127.0.0.1/audit")
    with pytest.raises(ConfigError, match="no dialect"):
        read_audit("nosuchdb://host/db")
    with pytest.raises(ConfigError, match="in-memory"):
        AuditLog("sqlite://")


# -- export ---------------------------------------------------------------------------------------------------------
def _typed_csv_row(row: dict[str, str]) -> dict:
    """A CSV row with the column types of the audit log (the CSV writes None as "" and booleans as true/false)."""
    integers, floats = {"id", "status", "input_bytes"}, {"domain_score", "latency_ms"}
    typed = {}
    for name, text in row.items():
        if text == "":
            typed[name] = None
        elif name in integers:
            typed[name] = int(text)
        elif name in floats:
            typed[name] = float(text)
        elif name == "in_domain":
            typed[name] = {"true": True, "false": False}[text]
        else:
            typed[name] = text
    return typed


@pytest.mark.parametrize("format", ["csv", "json", "jsonl"])
def test_export_round_trips(tmp_path, format):
    database = tmp_path / "audit.sqlite"
    entries = [make_entry(5, index) for index in range(40)]
    write_entries(database, entries)
    out = tmp_path / "exports" / f"audit.{format}"
    assert export_audit(database, out, format) == 40
    text = out.read_text(encoding="utf-8")
    if format == "csv":
        with out.open(newline="", encoding="utf-8") as stream:
            reader = csv.DictReader(stream)
            assert tuple(reader.fieldnames) == DOCUMENTED_COLUMNS
            exported = [_typed_csv_row(row) for row in reader]
    elif format == "json":
        exported = json.loads(text)
        assert isinstance(exported, list)
    else:
        lines = text.splitlines()
        assert len(lines) == 40
        exported = [json.loads(line) for line in lines]
    assert exported == read_audit(database)
    for row, entry in zip(exported, entries):
        assert_row_matches(row, entry)
    assert not list(out.parent.glob(".*partial"))
    # filters apply as in read_audit; an empty selection is still a valid file
    assert export_audit(database, out, format, outcome="timeout") == 0
    if format == "json":
        assert json.loads(out.read_text(encoding="utf-8")) == []
    elif format == "csv":
        assert out.read_text(encoding="utf-8").splitlines() == [",".join(DOCUMENTED_COLUMNS)]
    else:
        assert out.read_text(encoding="utf-8") == ""


def test_export_refuses_an_unknown_format(tmp_path):
    database = tmp_path / "audit.sqlite"
    write_entries(database, [make_entry(6, 0)])
    with pytest.raises(ConfigError, match="csv, json, jsonl"):
        export_audit(database, tmp_path / "audit.xml", "xml")


# -- summary --------------------------------------------------------------------------------------------------------
def test_summarize_audit_on_hand_made_rows():
    def row(endpoint, outcome, latency, in_domain, second):
        return {"endpoint": endpoint, "outcome": outcome, "latency_ms": latency, "in_domain": in_domain,
                "time": f"2026-03-01T12:00:{second:02d}.000000+00:00"}

    rows = [
        row("predict", "ok", 40.0, True, 3),
        row("predict", "ok", 10.0, False, 1),
        row("explain", "ok", 100.0, False, 5),
        row("predict", "invalid_image", 20.0, None, 2),
        row("explain", "timeout", 30.0, True, 4),
        row("predict", "unauthorized", None, None, 0),
    ]
    summary = summarize_audit(rows)
    assert summary["count"] == 6
    assert summary["first"] == "2026-03-01T12:00:00.000000+00:00"
    assert summary["last"] == "2026-03-01T12:00:05.000000+00:00"
    assert summary["by_endpoint"] == {"explain": 2, "predict": 4}
    assert summary["by_outcome"] == {"invalid_image": 1, "ok": 3, "timeout": 1, "unauthorized": 1}
    assert summary["by_endpoint_outcome"] == {
        "explain": {"ok": 1, "timeout": 1},
        "predict": {"invalid_image": 1, "ok": 2, "unauthorized": 1},
    }
    # latencies sorted: 10, 20, 30, 40, 100 (the unauthorized row has none).
    # p50: rank (5 - 1) * 0.50 = 2.0 -> 30.  p95: rank (5 - 1) * 0.95 = 3.8 -> 40 + 0.8 * (100 - 40) = 88.
    assert summary["latency_ms"]["count"] == 5
    assert summary["latency_ms"]["p50"] == pytest.approx(30.0, abs=1e-12)
    assert summary["latency_ms"]["p95"] == pytest.approx(88.0, abs=1e-12)
    # verdicts: True, False, False, True (two rows without a guard): 2 of 4 out of domain
    assert summary["domain"] == {"judged": 4, "out_of_domain": 2, "out_of_domain_share": 0.5}


def test_summarize_audit_without_rows():
    assert summarize_audit([]) == {
        "count": 0, "first": None, "last": None, "by_endpoint": {}, "by_outcome": {}, "by_endpoint_outcome": {},
        "latency_ms": {"count": 0, "p50": None, "p95": None},
        "domain": {"judged": 0, "out_of_domain": 0, "out_of_domain_share": None},
    }


def test_summary_of_a_written_log_matches_its_rows(tmp_path):
    database = tmp_path / "audit.sqlite"
    entries = [make_entry(7, index) for index in range(10)]
    write_entries(database, entries)
    summary = summarize_audit(read_audit(database))
    assert summary["count"] == 10
    assert summary["by_endpoint"] == {"explain": 5, "predict": 5}
    assert summary["by_outcome"] == {"invalid_image": 2, "ok": 8}
    # latencies 0.5 + index + 0.7 = 1.2 ... 10.2; p50 at rank 4.5 -> 5.7; p95 at rank 8.55 -> 9.2 + 0.55 = 9.75
    assert summary["latency_ms"]["p50"] == pytest.approx(5.7)
    assert summary["latency_ms"]["p95"] == pytest.approx(9.75)
    # in_domain by index % 4: 0 False, 1 True, 2 True, 3 None -> indexes 0..9: False at 0, 4, 8; None at 3, 7
    assert summary["domain"] == {"judged": 8, "out_of_domain": 3, "out_of_domain_share": 3 / 8}

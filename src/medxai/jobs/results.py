"""The results of a batch job as they are made: rows appended to ``predictions.csv`` and ``skipped.csv`` chunk by
chunk, so that memory does not grow with the number of inputs, a killed job loses at most the chunk it was working
on, and ``--resume`` continues where it stopped with every input exactly once in one of the two files.

At the end the CSV is converted to ``predictions.parquet`` (typed columns: probabilities and the domain score as
floats, ``in_domain`` as a nullable boolean), streaming, in bounded memory.
"""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from medxai.errors import ConfigError
from medxai.run_folder import (
    PREDICTIONS_FILE,
    PREDICTIONS_PARQUET_FILE,
    SKIPPED_FILE,
    read_skipped,
)

__all__ = ["PARQUET_FILE", "ResultsJournal", "csv_to_parquet", "csv_value", "prediction_schema"]

logger = logging.getLogger(__name__)

PARQUET_FILE = PREDICTIONS_PARQUET_FILE
_SKIPPED_COLUMNS = ["file", "reason"]


def csv_value(value: object) -> object:
    """A row value as the CSV spells it: None empty, booleans ``true``/``false``."""
    if value is None:
        return ""
    return str(value).lower() if isinstance(value, bool) else value


class ResultsJournal:
    """``predictions.csv`` and ``skipped.csv`` of one output folder, appended as results arrive.

    Args:
        folder: the output folder (created).
        columns: the prediction rows' columns, ``file`` first.
        resume: keep the rows already there and report their inputs as :attr:`done`; otherwise start both files
            afresh.

    Raises:
        ConfigError: resuming into a ``predictions.csv`` with other columns (another model's labels).
    """

    def __init__(self, folder: str | Path, columns: Sequence[str], *, resume: bool = False) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.columns = list(columns)
        self.predictions_path = self.folder / PREDICTIONS_FILE
        self.skipped_path = self.folder / SKIPPED_FILE
        self.done: set[str] = set()
        self.written = 0
        self.skipped: list[tuple[str, str]] = []
        if resume:
            self._read_previous()
        self._predictions = self._open(self.predictions_path, self.columns, resume)
        self._skipped = self._open(self.skipped_path, _SKIPPED_COLUMNS, resume)

    def _read_previous(self) -> None:
        if self.predictions_path.is_file():
            _cut_partial_last_line(self.predictions_path)
            with self.predictions_path.open(newline="", encoding="utf-8") as handle:
                reader = csv.reader(handle)
                header = next(reader, None)
                if header is not None and header != self.columns:
                    raise ConfigError(f"{self.predictions_path} has the columns {header}, not this model's "
                                      f"{self.columns}: resume only with the run that wrote it, or use another --out")
                for row in reader:
                    if len(row) == len(self.columns):
                        self.done.add(row[0])
                        self.written += 1
        if self.skipped_path.is_file():
            _cut_partial_last_line(self.skipped_path)
            self.skipped = read_skipped(self.skipped_path)
            self.done.update(name for name, _ in self.skipped)
        if self.done:
            logger.info("resuming: %d input(s) already in %s and %s", len(self.done), self.predictions_path.name,
                        self.skipped_path.name)

    @staticmethod
    def _open(path: Path, columns: Sequence[str], append: bool):
        fresh = not (append and path.is_file() and path.stat().st_size > 0)
        handle = path.open("w" if fresh else "a", newline="", encoding="utf-8")
        writer = csv.writer(handle)
        if fresh:
            writer.writerow(columns)
        return handle, writer

    def write(self, rows: Iterable[dict[str, Any]], skipped: Iterable[tuple[str, str]] = ()) -> None:
        """Append prediction rows and skipped entries, then flush both files (a kill loses nothing written)."""
        handle, writer = self._predictions
        for row in rows:
            writer.writerow([csv_value(row[column]) for column in self.columns])
            self.written += 1
        handle.flush()
        handle, writer = self._skipped
        for name, reason in skipped:
            writer.writerow([name, reason])
            self.skipped.append((name, reason))
        handle.flush()

    def close(self, *, parquet: bool = True) -> list[Path]:
        """Close both files; with ``parquet``, also write ``predictions.parquet``. Returns the files written."""
        for handle, _ in (self._predictions, self._skipped):
            handle.close()
        paths = [self.predictions_path, self.skipped_path]
        if parquet:
            paths.append(csv_to_parquet(self.predictions_path, self.folder / PARQUET_FILE, self.columns))
        return paths

    def __enter__(self) -> ResultsJournal:  # noqa: PYI034
        return self

    def __exit__(self, *exc_info: object) -> None:
        for handle, _ in (self._predictions, self._skipped):
            if not handle.closed:
                handle.close()


def _cut_partial_last_line(path: Path) -> None:
    """Drop what a killed writer left after the last complete line."""
    with path.open("rb+") as handle:
        handle.seek(0, os.SEEK_END)
        size = handle.tell()
        if size == 0:
            return
        position = size
        while position > 0:
            step = min(65536, position)
            handle.seek(position - step)
            block = handle.read(step)
            newline = block.rfind(b"\n")
            if newline >= 0:
                end = position - step + newline + 1
                if end != size:
                    handle.truncate(end)
                    logger.warning("%s: dropped an incomplete last line (the job was interrupted)", path.name)
                return
            position -= step
        handle.truncate(0)


def prediction_schema(columns: Sequence[str]):
    """The Arrow schema of prediction rows: ``p_*`` and ``domain_score`` float64, ``in_domain`` bool, the rest
    strings (the Parquet file's, and what the Ray engine's actors return)."""
    import pyarrow as pa

    def column_type(name: str) -> pa.DataType:
        if name.startswith("p_") or name == "domain_score":
            return pa.float64()
        if name == "in_domain":
            return pa.bool_()
        return pa.string()

    return pa.schema([(name, column_type(name)) for name in columns])


def csv_to_parquet(csv_path: Path, parquet_path: Path, columns: Sequence[str], block_bytes: int = 1 << 24) -> Path:
    """Convert a predictions CSV to Parquet, streaming (``block_bytes`` of CSV at a time).

    Column types: ``p_*`` and ``domain_score`` float64, ``in_domain`` nullable bool, everything else string."""
    from pyarrow import csv as pa_csv
    from pyarrow import parquet as pq

    schema = prediction_schema(columns)
    convert = pa_csv.ConvertOptions(column_types={name: schema.field(name).type for name in columns},
                                    true_values=["true"], false_values=["false"], null_values=[""],
                                    strings_can_be_null=False)
    reader = pa_csv.open_csv(csv_path, read_options=pa_csv.ReadOptions(block_size=block_bytes),
                             convert_options=convert)
    temporary = parquet_path.with_name(parquet_path.name + ".partial")
    with pq.ParquetWriter(temporary, schema) as writer:
        for batch in reader:
            writer.write_batch(batch)
    os.replace(temporary, parquet_path)
    return parquet_path

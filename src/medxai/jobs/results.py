"""The results of a batch job as they are made: rows appended to ``predictions.csv`` and ``skipped.csv`` chunk by
chunk, so that memory does not grow with the number of inputs, a killed job loses at most the chunk it was working
on, and ``--resume`` continues where it stopped with every input exactly once in one of the two files.

``naming.json`` beside them records how inputs were named (paths, or pseudonyms and a fingerprint of the key), and
a resume that would name them otherwise is refused: its rows would mix real names and pseudonyms. Text cells that a
spreadsheet would run as a formula are written after a single quote (:func:`~medxai.run_folder.spreadsheet_text`)
and read back without it.

At the end the CSV is converted to ``predictions.parquet`` (typed columns: probabilities and the domain score as
floats, ``in_domain`` as a nullable boolean, text as it was before quoting), streaming, in bounded memory.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from medxai.errors import ConfigError
from medxai.jobs.names import HASH_KEY_ENV, InputFile, InputNames
from medxai.run_folder import (
    NAMING_FILE,
    PREDICTIONS_FILE,
    PREDICTIONS_PARQUET_FILE,
    SKIPPED_FILE,
    read_skipped,
    skipped_row,
    spreadsheet_text,
    unspreadsheet_text,
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
    """``predictions.csv`` and ``skipped.csv`` of one output folder, appended as results arrive, and ``naming.json``.

    Args:
        folder: the output folder (created).
        columns: the prediction rows' columns, ``file`` first.
        names: the job's inputs, named (their naming is recorded, and checked on ``resume``).
        resume: keep the rows already there and report their inputs as :attr:`done`; otherwise start both files
            afresh.

    Raises:
        ConfigError: resuming into a ``predictions.csv`` with other columns (another model's labels), into a folder
            whose inputs were named otherwise (``--hash-names``, ``MEDXAI_HASH_KEY``), or into one whose results
            are none of these inputs (an output of an earlier release named otherwise, or of other inputs).
    """

    def __init__(self, folder: str | Path, columns: Sequence[str], names: InputNames, *, resume: bool = False) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.columns = list(columns)
        self.names = names
        self.predictions_path = self.folder / PREDICTIONS_FILE
        self.skipped_path = self.folder / SKIPPED_FILE
        self.naming_path = self.folder / NAMING_FILE
        self.done: set[str] = set()
        self.written = 0
        self.skipped: list[tuple[str, str]] = []
        self._text_columns = [index for index, name in enumerate(self.columns) if _column_kind(name) == "text"]
        if resume:
            self._check_naming()
            self._read_previous()
            self._check_results_are_these_inputs()
        _write_naming(self.naming_path, names.naming)
        self._predictions = self._open(self.predictions_path, self.columns, resume)
        self._skipped = self._open(self.skipped_path, _SKIPPED_COLUMNS, resume)

    def _check_naming(self) -> None:
        if not self.naming_path.is_file():
            return  # an output of an earlier release: _check_results_are_these_inputs still applies
        try:
            recorded = json.loads(self.naming_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError, RecursionError):
            recorded = None
        if recorded != self.names.naming:
            raise ConfigError(
                f"{self.folder} holds results whose inputs were named {_naming_words(recorded)}, and this job names "
                f"them {_naming_words(self.names.naming)}: resuming would mix the two. Resume with the same "
                f"--hash-names and {HASH_KEY_ENV}, or use another --out"
            )

    def _read_previous(self) -> None:
        if self.predictions_path.is_file():
            _cut_torn_record(self.predictions_path)
            with self.predictions_path.open(newline="", encoding="utf-8") as handle:
                reader = csv.reader(handle)
                header = next(reader, None)
                if header is not None and header != self.columns:
                    raise ConfigError(f"{self.predictions_path} has the columns {header}, not this model's "
                                      f"{self.columns}: resume only with the run that wrote it, or use another --out")
                for row in reader:
                    if len(row) == len(self.columns):
                        self.done.add(unspreadsheet_text(row[0]))
                        self.written += 1
        if self.skipped_path.is_file():
            _cut_torn_record(self.skipped_path)
            self.skipped = read_skipped(self.skipped_path)
            self.done.update(name for name, _ in self.skipped)
        if self.done:
            logger.info("resuming: %d input(s) already in %s and %s", len(self.done), self.predictions_path.name,
                        self.skipped_path.name)

    def _check_results_are_these_inputs(self) -> None:
        every_name = {file.name for file in self.names.files} | {name for name, _ in self.names.skipped}
        if self.done and every_name and not self.done & every_name:
            raise ConfigError(f"none of the {len(self.done)} result(s) in {self.folder} is one of this job's inputs "
                              f"(other inputs, or another --hash-names / {HASH_KEY_ENV}); use another --out")

    def pending(self) -> tuple[list[tuple[str, str]], list[InputFile]]:
        """What is left to do: the entries skipped while listing, and the files, that are in neither file yet."""
        return ([entry for entry in self.names.skipped if entry[0] not in self.done],
                [file for file in self.names.files if file.name not in self.done])

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
            cells = [csv_value(row[column]) for column in self.columns]
            for index in self._text_columns:
                cells[index] = spreadsheet_text(str(cells[index]))
            writer.writerow(cells)
            self.written += 1
        handle.flush()
        handle, writer = self._skipped
        for name, reason in skipped:
            writer.writerow(skipped_row(name, reason))
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


def _write_naming(path: Path, naming: dict[str, str]) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(naming), encoding="utf-8")
    os.replace(temporary, path)


def _naming_words(naming: object) -> str:
    if not isinstance(naming, dict):
        return "in an unknown way (its naming.json is unreadable)"
    if naming.get("names") == "paths":
        return "by their paths"
    return f"by pseudonyms (--hash-names, key fingerprint {naming.get('key_fingerprint')})"


def _cut_torn_record(path: Path, block_bytes: int = 1 << 20) -> None:
    """Drop what a killed writer left after the last complete CSV record.

    A record ends at a line feed outside quotes: a quoted field may hold line feeds (a file name with a newline),
    and inside one an even number of quote characters has been read since the record began (``""`` is an escaped
    quote). The file is read once from the start, a block at a time, keeping only the quote parity.
    """
    end, inside, offset = 0, False, 0
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(block_bytes), b""):
            for index, piece in enumerate(block.split(b'"')):
                if index:  # a quote character lies before this piece
                    inside = not inside
                    offset += 1
                if not inside:
                    newline = piece.rfind(b"\n")
                    if newline >= 0:
                        end = offset + newline + 1
                offset += len(piece)
    if end != offset:
        with path.open("rb+") as handle:
            handle.truncate(end)
        logger.warning("%s: dropped an incomplete last record (the job was interrupted)", path.name)


def _column_kind(name: str) -> str:
    """``float`` (``p_*``, ``domain_score``), ``bool`` (``in_domain``) or ``text``: a prediction column's type."""
    if name.startswith("p_") or name == "domain_score":
        return "float"
    return "bool" if name == "in_domain" else "text"


def prediction_schema(columns: Sequence[str]):
    """The Arrow schema of prediction rows: ``p_*`` and ``domain_score`` float64, ``in_domain`` bool, the rest
    strings (the Parquet file's, and what the Ray engine's actors return)."""
    import pyarrow as pa

    types = {"float": pa.float64(), "bool": pa.bool_(), "text": pa.string()}
    return pa.schema([(name, types[_column_kind(name)]) for name in columns])


def csv_to_parquet(csv_path: Path, parquet_path: Path, columns: Sequence[str], block_bytes: int = 1 << 24) -> Path:
    """Convert a predictions CSV to Parquet, streaming (``block_bytes`` of CSV at a time).

    Column types: ``p_*`` and ``domain_score`` float64, ``in_domain`` nullable bool, everything else string, as it
    was before :func:`~medxai.run_folder.spreadsheet_text` quoted it. Quoted fields may hold line breaks."""
    import pyarrow.compute as pc
    from pyarrow import csv as pa_csv
    from pyarrow import parquet as pq

    schema = prediction_schema(columns)
    convert = pa_csv.ConvertOptions(column_types={name: schema.field(name).type for name in columns},
                                    true_values=["true"], false_values=["false"], null_values=[""],
                                    strings_can_be_null=False)
    reader = pa_csv.open_csv(csv_path, read_options=pa_csv.ReadOptions(block_size=block_bytes),
                             parse_options=pa_csv.ParseOptions(newlines_in_values=True), convert_options=convert)
    text = [index for index, name in enumerate(columns) if _column_kind(name) == "text"]
    temporary = parquet_path.with_name(parquet_path.name + ".partial")
    with pq.ParquetWriter(temporary, schema) as writer:
        for batch in reader:
            arrays = batch.columns
            for index in text:  # undo spreadsheet_text: strip the one leading quote it added
                cells = arrays[index]
                arrays[index] = pc.if_else(pc.starts_with(cells, "'"), pc.utf8_slice_codeunits(cells, 1), cells)
            writer.write_batch(type(batch).from_arrays(arrays, schema=schema))
    os.replace(temporary, parquet_path)
    return parquet_path

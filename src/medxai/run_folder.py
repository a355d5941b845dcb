"""The run folder: every file name in it, and the typed read and write of each file. No other module spells one.

A run folder is what ``medxai train`` writes and all later commands need (the contract, with every key, is
``docs/run-folder.md``)::

    runs/<name>/
      medxai_run.json (the marker: a random run id)  config.yaml  model_card.json  metrics.json  data_check.json
      history.csv  skipped.csv  report.html
      checkpoints/{best,last,state}.safetensors  checkpoints/state.json
      splits/{train,val,test}.txt  figures/*.png  heatmaps/*.png  heatmaps/gallery.json  explain_metrics.json
      evaluations/<name>/{evaluation.json, metrics.json, skipped.csv, figures/, explain_metrics.json}

:class:`RunFolder` gives each path and reads or writes each file as a typed value (a :class:`~medxai.config.RunConfig`,
a :class:`~medxai.models.card.ModelCard`, split lists, history rows, JSON documents). :class:`EvaluationFolder` is the
part a run and an evaluation of other data share (metrics, figures, skipped list), so that an evaluation never writes
into the run's own results. The safety rules live here too: a run name is one plain path component, ``--overwrite``
only ever removes a folder that medxai provably wrote and that holds nothing else (:meth:`RunFolder.check_deletable`),
a run folder never overlaps the data it was made from, and no command writes its output into its inputs or into a
run folder (:func:`check_output_location`).

This module sits between the model stage and training in the pipeline's order: it may import ``config``, ``errors``,
``models.card`` and ``models.checkpoint`` (the card a weights file embeds), and every later stage and job may import
it.
"""

from __future__ import annotations

import contextlib
import csv
import datetime
import fnmatch
import json
import logging
import os
import re
import shutil
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from medxai.config import DataConfig, RunConfig, TrainConfig, parse_yaml, save_config
from medxai.data.readers import is_hidden_or_system
from medxai.data.sources.base import SPLIT_NAMES
from medxai.errors import CheckpointError, ConfigError, DataError, MedxaiError
from medxai.models.card import ModelCard
from medxai.models.checkpoint import embedded_card

__all__ = [
    "RunFolder",
    "EvaluationFolder",
    "check_folder_name",
    "check_output_location",
    "safe_file_stem",
    "spreadsheet_text",
    "unspreadsheet_text",
    "write_skipped",
    "skipped_row",
    "read_skipped",
    "write_split_lists",
    "read_split_lists",
    "onnx_card_path_for",
    "read_onnx_card",
    "write_onnx_card",
    "HISTORY_FIELDS",
    "SPLIT_NAMES",
    "SKIPPED_FILE",
    "PREDICTIONS_FILE",
    "PREDICTIONS_PARQUET_FILE",
    "NAMING_FILE",
    "REPORT_FILE",
    "FIGURE_KINDS",
]

logger = logging.getLogger(__name__)

RUN_MARKER_FILE = "medxai_run.json"
CONFIG_FILE = "config.yaml"
MODEL_CARD_FILE = "model_card.json"
METRICS_FILE = "metrics.json"
DATA_CHECK_FILE = "data_check.json"
HISTORY_FILE = "history.csv"
SKIPPED_FILE = "skipped.csv"
REPORT_FILE = "report.html"
EXPLAIN_METRICS_FILE = "explain_metrics.json"
EXPLAIN_SKIPPED_FILE = "explain_skipped.csv"
LOCALIZATION_DIR = "localization"  # explain-eval: best/worst overlays with the mask outlined, per-image rows
LOCALIZATION_ROWS_FILE = "localization.csv"
SHORTCUT_DIR = "shortcut"  # explain-eval: overlays of the images whose evidence sits on a suspected shortcut
EXPLAIN_STAGING_PREFIX = ".explain-eval.partial-"  # explain-eval writes those two folders here, then moves them in
_LOCALIZATION_FILE = re.compile(r"localization\.csv|[a-z0-9]+_(best|worst)_\d+\.png")
_SHORTCUT_FILE = re.compile(r"[a-z0-9]+_(border|text|outside_foreground)_\d+\.png")
GALLERY_FILE = "gallery.json"
EVALUATION_FILE = "evaluation.json"
PREDICTIONS_FILE = "predictions.csv"
PREDICTIONS_PARQUET_FILE = "predictions.parquet"
NAMING_FILE = "naming.json"  # beside predictions.csv: how the batch job named its inputs (see jobs/results.py)
CHECKPOINTS_DIR = "checkpoints"
SPLITS_DIR = "splits"
FIGURES_DIR = "figures"
HEATMAPS_DIR = "heatmaps"
EVALUATIONS_DIR = "evaluations"
SERVE_DIR = "serve"
ONNX_FILE = "model.onnx"
ONNX_CARD_FILE = "model.onnx.json"
AUDIT_DB_FILE = "audit.sqlite"

#: Columns of ``history.csv``, one row per epoch.
HISTORY_FIELDS = ["epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "val_score", "lr", "seconds"]

#: Figures of one evaluated split (``figures/<kind>_<split>.png``) and of the run (``training_curves``).
FIGURE_KINDS = ("confusion_matrix", "roc", "precision_recall", "reliability", "domain_scores")
TRAINING_CURVES = "training_curves"

_FOLDER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")

#: Every file medxai writes in a run folder (patterns of the path relative to it, ``*`` within one component);
#: ``--overwrite`` refuses a folder holding anything else.
_RUN_LAYOUT = (
    RUN_MARKER_FILE, CONFIG_FILE, MODEL_CARD_FILE, METRICS_FILE, DATA_CHECK_FILE, HISTORY_FILE, SKIPPED_FILE,
    REPORT_FILE, EXPLAIN_METRICS_FILE, EXPLAIN_SKIPPED_FILE, ONNX_FILE, ONNX_CARD_FILE,
    *(f"{CHECKPOINTS_DIR}/{name}.safetensors" for name in ("best", "last", "ema", "state", "domain_guard")),
    f"{CHECKPOINTS_DIR}/state.json",
    *(f"{SPLITS_DIR}/{split}.txt" for split in SPLIT_NAMES),
    f"{FIGURES_DIR}/*.png",
    f"{HEATMAPS_DIR}/*.png", f"{HEATMAPS_DIR}/*.npy", f"{HEATMAPS_DIR}/{GALLERY_FILE}",
    *(f"{EVALUATIONS_DIR}/*/{name}" for name in (EVALUATION_FILE, METRICS_FILE, SKIPPED_FILE, EXPLAIN_METRICS_FILE,
                                                 EXPLAIN_SKIPPED_FILE, f"{FIGURES_DIR}/*.png")),
    *(f"{SERVE_DIR}/{AUDIT_DB_FILE}{suffix}" for suffix in ("", "-journal", "-wal", "-shm")),
    # explain-eval's per-image rows and overlays, in the run, its evaluations, and a staging folder it left behind
    *(f"{where}{name}" for where in ("", f"{EVALUATIONS_DIR}/*/", f"{EXPLAIN_STAGING_PREFIX}*/",
                                     f"{EVALUATIONS_DIR}/*/{EXPLAIN_STAGING_PREFIX}*/")
      for name in (f"{LOCALIZATION_DIR}/{LOCALIZATION_ROWS_FILE}", f"{LOCALIZATION_DIR}/*.png",
                   f"{SHORTCUT_DIR}/*.png")),
)
#: What an interrupted atomic write leaves beside its file.
_LEFTOVER_SUFFIXES = (".tmp", ".partial")


def check_folder_name(name: str, what: str = "run name") -> str:
    """Return ``name`` when it is one safe path component, else raise.

    A run or evaluation name becomes a folder under its parent, so it may hold letters, digits, ``.``, ``_`` and
    ``-`` only, must start with a letter or digit, and is at most 128 characters: no ``/``, no ``..``, no absolute
    path, nothing that could name a folder outside the parent.

    Raises:
        ConfigError: the name is not such a component.
    """
    if not isinstance(name, str) or not _FOLDER_NAME.match(name) or name in (".", ".."):
        raise ConfigError(
            f"{what} {name!r} must be a single folder name: letters, digits, '.', '_' and '-', starting with a "
            "letter or digit (no '/', no '..')"
        )
    return name


def safe_file_stem(text: str, limit: int = 80) -> str:
    """``text`` as part of a file name: letters, digits, ``-``, ``_`` and ``.`` kept, anything else ``_``, at most
    ``limit`` characters (``"No Tumor/x.png"`` -> ``"No_Tumor_x.png"``)."""
    return "".join(char if char.isalnum() or char in "-_." else "_" for char in str(text)).strip("_")[:limit]


# -- file formats shared by runs, evaluations and batch-job outputs -------------------------------------------------
#: First characters that make a spreadsheet read a CSV cell as a formula (OWASP, "CSV injection"); such a text cell
#: is written after a single quote, which spreadsheets show as text. A text beginning with the quote gets one too,
#: so that reading removes exactly one.
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
_TEXT_MARK = "'"


def spreadsheet_text(text: str) -> str:
    """A text cell of a CSV file as written: prefixed by ``'`` when it begins like a formula (``=HYPERLINK(...)``,
    ``+``, ``-``, ``@``, tab, carriage return) or with ``'`` itself; :func:`unspreadsheet_text` undoes it."""
    return _TEXT_MARK + text if text.startswith((*_FORMULA_STARTS, _TEXT_MARK)) else text


def unspreadsheet_text(cell: str) -> str:
    """The text of a cell written by :func:`spreadsheet_text`."""
    return cell[1:] if cell.startswith(_TEXT_MARK) else cell


def write_skipped(path: str | Path, skipped: Iterable[tuple[str, str]]) -> Path:
    """``skipped.csv`` (file, reason): written always, so that files in = results + rows here."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file", "reason"])
        writer.writerows(skipped_row(name, reason) for name, reason in skipped)
    return path


def skipped_row(name: str, reason: str) -> list[str]:
    """One row of ``skipped.csv`` as written (:func:`spreadsheet_text` cells)."""
    return [spreadsheet_text(str(name)), spreadsheet_text(str(reason))]


def read_skipped(path: str | Path) -> list[tuple[str, str]]:
    """The rows of a ``skipped.csv``; [] when there is none."""
    path = Path(path)
    if not path.is_file():
        return []
    with path.open(newline="", encoding="utf-8") as handle:
        return [(unspreadsheet_text(row["file"]), unspreadsheet_text(row["reason"]))
                for row in csv.DictReader(handle)]


def write_split_lists(splits: Mapping[str, Sequence[Any]], folder: str | Path) -> None:
    """Write ``train.txt``, ``val.txt``, ``test.txt`` (one record id per line) for the splits present.

    List files of the three names whose split is absent are removed, so an old ``test.txt`` cannot be read back as
    if it belonged to these splits.

    Args:
        splits: split name -> records (objects with an ``id``) or ids.
        folder: the folder to write into (created if needed), normally ``runs/<name>/splits``.

    Raises:
        DataError: a split name other than train, val, test, or an id containing a line break.
    """
    unknown = sorted(set(splits) - set(SPLIT_NAMES))
    if unknown:
        raise DataError(f"unknown split name(s) {unknown}; expected train, val, test")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for split in SPLIT_NAMES:
        list_path = folder / f"{split}.txt"
        if split not in splits:
            list_path.unlink(missing_ok=True)
            continue
        ids = [item if isinstance(item, str) else str(item.id) for item in splits[split]]
        bad_ids = [record_id for record_id in ids if "\n" in record_id or "\r" in record_id]
        if bad_ids:
            raise DataError(f"{len(bad_ids)} id(s) with line breaks cannot be written to {list_path}")
        list_path.write_text("".join(f"{record_id}\n" for record_id in ids), encoding="utf-8")
    logger.debug("wrote split lists to %s", folder)


def read_split_lists(folder: str | Path) -> dict[str, list[str]]:
    """Read the lists that :func:`write_split_lists` wrote.

    Returns:
        split name -> ids in file order, for the files present (blank lines ignored; spaces in ids kept).

    Raises:
        DataError: the folder holds none of the three files.
    """
    folder = Path(folder)
    result: dict[str, list[str]] = {}
    for split in SPLIT_NAMES:
        list_path = folder / f"{split}.txt"
        if list_path.is_file():
            lines = list_path.read_text(encoding="utf-8").splitlines()
            result[split] = [line for line in lines if line.strip()]
    if not result:
        raise DataError(f"no split lists (train.txt, val.txt, test.txt) in {folder}")
    return result


def _write_json(path: Path, document: Any) -> Path:
    """Write JSON through a temporary file and a rename, so a kill never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(document, indent=2), encoding="utf-8")
    os.replace(temporary, path)
    return path


def _read_json(path: Path, what: str) -> Any:
    if not path.is_file():
        raise CheckpointError(f"{path}: no {what} here")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path}: not a readable {what} ({error})") from None
    except RecursionError:
        raise CheckpointError(f"{path}: not a readable {what} (nested too deeply)") from None


def onnx_card_path_for(onnx_path: str | Path) -> Path:
    """The card beside an exported ``.onnx`` file: ``<file>.json`` (``model.onnx.json`` in a run folder)."""
    onnx_path = Path(onnx_path)
    return onnx_path.with_name(onnx_path.name + ".json")


def read_onnx_card(path: str | Path) -> dict[str, Any]:
    """An export's card: the run's model card as exported, plus ``export`` (the facts), ``parity`` and
    ``source_weights_sha256``.

    Raises:
        CheckpointError: missing, unreadable or not an object.
    """
    path = Path(path)
    document = _read_json(path, "ONNX export card")
    if not isinstance(document, dict) or not isinstance(document.get("export"), dict):
        raise CheckpointError(f"{path}: not an ONNX export card (expected an object with 'export')")
    return document


def write_onnx_card(path: str | Path, document: Mapping[str, Any]) -> Path:
    return _write_json(Path(path), dict(document))


# -- folders --------------------------------------------------------------------------------------------------------
class EvaluationFolder:
    """Results of evaluating a model on one body of data: metrics, figures, skipped list, explanation quality.

    A run folder is one (its own splits); ``RUN/evaluations/<name>/`` is another, for any other data, with its own
    ``evaluation.json`` saying what was evaluated.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r})"

    @property
    def name(self) -> str:
        return self.path.name

    # paths
    @property
    def metrics_path(self) -> Path:
        return self.path / METRICS_FILE

    @property
    def skipped_path(self) -> Path:
        return self.path / SKIPPED_FILE

    @property
    def figures_dir(self) -> Path:
        return self.path / FIGURES_DIR

    @property
    def explain_metrics_path(self) -> Path:
        return self.path / EXPLAIN_METRICS_FILE

    @property
    def explain_skipped_path(self) -> Path:
        return self.path / EXPLAIN_SKIPPED_FILE

    @property
    def localization_dir(self) -> Path:
        return self.path / LOCALIZATION_DIR

    @property
    def shortcut_dir(self) -> Path:
        return self.path / SHORTCUT_DIR

    @property
    def localization_rows_path(self) -> Path:
        return self.localization_dir / LOCALIZATION_ROWS_FILE

    @property
    def info_path(self) -> Path:
        return self.path / EVALUATION_FILE

    def figure_path(self, kind: str, split: str | None = None) -> Path:
        """``figures/<kind>_<split>.png`` (``kind`` one of :data:`FIGURE_KINDS`), or ``training_curves.png``."""
        if kind == TRAINING_CURVES:
            return self.figures_dir / f"{TRAINING_CURVES}.png"
        if kind not in FIGURE_KINDS or not split:
            raise ValueError(f"unknown figure {kind!r} for split {split!r}")
        return self.figures_dir / f"{kind}_{split}.png"

    def figure_splits(self, kind: str) -> list[str]:
        """The splits that have a figure of ``kind``, sorted."""
        prefix = f"{kind}_"
        return sorted(path.stem[len(prefix):] for path in self.figures_dir.glob(f"{prefix}*.png"))

    # typed reads and writes
    def read_metrics(self) -> dict[str, Any]:
        """``metrics.json``: split name -> metrics; {} when not written yet."""
        if not self.metrics_path.is_file():
            return {}
        document = _read_json(self.metrics_path, "metrics.json")
        if not isinstance(document, dict):
            raise CheckpointError(f"{self.metrics_path}: expected an object of splits")
        return document

    def write_metrics(self, metrics: Mapping[str, Any]) -> Path:
        return _write_json(self.metrics_path, dict(metrics))

    def write_skipped(self, skipped: Iterable[tuple[str, str]]) -> Path:
        return write_skipped(self.skipped_path, skipped)

    def read_skipped(self) -> list[tuple[str, str]]:
        return read_skipped(self.skipped_path)

    def read_explain_metrics(self) -> dict[str, Any] | None:
        if not self.explain_metrics_path.is_file():
            return None
        return _read_json(self.explain_metrics_path, EXPLAIN_METRICS_FILE)

    def write_explain_metrics(self, document: Mapping[str, Any]) -> Path:
        return _write_json(self.explain_metrics_path, dict(document))

    def clear_explain_eval_outputs(self) -> list[Path]:
        """Remove what an earlier explain-eval wrote beside ``explain_metrics.json`` (its per-image rows, its
        best/worst and shortcut overlays, by their names only), so that the folder never mixes two evaluations;
        anything else in those folders is the user's and stays. Returns the files removed."""
        removed = []
        for folder, pattern in ((self.localization_dir, _LOCALIZATION_FILE), (self.shortcut_dir, _SHORTCUT_FILE)):
            if folder.is_dir():
                for path in folder.iterdir():
                    if path.is_file() and not path.is_symlink() and pattern.fullmatch(path.name):
                        path.unlink()
                        removed.append(path)
        return removed

    @contextlib.contextmanager
    def staged_explain_eval_outputs(self) -> Iterator[EvaluationFolder]:
        """A hidden staging folder for explain-eval's ``localization/`` and ``shortcut/`` files: when the block ends
        without error they replace the earlier explain-eval's (:meth:`clear_explain_eval_outputs`, by name only);
        on an error the staging folder is removed and the earlier files stay, consistent with the earlier
        ``explain_metrics.json``."""
        staging = EvaluationFolder(self.path / f"{EXPLAIN_STAGING_PREFIX}{uuid.uuid4().hex[:12]}")
        staging.path.mkdir(parents=True)
        try:
            yield staging
            self.clear_explain_eval_outputs()
            for source, target in ((staging.localization_dir, self.localization_dir),
                                   (staging.shortcut_dir, self.shortcut_dir)):
                if source.is_dir():
                    target.mkdir(parents=True, exist_ok=True)
                    for path in source.iterdir():
                        os.replace(path, target / path.name)
        finally:
            shutil.rmtree(staging.path, ignore_errors=True)

    def write_localization_rows(self, rows: Sequence[Mapping[str, Any]]) -> Path:
        """``localization/localization.csv``: one row per method and image (explain-eval's localisation metrics);
        text cells a spreadsheet would run as formulas are quoted (:func:`spreadsheet_text`), empty for undefined."""
        columns = list(dict.fromkeys(key for row in rows for key in row))
        self.localization_dir.mkdir(parents=True, exist_ok=True)
        with self.localization_rows_path.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(columns)
            for row in rows:
                writer.writerow(["" if row.get(key) is None else
                                 spreadsheet_text(row[key]) if isinstance(row.get(key), str) else row[key]
                                 for key in columns])
        return self.localization_rows_path

    def read_info(self) -> dict[str, Any]:
        """``evaluation.json``: what data was evaluated, how and when; {} for a run's own results."""
        return _read_json(self.info_path, EVALUATION_FILE) if self.info_path.is_file() else {}

    def write_info(self, info: Mapping[str, Any]) -> Path:
        return _write_json(self.info_path, dict(info))


class RunFolder(EvaluationFolder):
    """A training run's folder (see the module docstring for its layout)."""

    # paths
    @property
    def marker_path(self) -> Path:
        """``medxai_run.json``: written first into every new run folder, with the run's random id."""
        return self.path / RUN_MARKER_FILE

    @property
    def config_path(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def card_path(self) -> Path:
        return self.path / MODEL_CARD_FILE

    @property
    def checkpoints_dir(self) -> Path:
        return self.path / CHECKPOINTS_DIR

    def weights_path(self, checkpoint: str = "best") -> Path:
        """``checkpoints/<checkpoint>.safetensors``: ``best``, ``last`` or ``ema`` (the weight average of the last
        epoch, kept for ``--resume`` when ``train.ema_decay`` is set)."""
        if checkpoint not in ("best", "last", "ema"):
            raise ConfigError(f"checkpoint must be 'best', 'last' or 'ema', got {checkpoint!r}")
        return self.checkpoints_dir / f"{checkpoint}.safetensors"

    @property
    def domain_guard_path(self) -> Path:
        """``checkpoints/domain_guard.safetensors``: the out-of-domain guard fitted with the best weights."""
        return self.checkpoints_dir / "domain_guard.safetensors"

    @property
    def state_tensors_path(self) -> Path:
        return self.checkpoints_dir / "state.safetensors"

    @property
    def state_json_path(self) -> Path:
        return self.checkpoints_dir / "state.json"

    @property
    def splits_dir(self) -> Path:
        return self.path / SPLITS_DIR

    @property
    def data_check_path(self) -> Path:
        return self.path / DATA_CHECK_FILE

    @property
    def history_path(self) -> Path:
        return self.path / HISTORY_FILE

    @property
    def heatmaps_dir(self) -> Path:
        return self.path / HEATMAPS_DIR

    @property
    def gallery_path(self) -> Path:
        return self.heatmaps_dir / GALLERY_FILE

    @property
    def report_path(self) -> Path:
        return self.path / REPORT_FILE

    @property
    def evaluations_dir(self) -> Path:
        return self.path / EVALUATIONS_DIR

    @property
    def serve_dir(self) -> Path:
        return self.path / SERVE_DIR

    @property
    def audit_db_path(self) -> Path:
        """The service's audit log (SQLite) when no other database is configured: ``serve/audit.sqlite``."""
        return self.serve_dir / AUDIT_DB_FILE

    @property
    def onnx_path(self) -> Path:
        """``medxai export --format onnx`` writes the network here; ``--backend onnxruntime`` reads it."""
        return self.path / ONNX_FILE

    @property
    def onnx_card_path(self) -> Path:
        """The exported model's card: the run's card plus the export's facts (opset, outputs, parity check)."""
        return self.path / ONNX_CARD_FILE

    # typed reads and writes
    def read_config(self) -> RunConfig:
        """``config.yaml`` as a :class:`RunConfig` (strict: unknown keys are errors)."""
        if not self.config_path.is_file():
            raise CheckpointError(f"{self.path}: no {CONFIG_FILE}; is this a medxai run folder?")
        try:
            text = self.config_path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise CheckpointError(f"{self.config_path}: not a readable medxai configuration ({error})") from None
        values = parse_yaml(text, str(self.config_path))
        if not isinstance(values, dict):
            raise CheckpointError(f"{self.config_path}: not a medxai configuration (expected a mapping)")
        return RunConfig.from_dict(values)

    def training_config(self) -> TrainConfig:
        """The run's training settings (batch size, bootstrap resamples, seed), which later commands reuse so that
        re-evaluating the run reproduces its figures exactly; the defaults when ``config.yaml`` is missing or
        unreadable."""
        try:
            return self.read_config().train
        except (CheckpointError, ConfigError):
            return TrainConfig()

    def data_config(self) -> DataConfig:
        """The run's data settings (for the cache: where it lies and its code type); the defaults when
        ``config.yaml`` is missing or unreadable."""
        try:
            return self.read_config().data
        except (CheckpointError, ConfigError):
            return DataConfig()

    def write_config(self, config: RunConfig) -> Path:
        self.path.mkdir(parents=True, exist_ok=True)
        temporary = self.config_path.with_name(CONFIG_FILE + ".tmp")
        save_config(config, temporary)
        os.replace(temporary, self.config_path)
        return self.config_path

    def read_card(self) -> ModelCard:
        if not self.card_path.is_file():
            raise CheckpointError(f"{self.card_path}: no model card here; is this a medxai run folder?")
        document = _read_json(self.card_path, "model card")
        if not isinstance(document, dict):
            raise CheckpointError(f"{self.card_path}: not a model card (expected an object)")
        return ModelCard.from_dict(document)

    def write_card(self, card: ModelCard) -> Path:
        return _write_json(self.card_path, card.to_dict())

    def read_splits(self) -> dict[str, list[str]]:
        """The ids of each split the run used (``splits/*.txt``)."""
        return read_split_lists(self.splits_dir)

    def write_splits(self, splits: Mapping[str, Sequence[Any]]) -> None:
        write_split_lists(splits, self.splits_dir)

    def read_history(self) -> list[dict[str, float]]:
        """``history.csv`` rows as floats; [] before the first epoch ends."""
        if not self.history_path.is_file():
            return []
        with self.history_path.open(newline="", encoding="utf-8") as handle:
            return [{key: float(value) for key, value in row.items()} for row in csv.DictReader(handle)]

    def write_history(self, rows: Sequence[Mapping[str, Any]]) -> Path:
        temporary = self.history_path.with_name(HISTORY_FILE + ".tmp")
        with temporary.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=HISTORY_FIELDS)
            writer.writeheader()
            writer.writerows(rows)
        os.replace(temporary, self.history_path)
        return self.history_path

    def read_data_check(self) -> dict[str, Any] | None:
        return _read_json(self.data_check_path, DATA_CHECK_FILE) if self.data_check_path.is_file() else None

    def write_data_check(self, document: Mapping[str, Any]) -> Path:
        return _write_json(self.data_check_path, dict(document))

    def read_gallery(self) -> dict[str, Any] | None:
        return _read_json(self.gallery_path, GALLERY_FILE) if self.gallery_path.is_file() else None

    def write_gallery(self, document: Mapping[str, Any]) -> Path:
        return _write_json(self.gallery_path, dict(document))

    def evaluation(self, name: str) -> EvaluationFolder:
        """The folder of the evaluation called ``name`` (``evaluations/<name>/``), existing or not."""
        return EvaluationFolder(self.evaluations_dir / check_folder_name(name, "evaluation name"))

    def evaluations(self) -> list[EvaluationFolder]:
        """Every evaluation of other data this run has, by name."""
        if not self.evaluations_dir.is_dir():
            return []
        return [EvaluationFolder(path) for path in sorted(self.evaluations_dir.iterdir())
                if (path / EVALUATION_FILE).is_file()]

    # what is and is not ours
    def read_run_id(self) -> str | None:
        """The run id of the marker file; None when there is none (runs written before markers existed).

        Raises:
            CheckpointError: a marker that is not one medxai wrote.
        """
        if not self.marker_path.is_file():
            return None
        document = _read_json(self.marker_path, "run marker")
        run_id = document.get("run_id") if isinstance(document, dict) else None
        if not isinstance(run_id, str) or not run_id:
            raise CheckpointError(f"{self.marker_path}: not a medxai run marker (no run_id)")
        return run_id

    def write_marker(self) -> str:
        """Write the marker file with a new random run id (the card and the weights carry it too); return the id."""
        run_id = uuid.uuid4().hex
        from medxai import __version__

        _write_json(self.marker_path, {"run_id": run_id, "medxai_version": __version__,
                                       "created": datetime.datetime.now(datetime.timezone.utc).isoformat()})
        return run_id

    def is_run(self) -> bool:
        """Whether this folder is a medxai run to read from: it has medxai's marker, a readable model card, or a
        ``config.yaml`` that is a complete medxai configuration naming this very folder. (Deleting asks for more:
        :meth:`check_deletable`.)"""
        if self.marker_path.is_file():
            return True
        try:
            self.read_card()
            return True
        except (CheckpointError, ConfigError):
            pass
        try:
            return self.read_config().name == self.path.name
        except (CheckpointError, ConfigError):
            return False

    def check_is_run(self) -> None:
        """Raise a clear error unless :meth:`is_run`."""
        if not self.path.is_dir():
            raise CheckpointError(f"{self.path}: run folder not found")
        if not self.is_run():
            raise CheckpointError(f"{self.path}: not a medxai run folder (no readable {MODEL_CARD_FILE})")

    def check_finished(self) -> None:
        """Raise unless training finished: ``metrics.json`` is written after the calibration, the operating
        threshold, the domain guard and the final weights, so a run without it was stopped before the end.

        Raises:
            CheckpointError: saying what is missing and how to finish the run or use it anyway.
        """
        if self.metrics_path.is_file():
            return
        missing = [METRICS_FILE]
        try:
            card = self.read_card()
        except MedxaiError:
            card = None
        if card is not None and card.calibration is None:
            missing.append("calibration")
        if card is not None and card.is_binary and (card.threshold or {}).get("value") is None:
            missing.append("operating threshold")
        if not self.domain_guard_path.is_file():
            missing.append("domain guard")
        raise CheckpointError(
            f"{self.path} is an unfinished run (its training stopped before the end): no {', '.join(missing)}. "
            f"Finish it with `medxai train --resume --out {self.path.parent} --name {self.path.name}`, or use it as "
            "it is with --allow-unfinished"
        )

    def check_deletable(self) -> None:
        """Raise unless medxai provably wrote this folder and it holds nothing else, so that removing it loses
        nothing of the user's.

        The proof is the marker's run id, carried also by the model card and the weights' embedded card where they
        exist; for a run written before markers existed, the card embedded in ``checkpoints/best.safetensors`` whose
        bound fields equal ``model_card.json``'s. Every file must then be one medxai writes in a run folder
        (:data:`_RUN_LAYOUT`, or the leftover of an interrupted atomic write); links and other files are listed.

        Raises:
            ConfigError: the folder is not provably a medxai run, or holds files medxai did not write.
        """
        if self.path.is_symlink():
            raise ConfigError(f"{self.path} is a link, not a medxai run folder; refusing to delete it")
        problem = self._ownership_problem()
        if problem is not None:
            raise ConfigError(f"{self.path} exists and is not a medxai run folder ({problem}); refusing to delete "
                              "it. Choose another --name or --out")
        foreign = self.foreign_files()
        if foreign:
            listed = ", ".join(foreign[:10]) + (f" and {len(foreign) - 10} more" if len(foreign) > 10 else "")
            raise ConfigError(f"{self.path} holds {len(foreign)} file(s) medxai did not write ({listed}); refusing "
                              "to delete it. Move them out first, or choose another --name or --out")

    def is_deletable(self) -> bool:
        """:meth:`check_deletable` as a yes or no."""
        try:
            self.check_deletable()
        except ConfigError:
            return False
        return True

    def _ownership_problem(self) -> str | None:
        """Why this folder is not provably a run medxai wrote; None when it is."""
        try:
            run_id = self.read_run_id()
            card = self.read_card() if self.card_path.is_file() else None
            if run_id is None:
                return self._legacy_ownership_problem(card)
            if card is not None and card.run_id != run_id:
                return f"its {MODEL_CARD_FILE} belongs to another run"
            for checkpoint in ("best", "last", "ema"):
                path = self.weights_path(checkpoint)
                saved = embedded_card(path) if path.is_file() else None
                if saved is not None and saved.run_id != run_id:
                    return f"{CHECKPOINTS_DIR}/{path.name} belongs to another run"
        except MedxaiError as error:
            return f"unreadable: {error}"
        return None

    def _legacy_ownership_problem(self, card: ModelCard | None) -> str | None:
        """A folder without a marker (written before markers existed) is ours when its best weights embed the
        card it holds: a copied card, or a config.yaml, alone proves nothing."""
        if card is None:
            return f"no {RUN_MARKER_FILE} marker and no readable {MODEL_CARD_FILE}"
        saved = embedded_card(self.weights_path("best")) if self.weights_path("best").is_file() else None
        if saved is None:
            return f"no {RUN_MARKER_FILE} marker, and no {CHECKPOINTS_DIR}/best.safetensors that vouches for its card"
        if card.bound_differences(saved):
            return f"its {MODEL_CARD_FILE} is not the card saved with its weights"
        return None

    def foreign_files(self) -> list[str]:
        """Paths (relative, sorted) of everything under the folder that medxai does not write in a run folder:
        other files, links, pipes."""
        foreign = []
        for folder, subfolders, files in os.walk(self.path):
            for name in sorted(subfolders):
                if Path(folder, name).is_symlink():  # listed, never followed
                    foreign.append(Path(folder, name).relative_to(self.path).as_posix())
            for name in sorted(files):
                path = Path(folder, name)
                relative = path.relative_to(self.path).as_posix()
                if path.is_symlink() or not path.is_file() or not _in_run_layout(relative):
                    foreign.append(relative)
        return sorted(foreign)

    def check_can_create(self, *, overwrite: bool) -> None:
        """Raise unless a new run may be written here: the folder is absent or empty, or (with ``overwrite``) medxai
        provably wrote it and it holds nothing else (:meth:`check_deletable`); and it lies inside no other run
        folder. Nothing is changed; call it before any long work.

        Raises:
            ConfigError: the folder exists and may not be replaced (the message says why and what to do).
        """
        check_folder_name(self.path.name)
        enclosing = _enclosing_run(self.path.parent)
        if enclosing is not None:
            raise ConfigError(f"{self.path} would lie inside the run folder {enclosing}; put runs outside other "
                              "runs (--out)")
        if self.path.exists() and not self.path.is_dir():
            raise ConfigError(f"{self.path} exists and is not a folder; choose another --name or --out")
        if self.path.is_dir() and any(self.path.iterdir()):
            if not overwrite:
                raise ConfigError(
                    f"{self.path} already exists; use --resume to continue it or --overwrite to replace it"
                )
            self.check_deletable()

    def prepare_new(self, *, overwrite: bool, protected: Iterable[str | Path] = ()) -> str:
        """Make the folder ready for a new run and write its marker; return the new run id.

        An absent or empty folder is created. An existing one is replaced only with ``overwrite`` and only when
        medxai provably wrote it (:meth:`check_can_create`); anything else is refused and left as it is.
        ``protected`` paths (the data the run reads) may neither contain nor lie inside the run folder.

        Raises:
            ConfigError: the folder exists and may not be replaced, or overlaps a protected path.
        """
        self.check_can_create(overwrite=overwrite)
        self.check_no_overlap(protected)
        if self.path.is_dir() and any(self.path.iterdir()):
            logger.info("--overwrite: removing the earlier run %s", self.path)
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True, exist_ok=True)
        return self.write_marker()  # first: from here on the folder is provably a medxai run

    def check_resumable(self) -> None:
        """Raise unless the folder holds a run with training state to resume from."""
        if not self.path.is_dir():
            raise ConfigError(f"{self.path}: no such run to resume")
        if not self.state_json_path.is_file() or not self.is_run():
            raise ConfigError(f"{self.path}: nothing to resume (no {CHECKPOINTS_DIR}/state.json of a medxai run)")

    def check_no_overlap(self, protected: Iterable[str | Path]) -> None:
        """Refuse a run folder that is, contains or lies inside one of the ``protected`` paths (the data)."""
        mine = _resolved(self.path)
        for item in protected:
            if _overlap(mine, _resolved(item)):
                raise ConfigError(
                    f"run folder {self.path} overlaps the data at {item}; put runs outside the data (--out)"
                )


def _in_run_layout(relative: str) -> bool:
    """Whether a path relative to a run folder is one medxai writes there (:data:`_RUN_LAYOUT`)."""
    for suffix in _LEFTOVER_SUFFIXES:
        relative = relative.removesuffix(suffix)
    parts = relative.split("/")
    return any(len(pattern.split("/")) == len(parts)
               and all(fnmatch.fnmatchcase(part, wanted) for part, wanted in zip(parts, pattern.split("/")))
               for pattern in _RUN_LAYOUT)


# -- where outputs may go ---------------------------------------------------------------------------------------------
def check_output_location(out: str | Path, *, inputs: Iterable[str | Path] = (), runs: Iterable[str | Path] = (),
                          what: str = "--out") -> None:
    """Refuse an output (a folder or a file) that is, contains or lies inside one of the ``inputs``, or that is,
    contains or lies inside a run folder: one of ``runs``, or any folder that is provably a medxai run
    (:meth:`RunFolder.is_run`). Links are resolved first.

    An output inside its inputs is read back as input by the next run of the same command (``explain in/ --out
    in/maps`` explains its own overlays); an output inside a run folder overwrites the run's files or becomes a file
    the run does not own.

    Args:
        out: the output folder or file.
        inputs: what the command reads (files, folders).
        runs: run folders the command uses.
        what: the option named in the message.

    Raises:
        ConfigError: naming the overlap and what to do.
    """
    target = _resolved(out)
    advice = f"choose another {what}, outside the inputs and outside every run folder"
    for item in inputs:
        if _overlap(target, _resolved(item)):
            raise ConfigError(f"{what} {out} overlaps the input {item} (an output may not be, contain or lie inside "
                              f"what is read: it would be read back as input); {advice}")
    for item in runs:
        if _overlap(target, _resolved(item)):
            raise ConfigError(f"{what} {out} overlaps the run folder {item}; {advice}")
    enclosing = _enclosing_run(target)
    if enclosing is not None:
        raise ConfigError(f"{what} {out} lies inside the run folder {enclosing}; {advice}")
    inner = _run_below(target)
    if inner is not None:
        raise ConfigError(f"{what} {out} contains the run folder {inner}; {advice}")


def _resolved(path: str | Path) -> Path:
    return Path(path).expanduser().resolve()


def _overlap(first: Path, second: Path) -> bool:
    """Whether two resolved paths are the same, or one lies inside the other."""
    return first == second or first.is_relative_to(second) or second.is_relative_to(first)


def _enclosing_run(path: str | Path) -> Path | None:
    """The nearest of ``path`` and its parents that is a medxai run folder (:meth:`RunFolder.is_run`), if any."""
    resolved = _resolved(path)
    return next((folder for folder in (resolved, *resolved.parents) if RunFolder(folder).is_run()), None)


def _run_below(path: Path) -> Path | None:
    """A medxai run folder somewhere below ``path``, if any (links not followed; hidden and system folders such as
    ``.git`` or a ``.venv`` are not searched: no run lies there, and they can hold many thousands of files)."""
    if not path.is_dir():
        return None
    for folder, subfolders, files in os.walk(path):
        subfolders[:] = [name for name in subfolders if not is_hidden_or_system(name)]
        if folder != str(path) and {RUN_MARKER_FILE, MODEL_CARD_FILE, CONFIG_FILE} & set(files) \
                and RunFolder(folder).is_run():
            return Path(folder)
    return None

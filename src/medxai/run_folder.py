"""The run folder: every file name in it, and the typed read and write of each file. No other module spells one.

A run folder is what ``medxai train`` writes and all later commands need (the contract, with every key, is
``docs/run-folder.md``)::

    runs/<name>/
      config.yaml  model_card.json  metrics.json  data_check.json  history.csv  skipped.csv  report.html
      checkpoints/{best,last,state}.safetensors  checkpoints/state.json
      splits/{train,val,test}.txt  figures/*.png  heatmaps/*.png  heatmaps/gallery.json  explain_metrics.json
      evaluations/<name>/{evaluation.json, metrics.json, skipped.csv, figures/, explain_metrics.json}

:class:`RunFolder` gives each path and reads or writes each file as a typed value (a :class:`~medxai.config.RunConfig`,
a :class:`~medxai.models.card.ModelCard`, split lists, history rows, JSON documents). :class:`EvaluationFolder` is the
part a run and an evaluation of other data share (metrics, figures, skipped list), so that an evaluation never writes
into the run's own results. The safety rules live here too: a run name is one plain path component, ``--overwrite``
only ever removes a folder that is provably a medxai run, and a run folder never overlaps the data it was made from.

This module sits between the model stage and training in the pipeline's order: it may import ``config``, ``errors``
and ``models.card``, and every later stage and job may import it.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import re
import shutil
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from medxai.config import DataConfig, RunConfig, TrainConfig
from medxai.data.sources.base import SPLIT_NAMES
from medxai.errors import CheckpointError, ConfigError, DataError
from medxai.models.card import ModelCard

__all__ = [
    "RunFolder",
    "EvaluationFolder",
    "check_folder_name",
    "safe_file_stem",
    "write_skipped",
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
    "REPORT_FILE",
    "FIGURE_KINDS",
]

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"
MODEL_CARD_FILE = "model_card.json"
METRICS_FILE = "metrics.json"
DATA_CHECK_FILE = "data_check.json"
HISTORY_FILE = "history.csv"
SKIPPED_FILE = "skipped.csv"
REPORT_FILE = "report.html"
EXPLAIN_METRICS_FILE = "explain_metrics.json"
EXPLAIN_SKIPPED_FILE = "explain_skipped.csv"
GALLERY_FILE = "gallery.json"
EVALUATION_FILE = "evaluation.json"
PREDICTIONS_FILE = "predictions.csv"
PREDICTIONS_PARQUET_FILE = "predictions.parquet"
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
def write_skipped(path: str | Path, skipped: Iterable[tuple[str, str]]) -> Path:
    """``skipped.csv`` (file, reason): written always, so that files in = results + rows here."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file", "reason"])
        writer.writerows(skipped)
    return path


def read_skipped(path: str | Path) -> list[tuple[str, str]]:
    """The rows of a ``skipped.csv``; [] when there is none."""
    path = Path(path)
    if not path.is_file():
        return []
    with path.open(newline="", encoding="utf-8") as handle:
        return [(row["file"], row["reason"]) for row in csv.DictReader(handle)]


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

    def read_info(self) -> dict[str, Any]:
        """``evaluation.json``: what data was evaluated, how and when; {} for a run's own results."""
        return _read_json(self.info_path, EVALUATION_FILE) if self.info_path.is_file() else {}

    def write_info(self, info: Mapping[str, Any]) -> Path:
        return _write_json(self.info_path, dict(info))


class RunFolder(EvaluationFolder):
    """A training run's folder (see the module docstring for its layout)."""

    # paths
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
            values = yaml.safe_load(self.config_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
            raise CheckpointError(f"{self.config_path}: not a readable medxai configuration ({error})") from None
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
        temporary.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False), encoding="utf-8")
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
    def is_run(self) -> bool:
        """Whether this folder is provably a medxai run: a readable model card, or a ``config.yaml`` that is a
        complete medxai configuration naming this very folder."""
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

    def check_can_create(self, *, overwrite: bool) -> None:
        """Raise unless a new run may be written here: the folder is absent or empty, or (with ``overwrite``) it is
        provably a medxai run (:meth:`is_run`). Nothing is changed; call it before any long work.

        Raises:
            ConfigError: the folder exists and may not be replaced (the message says why and what to do).
        """
        check_folder_name(self.path.name)
        if self.path.exists() and not self.path.is_dir():
            raise ConfigError(f"{self.path} exists and is not a folder; choose another --name or --out")
        if self.path.is_dir() and any(self.path.iterdir()):
            if not overwrite:
                raise ConfigError(
                    f"{self.path} already exists; use --resume to continue it or --overwrite to replace it"
                )
            if not self.is_run():
                raise ConfigError(
                    f"{self.path} exists and is not a medxai run folder (no readable {MODEL_CARD_FILE}, no "
                    f"{CONFIG_FILE} of a run named {self.path.name!r}); refusing to delete it. Choose another --name "
                    "or --out"
                )

    def prepare_new(self, *, overwrite: bool, protected: Iterable[str | Path] = ()) -> None:
        """Make the folder ready for a new run.

        An absent or empty folder is created. An existing one is replaced only with ``overwrite`` and only when it is
        provably a medxai run (:meth:`check_can_create`); anything else is refused and left as it is. ``protected``
        paths (the data the run reads) may neither contain nor lie inside the run folder.

        Raises:
            ConfigError: the folder exists and may not be replaced, or overlaps a protected path.
        """
        self.check_can_create(overwrite=overwrite)
        self.check_no_overlap(protected)
        if self.path.is_dir() and any(self.path.iterdir()):
            logger.info("--overwrite: removing the earlier run %s", self.path)
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True, exist_ok=True)

    def check_resumable(self) -> None:
        """Raise unless the folder holds a run with training state to resume from."""
        if not self.path.is_dir():
            raise ConfigError(f"{self.path}: no such run to resume")
        if not self.state_json_path.is_file() or not self.is_run():
            raise ConfigError(f"{self.path}: nothing to resume (no {CHECKPOINTS_DIR}/state.json of a medxai run)")

    def check_no_overlap(self, protected: Iterable[str | Path]) -> None:
        """Refuse a run folder that is, contains or lies inside one of the ``protected`` paths (the data)."""
        mine = self.path.resolve()
        for item in protected:
            other = Path(item).expanduser().resolve()
            if mine == other or other.is_relative_to(mine) or mine.is_relative_to(other):
                raise ConfigError(
                    f"run folder {self.path} overlaps the data at {item}; put runs outside the data (--out)"
                )

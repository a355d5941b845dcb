"""``medxai predict --engine ray`` / ``medxai explain --engine ray``: the batch jobs of :mod:`.predict` on Ray Data.

The driver expands and names the inputs exactly as :func:`~medxai.jobs.predict.predict_files` does
(:class:`~medxai.jobs.names.InputNames`), so names, pseudonyms and the entries skipped while listing are the same.
Ray Data carries the file rows (input index, path, name, stem) in blocks of one batch each to a pool of actors; each
actor loads the run ONCE (``Classifier.from_run``), decodes its files itself (decoding runs in parallel across the
actors), predicts, and for ``explain`` writes the overlays into ``out``. A batch with an unreadable file is retried
file by file, so one broken file costs nothing else. The driver receives the batches in input order and appends
them to the same files as the single-process jobs, through the same :class:`~medxai.jobs.results.ResultsJournal`
(``predictions.csv`` and ``skipped.csv`` as they come, ``predictions.parquet`` at the end): files in = prediction
rows + skipped rows, each input exactly once, and ``resume`` continues a killed job.

Where it runs: an existing cluster by ``address`` (``"auto"``, ``"ray://head:10001"``), or else a local instance
that binds to loopback only and reaches nothing outside the machine (:func:`ray_session`). On a cluster the run
folder, the inputs and ``out`` must be at the same paths on every node (a shared file system), and medxai must be
installed there.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import torch

from medxai.classifier import Classifier, Explanation, Prediction, read_run_card
from medxai.config import ExplainConfig
from medxai.errors import ConfigError
from medxai.explain.tta import parse_tta
from medxai.jobs.names import InputFile, InputNames
from medxai.jobs.predict import (
    check_ood_action,
    chunk_size,
    one_by_one_on_failure,
    out_of_domain_reason,
    prediction_columns,
    prediction_row,
    write_explanation_files,
)
from medxai.jobs.results import ResultsJournal, prediction_schema
from medxai.run_folder import check_output_location

__all__ = ["RayBatchResult", "predict_with_ray", "ray_session"]

logger = logging.getLogger(__name__)

_LOCALHOST = "127.0.0.1"


@dataclass
class RayBatchResult:
    """What :func:`predict_with_ray` did.

    Attributes:
        inputs: every entry found (files to read and entries skipped while listing).
        predicted: rows of ``predictions.csv`` (with ``resume``, those written before too).
        skipped: ``(name, reason)`` as in ``skipped.csv``.
        files: the files written (``predictions.csv``, ``skipped.csv``, ``predictions.parquet``).
        overlays: overlays written by this call (0 without ``explain``).
        actors: actors in the pool (0 when there was nothing to read).
        gpus_per_actor: GPUs each actor held (0: CPU actors).
    """

    inputs: int
    predicted: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)
    overlays: int = 0
    actors: int = 0
    gpus_per_actor: float = 0.0


def predict_with_ray(
    run_dir: str | Path,
    items: Sequence[str | Path],
    out: str | Path,
    *,
    address: str | None = None,
    actors: int | None = None,
    batch_size: int | None = None,
    device: str = "auto",
    hash_names: bool = False,
    ood_action: str = "mark",
    explain: ExplainConfig | None = None,
    target: int | str | None = None,
    resume: bool = False,
    allow_unfinished: bool = False,
) -> RayBatchResult:
    """Classify (and with ``explain``, explain) files and folders on Ray, writing into ``out`` what
    :func:`~medxai.jobs.predict.predict_files` (:func:`~medxai.jobs.predict.explain_files`) writes there.

    Args:
        run_dir: the trained run folder (at the same path on every node of a cluster).
        items: files and folders, expanded and named as :class:`~medxai.jobs.names.InputNames` does.
        out: output folder (on a cluster: shared by every node, since the actors write overlays there).
        address: an existing Ray cluster (``"auto"``, ``"ray://head:10001"``); None starts a local instance on
            loopback, unless Ray is already initialised in this process, which is then used as it is.
        actors: actors in the pool; None: one per GPU of the cluster with GPU actors, else one per CPU core
            (never more than there are batches).
        batch_size: files per Ray batch, decoded together, and images per forward pass; None: the run's training
            batch size, at most 32 to predict and :data:`~medxai.jobs.predict.EXPLAIN_CHUNK` to explain (the
            single-process jobs' batches).
        device: ``auto`` (GPU actors when the cluster has GPUs), ``cpu``, or ``cuda`` (GPU actors, an error without
            GPUs); Ray assigns each GPU actor its GPU, so ``cuda:N`` means ``cuda``.
        hash_names: name inputs by pseudonyms in every output (see :mod:`medxai.jobs.names`).
        ood_action: see :data:`~medxai.jobs.predict.OOD_ACTIONS`.
        explain: None for predictions only; a config to also write an overlay per input (``<stem>.png`` at the
            original resolution, a red banner when out of domain; raw maps too with ``save_npy``; ``tta``
            honoured).
        target: the class to explain (index or label name); None: the label the decision rule reports.
        resume: keep what ``out`` holds already and process only the inputs in neither of its files.
        allow_unfinished: use a run whose training stopped before the end.

    Raises:
        ConfigError: Ray is not installed, the cluster cannot be reached, an option is invalid, or ``out`` overlaps
            the inputs or a run folder.
        CheckpointError: ``run_dir`` is not a trained run, is unfinished, or its card is not its weights'.
    """
    check_ood_action(ood_action)
    if actors is not None and actors < 1:
        raise ConfigError(f"--actors must be at least 1, got {actors}")
    if batch_size is not None and batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {batch_size}")
    device = _check_device(device)
    check_output_location(out, inputs=items, runs=[run_dir])
    _import_ray()  # fail before any work when the extra is missing
    run, card = read_run_card(run_dir, allow_unfinished=allow_unfinished)  # refused here, before any actor loads it
    label_names = list(card.label_names)
    batch_size = batch_size or chunk_size(run.training_config().batch_size, explaining=explain is not None)
    folder = Path(out)
    names = InputNames(items, hash_names=hash_names)
    result = RayBatchResult(inputs=len(names))
    with names.redacted_logs(), ResultsJournal(folder, prediction_columns(label_names), names,
                                                resume=resume) as journal:
        listed, todo = journal.pending()
        journal.write([], listed)
        if todo:
            with ray_session(address) as ray:
                pool = _pool(ray, actors, device, batches=math.ceil(len(todo) / batch_size))
                result.actors, result.gpus_per_actor = pool.actors, pool.gpus_per_actor
                logger.info("%s %d file(s) on %d Ray actor(s) (%s), %d per batch",
                            "explaining" if explain else "predicting", len(todo), pool.actors,
                            f"{pool.gpus_per_actor:g} GPU each" if pool.gpus_per_actor else "CPU", batch_size)
                worker = {"run_dir": str(run.path.resolve()), "device": pool.device, "batch_size": batch_size,
                          "threads": pool.threads, "label_names": label_names, "ood_action": ood_action,
                          "explain": explain, "target": target, "out": str(folder.resolve()),
                          "allow_unfinished": allow_unfinished}
                for table in _run(ray, todo, batch_size, pool, worker):
                    rows, skipped = _split(table, names)
                    journal.write(rows, skipped)
                    result.overlays += sum(row.get("overlay") is not None for row in rows)
        result.files = journal.close()
        result.predicted, result.skipped = journal.written, list(journal.skipped)
        logger.info("wrote %d prediction(s) to %s, %d skipped", result.predicted, folder, len(result.skipped))
    return result


@contextlib.contextmanager
def ray_session(address: str | None = None) -> Iterator[Any]:
    """The ``ray`` module, initialised: the instance this process already has, else ``address``'s cluster, else a
    new local instance on every core of this machine that binds to loopback only and reaches nothing outside it
    (see :func:`_start_local`). Only an instance started here is shut down on exit.

    Raises:
        ConfigError: Ray is not installed, or the cluster at ``address`` cannot be reached.
    """
    ray = _import_ray()
    if ray.is_initialized():
        (logger.info if address else logger.debug)("using the Ray instance this process already has")
        yield ray
        return
    with contextlib.ExitStack() as stack:
        if address is None:
            _start_local(ray, stack)
        else:
            try:
                ray.init(address=address)
            except ConnectionError as error:
                raise ConfigError(f"cannot reach the Ray cluster at {address}: {error}") from None
        try:
            yield ray
        finally:
            ray.shutdown()


#: The environment of the processes a local instance starts (see :func:`_start_local`).
_LOCAL_ONLY_ENVIRONMENT = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    **{name: f"http://{_LOCALHOST}:9" for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY")},
    **{name: f"{_LOCALHOST},localhost,::1" for name in ("no_proxy", "NO_PROXY")},
}


def _start_local(ray: Any, stack: contextlib.ExitStack) -> None:
    """``ray.init`` of an instance on this machine of which nothing listens beyond loopback or reaches out.

    - Ray's single-machine mode (its switch for Windows and macOS): the node's address is 127.0.0.1, so its gRPC
      servers bind to loopback. By default they bind to every interface, and the driver finds the node's address
      from a route towards 8.8.8.8. The switch is read when ray is imported, so its constant is set too (and put
      back once the instance is shut down: ``stack``).
    - No usage statistics.
    - Ray's API-server process, which runs even without the dashboard, asks the cloud metadata service which cloud
      it is on (HTTP to 169.254.169.254, a DNS look-up of metadata.google.internal) whatever the usage-stats
      setting. Its HTTP client honours the proxy variables, so the processes started now get a proxy on a loopback
      port where nothing answers: the question fails at once and never leaves the machine. Loopback is exempt
      (``no_proxy``), so Ray's own connections, all on loopback, are untouched.

    The processes ``ray.init`` starts inherit these variables (and pass them to the workers they start later);
    this process gets its own environment back as soon as ``ray.init`` returns.
    """
    constants = ray._private.ray_constants
    stack.callback(setattr, constants, "ENABLE_RAY_CLUSTER", constants.ENABLE_RAY_CLUSTER)
    constants.ENABLE_RAY_CLUSTER = False
    saved = {name: os.environ.get(name) for name in _LOCAL_ONLY_ENVIRONMENT}
    os.environ.update(_LOCAL_ONLY_ENVIRONMENT)
    try:
        ray.init(num_cpus=_machine_cores(), include_dashboard=False)
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


# ----------------------------------------------------------------------------------------------------------------
# The driver's side.

@dataclass(frozen=True)
class _Pool:
    actors: int
    device: str  # what each actor's Classifier runs on
    gpus_per_actor: float
    cpus_per_actor: float
    threads: int  # torch threads per actor


def _pool(ray: Any, actors: int | None, device: str, *, batches: int) -> _Pool:
    """GPU actors when the cluster has GPUs and ``device`` allows them, else CPU actors sharing the cores; never
    more actors than batches (each would load the run for nothing)."""
    resources = ray.cluster_resources()
    cpus, gpus = float(resources.get("CPU", 1)), float(resources.get("GPU", 0))
    use_gpu = device != "cpu" and gpus >= 1
    if device.startswith("cuda") and not use_gpu:
        raise ConfigError(f"device '{device}' requested but the Ray cluster has no GPU")
    if actors is None:
        actors = int(gpus) if use_gpu else max(1, int(cpus))
    actors = min(actors, batches)
    share = max(cpus / actors, 0.01)  # a fractional share still schedules when there are more actors than cores
    if use_gpu:  # a whole GPU each while there are enough; decoding and preprocessing use a share of the cores
        return _Pool(actors, "cuda", min(1.0, gpus / actors), min(1.0, share), max(1, int(share)))
    return _Pool(actors, "cpu", 0.0, share, max(1, int(share)))


def _run(ray: Any, files: Sequence[InputFile], batch_size: int, pool: _Pool, worker: dict) -> Iterator[pa.Table]:
    """The actors' output tables, in input order."""
    # One block per batch of consecutive inputs, as the single-process jobs batch them.
    blocks = [_block(files[start : start + batch_size], start) for start in range(0, len(files), batch_size)]
    context = ray.data.DataContext.get_current()
    preserve_order = context.execution_options.preserve_order
    context.execution_options.preserve_order = True  # rows come back in input order: streamed, never sorted
    try:
        dataset = ray.data.from_arrow(blocks).map_batches(
            _Predictor,
            batch_size=batch_size,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=pool.actors),
            num_cpus=pool.cpus_per_actor,
            num_gpus=pool.gpus_per_actor,
            fn_constructor_kwargs=worker,
        )
        yield from dataset.iter_batches(batch_format="pyarrow", batch_size=None)
    finally:
        context.execution_options.preserve_order = preserve_order


def _block(files: Sequence[InputFile], start: int) -> pa.Table:
    """The rows an actor gets: input index, where to read, what to call it, its output files' stem."""
    return pa.table({"index": list(range(start, start + len(files))), "path": [str(file.path) for file in files],
                     "name": [file.name for file in files], "stem": [file.stem for file in files]})


def _split(table: pa.Table, names: InputNames) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
    """One batch's prediction rows and skipped entries, the unreadable files before the out-of-domain ones (the
    order :func:`~medxai.jobs.predict.predict_files` gives them)."""
    rows = table.filter(pc.equal(table["status"], "ok")).drop_columns(["index", "status", "reason"]).to_pylist()
    unreadable, out_of_domain = [], []
    for row in table.filter(pc.not_equal(table["status"], "ok")).select(["file", "in_domain", "reason"]).to_pylist():
        if row["in_domain"] is False:  # predicted, then left out (ood_action="skip")
            out_of_domain.append((row["file"], row["reason"]))
        else:
            reason = names.redact(row["reason"])  # a reader's words may quote the real path
            unreadable.append((row["file"], reason))
            logger.warning("skipped %s: %s", row["file"], reason)
    if out_of_domain:
        logger.warning("%d input(s) out of the training domain left out (--ood-action skip); see skipped.csv",
                       len(out_of_domain))
    return rows, unreadable + out_of_domain


# ----------------------------------------------------------------------------------------------------------------
# The actors' side.

def _schema(label_names: Sequence[str], *, overlays: bool) -> pa.Schema:
    """Every column an actor returns: the input index, the prediction columns, the overlay's file name (relative to
    ``out``), and ``status`` (``ok`` / ``skipped``) with its ``reason``."""
    fields = [pa.field("index", pa.int64()), *prediction_schema(prediction_columns(label_names))]
    if overlays:
        fields.append(pa.field("overlay", pa.string()))
    return pa.schema([*fields, pa.field("status", pa.string()), pa.field("reason", pa.string())])


class _Predictor:
    """A Ray Data actor: loads the run once, then predicts (and explains) one batch of file rows per call."""

    def __init__(self, *, run_dir: str, device: str, batch_size: int, threads: int, label_names: list[str],
                 ood_action: str, explain: ExplainConfig | None, target: int | str | None, out: str,
                 allow_unfinished: bool) -> None:
        torch.set_num_threads(threads)
        self.classifier = Classifier.from_run(run_dir, device=device, batch_size=batch_size,
                                              tta=parse_tta(explain.tta) if explain is not None else (),
                                              allow_unfinished=allow_unfinished)
        self.label_names = label_names
        self.ood_action = ood_action
        self.explain = explain
        self.target = target
        self.out = Path(out)
        self.schema = _schema(label_names, overlays=explain is not None)

    def __call__(self, batch: pa.Table) -> pa.Table:
        results, failures = one_by_one_on_failure(self._rows, batch.to_pylist())
        results += [{"index": row["index"], "file": row["name"], "status": "skipped", "reason": error.reason}
                    for row, error in failures]
        results.sort(key=lambda row: row["index"])
        return pa.Table.from_pylist(results, schema=self.schema)

    def _rows(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """One output row per input row; raises :class:`InvalidImageError` before writing anything."""
        paths, ids = [row["path"] for row in rows], [row["name"] for row in rows]
        if self.explain is None:
            return [self._row(row, prediction) for row, prediction in
                    zip(rows, self.classifier.predict(paths, ids=ids))]
        explanations = self.classifier.explain(paths, ids=ids, method=self.explain.method, target=self.target,
                                               layer=self.explain.layer)
        return [self._row(row, explanation.prediction, explanation) for row, explanation in zip(rows, explanations)]

    def _row(self, row: dict[str, Any], prediction: Prediction, explanation: Explanation | None = None
             ) -> dict[str, Any]:
        values = {"index": row["index"], **prediction_row(prediction, self.label_names), "status": "ok",
                  "reason": None}
        if self.ood_action == "skip" and prediction.in_domain is False:
            values.update(status="skipped", reason=out_of_domain_reason(prediction))
        elif explanation is not None:
            values["overlay"] = self._write_overlay(row, explanation)
        return values

    def _write_overlay(self, row: dict[str, Any], explanation: Explanation) -> str:
        file = InputFile(Path(row["path"]), row["name"], row["stem"])
        return write_explanation_files(explanation, file, self.out, self.explain).overlay.name


# ----------------------------------------------------------------------------------------------------------------

def _import_ray() -> Any:
    try:
        import ray
        import ray.data  # the [data] extra, beside Ray's core
    except ImportError:
        raise ConfigError("the Ray engine needs Ray Data: pip install 'medxai[ray]'") from None
    return ray


def _check_device(device: str) -> str:
    if device in ("auto", "cpu") or device == "cuda" or (device.startswith("cuda:") and device[5:].isdigit()):
        return device
    raise ConfigError(f"unknown device '{device}' for the Ray engine (use auto, cpu or cuda)")


def _machine_cores() -> int:
    """The cores this process may use (its CPU affinity, which containers and ``taskset`` narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1

"""``medxai export``: a trained run's network as an ONNX file, checked against PyTorch on real images.

The graph (:func:`medxai.models.onnx.export_onnx`) takes the normalised input batch and returns the logits and the
stage statistics the out-of-domain guard reads, so that ``backend="onnxruntime"`` predicts exactly as PyTorch does:
preprocessing, calibration, threshold and guard stay the run's. Beside the file goes its card (``model.onnx.json``,
or ``<out>.json``): the run's model card, the export's facts, the parity check and the SHA-256 of the weights it was
made from, which the onnxruntime backend checks before it trusts the file.

The parity check runs both backends on the same preprocessed images: the files given, else up to
:data:`PARITY_IMAGES` images of the run's own validation (or test) split; only when the run's data cannot be read
are synthetic noise images used, and the card says so. A file that misses the tolerance is not kept.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medxai.classifier import Classifier, DecodedInput
from medxai.data import open_source, read_image_with_info
from medxai.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    InvalidImageError,
    MedxaiError,
)
from medxai.jobs.evaluate import select_records
from medxai.jobs.names import InputNames
from medxai.models.checkpoint import GUARD_DIGEST_KEY, NO_GUARD
from medxai.models.onnx import ONNX_OPSET, OnnxModel, export_onnx, file_sha256, parity
from medxai.run_folder import RunFolder, check_output_location, onnx_card_path_for, write_onnx_card

__all__ = ["EXPORT_FORMATS", "PARITY_IMAGES", "PARITY_TOLERANCE", "ExportResult", "export_run"]

logger = logging.getLogger(__name__)

EXPORT_FORMATS = ("onnx",)
#: Images of the run's own data the parity check uses when no files are given.
PARITY_IMAGES = 16
#: The largest |logit difference| between PyTorch and ONNX Runtime an export may show on the run's images: float32
#: arithmetic in another order differs by about 1e-6 of the logits' size on these networks, a wrong graph by far more.
PARITY_TOLERANCE = 1e-4


@dataclass
class ExportResult:
    """What :func:`export_run` wrote: the model file, its card, the parity check and the export's facts."""

    path: Path
    card_path: Path
    parity: dict[str, Any]
    facts: dict[str, Any]


def export_run(
    run_dir: str | Path,
    *,
    format: str = "onnx",
    out: str | Path | None = None,
    opset: int = ONNX_OPSET,
    images: list[str | Path] | None = None,
    checkpoint: str = "best",
    device: str = "cpu",
    overwrite: bool = False,
    allow_unfinished: bool = False,
) -> ExportResult:
    """Export a run's network and check it against PyTorch.

    Args:
        run_dir: the run folder.
        format: only ``onnx``.
        out: the file to write; default the run folder's ``model.onnx`` (which is the run's own and is replaced).
        opset: the ONNX operator set.
        images: files or folders for the parity check; default the run's own validation (or test) images.
        checkpoint: ``best``, ``last`` or ``ema``.
        device: where both backends run for the parity check.
        overwrite: replace an existing ``out`` (or its card); a run folder's own export is always replaced.
        allow_unfinished: export a run whose training stopped before the end.

    Raises:
        ConfigError: another format, an existing ``out`` without ``overwrite``, an ``out`` inside the parity images
            or inside a run folder other than as the run's own ``model.onnx``, ONNX not installed, or an
            architecture that cannot be exported.
        CheckpointError: not a run, an unfinished run, or the export misses the parity tolerance (nothing is kept
            then).
        DataError: none of the given ``images`` could be read.
    """
    if format not in EXPORT_FORMATS:
        raise ConfigError(f"export format must be one of {list(EXPORT_FORMATS)}, got {format!r}")
    run = RunFolder(run_dir)
    run.check_is_run()
    path = run.onnx_path if out is None else Path(out)
    card_path = run.onnx_card_path if out is None else onnx_card_path_for(path)
    own_export = path.resolve() == run.onnx_path.resolve()
    if not own_export:
        check_output_location(path, inputs=images or [], runs=[run.path])
    if out is not None and not overwrite:
        existing = [str(item) for item in (path, card_path) if item.exists()]
        if existing and not own_export:
            raise ConfigError(f"{', '.join(existing)} already exist(s); use --overwrite to replace")
    classifier = Classifier.from_run(run.path, checkpoint=checkpoint, device=device, allow_unfinished=allow_unfinished)
    weights_sha256 = file_sha256(run.weights_path(checkpoint))  # what the onnxruntime backend checks against
    guard_sha256 = file_sha256(run.domain_guard_path) if run.domain_guard_path.is_file() else NO_GUARD
    partial = path.with_name(path.name + ".partial")
    facts = export_onnx(classifier.model, classifier.card, partial, opset=opset)
    facts["checkpoint"] = checkpoint
    try:
        onnx_model = OnnxModel(partial, device=classifier.device)
        check = _parity(classifier, onnx_model, run, images)
        del onnx_model  # the session lets go of the file before it is renamed
        if check["max_abs_logit_diff"] > check["tolerance"] or not check["argmax_identical"]:
            raise CheckpointError(
                f"the ONNX export of {run.path} does not reproduce PyTorch (max |logit difference| "
                f"{check['max_abs_logit_diff']:.3g}, tolerance {check['tolerance']:.3g}; same classes: "
                f"{check['argmax_identical']}); nothing was written"
            )
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    document = {
        **classifier.card.to_dict(),
        "export": facts,
        "parity": check,
        "source_weights_sha256": weights_sha256,
        GUARD_DIGEST_KEY: guard_sha256,  # the onnxruntime backend refuses another guard
    }
    write_onnx_card(card_path, document)
    logger.info("wrote %s (%s exporter, opset %s); parity on %d images (%s): max |logit difference| %.2g", path,
                facts["exporter"], facts["opset"], check["n"], check["images"], check["max_abs_logit_diff"])
    return ExportResult(path, card_path, check, facts)


def _parity(classifier: Classifier, onnx_model: OnnxModel, run: RunFolder, images: list[str | Path] | None
            ) -> dict[str, Any]:
    """:func:`~medxai.models.onnx.parity` over the parity images, batch by batch, with where they came from."""
    if images:
        inputs, origin = _given_images(images), "given files"
    else:
        inputs, origin = _run_images(run)
        if not inputs:
            logger.warning("the data of %s cannot be read here: the ONNX parity check uses synthetic noise images",
                           run.path)
            inputs, origin = _noise_images(classifier), "synthetic (run data not found)"
    result: dict[str, Any] = {"images": origin, "n": 0, "argmax_identical": True}
    for start in range(0, len(inputs), classifier.batch_size):
        batch = classifier.prepare_batch(inputs[start : start + classifier.batch_size])
        part = parity(classifier.model, onnx_model, batch)
        result["n"] += part.pop("n")
        result["argmax_identical"] = result["argmax_identical"] and part.pop("argmax_identical")
        for key, value in part.items():  # the largest differences and magnitudes over all batches
            result[key] = max(result.get(key, 0.0), value)
    result["tolerance"] = PARITY_TOLERANCE
    return result


def _given_images(items: list[str | Path]) -> list[DecodedInput]:
    """The readable files among ``items`` (folders expanded), decoded; an unreadable one is logged and left out."""
    names = InputNames(items)
    decoded = []
    for file in names.files:
        try:
            image, info = read_image_with_info(file.path)
        except InvalidImageError as error:
            logger.warning("parity check: skipped %s (%s)", file.name, error.reason)
            continue
        decoded.append(DecodedInput(file.name, image, info))
    if not decoded:
        raise DataError(f"none of the {len(names)} parity image(s) given could be read")
    return decoded


def _run_images(run: RunFolder) -> tuple[list[DecodedInput], str]:
    """Up to :data:`PARITY_IMAGES` images of the run's validation split (else test), read through its data source;
    ``[]`` when the data is not there (moved, another machine, a MedMNIST file not downloaded)."""
    try:
        data = run.read_config().data
        source = open_source(data.source, patient_pattern=data.patient_pattern, split_folders=data.split_folders)
        splits = run.read_splits()
    except (MedxaiError, OSError) as error:
        logger.warning("the run's data is not readable for the ONNX parity check: %s", error)
        return [], ""
    for split in ("val", "test"):
        if split not in splits:
            continue
        try:
            records = select_records(source, split, run, True, data.source)[0]
        except (MedxaiError, OSError) as error:
            logger.debug("no %s records for the parity check: %s", split, error)
            continue
        decoded, unreadable = [], 0
        for record in records:
            try:
                sample = source.load(record)
            except (MedxaiError, OSError):
                unreadable += 1  # counted, not named: record ids can be file names
                continue
            decoded.append(DecodedInput(str(record.id), sample.image))
            if len(decoded) == PARITY_IMAGES:
                break
        if unreadable:
            logger.warning("parity check: %d image(s) of the run's %s split could not be read", unreadable, split)
        if decoded:
            return decoded, f"the run's {split} split"
    return [], ""


def _noise_images(classifier: Classifier, count: int = 8, seed: int = 0) -> list[DecodedInput]:
    """Uniform noise images at the model's input size, in its channel count (8-bit, as a file would decode)."""
    generator = np.random.default_rng(seed)
    size = classifier.card.input_size
    shape = (size, size) if classifier.card.in_chans == 1 else (size, size, 3)
    return [DecodedInput(f"noise[{index}]", generator.integers(0, 256, size=shape, dtype=np.uint8))
            for index in range(count)]

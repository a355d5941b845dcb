"""The model behind the service: a run's :class:`~medxai.classifier.Classifier`, fed whole batches.

The engine decodes uploads (in the request's thread, from memory, with the readers' content sniffing and the
service's own limits), runs batches the :class:`~medxai.serve.batcher.MicroBatcher` gathered (on its one worker
thread), and says what the model is (``id``: the run folder's name; ``version``: the first 12 hex digits of a SHA-256
over the weights, the model card's bound fields and the domain guard, so that a retrained model, an edited card or
another guard never answers under an old version).

Decoding memory is bounded per upload and in total: each upload's decode cost is estimated from its header before a
byte is decoded (:func:`~medxai.data.readers.probe_image_bytes`); one beyond ``--max-decoded-mb`` is refused at once
(413), and the others wait in a :class:`DecodeBudget` until at most ``--max-decodes`` decodes of at most
``--decode-budget-mb`` together are running.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import threading
from collections.abc import Hashable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medxai.classifier import Classifier, DecodedInput
from medxai.config import ServeConfig
from medxai.data.readers import ReadLimits, probe_image_bytes, read_image_bytes
from medxai.errors import ConfigError, MedxaiError
from medxai.explain import CAM_METHODS, get_cam_method
from medxai.models.onnx import file_sha256
from medxai.run_folder import RunFolder

__all__ = ["PREDICT", "UPLOAD_NAME", "DecodeBudget", "Engine", "ModelIdentity", "explain_key", "upload_limits"]

logger = logging.getLogger(__name__)

#: What uploads are called in errors and logs: never the client's file name.
UPLOAD_NAME = "upload"
#: The batch key of predictions; explanations have one per method and target (:func:`explain_key`).
PREDICT = ("predict",)
DEFAULT_METHOD = "gradcam"


def explain_key(method: str, target: str | None) -> tuple[str, str, str | None]:
    return ("explain", method, target)


@dataclass(frozen=True)
class ModelIdentity:
    """What answers: the run's name and a content version of its weights, card and domain guard."""

    id: str
    version: str
    medxai_version: str

    def to_dict(self) -> dict[str, str]:
        return {"id": self.id, "version": self.version, "medxai_version": self.medxai_version}


_MB = 1024 * 1024


def upload_limits(config: ServeConfig) -> ReadLimits:
    """The readers' limits for one upload, from the service's settings (named in the 413 answers)."""
    return ReadLimits(max_pixels=config.max_pixels, max_voxels=config.max_voxels,
                      max_decoded_bytes=int(config.max_decoded_mb * _MB), pixels_setting="--max-pixels",
                      voxels_setting="--max-voxels", bytes_setting="--max-decoded-mb")


class DecodeBudget:
    """How many uploads are decoded at once, and how much memory (estimated from their headers) they take together.

    A decode waits until it is among the first ``max_decodes`` and its cost fits beside the others' within
    ``max_bytes``; one that costs more than ``max_bytes`` alone runs when nothing else does, so no request waits
    for ever on a budget it can never fit.
    """

    def __init__(self, max_decodes: int, max_bytes: int) -> None:
        if max_decodes < 1 or max_bytes < 1:
            raise ConfigError("--max-decodes and --decode-budget-mb must be positive")
        self.max_decodes = max_decodes
        self.max_bytes = max_bytes
        self.decodes = 0
        self.reserved = 0
        self._changed = threading.Condition()

    @contextlib.contextmanager
    def reserve(self, cost: int, timeout: float) -> Iterator[None]:
        """Hold ``cost`` bytes and one decode while the block runs.

        Raises:
            TimeoutError: the budget did not allow it within ``timeout`` seconds.
        """
        with self._changed:
            if not self._changed.wait_for(lambda: self._fits(cost), timeout):
                raise TimeoutError(f"no decode slot within {timeout:g} s")
            self.decodes += 1
            self.reserved += cost
        try:
            yield
        finally:
            with self._changed:
                self.decodes -= 1
                self.reserved -= cost
                self._changed.notify_all()

    def _fits(self, cost: int) -> bool:
        if self.decodes >= self.max_decodes:
            return False
        return self.decodes == 0 or self.reserved + cost <= self.max_bytes


class Engine:
    """A loaded run, ready for batches of decoded uploads.

    Args:
        classifier: the run's classifier.
        identity: what answers.
        config: the service's settings, for decoding: the upload limits (:func:`upload_limits`), the decode budget
            and how long a decode may wait for it (``timeout_s``); a default :class:`ServeConfig` when None.
    """

    def __init__(self, classifier: Classifier, identity: ModelIdentity, config: ServeConfig | None = None) -> None:
        config = config or ServeConfig()
        self.classifier = classifier
        self.identity = identity
        self.limits = upload_limits(config)
        self.budget = DecodeBudget(config.max_decodes, int(config.decode_budget_mb * _MB))
        self.wait_s = config.timeout_s

    @classmethod
    def load(cls, run_dir: str | Path, config: ServeConfig) -> Engine:
        """Load the run's best checkpoint on ``config.device`` with ``config.backend``; batches of up to
        ``config.max_batch``; uploads decoded within ``config``'s limits and budget."""
        run = RunFolder(run_dir)
        classifier = Classifier.from_run(run.path, device=config.device, batch_size=config.max_batch,
                                         backend=config.backend, allow_unfinished=config.allow_unfinished)
        if config.channels_last:
            classifier.use_channels_last()
        identity = ModelIdentity(run.path.name, _weights_version(run, classifier), classifier.card.medxai_version)
        return cls(classifier, identity, config)

    @property
    def backend(self) -> str:
        return self.classifier.backend

    @property
    def can_explain(self) -> bool:
        """CAMs need gradients: the PyTorch backend only."""
        return self.backend == "torch"

    # -- per request, in the request's thread ------------------------------------------------------------------
    def decode(self, data: bytes) -> DecodedInput:
        """An upload's bytes as an image: content sniffed, decoded from memory within the upload limits, once the
        decode budget allows (see the module docstring).

        Raises:
            ImageTooLargeError: the header claims more than the limits (before anything is decoded).
            InvalidImageError: empty, not an image, truncated, a damaged header, a DICOM object without pixels,
                anything a decoder did not anticipate.
            TimeoutError: the decode budget stayed full for ``wait_s`` seconds.
        """
        cost = probe_image_bytes(data, name=UPLOAD_NAME, limits=self.limits)["decoded_bytes"]
        with self.budget.reserve(cost, self.wait_s):
            image, info = read_image_bytes(data, name=UPLOAD_NAME, limits=self.limits)
        return DecodedInput(UPLOAD_NAME, image, info)

    def check_explain(self, method: str, target: str | None) -> str:
        """The canonical method name, once the method, the target and the backend are known to work.

        Raises:
            ConfigError: an unknown method or target label.
        """
        cam_class = get_cam_method(method)
        name = next(key for key, value in CAM_METHODS.items() if value is cam_class)
        if target is not None:
            self.classifier.target_index(target)
        return name

    # -- per batch, on the batcher's worker thread ---------------------------------------------------------------
    def run_batch(self, key: Hashable, items: list[DecodedInput]) -> Sequence[Any]:
        """Predictions (``PREDICT``) or explanations (:func:`explain_key`) of a batch, one result per item; an
        item that fails alone gets its error as its result, and the others their results.

        An item's :class:`~medxai.errors.MedxaiError` (an image too small, a shape the model cannot take) is the
        client's error, returned, never raised: the batcher logs what a batch raises as a failure of the service."""
        try:
            return self._run(key, items)
        except MedxaiError as error:
            if len(items) == 1:
                return [error]
        results: list[Any] = []
        for item in items:  # one bad item must not cost the others their answers
            try:
                results.extend(self._run(key, [item]))
            except MedxaiError as error:
                results.append(error)
        return results

    def _run(self, key: Hashable, items: list[DecodedInput]) -> list[Any]:
        if key == PREDICT:
            return self.classifier.predict(items)
        _, method, target = key
        return self.classifier.explain(items, method=method, target=target)

    def warm_up(self) -> None:
        """One prediction (and one explanation, where the backend can) of a blank image at the model's input size:
        the first batch allocates and compiles what later ones reuse, so readiness means a warm model."""
        size, channels = self.classifier.card.input_size, self.classifier.card.in_chans
        shape = (size, size) if channels == 1 else (size, size, 3)
        blank = DecodedInput("warm-up", np.full(shape, 128, dtype=np.uint8))
        self.run_batch(PREDICT, [blank])
        if self.can_explain:
            self.run_batch(explain_key(DEFAULT_METHOD, None), [blank])
        logger.info("model %s version %s warmed up (%s backend, device %s)", self.identity.id,
                    self.identity.version, self.backend, self.classifier.device)


def _weights_version(run: RunFolder, classifier: Classifier) -> str:
    """The first 12 hex digits of a SHA-256 over everything that decides the answers: the network's file (the best
    weights, or the ONNX export when the weights are not there), the bound fields of the card
    (:meth:`~medxai.models.card.ModelCard.bound_digest`) and the domain guard file."""
    network = run.weights_path("best")
    if classifier.backend == "onnxruntime" and not network.is_file():
        network = run.onnx_path
    guard = run.domain_guard_path
    parts = (file_sha256(network), classifier.card.bound_digest(), file_sha256(guard) if guard.is_file() else "none")
    return hashlib.sha256(":".join(parts).encode("ascii")).hexdigest()[:12]

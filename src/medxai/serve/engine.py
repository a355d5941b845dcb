"""The model behind the service: a run's :class:`~medxai.classifier.Classifier`, fed whole batches.

The engine decodes uploads (in the request's thread, with the readers' content sniffing and size limits), runs
batches the :class:`~medxai.serve.batcher.MicroBatcher` gathered (on its one worker thread), and says what the model
is (``id``: the run folder's name; ``version``: the first 12 hex digits of a SHA-256 over the weights, the model
card's bound fields and the domain guard, so that a retrained model, an edited card or another guard never answers
under an old version).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medxai.classifier import Classifier, DecodedInput
from medxai.config import ServeConfig
from medxai.data.readers import read_image_bytes
from medxai.errors import MedxaiError
from medxai.explain import CAM_METHODS, get_cam_method
from medxai.models.onnx import file_sha256
from medxai.run_folder import RunFolder

__all__ = ["PREDICT", "UPLOAD_NAME", "Engine", "ModelIdentity", "explain_key"]

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


class Engine:
    """A loaded run, ready for batches of decoded uploads."""

    def __init__(self, classifier: Classifier, identity: ModelIdentity) -> None:
        self.classifier = classifier
        self.identity = identity

    @classmethod
    def load(cls, run_dir: str | Path, config: ServeConfig) -> Engine:
        """Load the run's best checkpoint on ``config.device`` with ``config.backend``; batches of up to
        ``config.max_batch``."""
        run = RunFolder(run_dir)
        classifier = Classifier.from_run(run.path, device=config.device, batch_size=config.max_batch,
                                         backend=config.backend)
        if config.channels_last:
            classifier.use_channels_last()
        return cls(classifier, ModelIdentity(run.path.name, _weights_version(run, classifier),
                                             classifier.card.medxai_version))

    @property
    def backend(self) -> str:
        return self.classifier.backend

    @property
    def can_explain(self) -> bool:
        """CAMs need gradients: the PyTorch backend only."""
        return self.backend == "torch"

    # -- per request, in the request's thread ------------------------------------------------------------------
    def decode(self, data: bytes) -> DecodedInput:
        """An upload's bytes as an image (content sniffed; the readers' limits apply).

        Raises:
            InvalidImageError: empty, not an image, truncated, too large, a DICOM object without pixels...
        """
        image, info = read_image_bytes(data, name=UPLOAD_NAME)
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
        item that fails alone gets its error as its result, and the others their results."""
        try:
            return self._run(key, items)
        except MedxaiError:
            if len(items) == 1:
                raise
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

"""``medxai.load(run_dir)``: a trained model with its exact preprocessing, ready to predict and explain.

Everything is rebuilt from the run folder's model card: preprocessing (with the train-split statistics), label
names, calibration temperature, operating threshold and Grad-CAM layer. Inputs may be file paths, NumPy arrays or PIL
images; heatmaps come back at each input's ORIGINAL resolution.

Two backends run the network (:data:`BACKENDS`): PyTorch, and ONNX Runtime on the run's ONNX export
(``medxai export RUN --format onnx``, :mod:`medxai.models.onnx`). Both get the same preprocessing, calibration,
threshold and domain guard, so their predictions agree within float tolerance; only PyTorch explains (CAMs need
gradients).

Every heatmap explains the label the decision rule reports (the operating threshold on the calibrated probability of
the positive class, else the argmax) unless a target is given; for a two-logit binary model its score is that
label's log-odds, ``z_label - z_other`` (:class:`~medxai.explain.LogOddsTarget`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medxai.data import read_image_with_info
from medxai.data.readers import unexpected_error_reason
from medxai.data.input_profile import ImageFacts, image_facts
from medxai.data.labels import label_key
from medxai.data.preprocess import ContentBox, Preprocessor
from medxai.errors import CheckpointError, ConfigError, InvalidImageError, MedxaiError
from medxai.evaluate.calibration import card_calibrator
from medxai.evaluate.domain import DomainGuard, DomainVerdict
from medxai.explain import DecisionTarget, LogOddsTarget, build_cam, overlay_heatmap
from medxai.explain.overlay import place_on_original
from medxai.explain.tta import TTACAM, tta_probabilities, tta_views
from medxai.models.card import NETWORK_FIELDS, ModelCard
from medxai.models.checkpoint import GUARD_DIGEST_KEY, check_binding, check_guard_binding, load_weights
from medxai.models.features import capture_stage_statistics
from medxai.models.onnx import OnnxModel, export_mismatches
from medxai.run_folder import RunFolder, read_onnx_card
from medxai.train import autocast_context, resolve_device
from medxai.train._device import to_channels_last

__all__ = ["Classifier", "Prediction", "Explanation", "load", "read_run_card", "InputImage", "DecodedInput",
           "BACKENDS"]

logger = logging.getLogger(__name__)

InputImage = Any  # str | Path | np.ndarray | PIL.Image.Image | DecodedInput

#: What runs the network: PyTorch (predict and explain), or ONNX Runtime on the run's ``model.onnx`` (predict only).
BACKENDS = ("torch", "onnxruntime")


@dataclass
class Prediction:
    """One image's prediction."""

    id: str
    label: str
    label_index: int
    probabilities: dict[str, float]
    decision_rule: str  # "argmax" or "threshold 0.37 on pneumonia (youden)"
    # The out-of-domain guard's verdict (None when the run has no guard): whether the input is the kind of image
    # the model was trained on, its domain score (validation standard deviations) and why it was flagged.
    in_domain: bool | None = None
    domain_score: float | None = None
    domain_reasons: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "label": self.label,
            "label_index": self.label_index,
            "probabilities": self.probabilities,
            "decision_rule": self.decision_rule,
            "in_domain": self.in_domain,
            "domain_score": self.domain_score,
            "domain_reasons": list(self.domain_reasons),
        }


@dataclass
class Explanation:
    """A prediction with its heatmap at the original image's resolution."""

    prediction: Prediction
    image: np.ndarray  # the original image as decoded
    heatmap: np.ndarray  # (H, W) float32 in [0, 1], same H and W as ``image``
    target_label: str
    method: str
    model_heatmap: np.ndarray = field(repr=False, default=None)  # (S, S) at the model input's size

    def overlay(self, colormap: str = "jet", alpha: float = 0.4) -> np.ndarray:
        """``(H, W, 3)`` uint8 RGB: the heatmap laid over the original image."""
        return overlay_heatmap(self.image, self.heatmap, colormap=colormap, alpha=alpha)


class Classifier:
    """A trained model plus everything needed to use it on new images."""

    def __init__(
        self,
        model: torch.nn.Module | OnnxModel,
        card: ModelCard,
        *,
        device: str = "auto",
        batch_size: int = 32,
        guard: DomainGuard | None = None,
        tta: Sequence[str] = (),
    ) -> None:
        """Args:
            model: the network, or an :class:`~medxai.models.onnx.OnnxModel` (the onnxruntime backend).
            guard: the run's out-of-domain guard; None gives predictions without a domain verdict.
            tta: test-time augmentation views (:mod:`medxai.explain.tta`): probabilities and maps are averaged
                over the identity and these views.
        """
        self.card = card
        self.backend = "onnxruntime" if isinstance(model, OnnxModel) else "torch"
        self.device = resolve_device(device)
        self.model = model.to(self.device).eval()
        self.preprocessor = Preprocessor(card.preprocess)
        self.batch_size = batch_size
        self.guard = guard
        self.guard_layers = list(guard.layers) if guard is not None else []
        self.tta = tuple(tta)
        self.calibrator = card_calibrator(card)
        self.channels_last = False

    @classmethod
    def from_run(
        cls,
        run_dir: str | Path,
        *,
        checkpoint: str = "best",
        device: str = "auto",
        batch_size: int | None = None,
        tta: Sequence[str] = (),
        backend: str = "torch",
        allow_unfinished: bool = False,
    ) -> Classifier:
        """Load ``run_dir/checkpoints/<checkpoint>.safetensors`` with the run's model card and domain guard.

        The card and the guard must be those saved with the weights (:func:`~medxai.models.checkpoint.check_binding`):
        an edited ``model_card.json`` would silently change what every prediction means.

        Args:
            batch_size: images per forward pass; None uses the run's training batch size (see
                :class:`~medxai.config.InferenceConfig`).
            tta: see :class:`Classifier`.
            backend: one of :data:`BACKENDS`; ``onnxruntime`` runs the run's ONNX export, which must have been made
                from this ``checkpoint`` of this run.
            allow_unfinished: use a run whose training stopped before the end (no ``metrics.json``); refused
                otherwise (:meth:`~medxai.run_folder.RunFolder.check_finished`).

        Raises:
            CheckpointError: not a run, an unfinished run, missing or mismatched weights, a card or guard that is
                not the weights', or (onnxruntime) no export or a stale one.
        """
        if backend not in BACKENDS:
            raise ConfigError(f"backend must be one of {list(BACKENDS)}, got {backend!r}")
        run, card = read_run_card(run_dir, checkpoint=checkpoint, allow_unfinished=allow_unfinished,
                                  weights_required=backend == "torch")
        if backend == "onnxruntime":
            model = _onnx_model(run, checkpoint, card, resolve_device(device))
        else:
            model, card = load_weights(run.weights_path(checkpoint), card)
        guard = DomainGuard.load(run.domain_guard_path) if run.domain_guard_path.is_file() else None
        if guard is not None and backend == "onnxruntime":
            missing = [layer for layer in guard.layers if layer not in model.stage_layers]
            if missing:
                raise CheckpointError(f"{run.onnx_path} lacks the domain guard's stage output(s) {missing}; "
                                      f"re-export it: medxai export {run.path} --format onnx")
        if guard is not None:
            guard.gaussians = guard.gaussians.to(resolve_device(device))
        return cls(model, card, device=device, batch_size=batch_size or run.training_config().batch_size,
                   guard=guard, tta=tta)

    @property
    def label_names(self) -> list[str]:
        return list(self.card.label_names)

    # ----------------------------------------------------------------------------------------------------------
    def predict(
        self, inputs: InputImage | Sequence[InputImage], *, ids: Sequence[str] | None = None
    ) -> list[Prediction]:
        """Predict every input; a file that cannot be read raises :class:`InvalidImageError` naming it.

        Args:
            inputs: file paths, arrays or PIL images, or one of them.
            ids: what to call each input in the results (default: its path, or ``array[i]``); batch jobs pass
                pseudonyms here when file names must not appear in outputs.
        """
        items = _decode_all(inputs, ids)
        predictions: list[Prediction] = []
        for start in range(0, len(items), self.batch_size):
            chunk = items[start : start + self.batch_size]
            batch, _, facts = self._prepare(chunk)
            with torch.no_grad(), autocast_context(self.device, True), self._stages() as stages:
                if self.tta:
                    probabilities, _ = tta_probabilities(self._forward, batch, self._views(batch), self.probabilities)
                else:
                    probabilities = self.probabilities(self._forward(batch))
            verdicts = self._verdicts(stages, facts)
            predictions.extend(self._predictions([item.name for item in chunk], probabilities, verdicts))
        return predictions

    def explain(
        self,
        inputs: InputImage | Sequence[InputImage],
        *,
        method: str = "gradcam",
        target: int | str | None = None,
        layer: str | list[str] | None = None,
        ids: Sequence[str] | None = None,
    ) -> list[Explanation]:
        """Predict and explain in one forward per batch; heatmaps come back at each image's original size.

        Args:
            target: class index or label name to explain; None explains the label the decision rule reports
                (the same label as the prediction's).
            layer: module name(s) for the CAM; None uses the model's declared layer.
            ids: see :meth:`predict`.
        """
        if self.backend != "torch":
            raise ConfigError("class activation maps need the PyTorch backend (gradients); use backend='torch'")
        cam = build_cam(self.model, method, layer or self.card.cam_layer)
        if self.tta:  # TTA logits are log mean CALIBRATED probabilities: the rule reads their softmax as it is
            cam = TTACAM(cam, tta_views(self.tta, self.card.input_size, self.card.input_size), self.probabilities)
        target_index = self.target_index(target)
        cam_target = self.decision_target(calibrated=bool(self.tta)) if target_index is None else LogOddsTarget(
            target_index)
        items = _decode_all(inputs, ids)
        explanations: list[Explanation] = []
        for start in range(0, len(items), self.batch_size):
            chunk = items[start : start + self.batch_size]
            batch, boxes, facts = self._prepare(chunk)
            with self._stages() as stages:
                result = cam(batch, target=cam_target)
            logits = result.logits.float()
            probabilities = torch.softmax(logits, dim=1) if self.tta else self.probabilities(logits)
            predictions = self._predictions([item.name for item in chunk], probabilities,
                                            self._verdicts(stages, facts))
            maps = result.maps.float().cpu().numpy()
            for item, prediction, heatmap, box, target_class in zip(
                chunk, predictions, maps, boxes, result.target_class.tolist()
            ):
                image = item.image
                explanations.append(
                    Explanation(
                        prediction=prediction,
                        image=image,
                        heatmap=_to_original_size(heatmap, box, image.shape[:2]),
                        target_label=self.card.label_names[target_class],
                        method=method,
                        model_heatmap=heatmap,
                    )
                )
        return explanations

    def prepare_batch(self, inputs: InputImage | Sequence[InputImage], *, ids: Sequence[str] | None = None
                      ) -> torch.Tensor:
        """The normalised model input ``(B, C, S, S)`` of ``inputs`` on the device, exactly as :meth:`predict` and
        :meth:`explain` build it (the ONNX export's parity check feeds both backends this)."""
        return self._prepare(_decode_all(inputs, ids))[0]

    def use_channels_last(self) -> bool:
        """Lay the network and its inputs out channels-last (NHWC) where that is faster: a 2D PyTorch model on the
        CPU, whose oneDNN convolutions run about 1.5x faster so (ResNet-18 at 224 px and the demo CNN on a 2-core
        EPYC). The values equal the default layout's up to float rounding, so nothing that must reproduce recorded
        metrics bit for bit calls this; the service does. Returns whether the layout changed."""
        if self.backend != "torch" or self.device.type != "cpu" or not to_channels_last(self.model):
            return False
        self.channels_last = True
        return True

    # ----------------------------------------------------------------------------------------------------------
    def _prepare(self, items: Sequence[DecodedInput]) -> tuple[torch.Tensor, list[ContentBox], list[ImageFacts]]:
        tensors, boxes, facts = [], [], []
        for item in items:
            tensor, box, item_facts = self._prepare_one(item)
            tensors.append(tensor)
            boxes.append(box)
            facts.append(item_facts)
        batch = self.preprocessor.normalize(torch.stack(tensors).to(self.device))
        if self.channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        return batch, boxes, facts

    def _prepare_one(self, item: DecodedInput) -> tuple[torch.Tensor, ContentBox, ImageFacts]:
        """One decoded image as a model input. An error of this image's own (a shape or values no step foresaw) is
        an :class:`InvalidImageError` naming it, so that batch jobs skip this image alone; what fails later, on the
        whole batch (the network, the device), is not an image's fault and stops the job."""
        try:
            tensor, box = self.preprocessor.prepare(item.image, name=item.name)
            return tensor, box, image_facts(item.image, tensor, item.info)
        except MedxaiError:
            raise
        except Exception as error:  # noqa: BLE001 - made this image's error, see the docstring
            raise InvalidImageError(item.name, unexpected_error_reason(error)) from error

    def _forward(self, batch: torch.Tensor) -> torch.Tensor:
        return self.model(batch).float()

    def _views(self, batch: torch.Tensor):
        return tta_views(self.tta, batch.shape[-2], batch.shape[-1])

    def _stages(self):
        """Capture the guard's stage statistics during the forward passes inside the block (none without one)."""
        if self.backend == "onnxruntime":
            return self.model.capture(self.guard_layers)
        return capture_stage_statistics(self.model, self.guard_layers)

    def _verdicts(self, stages, facts: Sequence[ImageFacts]) -> list[DomainVerdict | None]:
        if self.guard is None:
            return [None] * len(facts)
        return self.guard.assess(stages.first(), facts)

    def target_index(self, target: int | str | None) -> int | None:
        """The class index of ``target`` (an index, or a label name read leniently: case, spaces, ``_``, ``-``);
        None stays None (the decided label).

        Raises:
            ConfigError: an index out of range, or a name that is not exactly one of the labels.
        """
        if target is None or isinstance(target, int):
            if isinstance(target, int) and not 0 <= target < self.card.num_classes:
                raise ConfigError(f"target class index {target} is outside 0..{self.card.num_classes - 1}")
            return target
        if target in self.card.label_names:
            return self.card.label_names.index(target)
        matches = [index for index, name in enumerate(self.card.label_names) if label_key(name) == label_key(target)]
        if len(matches) != 1:
            raise ConfigError(f"target label '{target}' is not one of the model's labels {self.card.label_names}")
        return matches[0]

    def decision_target(self, *, calibrated: bool = False) -> DecisionTarget:
        """The CAM target of the reported label: :meth:`decide` on the calibrated probabilities of the same forward
        pass, scored by log-odds (see the module docstring). ``calibrated``: the logits the rule sees are already
        calibrated log-probabilities (test-time augmentation), read by a plain softmax."""
        to_probabilities = (lambda logits: torch.softmax(logits, dim=1)) if calibrated else self.probabilities
        return DecisionTarget(lambda logits: self.decide(to_probabilities(logits)), self.decision_rule())

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Calibrated probabilities: the softmax of the logits after the card's calibration (identity until
        calibrated; see :func:`~medxai.evaluate.calibration.card_calibrator`)."""
        return torch.softmax(self.calibrator.transform(logits).to(logits.dtype), dim=1)

    def decide(self, probabilities: torch.Tensor) -> torch.Tensor:
        """Class indices: the binary operating threshold when one was chosen, else argmax."""
        threshold = (self.card.threshold or {}).get("value")
        if self.card.is_binary and threshold is not None:
            positive = self.card.positive_index
            is_positive = probabilities[:, positive] >= threshold
            return torch.where(is_positive, positive, 1 - positive)
        return probabilities.argmax(dim=1)

    def _predictions(
        self, names: Sequence[str], probabilities: torch.Tensor, verdicts: Sequence[DomainVerdict | None]
    ) -> list[Prediction]:
        decisions = self.decide(probabilities).tolist()
        rule = self.decision_rule()
        rows = probabilities.cpu().tolist()
        return [
            Prediction(
                id=name,
                label=self.card.label_names[decision],
                label_index=decision,
                probabilities={label: round(value, 6) for label, value in zip(self.card.label_names, row)},
                decision_rule=rule,
                in_domain=None if verdict is None else verdict.in_domain,
                domain_score=None if verdict is None else verdict.score,
                domain_reasons=[] if verdict is None else list(verdict.reasons),
            )
            for name, decision, row, verdict in zip(names, decisions, rows, verdicts)
        ]

    def decision_rule(self) -> str:
        """The rule in words: ``"argmax"`` or ``"threshold 0.37 on pneumonia (youden)"``."""
        threshold = (self.card.threshold or {}).get("value")
        if self.card.is_binary and threshold is not None:
            positive = self.card.label_names[self.card.positive_index]
            return f"threshold {threshold:.4g} on {positive} ({self.card.threshold.get('method', 'chosen')})"
        return "argmax"


def load(run_dir: str | Path, *, checkpoint: str = "best", device: str = "auto", backend: str = "torch") -> Classifier:
    """Load a trained run folder as a :class:`Classifier` (``backend``: one of :data:`BACKENDS`)."""
    return Classifier.from_run(run_dir, checkpoint=checkpoint, device=device, backend=backend)


def read_run_card(run_dir: str | Path, *, checkpoint: str = "best", allow_unfinished: bool = False,
                  weights_required: bool = True) -> tuple[RunFolder, ModelCard]:
    """A run folder and its model card, once the run is known to be a run, finished (unless ``allow_unfinished``),
    and its card and domain guard the ones saved with its ``checkpoint`` weights
    (:func:`~medxai.models.checkpoint.check_binding`; ``last`` and ``ema`` weights, saved before calibration, are
    checked on the network's fields). Weights that are not there are not checked unless ``weights_required``.

    Raises:
        CheckpointError: not a run, unfinished, or a card or guard that is not the weights'.
    """
    run = RunFolder(run_dir)
    run.check_is_run()
    if not allow_unfinished:
        run.check_finished()
    card = run.read_card()
    weights = run.weights_path(checkpoint)
    if weights_required or weights.is_file():
        if checkpoint == "best":
            check_binding(card, weights, guard=run.domain_guard_path, card_name=run.card_path.name)
        else:
            check_binding(card, weights, fields=NETWORK_FIELDS, card_name=run.card_path.name)
    return run, card


def _onnx_model(run: RunFolder, checkpoint: str, card: ModelCard, device: torch.device) -> OnnxModel:
    """The run's ONNX export, after checking that it was made from this run's card and ``checkpoint`` weights."""
    hint = f"medxai export {run.path} --format onnx"
    if not run.onnx_path.is_file():
        raise CheckpointError(f"{run.onnx_path}: this run has no ONNX export; run `{hint}` first, or use "
                              "backend='torch'")
    try:
        exported = read_onnx_card(run.onnx_card_path)
    except CheckpointError as error:
        raise CheckpointError(f"{error}; re-export: {hint}") from None
    weights = run.weights_path(checkpoint)
    if not weights.is_file():
        logger.warning("%s is missing: the ONNX export is checked against the model card only", weights)
    problems = export_mismatches(exported, card, weights)
    try:
        differing = card.bound_differences(ModelCard.from_dict(exported))  # the card as exported, bound fields
    except CheckpointError as error:
        differing = [f"its card ({error})"]
    if differing:
        problems.append(f"exported with a model card that differs on {', '.join(differing)}")
    check_guard_binding(exported.get(GUARD_DIGEST_KEY), run.domain_guard_path, run.onnx_card_path)
    if problems:
        raise CheckpointError(f"{run.onnx_path} does not match the run ({'; '.join(problems)}); re-export it: "
                              f"{hint}")
    return OnnxModel(run.onnx_path, device=device)


def _as_list(inputs: InputImage | Sequence[InputImage]) -> list[InputImage]:
    if isinstance(inputs, (str, Path, np.ndarray)) or hasattr(inputs, "getpixel"):
        return [inputs]
    if isinstance(inputs, Iterable):
        return list(inputs)
    return [inputs]


@dataclass
class DecodedInput:
    """One decoded input: its name, native array and what the reader said about the file (DICOM header values).

    Callers that decode themselves (the service decodes uploads) pass these, so that the domain guard still sees
    the file's facts (modality, body part, photometric interpretation).
    """

    name: str
    image: np.ndarray
    info: dict[str, Any] = field(default_factory=dict)


def _decode_all(inputs: InputImage | Sequence[InputImage], ids: Sequence[str] | None) -> list[DecodedInput]:
    """Decode every input; ``ids`` rename them (same length as the inputs)."""
    items = [_decode(item, index) for index, item in enumerate(_as_list(inputs))]
    if ids is None:
        return items
    ids = list(ids)
    if len(ids) != len(items):
        raise ConfigError(f"got {len(ids)} ids for {len(items)} inputs")
    return [DecodedInput(name, item.image, item.info) for name, item in zip(ids, items)]


def _decode(item: InputImage, index: int) -> DecodedInput:
    """A path, an array or a PIL image, decoded; a :class:`DecodedInput` as it is."""
    if isinstance(item, DecodedInput):
        return item
    if isinstance(item, (str, Path)):
        image, info = read_image_with_info(item)
        return DecodedInput(str(item), image, info)
    if isinstance(item, np.ndarray):
        return DecodedInput(f"array[{index}]", item)
    if hasattr(item, "getpixel"):  # PIL image
        image = item.convert("RGB") if item.mode not in ("L", "I;16", "I", "F", "RGB") else item
        return DecodedInput(f"image[{index}]", np.asarray(image))
    raise InvalidImageError(f"input[{index}]", f"unsupported input type {type(item).__name__}")


def _to_original_size(heatmap: np.ndarray, box: ContentBox, original: tuple[int, int]) -> np.ndarray:
    """A model-size heatmap on the original image (:func:`~medxai.explain.overlay.place_on_original`), as NumPy."""
    return place_on_original(heatmap, original, box.as_tuple()).cpu().numpy()

"""``medxai.load(run_dir)``: a trained model with its exact preprocessing, ready to predict and explain.

Everything is rebuilt from the run folder's model card: preprocessing (with the train-split statistics), label
names, calibration temperature, operating threshold and Grad-CAM layer. Inputs may be file paths, NumPy arrays or PIL
images; heatmaps come back at each input's ORIGINAL resolution.

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

from medxai.data import read_image
from medxai.data.labels import label_key
from medxai.data.preprocess import ContentBox, Preprocessor
from medxai.errors import ConfigError, InvalidImageError
from medxai.explain import DecisionTarget, LogOddsTarget, get_cam_method, overlay_heatmap
from medxai.models.card import ModelCard
from medxai.models.checkpoint import load_weights
from medxai.run_folder import RunFolder
from medxai.train import autocast_context, resolve_device

__all__ = ["Classifier", "Prediction", "Explanation", "load", "InputImage"]

logger = logging.getLogger(__name__)

InputImage = Any  # str | Path | np.ndarray | PIL.Image.Image


@dataclass
class Prediction:
    """One image's prediction."""

    id: str
    label: str
    label_index: int
    probabilities: dict[str, float]
    decision_rule: str  # "argmax" or "threshold 0.37 on pneumonia (youden)"

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "label": self.label,
            "label_index": self.label_index,
            "probabilities": self.probabilities,
            "decision_rule": self.decision_rule,
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

    def __init__(self, model: torch.nn.Module, card: ModelCard, *, device: str = "auto", batch_size: int = 32) -> None:
        self.card = card
        self.device = resolve_device(device)
        self.model = model.to(self.device).eval()
        self.preprocessor = Preprocessor(card.preprocess)
        self.batch_size = batch_size

    @classmethod
    def from_run(
        cls, run_dir: str | Path, *, checkpoint: str = "best", device: str = "auto", batch_size: int | None = None
    ) -> Classifier:
        """Load ``run_dir/checkpoints/<checkpoint>.safetensors`` with the run's model card.

        Args:
            batch_size: images per forward pass; None uses the run's training batch size (see
                :class:`~medxai.config.InferenceConfig`).
        """
        run = RunFolder(run_dir)
        run.check_is_run()
        model, card = load_weights(run.weights_path(checkpoint), run.read_card())
        return cls(model, card, device=device, batch_size=batch_size or run.training_config().batch_size)

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
            batch, _ = self._prepare(chunk)
            with torch.no_grad(), autocast_context(self.device, True):
                logits = self.model(batch).float()
            predictions.extend(self._predictions([name for name, _ in chunk], logits))
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
        cam = get_cam_method(method)(self.model, layer or self.card.cam_layer)
        target_index = self._target_index(target)
        cam_target = self.decision_target() if target_index is None else LogOddsTarget(target_index)
        items = _decode_all(inputs, ids)
        explanations: list[Explanation] = []
        for start in range(0, len(items), self.batch_size):
            chunk = items[start : start + self.batch_size]
            batch, boxes = self._prepare(chunk)
            result = cam(batch, target=cam_target)
            predictions = self._predictions([name for name, _ in chunk], result.logits.float())
            maps = result.maps.float().cpu().numpy()
            for (name, image), prediction, heatmap, box, target_class in zip(
                chunk, predictions, maps, boxes, result.target_class.tolist()
            ):
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

    # ----------------------------------------------------------------------------------------------------------
    def _prepare(self, items: Sequence[tuple[str, np.ndarray]]) -> tuple[torch.Tensor, list[ContentBox]]:
        tensors, boxes = [], []
        for name, image in items:
            tensor, box = self.preprocessor.prepare(image, name=name)
            tensors.append(tensor)
            boxes.append(box)
        batch = self.preprocessor.normalize(torch.stack(tensors).to(self.device))
        return batch, boxes

    def _target_index(self, target: int | str | None) -> int | None:
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

    def decision_target(self) -> DecisionTarget:
        """The CAM target of the reported label: :meth:`decide` on the calibrated probabilities of the same forward
        pass, scored by log-odds (see the module docstring)."""
        return DecisionTarget(lambda logits: self.decide(self.probabilities(logits)), self.decision_rule())

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Softmax of temperature-scaled logits (temperature 1.0 until calibrated)."""
        return torch.softmax(logits / float(self.card.temperature or 1.0), dim=1)

    def decide(self, probabilities: torch.Tensor) -> torch.Tensor:
        """Class indices: the binary operating threshold when one was chosen, else argmax."""
        threshold = (self.card.threshold or {}).get("value")
        if self.card.is_binary and threshold is not None:
            positive = self.card.positive_index
            is_positive = probabilities[:, positive] >= threshold
            return torch.where(is_positive, positive, 1 - positive)
        return probabilities.argmax(dim=1)

    def _predictions(self, names: Sequence[str], logits: torch.Tensor) -> list[Prediction]:
        probabilities = self.probabilities(logits)
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
            )
            for name, decision, row in zip(names, decisions, rows)
        ]

    def decision_rule(self) -> str:
        """The rule in words: ``"argmax"`` or ``"threshold 0.37 on pneumonia (youden)"``."""
        threshold = (self.card.threshold or {}).get("value")
        if self.card.is_binary and threshold is not None:
            positive = self.card.label_names[self.card.positive_index]
            return f"threshold {threshold:.4g} on {positive} ({self.card.threshold.get('method', 'chosen')})"
        return "argmax"


def load(run_dir: str | Path, *, checkpoint: str = "best", device: str = "auto") -> Classifier:
    """Load a trained run folder as a :class:`Classifier`."""
    return Classifier.from_run(run_dir, checkpoint=checkpoint, device=device)


def _as_list(inputs: InputImage | Sequence[InputImage]) -> list[InputImage]:
    if isinstance(inputs, (str, Path, np.ndarray)) or hasattr(inputs, "getpixel"):
        return [inputs]
    if isinstance(inputs, Iterable):
        return list(inputs)
    return [inputs]


def _decode_all(inputs: InputImage | Sequence[InputImage], ids: Sequence[str] | None) -> list[tuple[str, np.ndarray]]:
    """Decode every input to ``(id, array)``; ``ids`` rename them (same length as the inputs)."""
    items = [_decode(item, index) for index, item in enumerate(_as_list(inputs))]
    if ids is None:
        return items
    ids = list(ids)
    if len(ids) != len(items):
        raise ConfigError(f"got {len(ids)} ids for {len(items)} inputs")
    return [(name, image) for name, (_, image) in zip(ids, items)]


def _decode(item: InputImage, index: int) -> tuple[str, np.ndarray]:
    """A (name, native array) pair from a path, an array or a PIL image."""
    if isinstance(item, (str, Path)):
        return str(item), read_image(item)
    if isinstance(item, np.ndarray):
        return f"array[{index}]", item
    if hasattr(item, "getpixel"):  # PIL image
        image = item.convert("RGB") if item.mode not in ("L", "I;16", "I", "F", "RGB") else item
        return f"image[{index}]", np.asarray(image)
    raise InvalidImageError(f"input[{index}]", f"unsupported input type {type(item).__name__}")


def _to_original_size(heatmap: np.ndarray, box: ContentBox, original: tuple[int, int]) -> np.ndarray:
    """Cut padding off a model-size heatmap and resize it to the original image (bilinear)."""
    top, left, height, width = box.as_tuple()
    content = torch.from_numpy(np.ascontiguousarray(heatmap[top : top + height, left : left + width]))
    resized = torch.nn.functional.interpolate(
        content[None, None], size=tuple(original), mode="bilinear", align_corners=False
    )[0, 0]
    return resized.clamp(0.0, 1.0).numpy().astype(np.float32)

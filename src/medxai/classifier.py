"""``medxai.load(run_dir)``: a trained model with its exact preprocessing, ready to predict and explain.

Everything is rebuilt from the run folder's model card: preprocessing (with the train-split statistics), label
names, calibration temperature, operating threshold and Grad-CAM layer. Inputs may be file paths, NumPy arrays or PIL
images; heatmaps come back at each input's ORIGINAL resolution.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medxai.config import PreprocessConfig
from medxai.data import read_image
from medxai.data.preprocess import ContentBox, Preprocessor
from medxai.errors import CheckpointError, ConfigError, InvalidImageError
from medxai.explain import get_cam_method, overlay_heatmap
from medxai.models.card import MODEL_CARD_FILE, ModelCard
from medxai.models.checkpoint import load_weights
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
        self.preprocessor = Preprocessor(PreprocessConfig(**_tuples(card.preprocess)))
        self.batch_size = batch_size

    @classmethod
    def from_run(cls, run_dir: str | Path, *, checkpoint: str = "best", device: str = "auto") -> Classifier:
        """Load ``run_dir/checkpoints/<checkpoint>.safetensors`` with the run's model card."""
        run_dir = Path(run_dir)
        if not run_dir.is_dir():
            raise CheckpointError(f"{run_dir}: run folder not found")
        card = ModelCard.load(run_dir / MODEL_CARD_FILE)
        model, card = load_weights(run_dir / "checkpoints" / f"{checkpoint}.safetensors", card)
        return cls(model, card, device=device)

    @property
    def label_names(self) -> list[str]:
        return list(self.card.label_names)

    # ----------------------------------------------------------------------------------------------------------
    def predict(self, inputs: InputImage | Sequence[InputImage]) -> list[Prediction]:
        """Predict every input; a file that cannot be read raises :class:`InvalidImageError` naming it."""
        items = [_decode(item, index) for index, item in enumerate(_as_list(inputs))]
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
    ) -> list[Explanation]:
        """Predict and explain in one forward per batch; heatmaps come back at each image's original size.

        Args:
            target: class index or label name to explain; None explains the predicted class.
            layer: module name(s) for the CAM; None uses the model's declared layer.
        """
        cam = get_cam_method(method)(self.model, layer or self.card.cam_layer)
        target_index = self._target_index(target)
        items = [_decode(item, index) for index, item in enumerate(_as_list(inputs))]
        explanations: list[Explanation] = []
        for start in range(0, len(items), self.batch_size):
            chunk = items[start : start + self.batch_size]
            batch, boxes = self._prepare(chunk)
            result = cam(batch, target=target_index)
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
        if target not in self.card.label_names:
            raise ConfigError(f"target label '{target}' is not one of the model's labels {self.card.label_names}")
        return self.card.label_names.index(target)

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
        rule = self._decision_rule()
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

    def _decision_rule(self) -> str:
        threshold = (self.card.threshold or {}).get("value")
        if self.card.is_binary and threshold is not None:
            positive = self.card.label_names[self.card.positive_index]
            return f"threshold {threshold:.4g} on {positive} ({self.card.threshold.get('method', 'chosen')})"
        return "argmax"


def load(run_dir: str | Path, *, checkpoint: str = "best", device: str = "auto") -> Classifier:
    """Load a trained run folder as a :class:`Classifier`."""
    return Classifier.from_run(run_dir, checkpoint=checkpoint, device=device)


def _tuples(preprocess: dict[str, Any]) -> dict[str, Any]:
    values = dict(preprocess)
    if isinstance(values.get("clip_percentiles"), list):
        values["clip_percentiles"] = tuple(values["clip_percentiles"])
    return values


def _as_list(inputs: InputImage | Sequence[InputImage]) -> list[InputImage]:
    if isinstance(inputs, (str, Path, np.ndarray)) or hasattr(inputs, "getpixel"):
        return [inputs]
    if isinstance(inputs, Iterable):
        return list(inputs)
    return [inputs]


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

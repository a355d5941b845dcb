"""The model card: everything a later stage needs travels with the weights.

``evaluate``, ``predict``, ``explain`` and ``serve`` rebuild the exact pipeline from it: architecture, label names,
the full preprocessing (including normalisation statistics measured on train), the Grad-CAM layer, the calibration
temperature and the operating threshold (cf. timm's ``PretrainedCfg`` and torchxrayvision's model metadata).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from medxai.errors import CheckpointError

__all__ = ["ModelCard", "MODEL_CARD_FILE"]

MODEL_CARD_FILE = "model_card.json"

DEFAULT_INTENDED_USE = (
    "Research and education: studying image classification and its explanations on medical images. "
    "Not a medical device; not for clinical use without independent validation on the target population."
)
DEFAULT_LIMITATIONS = (
    "Trained and tested on one public dataset; performance on other scanners, hospitals, populations or "
    "preprocessing is unknown. Grad-CAM heatmaps show where the network's evidence lies, not a diagnosis."
)


def _version() -> str:
    from medxai import __version__

    return __version__


@dataclass
class ModelCard:
    """What travels with a checkpoint (see DESIGN.md, "The model card")."""

    architecture: str
    num_classes: int
    in_chans: int
    input_size: int
    label_names: list[str]
    preprocess: dict[str, Any]
    cam_layer: str
    classifier: str = ""
    dropout: float = 0.0
    positive_label: str | None = None
    temperature: float = 1.0
    threshold: dict[str, Any] = field(default_factory=lambda: {"value": None, "method": "argmax"})
    train_data: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    intended_use: str = DEFAULT_INTENDED_USE
    limitations: str = DEFAULT_LIMITATIONS
    medxai_version: str = field(default_factory=_version)

    def __post_init__(self) -> None:
        if len(self.label_names) != self.num_classes:
            raise CheckpointError(
                f"model card lists {len(self.label_names)} label names for {self.num_classes} classes"
            )

    @property
    def is_binary(self) -> bool:
        return self.num_classes == 2

    @property
    def positive_index(self) -> int:
        return self.label_names.index(self.positive_label) if self.positive_label in self.label_names else 1

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ModelCard:
        known = {item.name for item in fields(cls)}
        required = {"architecture", "num_classes", "in_chans", "input_size", "label_names", "preprocess", "cam_layer"}
        absent = sorted(required - set(values))
        if absent:
            raise CheckpointError(f"model card lacks {absent}")
        return cls(**{key: value for key, value in values.items() if key in known})

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(self.to_json())
        return path

    @classmethod
    def load(cls, path: str | Path) -> ModelCard:
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"{path}: no model card here; is this a medxai run folder?")
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except json.JSONDecodeError as error:
            raise CheckpointError(f"{path}: not valid JSON ({error})") from None

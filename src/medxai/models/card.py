"""The model card: everything a later stage needs travels with the weights.

``evaluate``, ``predict``, ``explain`` and ``serve`` rebuild the exact pipeline from it: architecture, label names,
the full preprocessing (including normalisation statistics measured on train), the Grad-CAM layer, the calibration
temperature and the operating threshold (cf. timm's ``PretrainedCfg`` and torchxrayvision's model metadata).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from medxai.config import PreprocessConfig, build_config
from medxai.errors import CheckpointError, ConfigError

__all__ = ["ModelCard"]

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
    """What travels with a checkpoint (the contract: ``docs/run-folder.md``, "The model card").

    The input side and channel count are the preprocessing's (``preprocess.size``, ``preprocess.channels``), stored
    once; :attr:`input_size` and :attr:`in_chans` read them.
    """

    architecture: str
    num_classes: int
    label_names: list[str]
    preprocess: PreprocessConfig
    cam_layer: str
    classifier: str = ""
    dropout: float = 0.0
    positive_label: str | None = None
    temperature: float = 1.0
    threshold: dict[str, Any] = field(default_factory=lambda: {"value": None, "method": "argmax"})
    # Post-hoc calibration of the logits (medxai.evaluate.calibration.LogitCalibrator.to_dict()); None: the
    # temperature above alone (older cards).
    calibration: dict[str, Any] | None = None
    domain: dict[str, Any] = field(default_factory=dict)  # the out-of-domain guard's facts, {} when there is none
    # An ensemble's members: [{"run": path, "architecture", "cam_layer"}...] (medxai.jobs.ensemble); [] otherwise.
    members: list[dict[str, Any]] = field(default_factory=list)
    train_data: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    intended_use: str = DEFAULT_INTENDED_USE
    limitations: str = DEFAULT_LIMITATIONS
    medxai_version: str = field(default_factory=_version)

    def __post_init__(self) -> None:
        if isinstance(self.preprocess, dict):  # the JSON form, as a convenience for callers building a card
            try:
                self.preprocess = build_config(PreprocessConfig, self.preprocess, "model card preprocess")
            except ConfigError as error:
                raise CheckpointError(str(error)) from None
        if len(self.label_names) != self.num_classes:
            raise CheckpointError(
                f"model card lists {len(self.label_names)} label names for {self.num_classes} classes"
            )
        if self.positive_label is not None and self.positive_label not in self.label_names:
            raise CheckpointError(
                f"model card's positive label {self.positive_label!r} is not among {self.label_names}"
            )

    @property
    def input_size(self) -> int:
        """Side of the square model input, pixels (``preprocess.size``)."""
        return self.preprocess.size

    @property
    def in_chans(self) -> int:
        """Input channels of the model (``preprocess.channels``)."""
        return self.preprocess.channels

    @property
    def is_binary(self) -> bool:
        return self.num_classes == 2

    @property
    def positive_index(self) -> int:
        """Index of the positive label of a binary task (1 when the card names none)."""
        return self.label_names.index(self.positive_label) if self.positive_label in self.label_names else 1

    def to_dict(self) -> dict[str, Any]:
        return json.loads(self.to_json())

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ModelCard:
        """Build a card from its JSON form; cards of medxai 0.1 (``input_size``/``in_chans`` beside ``preprocess``)
        are read too, as long as the duplicated values agree."""
        known = {item.name for item in fields(cls)}
        required = {"architecture", "num_classes", "label_names", "preprocess", "cam_layer"}
        absent = sorted(required - set(values))
        if absent:
            raise CheckpointError(f"model card lacks {absent}")
        card = cls(**{key: value for key, value in values.items() if key in known})
        for old_key, value in (("input_size", card.input_size), ("in_chans", card.in_chans)):
            if old_key in values and values[old_key] != value:
                raise CheckpointError(
                    f"model card's {old_key} {values[old_key]} disagrees with its preprocessing ({value})"
                )
        return card

"""The model card: everything a later stage needs travels with the weights.

``evaluate``, ``predict``, ``explain`` and ``serve`` rebuild the exact pipeline from it: architecture, label names,
the full preprocessing (including normalisation statistics measured on train), the Grad-CAM layer, the calibration
temperature and the operating threshold (cf. timm's ``PretrainedCfg`` and torchxrayvision's model metadata).

The fields that decide what a prediction means (:data:`BOUND_FIELDS`) are bound to the weights: the weights file
stores their digest (:meth:`ModelCard.bound_digest`), so a ``model_card.json`` edited afterwards, or copied from
another run, is refused instead of silently renaming the classes (:mod:`medxai.models.checkpoint`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from medxai.config import PreprocessConfig, build_config
from medxai.errors import CheckpointError, ConfigError

__all__ = ["ModelCard", "BOUND_FIELDS", "NETWORK_FIELDS"]

#: The card's fields that decide what the weights' outputs mean: which network and classes, how inputs are
#: prepared, where CAMs look, how logits become probabilities and decisions, the domain guard's facts, an ensemble's
#: members, and the run the weights belong to. ``metrics``, ``train_data``, the texts and the domain guard's
#: ``probes`` (measured after the weights are saved) are descriptions and may be rewritten.
BOUND_FIELDS = ("architecture", "num_classes", "label_names", "positive_label", "preprocess", "cam_layer",
                "classifier", "dropout", "temperature", "calibration", "threshold", "domain", "members", "run_id")
#: The bound fields every checkpoint of a run shares (the network, its classes and inputs, the run); calibration,
#: threshold and domain guard are fitted after training for the best weights only.
NETWORK_FIELDS = ("architecture", "num_classes", "label_names", "positive_label", "preprocess", "cam_layer",
                  "classifier", "dropout", "members", "run_id")
_UNBOUND_DOMAIN_KEYS = ("probes",)

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
    cam_layer: str | list[str]  # the module whose maps the run explains, or several fused (explain.layer)
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
    # The random id of the run folder these weights were trained in (its marker file, medxai.run_folder); None in
    # cards written before run ids existed.
    run_id: str | None = None

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

    def bound_fields(self) -> dict[str, Any]:
        """The :data:`BOUND_FIELDS` in their JSON form (the domain guard's facts without its probe rates)."""
        plain = self.to_dict()
        bound = {key: plain[key] for key in BOUND_FIELDS}
        bound["domain"] = {key: value for key, value in (bound["domain"] or {}).items()
                           if key not in _UNBOUND_DOMAIN_KEYS}
        return bound

    def bound_digest(self) -> str:
        """SHA-256 (hex) of :meth:`bound_fields` as canonical JSON: what the weights file stores."""
        text = json.dumps(self.bound_fields(), sort_keys=True, separators=(",", ":"), ensure_ascii=True)
        return hashlib.sha256(text.encode("ascii")).hexdigest()

    def bound_differences(self, other: ModelCard, fields: Sequence[str] = BOUND_FIELDS) -> list[str]:
        """The bound ``fields`` whose values differ between two cards, in :data:`BOUND_FIELDS` order."""
        mine, theirs = self.bound_fields(), other.bound_fields()
        return [key for key in BOUND_FIELDS if key in fields and mine[key] != theirs[key]]

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
        _check_types(values)
        card = cls(**{key: value for key, value in values.items() if key in known})
        for old_key, value in (("input_size", card.input_size), ("in_chans", card.in_chans)):
            if old_key in values and values[old_key] != value:
                raise CheckpointError(
                    f"model card's {old_key} {values[old_key]} disagrees with its preprocessing ({value})"
                )
        return card


#: The JSON types of the card's fields (None allowed where the field is optional), checked before a card is built
#: from a file: a card is read from disk, where anyone may have edited it.
_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "architecture": (str,), "num_classes": (int,), "label_names": (list,), "preprocess": (dict,),
    "cam_layer": (str, list), "classifier": (str,), "dropout": (int, float), "positive_label": (str, type(None)),
    "temperature": (int, float), "threshold": (dict,), "calibration": (dict, type(None)), "domain": (dict,),
    "members": (list,), "train_data": (dict,), "metrics": (dict,), "intended_use": (str,), "limitations": (str,),
    "medxai_version": (str,), "run_id": (str, type(None)),
}


def _check_types(values: dict[str, Any]) -> None:
    """Raise :class:`CheckpointError` naming the first field of the wrong JSON type."""
    for key, types in _FIELD_TYPES.items():
        value = values.get(key, types[0]())  # absent: the field's default applies
        if not isinstance(value, types) or isinstance(value, bool):  # JSON true is not a number
            raise CheckpointError(f"model card field {key!r} has the wrong type ({type(value).__name__})")
    if not all(isinstance(name, str) for name in values["label_names"]):
        raise CheckpointError("model card field 'label_names' must be a list of names")
    layers = values["cam_layer"]
    if isinstance(layers, list) and not (layers and all(isinstance(name, str) for name in layers)):
        raise CheckpointError("model card field 'cam_layer' must be a module name or a non-empty list of names")
    if not all(isinstance(member, dict) for member in values.get("members", [])):
        raise CheckpointError("model card field 'members' must be a list of objects")

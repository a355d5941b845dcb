"""What the training images looked like, and which new inputs are far from it, without any model.

The out-of-domain guard (:mod:`medxai.evaluate.domain`) combines these checks with a feature-space score. They
catch what needs no network to see and what a network may not see at all:

- **DICOM header**: Modality, BodyPartExamined and PhotometricInterpretation outside the set the model is for (read
  from the training DICOM files, or declared in ``domain.modalities`` / ``domain.body_parts`` when training data
  were PNG/JPEG exports that lost their headers). A value the header does not give is never held against an input.
  A reason names a header value only when it is a DICOM defined term (:mod:`medxai.data.readers.dicom_terms`):
  anything else a header holds (a crafted file can put a name there) is never repeated.
- **Colour**: a colour photograph given to a model trained on grey films (a grey model turns colour into luminance,
  so its features may never see the colour). Colourfulness is the mean of ``max - min`` over the channels of each
  pixel on the [0, 1] scale: 0 for grey images stored as RGB.
- **Shape**: an aspect ratio far outside the training range, or a side too short to hold the model input's detail.
  Training images that all share one shape (MedMNIST's 28x28, a folder resized by its publisher) say nothing about
  the shape of the originals, so their profile checks no aspect ratio: a 3:2 chest film is as much a chest film as
  its 28x28 copy.
- **Intensity**: the mean or standard deviation of the model input (on the [0, 1] scale, before normalisation) far
  outside the training range.

"Far" is deliberately loose: a range is the 0.1 %-99.9 % span of the training values, widened on each side by half
that span (intensities), or a factor of 2 (aspect ratios). These checks are for inputs that are plainly of
another kind; subtler shifts are the feature score's job.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from medxai.data.readers.dicom_terms import BODY_PARTS, MODALITIES, PHOTOMETRIC_INTERPRETATIONS, known_term

__all__ = ["ImageFacts", "InputProfile", "image_facts", "colourfulness", "COLOUR_LIMIT"]

#: Colourfulness above which a grey-trained model's input counts as a colour image (0.06 on the [0, 1] scale: JPEG
#: chroma noise on grey films stays far below it; fundus photographs and colour Doppler lie far above it).
COLOUR_LIMIT = 0.06
_LOW, _HIGH = 0.001, 0.999
_WIDEN = 0.5
_ASPECT_FACTOR = 2.0
_ONE_SHAPE = 1.05  # training aspect ratios within this factor of each other: one shape, no aspect check


@dataclass
class ImageFacts:
    """What the checks look at for one input."""

    height: int
    width: int
    colourfulness: float
    mean: float  # of the model input, [0, 1] scale, before normalisation
    std: float
    modality: str = ""  # DICOM header values; "" when the file is not DICOM or the header does not say
    body_part: str = ""
    photometric: str = ""


def colourfulness(image: np.ndarray) -> float:
    """Mean over pixels of ``max - min`` across the colour channels, on the [0, 1] scale (0 for grey images)."""
    if image.ndim != 3 or image.shape[2] < 3:
        return 0.0
    pixels = image[..., :3]
    scale = 255.0 if pixels.dtype == np.uint8 else 65535.0 if pixels.dtype == np.uint16 else max(
        float(np.abs(pixels).max()), 1.0
    )
    red, green, blue = pixels[..., 0], pixels[..., 1], pixels[..., 2]
    # element-wise over the three planes: ~10x faster than NumPy's reduction along a length-3 last axis
    highest = np.maximum(np.maximum(red, green), blue).astype(np.float32)
    lowest = np.minimum(np.minimum(red, green), blue).astype(np.float32)
    return float((highest - lowest).mean() / scale)


def image_facts(original: np.ndarray, prepared: torch.Tensor, info: dict[str, Any] | None = None) -> ImageFacts:
    """The facts of one input: its decoded array, its ``(C, S, S)`` model input in [0, 1], and reader facts."""
    info = info or {}
    values = prepared.float()
    return ImageFacts(
        height=int(original.shape[0]),
        width=int(original.shape[1]),
        colourfulness=colourfulness(original),
        mean=float(values.mean()),
        std=float(values.std(unbiased=False)),
        modality=str(info.get("modality", "") or "").upper(),
        body_part=str(info.get("body_part", "") or "").upper(),
        photometric=str(info.get("mode", "") if info.get("format") == "DICOM" else "").upper(),
    )


@dataclass
class InputProfile:
    """Ranges of the training inputs, and the DICOM values the model is for. JSON-ready (:meth:`to_dict`)."""

    mean_range: tuple[float, float]
    std_range: tuple[float, float]
    aspect_range: tuple[float, float] | None  # height / width; None: not checked (one training shape)
    min_side: int  # shorter sides below this are too small for the model input
    colour: bool  # the model was trained on colour images
    modalities: list[str] = field(default_factory=list)  # empty: not checked
    body_parts: list[str] = field(default_factory=list)
    photometrics: list[str] = field(default_factory=list)

    @classmethod
    def fit(
        cls,
        facts: Sequence[ImageFacts],
        *,
        input_size: int,
        modalities: Sequence[str] | None = None,
        body_parts: Sequence[str] | None = None,
    ) -> InputProfile:
        """The profile of the training inputs ``facts``; declared DICOM values extend those found in the data."""
        if not facts:
            raise ValueError("an input profile needs at least one training image")
        aspects = np.array([item.height / item.width for item in facts])
        one_shape = aspects.max() / aspects.min() < _ONE_SHAPE
        colour = float(np.quantile([item.colourfulness for item in facts], _HIGH)) > COLOUR_LIMIT
        return cls(
            mean_range=_widened([item.mean for item in facts]),
            std_range=_widened([item.std for item in facts]),
            aspect_range=None if one_shape else (float(aspects.min() / _ASPECT_FACTOR),
                                                 float(aspects.max() * _ASPECT_FACTOR)),
            min_side=max(1, input_size // 2),
            colour=colour,
            modalities=_values(facts, "modality", modalities),
            body_parts=_values(facts, "body_part", body_parts),
            photometrics=_values(facts, "photometric", None),
        )

    def reasons(self, facts: ImageFacts) -> list[str]:
        """Why ``facts`` lie outside the profile (empty when they do not)."""
        found = []
        for kind, value, allowed, vocabulary in (
            ("modality", facts.modality, self.modalities, MODALITIES),
            ("body part", facts.body_part, self.body_parts, BODY_PARTS),
            ("photometric interpretation", facts.photometric, self.photometrics, PHOTOMETRIC_INTERPRETATIONS),
        ):
            if value and allowed and value not in allowed:
                found.append(_unexpected_header_value(kind, value, allowed, vocabulary))
        if not self.colour and facts.colourfulness > COLOUR_LIMIT:
            found.append(f"a colour image (colourfulness {facts.colourfulness:.2f}) for a model of grey ones")
        aspect = facts.height / facts.width
        if self.aspect_range is not None and not self.aspect_range[0] <= aspect <= self.aspect_range[1]:
            low, high = self.aspect_range
            found.append(f"aspect ratio far outside the training range ({aspect:.2f} height/width, not in "
                         f"[{low:.2f}, {high:.2f}])")
        if min(facts.height, facts.width) < self.min_side:
            found.append(f"too small ({facts.width}x{facts.height} pixels for a {self.min_side * 2} px model input)")
        intensities = (("mean", facts.mean, self.mean_range), ("contrast", facts.std, self.std_range))
        for name, value, (low, high) in intensities:
            if not low <= value <= high:
                found.append(f"intensity {name} far outside the training range ({value:.3f}, not in "
                             f"[{low:.3f}, {high:.3f}])")
        return found

    def to_dict(self) -> dict[str, Any]:
        return {key: list(value) if isinstance(value, tuple) else value for key, value in asdict(self).items()}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> InputProfile:
        ranges = {key: None if values.get(key) is None else tuple(values[key])
                  for key in ("mean_range", "std_range", "aspect_range")}
        return cls(**{**values, **ranges})


def _unexpected_header_value(kind: str, value: str, allowed: Sequence[str], vocabulary: frozenset[str]) -> str:
    """``modality MR not among those trained on (CR, DX)``: the value and the training values are named only when
    they are defined terms; others are counted, never repeated."""
    term = known_term(value, vocabulary)
    named = [item for item in allowed if known_term(item, vocabulary)]
    others = len(allowed) - len(named)
    trained = ", ".join(named + ([f"{others} other value(s)"] if others else []))
    if term is None:
        return f"unexpected {kind} (not among those trained on: {trained})"
    return f"{kind} {term} not among those trained on ({trained})"


def _widened(values: Sequence[float]) -> tuple[float, float]:
    low, high = np.quantile(np.asarray(values, dtype=np.float64), [_LOW, _HIGH])
    margin = (high - low) * _WIDEN
    return float(low - margin), float(high + margin)


def _values(facts: Sequence[ImageFacts], name: str, declared: Sequence[str] | None) -> list[str]:
    found = {getattr(item, name) for item in facts if getattr(item, name)}
    return sorted(found | {value.strip().upper() for value in declared or () if value.strip()})

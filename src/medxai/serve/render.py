"""The JSON bodies of the service's answers, and the PNGs inside them (built in the request's thread, never on the
model's worker thread: colouring and encoding a 2,000 px overlay costs more than a small model's forward pass)."""

from __future__ import annotations

import base64
import io
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from threading import Lock
from typing import Any

import numpy as np
from PIL import Image

from medxai.classifier import Classifier, Explanation, Prediction
from medxai.explain import overlay_heatmap
from medxai.explain.overlay import (
    OUT_OF_DOMAIN_BANNER,
    PNG_COMPRESS_LEVEL,
    add_banner,
    to_display_rgb,
)
from medxai.models.card import ModelCard

__all__ = ["ExplainOptions", "ExplanationStore", "encode_png", "explanation_body", "prediction_body"]



@dataclass(frozen=True)
class ExplainOptions:
    """What the caller asked of an explanation (see ``docs/serve.md``)."""

    alpha: float = 0.4
    colormap: str = "jet"
    overlay: str = "inline"  # "inline" (base64 in the JSON) or "url"
    layers: bool = False
    raw: bool = False


def encode_png(rgb: np.ndarray) -> bytes:
    """``(H, W)`` or ``(H, W, 3)`` uint8 as PNG bytes."""
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buffer.getvalue()


def _base64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def prediction_body(
    prediction: Prediction, classifier: Classifier, *, image: np.ndarray, info: dict[str, Any], sha256: str
) -> dict[str, Any]:
    """The fields ``/v1/predict`` and ``/v1/explain`` share (without identity and latency, added by the app).

    Only technical facts of the input are returned (size, format): never a DICOM tag or a file name."""
    height, width = image.shape[:2]
    return {
        "label": prediction.label,
        "label_index": prediction.label_index,
        "probabilities": prediction.probabilities,
        "decision_rule": prediction.decision_rule,
        "threshold": threshold_info(classifier.card),
        "in_domain": prediction.in_domain,
        "domain_score": prediction.domain_score,
        "domain_reasons": list(prediction.domain_reasons),
        "image": {"width": int(width), "height": int(height), "format": info.get("format"), "sha256": sha256},
    }


def threshold_info(card: ModelCard) -> dict[str, Any] | None:
    """The operating threshold of a binary model (value, the label it applies to, how it was chosen); None for an
    argmax rule."""
    threshold = (card.threshold or {}).get("value")
    if threshold is None or not card.is_binary:
        return None
    return {"value": float(threshold), "label": card.label_names[card.positive_index],
            "method": card.threshold.get("method", "chosen")}


def explanation_body(explanation: Explanation, options: ExplainOptions, store: ExplanationStore) -> dict[str, Any]:
    """The ``explanation`` object: the overlay at the original resolution (a red banner across it when the input is
    out of domain), and on request the image and coloured map apart and the raw model-size map."""
    overlay = overlay_heatmap(explanation.image, explanation.heatmap, colormap=options.colormap, alpha=options.alpha)
    if explanation.prediction.in_domain is False:
        overlay = add_banner(overlay, OUT_OF_DOMAIN_BANNER)
    overlay_png = encode_png(overlay)
    height, width = explanation.heatmap.shape
    body: dict[str, Any] = {
        "method": explanation.method,
        "target_label": explanation.target_label,
        "width": int(width),
        "height": int(height),
        "alpha": options.alpha,
        "colormap": options.colormap,
        "overlay_png": None,
        "overlay_url": None,
        "image_png": None,
        "heatmap_png": None,
        "raw_map": None,
    }
    if options.overlay == "url":
        body["overlay_url"] = f"/v1/explanations/{store.put(overlay_png)}/overlay.png"
    else:
        body["overlay_png"] = _base64(overlay_png)
    if options.layers:
        body["image_png"] = _base64(encode_png(to_display_rgb(explanation.image)))
        colour = overlay_heatmap(explanation.image, explanation.heatmap, colormap=options.colormap, alpha=1.0)
        body["heatmap_png"] = _base64(encode_png(colour))
    if options.raw:
        raw = np.ascontiguousarray(explanation.model_heatmap, dtype="<f4")
        body["raw_map"] = {"shape": list(raw.shape), "dtype": "float32", "byteorder": "little",
                           "data": _base64(raw.tobytes())}
    return body


class ExplanationStore:
    """Overlays asked for by URL: the newest ``capacity`` kept for at most ``ttl_s`` seconds (bounded memory)."""

    def __init__(self, capacity: int, ttl_s: float) -> None:
        self.capacity = max(0, capacity)
        self.ttl_s = ttl_s
        self._items: OrderedDict[str, tuple[float, bytes]] = OrderedDict()
        self._lock = Lock()

    def put(self, png: bytes) -> str:
        key = uuid.uuid4().hex
        with self._lock:
            self._expire()
            self._items[key] = (time.monotonic(), png)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)
        return key

    def get(self, key: str) -> bytes | None:
        with self._lock:
            self._expire()
            item = self._items.get(key)
        return None if item is None else item[1]

    def _expire(self) -> None:
        now = time.monotonic()
        while self._items and now - next(iter(self._items.values()))[0] > self.ttl_s:
            self._items.popitem(last=False)

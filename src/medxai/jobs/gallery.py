"""The Grad-CAM gallery of a run: the most confident true and false positives and negatives (binary tasks), or right
and wrong images per class, each overlay at its image's original resolution, with ``heatmaps/gallery.json``."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from medxai.classifier import Classifier, Explanation
from medxai.config import ExplainConfig
from medxai.data import Record, Source
from medxai.explain.overlay import OUT_OF_DOMAIN_BANNER, add_banner
from medxai.jobs.evaluate import SplitEvaluation
from medxai.models.card import ModelCard
from medxai.run_folder import RunFolder, safe_file_stem

__all__ = ["write_gallery"]


def write_gallery(
    classifier: Classifier,
    source: Source,
    records: Sequence[Record],
    evaluation: SplitEvaluation,
    run: RunFolder,
    explain: ExplainConfig,
) -> list[Path]:
    """Grad-CAM overlays of a few images per outcome (TP/FP/FN/TN for binary tasks; right/wrong per class otherwise),
    the most confident of each, at the original image resolution, written to ``heatmaps/`` with ``gallery.json``.

    Each overlay explains the label the decision rule reports (which defines the outcome), not the argmax.
    """
    out_dir = run.heatmaps_dir
    per_outcome = explain.per_outcome
    by_id = {record.id: record for record in records}
    probabilities = classifier.probabilities(evaluation.logits)
    predicted = classifier.decide(probabilities)
    chosen: list[tuple[str, str]] = []  # (outcome, id)
    for outcome, mask in _outcomes(evaluation.labels, predicted, classifier.card).items():
        indices = mask.nonzero().flatten()
        # Confidence in the decision taken: under an operating threshold the predicted label need not be the most
        # probable one, so rank by the probability of the predicted label, not by the largest probability.
        confidence = probabilities[indices, predicted[indices]]
        for index in indices[confidence.argsort(descending=True)][:per_outcome].tolist():
            chosen.append((outcome, evaluation.ids[index]))
    if not chosen:
        return []
    images = [source.load(by_id[sample_id]).image for _, sample_id in chosen]
    explanations = classifier.explain(images, method=explain.method, layer=explain.layer)
    written = []
    truth = dict(zip(evaluation.ids, evaluation.labels.tolist()))
    entries = []
    for (outcome, sample_id), explanation in zip(chosen, explanations):
        prediction = explanation.prediction
        stem = f"{outcome}_{safe_file_stem(sample_id)}_p{prediction.probabilities[prediction.label]:.2f}"
        overlay = explanation.overlay(colormap=explain.colormap, alpha=explain.alpha)
        banner = OUT_OF_DOMAIN_BANNER if prediction.in_domain is False else None
        written.append(_save_display_png(out_dir / f"{stem}.png", overlay, banner=banner))
        if explain.save_npy:
            np.save(out_dir / f"{stem}.npy", explanation.heatmap)
        entries.append(_gallery_entry(outcome, sample_id, explanation, truth[sample_id], written[-1], classifier.card))
    # What the report's gallery shows: one entry per overlay, in the order written.
    run.write_gallery({"split": evaluation.split, "method": explain.method,
                       "decision_rule": explanations[0].prediction.decision_rule, "items": entries})
    return written


def _gallery_entry(
    outcome: str, sample_id: str, explanation: Explanation, label_index: int, path: Path, card: ModelCard
) -> dict:
    """One ``heatmaps/gallery.json`` item: outcome, id, true and predicted label, probabilities, file name."""
    prediction = explanation.prediction
    return {
        "outcome": outcome,
        "id": sample_id,
        "label": card.label_names[label_index],
        "predicted": prediction.label,
        # The probability of the predicted label (under a threshold it need not be the largest), and of every label.
        "probability": prediction.probabilities[prediction.label],
        "probability_positive": (
            prediction.probabilities[card.label_names[card.positive_index]] if card.is_binary else None
        ),
        "probabilities": prediction.probabilities,
        "explained_label": explanation.target_label,
        "in_domain": prediction.in_domain,
        "file": path.name,
    }


def _save_display_png(path: Path, overlay: np.ndarray, min_side: int = 224, banner: str | None = None) -> Path:
    """Save an overlay; tiny images (28 px MedMNIST) are enlarged by an integer factor, nearest neighbour, so the
    gallery is legible without inventing detail: every original pixel becomes a uniform square. ``banner``: a
    warning across the top (an out-of-domain image)."""
    from PIL import Image

    factor = max(1, -(-min_side // max(1, min(overlay.shape[:2]))))
    image = Image.fromarray(overlay)
    if factor > 1:
        image = image.resize((image.width * factor, image.height * factor), Image.NEAREST)
    if banner:
        image = Image.fromarray(add_banner(np.asarray(image), banner))
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def _outcomes(labels: torch.Tensor, predicted: torch.Tensor, card: ModelCard) -> dict[str, torch.Tensor]:
    if card.is_binary:
        positive = card.positive_index
        truth, guess = labels == positive, predicted == positive
        return {
            "true_positive": truth & guess,
            "false_positive": ~truth & guess,
            "false_negative": truth & ~guess,
            "true_negative": ~truth & ~guess,
        }
    outcomes = {}
    for index, name in enumerate(card.label_names):
        outcomes[f"correct_{safe_file_stem(name)}"] = (labels == index) & (predicted == index)
        outcomes[f"missed_{safe_file_stem(name)}"] = (labels == index) & (predicted != index)
    return outcomes

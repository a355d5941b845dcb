"""The heatmap explains the label the user is shown: log-odds targets by hand, every decision rule, every CAM method.

Two toy networks with hand-set weights:

* :class:`AffineNet` ``conv (1x1, 1 -> 2 channels, the CAM layer) -> GAP -> Linear(2, 2)``. With ``N`` positions,
  ``d (z_c - z_o) / d A_k(p) = (W[c, k] - W[o, k]) / N`` at every p, so Grad-CAM's map for the log-odds of class c is
  ``relu(g_c)`` with ``g_c = sum_k (W[c, k] - W[o, k]) / N * A_k``, and ``g_0 = -g_1``.
* :class:`BrightnessNet` ``conv (1x1: A_0 = x, A_1 = 1 - x) -> ReLU (the CAM layer) -> GAP -> Linear`` with
  ``z_0 = K mean(A_1)``, ``z_1 = K mean(A_0)``, so ``z_1 - z_0 = K (2 mean(x) - 1)`` and
  ``p_1 = sigmoid(K (2 mean(x) - 1) / T)``: a batch of images of increasing brightness spans ``p_1`` from 0 to 1.
  The log-odds Grad-CAM map of class 1 is ``relu(K / N (2x - 1))``, that of class 0 ``relu(K / N (1 - 2x))``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from numpy.testing import assert_allclose
from torch import nn

from medxai.classifier import Classifier
from medxai.config import PreprocessConfig
from medxai.explain import (
    BaseCAM,
    CAM_METHODS,
    ClassTarget,
    DecisionTarget,
    GradCAM,
    LogOddsTarget,
    ScoreCAM,
)
from medxai.models.card import ModelCard

# ------------------------------------------------------------------------------------------ log-odds by hand

X = np.array(
    [
        [0.0, 1.0, 2.0],
        [-1.0, 0.5, 3.0],
        [2.0, -2.0, 1.5],
    ],
    dtype=np.float32,
)
CONV_WEIGHT = np.array([1.0, -0.5], dtype=np.float32)  # A_0 = x, A_1 = -0.5 x + 0.5
CONV_BIAS = np.array([0.0, 0.5], dtype=np.float32)
# The logit of class 1 grows with x (W[1] . dA/dx = 1 - 0.25 > 0) while its log-odds falls with x
# ((W[1] - W[0]) . dA/dx = -1 - 0.25 < 0): the plain logit credits evidence that raises both logits.
FC_WEIGHT = np.array([[2.0, 0.0], [1.0, 0.5]], dtype=np.float32)
FC_BIAS = np.array([0.1, -0.3], dtype=np.float32)


class AffineNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2, 2)
        self.cam_layer = "conv"
        with torch.no_grad():
            self.conv.weight.copy_(torch.from_numpy(CONV_WEIGHT).view(2, 1, 1, 1))
            self.conv.bias.copy_(torch.from_numpy(CONV_BIAS))
            self.fc.weight.copy_(torch.from_numpy(FC_WEIGHT))
            self.fc.bias.copy_(torch.from_numpy(FC_BIAS))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.conv(x)).flatten(1))


def minmax(values: np.ndarray) -> np.ndarray:
    """``medxai.explain.base.normalize_per_sample`` for one map: min-max, a constant map gives zeros."""
    span = values.max() - values.min()
    return np.zeros_like(values) if span == 0 else (values - values.min()) / span


def activations_by_hand(x: np.ndarray) -> np.ndarray:
    """``(2, H, W)`` output of the 1x1 conv."""
    return CONV_WEIGHT[:, None, None] * x[None] + CONV_BIAS[:, None, None]


def signed_sum(weights: np.ndarray, activations: np.ndarray) -> np.ndarray:
    return np.tensordot(weights, activations, axes=1)


@pytest.mark.parametrize(
    "c, log_odds_peak, logit_peak, min_difference",
    [
        # Class 0: log-odds slope (2 - 1) * 1 + (0 - 0.5) * -0.5 = +1.25 in x, logit slope 2: both peak at the
        # brightest pixel (x = 3), but the offsets differ (relu(1.25 x - 0.25) vs relu(2 x)): 0.0595 at x = 0.5.
        (0, (1, 2), (1, 2), 0.05),
        # Class 1: log-odds slope -1.25 (peak at the darkest pixel, x = -2), logit slope +0.75 (peak at x = 3).
        (1, (2, 1), (1, 2), 0.9),
    ],
)
def test_log_odds_grad_cam_by_hand(c: int, log_odds_peak, logit_peak, min_difference: float) -> None:
    other = 1 - c
    activations = activations_by_hand(X)
    n_positions = X.size
    log_odds_weights = (FC_WEIGHT[c] - FC_WEIGHT[other]) / n_positions
    logit_weights = FC_WEIGHT[c] / n_positions
    expected_raw = np.maximum(signed_sum(log_odds_weights, activations), 0.0)
    expected_logit_raw = np.maximum(signed_sum(logit_weights, activations), 0.0)
    assert expected_raw.max() > 0 and expected_raw.min() == 0  # structure worth checking
    assert np.unravel_index(np.argmax(expected_raw), X.shape) == log_odds_peak
    assert np.unravel_index(np.argmax(expected_logit_raw), X.shape) == logit_peak
    hand_difference = np.abs(minmax(expected_raw) - minmax(expected_logit_raw)).max()
    assert hand_difference > min_difference  # the hand computation says the two targets differ

    x = torch.from_numpy(X)[None, None]
    cam = GradCAM(AffineNet().eval(), "conv")
    log_odds = cam(x, target=LogOddsTarget(c))
    logit = cam(x, target=ClassTarget(c))

    assert_allclose(log_odds.raw_maps[0].numpy(), expected_raw, atol=1e-5)
    assert_allclose(log_odds.maps[0].numpy(), minmax(expected_raw), atol=1e-5)
    assert_allclose(logit.raw_maps[0].numpy(), expected_logit_raw, atol=1e-5)
    assert_allclose(logit.maps[0].numpy(), minmax(expected_logit_raw), atol=1e-5)
    expected_logits = FC_WEIGHT @ activations.reshape(2, -1).mean(axis=1) + FC_BIAS
    assert_allclose(log_odds.logits[0].numpy(), expected_logits, atol=1e-5)
    assert log_odds.target_class.tolist() == [c] and logit.target_class.tolist() == [c]
    code_difference = np.abs(log_odds.maps[0].numpy() - logit.maps[0].numpy()).max()
    assert_allclose(code_difference, hand_difference, atol=1e-5)


def test_log_odds_maps_of_the_two_classes_are_mirror_images() -> None:
    """``g_1 = -g_0``: class 1's raw map is ``relu(g)``, class 0's is ``relu(-g)``, of the same signed sum ``g``."""
    activations = activations_by_hand(X)
    g = signed_sum((FC_WEIGHT[1] - FC_WEIGHT[0]) / X.size, activations)
    assert (g > 0).any() and (g < 0).any()
    x = torch.from_numpy(X)[None, None]
    cam = GradCAM(AffineNet().eval(), "conv")

    positive = cam(x, target=LogOddsTarget(1)).raw_maps[0].numpy()
    negative = cam(x, target=LogOddsTarget(0)).raw_maps[0].numpy()

    assert_allclose(positive, np.maximum(g, 0.0), atol=1e-5)
    assert_allclose(negative, np.maximum(-g, 0.0), atol=1e-5)
    assert_allclose(positive - negative, g, atol=1e-5)
    assert not np.any((positive > 0) & (negative > 0))  # no pixel is evidence for both classes


@pytest.mark.parametrize(
    "logits, classes, expected",
    [
        ([[1.0, 3.0], [2.0, -1.0]], [1, 1], [2.0, -3.0]),
        ([[1.0, 3.0], [2.0, -1.0]], [0, 0], [-2.0, 3.0]),
        ([[1.0, 3.0], [2.0, -1.0]], [0, 1], [-2.0, -3.0]),
        ([[0.5, 0.5, 4.0]], [2], [4.0]),  # more than two classes: the plain class logit
    ],
)
def test_log_odds_target_scores(logits, classes, expected) -> None:
    scores = LogOddsTarget(classes)(torch.tensor(logits))
    assert_allclose(scores.numpy(), expected, atol=1e-6)


# ------------------------------------------------------------------------------- every decision rule, every method

K = 10.0  # z_1 - z_0 = K (2 mean(x) - 1)
SIZE = 8
BRIGHTNESS = np.linspace(0.01, 0.97, 49)  # steps of 0.02 that skip 0.5: no tie at the argmax
THRESHOLDS = [0.05, 0.11, 0.9, 0.97, None]
# The input-attribution methods share one target path (medxai.explain._attribution.InputAttribution): a gradient one
# and a perturbation one stand for all six here; tests/test_attribution_methods.py runs every one of them with a
# decision target on a smaller batch.
METHODS = sorted(name for name, method in CAM_METHODS.items() if issubclass(method, BaseCAM))
assert METHODS == ["gradcam", "gradcamplusplus", "hirescam", "layercam", "scorecam", "xgradcam"]
METHODS += ["integratedgradients", "occlusion"]


class BrightnessNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 1)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2, 2, bias=False)
        self.cam_layer = "relu"
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([1.0, -1.0]).view(2, 1, 1, 1))
            self.conv.bias.copy_(torch.tensor([0.0, 1.0]))
            self.fc.weight.copy_(torch.tensor([[0.0, K], [K, 0.0]]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.relu(self.conv(x))).flatten(1))


def make_classifier(
    threshold: float | None, temperature: float, label_names=("normal", "pneumonia"), positive_label="pneumonia"
) -> Classifier:
    card = ModelCard(
        architecture="brightness_net",
        num_classes=2,
        label_names=list(label_names),
        preprocess=PreprocessConfig(size=SIZE, resize_mode="stretch", channels=1, intensity="dtype", normalize="none"),
        cam_layer="relu",
        positive_label=positive_label,
        temperature=temperature,
        threshold={"value": threshold, "method": "youden" if threshold is not None else "argmax"},
    )
    return Classifier(BrightnessNet(), card, device="cpu", batch_size=16)  # 49 images: several batches


def make_images() -> list[np.ndarray]:
    """8x8 uint8 images of mean brightness ~``BRIGHTNESS``, each with a horizontal ramp so maps have structure."""
    ramp = np.linspace(-0.15, 0.15, SIZE)[None, :].repeat(SIZE, axis=0)
    return [np.clip(np.rint(255 * (level + ramp)), 0, 255).astype(np.uint8) for level in BRIGHTNESS]


def p_class1_of(x: np.ndarray, temperature: float = 1.0) -> float:
    """``sigmoid(K (2 mean(x) - 1) / T)`` for an input ``x`` in [0, 1] (where ``relu(x) = x``)."""
    return float(1.0 / (1.0 + np.exp(-K * (2 * x.mean() - 1) / temperature)))


def p_class1_by_hand(image: np.ndarray, temperature: float) -> float:
    return p_class1_of(image.astype(np.float64) / 255.0, temperature)


# Positive label second (the usual layout) and first (so ``1 - positive`` in the rule is exercised too).
LAYOUTS = {
    "positive_second": (("normal", "pneumonia"), "pneumonia"),
    "positive_first": (("pneumonia", "normal"), "pneumonia"),
}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("threshold", THRESHOLDS)
def test_heatmap_target_is_the_reported_label(threshold, temperature: float, layout: str, method: str) -> None:
    label_names, positive_label = LAYOUTS[layout]
    positive = label_names.index(positive_label)
    classifier = make_classifier(threshold, temperature, label_names, positive_label)
    images = make_images()

    explanations = classifier.explain(images, method=method)

    assert len(explanations) == len(images)
    p_class1 = np.array([p_class1_by_hand(image, temperature) for image in images])
    p_positive = p_class1 if positive == 1 else 1.0 - p_class1
    reported = np.array([e.prediction.probabilities[positive_label] for e in explanations])
    assert_allclose(reported, p_positive, atol=1e-5)  # probabilities rounded to 6 decimals
    assert p_positive.min() < 0.05 and p_positive.max() > 0.97  # the batch spans 0..1

    boundary = 0.5 if threshold is None else threshold
    assert np.abs(p_positive - boundary).min() > 1e-5  # none on the boundary, where float32 rounding would decide
    expected_positive = p_positive > boundary
    expected_labels = [label_names[positive] if yes else label_names[1 - positive] for yes in expected_positive]
    argmax_labels = [label_names[int(np.argmax(list(e.prediction.probabilities.values())))] for e in explanations]
    for explanation, expected in zip(explanations, expected_labels):
        assert explanation.prediction.label == expected
        assert explanation.target_label == explanation.prediction.label
        assert explanation.prediction.label_index == label_names.index(expected)
        assert explanation.method == method
        assert explanation.heatmap.shape == (SIZE, SIZE)

    disagree = [i for i, e in enumerate(explanations) if e.prediction.label != argmax_labels[i]]
    if threshold is None:
        assert not disagree
    else:
        # The inputs between the threshold and 0.5 are where the rule and argmax part: the test must have some.
        low, high = sorted((threshold, 0.5))
        between = [i for i in range(len(images)) if low < p_positive[i] < high]
        assert len(between) >= 2, f"no input with p_positive in ({low}, {high}): the rule is not exercised"
        assert disagree == between


@pytest.mark.parametrize("threshold", [0.05, 0.97])
def test_grad_cam_map_explains_the_reported_label_by_hand(threshold: float) -> None:
    """The map itself, not only its label: ``relu(2x - 1)`` for the positive class, ``relu(1 - 2x)`` otherwise."""
    classifier = make_classifier(threshold, 1.0)
    images = make_images()

    explanations = classifier.explain(images, method="gradcam")

    for image, explanation in zip(images, explanations):
        x = image.astype(np.float64) / 255.0
        sign = 1.0 if explanation.prediction.label == "pneumonia" else -1.0
        expected = minmax(np.maximum(sign * (2 * x - 1), 0.0))
        assert_allclose(explanation.model_heatmap, expected, atol=1e-5)
        assert_allclose(explanation.heatmap, expected, atol=1e-5)  # stretch at the input size: the same map


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("explicit", ["normal", "NORMAL", 0])
def test_explicit_target_explains_that_class_whatever_the_decision(method: str, explicit) -> None:
    classifier = make_classifier(0.11, 1.0)
    images = make_images()

    default = classifier.explain(images, method=method)
    targeted = classifier.explain(images, method=method, target=explicit)
    by_name = classifier.explain(images, method=method, target="normal")

    assert {e.prediction.label for e in targeted} == {"normal", "pneumonia"}  # both decisions occur
    for plain, chosen, reference in zip(default, targeted, by_name):
        assert chosen.target_label == "normal"
        assert chosen.prediction.label == plain.prediction.label  # the prediction does not follow the target
        assert_allclose(chosen.heatmap, reference.heatmap, atol=1e-6)
        if plain.prediction.label == "normal":  # same class explained: same map
            assert_allclose(chosen.heatmap, plain.heatmap, atol=1e-6)


# --------------------------------------------------------------------------------------------- Score-CAM, frozen


def test_decision_target_frozen_is_log_odds_of_the_same_classes() -> None:
    logits = torch.tensor([[0.0, 3.0], [2.0, -1.0], [1.0, 1.5]])
    target = DecisionTarget(lambda z: torch.tensor([1, 0, 0]), "fixed")
    classes = target.classes(logits)

    frozen = target.frozen(classes)

    assert isinstance(frozen, LogOddsTarget)
    assert frozen.classes(logits).tolist() == [1, 0, 0]
    assert_allclose(frozen(logits).numpy(), [3.0, 3.0, -0.5], atol=1e-6)
    assert_allclose(target(logits).numpy(), frozen(logits).numpy(), atol=1e-6)
    # Frozen: other logits (a masked input's) no longer change the class.
    other_logits = torch.tensor([[5.0, 0.0], [0.0, 5.0], [0.0, 0.0]])
    assert frozen.classes(other_logits).tolist() == [1, 0, 0]


def score_cam_by_hand(x: np.ndarray, target_class: int) -> np.ndarray:
    """Score-CAM of :class:`BrightnessNet` with the class fixed: masks ``minmax(A_k)``, scores the log-odds of
    ``target_class`` on ``x * mask_k``, softmax over channels, ``relu(sum_k w_k A_k)``, min-max."""
    activations = np.stack([np.maximum(x, 0.0), np.maximum(1.0 - x, 0.0)])
    scores = []
    for channel in activations:
        mask = (channel - channel.min()) / (channel.max() - channel.min() + 1e-8)
        masked = x * mask
        log_odds_1 = K * (np.maximum(masked, 0).mean() - np.maximum(1 - masked, 0).mean())
        scores.append(log_odds_1 if target_class == 1 else -log_odds_1)
    weights = np.exp(scores - np.max(scores))
    weights /= weights.sum()
    return minmax(np.maximum(np.tensordot(weights, activations, axes=1), 0.0))


def test_score_cam_scores_masked_inputs_for_the_unmasked_decision(monkeypatch) -> None:
    """Masking darkens the image, so each masked input alone would be decided "normal"; the map must still score
    them for the unmasked decision ("pneumonia"), i.e. with ``DecisionTarget.frozen``."""
    classifier = make_classifier(0.9, 1.0)
    ramp = np.linspace(-0.15, 0.15, SIZE)[None, :].repeat(SIZE, axis=0)
    image = np.clip(np.rint(255 * (0.7 + ramp)), 0, 255).astype(np.uint8)
    x = image.astype(np.float64) / 255.0
    assert p_class1_of(x) > 0.9  # the unmasked decision: pneumonia
    for channel in (x, 1 - x):  # each masked input on its own: below the threshold, "normal"
        assert p_class1_of(x * (channel - channel.min()) / (channel.max() - channel.min())) < 0.9

    decided_on = []
    decide = classifier.decide

    def recording_decide(probabilities: torch.Tensor) -> torch.Tensor:
        decided_on.append(probabilities.clone())
        return decide(probabilities)

    monkeypatch.setattr(classifier, "decide", recording_decide)  # the instance only; decision_target() calls it
    batch = classifier.preprocessor.normalize(classifier.preprocessor.prepare(image)[0][None])
    cam = ScoreCAM(classifier.model, "relu")
    target = classifier.decision_target()

    frozen = cam(batch, target=target)
    seen_while_frozen = list(decided_on)
    decided_on.clear()
    redecided = cam(batch, target=lambda logits: target(logits))  # a plain callable: no `frozen`, re-decided

    expected = score_cam_by_hand(x, target_class=1)
    assert frozen.target_class.tolist() == [1]
    assert seen_while_frozen, "the decision rule was never asked"
    unmasked = classifier.probabilities(frozen.logits)
    for probabilities in seen_while_frozen:  # only ever the unmasked forward pass
        assert_allclose(probabilities.numpy(), unmasked.numpy(), atol=1e-6)
    assert any(probabilities.shape[0] == 1 and probabilities[0, 1] < 0.9 for probabilities in decided_on)
    assert_allclose(frozen.maps[0].numpy(), expected, atol=1e-5)
    assert np.abs(redecided.maps[0].numpy() - expected).max() > 0.1  # re-deciding would give another map

    (explanation,) = classifier.explain(image, method="scorecam")
    assert explanation.prediction.label == explanation.target_label == "pneumonia"
    assert_allclose(explanation.model_heatmap, expected, atol=1e-5)

"""Metrics checked against scikit-learn on many random inputs, and against a tiny example worked by hand."""

from __future__ import annotations

import json
import logging
import math
import warnings

import numpy as np
import pytest

sklearn_metrics = pytest.importorskip("sklearn.metrics")

from medxai.evaluate.metrics import (  # noqa: E402  (import after the skip guard)
    average_precision,
    classification_metrics,
    confusion_matrix,
    precision_recall_curve,
    roc_auc,
    roc_curve,
    to_jsonable,
)

RANDOM_TRIALS = 60


def _random_binary_case(generator: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Labels with both classes and scores that are often tied (rounded to few distinct values)."""
    sample_count = int(generator.integers(4, 60))
    labels = generator.integers(0, 2, size=sample_count)
    labels[0], labels[1] = 0, 1
    scores = generator.random(sample_count) * 0.6 + labels * generator.random() * 0.5
    if generator.random() < 0.6:
        scores = np.round(scores, int(generator.integers(0, 2)))
    return labels, scores


def _random_probabilities(generator: np.random.Generator, sample_count: int, num_classes: int) -> np.ndarray:
    """Softmax of random logits, sometimes quantised to force ties (rows still sum to 1)."""
    logits = generator.normal(size=(sample_count, num_classes)) * 2.0
    if generator.random() < 0.5:
        logits = np.round(logits)
    probabilities = np.exp(logits - logits.max(axis=1, keepdims=True))
    return probabilities / probabilities.sum(axis=1, keepdims=True)


def _hand_specificity(counts: np.ndarray, class_index: int) -> float:
    """TN / (TN + FP) for one class of a confusion matrix, written out longhand."""
    true_negatives = 0
    false_positives = 0
    for row in range(counts.shape[0]):
        for column in range(counts.shape[1]):
            if row != class_index and column != class_index:
                true_negatives += counts[row, column]
            elif row != class_index and column == class_index:
                false_positives += counts[row, column]
    total = true_negatives + false_positives
    return true_negatives / total if total else 0.0


@pytest.mark.parametrize("drop_intermediate", [True, False])
def test_roc_curve_matches_sklearn_with_ties(drop_intermediate: bool) -> None:
    generator = np.random.default_rng(0)
    for _ in range(RANDOM_TRIALS):
        labels, scores = _random_binary_case(generator)
        expected = sklearn_metrics.roc_curve(labels, scores, drop_intermediate=drop_intermediate)
        actual = roc_curve(labels, scores, drop_intermediate=drop_intermediate)
        for actual_array, expected_array in zip(actual, expected):
            np.testing.assert_allclose(actual_array, expected_array, rtol=0, atol=1e-12)


def test_roc_auc_matches_sklearn_with_ties() -> None:
    generator = np.random.default_rng(1)
    for _ in range(RANDOM_TRIALS):
        labels, scores = _random_binary_case(generator)
        np.testing.assert_allclose(roc_auc(labels, scores), sklearn_metrics.roc_auc_score(labels, scores), atol=1e-12)


def test_roc_auc_counts_a_tie_as_one_half() -> None:
    # One positive and one negative with the same score: the only pair is tied.
    np.testing.assert_allclose(roc_auc([0, 1], [0.3, 0.3]), 0.5)
    # Pairs (positive, negative): (0.8, 0.2) win, (0.8, 0.8) tie, (0.5, 0.2) win, (0.5, 0.8) loss -> 2.5 / 4.
    np.testing.assert_allclose(roc_auc([1, 1, 0, 0], [0.8, 0.5, 0.2, 0.8]), 2.5 / 4)


def test_roc_auc_with_one_class_is_nan_and_warns(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="medxai.evaluate.metrics"):
        area = roc_auc([1, 1, 1], [0.2, 0.5, 0.9])
    assert math.isnan(area)
    assert "one class" in caplog.text.lower()


@pytest.mark.parametrize("drop_intermediate", [False, True])
def test_precision_recall_curve_and_average_precision_match_sklearn(drop_intermediate: bool) -> None:
    generator = np.random.default_rng(2)
    for _ in range(RANDOM_TRIALS):
        labels, scores = _random_binary_case(generator)
        expected = sklearn_metrics.precision_recall_curve(labels, scores, drop_intermediate=drop_intermediate)
        actual = precision_recall_curve(labels, scores, drop_intermediate=drop_intermediate)
        for actual_array, expected_array in zip(actual, expected):
            np.testing.assert_allclose(actual_array, expected_array, rtol=0, atol=1e-12)
        np.testing.assert_allclose(
            average_precision(labels, scores), sklearn_metrics.average_precision_score(labels, scores), atol=1e-12
        )


def test_average_precision_without_positives_is_zero_like_sklearn() -> None:
    labels, scores = np.array([0, 0, 0]), np.array([0.1, 0.5, 0.2])
    with pytest.warns(UserWarning):
        expected = sklearn_metrics.average_precision_score(labels, scores)
    np.testing.assert_allclose(average_precision(labels, scores), expected)


def test_confusion_matrix_matches_sklearn_including_unseen_classes() -> None:
    generator = np.random.default_rng(3)
    for _ in range(RANDOM_TRIALS):
        num_classes = int(generator.integers(2, 6))
        sample_count = int(generator.integers(1, 50))
        # Draw from fewer classes than exist, so some rows and columns are all zero.
        y_true = generator.integers(0, max(1, num_classes - 1), size=sample_count)
        y_pred = generator.integers(0, num_classes, size=sample_count)
        expected = sklearn_metrics.confusion_matrix(y_true, y_pred, labels=np.arange(num_classes))
        actual = confusion_matrix(y_true, y_pred, num_classes)
        assert actual.dtype == np.int64
        np.testing.assert_array_equal(actual, expected)


def test_confusion_matrix_rejects_out_of_range_indices() -> None:
    with pytest.raises(ValueError, match="outside"):
        confusion_matrix([0, 3], [0, 1], num_classes=3)


def _assert_binary_metrics_match_sklearn(
    y_true: np.ndarray, probabilities: np.ndarray, threshold: float | None, positive_index: int
) -> None:
    result = classification_metrics(y_true, probabilities, threshold=threshold, positive_index=positive_index)
    negative_index = 1 - positive_index
    if threshold is None:
        y_pred = probabilities.argmax(axis=1)
    else:
        y_pred = np.where(probabilities[:, positive_index] >= threshold, positive_index, negative_index)
    labels = [0, 1]
    counts = sklearn_metrics.confusion_matrix(y_true, y_pred, labels=labels)
    expected = {
        "accuracy": sklearn_metrics.accuracy_score(y_true, y_pred),
        "precision": sklearn_metrics.precision_score(y_true, y_pred, pos_label=positive_index, zero_division=0),
        "recall": sklearn_metrics.recall_score(y_true, y_pred, pos_label=positive_index, zero_division=0),
        "f1": sklearn_metrics.f1_score(y_true, y_pred, pos_label=positive_index, zero_division=0),
        "sensitivity": sklearn_metrics.recall_score(y_true, y_pred, pos_label=positive_index, zero_division=0),
        "specificity": sklearn_metrics.recall_score(y_true, y_pred, pos_label=negative_index, zero_division=0),
        "precision_macro": sklearn_metrics.precision_score(y_true, y_pred, average="macro", zero_division=0),
        "recall_macro": sklearn_metrics.recall_score(y_true, y_pred, average="macro", zero_division=0),
        "f1_macro": sklearn_metrics.f1_score(y_true, y_pred, average="macro", zero_division=0),
    }
    for key, value in expected.items():
        np.testing.assert_allclose(result[key], value, atol=1e-12, err_msg=key)
    np.testing.assert_allclose(result["specificity"], _hand_specificity(counts, positive_index), atol=1e-12)
    np.testing.assert_array_equal(result["confusion_matrix"], counts)
    assert result["n"] == len(y_true)
    assert result["threshold"] == threshold
    if len(np.unique(y_true)) == 2:
        expected_auc = sklearn_metrics.roc_auc_score(y_true == positive_index, probabilities[:, positive_index])
        np.testing.assert_allclose(result["auc"], expected_auc, atol=1e-12)
        np.testing.assert_allclose(result["auc_macro"], expected_auc, atol=1e-12)
        np.testing.assert_allclose(
            result["balanced_accuracy"], sklearn_metrics.balanced_accuracy_score(y_true, y_pred), atol=1e-12
        )
    else:
        assert math.isnan(result["auc"])


def test_binary_metrics_match_sklearn_for_argmax_and_thresholds() -> None:
    generator = np.random.default_rng(4)
    for trial in range(RANDOM_TRIALS):
        sample_count = int(generator.integers(2, 50))
        y_true = generator.integers(0, 2, size=sample_count)
        probabilities = _random_probabilities(generator, sample_count, 2)
        threshold = None if trial % 3 == 0 else float(np.round(generator.random(), 1))
        _assert_binary_metrics_match_sklearn(y_true, probabilities, threshold, positive_index=trial % 2)


def test_binary_degenerate_cases_do_not_raise() -> None:
    probabilities = np.array([[0.9, 0.1], [0.8, 0.2], [0.7, 0.3], [0.6, 0.4]])
    # The positive class is never predicted: precision is 0/0 -> 0.
    _assert_binary_metrics_match_sklearn(np.array([0, 1, 1, 0]), probabilities, None, positive_index=1)
    # Only negatives in y_true: recall 0/0 -> 0 and AUC undefined.
    _assert_binary_metrics_match_sklearn(np.array([0, 0, 0, 0]), probabilities, 0.25, positive_index=1)
    # Only positives in y_true: specificity 0/0 -> 0.
    _assert_binary_metrics_match_sklearn(np.array([1, 1, 1, 1]), probabilities, 0.25, positive_index=1)


@pytest.mark.parametrize("num_classes", [3, 4, 5])
def test_multiclass_metrics_match_sklearn(num_classes: int) -> None:
    generator = np.random.default_rng(10 + num_classes)
    for trial in range(RANDOM_TRIALS // 2):
        sample_count = int(generator.integers(num_classes, 60))
        y_true = generator.integers(0, num_classes, size=sample_count)
        y_true[:num_classes] = np.arange(num_classes)  # every class present, so sklearn's OvR AUC is defined
        probabilities = _random_probabilities(generator, sample_count, num_classes)
        if trial % 4 == 0:
            probabilities[:, num_classes - 1] = 0.0  # a class that is never predicted
            probabilities /= probabilities.sum(axis=1, keepdims=True)
        result = classification_metrics(y_true, probabilities)
        y_pred = probabilities.argmax(axis=1)
        counts = sklearn_metrics.confusion_matrix(y_true, y_pred, labels=np.arange(num_classes))

        macro_precision = sklearn_metrics.precision_score(y_true, y_pred, average="macro", zero_division=0)
        macro_recall = sklearn_metrics.recall_score(y_true, y_pred, average="macro", zero_division=0)
        macro_f1 = sklearn_metrics.f1_score(y_true, y_pred, average="macro", zero_division=0)
        macro_auc = sklearn_metrics.roc_auc_score(y_true, probabilities, multi_class="ovr", average="macro")
        hand_specificities = [_hand_specificity(counts, class_index) for class_index in range(num_classes)]
        expected = {
            "accuracy": sklearn_metrics.accuracy_score(y_true, y_pred),
            "precision": macro_precision,
            "recall": macro_recall,
            "f1": macro_f1,
            "sensitivity": macro_recall,
            "precision_macro": macro_precision,
            "recall_macro": macro_recall,
            "f1_macro": macro_f1,
            "auc": macro_auc,
            "auc_macro": macro_auc,
            "specificity": np.mean(hand_specificities),
            "balanced_accuracy": sklearn_metrics.balanced_accuracy_score(y_true, y_pred),
        }
        for key, value in expected.items():
            np.testing.assert_allclose(result[key], value, atol=1e-12, err_msg=key)
        np.testing.assert_array_equal(result["confusion_matrix"], counts)

        per_class_precision = sklearn_metrics.precision_score(
            y_true, y_pred, labels=np.arange(num_classes), average=None, zero_division=0
        )
        per_class_recall = sklearn_metrics.recall_score(
            y_true, y_pred, labels=np.arange(num_classes), average=None, zero_division=0
        )
        per_class_f1 = sklearn_metrics.f1_score(
            y_true, y_pred, labels=np.arange(num_classes), average=None, zero_division=0
        )
        for class_index in range(num_classes):
            entry = result["per_class"][str(class_index)]
            np.testing.assert_allclose(entry["precision"], per_class_precision[class_index], atol=1e-12)
            np.testing.assert_allclose(entry["recall"], per_class_recall[class_index], atol=1e-12)
            np.testing.assert_allclose(entry["f1"], per_class_f1[class_index], atol=1e-12)
            np.testing.assert_allclose(entry["specificity"], hand_specificities[class_index], atol=1e-12)
            np.testing.assert_allclose(
                entry["auc"],
                sklearn_metrics.roc_auc_score(y_true == class_index, probabilities[:, class_index]),
                atol=1e-12,
            )
            assert entry["support"] == int(np.sum(y_true == class_index))


def test_multiclass_with_an_absent_class_averages_over_defined_classes() -> None:
    generator = np.random.default_rng(20)
    num_classes = 4
    for _ in range(RANDOM_TRIALS // 2):
        sample_count = int(generator.integers(6, 40))
        y_true = generator.integers(0, 3, size=sample_count)  # class 3 never occurs
        y_true[:3] = [0, 1, 2]
        probabilities = _random_probabilities(generator, sample_count, num_classes)
        result = classification_metrics(y_true, probabilities, label_names=["a", "b", "c", "absent"])
        y_pred = probabilities.argmax(axis=1)

        expected_auc = np.mean(
            [sklearn_metrics.roc_auc_score(y_true == k, probabilities[:, k]) for k in range(3)]
        )
        np.testing.assert_allclose(result["auc"], expected_auc, atol=1e-12)
        assert math.isnan(result["per_class"]["absent"]["auc"])
        assert result["per_class"]["absent"]["support"] == 0
        # sklearn's default macro label set: classes in y_true or y_pred.
        np.testing.assert_allclose(
            result["precision"],
            sklearn_metrics.precision_score(y_true, y_pred, average="macro", zero_division=0),
            atol=1e-12,
        )
        np.testing.assert_allclose(
            result["recall"], sklearn_metrics.recall_score(y_true, y_pred, average="macro", zero_division=0), atol=1e-12
        )
        np.testing.assert_allclose(
            result["f1"], sklearn_metrics.f1_score(y_true, y_pred, average="macro", zero_division=0), atol=1e-12
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # sklearn notes y_pred classes absent from y_true
            expected_balanced_accuracy = sklearn_metrics.balanced_accuracy_score(y_true, y_pred)
        np.testing.assert_allclose(result["balanced_accuracy"], expected_balanced_accuracy, atol=1e-12)

        serialised = json.loads(json.dumps(to_jsonable(result), allow_nan=False))
        assert serialised["per_class"]["absent"]["auc"] is None


def test_hand_computed_binary_example() -> None:
    # p(positive): 0.9 0.8 0.4 0.3 0.6 0.2 for truths 1 1 1 0 0 0; threshold 0.5.
    positive_probability = np.array([0.9, 0.8, 0.4, 0.3, 0.6, 0.2])
    probabilities = np.stack([1 - positive_probability, positive_probability], axis=1)
    y_true = np.array([1, 1, 1, 0, 0, 0])
    result = classification_metrics(y_true, probabilities, threshold=0.5, label_names=["normal", "disease"])
    # Predictions 1 1 0 0 1 0: TP=2, FN=1, FP=1, TN=2.
    assert result["confusion_matrix"] == [[2, 1], [1, 2]]
    np.testing.assert_allclose(result["accuracy"], 4 / 6)
    np.testing.assert_allclose(result["precision"], 2 / 3)
    np.testing.assert_allclose(result["recall"], 2 / 3)
    np.testing.assert_allclose(result["sensitivity"], 2 / 3)
    np.testing.assert_allclose(result["specificity"], 2 / 3)
    np.testing.assert_allclose(result["f1"], 2 / 3)
    # Positive/negative pairs ranked correctly: 0.9, 0.8 beat all three negatives; 0.4 beats 0.3 and 0.2 -> 8 / 9.
    np.testing.assert_allclose(result["auc"], 8 / 9)
    assert result["positive_label"] == "disease"
    assert result["threshold"] == 0.5
    assert result["per_class"]["disease"]["support"] == 3


def test_hand_computed_multiclass_example() -> None:
    probabilities = np.array(
        [[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.5, 0.4, 0.1], [0.2, 0.2, 0.6]]
    )
    y_true = np.array([0, 1, 1, 2])
    result = classification_metrics(y_true, probabilities)
    # Predictions 0 1 0 2.
    assert result["confusion_matrix"] == [[1, 0, 0], [1, 1, 0], [0, 0, 1]]
    np.testing.assert_allclose(result["accuracy"], 0.75)
    # Precision per class 1/2, 1, 1; recall 1, 1/2, 1; F1 2/3, 2/3, 1.
    np.testing.assert_allclose(result["precision"], (0.5 + 1 + 1) / 3)
    np.testing.assert_allclose(result["recall"], (1 + 0.5 + 1) / 3)
    np.testing.assert_allclose(result["f1"], (2 / 3 + 2 / 3 + 1) / 3)
    # Specificity per class: 2/3 (one false positive of three negatives), 1, 1.
    np.testing.assert_allclose(result["specificity"], (2 / 3 + 1 + 1) / 3)
    np.testing.assert_allclose(result["auc"], 1.0)


def test_result_is_plain_json() -> None:
    generator = np.random.default_rng(30)
    probabilities = _random_probabilities(generator, 20, 3)
    result = classification_metrics(generator.integers(0, 3, size=20), probabilities)
    text = json.dumps(to_jsonable(result), allow_nan=False)
    assert json.loads(text)["n"] == 20


def test_to_jsonable_replaces_non_finite_values_and_numpy_types() -> None:
    converted = to_jsonable({"a": np.float32(0.5), "b": [np.nan, np.int64(3)], "c": (math.inf,), "d": np.arange(2)})
    assert converted == {"a": 0.5, "b": [None, 3], "c": [None], "d": [0, 1]}
    assert type(converted["b"][1]) is int


def test_invalid_inputs_are_rejected_with_clear_errors() -> None:
    with pytest.raises(ValueError, match="sum to 1"):
        classification_metrics([0, 1], [[2.0, -1.0], [0.5, 3.0]])
    with pytest.raises(ValueError, match="binary"):
        classification_metrics([0, 1, 2], np.full((3, 3), 1 / 3), threshold=0.5)
    with pytest.raises(ValueError, match="label names"):
        classification_metrics([0, 1], [[0.5, 0.5], [0.5, 0.5]], label_names=["only one"])

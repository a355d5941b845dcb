"""Label names across datasets: matching data labels to model labels, and the positive class of a binary task."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from PIL import Image

from medxai.cli import main
from medxai.data.labels import choose_positive_label, label_key, label_words, match_labels, parse_label_map
from medxai.errors import ConfigError, DataError

# (labels as a dataset spells them, the positive label a clinician expects)
POSITIVE_LABEL_TABLE = [
    (["normal", "pneumonia"], "pneumonia"),  # PneumoniaMNIST
    (["NORMAL", "PNEUMONIA"], "PNEUMONIA"),  # Kermany / Kaggle chest_xray
    (["no", "yes"], "yes"),  # brain MRI yes/no
    (["no_tumor", "tumor"], "tumor"),  # substring "tumor" in both
    (["No Tumor", "Tumor"], "Tumor"),
    (["notumor", "glioma"], "glioma"),  # glued negation
    (["non_pneumonia", "pneumonia"], "pneumonia"),
    (["COVID", "Normal"], "COVID"),  # COVID-19 radiography: the old rule chose "normal"
    (["malignant", "normal, benign"], "malignant"),  # BreastMNIST
    (["benign", "malignant"], "malignant"),
    (["Healthy", "Glaucoma"], "Glaucoma"),
    (["No Finding", "Effusion"], "Effusion"),  # NIH ChestX-ray14 one-vs-rest
    (["abnormal", "normal"], "abnormal"),  # "abnormal" contains "normal"
    (["negative", "positive"], "positive"),
    (["Non-COVID", "COVID"], "COVID"),
    (["control", "stroke"], "stroke"),
    (["0", "1"], "1"),  # integer labels of a manifest
]


@pytest.mark.parametrize("names, expected", POSITIVE_LABEL_TABLE)
def test_positive_label_by_whole_words(names, expected, caplog):
    caplog.set_level(logging.WARNING, logger="medxai")
    assert choose_positive_label(names) == expected
    assert choose_positive_label(list(reversed(names))) == expected  # the order of the names does not matter
    assert f"positive label: {expected!r}" in caplog.text  # never silent


@pytest.mark.parametrize("names", [["AP", "PA"], ["normal", "benign"], ["tumor", "pneumonia"], ["cat", "dog"]])
def test_positive_label_ties_are_errors_that_say_how_to_choose(names):
    with pytest.raises(ConfigError, match="--positive-label"):
        choose_positive_label(names)


def test_explicit_positive_label_wins_and_is_checked():
    assert choose_positive_label(["normal", "pneumonia"], "normal") == "normal"
    assert choose_positive_label(["NORMAL", "PNEUMONIA"], "pneumonia") == "PNEUMONIA"  # matched like labels
    assert choose_positive_label(["AP", "PA"], "PA") == "PA"
    with pytest.raises(ConfigError, match="not one of the labels"):
        choose_positive_label(["normal", "pneumonia"], "tumour")
    with pytest.raises(ConfigError, match="binary"):
        choose_positive_label(["a", "b", "c"], "a")
    assert choose_positive_label(["a", "b", "c"]) is None


def test_label_words_and_keys():
    assert label_words("NoFinding") == ["no", "finding"]
    assert label_words("non_pneumonia") == ["non", "pneumonia"]
    assert label_words("Non-COVID 19") == ["non", "covid", "19"]
    assert label_key("No Tumor") == label_key("no_tumor") == label_key("NO-TUMOR") == "notumor"


def test_match_labels_ignores_case_spaces_hyphens_and_underscores():
    assert match_labels(["NORMAL", "PNEUMONIA"], ["normal", "pneumonia"]) == {0: 0, 1: 1}
    assert match_labels(["pneumonia", "normal"], ["normal", "pneumonia"]) == {0: 1, 1: 0}  # order differs
    assert match_labels(["No Tumor", "tumor"], ["no_tumor", "tumor"]) == {0: 0, 1: 1}
    assert match_labels(["pneumonia"], ["normal", "pneumonia"]) == {0: 1}  # a subset of the model's labels


def test_label_map_handles_other_names_and_many_to_one():
    assert match_labels(["bacteria", "virus", "healthy"], ["normal", "pneumonia"],
                        ["bacteria=pneumonia", "virus=PNEUMONIA", "healthy=normal"]) == {0: 1, 1: 1, 2: 0}
    assert parse_label_map(["a = b"]) == {"a": "b"}
    for bad in (["a"], ["=b"], ["a="]):
        with pytest.raises(ConfigError, match="DATA_LABEL=MODEL_LABEL"):
            parse_label_map(bad)


@pytest.mark.parametrize(
    "data, model, label_map, message",
    [
        (["a", "b"], ["normal", "pneumonia"], None, r"\['a', 'b'\] match no model label"),
        (["No Tumor"], ["no_tumor", "notumor"], None, "match several model labels"),
        (["normal"], ["normal", "pneumonia"], ["healthy=normal"], "not data labels"),
        (["healthy"], ["normal", "pneumonia"], ["healthy=sane"], "'sane' is not a model label"),
    ],
)
def test_unknown_or_ambiguous_labels_are_errors_listing_both_sides(data, model, label_map, message):
    with pytest.raises(DataError, match=message) as caught:
        match_labels(data, model, label_map, where="hospital B")
    text = str(caught.value)
    assert "hospital B" in text and f"data labels {data}" in text and f"model labels {model}" in text


def test_cli_positive_label_overrides_the_rule(tmp_path):
    data = tmp_path / "data"
    rng = np.random.default_rng(0)
    for label in ("normal", "pneumonia"):
        (data / label).mkdir(parents=True)
        for index in range(10):
            Image.fromarray(rng.integers(0, 255, (16, 16), dtype=np.uint8)).save(data / label / f"{index}.png")
    common = ["train", "--data", str(data), "--out", str(tmp_path), "--epochs", "1", "--size", "16",
              "--set", "train.batch_size=8", "--set", "explain.per_outcome=1", "--set", "train.bootstrap_resamples=0"]
    assert main([*common, "--name", "rule"]) == 0
    assert main([*common, "--name", "flag", "--positive-label", "normal"]) == 0
    rule = json.loads((tmp_path / "rule" / "model_card.json").read_text())
    flag = json.loads((tmp_path / "flag" / "model_card.json").read_text())
    assert rule["positive_label"] == "pneumonia" and flag["positive_label"] == "normal"
    assert json.loads((tmp_path / "flag" / "metrics.json").read_text())["val"]["positive_label"] == "normal"


def test_label_map_names_data_labels_as_automatic_matching_does():
    """``--label-map``'s data side ignores case, spaces, hyphens and underscores, as automatic matching does."""
    assert match_labels(["No_Tumor", "tumour-yes"], ["normal", "tumor"],
                        ["no tumor=normal", "TUMOUR YES=Tumor"]) == {0: 0, 1: 1}
    with pytest.raises(ConfigError, match="twice"):
        parse_label_map(["no tumor=normal", "NO_TUMOR=tumor"])
    assert parse_label_map(["no tumor=normal", "NO_TUMOR=Normal"]) == {"no tumor": "normal", "NO_TUMOR": "Normal"}
    with pytest.raises(DataError, match=r"names \['c_d'\], which are not data labels"):
        match_labels(["a b"], ["x"], ["a-b=x", "c_d=x"])

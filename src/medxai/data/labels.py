"""Label names across datasets: which data label is which model label, and which class of a binary task is positive.

Two datasets rarely spell their classes alike: the Kermany folders say ``NORMAL``/``PNEUMONIA`` where PneumoniaMNIST
says ``normal``/``pneumonia``; one brain MRI set says ``no_tumor``, another ``No Tumor``. :func:`match_labels` maps
data labels to model labels ignoring case, spaces, hyphens and underscores, takes explicit ``DATA=MODEL`` pairs for
anything else (both sides compared the same way), and refuses (listing both sides) when a label is unknown or
ambiguous, because a silently wrong mapping inverts every metric.

:func:`choose_positive_label` picks the positive (disease) class of a binary task by whole words, never by substring
(``no_tumor`` contains ``tumor``; ``non_pneumonia`` contains ``pneumonia``): a name with a negating word (no, non,
not, normal, healthy, benign, negative...) is the negative class, a name with a finding word (pneumonia, tumor,
malignant, covid, yes...) is the positive one, and a tie is an error that asks for ``data.positive_label``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence

from medxai.errors import ConfigError, DataError

__all__ = ["label_key", "parse_label_map", "match_labels", "choose_positive_label", "label_words"]

logger = logging.getLogger(__name__)

# Words that mark the negative (no finding) class of a binary task.
_NEGATIVE_WORDS = frozenset({
    "no", "non", "not", "without", "absent", "none", "normal", "healthy", "benign", "negative", "neg", "false",
    "control", "controls", "unremarkable", "clear", "nofinding", "nofindings",
})  # fmt: skip
# Words that mark the positive (finding) class.
_POSITIVE_WORDS = frozenset({
    "yes", "true", "positive", "pos", "present", "abnormal", "abnormality", "disease", "diseased", "sick",
    "pathology", "pathological", "lesion", "lesions", "finding", "pneumonia", "bacteria", "bacterial", "virus",
    "viral", "covid", "covid19", "infection", "infected", "tuberculosis", "tb", "effusion", "opacity",
    "consolidation", "atelectasis", "cardiomegaly", "edema", "oedema", "pneumothorax", "emphysema", "fibrosis",
    "nodule", "nodules", "mass", "masses", "fracture", "fractured", "tumor", "tumour", "tumors", "tumours",
    "glioma", "meningioma", "pituitary", "cancer", "cancerous", "malignant", "malignancy", "carcinoma",
    "melanoma", "metastasis", "hemorrhage", "haemorrhage", "bleed", "stroke", "glaucoma", "retinopathy", "dr",
    "referable", "cataract", "anomaly", "defect",
})  # fmt: skip
_GLUED_NEGATIONS = ("non", "not", "no")  # "notumor", "nonpneumonia": a negation glued to a finding word


def label_key(name: str) -> str:
    """The form labels are compared in: case-folded, without spaces, hyphens and underscores (``No Tumor`` ->
    ``notumor``)."""
    return re.sub(r"[\s_\-]+", "", str(name)).casefold()


def parse_label_map(pairs: Sequence[str] | Mapping[str, str] | None) -> dict[str, str]:
    """``["DATA=MODEL", ...]`` (the repeatable ``--label-map`` option), or a mapping, as a checked mapping.

    Raises:
        ConfigError: an item without ``=`` or with an empty side, or a data label mapped twice to different model
            labels (data labels compared as :func:`label_key` does: ``No Tumor`` and ``no_tumor`` are one label).
    """
    if pairs is None:
        return {}
    items = pairs.items() if isinstance(pairs, Mapping) else (_split_pair(pair) for pair in pairs)
    mapping: dict[str, str] = {}
    for data, model in items:
        data, model = str(data).strip(), str(model).strip()
        earlier = next((key for key in mapping if label_key(key) == label_key(data)), None)
        if earlier is not None and label_key(mapping[earlier]) != label_key(model):
            raise ConfigError(f"--label-map maps data label {data!r} twice ({mapping[earlier]!r} and {model!r})")
        mapping[data] = model
    return mapping


def _split_pair(pair: str) -> tuple[str, str]:
    """``"DATA=MODEL"`` as ``(DATA, MODEL)``; ConfigError when a side is missing."""
    data, separator, model = str(pair).partition("=")
    if not separator or not data.strip() or not model.strip():
        raise ConfigError(f"--label-map {pair!r} must look like DATA_LABEL=MODEL_LABEL")
    return data, model


def match_labels(
    data_labels: Sequence[str],
    model_labels: Sequence[str],
    label_map: Mapping[str, str] | Sequence[str] | None = None,
    *,
    where: str = "data",
) -> dict[int, int]:
    """Map every data label index to a model label index.

    A data label named in ``label_map`` goes to the model label given there; any other goes to the model label equal
    to it, else to the one equal under :func:`label_key`. Several data labels may map to one model label (``bacteria``
    and ``virus`` to ``pneumonia``, by ``label_map``).

    Args:
        data_labels: the data source's label names, in index order.
        model_labels: the model's label names, in index order.
        label_map: explicit ``{data: model}`` pairs (or ``["DATA=MODEL", ...]``); either side may be written as
            :func:`label_key` compares (``--label-map "no tumor=normal"`` names the data label ``No_Tumor``).
        where: what the data is, for error messages.

    Returns:
        ``{data index: model index}``.

    Raises:
        DataError: a data label that matches no model label, or more than one; a ``label_map`` naming a data label
            the data does not have or a model label the model does not have. The message lists both sides.
    """
    mapping = parse_label_map(label_map)
    models = list(model_labels)
    by_key: dict[str, list[int]] = {}
    for index, name in enumerate(models):
        by_key.setdefault(label_key(name), []).append(index)
    sides = f"data labels {list(data_labels)}, model labels {models}"
    data_keys = {label_key(name) for name in data_labels}
    stray = sorted(data for data in mapping if label_key(data) not in data_keys)
    if stray:
        raise DataError(f"{where}: --label-map names {stray}, which are not data labels ({sides})")
    by_data_key = {label_key(data): model for data, model in mapping.items()}  # parse_label_map: one model each
    mapped = {name: by_data_key.get(label_key(name)) for name in data_labels}

    result: dict[int, int] = {}
    unknown, ambiguous = [], []
    for index, name in enumerate(data_labels):
        wanted = mapped[name] or name
        if wanted in models:
            result[index] = models.index(wanted)
            continue
        candidates = by_key.get(label_key(wanted), [])
        if len(candidates) == 1:
            result[index] = candidates[0]
        elif candidates:
            ambiguous.append(f"{name!r} (could be {[models[i] for i in candidates]})")
        elif mapped[name] is not None:
            raise DataError(f"{where}: --label-map {name}={wanted}: {wanted!r} is not a model label ({sides})")
        else:
            unknown.append(name)
    problems = []
    if unknown:
        problems.append(f"data label(s) {unknown} match no model label")
    if ambiguous:
        problems.append(f"data label(s) {', '.join(ambiguous)} match several model labels")
    if problems:
        raise DataError(f"{where}: {'; '.join(problems)} ({sides}); map them with --label-map DATA=MODEL")
    renamed = {data_labels[i]: models[j] for i, j in result.items() if data_labels[i] != models[j]}
    if renamed:
        logger.info("%s: labels mapped to the model's: %s", where,
                    ", ".join(f"{data} -> {model}" for data, model in renamed.items()))
    return result


def label_words(name: str) -> list[str]:
    """The lower-case words of a label: split at non-letters/digits and at camelCase boundaries
    (``"NoFinding"`` -> ``["no", "finding"]``, ``"non_pneumonia"`` -> ``["non", "pneumonia"]``)."""
    spaced = re.sub(r"(?<=[a-z])(?=[A-Z])", " ", str(name))
    return re.findall(r"[a-z]+|\d+", spaced.lower())


def _is_negative(name: str) -> bool:
    for word in label_words(name):
        if word in _NEGATIVE_WORDS:
            return True
        for prefix in _GLUED_NEGATIONS:
            if word.startswith(prefix) and word[len(prefix):] in _POSITIVE_WORDS:
                return True
    return False


def _is_positive(name: str) -> bool:
    return not _is_negative(name) and any(word in _POSITIVE_WORDS for word in label_words(name))


def choose_positive_label(label_names: Sequence[str], explicit: str | None = None) -> str | None:
    """The positive class of a binary task; None for a task of more than two classes.

    Args:
        label_names: the task's label names.
        explicit: ``data.positive_label`` / ``--positive-label``, matched as :func:`label_key` compares.

    Returns:
        The chosen label, spelt as in ``label_names``. A choice by name is logged at WARNING with the reason, so it
        is never silent.

    Raises:
        ConfigError: ``explicit`` is not one of the labels, is given for a task of more than two classes, or the
            names do not tell which class is positive (both or neither read as a finding).
    """
    names = list(label_names)
    if explicit is not None:
        matches = [name for name in names if name == explicit] or [
            name for name in names if label_key(name) == label_key(explicit)
        ]
        if len(names) != 2:
            raise ConfigError(f"data.positive_label is for binary tasks; this one has {len(names)} classes {names}")
        if len(matches) != 1:
            raise ConfigError(f"data.positive_label {explicit!r} is not one of the labels {names}")
        return matches[0]
    if len(names) != 2:
        return None
    negative = [name for name in names if _is_negative(name)]
    positive = [name for name in names if _is_positive(name)]
    if len(negative) == 1:
        chosen, reason = next(name for name in names if name != negative[0]), f"{negative[0]!r} reads as negative"
    elif not negative and len(positive) == 1:
        chosen, reason = positive[0], f"{positive[0]!r} reads as a finding"
    elif sorted(names) == ["0", "1"]:
        chosen, reason = "1", "integer labels: 1 is positive"
    else:
        raise ConfigError(
            f"cannot tell which of the labels {names} is the positive (finding) class from their names; set it with "
            f"--positive-label NAME (data.positive_label)"
        )
    logger.warning("positive label: %r (%s); set data.positive_label to choose another", chosen, reason)
    return chosen

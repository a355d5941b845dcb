"""What a CAM explains: small callables that turn a batch of logits into one score per sample.

A target maps logits ``(B, K)`` to scores ``(B,)``; the CAM method differentiates the scores with respect to the
hooked activations. Each target also says which class its score stands for (:meth:`Target.classes`), which
:class:`~medxai.explain.base.CAMResult` reports as ``target_class``.

Modelled on pytorch-grad-cam's ``model_targets.py`` (``ClassifierOutputTarget`` and friends), but batched: a target
sees the whole batch at once, so one backward pass serves every sample.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence
from typing import Union

import numpy as np
import torch
from torch import Tensor

from medxai.errors import ConfigError

__all__ = [
    "Target",
    "ClassTarget",
    "PredictedClassTarget",
    "LogOddsTarget",
    "DecisionTarget",
    "BinaryLogitTarget",
    "SoftmaxProbabilityTarget",
    "TargetLike",
    "as_target",
    "target_classes",
]

#: Anything :meth:`BaseCAM.__call__` accepts as ``target``: None (predicted class), a class index, one class index
#: per sample, or a callable ``logits (B, K) -> scores (B,)``.
TargetLike = Union[None, int, Sequence[int], Tensor, Callable[[Tensor], Tensor]]


class Target:
    """Base class of the targets: ``target(logits) -> scores`` plus the class each score stands for."""

    def __call__(self, logits: Tensor) -> Tensor:
        """Scores to explain.

        Args:
            logits: ``(B, K)`` model outputs of the forward pass being explained.

        Returns:
            ``(B,)`` scores, differentiable with respect to ``logits``.
        """
        raise NotImplementedError

    def classes(self, logits: Tensor) -> Tensor:
        """The class each score stands for, ``(B,)`` long, on ``logits.device``."""
        raise NotImplementedError

    def frozen(self, classes: Tensor) -> Target:
        """The same score with the classes fixed to ``classes`` (those of the unmasked forward pass).

        Gradient-free methods (Score-CAM) score masked copies of the input; a target that chooses its class from
        the logits it sees must keep the class of the original prediction there. Targets whose class is given
        already return themselves.
        """
        return self


def _class_indices(classes: int | list[int], logits: Tensor) -> Tensor:
    """Broadcast one class (or check one class per sample) against ``logits (B, K)`` and check the range."""
    batch_size, num_outputs = logits.shape
    num_classes = 2 if num_outputs == 1 else num_outputs  # a single logit stands for two classes, 0 and 1
    # A fresh tensor per call: one made in __init__ under torch.inference_mode() could not enter the graph.
    indices = torch.tensor(classes, dtype=torch.long, device=logits.device)
    if indices.ndim == 0:
        indices = indices.expand(batch_size)
    elif indices.shape != (batch_size,):
        raise ConfigError(f"got {indices.numel()} target classes for a batch of {batch_size}")
    if bool(((indices < 0) | (indices >= num_classes)).any()):
        raise ConfigError(f"target class out of range for a model with {num_classes} classes: {indices.tolist()}")
    return indices


def _class_scores(indices: Tensor, logits: Tensor) -> Tensor:
    """Each sample's logit of its class; for a single-logit model, what :class:`BinaryLogitTarget` gives."""
    if logits.shape[1] == 1:
        sign = indices.to(logits.dtype) * 2 - 1  # class 1: +logit, class 0: -logit
        return sign * logits[:, 0]
    return logits.gather(1, indices[:, None]).squeeze(1)


def _as_class_list(classes: int | Sequence[int] | Tensor | np.ndarray) -> int | list[int]:
    tensor = torch.as_tensor(classes)
    if tensor.dtype == torch.bool:
        raise ConfigError("a target class must be an integer index, not a bool (for a single-logit model use "
                          "BinaryLogitTarget)")
    if tensor.is_floating_point() or tensor.is_complex() or tensor.ndim > 1:
        raise ConfigError(f"target classes must be an integer or a 1-D sequence of integers, got {classes!r}")
    return tensor.tolist()


def _single_logit(logits: Tensor, who: str) -> Tensor:
    if logits.shape[1] != 1:
        raise ConfigError(
            f"{who} is for single-logit (sigmoid) models, but the model has {logits.shape[1]} outputs; "
            "use ClassTarget"
        )
    return logits[:, 0]


class ClassTarget(Target):
    """The logit of a given class (pytorch-grad-cam's ``ClassifierOutputTarget``).

    On a single-logit (sigmoid) model, class 1 is the positive class and class 0 the negative one, scored as
    :class:`BinaryLogitTarget` does, so a class index means the same label whatever the model's output layout.

    Args:
        classes: one class index for every sample, or one per sample (list or 1-D tensor of length B).

    Raises:
        ConfigError: (when called) a class is out of range, or the number of classes does not match the batch.
    """

    def __init__(self, classes: int | Sequence[int] | Tensor) -> None:
        self._classes = _as_class_list(classes)

    def __call__(self, logits: Tensor) -> Tensor:
        return _class_scores(self.classes(logits), logits)

    def classes(self, logits: Tensor) -> Tensor:
        return _class_indices(self._classes, logits)

    def __repr__(self) -> str:
        return f"ClassTarget({self._classes})"


class PredictedClassTarget(Target):
    """The logit of each sample's predicted class in this same forward pass (the default target).

    For a single-logit model the predicted class is 1 when the logit is positive and 0 otherwise, and the score is
    what :class:`BinaryLogitTarget` gives for that class.
    """

    def __call__(self, logits: Tensor) -> Tensor:
        return _class_scores(self.classes(logits), logits)

    def classes(self, logits: Tensor) -> Tensor:
        logits = logits.detach()
        if logits.shape[1] == 1:
            return (logits[:, 0] > 0).long()
        return logits.argmax(dim=1)

    def frozen(self, classes: Tensor) -> Target:
        return ClassTarget(classes)

    def __repr__(self) -> str:
        return "PredictedClassTarget()"


class LogOddsTarget(ClassTarget):
    """The log-odds of a class: for a two-logit binary model ``z_c - z_other``, the logit of ``p_c / (1 - p_c)``.

    For a binary task this is the quantity the decision is made on: the class reported is the one whose
    probability passes the threshold, and ``log(p / (1 - p)) = z_c - z_other`` for a softmax over two logits (a
    temperature divides it by a positive constant, which min-max normalised maps ignore). Its gradient is the
    evidence FOR the class minus the evidence for the other one, so the two classes' maps are mirror images before
    the ReLU, where the plain logit ``z_c`` of :class:`ClassTarget` would also credit evidence shared by both
    logits. With one logit (sigmoid) the log-odds is the logit itself, signed as in :class:`BinaryLogitTarget`;
    with more than two classes it is the class logit, as in Grad-CAM (Selvaraju et al. 2017) and
    pytorch-grad-cam's ``ClassifierOutputTarget``.

    Args:
        classes: one class index for every sample, or one per sample.
    """

    def __call__(self, logits: Tensor) -> Tensor:
        return _log_odds(self.classes(logits), logits)

    def __repr__(self) -> str:
        return f"LogOddsTarget({self._classes})"


class DecisionTarget(Target):
    """The log-odds (:class:`LogOddsTarget`) of the class a decision rule reports for each sample.

    The rule sees the detached logits of the same forward pass and returns a class per sample: argmax, or a
    calibrated probability against an operating threshold (``Classifier.decide``). The heatmap then explains the
    label the user is shown, not the most probable class, which differs whenever the threshold is not 0.5.

    Args:
        decide: ``logits (B, K) -> classes (B,)`` long.
        name: how the rule is described in ``repr``.
    """

    def __init__(self, decide: Callable[[Tensor], Tensor], name: str = "decision rule") -> None:
        self.decide = decide
        self.name = name

    def __call__(self, logits: Tensor) -> Tensor:
        return _log_odds(self.classes(logits), logits)

    def classes(self, logits: Tensor) -> Tensor:
        return self.decide(logits.detach().float()).to(device=logits.device, dtype=torch.long)

    def frozen(self, classes: Tensor) -> Target:
        return LogOddsTarget(classes)

    def __repr__(self) -> str:
        return f"DecisionTarget({self.name})"


def _log_odds(indices: Tensor, logits: Tensor) -> Tensor:
    if logits.shape[1] == 2:
        chosen = logits.gather(1, indices[:, None]).squeeze(1)
        other = logits.gather(1, (1 - indices)[:, None]).squeeze(1)
        return chosen - other
    return _class_scores(indices, logits)


class BinaryLogitTarget(Target):
    """Evidence for one class of a single-logit (sigmoid) binary model.

    The score is the logit for the positive class and minus the logit for the negative class: the direction in
    which the model's belief in that class grows. Its value may be negative (a wrong or unsure prediction); that is
    fine, as gradient-based CAMs use only its gradient. Deliberately *not* ``abs(logit) * sign``, a variant whose
    gradient points the wrong way whenever the logit's sign disagrees with the class (see pytorch-grad-cam issue
    #428 on its ``BinaryClassifierOutputTarget``).

    Args:
        positive: explain the positive class (True) or the negative class (False).

    Raises:
        ConfigError: (when called) the model has more than one output.
    """

    def __init__(self, positive: bool = True) -> None:
        self.positive = bool(positive)

    def __call__(self, logits: Tensor) -> Tensor:
        logit = _single_logit(logits, "BinaryLogitTarget")
        return logit if self.positive else -logit

    def classes(self, logits: Tensor) -> Tensor:
        return torch.full((logits.shape[0],), int(self.positive), dtype=torch.long, device=logits.device)

    def __repr__(self) -> str:
        return f"BinaryLogitTarget(positive={self.positive})"


class SoftmaxProbabilityTarget(Target):
    """The softmax probability of a class (pytorch-grad-cam's ``ClassifierOutputSoftmaxTarget``).

    Unlike the logit, the probability also grows when the other classes' logits shrink, so the map highlights
    evidence *against* the competing classes too.

    Args:
        classes: one class index for every sample, or one per sample.

    Raises:
        ConfigError: (when called) a single-logit model (its softmax is constant), or a class out of range.
    """

    def __init__(self, classes: int | Sequence[int] | Tensor) -> None:
        self._classes = _as_class_list(classes)

    def __call__(self, logits: Tensor) -> Tensor:
        if logits.shape[1] == 1:
            raise ConfigError("the softmax of a single logit is constant; use BinaryLogitTarget")
        probabilities = torch.softmax(logits, dim=1)
        return probabilities.gather(1, self.classes(logits)[:, None]).squeeze(1)

    def classes(self, logits: Tensor) -> Tensor:
        return _class_indices(self._classes, logits)

    def __repr__(self) -> str:
        return f"SoftmaxProbabilityTarget({self._classes})"


def as_target(target: TargetLike) -> Callable[[Tensor], Tensor]:
    """Turn what a user passes as ``target`` into a callable ``logits (B, K) -> scores (B,)``.

    Args:
        target: None (predicted class), a class index, one class index per sample, or a callable (returned as is).

    Raises:
        ConfigError: anything else, including a bool (ambiguous: use :class:`BinaryLogitTarget`).
    """
    if target is None:
        return PredictedClassTarget()
    if callable(target) and not isinstance(target, Tensor):
        return target
    if isinstance(target, (numbers.Integral, Sequence, Tensor, np.ndarray)) and not isinstance(target, str):
        return ClassTarget(target)
    raise ConfigError(f"cannot use {target!r} as a CAM target: pass a class index or a target callable")


def target_classes(target: Callable[[Tensor], Tensor], logits: Tensor) -> Tensor:
    """The class each sample's score stands for; ``-1`` for a plain callable that does not say."""
    if isinstance(target, Target) or callable(getattr(target, "classes", None)):
        return target.classes(logits).to(device=logits.device, dtype=torch.long)  # type: ignore[attr-defined]
    return torch.full((logits.shape[0],), -1, dtype=torch.long, device=logits.device)

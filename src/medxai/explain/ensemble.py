"""Grad-CAM (or any CAM method) of an ensemble: each member explained at its own layer, the maps averaged.

The class explained is decided once, on the ensemble's output (:class:`~medxai.models.ensemble.EnsembleModel`, the
mean of the members' probabilities), and every member explains that same class with the target's own score kind
(``target.frozen(classes)``: log-odds for the decision rule's class). Each member's map is min-max normalised (as
every CAM map is) before the average, so a member with larger activations does not dominate; the mean is normalised
again. Cost: one no-grad forward of the ensemble, then one CAM pass (forward + backward) per member.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from medxai.explain.base import BaseCAM, CAMResult, normalize_per_sample
from medxai.explain.targets import Target, TargetLike, as_target, target_classes
from medxai.models.ensemble import EnsembleModel

__all__ = ["EnsembleCAM"]


class EnsembleCAM:
    """Call like a :class:`~medxai.explain.base.BaseCAM`: ``cam(inputs, target) -> CAMResult``."""

    def __init__(self, method: type[BaseCAM], model: EnsembleModel) -> None:
        self.ensemble = model
        self.cams = [method(member, layer) for member, layer in zip(model.members, model.member_cam_layers)]

    @property
    def model(self) -> EnsembleModel:
        return self.ensemble

    def __call__(self, inputs: Tensor, target: TargetLike = None) -> CAMResult:
        with torch.no_grad():
            logits = self.ensemble(inputs).float()
        resolved = as_target(target)
        classes = target_classes(resolved, logits)
        frozen = resolved.frozen(classes) if isinstance(resolved, Target) else resolved
        results = [cam(inputs, target=frozen) for cam in self.cams]
        maps = torch.stack([result.maps for result in results]).mean(dim=0)
        raw = torch.stack([result.raw_maps for result in results]).mean(dim=0)
        return dataclasses.replace(results[0], maps=normalize_per_sample(maps), raw_maps=raw, logits=logits,
                                   target_class=classes)

"""An ensemble of trained models as one model: the mean of the members' probabilities.

``forward`` returns ``log(mean_m softmax(z_m))``: a softmax of it gives the averaged probabilities back exactly, so
everything downstream of a model (calibration fitted on validation, thresholds, metrics, the out-of-domain guard)
treats an ensemble like any other model. Probabilities, not logits, are averaged, as in deep ensembles
(Lakshminarayanan, Pritzel & Blundell, NeurIPS 2017). The members' own calibrations are not applied: the ensemble
is calibrated as a whole on validation, like a single model.

Members share one preprocessing (checked by :mod:`medxai.jobs.ensemble`): one input batch feeds them all. The
ensemble's stage layers are every member's (``members.<i>.<stage>``); Grad-CAM is computed per member at its own
layer and averaged (:class:`medxai.explain.ensemble.EnsembleCAM`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = ["EnsembleModel", "ENSEMBLE_ARCHITECTURE"]

ENSEMBLE_ARCHITECTURE = "ensemble"


class EnsembleModel(nn.Module):
    """Members ``nn.ModuleList`` whose averaged probabilities are returned as log-probabilities ``(B, K)``."""

    def __init__(self, members: Sequence[nn.Module]) -> None:
        super().__init__()
        if len(members) < 2:
            raise ValueError(f"an ensemble needs at least two members, got {len(members)}")
        self.members = nn.ModuleList(members)
        first = members[0]
        self.architecture = ENSEMBLE_ARCHITECTURE
        self.num_classes = first.num_classes
        self.in_chans = first.in_chans
        self.input_size = first.input_size
        first_layers = first.cam_layer
        self.cam_layer = (f"members.0.{first_layers}" if isinstance(first_layers, str)
                          else [f"members.0.{name}" for name in first_layers])
        self.member_cam_layers = [member.cam_layer for member in members]
        self.classifier_name = ""
        self.stage_layers = tuple(
            f"members.{index}.{stage}" for index, member in enumerate(members) for stage in member.stage_layers
        )

    def forward(self, inputs: Tensor) -> Tensor:
        probabilities = torch.stack([torch.softmax(member(inputs).float(), dim=1) for member in self.members])
        return probabilities.mean(dim=0).clamp_min(torch.finfo(torch.float32).tiny).log()

"""Feature statistics of a model's stages, captured during an ordinary forward pass.

The out-of-domain guard (:mod:`medxai.evaluate.domain`) models, for each stage a model declares
(``model.stage_layers``, see :class:`~medxai.models.ModelSpec`), the per-channel mean and standard deviation of the
stage's output over its spatial positions. Lee et al. (NeurIPS 2018) use the per-channel means of several layers;
the standard deviations are added here because they carry texture (the speckle of ultrasound, the sharp edges of an
MRI skull), which separates modalities where the mean alone does not. Forward hooks compute the statistics on the
fly (nothing else is kept), so prediction, explanation and the guard share ONE forward pass.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn

__all__ = ["StageCapture", "capture_stage_statistics", "stage_statistics"]


def stage_statistics(output: Tensor) -> Tensor:
    """``(B, 2C)``: per-channel spatial mean then standard deviation of a ``(B, C, *spatial)`` stage output, float32.

    A flat ``(B, C)`` output (a stage after global pooling) is taken as it is.
    """
    values = output.detach().float()
    if values.dim() <= 2:
        return values.flatten(1)
    flat = values.flatten(2)
    return torch.cat([flat.mean(dim=2), flat.std(dim=2, unbiased=False)], dim=1)


class StageCapture:
    """What :func:`capture_stage_statistics` recorded: per layer, one ``(B, 2C)`` tensor per forward pass."""

    def __init__(self, layers: Sequence[str]) -> None:
        self.layers = list(layers)
        self.batches: dict[str, list[Tensor]] = {layer: [] for layer in self.layers}

    def first(self) -> dict[str, Tensor]:
        """The statistics of the FIRST forward pass in the block (Score-CAM and TTA run more forwards after it, on
        altered inputs; the first one saw the input itself)."""
        if any(not batches for batches in self.batches.values()):
            raise RuntimeError("no forward pass ran while the stage statistics were captured")
        return {layer: batches[0] for layer, batches in self.batches.items()}

    def stacked(self) -> dict[str, Tensor]:
        """Every forward pass's statistics concatenated, per layer, on the CPU (feature extraction over a split)."""
        return {layer: torch.cat([batch.cpu() for batch in batches]) for layer, batches in self.batches.items()}


@contextmanager
def capture_stage_statistics(model: nn.Module, layers: Sequence[str]) -> Iterator[StageCapture]:
    """Record :func:`stage_statistics` of each named layer's output on every forward pass inside the block.

    Args:
        model: the network.
        layers: module names (``model.get_submodule``), e.g. ``model.stage_layers``.
    """
    capture = StageCapture(layers)
    handles = []
    try:
        for layer in capture.layers:
            def hook(_module: nn.Module, _inputs: object, output: Tensor, layer: str = layer) -> None:
                capture.batches[layer].append(stage_statistics(output))

            handles.append(model.get_submodule(layer).register_forward_hook(hook))
        yield capture
    finally:
        for handle in handles:
            handle.remove()

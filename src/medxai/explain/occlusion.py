"""Occlusion: how much the score drops when a window of the image is replaced by a reference.

Zeiler & Fergus, "Visualizing and Understanding Convolutional Networks", ECCV 2014 (arXiv:1311.2901), Sec. 4.2:
a square slides over the image; each position's map value is the target's score on the image minus its score on the
occluded image, averaged over the windows that cover the pixel (Captum's ``Occlusion``, which also clips the windows
that overhang the far edges, so every pixel is covered). ``perturbations_per_eval`` is chosen so that each forward
holds up to ``batch_size`` occluded images, on the model's device.

Choices:

* Window: ``window`` times each spatial side (default 1/8: 28 px at 224 px, 16 px at 128 px; Zeiler & Fergus used
  about 1/4 of a 224 px image, which localises less finely), at least 1 px; stride half the window. An ``int`` gives
  the window in pixels. The window spans every channel.
* Reference: ``"zero"`` (0 in the normalised space: the grey square of the paper, at the training mean) by default;
  ``"blur"`` or ``"mean"`` as for deletion/insertion.
* Map: the drop is the same on every channel of a pixel (mean over channels), and only drops are kept
  (``sign="positive"``): evidence for the class, as the paper's maps show it; a window whose removal raises the
  score gets 0.

Works for 2D and 3D inputs (the window is a cube in 3D; the cost grows with the number of positions, ``(2 / window)
** dims``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from medxai.errors import ConfigError
from medxai.explain._attribution import (
    InputAttribution,
    ReferenceKind,
    RowScorer,
    Sign,
    check_reference_kind,
    reference_images,
)

__all__ = ["Occlusion"]


class Occlusion(InputAttribution):
    """Occlusion (Zeiler & Fergus, ECCV 2014) through Captum, called like a CAM.

    Args:
        model: see :class:`~medxai.explain._attribution.InputAttribution`.
        target_layers: ignored.
        window: the occluding window as a fraction of each spatial side (float in (0, 1]) or in pixels (int).
        stride: the step between windows in pixels; None: half the window (at least 1).
        baseline: what the window becomes: ``"zero"``, ``"blur"`` or ``"mean"``.
        batch_size: occluded images per forward.
        seed: unused (the method is deterministic); accepted for a uniform signature.
        sign: override the map's sign rule (default ``"positive"``).

    Raises:
        ConfigError: a window or stride out of range, an unknown baseline or sign.
    """

    channels = "mean"
    default_sign = "positive"

    def __init__(
        self,
        model: nn.Module,
        target_layers: str | Sequence[str] | None = None,
        *,
        window: float | int = 0.125,
        stride: int | None = None,
        baseline: ReferenceKind = "zero",
        batch_size: int = 64,
        seed: int = 0,
        sign: Sign | None = None,
    ) -> None:
        super().__init__(model, target_layers, batch_size=batch_size, seed=seed, sign=sign)
        if isinstance(window, bool) or not (isinstance(window, int) and window >= 1 or 0 < float(window) <= 1):
            raise ConfigError(f"Occlusion window must be a fraction in (0, 1] or a pixel count >= 1, got {window!r}")
        if stride is not None and int(stride) < 1:
            raise ConfigError(f"Occlusion stride must be at least 1 pixel, got {stride}")
        self.window = window
        self.stride = stride
        self.baseline = check_reference_kind(baseline)

    def window_and_stride(self, spatial: Sequence[int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The window and the stride in pixels along each spatial axis of an image of size ``spatial``."""
        if isinstance(self.window, int):
            window = tuple(min(self.window, side) for side in spatial)
        else:
            window = tuple(max(1, round(self.window * side)) for side in spatial)
        stride = tuple(self.stride or max(1, side // 2) for side in window)
        return window, stride

    def attribute(self, inputs: Tensor, scorer: RowScorer) -> Tensor:
        from captum.attr import Occlusion as CaptumOcclusion

        b, c, *spatial = inputs.shape
        window, stride = self.window_and_stride(spatial)
        sample_index = torch.arange(b, device=inputs.device)
        return CaptumOcclusion(scorer).attribute(
            inputs, sliding_window_shapes=(c, *window), strides=(c, *stride),
            baselines=reference_images(inputs, self.baseline), additional_forward_args=(sample_index,),
            perturbations_per_eval=max(1, self.batch_size // b),
        )

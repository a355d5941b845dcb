"""RISE: the expected score under random masks, each pixel weighted by how often it was kept.

Petsiuk, Das & Saenko, "RISE: Randomized Input Sampling for Explanation of Black-box Models", BMVC 2018
(arXiv:1806.07421), Eq. 6 and Sec. 3.2:

    S(x) = 1 / (N * p) * sum_i  f(I (.) M_i) * M_i(x)

with ``N`` masks ``M_i``: a ``grid_size`` x ``grid_size`` grid of cells, each kept with probability ``p``, upsampled
bilinearly to ``(grid_size + 1) * cell`` pixels (``cell = ceil(side / grid_size)``) and cropped to the image at a
random shift in ``[0, cell)`` along each axis, so that the soft edges fall anywhere. ``f`` is the explained target's
score; the images are masked in the model's normalised space, so a masked pixel moves towards 0 (the training mean),
as in the authors' code. Not in Captum: implemented here in torch, batched over masks and images on the model's
device (``batch_size`` masked images per forward), every image of a batch explained with the same masks.

Choices and deviations:

* The score is the target's (the class logit, or the log-odds of the decision rule's class), not the softmax
  probability of the paper; ``target=SoftmaxProbabilityTarget(k)`` reproduces the paper. A logit can be negative, so
  the map is kept signed (``sign="signed"``) and min-max normalised: the paper's maps are the same up to that
  affine rescaling.
* Upsampling is torch's (bi/tri)linear interpolation with ``align_corners=False``; the authors use scikit-image's
  ``resize(order=1, mode="reflect")``, whose edge handling differs slightly.
* Defaults ``grid_size=7`` and ``p_keep=0.5`` are the paper's (for 224 px ImageNet images); ``n_masks=500`` is sized
  for CPU (the paper uses 4,000-8,000): the noise of the estimate falls as ``1 / sqrt(n_masks)``.
* Every random draw (the grids and the shifts) comes from a ``torch.Generator`` seeded with ``seed``, drawn once per
  call before any batching: the masks, and so the maps, do not depend on ``batch_size`` or on the batch.

Works for 2D and 3D inputs alike (3D masks are grids of cubes, upsampled trilinearly).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medxai.errors import ConfigError
from medxai.explain._attribution import InputAttribution, RowScorer, Sign
from medxai.explain.base import _INTERPOLATION_MODES

__all__ = ["RISE"]


class RISE(InputAttribution):
    """RISE (Petsiuk et al., BMVC 2018), called like a CAM.

    Args:
        model: see :class:`~medxai.explain._attribution.InputAttribution`.
        target_layers: ignored.
        n_masks: random masks ``N``.
        grid_size: cells per side of a mask's coarse grid (``s`` in the paper).
        p_keep: probability that a cell is kept (``p``).
        batch_size: masked images per forward.
        seed: seed of the masks.
        sign: override the map's sign rule (default ``"signed"``).

    Raises:
        ConfigError: ``n_masks`` or ``grid_size`` not positive, ``p_keep`` outside (0, 1].
    """

    channels = "sum"  # the saliency is one value per pixel already (one channel)
    default_sign = "signed"

    def __init__(
        self,
        model: nn.Module,
        target_layers: str | Sequence[str] | None = None,
        *,
        n_masks: int = 500,
        grid_size: int = 7,
        p_keep: float = 0.5,
        batch_size: int = 64,
        seed: int = 0,
        sign: Sign | None = None,
    ) -> None:
        super().__init__(model, target_layers, batch_size=batch_size, seed=seed, sign=sign)
        if int(n_masks) < 1 or int(grid_size) < 1:
            raise ConfigError(f"RISE needs n_masks and grid_size of at least 1, got {n_masks} and {grid_size}")
        if not 0.0 < float(p_keep) <= 1.0:
            raise ConfigError(f"RISE p_keep must be in (0, 1], got {p_keep}")
        self.n_masks = int(n_masks)
        self.grid_size = int(grid_size)
        self.p_keep = float(p_keep)

    def draw(self, spatial: Sequence[int]) -> tuple[Tensor, Tensor]:
        """The coarse grids ``(N, 1, s, .., s)`` (float 0/1) and shifts ``(N, dims)`` (long) of every mask, on the
        CPU, from a generator seeded with ``seed``."""
        generator = torch.Generator().manual_seed(self.seed)
        dims = len(spatial)
        grids = (torch.rand((self.n_masks, 1, *[self.grid_size] * dims), generator=generator) < self.p_keep).float()
        cells = torch.tensor([math.ceil(side / self.grid_size) for side in spatial])
        shifts = (torch.rand((self.n_masks, dims), generator=generator) * cells).long()
        return grids, shifts

    def masks(self, grids: Tensor, shifts: Tensor, spatial: Sequence[int]) -> Tensor:
        """Upsample and crop coarse grids ``(m, 1, s, ..)`` at ``shifts (m, dims)``: masks ``(m, *spatial)``."""
        spatial = tuple(int(side) for side in spatial)
        upsampled_size = tuple((self.grid_size + 1) * math.ceil(side / self.grid_size) for side in spatial)
        mode = _INTERPOLATION_MODES[len(spatial)]
        upsampled = F.interpolate(grids, size=upsampled_size, mode=mode, align_corners=False)
        crops = [
            upsampled[(index, 0, *[slice(int(start), int(start) + side) for start, side in zip(shift, spatial)])]
            for index, shift in enumerate(shifts.tolist())
        ]
        return torch.stack(crops)

    def attribute(self, inputs: Tensor, scorer: RowScorer) -> Tensor:
        b, _, *spatial = inputs.shape
        grids, shifts = self.draw(spatial)
        sample_index = torch.arange(b, device=inputs.device)
        saliency = inputs.new_zeros((b, *spatial), dtype=torch.promote_types(inputs.dtype, torch.float32))
        per_forward = max(1, self.batch_size // b)  # masks per forward; every image of the batch under each
        with torch.no_grad():
            for start in range(0, self.n_masks, per_forward):
                stop = min(self.n_masks, start + per_forward)
                masks = self.masks(grids[start:stop].to(inputs.device), shifts[start:stop], spatial)
                # Mask-major blocks of B images: row j is image j % B under mask j // B.
                masked = (masks[:, None, None] * inputs[None]).to(inputs.dtype).flatten(0, 1)
                scores = scorer(masked, sample_index.repeat(stop - start)).view(stop - start, b)
                saliency += torch.einsum("mb,m...->b...", scores.to(saliency.dtype), masks.to(saliency.dtype))
        return (saliency / (self.n_masks * self.p_keep)).unsqueeze(1)

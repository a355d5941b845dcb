"""Batched, on-device training augmentation (rotation, flips, scaling/affine, brightness/contrast/gamma, noise).

All random draws come from one ``torch.Generator`` on the CPU (a few numbers per image), so a run is reproducible
and resumable whatever the device; the pixel work is one ``affine_grid``/``grid_sample`` call per batch on the
batch's device. Images are expected on the ``[0, 1]`` scale, before normalisation.

Lesion masks (explanation-guided training) go through :meth:`BatchAugmenter.with_masks`: the same geometric
transform, resampled in the same ``grid_sample`` call as extra channels, so mask and image stay aligned to the
pixel; intensity changes leave the masks alone. The random draws are the same with and without masks.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F

from medxai.config import AugmentConfig

__all__ = ["BatchAugmenter"]


class BatchAugmenter:
    """Random affine + photometric augmentation of a ``(B, C, H, W)`` batch; identity when disabled."""

    def __init__(self, config: AugmentConfig) -> None:
        self.config = config

    def __call__(self, batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return self.with_masks(batch, None, generator)[0]

    def with_masks(self, batch: torch.Tensor, masks: torch.Tensor | None,
                   generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Augment ``batch`` ``(B, C, H, W)`` and move ``masks`` ``(B, H, W)`` (or None) with it, geometrically."""
        if not self.config.enabled:
            return batch, masks
        if masks is None:
            batch = self._geometric(batch, generator)
        else:  # one resampling for both: the mask rides along as one more channel
            channels = batch.shape[1]
            moved = self._geometric(torch.cat([batch, masks.unsqueeze(1).to(batch.dtype)], dim=1), generator)
            batch, masks = moved[:, :channels], moved[:, channels].clamp(0.0, 1.0).to(masks.dtype)
        return self._photometric(batch, generator), masks

    def _uniform(self, count: int, low: float, high: float, generator: torch.Generator) -> torch.Tensor:
        return torch.rand(count, generator=generator) * (high - low) + low

    def _geometric(self, batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        config = self.config
        count = batch.shape[0]
        angle = torch.deg2rad(self._uniform(count, -config.rotation_degrees, config.rotation_degrees, generator))
        scale = self._uniform(count, config.scale[0], config.scale[1], generator)
        shear = torch.deg2rad(self._uniform(count, -config.shear_degrees, config.shear_degrees, generator))
        shift = self._uniform(2 * count, -config.translate, config.translate, generator).view(count, 2) * 2
        flip_x = torch.where(torch.rand(count, generator=generator) < config.hflip, -1.0, 1.0)
        flip_y = torch.where(torch.rand(count, generator=generator) < config.vflip, -1.0, 1.0)
        if not (angle.any() or (scale != 1).any() or shear.any() or shift.any() or (flip_x < 0).any() or (flip_y < 0).any()):
            return batch
        cos, sin = torch.cos(angle), torch.sin(angle)
        # grid_sample maps output -> input coordinates, so the matrix is the inverse of the forward zoom.
        matrix = torch.zeros(count, 2, 3)
        matrix[:, 0, 0] = cos / scale * flip_x
        matrix[:, 0, 1] = (-sin + torch.tan(shear) * cos) / scale * flip_y
        matrix[:, 1, 0] = sin / scale * flip_x
        matrix[:, 1, 1] = (cos + torch.tan(shear) * sin) / scale * flip_y
        matrix[:, :, 2] = shift
        matrix = matrix.to(device=batch.device, dtype=batch.dtype)
        grid = F.affine_grid(matrix, list(batch.shape), align_corners=False)
        return F.grid_sample(batch, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    def _photometric(self, batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        config = self.config
        count = batch.shape[0]
        view = (count,) + (1,) * (batch.dim() - 1)
        if config.contrast > 0:
            factor = self._uniform(count, 1 - config.contrast, 1 + config.contrast, generator)
            mean = batch.mean(dim=tuple(range(1, batch.dim())), keepdim=True)
            batch = (batch - mean) * factor.to(batch).view(view) + mean
        if config.brightness > 0:
            shift = self._uniform(count, -config.brightness, config.brightness, generator)
            batch = batch + shift.to(batch).view(view)
        if config.gamma > 0:
            gamma = torch.exp(self._uniform(count, -config.gamma, config.gamma, generator))
            batch = batch.clamp(0.0, 1.0).pow(gamma.to(batch).view(view))
        if config.noise_std > 0:
            noise = torch.randn(batch.shape, generator=generator) * config.noise_std
            batch = batch + noise.to(batch)
        return batch.clamp(0.0, 1.0)

"""Deterministic preprocessing: native image -> model-ready tensor.

Two halves, both described by one :class:`~medxai.config.PreprocessConfig` saved with the model:

* :meth:`Preprocessor.prepare` turns one decoded image (any dtype, grey or colour, any size) into a float tensor
  ``(C, S, S)`` in ``[0, 1]``: intensity scaling, channel handling, resizing, optional denoising. It runs once per image
  (training caches its result).
* :meth:`Preprocessor.normalize` applies the per-channel mean/std to a batch on the model's device. Training-time
  augmentation runs between the two, on the ``[0, 1]`` scale.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from medxai.config import PreprocessConfig
from medxai.errors import ConfigError, InvalidImageError

__all__ = ["Preprocessor", "ContentBox", "channel_statistics", "median_filter", "gaussian_filter"]

_LUMA_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R BT.601, as Pillow's "L" conversion


@dataclass(frozen=True)
class ContentBox:
    """Where the image lies inside the model input (pixels); the rest is padding ("pad" resize mode)."""

    top: int
    left: int
    height: int
    width: int

    def as_tuple(self) -> tuple[int, int, int, int]:
        return (self.top, self.left, self.height, self.width)


class Preprocessor:
    """Applies a :class:`PreprocessConfig`; see the module docstring for the two halves."""

    def __init__(self, config: PreprocessConfig) -> None:
        _validate(config)
        self.config = config

    def prepare(self, image: np.ndarray, name: str = "<array>") -> tuple[torch.Tensor, ContentBox]:
        """One decoded image to a ``(C, S, S)`` float32 tensor in ``[0, 1]`` and the box its content occupies.

        Args:
            image: (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) array of any numeric dtype.
            name: file name or sample id, used in error messages.
        """
        pixels = _as_channels_last(image, name)
        scaled = _scale_intensity(pixels, self.config, name)
        tensor = torch.from_numpy(np.ascontiguousarray(scaled)).permute(2, 0, 1)  # (C, H, W)
        tensor = _convert_channels(tensor, self.config.channels)
        tensor, box = _resize(tensor, self.config.size, self.config.resize_mode)
        tensor = _denoise(tensor, self.config)
        return tensor.clamp_(0.0, 1.0).contiguous(), box

    def prepare_mask(self, mask: np.ndarray) -> torch.Tensor:
        """A ground-truth mask at its image's original size to an ``(S, S)`` float32 tensor in ``[0, 1]``, placed
        exactly where :meth:`prepare` places the image: the same resize (stretch, or pad with the same
        :class:`ContentBox`) with the same antialiased bilinear filter, so a border pixel holds the fraction of it
        the lesion covers; padding is 0 (no lesion). Denoising is not applied: it does not move the image.

        Args:
            mask: bool or numeric (H, W) array, the size of the image it belongs to.
        """
        values = np.asarray(mask)
        if values.ndim != 2:
            raise ValueError(f"a mask must be 2D (H, W), got shape {values.shape}")
        tensor = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).unsqueeze(0)
        tensor, _ = _resize(tensor, self.config.size, self.config.resize_mode)
        return tensor.squeeze(0).clamp_(0.0, 1.0).contiguous()

    def normalize(self, batch: torch.Tensor) -> torch.Tensor:
        """Apply mean/std normalisation to a ``(B, C, H, W)`` batch on whatever device it is."""
        if self.config.normalize == "none":
            return batch
        if self.config.mean is None or self.config.std is None:
            raise ConfigError("preprocess.normalize needs mean and std: fit them on the train split first")
        shape = (1, -1) + (1,) * (batch.dim() - 2)
        mean = torch.tensor(self.config.mean, dtype=batch.dtype, device=batch.device).view(shape)
        std = torch.tensor(self.config.std, dtype=batch.dtype, device=batch.device).view(shape)
        return (batch - mean) / std


def channel_statistics(images: torch.Tensor, chunk: int = 1024) -> tuple[list[float], list[float]]:
    """Per-channel mean and standard deviation of ``(N, C, H, W)`` images, in float64, chunked to bound memory."""
    channels = images.shape[1]
    total = torch.zeros(channels, dtype=torch.float64)
    total_sq = torch.zeros(channels, dtype=torch.float64)
    count = 0
    for start in range(0, images.shape[0], chunk):
        part = images[start : start + chunk].to(torch.float64)
        total += part.sum(dim=(0, 2, 3))
        total_sq += (part * part).sum(dim=(0, 2, 3))
        count += part.shape[0] * part.shape[2] * part.shape[3]
    mean = total / count
    std = (total_sq / count - mean * mean).clamp_min(1e-12).sqrt()
    return mean.tolist(), std.clamp_min(1e-3).tolist()


def median_filter(image: torch.Tensor, kernel: int) -> torch.Tensor:
    """Median filter of a ``(C, H, W)`` tensor with reflect padding (classic salt-and-pepper noise removal)."""
    pad = kernel // 2
    padded = F.pad(image.unsqueeze(0), (pad, pad, pad, pad), mode="reflect")
    patches = padded.unfold(2, kernel, 1).unfold(3, kernel, 1)  # (1, C, H, W, k, k)
    return patches.reshape(*patches.shape[:4], -1).median(dim=-1).values.squeeze(0)


def gaussian_filter(image: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of a ``(C, H, W)`` tensor, kernel radius ceil(3 sigma), reflect padding."""
    radius = max(1, math.ceil(3 * sigma))
    offsets = torch.arange(-radius, radius + 1, dtype=image.dtype)
    weights = torch.exp(-(offsets**2) / (2 * sigma**2))
    weights = weights / weights.sum()
    channels = image.shape[0]
    batch = F.pad(image.unsqueeze(0), (radius, radius, radius, radius), mode="reflect")
    horizontal = weights.view(1, 1, 1, -1).repeat(channels, 1, 1, 1)
    vertical = weights.view(1, 1, -1, 1).repeat(channels, 1, 1, 1)
    batch = F.conv2d(batch, horizontal, groups=channels)
    batch = F.conv2d(batch, vertical, groups=channels)
    return batch.squeeze(0)


def _validate(config: PreprocessConfig) -> None:
    choices = {
        "resize_mode": ("stretch", "pad"),
        "intensity": ("auto", "dtype", "minmax", "percentile"),
        "denoise": ("none", "median", "gaussian"),
        "normalize": ("dataset", "fixed", "none"),
    }
    for key, allowed in choices.items():
        if getattr(config, key) not in allowed:
            raise ConfigError(f"preprocess.{key} must be one of {allowed}, got {getattr(config, key)!r}")
    if config.channels not in (1, 3):
        raise ConfigError(f"preprocess.channels must be 1 or 3, got {config.channels}")
    if config.size < 4:
        raise ConfigError(f"preprocess.size must be at least 4 pixels, got {config.size}")
    if config.denoise == "median" and (config.median_kernel < 3 or config.median_kernel % 2 == 0):
        raise ConfigError(f"preprocess.median_kernel must be odd and >= 3, got {config.median_kernel}")
    if config.normalize == "fixed" and (config.mean is None or config.std is None):
        raise ConfigError("preprocess.normalize 'fixed' needs preprocess.mean and preprocess.std")
    for values in (config.mean, config.std):
        if values is not None and len(values) != config.channels:
            raise ConfigError(f"preprocess mean/std need {config.channels} values, got {values}")


def _as_channels_last(image: np.ndarray, name: str) -> np.ndarray:
    array = np.asarray(image)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim == 3 and array.shape[2] == 4:
        array = array[:, :, :3]  # alpha carries no diagnostic content
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 3):
        raise InvalidImageError(name, f"expected a 2D grey or RGB image, got an array of shape {np.shape(image)}")
    if min(array.shape[:2]) < 2:
        raise InvalidImageError(name, f"image of size {array.shape[1]}x{array.shape[0]} is too small")
    if not (np.issubdtype(array.dtype, np.number) or array.dtype == bool):
        raise InvalidImageError(name, f"unsupported pixel type {array.dtype}")
    return array


def _scale_intensity(pixels: np.ndarray, config: PreprocessConfig, name: str) -> np.ndarray:
    """Map native intensities to float32 in [0, 1] as the config says."""
    mode = config.intensity
    if pixels.dtype == bool:
        return pixels.astype(np.float32)
    if mode == "auto":
        mode = "dtype" if pixels.dtype == np.uint8 else "percentile"
    values = pixels.astype(np.float32)
    if not np.isfinite(values).all():
        raise InvalidImageError(name, "image contains NaN or infinite values")
    if mode == "dtype":
        if np.issubdtype(pixels.dtype, np.integer):
            info = np.iinfo(pixels.dtype)
            return (values - info.min) / float(info.max - info.min)
        return np.clip(values, 0.0, 1.0)
    if mode == "percentile":
        # Python floats, not NumPy float64 scalars: under NumPy 2's promotion rules those would turn float32 images
        # (DICOM, NIfTI, float TIFF) into float64 tensors that the model rejects.
        low, high = (float(value) for value in np.percentile(values, config.clip_percentiles))
        values = np.clip(values, low, high)
    low, high = float(values.min()), float(values.max())
    if high - low < 1e-12:
        return np.zeros_like(values)
    return (values - low) / (high - low)


def _convert_channels(tensor: torch.Tensor, channels: int) -> torch.Tensor:
    if tensor.shape[0] == channels:
        return tensor
    if channels == 3:
        return tensor.expand(3, -1, -1).clone()
    weights = torch.tensor(_LUMA_WEIGHTS, dtype=tensor.dtype).view(3, 1, 1)
    return (tensor * weights).sum(dim=0, keepdim=True)


def _resize(tensor: torch.Tensor, size: int, mode: str) -> tuple[torch.Tensor, ContentBox]:
    height, width = tensor.shape[1:]
    if mode == "stretch":
        target = (size, size)
    else:
        scale = size / max(height, width)
        target = (max(1, round(height * scale)), max(1, round(width * scale)))
    if target != (height, width):
        tensor = F.interpolate(
            tensor.unsqueeze(0), size=target, mode="bilinear", align_corners=False, antialias=True
        ).squeeze(0)
    if mode == "stretch":
        return tensor, ContentBox(0, 0, size, size)
    top, left = (size - target[0]) // 2, (size - target[1]) // 2
    padded = tensor.new_zeros(tensor.shape[0], size, size)
    padded[:, top : top + target[0], left : left + target[1]] = tensor
    return padded, ContentBox(top, left, target[0], target[1])


def _denoise(tensor: torch.Tensor, config: PreprocessConfig) -> torch.Tensor:
    if config.denoise == "median":
        return median_filter(tensor, config.median_kernel)
    if config.denoise == "gaussian":
        return gaussian_filter(tensor, config.gaussian_sigma)
    return tensor

"""Preprocessing: intensity scaling, channels, resize modes, denoising, normalisation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medxai.config import AugmentConfig, PreprocessConfig
from medxai.data.augment import BatchAugmenter
from medxai.data.preprocess import Preprocessor, channel_statistics, gaussian_filter, median_filter
from medxai.errors import ConfigError, InvalidImageError


def test_uint8_grey_is_divided_by_255_and_keeps_values_when_size_matches():
    image = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    tensor, box = Preprocessor(PreprocessConfig(size=8, channels=1)).prepare(image)
    assert tensor.shape == (1, 8, 8)
    np.testing.assert_allclose(tensor[0].numpy(), image / 255.0, atol=1e-7)
    assert box.as_tuple() == (0, 0, 8, 8)


def test_uint16_keeps_dynamic_range_through_percentile_scaling():
    image = np.linspace(1000, 4000, 100, dtype=np.float64).reshape(10, 10).astype(np.uint16)
    config = PreprocessConfig(size=10, channels=1, intensity="percentile", clip_percentiles=(0.0, 100.0))
    tensor, _ = Preprocessor(config).prepare(image)
    expected = (image.astype(np.float32) - 1000) / 3000
    np.testing.assert_allclose(tensor[0].numpy(), expected, atol=1e-6)
    assert len(np.unique(tensor.numpy())) > 50  # not collapsed to a few uint8 levels


def test_rgb_to_grey_uses_luminance_and_grey_to_rgb_replicates():
    rgb = np.zeros((4, 4, 3), dtype=np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 255, 100, 0
    grey, _ = Preprocessor(PreprocessConfig(size=4, channels=1)).prepare(rgb)
    np.testing.assert_allclose(grey.numpy(), (0.299 * 255 + 0.587 * 100) / 255, atol=1e-6)
    single = np.full((4, 4), 51, dtype=np.uint8)
    replicated, _ = Preprocessor(PreprocessConfig(size=4, channels=3)).prepare(single)
    assert replicated.shape == (3, 4, 4)
    np.testing.assert_allclose(replicated.numpy(), 0.2, atol=1e-6)


def test_rgba_drops_alpha():
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., :3] = 255
    tensor, _ = Preprocessor(PreprocessConfig(size=4, channels=3)).prepare(rgba)
    np.testing.assert_allclose(tensor.numpy(), 1.0)


def test_pad_mode_keeps_aspect_ratio_and_reports_the_content_box():
    image = np.full((20, 40), 255, dtype=np.uint8)
    tensor, box = Preprocessor(PreprocessConfig(size=16, resize_mode="pad")).prepare(image)
    assert box.as_tuple() == (4, 0, 8, 16)
    assert tensor[0, :4].abs().max() == 0 and tensor[0, 12:].abs().max() == 0
    np.testing.assert_allclose(tensor[0, 4:12].numpy(), 1.0, atol=1e-6)


def test_stretch_mode_fills_the_square():
    image = np.full((20, 40), 255, dtype=np.uint8)
    tensor, box = Preprocessor(PreprocessConfig(size=16)).prepare(image)
    np.testing.assert_allclose(tensor.numpy(), 1.0, atol=1e-6)
    assert box.as_tuple() == (0, 0, 16, 16)


def test_median_filter_removes_salt_noise_exactly():
    image = torch.full((1, 7, 7), 0.5)
    image[0, 3, 3] = 1.0  # one hot pixel
    filtered = median_filter(image, 3)
    torch.testing.assert_close(filtered, torch.full((1, 7, 7), 0.5))


def test_gaussian_filter_preserves_constant_and_mean():
    constant = torch.full((2, 9, 9), 0.3)
    torch.testing.assert_close(gaussian_filter(constant, 1.0), constant)
    impulse = torch.zeros(1, 21, 21)
    impulse[0, 10, 10] = 1.0
    blurred = gaussian_filter(impulse, 1.0)
    assert abs(blurred.sum().item() - 1.0) < 1e-5
    assert blurred[0, 10, 10] < 0.2 and blurred[0, 10, 11] == pytest.approx(blurred[0, 11, 10])


def test_denoise_runs_inside_prepare():
    image = np.full((8, 8), 100, dtype=np.uint8)
    image[4, 4] = 255
    tensor, _ = Preprocessor(PreprocessConfig(size=8, denoise="median")).prepare(image)
    np.testing.assert_allclose(tensor.numpy(), 100 / 255, atol=1e-6)


def test_normalize_uses_mean_and_std_per_channel():
    config = PreprocessConfig(size=4, channels=3, normalize="fixed", mean=[0.1, 0.2, 0.3], std=[0.5, 0.5, 0.25])
    batch = torch.full((2, 3, 4, 4), 0.5)
    normalized = Preprocessor(config).normalize(batch)
    torch.testing.assert_close(normalized[:, 0], torch.full((2, 4, 4), 0.8))
    torch.testing.assert_close(normalized[:, 2], torch.full((2, 4, 4), 0.8))


def test_channel_statistics_match_numpy():
    images = torch.rand(10, 3, 5, 5)
    mean, std = channel_statistics(images, chunk=3)
    np.testing.assert_allclose(mean, images.numpy().mean(axis=(0, 2, 3)), rtol=1e-5)
    np.testing.assert_allclose(std, images.numpy().std(axis=(0, 2, 3)), rtol=1e-4)


@pytest.mark.parametrize(
    "changes",
    [{"resize_mode": "crop"}, {"channels": 2}, {"denoise": "wavelet"}, {"normalize": "fixed"}, {"median_kernel": 4, "denoise": "median"}],
)
def test_bad_preprocess_config_is_a_clear_error(changes):
    with pytest.raises(ConfigError):
        Preprocessor(PreprocessConfig(**changes))


def test_bad_arrays_name_the_input():
    with pytest.raises(InvalidImageError, match="scan.png"):
        Preprocessor(PreprocessConfig()).prepare(np.zeros((4, 4, 5)), name="scan.png")
    with pytest.raises(InvalidImageError, match="NaN"):
        Preprocessor(PreprocessConfig(intensity="minmax")).prepare(np.full((4, 4), np.nan), name="x")


def test_augmentation_is_seeded_bounded_and_identity_when_off():
    batch = torch.rand(6, 1, 16, 16)
    augmenter = BatchAugmenter(AugmentConfig(rotation_degrees=20, hflip=0.5, noise_std=0.05, gamma=0.2))
    first = augmenter(batch, torch.Generator().manual_seed(3))
    second = augmenter(batch, torch.Generator().manual_seed(3))
    torch.testing.assert_close(first, second)
    assert first.min() >= 0 and first.max() <= 1 and not torch.allclose(first, batch)
    off = BatchAugmenter(AugmentConfig(enabled=False))
    assert off(batch, torch.Generator()) is batch


def test_horizontal_flip_alone_mirrors_the_image():
    config = AugmentConfig(rotation_degrees=0, scale=(1.0, 1.0), translate=0, hflip=1.0, brightness=0, contrast=0)
    batch = torch.rand(2, 1, 8, 8)
    flipped = BatchAugmenter(config)(batch, torch.Generator().manual_seed(0))
    torch.testing.assert_close(flipped, batch.flip(-1), atol=1e-5, rtol=0)

"""Shortcut alarm: regions found from the image, and the alarm on two toy data sets with real Grad-CAM maps.

Toy sets (32 px, deterministic): in the MARKER set a dim disc sits in the centre of every image and the class is
decided by a small bright mark in the top-left corner (a filled square or a plus); in the CENTRE set the class is
decided by the bright centre object (a filled square or a plus) and there is no mark. A tiny CNN is trained on each
for a second on the CPU; the alarm must fire on the first and stay quiet on the second.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from medxai.explain import GradCAM
from medxai.explain.localization import border_band
from medxai.explain.shortcut import foreground_masks, shortcut_alarm, shortcut_shares, text_regions

SIZE = 32


def _square(image: np.ndarray, top: int, left: int, side: int, value: float) -> None:
    image[top:top + side, left:left + side] = value


def _plus(image: np.ndarray, top: int, left: int, side: int, value: float) -> None:
    middle = side // 2
    image[top + middle, left:left + side] = value
    image[top:top + side, left + middle] = value


def _toy_set(kind: str, count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(seed)
    images = rng.normal(0.05, 0.02, size=(count, SIZE, SIZE))
    labels = np.arange(count) % 2
    yy, xx = np.mgrid[:SIZE, :SIZE]
    for image, label in zip(images, labels):
        shift = rng.integers(-2, 3, size=2)
        if kind == "marker":
            radius = rng.uniform(5, 8)
            image[(yy - 16 - shift[0]) ** 2 + (xx - 16 - shift[1]) ** 2 <= radius**2] = 0.35
            (_square if label == 0 else _plus)(image, 0, 0, 3, 1.0)
        else:
            (_square if label == 0 else _plus)(image, 12 + shift[0], 12 + shift[1], 9, 1.0)
    return torch.from_numpy(images).float().unsqueeze(1), torch.from_numpy(labels)


class _TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                                      nn.ReLU())
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


def _trained(kind: str) -> nn.Module:
    torch.manual_seed(0)
    images, labels = _toy_set(kind, 64, seed=1)
    model = _TinyNet()
    optimiser = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(150):
        optimiser.zero_grad()
        nn.functional.cross_entropy(model(images), labels).backward()
        optimiser.step()
    return model.eval()


def _alarm_on_test_images(kind: str) -> dict:
    model = _trained(kind)
    images, labels = _toy_set(kind, 32, seed=2)
    with torch.no_grad():
        correct = model(images).argmax(dim=1) == labels
    assert correct.float().mean() >= 0.9, f"the toy {kind} model did not learn its task"
    maps = GradCAM(model, "features.3")(images[correct]).maps
    shares = shortcut_shares(maps, images[correct, 0])
    return shortcut_alarm(shares, classes=labels[correct].tolist())


@pytest.mark.timeout(60)
def test_alarm_fires_when_a_corner_marker_decides_the_class() -> None:
    verdict = _alarm_on_test_images("marker")
    assert verdict["fires"] is True
    text = verdict["regions"]["text"]
    assert text["fires"] and max(text["flagged_fraction_by_class"].values()) >= 0.5 and text["worst_examples"]
    assert text["median_energy_share"] >= 0.25 > 10 * text["median_area_share"]


@pytest.mark.timeout(60)
def test_alarm_stays_quiet_when_the_centre_object_decides_the_class() -> None:
    verdict = _alarm_on_test_images("centre")
    assert verdict["fires"] is False, verdict
    assert all(region["worst_examples"] == [] for region in verdict["regions"].values())


def test_regions_found_from_the_image() -> None:
    images, _ = _toy_set("marker", 2, seed=3)
    text = text_regions(images[:, 0])
    assert text[:, 0, 0].all() and not text[:, 16, 16].any()  # the corner mark, not the centre
    foreground = foreground_masks(images[:, 0])
    assert foreground[:, 16, 16].all() and not foreground[:, 0, 31].any()
    assert border_band((10, 10), 0.1).sum().item() == 100 - 64
    flagged = text_regions(torch.zeros(2, 10, 10), burned_in=[True, False])
    assert flagged[0].sum().item() == 36 and not flagged[1].any()  # a DICOM flag marks the whole border band


def test_a_uniform_map_over_a_large_border_does_not_fire() -> None:
    images = torch.zeros(8, 20, 20)
    images[:, 6:14, 6:14] = 1.0
    verdict = shortcut_alarm(shortcut_shares(torch.ones(8, 20, 20), images))
    assert verdict["fires"] is False and verdict["regions"]["border"]["flagged_fraction"] == 0.0

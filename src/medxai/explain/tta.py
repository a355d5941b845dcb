"""Test-time augmentation (TTA): average a classifier's probabilities, and its CAM maps, over flipped and shifted views.

The prediction is the mean of the class probabilities of the original image and of a few transformed copies, the
classic test-time averaging of Krizhevsky et al. (NeurIPS 2012, 10 crops and their flips) and Simonyan & Zisserman
(ICLR 2015, flips); for medical images see Wang et al., "Aleatoric uncertainty estimation with test-time augmentation
for medical image segmentation with convolutional neural networks", Neurocomputing 2019. Probabilities, not logits,
are averaged: the result is the mean of what each view predicts, and it stays calibrated when each view is.

The map is the mean of each view's map brought back to the original image's frame (:meth:`View.invert_map`), as in
pytorch-grad-cam's ``aug_smooth`` (flips through ``ttach``, each mask de-augmented, then averaged) and Morbidelli et
al., "Augmented Grad-CAM: heat-maps super resolution through augmentation", ICASSP 2020. Unlike ``aug_smooth``, the
class explained is decided ONCE, on the averaged probabilities, and every view explains that same class.

Views (:data:`TTA_VIEWS`): the identity always comes first, then

- ``hflip``: left-right mirror (last axis); ``vflip``: up-down mirror (second to last axis). Both are their own
  inverse. A mirrored chest radiograph is not an anatomically plausible image (the heart changes side): use flips
  only for a model trained with them.
- ``shift``: four translations by ``+-s`` pixels along x and along y, ``s = max(1, round(0.05 * side))`` (rounded
  half up; ``side`` is the width for x shifts, the height for y shifts). Nothing wraps around: the strip an image
  shift uncovers, and the strip of the map that :meth:`View.invert_map` leaves without a source, are filled by
  replicating the nearest edge row or column. This replication is a deliberate deviation from a true translation
  (the content beyond the border is unknown); a wrap-around (``torch.roll``) would paste the opposite border in.

Views act on the last two axes, so ``(B, C, H, W)`` images and ``(B, H, W)`` maps use the same code, as do
``(B, C, D, H, W)`` volumes (flipped and shifted in-plane). Everything is torch on the tensor's device and dtype.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from medxai.errors import ConfigError
from medxai.explain.base import BaseCAM, CAMResult, _model_device, normalize_per_sample
from medxai.explain.targets import Target, TargetLike, as_target, target_classes

__all__ = [
    "TTA_VIEWS",
    "TTACAM",
    "View",
    "mean_probabilities",
    "parse_tta",
    "shift_pixels",
    "tta_probabilities",
    "tta_views",
]

#: The augmentations TTA knows, by the name configs and the CLI use.
TTA_VIEWS = ("hflip", "vflip", "shift")

#: Shift size as a fraction of the image side.
SHIFT_FRACTION = 0.05


def _softmax(logits: Tensor) -> Tensor:
    return torch.softmax(logits, dim=1)


@dataclass(frozen=True)
class View:
    """One test-time view: a flip and/or an edge-replicating shift of the last two axes.

    The image transform is ``shift(flip(x))``; :meth:`invert_map` undoes it on a map, ``flip(unshift(m))``.

    Attributes:
        name: how the view is reported (``"identity"``, ``"hflip"``, ``"shift_x+11"``...).
        flip_dims: axes to mirror, counted from the end (``-1``: horizontal, ``-2``: vertical).
        shift: ``(dy, dx)`` pixels the content moves down and right (negative: up and left).
    """

    name: str
    flip_dims: tuple[int, ...] = ()
    shift: tuple[int, int] = (0, 0)

    def apply(self, batch: Tensor) -> Tensor:
        """The transformed batch, ``(..., H, W)`` -> same shape, device and dtype; the input is not modified."""
        flipped = torch.flip(batch, self.flip_dims) if self.flip_dims else batch
        return _shift(flipped, *self.shift)

    def invert_map(self, maps: Tensor) -> Tensor:
        """Bring maps computed on :meth:`apply`'s output back to the original image's frame, ``(..., H, W)``.

        Exact away from the shifted border; the ``|shift|`` rows or columns whose source lies outside the view
        repeat the nearest edge of the view's map.
        """
        dy, dx = self.shift
        unshifted = _shift(maps, -dy, -dx)
        return torch.flip(unshifted, self.flip_dims) if self.flip_dims else unshifted


IDENTITY = View("identity")


def _shift(tensor: Tensor, dy: int, dx: int) -> Tensor:
    """``out[..., i, j] = tensor[..., clamp(i - dy), clamp(j - dx)]``: a translation with edge replication."""
    for dim, offset in ((-2, dy), (-1, dx)):
        if offset:
            size = tensor.shape[dim]
            source = (torch.arange(size, device=tensor.device) - offset).clamp_(0, size - 1)
            tensor = tensor.index_select(dim, source)
    return tensor


def parse_tta(names: str | Sequence[str] | None) -> tuple[str, ...]:
    """The TTA view names in ``names``: ``"hflip,shift"``, ``["hflip", "shift"]``; None, ``""`` or ``[]`` give ``()``.

    Case and surrounding spaces are ignored and repeats dropped, keeping the first occurrence's order.

    Raises:
        ConfigError: an unknown view (the message lists the known ones), or a name that is not a string.
    """
    if names is None:
        return ()
    items = names.split(",") if isinstance(names, str) else list(names)
    parsed: list[str] = []
    for item in items:
        if not isinstance(item, str):
            raise ConfigError(f"TTA views are given by name, got {item!r}; known views: {', '.join(TTA_VIEWS)}")
        parsed.append(item.strip().lower())
    parsed = [name for name in dict.fromkeys(parsed) if name]
    unknown = [name for name in parsed if name not in TTA_VIEWS]
    if unknown:
        raise ConfigError(f"unknown TTA view(s) {', '.join(map(repr, unknown))}; known views: {', '.join(TTA_VIEWS)}")
    return tuple(parsed)


def shift_pixels(side: int) -> int:
    """The shift for an image side of ``side`` pixels: ``max(1, round(0.05 * side))``, rounded half up."""
    return max(1, math.floor(SHIFT_FRACTION * side + 0.5))


def tta_views(names: str | Sequence[str] | None, height: int, width: int) -> list[View]:
    """The views for ``names`` (see :func:`parse_tta`) on ``height x width`` images, the identity first.

    ``"shift"`` expands to four views: right, left, down and up by :func:`shift_pixels` of the width or height.

    Raises:
        ConfigError: an unknown view name.
    """
    views = [IDENTITY]
    for name in parse_tta(names):
        if name == "hflip":
            views.append(View("hflip", flip_dims=(-1,)))
        elif name == "vflip":
            views.append(View("vflip", flip_dims=(-2,)))
        else:
            sx, sy = shift_pixels(width), shift_pixels(height)
            views += [View(f"shift_x{dx:+d}", shift=(0, dx)) for dx in (sx, -sx)]
            views += [View(f"shift_y{dy:+d}", shift=(dy, 0)) for dy in (sy, -sy)]
    return views


def mean_probabilities(
    logits_per_view: Sequence[Tensor], to_probabilities: Callable[[Tensor], Tensor] = _softmax
) -> tuple[Tensor, Tensor]:
    """Average ``to_probabilities`` over views' ``(B, K)`` logits: ``(mean probabilities, log of them)``.

    The log is the "TTA logits": ``softmax(log p) = p / sum(p) = p`` for a distribution ``p``, so code that applies a
    plain softmax to logits gets the averaged probabilities back. Probabilities are clamped to the smallest normal
    float before the log, so an underflowed class gets a very negative logit rather than ``-inf``. Computed in at
    least float32.

    Raises:
        ConfigError: ``to_probabilities`` gives one column (a softmax over a single logit is constant 1; for a
            sigmoid model pass ``lambda z: torch.softmax(torch.cat([torch.zeros_like(z), z], 1), 1)``).
        ValueError: no views.
    """
    if not logits_per_view:
        raise ValueError("test-time augmentation needs at least one view")
    total = None
    for logits in logits_per_view:
        dtype = torch.promote_types(logits.dtype, torch.float32)
        probabilities = to_probabilities(logits.detach().to(dtype))
        total = probabilities if total is None else total + probabilities
    mean = total / len(logits_per_view)
    if mean.ndim != 2 or mean.shape[1] < 2:
        raise ConfigError(f"TTA averages class probabilities of shape (B, K >= 2), got {tuple(mean.shape)}; for a "
                          "single-logit model pass to_probabilities giving both classes' probabilities")
    return mean, torch.log(mean.clamp_min(torch.finfo(mean.dtype).tiny))


def tta_probabilities(
    forward: Callable[[Tensor], Tensor],
    batch: Tensor,
    views: Sequence[View],
    to_probabilities: Callable[[Tensor], Tensor] = _softmax,
) -> tuple[Tensor, Tensor]:
    """Mean class probabilities over ``views`` of ``batch``, and the TTA logits, their log (:func:`mean_probabilities`).

    One ``forward`` per view, one view at a time (memory stays that of one batch). Running under ``torch.no_grad``
    is the caller's choice.

    Args:
        forward: ``(B, C, H, W) -> (B, K)`` logits, e.g. the model.
        batch: ``(B, C, H, W)`` (or ``(B, C, D, H, W)``) preprocessed batch, on ``forward``'s device.
        views: from :func:`tta_views`; the identity alone gives the plain prediction.
        to_probabilities: ``(B, K)`` logits -> ``(B, K)`` probabilities (e.g. a temperature-scaled softmax).

    Returns:
        ``(B, K)`` mean probabilities and ``(B, K)`` TTA logits, at least float32.
    """
    return mean_probabilities([forward(view.apply(batch)) for view in views], to_probabilities)


def _chooses_class(target: Callable[[Tensor], Tensor]) -> bool:
    """Whether ``target`` picks its class from the logits it sees (it overrides :meth:`Target.frozen`)."""
    frozen = getattr(type(target), "frozen", None)
    return callable(frozen) and frozen is not Target.frozen


class TTACAM:
    """A CAM method averaged over test-time views, called like the :class:`~medxai.explain.base.BaseCAM` it wraps.

    One call:

    1. when the target chooses its class from the logits (None: the predicted class; a
       :class:`~medxai.explain.targets.DecisionTarget`), one no-grad forward per view gives the TTA logits and
       the target picks each sample's class on them, once;
    2. the target is frozen to those classes, keeping its kind of score (:meth:`Target.frozen`: the predicted
       class's logit stays a logit, a decision's log-odds stays a log-odds), and the base CAM explains that same
       class in every view;
    3. each view's maps are brought back with :meth:`View.invert_map` and averaged; a BaseCAM always min-max
       normalises its maps per sample, so the mean (whose range is narrower wherever the views disagree) is
       normalised again with :func:`~medxai.explain.base.normalize_per_sample`. ``raw_maps`` is the mean of the
       views' raw maps, brought back the same way, in the method's units and not normalised.

    Cost: ``V`` forwards with a graph and ``V`` backwards for ``V`` views, plus ``V`` no-grad forwards in step 1
    (skipped for a target with a fixed class, such as :class:`~medxai.explain.targets.ClassTarget`, whose TTA
    logits come from the CAM passes themselves).

    Args:
        cam: the CAM method (e.g. ``GradCAM(model)``).
        views: from :func:`tta_views`, usually with the identity first.
        to_probabilities: ``(B, K)`` logits -> ``(B, K)`` probabilities averaged over views. The TTA logits are
            their log, so a softmax of the result's logits gives the averaged probabilities back; a temperature
            belongs here, not in a later softmax of the TTA logits.
    """

    def __init__(
        self, cam: BaseCAM, views: Sequence[View], to_probabilities: Callable[[Tensor], Tensor] = _softmax
    ) -> None:
        if not views:
            raise ValueError("test-time augmentation needs at least one view")
        self.cam = cam
        self.views = list(views)
        self.to_probabilities = to_probabilities

    @property
    def model(self) -> torch.nn.Module:
        return self.cam.model

    def __call__(self, inputs: Tensor, target: TargetLike = None) -> CAMResult:
        """Explain a batch with test-time augmentation.

        Args:
            inputs: ``(B, C, H, W)`` (or ``(B, C, D, H, W)``) preprocessed batch; not modified.
            target: as for :meth:`BaseCAM.__call__`; a target that picks its class decides it on the TTA logits.

        Returns:
            The wrapped method's result type with ``logits`` the TTA logits (log of the mean probabilities),
            ``maps``/``raw_maps`` the averaged maps in the original frame, and ``target_class`` the class every
            view explains (``-1`` for a plain callable that does not say).
        """
        if not isinstance(inputs, Tensor) or inputs.ndim not in (4, 5):
            shape = tuple(inputs.shape) if isinstance(inputs, Tensor) else type(inputs).__name__
            raise ValueError(f"expected a (B, C, H, W) or (B, C, D, H, W) tensor, got {shape}")
        target_fn = as_target(target)
        batch = inputs.detach().to(_model_device(self.model, inputs.device))
        tta_logits = None
        if _chooses_class(target_fn):
            with torch.no_grad():
                _, tta_logits = tta_probabilities(self.model, batch, self.views, self.to_probabilities)
            target_fn = target_fn.frozen(target_classes(target_fn, tta_logits))  # type: ignore[attr-defined]
        results = [self.cam(view.apply(batch), target=target_fn) for view in self.views]
        if tta_logits is None:
            _, tta_logits = mean_probabilities([result.logits for result in results], self.to_probabilities)
        maps = self._mean_map([result.maps for result in results])
        raw_maps = self._mean_map([result.raw_maps for result in results])
        return dataclasses.replace(
            results[0],
            maps=normalize_per_sample(maps),
            raw_maps=raw_maps,
            logits=tta_logits,
            target_class=target_classes(target_fn, tta_logits),
        )

    def _mean_map(self, maps_per_view: Sequence[Tensor]) -> Tensor:
        """The mean over views of each view's maps brought back to the original frame."""
        total = sum(view.invert_map(maps) for view, maps in zip(self.views, maps_per_view))
        return total / len(self.views)

    def __repr__(self) -> str:
        return f"TTACAM({self.cam!r}, views={[view.name for view in self.views]})"

"""The machinery every class activation map (CAM) method shares; a method states only its own formula.

One call explains a batch with ONE forward and (for gradient methods) ONE backward pass:

1. forward the batch with the target layers hooked (:mod:`medxai.explain._hooks`), keeping the logits;
2. ``scores = target(logits)``, one per sample, and the gradient of ``scores.sum()`` with respect to each layer's
   activations (samples of an eval-mode CNN do not interact, so each sample gets the gradient of its own score);
3. per layer, the method's map: ``relu(sum_c w_c A_c)`` with the method's :meth:`BaseCAM.channel_weights`, or its own
   :meth:`BaseCAM.combine`;
4. upsample each layer's map to the input size, average several layers' min-max normalised maps, and min-max
   normalise the result per sample.

Only the part of the network after the first target layer records an autograd graph: the layers before it run as
in plain inference (no saved activations, no graph), and the backward pass stops at the target layers, where the
gradient the methods need lives. Nothing below a target layer can change ``d score / d A`` (a path that bypasses
``A`` is a constant for that partial derivative), so the maps are exactly those of a full-graph forward, at about
the cost of one inference forward (see ``benchmarks/explain_throughput.py``).

All of it runs in torch on the model's device, for 2D ``(B, C, H, W)`` and 3D ``(B, C, D, H, W)`` inputs alike
(``b, c, *spatial = activations.shape``), as in MONAI's ``class_activation_maps.py``; the split into a tiny base
and one file per method follows pytorch-grad-cam's ``base_cam.py``.

Adding a method (Grad-CAM++, XGrad-CAM...) means subclassing :class:`BaseCAM` and overriding
:meth:`~BaseCAM.channel_weights`; a method that is not a channel-weighted sum (HiResCAM, LayerCAM) overrides
:meth:`~BaseCAM.combine`; a gradient-free one (Score-CAM) also sets ``uses_gradients = False`` and finds the model,
inputs and target it needs in the :class:`CAMContext` that ``combine`` receives.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medxai.errors import ConfigError, ModelError
from medxai.explain._hooks import capture_activations_and_gradients, resolve_layer
from medxai.explain.targets import TargetLike, as_target, target_classes

__all__ = [
    "BaseCAM",
    "CAMContext",
    "CAMResult",
    "checked_call",
    "normalize_per_sample",
    "upsample_maps",
    "weighted_channel_sum",
]

logger = logging.getLogger(__name__)

_INTERPOLATION_MODES = {1: "linear", 2: "bilinear", 3: "trilinear"}


@dataclass(frozen=True)
class CAMResult:
    """A batch of explanations and the prediction they explain, from the same forward pass.

    Attributes:
        maps: ``(B, *input_spatial)`` float maps in [0, 1] (min-max per sample; a constant map is all zeros), at
            the input tensor's spatial size, on the model's device.
        raw_maps: ``(B, *input_spatial)`` the same maps before the final normalisation. With one target layer this
            is the method's map in its own units (e.g. ``relu(sum_c w_c A_c)`` for Grad-CAM), upsampled; with
            several layers it is the mean of their normalised maps.
        logits: ``(B, K)`` detached logits of the forward pass that produced the maps.
        target_class: ``(B,)`` long, the class each map explains (``-1`` for a custom target that does not say).
    """

    maps: Tensor
    raw_maps: Tensor
    logits: Tensor
    target_class: Tensor


@dataclass(frozen=True)
class CAMContext:
    """What a method's :meth:`BaseCAM.combine` may need beyond one layer's activations and gradients.

    Gradient methods ignore it; Score-CAM uses it to re-run the model on masked inputs.

    Attributes:
        model: the network being explained.
        inputs: ``(B, C, *spatial)`` the (detached) input batch, on the model's device.
        target: the resolved target callable, ``logits (B, K) -> scores (B,)``.
        logits: ``(B, K)`` detached logits of the forward pass.
        target_class: ``(B,)`` long.
        layer_name: the layer whose activations are being combined.
    """

    model: nn.Module
    inputs: Tensor
    target: Callable[[Tensor], Tensor]
    logits: Tensor
    target_class: Tensor
    layer_name: str


def weighted_channel_sum(weights: Tensor, activations: Tensor) -> Tensor:
    """``relu(sum_c w_c A_c)``, the map of every channel-weighted CAM method.

    Args:
        weights: ``(B, C)`` one weight per sample and channel.
        activations: ``(B, C, *spatial)``.

    Returns:
        ``(B, *spatial)`` non-negative map.
    """
    b, c, *spatial = activations.shape
    weighted = weights.reshape(b, c, *([1] * len(spatial))) * activations
    return torch.relu(weighted.sum(dim=1))


def upsample_maps(maps: Tensor, size: Sequence[int]) -> Tensor:
    """Resize ``(B, *spatial)`` maps to ``(B, *size)`` with (bi/tri)linear interpolation, ``align_corners=False``.

    Linear interpolation keeps a non-negative map non-negative; same-size maps are returned unchanged.
    """
    size = tuple(int(s) for s in size)
    if tuple(maps.shape[1:]) == size:
        return maps
    mode = _INTERPOLATION_MODES[len(size)]
    return F.interpolate(maps.unsqueeze(1), size=size, mode=mode, align_corners=False).squeeze(1)


def normalize_per_sample(maps: Tensor) -> Tensor:
    """Min-max normalise each sample's map to [0, 1]; a constant map (to float precision) becomes all zeros.

    Args:
        maps: ``(B, *spatial)`` float maps.

    Returns:
        ``(B, *spatial)`` maps in [0, 1], no NaN for constant maps.
    """
    b = maps.shape[0]
    flat = maps.reshape(b, -1)
    low = flat.amin(dim=1, keepdim=True)
    high = flat.amax(dim=1, keepdim=True)
    span = high - low
    # A span below float resolution relative to the values is rounding noise, not structure worth stretching.
    scale = torch.maximum(high.abs(), low.abs())
    flat_map = span <= torch.finfo(maps.dtype).eps * scale
    normalised = (flat - low) / torch.where(flat_map, torch.ones_like(span), span)
    normalised = torch.where(flat_map, torch.zeros_like(normalised), normalised).clamp_(0.0, 1.0)
    return normalised.reshape(maps.shape)


def checked_call(method: object, inputs: Tensor, target: TargetLike) -> Callable[[Tensor], Tensor]:
    """What every heatmap method (an object with a ``model``) checks before it explains: a 2D or 3D
    ``(B, C, *spatial)`` batch, a target it can resolve (returned as a callable), and, once per method object, a
    warning for a model in training mode.

    Raises:
        ValueError: ``inputs`` is not a 4D or 5D tensor.
        ConfigError: a bad target.
    """
    if not isinstance(inputs, Tensor) or inputs.ndim not in (4, 5):
        shape = tuple(inputs.shape) if isinstance(inputs, Tensor) else type(inputs).__name__
        raise ValueError(f"expected a (B, C, H, W) or (B, C, D, H, W) tensor, got {shape}")
    target_fn = as_target(target)
    if method.model.training and not getattr(method, "_warned_training_mode", False):  # type: ignore[attr-defined]
        logger.warning("explaining a model in training mode: BatchNorm and dropout make maps batch-dependent; "
                       "call model.eval() first")
        method._warned_training_mode = True  # type: ignore[attr-defined]
    return target_fn


def _model_device(model: nn.Module, fallback: torch.device) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return fallback


@contextlib.contextmanager
def _record_graph_from(model: nn.Module, layer_names: Sequence[str]) -> Iterator[None]:
    """Run a forward pass without autograd until the first of ``layer_names`` has run, and with it afterwards.

    A forward hook on each layer (prepended, so that it runs before the capture hook of
    :func:`~medxai.explain._hooks.capture_activations_and_gradients`) switches gradient recording on; the capture
    hook then sees a layer output that does not require grad and makes it a leaf of the graph. The grad mode in
    force on entry is restored on exit, also when the block raises, and every hook is removed.
    """
    previous = torch.is_grad_enabled()

    def enable_grad(module: nn.Module, args: object, output: object) -> None:
        torch.set_grad_enabled(True)

    handles = [resolve_layer(model, name).register_forward_hook(enable_grad, prepend=True) for name in layer_names]
    try:
        torch.set_grad_enabled(False)
        yield
    finally:
        for handle in handles:
            handle.remove()
        torch.set_grad_enabled(previous)


def _as_logits(output: object, batch_size: int) -> Tensor:
    if not isinstance(output, Tensor):
        raise ModelError(f"CAM needs a model that returns a logits tensor, got {type(output).__name__}")
    logits = output.unsqueeze(1) if output.ndim == 1 else output
    if logits.ndim != 2 or logits.shape[0] != batch_size:
        raise ModelError(f"expected logits of shape (B={batch_size}, K), got {tuple(output.shape)}")
    return logits


def _resolve_target_layers(model: nn.Module, target_layers: str | Sequence[str] | None) -> list[str]:
    if target_layers is None:
        target_layers = getattr(model, "cam_layer", None)
        if target_layers is None:
            raise ConfigError(
                f"{type(model).__name__} declares no cam_layer; pass target_layers (e.g. the last convolutional "
                "block's name)"
            )
    names = [target_layers] if isinstance(target_layers, str) else list(target_layers)
    if not names:
        raise ConfigError("target_layers is empty; name at least one layer")
    for name in names:
        if not isinstance(name, str):
            raise ConfigError(f"target layers are given by module name (str), got {type(name).__name__}")
        resolve_layer(model, name)
    return list(dict.fromkeys(names))


class BaseCAM:
    """A class activation map method; subclasses state only their formula.

    The model is never modified: no mode switch (call ``model.eval()`` yourself; in training mode BatchNorm mixes
    the samples of a batch, so maps would depend on the batch), no ``requires_grad`` change, no ``.grad`` written,
    every hook removed after each call.

    Args:
        model: a CNN returning logits ``(B, K)`` (``(B,)`` is read as one logit).
        target_layers: module name(s) whose output feature maps to explain, as in ``model.named_modules()``;
            None uses ``model.cam_layer`` (declared by every medxai model).
        channels_last: hand 2D batches to the model in channels-last memory layout (the values are the same).
            None (default) does so on the CPU, where oneDNN convolutions run 1.2-1.5x faster on it for 3-channel
            224 px inputs (ResNet, DenseNet, EfficientNet; no change for 1-channel inputs); should the model fail
            on it (a ``.view`` of a feature map), the call is repeated in the usual layout, which this object then
            keeps. The model's own parameters are left as they are.

    Raises:
        ConfigError: a layer does not exist (the message lists close names), or None is given for a model without
            ``cam_layer``.
    """

    #: False for gradient-free methods (Score-CAM): the backward pass is skipped and ``gradients`` is None.
    uses_gradients: ClassVar[bool] = True

    def __init__(
        self,
        model: nn.Module,
        target_layers: str | Sequence[str] | None = None,
        *,
        channels_last: bool | None = None,
    ) -> None:
        self.model = model
        self.target_layers = _resolve_target_layers(model, target_layers)
        self.channels_last = channels_last
        self._warned_training_mode = False
        self._channels_last_failed = False

    def channel_weights(self, activations: Tensor, gradients: Tensor | None) -> Tensor:
        """The method's weight for each channel: ``(B, C, *spatial)`` inputs -> ``(B, C)``.

        Args:
            activations: ``(B, C, *spatial)`` detached activations of one target layer, float32 (float64 for a
                float64 model).
            gradients: the same shape, gradients of each sample's score with respect to them (None when
                ``uses_gradients`` is False).
        """
        raise NotImplementedError(f"{type(self).__name__} must override channel_weights or combine")

    def combine(self, activations: Tensor, gradients: Tensor | None, context: CAMContext) -> Tensor:
        """One layer's map, ``(B, *spatial)`` at the layer's resolution; by default ``relu(sum_c w_c A_c)``.

        Override for methods that are not a channel-weighted sum of activations.

        Args:
            activations: ``(B, C, *spatial)`` detached activations of one target layer, float32 (float64 for a
                float64 model).
            gradients: the same shape, or None when ``uses_gradients`` is False.
            context: the model, inputs, target and logits of this call.
        """
        return weighted_channel_sum(self.channel_weights(activations, gradients), activations)

    def __call__(self, inputs: Tensor, target: TargetLike = None) -> CAMResult:
        """Explain a batch.

        Args:
            inputs: ``(B, C, H, W)`` or ``(B, C, D, H, W)`` preprocessed batch; moved to the model's device. It is
                not modified and does not get ``requires_grad``.
            target: None (each sample's predicted class), a class index, one class index per sample, or a
                callable ``logits (B, K) -> scores (B,)`` such as :class:`~medxai.explain.targets.ClassTarget`.

        Returns:
            The maps at the input's spatial size, with the logits of the same forward pass.

        Raises:
            ConfigError: a bad target, or a target layer that does not give a ``(B, C, *spatial)`` feature map.
            ModelError: the model does not return a logits tensor.
        """
        target_fn = checked_call(self, inputs, target)

        # inference_mode(False) and enable_grad: CAM needs a graph even when the caller runs under no_grad.
        with torch.inference_mode(False), torch.enable_grad():
            device = _model_device(self.model, inputs.device)
            batch = inputs.detach().to(device)
            if batch.is_inference():
                batch = batch.clone()  # inference tensors cannot take part in autograd
            logits, activations, gradients, classes, batch = self._forward_in_layout(batch, target_fn)
            if gradients is None and self.uses_gradients:
                # The score does not depend on what was recorded from the target layers on (the model switches
                # autograd off inside its forward after them): record the whole forward, as far as the model lets.
                logger.debug("recording the whole forward graph for %s", type(self.model).__name__)
                logits, activations, gradients, classes = self._forward(batch, target_fn, graph_from_layers=False)
        logits = logits.detach()

        with torch.no_grad():
            spatial_size = tuple(batch.shape[2:])
            layer_maps = []
            for name in self.target_layers:
                activation = activations[name]
                if activation.ndim != batch.ndim or activation.shape[0] != batch.shape[0]:
                    raise ConfigError(
                        f"layer {name!r} gives shape {tuple(activation.shape)}, not a (B, C, *spatial) feature map "
                        f"matching the input {tuple(batch.shape)}; choose a convolutional layer"
                    )
                # At least float32 (half-precision activations of an autocast forward are promoted); float64 stays.
                dtype = torch.promote_types(activation.dtype, torch.float32)
                gradient = gradients[name].to(dtype) if gradients is not None else None
                context = CAMContext(self.model, batch, target_fn, logits, classes, name)
                layer_map = self.combine(activation.to(dtype), gradient, context)
                layer_maps.append(upsample_maps(layer_map, spatial_size))
            if len(layer_maps) == 1:
                raw_maps = layer_maps[0]
            else:
                raw_maps = torch.stack([normalize_per_sample(m) for m in layer_maps]).mean(dim=0)
            maps = normalize_per_sample(raw_maps)
        return CAMResult(maps=maps, raw_maps=raw_maps, logits=logits, target_class=classes)

    def _forward_in_layout(
        self, batch: Tensor, target_fn: Callable[[Tensor], Tensor]
    ) -> tuple[Tensor, dict[str, Tensor], dict[str, Tensor] | None, Tensor, Tensor]:
        """:meth:`_forward` on the batch in the memory layout ``channels_last`` asks for; also returns that batch."""
        automatic = self.channels_last is None
        use_channels_last = batch.ndim == 4 and (
            self.channels_last if not automatic else batch.device.type == "cpu" and not self._channels_last_failed
        )
        if not use_channels_last:
            return (*self._forward(batch, target_fn, graph_from_layers=True), batch)
        laid_out = batch.contiguous(memory_format=torch.channels_last)
        try:
            return (*self._forward(laid_out, target_fn, graph_from_layers=True), laid_out)
        except RuntimeError as error:
            if not automatic or not any(word in str(error) for word in ("stride", "contiguous", "memory format")):
                raise
            self._channels_last_failed = True
            logger.info("%s fails on channels-last inputs (%s); using the contiguous layout from now on",
                        type(self.model).__name__, str(error).splitlines()[0])
            return (*self._forward(batch, target_fn, graph_from_layers=True), batch)

    def _forward(
        self, batch: Tensor, target_fn: Callable[[Tensor], Tensor], *, graph_from_layers: bool
    ) -> tuple[Tensor, dict[str, Tensor], dict[str, Tensor] | None, Tensor]:
        """One forward (and, for gradient methods, one backward) pass: logits, activations, gradients, classes.

        With ``graph_from_layers`` the graph is recorded only from the first target layer on (gradient methods) or
        not at all (gradient-free ones). Gradients are None for gradient-free methods, and also when the score
        turns out not to depend on the graph (the caller then retries with the whole graph).
        """
        if not graph_from_layers:
            recording = contextlib.nullcontext()
        elif self.uses_gradients:
            recording = _record_graph_from(self.model, self.target_layers)
        else:
            recording = torch.no_grad()
        with recording, capture_activations_and_gradients(self.model, self.target_layers) as capture:
            logits = _as_logits(self.model(batch), batch.shape[0])
            # The model may leave autograd off after its forward (a head under its own no_grad/enable_grad blocks
            # restores the mode they found): the target's score is recorded regardless.
            with torch.set_grad_enabled(self.uses_gradients):
                scores = target_fn(logits)
                total = scores.sum() if isinstance(scores, Tensor) else None
            if not isinstance(scores, Tensor) or scores.shape != (batch.shape[0],):
                got = tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__
                raise ConfigError(f"a target must return one score per sample, shape ({batch.shape[0]},); "
                                  f"got {got}")
            classes = target_classes(target_fn, logits)
            activations = {name: a.detach() for name, a in capture.activations.items()}
            gradients = None
            if self.uses_gradients and (scores.requires_grad or not graph_from_layers):
                gradients = capture.gradients(total)
        return logits, activations, gradients, classes

    def __repr__(self) -> str:
        return f"{type(self).__name__}(target_layers={self.target_layers})"

"""Capture a model's intermediate activations (and their gradients) for CAM methods, and always let go.

The capture uses forward hooks only. Gradients are then taken with :func:`torch.autograd.grad` with respect to
the captured activations, rather than with backward hooks or ``Tensor.register_hook`` plus ``loss.backward()``:

* ``register_full_backward_hook`` wraps module outputs in a view that a later in-place op (torchvision ResNet's and
  DenseNet's ``ReLU(inplace=True)``) then refuses to modify;
* ``backward()`` would accumulate into every parameter's ``.grad``, i.e. change the user's model, and run the
  backward pass all the way to the input; ``autograd.grad`` touches no ``.grad`` and stops at the captured layers.

Each hook hands the rest of the network a *copy* of the layer's output. An in-place op further down (DenseNet applies
``F.relu(features, inplace=True)`` to the last feature block's output) then changes the copy, and the activation
kept here (and differentiated against) is exactly what the layer produced.
"""

from __future__ import annotations

import difflib
import functools
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from medxai.errors import ConfigError

__all__ = ["ActivationCapture", "capture_activations_and_gradients", "resolve_layer"]

logger = logging.getLogger(__name__)


def resolve_layer(model: nn.Module, name: str) -> nn.Module:
    """Return ``model.get_submodule(name)``, or raise a :class:`ConfigError` that lists close layer names.

    Args:
        model: the network.
        name: dotted module name as in ``model.named_modules()`` (e.g. ``"layer4"``, ``"features.denseblock4"``).

    Raises:
        ConfigError: no module of that name exists.
    """
    try:
        return model.get_submodule(name)
    except AttributeError:
        names = [module_name for module_name, _ in model.named_modules() if module_name]
        close = difflib.get_close_matches(name, names, n=5, cutoff=0.5)
        if close:
            hint = f"; close names: {', '.join(close)}"
        else:
            shown = [n for n in names if "." not in n][:12]  # the top-level layers orient a reader best
            hint = f"; top-level layers: {', '.join(shown) or '(none)'}"
        raise ConfigError(f"model {type(model).__name__} has no layer named {name!r}{hint}") from None


class ActivationCapture:
    """What the forward hooks of :func:`capture_activations_and_gradients` recorded during one forward pass.

    Args:
        layer_names: the hooked layers, in order.
    """

    def __init__(self, layer_names: Sequence[str]) -> None:
        self.layer_names = list(layer_names)
        self._outputs: dict[str, list[Tensor]] = {name: [] for name in self.layer_names}

    def _forward_hook(self, name: str, module: nn.Module, args: Any, output: Any) -> Tensor:
        if not isinstance(output, Tensor):
            raise ConfigError(
                f"layer {name!r} ({type(module).__name__}) returns {type(output).__name__}, not a tensor; "
                "choose a layer whose output is a feature map"
            )
        if torch.is_grad_enabled() and not output.requires_grad:
            # Nothing before this layer requires grad (frozen backbone, plain input): make the activation a leaf of
            # the graph, so gradients with respect to it exist without touching the input or the parameters.
            output = output.detach().requires_grad_(True)
        self._outputs[name].append(output)
        return output.clone()  # see the module docstring: downstream in-place ops must not reach what we keep

    @property
    def activations(self) -> dict[str, Tensor]:
        """Each layer's output from the forward pass, still attached to the graph when gradients are enabled.

        Raises:
            ConfigError: a layer did not run, or ran more than once (a shared module), in that forward pass.
        """
        activations = {}
        for name, outputs in self._outputs.items():
            if len(outputs) != 1:
                raise ConfigError(
                    f"layer {name!r} ran {len(outputs)} times in one forward pass; CAM needs a layer that runs "
                    "exactly once per forward"
                )
            activations[name] = outputs[0]
        return activations

    def gradients(self, score: Tensor) -> dict[str, Tensor]:
        """Gradients of a scalar ``score`` with respect to every captured activation, in one backward pass.

        Args:
            score: scalar built from the forward pass's outputs (usually the sum of per-sample target scores;
                samples do not interact in an eval-mode CNN, so each sample gets the gradient of its own score).

        Returns:
            Layer name -> gradient, same shape as the activation. A layer the score does not depend on gets zeros.

        Raises:
            ConfigError: the score is not a scalar connected to the forward pass.
        """
        if score.ndim != 0 or not score.requires_grad:
            raise ConfigError(
                "the target score must be a scalar computed from the model's output "
                f"(got shape {tuple(score.shape)}, requires_grad={score.requires_grad})"
            )
        activations = self.activations
        grads = torch.autograd.grad(score, list(activations.values()), allow_unused=True)
        result = {}
        for (name, activation), grad in zip(activations.items(), grads, strict=True):
            if grad is None:
                logger.warning("the target score does not depend on layer %r; its gradients are zero", name)
                grad = torch.zeros_like(activation)
            result[name] = grad
        return result


@contextmanager
def capture_activations_and_gradients(model: nn.Module, layer_names: Sequence[str]) -> Iterator[ActivationCapture]:
    """Hook ``layer_names`` of ``model`` for the duration of a ``with`` block.

    Every hook is removed on exit, also when the block raises. Nothing else about the model changes: no mode
    switch, no ``requires_grad`` change on parameters, no ``.grad`` written.

    Args:
        model: the network (any ``nn.Module``).
        layer_names: dotted module names; duplicates are ignored.

    Yields:
        The :class:`ActivationCapture` filled by the next forward pass of ``model``.

    Raises:
        ConfigError: a layer name does not exist in ``model``.

    Example:
        >>> with capture_activations_and_gradients(model, ["layer4"]) as capture:  # doctest: +SKIP
        ...     logits = model(x)
        ...     grads = capture.gradients(logits[:, 0].sum())
    """
    names = list(dict.fromkeys(layer_names))
    modules = [resolve_layer(model, name) for name in names]
    capture = ActivationCapture(names)
    handles = []
    try:
        for name, module in zip(names, modules, strict=True):
            handles.append(module.register_forward_hook(functools.partial(capture._forward_hook, name)))
        yield capture
    finally:
        for handle in handles:
            handle.remove()

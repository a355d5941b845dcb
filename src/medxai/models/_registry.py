"""The model registry: one :class:`ModelSpec` per architecture name.

Modelled on timm's ``_registry.py``: a family module decorates a builder function with :func:`register_model`, which
records what the rest of medxai needs to know about the network without building it: the layer Grad-CAM should read
(Selvaraju et al., ICCV 2017, use the last convolutional feature map), the final ``nn.Linear`` (replaced for transfer
learning), the input size the defaults were chosen for and where ImageNet weights come from.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from medxai.errors import ModelError

__all__ = ["ModelSpec", "register_model", "list_models", "model_spec"]

# name -> spec; filled when the family modules are imported by ``medxai.models``.
_REGISTRY: dict[str, ModelSpec] = {}


@dataclass(frozen=True)
class ModelSpec:
    """What medxai knows about a registered architecture, without building it.

    Attributes:
        name: the registry name (``create_model(name, ...)``; stored as ``architecture`` in the model card).
        builder: ``builder(num_classes, in_chans, input_size, dropout, **kwargs) -> nn.Module`` returning a randomly
            initialised network that outputs raw logits of shape ``(batch, num_classes)``.
        cam_layer: name (for ``model.get_submodule``) of the module whose output is the last convolutional feature
            map, or a function of the input size giving that name, for families whose depth depends on it.
        classifier: name of the final ``nn.Linear``.
        default_input_size: the input side length (pixels) used when ``create_model`` is not given one.
        pretrained_source: where ImageNet weights come from, e.g. ``"torchvision:ResNet18_Weights.IMAGENET1K_V1"``;
            ``None`` when the architecture has none.
        description: one line for ``medxai models``-style listings.
        stages: names of the modules whose outputs end the network's stages (resolution levels), shallow to deep,
            or a function of the input size giving them; the out-of-domain guard (:mod:`medxai.evaluate.domain`)
            models their feature statistics, from low-level texture to the CAM layer's semantics. They are also the
            finer CAM layers ``explain.layer`` may name or fuse; the default is the last one (``docs/models.md``).
    """

    name: str
    builder: Callable[..., nn.Module]
    cam_layer: str | Callable[[int], str]
    classifier: str
    default_input_size: int
    pretrained_source: str | None
    description: str
    stages: tuple[str, ...] | Callable[[int], tuple[str, ...]] = ()

    def resolve_stages(self, input_size: int) -> tuple[str, ...]:
        """The stage modules' names for a model built for ``input_size`` pixel inputs."""
        return tuple(self.stages(input_size) if callable(self.stages) else self.stages)

    def resolve_cam_layer(self, input_size: int) -> str:
        """The CAM layer's module name for a model built for ``input_size`` pixel inputs."""
        return self.cam_layer(input_size) if callable(self.cam_layer) else self.cam_layer


def register_model(
    name: str,
    *,
    cam_layer: str | Callable[[int], str],
    classifier: str,
    default_input_size: int,
    pretrained_source: str | None = None,
    description: str = "",
    stages: tuple[str, ...] | Callable[[int], tuple[str, ...]] = (),
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator registering a model builder under ``name``.

    Args:
        name: registry name; must be new.
        cam_layer: see :class:`ModelSpec`.
        classifier: see :class:`ModelSpec`.
        default_input_size: see :class:`ModelSpec`.
        pretrained_source: see :class:`ModelSpec`.
        description: one line; the builder's docstring summary when empty.
        stages: see :class:`ModelSpec`.

    Returns:
        A decorator that registers the builder and returns it unchanged.

    Raises:
        ModelError: ``name`` is already registered.
    """

    def decorator(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ModelError(f"model name {name!r} is already registered (by {_REGISTRY[name].builder.__module__})")
        summary = description or (builder.__doc__ or "").strip().split("\n", 1)[0]
        _REGISTRY[name] = ModelSpec(
            name=name,
            builder=builder,
            cam_layer=cam_layer,
            classifier=classifier,
            default_input_size=default_input_size,
            pretrained_source=pretrained_source,
            description=summary,
            stages=stages,
        )
        return builder

    return decorator


def list_models() -> list[str]:
    """The registered model names, sorted."""
    return sorted(_REGISTRY)


def model_spec(name: str) -> ModelSpec:
    """The :class:`ModelSpec` registered under ``name``.

    Raises:
        ModelError: unknown name; the message lists the known ones.
    """
    try:
        return _REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(str(name), list(_REGISTRY), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ModelError(f"unknown model {name!r}.{hint} Known models: {', '.join(list_models())}") from None

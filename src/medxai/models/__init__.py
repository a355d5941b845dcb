"""The model registry: ``create_model(name, num_classes, in_chans, pretrained)`` and what each model declares.

Registered models (``list_models()``): ``simple_cnn``, ``resnet18``, ``resnet50``, ``densenet121``,
``efficientnet_b0``. Each returns raw logits and carries ``cam_layer``, ``classifier_name`` and ``architecture``
attributes; see :func:`create_model`. A new family is one module that decorates a builder with
:func:`register_model` and is imported below.
"""

from __future__ import annotations

from medxai.models._factory import create_model
from medxai.models._registry import ModelSpec, list_models, model_spec, register_model

# Imported for their registrations.
from medxai.models import densenet, efficientnet, resnet, simple_cnn  # noqa: F401  isort: skip

__all__ = ["create_model", "list_models", "register_model", "model_spec", "ModelSpec"]

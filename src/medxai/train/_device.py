"""Device and precision choices, made in one place."""

from __future__ import annotations

import contextlib

import torch

from medxai.errors import ConfigError

__all__ = ["resolve_device", "autocast_context", "to_channels_last"]


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when available; an explicit CUDA request on a machine without one is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device '{name}' (use auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device '{name}' requested but CUDA is not available on this machine")
    return device


def autocast_context(device: torch.device, enabled: bool):
    """bf16 autocast on CUDA (no loss scaling needed, unlike fp16); a no-op elsewhere."""
    if enabled and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def to_channels_last(model: torch.nn.Module) -> bool:
    """Lay a 2D network out channels-last (NHWC), in place; a network with 3D convolutions stays as it is (NHWC is a
    4D layout). Returns whether the layout changed."""
    if any(isinstance(module, torch.nn.Conv3d) for module in model.modules()):
        return False
    model.to(memory_format=torch.channels_last)
    return True

"""Pretrained weights: find them, read them without unpickling objects, adapt the stem, load all but the classifier.

Where the weights come from, in order:

1. the ``weights`` path given by the user (``--weights PATH``): a ``.safetensors`` file, or a torchvision ``.pth``
   state dict read with ``torch.load(weights_only=True)``;
2. torchvision's download cache, ``torch.hub.get_dir()/checkpoints/<file name of the Weights enum's url>``;
3. a download by torchvision, unless the environment variable ``MEDXAI_OFFLINE`` is set
   (see :func:`medxai.config.is_offline`).

A failure at every step raises :class:`~medxai.errors.ModelError` saying which file is expected where; random
weights are never substituted silently.

Transfer learning follows common practice (Yosinski et al., NeurIPS 2014; Raghu et al., NeurIPS 2019 for medical
images): every tensor but the classifier's is copied, the classifier is freshly initialised for the new classes.
The stem convolution is adapted when the model's differs from the file's (see :func:`adapt_stem_kernel`).
"""

from __future__ import annotations

import http.client
import logging
import math
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlparse

import torch
import torchvision
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from medxai.config import OFFLINE_ENV, is_offline
from medxai.errors import ModelError
from medxai.models._registry import ModelSpec

__all__ = ["load_pretrained", "adapt_stem_kernel", "read_state_dict"]

logger = logging.getLogger(__name__)


# torchvision's DenseNet checkpoints predate the ban on '.' in module names: 'denselayer1.norm.1.weight' is
# 'denselayer1.norm1.weight' today. torchvision.models.densenet._load_state_dict's pattern, plus num_batches_tracked.
_LEGACY_DENSENET_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$"
)


def load_pretrained(model: nn.Module, spec: ModelSpec, weights: str | Path | None = None) -> None:
    """Load pretrained weights into ``model`` in place, all but the classifier.

    Args:
        model: a freshly built model of ``spec``'s architecture.
        spec: its registry entry (classifier name, pretrained source).
        weights: a local weights file; when ``None``, the spec's ``pretrained_source`` is used.

    Raises:
        ModelError: no weights for this architecture, the file cannot be found, read or downloaded, or its tensors do
            not match the architecture.
    """
    if weights is not None:
        state, origin = read_state_dict(weights), str(weights)
    elif spec.pretrained_source is None:
        raise ModelError(
            f"{spec.name} has no published pretrained weights; train it from scratch (pretrained=False) "
            "or start from a weights file with --weights PATH"
        )
    else:
        state, origin = _source_state_dict(spec)
    _load_backbone(model, spec, _rename_legacy_keys(state), origin)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors`` or a ``.pth``/``.pt`` file, never unpickling arbitrary objects.

    A ``.pth`` holding ``{"state_dict": ...}`` or ``{"model": ...}`` (common training-script layouts) is unwrapped.

    Raises:
        ModelError: missing file, unreadable file, or not a mapping of names to tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: weights file not found")
    try:
        if path.suffix == ".safetensors":
            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except (SafetensorError, pickle.UnpicklingError, RuntimeError, ValueError, EOFError, OSError) as error:
        raise ModelError(
            f"{path}: cannot read weights ({error}). Expected a .safetensors file or a plain PyTorch state dict "
            "(tensors only; pickled objects are refused for safety)"
        ) from None
    for wrapper in ("state_dict", "model"):
        if isinstance(state, Mapping) and isinstance(state.get(wrapper), Mapping):
            state = state[wrapper]
    if not isinstance(state, Mapping) or not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise ModelError(f"{path}: not a state dict (a mapping of names to tensors)")
    return dict(state)


def adapt_stem_kernel(weight: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """Adapt a pretrained stem kernel ``(out, in, kh, kw)`` to another input-channel count or kernel size.

    Channels follow timm's ``adapt_input_conv``: for one channel the RGB kernels are summed (a grey image fed as
    R=G=B gives the same response); otherwise the kernels are repeated cyclically and scaled by ``in / new_in`` to
    keep the activation scale. A kernel of another size (the 3x3 small-image stem replacing a 7x7 one) is resampled
    by box (area) resampling, which spreads every source tap over the target taps it overlaps, so each filter keeps
    its sum, i.e. its response to a flat image. That is an approximation of the pretrained filter, logged as a warning.

    Raises:
        ModelError: the output channels differ (the file is for another architecture).
    """
    out_channels, in_channels, height, width = shape
    if weight.ndim != 4 or weight.shape[0] != out_channels:
        raise ModelError(f"stem kernel of shape {tuple(weight.shape)} cannot be adapted to {tuple(shape)}")
    adapted = weight.double()
    source_channels = adapted.shape[1]
    if in_channels != source_channels:
        if in_channels == 1:
            adapted = adapted.sum(dim=1, keepdim=True)
        else:
            repeats = math.ceil(in_channels / source_channels)
            adapted = adapted.repeat(1, repeats, 1, 1)[:, :in_channels] * (source_channels / in_channels)
    if tuple(adapted.shape[2:]) != (height, width):
        rows = _box_resampling_matrix(adapted.shape[2], height)
        columns = _box_resampling_matrix(adapted.shape[3], width)
        adapted = torch.einsum("ki,ocij,lj->ockl", rows, adapted, columns)
    return adapted.to(weight.dtype)


def _box_resampling_matrix(source: int, target: int) -> torch.Tensor:
    """``(target, source)`` weights: the fraction of source tap j covered by target tap k; columns sum to 1."""
    source_edges = torch.arange(source + 1, dtype=torch.float64) / source
    target_edges = torch.arange(target + 1, dtype=torch.float64) / target
    low = torch.maximum(target_edges[:-1, None], source_edges[None, :-1])
    high = torch.minimum(target_edges[1:, None], source_edges[None, 1:])
    return (high - low).clamp(min=0) * source


def _source_state_dict(spec: ModelSpec) -> tuple[dict[str, torch.Tensor], str]:
    """Resolve ``spec.pretrained_source`` (``"torchvision:<WeightsEnum>.<MEMBER>"``) from the cache or a download."""
    scheme, _, enum_name = spec.pretrained_source.partition(":")
    if scheme != "torchvision":
        raise ModelError(f"{spec.name}: unsupported pretrained source {spec.pretrained_source!r}")
    url = torchvision.models.get_weight(enum_name).url
    file_name = Path(urlparse(url).path).name
    cache_dir = Path(torch.hub.get_dir()) / "checkpoints"
    cached = cache_dir / file_name
    if cached.is_file():
        return read_state_dict(cached), str(cached)

    def missing(reason: str) -> ModelError:
        return ModelError(
            f"{spec.name}: ImageNet weights {file_name} not found in {cache_dir} ({reason}). Download {url} on a "
            f"machine with internet access and copy it into {cache_dir}, or pass --weights PATH "
            "(weights=PATH in Python) pointing to a .safetensors or torchvision .pth state dict"
        )

    if is_offline():
        raise missing(f"{OFFLINE_ENV} is set, so nothing is downloaded")
    logger.info("downloading %s ImageNet weights from %s", spec.name, url)
    try:
        state = torch.hub.load_state_dict_from_url(
            url, model_dir=str(cache_dir), map_location="cpu", check_hash=True, weights_only=True
        )
    except (OSError, http.client.HTTPException, RuntimeError, ValueError) as error:
        raise missing(f"download failed: {error}") from error
    return state, url


def _rename_legacy_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    renamed = {}
    for key, value in state.items():
        match = _LEGACY_DENSENET_KEY.match(key)
        renamed[match.group(1) + match.group(2) if match else key] = value
    return renamed


def _stem_conv_name(model: nn.Module) -> str | None:
    """The first ``Conv2d`` registered: the stem in every registered family."""
    return next((name for name, module in model.named_modules() if isinstance(module, nn.Conv2d)), None)


def _load_backbone(model: nn.Module, spec: ModelSpec, state: dict[str, torch.Tensor], origin: str) -> None:
    """Copy every tensor but the classifier's, checking names and shapes; adapt the stem kernel if needed."""
    classifier_prefix = model.classifier_name + "."
    # A file's own classifier (e.g. torchvision's unwrapped 1000-class 'fc') may sit anywhere under the head module.
    head_prefix = model.classifier_name.rpartition(".")[0]
    tolerated = (classifier_prefix, head_prefix + ".") if head_prefix else (classifier_prefix,)
    stem_weight = f"{_stem_conv_name(model)}.weight"

    expected = model.state_dict()
    to_load: dict[str, torch.Tensor] = {}
    missing: list[str] = []
    mismatched: list[str] = []
    adapted: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = []
    for key, target in expected.items():
        if key.startswith(classifier_prefix):
            continue
        if key not in state:
            # BatchNorm fills in num_batches_tracked for checkpoints older than it (torchvision's ResNet weights).
            if not key.endswith("num_batches_tracked"):
                missing.append(key)
            continue
        tensor = state[key]
        if tensor.shape != target.shape:
            if key != stem_weight:
                mismatched.append(f"{key} {tuple(tensor.shape)} vs {tuple(target.shape)}")
                continue
            adapted.append((key, tuple(tensor.shape), tuple(target.shape)))
            tensor = adapt_stem_kernel(tensor, target.shape)
        to_load[key] = tensor
    unexpected = [key for key in state if key not in expected and not key.startswith(tolerated)]
    if missing or mismatched or unexpected:
        problems = [
            f"{label} {len(keys)} (e.g. {', '.join(keys[:3])})"
            for label, keys in (("missing", missing), ("wrong shape", mismatched), ("unexpected", unexpected))
            if keys
        ]
        raise ModelError(f"{origin}: weights do not match {spec.name}: {'; '.join(problems)}")

    result = model.load_state_dict(to_load, strict=False)
    left_out = [key for key in result.missing_keys if not key.startswith(classifier_prefix)]
    if left_out or result.unexpected_keys:  # unreachable unless the checks above are wrong; never load half a model
        raise ModelError(f"{origin}: incomplete load into {spec.name} ({left_out + result.unexpected_keys})")
    for key, source_shape, target_shape in adapted:
        # Adapting channels is standard practice (timm); resampling a kernel is an approximation worth a warning.
        level = logging.WARNING if source_shape[2:] != target_shape[2:] else logging.INFO
        logger.log(level, "adapted pretrained stem kernel %s from %s to %s", key, source_shape, target_shape)
    logger.info(
        "loaded %d pretrained tensors into %s from %s; classifier %s freshly initialised for %d classes",
        len(to_load),
        spec.name,
        origin,
        model.classifier_name,
        model.num_classes,
    )


"""Checkpoints as safetensors plus JSON; never pickles.

* Weights: ``<name>.safetensors`` with the model card embedded as metadata (a single file is self-describing).
* Training state for ``--resume``: ``state.safetensors`` (optimiser tensors, RNG states) beside ``state.json``
  (epoch, optimiser hyper-parameters, scheduler, early-stopping bookkeeping).
Loading checks every tensor name and shape against the architecture the card names.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from medxai.errors import CheckpointError
from medxai.models._factory import create_model
from medxai.models.card import ModelCard
from medxai.models.ensemble import ENSEMBLE_ARCHITECTURE, EnsembleModel

__all__ = [
    "save_weights",
    "load_weights",
    "build_from_card",
    "save_training_state",
    "load_training_state",
]

logger = logging.getLogger(__name__)

CARD_METADATA_KEY = "medxai_model_card"


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """Write to a temporary file then rename, so a kill mid-write never leaves a half checkpoint."""
    temporary = path.with_suffix(path.suffix + ".tmp")
    save_file({key: value.detach().cpu().contiguous() for key, value in tensors.items()}, str(temporary), metadata)
    os.replace(temporary, path)


def save_weights(model: torch.nn.Module, card: ModelCard, path: str | Path) -> Path:
    """Save the model's state dict with the model card embedded as safetensors metadata."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_save(model.state_dict(), path, {CARD_METADATA_KEY: card.to_json()})
    return path


def build_from_card(card: ModelCard) -> torch.nn.Module:
    """A freshly initialised model of the card's architecture (no pretrained download); an ensemble's card builds
    each member from the member card it holds."""
    if card.architecture == ENSEMBLE_ARCHITECTURE:
        return EnsembleModel([build_from_card(ModelCard.from_dict(member["card"])) for member in card.members])
    return create_model(
        card.architecture,
        num_classes=card.num_classes,
        in_chans=card.in_chans,
        pretrained=False,
        input_size=card.input_size,
        dropout=card.dropout,
    )


def load_weights(path: str | Path, card: ModelCard | None = None) -> tuple[torch.nn.Module, ModelCard]:
    """Rebuild the model from a weights file, checking every tensor name and shape.

    Args:
        path: a ``.safetensors`` file written by :func:`save_weights`.
        card: the model card; read from the file's metadata when not given.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    try:
        state = load_file(str(path))
        if card is None:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
            if CARD_METADATA_KEY not in metadata:
                raise CheckpointError(f"{path}: no model card in the file's metadata")
            card = ModelCard.from_dict(json.loads(metadata[CARD_METADATA_KEY]))
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"{path}: not a readable safetensors checkpoint ({error})") from None
    model = build_from_card(card)
    _check_state_matches(model, state, path)
    model.load_state_dict(state)
    return model, card


def _check_state_matches(model: torch.nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    expected = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    found = {name: tuple(tensor.shape) for name, tensor in state.items()}
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = sorted(name for name in set(expected) & set(found) if expected[name] != found[name])
    if missing or unexpected or wrong:
        details = []
        if missing:
            details.append(f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}")
        if unexpected:
            details.append(f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
        if wrong:
            details.append(
                "shape mismatch " + ", ".join(f"{name}: {found[name]} vs {expected[name]}" for name in wrong[:5])
            )
        raise CheckpointError(f"{path}: weights do not match the architecture ({'; '.join(details)})")


def save_training_state(
    tensors_path: str | Path,
    json_path: str | Path,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    bookkeeping: dict[str, Any],
) -> None:
    """Everything ``--resume`` needs beyond the weights: optimiser, scheduler, RNG states, bookkeeping (JSON-able).

    Tensors go to ``tensors_path`` (safetensors), the rest to ``json_path``; both are written atomically.
    """
    tensors_path, json_path = Path(tensors_path), Path(json_path)
    tensors: dict[str, torch.Tensor] = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for index, cuda_state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{index}"] = cuda_state
    optimizer_state = optimizer.state_dict()
    scalar_state: dict[str, dict[str, Any]] = {}
    for param_id, values in optimizer_state["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{param_id}.{key}"] = value
            else:
                scalar_state.setdefault(str(param_id), {})[key] = value
    document = {
        "optimizer_param_groups": optimizer_state["param_groups"],
        "optimizer_scalars": scalar_state,
        "scheduler": scheduler.state_dict(),
        **bookkeeping,
    }
    _atomic_save(tensors, tensors_path)
    temporary = json_path.with_name(json_path.name + ".tmp")
    temporary.write_text(json.dumps(document, indent=1))
    os.replace(temporary, json_path)


def load_training_state(
    tensors_path: str | Path,
    json_path: str | Path,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> dict[str, Any]:
    """Restore optimiser, scheduler and RNG states saved by :func:`save_training_state`; return the bookkeeping."""
    tensor_path, json_path = Path(tensors_path), Path(json_path)
    if not (tensor_path.is_file() and json_path.is_file()):
        raise CheckpointError(f"{tensor_path.parent}: no training state to resume from ({json_path.name} / "
                              f"{tensor_path.name})")
    tensors = load_file(str(tensor_path))
    document = json.loads(json_path.read_text())
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("optimizer."):
            _, param_id, key = name.split(".", 2)
            state.setdefault(int(param_id), {})[key] = value
    for param_id, values in document.pop("optimizer_scalars").items():
        state.setdefault(int(param_id), {}).update(values)
    optimizer.load_state_dict({"state": state, "param_groups": document.pop("optimizer_param_groups")})
    scheduler.load_state_dict(document.pop("scheduler"))
    torch.set_rng_state(tensors["rng.torch"])
    cuda_keys = sorted((k for k in tensors if k.startswith("rng.cuda.")), key=lambda k: int(k.rsplit(".", 1)[1]))
    cuda_states = [tensors[key] for key in cuda_keys]
    if cuda_states and torch.cuda.is_available() and len(cuda_states) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda_states)
    return document

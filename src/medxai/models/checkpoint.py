"""Checkpoints as safetensors plus JSON; never pickles.

* Weights: ``<name>.safetensors`` with the model card embedded as metadata (a single file is self-describing),
  the digest of the card's bound fields (:data:`~medxai.models.card.BOUND_FIELDS`) and the SHA-256 of the domain
  guard file fitted with these weights (or ``none``).
* Training state for ``--resume``: ``state.safetensors`` (optimiser tensors, RNG states) beside ``state.json``
  (epoch, optimiser hyper-parameters, scheduler, early-stopping bookkeeping).
Loading checks every tensor name and shape against the architecture the card names; :func:`check_binding` checks
that a card and a domain guard read from beside the weights are the ones saved with them.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from medxai.errors import CheckpointError
from medxai.models._factory import create_model
from medxai.models.card import BOUND_FIELDS, ModelCard
from medxai.models.ensemble import ENSEMBLE_ARCHITECTURE, EnsembleModel
from medxai.models.onnx import file_sha256

__all__ = [
    "save_weights",
    "load_weights",
    "build_from_card",
    "check_binding",
    "check_guard_binding",
    "embedded_card",
    "read_weights_metadata",
    "save_training_state",
    "load_training_state",
]

logger = logging.getLogger(__name__)

CARD_METADATA_KEY = "medxai_model_card"
#: SHA-256 of the card's bound fields (:meth:`~medxai.models.card.ModelCard.bound_digest`).
CARD_DIGEST_KEY = "medxai_card_sha256"
#: SHA-256 of the domain guard file fitted with these weights, or :data:`NO_GUARD`.
GUARD_DIGEST_KEY = "medxai_domain_guard_sha256"
NO_GUARD = "none"


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """Write to a temporary file then rename, so a kill mid-write never leaves a half checkpoint."""
    temporary = path.with_suffix(path.suffix + ".tmp")
    save_file({key: value.detach().cpu().contiguous() for key, value in tensors.items()}, str(temporary), metadata)
    os.replace(temporary, path)


def save_weights(model: torch.nn.Module, card: ModelCard, path: str | Path, *,
                 guard_path: str | Path | None = None) -> Path:
    """Save the model's state dict with the model card embedded as safetensors metadata, bound to it by the digest
    of its bound fields, and to the domain guard file at ``guard_path`` (fitted with these weights) by its SHA-256."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {CARD_METADATA_KEY: card.to_json(), CARD_DIGEST_KEY: card.bound_digest(),
                GUARD_DIGEST_KEY: NO_GUARD if guard_path is None else file_sha256(guard_path)}
    _atomic_save(model.state_dict(), path, metadata)
    return path


def read_weights_metadata(path: str | Path) -> dict[str, str]:
    """The safetensors metadata of a weights file (its header only: no tensor is read).

    Raises:
        CheckpointError: missing or not a readable safetensors file.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{_short_name(path)}: checkpoint file not found")
    try:
        with safe_open(str(path), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"{_short_name(path)}: not a readable safetensors checkpoint ({error})") from None


def embedded_card(path: str | Path) -> ModelCard | None:
    """The model card a weights file carries in its metadata; None when it carries none.

    Raises:
        CheckpointError: the file is unreadable, or its card is not a valid card.
    """
    text = read_weights_metadata(path).get(CARD_METADATA_KEY)
    if text is None:
        return None
    try:
        document = json.loads(text)
    except (ValueError, RecursionError) as error:
        raise CheckpointError(f"{_short_name(path)}: its embedded model card is not JSON ({error})") from None
    if not isinstance(document, dict):
        raise CheckpointError(f"{_short_name(path)}: its embedded model card is not an object")
    return ModelCard.from_dict(document)


def check_binding(card: ModelCard, weights: str | Path, *, guard: str | Path | None = None,
                  fields: Sequence[str] = BOUND_FIELDS, card_name: str = "the model card") -> None:
    """Refuse a card, or a domain guard, that is not the one saved with ``weights``.

    The card's bound fields must have the digest the weights file stores; weights written before digests existed
    are compared with the card they embed instead, and so are ``fields`` narrower than all the bound fields (the
    :data:`~medxai.models.card.NETWORK_FIELDS` of a run's ``last`` weights, saved before calibration). The guard
    file (``guard``: its path, existing or not) must have the SHA-256 the weights file stores, or be absent when the
    weights were saved without one; older weights record nothing about it and are not checked for it.

    Args:
        card: the card read from beside the weights (``model_card.json``, an export's card, an ensemble member's).
        weights: the weights file.
        guard: where the run's domain guard file is (None: the guard is not checked).
        fields: the bound fields to compare.
        card_name: what the card is called in the message.

    Raises:
        CheckpointError: naming the bound fields that differ (``model_card.json disagrees with
            checkpoints/best.safetensors on label_names; ...``), or the guard that does not belong.
    """
    weights = Path(weights)
    metadata = read_weights_metadata(weights)
    every_field = set(fields) == set(BOUND_FIELDS)
    stored = metadata.get(CARD_DIGEST_KEY) if every_field else None
    if stored is None or stored != card.bound_digest():  # another card, or compared field by field
        saved = embedded_card(weights)
        differing = card.bound_differences(saved, fields) if saved is not None else []
        if differing or stored is not None:
            raise CheckpointError(
                f"{card_name} disagrees with {_short_name(weights)} on {', '.join(differing) or 'its bound fields'}; "
                "the card was edited or belongs to another run"
            )
    if guard is not None:
        check_guard_binding(metadata.get(GUARD_DIGEST_KEY), guard, weights)


def check_guard_binding(recorded: str | None, guard: str | Path, weights: str | Path) -> None:
    """Refuse a domain guard file that is not the one recorded with ``weights`` (a weights file, or an export).

    Args:
        recorded: the guard's SHA-256 recorded with the weights, :data:`NO_GUARD`, or None (nothing recorded: not
            checked).
        guard: where the guard file is (existing or not).
        weights: what recorded it, for the message.
    """
    guard, weights = Path(guard), Path(weights)
    if recorded is None:  # weights of a release that did not record the guard
        return
    if recorded == NO_GUARD:
        if guard.exists():
            raise CheckpointError(f"{_short_name(guard)} was not fitted with {_short_name(weights)} (saved without a "
                                  "domain guard); it belongs to another run or training")
        return
    if not guard.is_file():
        raise CheckpointError(f"{_short_name(weights)} was saved with a domain guard, but {_short_name(guard)} is "
                              "missing")
    if file_sha256(guard) != recorded:
        raise CheckpointError(f"{_short_name(guard)} is not the domain guard saved with {_short_name(weights)}; it was "
                              "replaced or belongs to another run")


def _short_name(path: Path) -> str:
    """``checkpoints/best.safetensors``: the file and its folder, never the whole (server) path."""
    return f"{path.parent.name}/{path.name}" if path.parent.name else path.name


def build_from_card(card: ModelCard) -> torch.nn.Module:
    """A freshly initialised model of the card's architecture (no pretrained download); an ensemble's card builds
    each member from the member card it holds."""
    if card.architecture == ENSEMBLE_ARCHITECTURE:
        return EnsembleModel([build_from_card(ModelCard.from_dict(member["card"])) for member in card.members])
    model = create_model(
        card.architecture,
        num_classes=card.num_classes,
        in_chans=card.in_chans,
        pretrained=False,
        input_size=card.input_size,
        dropout=card.dropout,
    )
    model.cam_layer = card.cam_layer  # the run's choice (explain.layer at training), not only the family default
    return model


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
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"{path}: not a readable safetensors checkpoint ({error})") from None
    if card is None:
        card = embedded_card(path)
        if card is None:
            raise CheckpointError(f"{path}: no model card in the file's metadata")
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

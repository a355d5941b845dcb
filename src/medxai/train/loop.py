"""One epoch of training and one pass of evaluation (cf. torchvision's references/classification/train.py)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from medxai.data.augment import BatchAugmenter
from medxai.data.cache import to_unit_range
from medxai.data.prepared import PreparedSplit, batch_order, iterate_batches
from medxai.data.preprocess import Preprocessor
from medxai.models.features import capture_stage_statistics
from medxai.train._device import autocast_context, to_channels_last
from medxai.train.distributed import SINGLE, Distributed
from medxai.train.explanation_loss import ExplanationLoss

__all__ = [
    "BatchContext", "place_model", "train_one_epoch", "predict_split", "predict_split_with_features", "recalibrate_batchnorm",
    "model_input", "model_input_with_masks",
    "mean_loss_and_accuracy",
]


@dataclass
class BatchContext:
    """How a stored batch becomes a model input on the device."""

    preprocessor: Preprocessor
    device: torch.device
    batch_size: int
    amp: bool = True
    channels_last: bool = True


def place_model(model: torch.nn.Module, context: BatchContext) -> torch.nn.Module:
    """Move ``model`` to the context's device, laid out channels-last when ``context.channels_last`` (2D models;
    :func:`model_input` lays the batches out alike). The layout changes float rounding, so training, the run's own
    evaluation and a later ``medxai evaluate`` all place the model here and agree bit for bit."""
    model.to(context.device)
    if context.channels_last:
        to_channels_last(model)
    return model


def model_input(images: torch.Tensor, context: BatchContext, augmenter=None, generator=None) -> torch.Tensor:
    """Move a stored batch (integer codes, or floats on ``[0, 1]``) to the device, scale it to ``[0, 1]`` there,
    augment it (training only) and normalise it."""
    return model_input_with_masks(images, None, context, augmenter, generator)[0]


def model_input_with_masks(
    images: torch.Tensor, masks: torch.Tensor | None, context: BatchContext, augmenter=None, generator=None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`model_input`, with the batch's mask codes (or None) moved to the device as floats on ``[0, 1]`` and
    through the same geometric augmentation as their images."""
    batch = to_unit_range(images.to(context.device, non_blocking=True))
    if masks is not None:
        masks = to_unit_range(masks.to(context.device, non_blocking=True))
    if augmenter is not None:
        batch, masks = augmenter.with_masks(batch, masks, generator)
    batch = context.preprocessor.normalize(batch)
    if context.channels_last and batch.dim() == 4:
        batch = batch.contiguous(memory_format=torch.channels_last)
    return batch, masks


def train_one_epoch(
    model: torch.nn.Module,
    split: PreparedSplit,
    context: BatchContext,
    *,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    loss_fn: torch.nn.Module,
    augmenter: BatchAugmenter,
    generator: torch.Generator,
    description: str = "train",
    ema: torch.optim.swa_utils.AveragedModel | None = None,
    job: Distributed = SINGLE,
    explanation: ExplanationLoss | None = None,
) -> dict[str, float]:
    """One pass over ``split`` in a seeded random order; returns mean loss and accuracy on the augmented data (of
    all ranks, under DDP: each rank trains on its share of every batch, :func:`~medxai.data.prepared.batch_order`).

    With ``explanation`` and a split that carries masks, the loss of each step adds the explanation term
    (:mod:`medxai.train.explanation_loss`) of the batch's images that have a lesion mask; the returned loss is then
    the sum of both terms.
    """
    explaining = explanation is not None and split.masks is not None
    watched = model.module if job.active else model  # DDP runs the inner module: its layers are hooked
    model.train()
    total_loss = torch.zeros((), device=context.device)
    correct = torch.zeros((), device=context.device, dtype=torch.long)
    seen = 0
    batches = iterate_batches(split, context.batch_size, shuffle=True, generator=generator, device=context.device,
                              rank=job.rank, world=job.world)
    # One process keeps drawing augmentations from the order's generator (runs stay as they were); under DDP
    # each rank draws its own, from a generator seeded by the same seed, epoch and its rank.
    augment_generator = generator if not job.active else torch.Generator().manual_seed(
        generator.initial_seed() * 31 + job.rank)
    steps = -(-len(split) // context.batch_size)
    for images, labels, *truth in tqdm(batches, total=steps, desc=description, unit="batch", leave=False,
                                       disable=None if job.is_main else True):
        if images.shape[0] * job.world < 2 and len(split) > 1:  # BatchNorm cannot train on a single image
            continue
        masks, has_mask = truth if explaining else (None, None)
        inputs, masks = model_input_with_masks(images, masks, context, augmenter, augment_generator)
        labels = labels.to(context.device, non_blocking=True)
        batch = inputs
        if explaining:
            has_mask = has_mask.to(context.device)
            inputs.requires_grad_(explanation.needs_input_gradient)
            batch = explanation.batch_to_run(inputs, masks, has_mask)
        with autocast_context(context.device, context.amp), (
                explanation.watching(watched) if explaining else contextlib.nullcontext([])) as captured:
            outputs = model(batch)
        logits = outputs[: labels.shape[0]]  # "actdiff" runs the masked copies after the batch
        loss = loss_fn(logits.float(), labels)
        if explaining:
            loss = loss + explanation(outputs, inputs, labels, masks, has_mask, captured)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if ema is not None:
            ema.update_parameters(model.module if job.active else model)
        total_loss += loss.detach() * labels.shape[0]
        correct += (logits.argmax(dim=1) == labels).sum()
        seen += labels.shape[0]
    totals = job.sum(torch.stack([total_loss.double(), correct.double(),
                                  torch.tensor(float(seen), dtype=torch.float64, device=context.device)]))
    seen_all = max(totals[2].item(), 1)
    return {"loss": totals[0].item() / seen_all, "accuracy": totals[1].item() / seen_all}


@torch.no_grad()
def predict_split(model: torch.nn.Module, split: PreparedSplit, context: BatchContext,
                  job: Distributed = SINGLE) -> torch.Tensor:
    """Logits ``(N, K)`` for every image of ``split``, in order, as float32 on the CPU; under DDP each rank
    predicts its share and every rank receives all of them."""
    model.eval()
    outputs = []
    batches = batch_order(len(split), context.batch_size, shuffle=False, rank=job.rank, world=job.world)
    for indices in batches:
        with autocast_context(context.device, context.amp):
            outputs.append(model(model_input(split.images.codes(indices), context)).float())
    if not outputs:
        return torch.empty(0, 0)
    logits = torch.cat(outputs)
    if not job.active:
        return logits.cpu()
    return job.gather_rows(logits, torch.cat(batches), len(split))


@torch.no_grad()
def recalibrate_batchnorm(
    model: torch.nn.Module, split: PreparedSplit, context: BatchContext, max_images: int, generator: torch.Generator
) -> None:
    """Re-estimate every BatchNorm's running mean and variance on un-augmented train images (a seeded random subset
    of at most ``max_images``), as a cumulative average over those batches (``momentum=None``), as
    ``torch.optim.swa_utils.update_bn`` does for SWA (Izmailov et al. 2018). The running statistics gathered during
    training describe augmented images and weights of several steps ago; evaluation sees neither."""
    norms = [module for module in model.modules() if isinstance(module, torch.nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    momenta = {}
    for norm in norms:
        norm.reset_running_stats()
        momenta[norm] = norm.momentum
        norm.momentum = None
    was_training = model.training
    model.train()
    order = torch.randperm(len(split), generator=generator)[:max_images]
    for start in range(0, len(order), context.batch_size):
        indices = order[start : start + context.batch_size]
        with autocast_context(context.device, context.amp):
            model(model_input(split.images.codes(indices), context))
    for norm, momentum in momenta.items():
        norm.momentum = momentum
    model.train(was_training)


def predict_split_with_features(
    model: torch.nn.Module, split: PreparedSplit, context: BatchContext, layers: list[str]
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """:func:`predict_split` plus the stage statistics (:mod:`medxai.models.features`) of ``layers``, from the same
    forward passes: ``(logits (N, K), {layer: (N, 2C)})`` on the CPU."""
    with capture_stage_statistics(model, layers) as capture:
        logits = predict_split(model, split, context)
    return logits, capture.stacked()


def mean_loss_and_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Cross-entropy (unweighted, unsmoothed: comparable across runs) and accuracy of labelled rows."""
    known = labels >= 0
    logits, labels = logits[known], labels[known]
    if labels.numel() == 0:
        return {"loss": float("nan"), "accuracy": float("nan")}
    return {
        "loss": F.cross_entropy(logits, labels).item(),
        "accuracy": (logits.argmax(dim=1) == labels).float().mean().item(),
    }


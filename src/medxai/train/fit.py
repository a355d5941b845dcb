"""Build the optimiser and schedule, run the epochs, checkpoint every epoch, stop early, resume exactly.

Reproducibility: shuffling and augmentation of epoch ``e`` draw from a generator seeded with ``(seed, e)``, and the
global RNG (dropout) is saved with every checkpoint, so ``--resume`` after a kill continues bit-for-bit where an
uninterrupted run would be (on the same device and software).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from medxai.config import TrainConfig
from medxai.data.augment import BatchAugmenter
from medxai.data.prepared import PreparedSplit
from medxai.errors import ConfigError
from medxai.models.card import ModelCard
from medxai.models.checkpoint import load_training_state, load_weights, save_training_state, save_weights
from medxai.run_folder import RunFolder
from medxai.train.distributed import SINGLE, Distributed, wrap
from medxai.train.explanation_loss import build_explanation_loss
from medxai.train.loop import (
    BatchContext,
    mean_loss_and_accuracy,
    place_model,
    predict_split,
    recalibrate_batchnorm,
    train_one_epoch,
)

__all__ = ["fit", "FitResult", "ScoreFunction"]

logger = logging.getLogger(__name__)

ScoreFunction = Callable[[torch.Tensor, torch.Tensor], float]  # (val logits, val labels) -> higher is better
EpochCallback = Callable[[int, dict], None]


@dataclass
class FitResult:
    model: torch.nn.Module  # with the best epoch's weights loaded
    history: list[dict]
    best_epoch: int
    best_score: float
    stopped_early: bool


def build_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW (Loshchilov & Hutter 2019) or SGD with Nesterov momentum; no weight decay on norms and biases."""
    decay, no_decay = [], []
    for parameter in model.parameters():
        if parameter.requires_grad:
            (no_decay if parameter.ndim <= 1 else decay).append(parameter)
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if config.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=config.lr)
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, nesterov=True)
    raise ConfigError(f"train.optimizer must be 'adamw' or 'sgd', got {config.optimizer!r}")


def build_scheduler(
    optimizer: torch.optim.Optimizer, config: TrainConfig, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step linear warm-up then cosine decay to zero (SGDR without restarts, Loshchilov & Hutter 2017)."""
    total = max(1, config.epochs * steps_per_epoch)
    warmup = min(int(config.warmup_epochs * steps_per_epoch), total - 1)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def build_loss(config: TrainConfig, train: PreparedSplit, num_classes: int, device: torch.device) -> torch.nn.Module:
    """Cross-entropy, optionally weighted by inverse class frequency (N / (K n_k)), label-smoothed, or on
    prior-adjusted logits (``train.logit_adjustment``, :class:`LogitAdjustedLoss`)."""
    weight = None
    counts = torch.tensor(train.class_counts(num_classes), dtype=torch.float32).clamp_min(1)
    if config.class_weighting:
        weight = (counts.sum() / (num_classes * counts)).to(device)
        logger.info("class weights: %s", [round(value, 3) for value in weight.tolist()])
    loss = torch.nn.CrossEntropyLoss(weight=weight, label_smoothing=config.label_smoothing)
    if config.logit_adjustment:
        prior = (counts / counts.sum()).to(device)
        return LogitAdjustedLoss(loss, config.logit_adjustment * prior.log())
    return loss


class LogitAdjustedLoss(torch.nn.Module):
    """``loss(z + offset, y)`` with ``offset = tau * log(prior)`` (Menon et al. 2021, the logit-adjusted loss)."""

    def __init__(self, loss: torch.nn.Module, offset: torch.Tensor) -> None:
        super().__init__()
        self.loss = loss
        self.register_buffer("offset", offset)

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.loss(logits + self.offset, labels)


def build_ema(model: torch.nn.Module, config: TrainConfig) -> AveragedModel | None:
    """The exponential moving average of the weights and buffers (``train.ema_decay``), or None when off."""
    if not config.ema_decay:
        return None
    if not 0.0 < config.ema_decay < 1.0:
        raise ConfigError(f"train.ema_decay must lie in (0, 1) or be 0 (off), got {config.ema_decay}")
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(config.ema_decay), use_buffers=True)


def fit(
    model: torch.nn.Module,
    train: PreparedSplit,
    val: PreparedSplit,
    *,
    context: BatchContext,
    augmenter: BatchAugmenter,
    config: TrainConfig,
    card: ModelCard,
    run: RunFolder,
    score_fn: ScoreFunction,
    resume: bool = False,
    callbacks: Sequence[EpochCallback] = (),
    job: Distributed = SINGLE,
) -> FitResult:
    """Train ``model`` and keep the epoch with the best validation score.

    Writes ``checkpoints/last.safetensors`` and the training state every epoch, ``checkpoints/best.safetensors``
    when the score improves, and ``history.csv``. ``callbacks(epoch, row)`` run after each epoch's checkpoint.

    Under DDP (``job``, :mod:`medxai.train.distributed`) every rank trains on its share of each batch, the train
    statistics are summed and the validation logits gathered from all ranks before the score is computed, so every
    rank takes the same best-epoch and early-stopping decisions; rank 0 alone writes.
    """
    if job.is_main:
        run.checkpoints_dir.mkdir(parents=True, exist_ok=True)
    place_model(model, context)  # channels-last: faster on CUDA and on the CPU (1.4x simple_cnn, 1.6x ResNet-18)
    network = wrap(model, job, context.device)  # what trains: DDP around the model under torchrun
    trained = network.module if job.active else model  # what is evaluated and saved
    steps_per_epoch = max(1, -(-len(train) // context.batch_size))
    optimizer = build_optimizer(network, config)
    scheduler = build_scheduler(optimizer, config, steps_per_epoch)
    loss_fn = build_loss(config, train, card.num_classes, context.device)
    explanation = build_explanation_loss(config.explanation_loss, config.explanation_weight, card.cam_layer)
    if explanation is not None and train.masks is None:
        logger.warning("train.explanation_loss %r: the train split carries no masks; training without it",
                       config.explanation_loss)
    ema = build_ema(trained, config)
    state = {
        "epoch": 0, "history": [], "best_score": -math.inf, "best_val_loss": math.inf, "best_epoch": 0, "stale_epochs": 0,
    }
    if resume:
        resumed, _ = load_weights(run.weights_path("last"), card)
        trained.load_state_dict(resumed.state_dict())
        if ema is not None:  # before the RNG state is restored: building a model draws random numbers
            averaged, _ = load_weights(run.weights_path("ema"), card)
            ema.module.load_state_dict(averaged.state_dict())
        state.update(load_training_state(run.state_tensors_path, run.state_json_path, optimizer, scheduler))
        if ema is not None:
            ema.n_averaged.fill_(int(state.get("ema_updates", 1)))
        logger.info("resumed after epoch %d (best %.4f at epoch %d)", state["epoch"], state["best_score"], state["best_epoch"])
    else:
        torch.manual_seed(config.seed)
    stopped_early = False
    for epoch in range(state["epoch"] + 1, config.epochs + 1):
        started = time.perf_counter()
        generator = torch.Generator().manual_seed(config.seed * 1_000_003 + epoch)
        if job.active:  # each rank its own dropout masks, reproducibly
            torch.manual_seed(config.seed * 1_000_003 + epoch * 1_009 + job.rank)
        train_stats = train_one_epoch(
            network, train, context, optimizer=optimizer, scheduler=scheduler, loss_fn=loss_fn,
            augmenter=augmenter, generator=generator, description=f"epoch {epoch}/{config.epochs}",
            ema=ema, job=job, explanation=explanation,
        )
        evaluated = ema.module if ema is not None else trained
        job.broadcast_buffers(evaluated)
        if config.bn_recalibration_images:  # the same seeded images on every rank: the same statistics
            recalibrate_batchnorm(evaluated, train, context, config.bn_recalibration_images, generator)
        val_logits = predict_split(evaluated, val, context, job=job)
        val_stats = mean_loss_and_accuracy(val_logits, val.labels)
        score = score_fn(val_logits, val.labels)
        row = {
            "epoch": epoch,
            "train_loss": train_stats["loss"],
            "train_accuracy": train_stats["accuracy"],
            "val_loss": val_stats["loss"],
            "val_accuracy": val_stats["accuracy"],
            "val_score": score,
            "lr": optimizer.param_groups[0]["lr"],
            "seconds": round(time.perf_counter() - started, 3),
        }
        state["history"].append(row)
        # Ties on the score (a saturated validation AUC) go to the lower validation loss.
        improved = score > state["best_score"] or (
            score == state["best_score"] and row["val_loss"] < state["best_val_loss"]
        )
        if improved:
            state.update(best_score=score, best_val_loss=row["val_loss"], best_epoch=epoch, stale_epochs=0)
        else:
            state["stale_epochs"] += 1
        state["epoch"] = epoch
        if ema is not None:
            state["ema_updates"] = int(ema.n_averaged)
        if job.is_main:
            _save_epoch(run, card, state, trained, evaluated if improved else None, ema, optimizer, scheduler)
        job.barrier()  # every rank past this point can read this epoch's checkpoint (a restart resumes from it)
        logger.info(
            "epoch %d/%d  train loss %.4f acc %.4f  val loss %.4f acc %.4f score %.4f%s  (%.1fs)",
            epoch, config.epochs, row["train_loss"], row["train_accuracy"], row["val_loss"],
            row["val_accuracy"], score, " *" if improved else "", row["seconds"],
        )
        for callback in callbacks:
            callback(epoch, row)
        if config.patience and state["stale_epochs"] >= config.patience:
            logger.info("early stop: no improvement for %d epochs", config.patience)
            stopped_early = True
            break
    best, _ = load_weights(run.weights_path("best"), card)
    model.load_state_dict(best.state_dict())  # with EMA: the averaged weights of the best epoch
    return FitResult(model, state["history"], state["best_epoch"], state["best_score"], stopped_early)


def _save_epoch(run: RunFolder, card: ModelCard, state: dict, model: torch.nn.Module, best: torch.nn.Module | None,
                ema: AveragedModel | None, optimizer: torch.optim.Optimizer,
                scheduler: torch.optim.lr_scheduler.LRScheduler) -> None:
    """The epoch's checkpoints: ``best`` (when it improved), ``last``, ``ema``, the training state and history."""
    if best is not None:
        save_weights(best, card, run.weights_path("best"))
    save_weights(model, card, run.weights_path("last"))
    if ema is not None:
        save_weights(ema.module, card, run.weights_path("ema"))
    save_training_state(run.state_tensors_path, run.state_json_path, optimizer, scheduler, state)
    run.write_history(state["history"])

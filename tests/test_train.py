"""Checkpoints and training: safetensors round trip, strict loading, exact resume after an interruption."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from medxai.config import AugmentConfig, TrainConfig
from medxai.data.prepared import PreparedSplit
from medxai.data.preprocess import Preprocessor
from medxai.data.augment import BatchAugmenter
from medxai.errors import CheckpointError
from medxai.models import create_model
from medxai.models.card import ModelCard
from medxai.models.checkpoint import load_weights, save_weights
from medxai.run_folder import RunFolder
from medxai.train import BatchContext, fit


def _card(model, **changes) -> ModelCard:
    values = dict(
        architecture="simple_cnn", num_classes=2, label_names=["normal", "pneumonia"],
        preprocess={"size": 16, "channels": 1, "normalize": "fixed", "mean": [0.5], "std": [0.25]},
        cam_layer=model.cam_layer, dropout=0.2, positive_label="pneumonia",
    )
    values.update(changes)
    return ModelCard(**values)


def _toy_split(count: int, seed: int) -> PreparedSplit:
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(count) % 2
    images = torch.rand(count, 1, 16, 16, generator=generator) * 0.3
    images[labels == 1, :, 4:12, 8:14] += 0.6  # class 1 has a bright patch
    return PreparedSplit(images.half(), labels, [f"toy/{i}" for i in range(count)], [None] * count)


def test_checkpoint_round_trip_restores_identical_outputs(tmp_path):
    torch.manual_seed(0)
    model = create_model("simple_cnn", 2, 1, input_size=16, dropout=0.2).eval()
    card = _card(model)
    path = save_weights(model, card, tmp_path / "best.safetensors")
    restored, restored_card = load_weights(path)  # card read back from the file's own metadata
    restored.eval()
    batch = torch.rand(3, 1, 16, 16)
    torch.testing.assert_close(restored(batch), model(batch), rtol=0, atol=0)
    assert restored_card == card


def test_loading_checks_tensor_names_and_shapes(tmp_path):
    model = create_model("simple_cnn", 2, 1, input_size=16, dropout=0.2)
    card = _card(model)
    path = save_weights(model, card, tmp_path / "w.safetensors")
    tensors = load_file(str(path))
    name = next(iter(tensors))
    tensors[name] = torch.zeros(7)
    save_file(tensors, str(tmp_path / "bad.safetensors"))
    with pytest.raises(CheckpointError, match="shape mismatch"):
        load_weights(tmp_path / "bad.safetensors", card)
    (tmp_path / "junk.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.safetensors"):
        load_weights(tmp_path / "junk.safetensors", card)


class _Interrupt(Exception):
    pass


def _train(run_dir, card_model_seed, epochs, *, resume=False, interrupt_after=None, **train_options):
    torch.manual_seed(card_model_seed)
    model = create_model("simple_cnn", 2, 1, input_size=16, dropout=0.2)
    card = _card(model)
    preprocessor = Preprocessor(card.preprocess)  # normalize "fixed", mean 0.5, std 0.25
    context = BatchContext(preprocessor, torch.device("cpu"), batch_size=16)
    config = TrainConfig(epochs=epochs, lr=3e-3, seed=5, warmup_epochs=0.5, **train_options)

    def stop(epoch, row):
        if interrupt_after is not None and epoch == interrupt_after:
            raise _Interrupt

    return fit(
        model, _toy_split(64, 1), _toy_split(32, 2), context=context,
        augmenter=BatchAugmenter(AugmentConfig(rotation_degrees=10, hflip=0.5)), config=config, card=card,
        run=RunFolder(run_dir),
        score_fn=lambda logits, labels: -torch.nn.functional.cross_entropy(logits, labels).item(),
        resume=resume, callbacks=[stop],
    )


def test_resume_after_interruption_matches_an_uninterrupted_run(tmp_path):
    straight = _train(tmp_path / "straight", 0, epochs=4)
    with pytest.raises(_Interrupt):
        _train(tmp_path / "resumed", 0, epochs=4, interrupt_after=2)
    state = json.loads((tmp_path / "resumed" / "checkpoints" / "state.json").read_text())
    assert state["epoch"] == 2
    resumed = _train(tmp_path / "resumed", 123, epochs=4, resume=True)  # different init: weights must come from disk
    for name, tensor in straight.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[name], tensor, rtol=0, atol=0, msg=name)
    last_straight = load_file(str(tmp_path / "straight" / "checkpoints" / "last.safetensors"))
    last_resumed = load_file(str(tmp_path / "resumed" / "checkpoints" / "last.safetensors"))
    for name in last_straight:
        torch.testing.assert_close(last_resumed[name], last_straight[name], rtol=0, atol=0, msg=name)
    assert [row["epoch"] for row in resumed.history] == [1, 2, 3, 4]
    assert resumed.history[-1]["train_loss"] == pytest.approx(straight.history[-1]["train_loss"], abs=0)


def test_resume_with_weight_averaging_and_batchnorm_recalibration_is_exact(tmp_path):
    """With an EMA of the weights and BatchNorm re-estimated before validation, the best checkpoint holds averaged
    weights (not the last raw ones), and a resumed run still equals an uninterrupted one bit for bit."""
    options = {"ema_decay": 0.9, "bn_recalibration_images": 48}
    straight = _train(tmp_path / "straight", 0, epochs=4, **options)
    with pytest.raises(_Interrupt):
        _train(tmp_path / "resumed", 0, epochs=4, interrupt_after=2, **options)
    resumed = _train(tmp_path / "resumed", 123, epochs=4, resume=True, **options)
    for name, tensor in straight.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[name], tensor, rtol=0, atol=0, msg=name)
    raw_last = load_file(str(tmp_path / "straight" / "checkpoints" / "last.safetensors"))
    averaged = load_file(str(tmp_path / "straight" / "checkpoints" / "ema.safetensors"))
    assert any(not torch.equal(raw_last[name], averaged[name]) for name in raw_last)
    assert [row["epoch"] for row in resumed.history] == [1, 2, 3, 4]
    assert resumed.history[-1]["val_loss"] == pytest.approx(straight.history[-1]["val_loss"], abs=0)


def test_batchnorm_recalibration_gives_the_statistics_of_the_clean_images():
    torch.manual_seed(0)
    model = create_model("simple_cnn", 2, 1, input_size=16, dropout=0.2)
    split = _toy_split(40, 3)
    context = BatchContext(Preprocessor(_card(model).preprocess), torch.device("cpu"), batch_size=16)
    from medxai.train.loop import model_input, recalibrate_batchnorm

    norm = next(module for module in model.modules() if isinstance(module, torch.nn.BatchNorm2d))
    recalibrate_batchnorm(model, split, context, max_images=40, generator=torch.Generator().manual_seed(0))
    captured = []
    handle = norm.register_forward_hook(lambda module, inputs, output: captured.append(inputs[0]))
    model.eval()
    with torch.no_grad():
        model(model_input(split.images.codes(slice(None)), context))
    handle.remove()
    inputs = captured[0]
    # Cumulative averages over batches of 16, 16 and 8 images: the batch means weighted equally (momentum None).
    assert norm.momentum == 0.1  # restored
    order = torch.randperm(40, generator=torch.Generator().manual_seed(0))
    means = []
    for start in range(0, 40, 16):
        batch_inputs = inputs[order[start:start + 16]]
        means.append(batch_inputs.mean(dim=(0, 2, 3)))
    torch.testing.assert_close(norm.running_mean, torch.stack(means).mean(dim=0), rtol=1e-4, atol=1e-5)


def test_training_learns_the_toy_task_and_writes_history(tmp_path):
    result = _train(tmp_path / "run", 0, epochs=6)
    assert result.history[-1]["val_accuracy"] >= 0.9
    lines = (tmp_path / "run" / "history.csv").read_text().splitlines()
    assert lines[0].startswith("epoch,train_loss,train_accuracy,val_loss,val_accuracy")
    assert len(lines) == 7


def test_logit_adjustment_adds_tau_log_prior_to_the_logits_the_loss_sees():
    from medxai.train.fit import build_loss

    labels = torch.tensor([0, 1, 1, 1])  # prior 1/4, 3/4
    split = PreparedSplit(torch.zeros(4, 1, 2, 2).half(), labels, ["a", "b", "c", "d"], [None] * 4)
    loss = build_loss(TrainConfig(logit_adjustment=2.0), split, 2, torch.device("cpu"))
    logits = torch.tensor([[0.3, -0.2], [1.0, 0.5]])
    targets = torch.tensor([0, 1])
    offset = 2.0 * torch.log(torch.tensor([0.25, 0.75]))
    expected = torch.nn.functional.cross_entropy(logits + offset, targets)
    torch.testing.assert_close(loss(logits, targets), expected)
    plain = build_loss(TrainConfig(), split, 2, torch.device("cpu"))
    torch.testing.assert_close(plain(logits, targets), torch.nn.functional.cross_entropy(logits, targets))

"""Training throughput: a synthetic in-memory ceiling, medxai's cached pipeline, and a plain ImageFolder baseline.

For each model and input size, one training step is the same everywhere (normalised batch -> forward -> cross-entropy
-> backward -> AdamW step; channels-last, and bf16 autocast on CUDA, as ``medxai train`` does), and only where the
batch comes from changes:

* ``ceiling``: one random batch made on the device before the clock starts; no data pipeline at all.
* ``medxai``: the images of ``--data`` prepared by :func:`medxai.data.prepared.prepare_split` into the on-disk
  cache under ``--cache-dir`` (``build_seconds``: the first run's decoding), then, as a second run would, the split
  opened from the cache and one epoch trained by ``medxai.train.loop.train_one_epoch``; ``images_per_second``
  counts the opening too (the first epoch of a later run). ``augmented_images_per_second`` is the same epoch with
  the kermany preset's batched augmentation on the device.
* ``imagefolder``: torchvision ``ImageFolder`` + PIL decoding + ``Resize`` + ``ToTensor`` + ``Normalize`` in a
  ``DataLoader`` (workers = cores, pinned memory on CUDA), one epoch over the same files, worker start-up included.

Prints one JSON object per (model, size) and writes them all to ``--out``
(default ``benchmarks/results/train_throughput[_<device>].json``).

Example:
    MEDXAI_DATA_DIR=../shared/data python benchmarks/train_throughput.py --data chest_xray_kermany_224/train \\
        --models simple_cnn,resnet18 --sizes 64,128 --images 2048
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset
from torchvision import datasets, transforms

from medxai.config import AugmentConfig, PreprocessConfig, TrainConfig, load_config
from medxai.data import open_source
from medxai.data.augment import BatchAugmenter
from medxai.data.prepared import prepare_split
from medxai.data.preprocess import Preprocessor
from medxai.models import create_model
from medxai.train import BatchContext, resolve_device
from medxai.train._device import autocast_context
from medxai.train.fit import build_optimizer, build_scheduler
from medxai.train.loop import train_one_epoch

RESULTS = Path(__file__).parent / "results"
MEAN, STD = [0.5], [0.25]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="chest_xray_kermany_224/train", help="image folder (class sub-folders)")
    parser.add_argument("--models", default="simple_cnn,resnet18")
    parser.add_argument("--sizes", default="64,128")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--channels", type=int, default=1)
    parser.add_argument("--images", type=int, default=2048, help="images per epoch (a seeded sample of --data)")
    parser.add_argument("--ceiling-steps", type=int, default=None,
                        help="steps timed for the ceiling (default: as many as one epoch of --images)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--workers", type=int, default=None, help="ImageFolder DataLoader workers (default: cores)")
    parser.add_argument("--cache-dir", default=None, help="cache root (default: a temporary folder, removed after)")
    parser.add_argument("--skip", default="", help="comma-separated pipelines to leave out: ceiling,medxai,imagefolder")
    parser.add_argument("--out", default=None)
    return parser


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _model(name: str, size: int, channels: int, device: torch.device, batch: int) -> torch.nn.Module:
    """A fresh model, warmed up by 3 steps on a random batch (kernel selection and allocation are start-up costs
    that every pipeline would pay once, not throughput); its weights are then reset."""
    torch.manual_seed(0)
    model = create_model(name, num_classes=2, in_chans=channels, input_size=size).to(device)
    model = model.to(memory_format=torch.channels_last)  # as medxai trains, on CUDA and on the CPU
    initial = {key: value.clone() for key, value in model.state_dict().items()}
    optimizer = build_optimizer(model, TrainConfig())
    inputs = torch.randn(batch, channels, size, size, device=device).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 2, (batch,), device=device)
    model.train()
    for _ in range(3):
        _step(model, optimizer, inputs, labels, device)
    model.load_state_dict(initial)
    return model


def _step(model, optimizer, inputs, labels, device) -> None:
    with autocast_context(device, True):
        logits = model(inputs)
    loss = torch.nn.functional.cross_entropy(logits.float(), labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def ceiling(name: str, size: int, arguments, device: torch.device) -> dict:
    model = _model(name, size, arguments.channels, device, arguments.batch)
    optimizer = build_optimizer(model, TrainConfig())
    inputs = torch.randn(arguments.batch, arguments.channels, size, size, device=device).contiguous(
        memory_format=torch.channels_last)
    labels = torch.randint(0, 2, (arguments.batch,), device=device)
    _step(model, optimizer, inputs, labels, device)
    _sync(device)
    steps = arguments.ceiling_steps or max(1, arguments.images // arguments.batch)
    started = time.perf_counter()
    for _ in range(steps):
        _step(model, optimizer, inputs, labels, device)
    _sync(device)
    seconds = time.perf_counter() - started
    return {"images_per_second": round(steps * arguments.batch / seconds, 1), "steps": steps,
            "seconds": round(seconds, 3)}


def _records(source, count: int):
    records = source.records()
    random.Random(0).shuffle(records)
    return sorted(records[:count], key=lambda record: record.id)


def medxai_pipeline(name: str, size: int, arguments, device: torch.device, cache_root: Path) -> dict:
    source = open_source(arguments.data)
    records = _records(source, arguments.images)
    config = PreprocessConfig(size=size, channels=arguments.channels, normalize="fixed", mean=MEAN, std=STD)
    preprocessor = Preprocessor(config)
    started = time.perf_counter()
    prepare_split(source, records, preprocessor, cache_root=cache_root, description="building cache")
    build = time.perf_counter() - started
    result = {"build_seconds": round(build, 2), "build_images_per_second": round(len(records) / build, 1)}
    for augmented in (False, True):
        model = _model(name, size, arguments.channels, device, arguments.batch)
        train_config = TrainConfig(epochs=1, batch_size=arguments.batch)
        optimizer = build_optimizer(model, train_config)
        steps = -(-len(records) // arguments.batch)
        scheduler = build_scheduler(optimizer, train_config, steps)
        augment = load_config("kermany").augment if augmented else AugmentConfig(enabled=False)
        context = BatchContext(preprocessor, device, arguments.batch)
        _sync(device)
        started = time.perf_counter()
        split = prepare_split(open_source(arguments.data), records, preprocessor,
                              cache_root=cache_root)  # a later run: opened from the cache, nothing decoded
        opened = time.perf_counter() - started
        train_one_epoch(model, split, context, optimizer=optimizer, scheduler=scheduler,
                        loss_fn=torch.nn.CrossEntropyLoss(), augmenter=BatchAugmenter(augment),
                        generator=torch.Generator().manual_seed(0))
        _sync(device)
        seconds = time.perf_counter() - started
        key = "augmented_images_per_second" if augmented else "images_per_second"
        result[key] = round(len(split) / seconds, 1)
        if not augmented:
            result.update(open_seconds=round(opened, 3), epoch_seconds=round(seconds, 2), images=len(split))
    return result


def imagefolder_pipeline(name: str, size: int, arguments, device: torch.device) -> dict:
    source = open_source(arguments.data)
    root = source.root
    transform = transforms.Compose([
        transforms.Grayscale(arguments.channels), transforms.Resize((size, size)), transforms.ToTensor(),
        transforms.Normalize(MEAN * arguments.channels, STD * arguments.channels),
    ])
    folder = datasets.ImageFolder(str(root), transform=transform)
    wanted = {Path(record.path).resolve() for record in _records(source, arguments.images)}
    indices = [index for index, (path, _) in enumerate(folder.samples) if Path(path).resolve() in wanted]
    workers = arguments.workers if arguments.workers is not None else _cores()
    loader = DataLoader(Subset(folder, indices), batch_size=arguments.batch, shuffle=True, num_workers=workers,
                        pin_memory=device.type == "cuda", generator=torch.Generator().manual_seed(0))
    model = _model(name, size, arguments.channels, device, arguments.batch)
    optimizer = build_optimizer(model, TrainConfig())
    _sync(device)
    started = time.perf_counter()
    for images, labels in loader:
        inputs = images.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        _step(model, optimizer, inputs, labels.to(device, non_blocking=True), device)
    _sync(device)
    seconds = time.perf_counter() - started
    return {"images_per_second": round(len(indices) / seconds, 1), "seconds": round(seconds, 2),
            "images": len(indices), "workers": workers}


def main() -> None:
    arguments = build_parser().parse_args()
    device = resolve_device(arguments.device)
    skip = {item for item in arguments.skip.split(",") if item}
    temporary = None if arguments.cache_dir else tempfile.TemporaryDirectory(prefix="medxai-cache-")
    cache_root = Path(arguments.cache_dir or temporary.name)
    rows = []
    try:
        for name in arguments.models.split(","):
            for size in (int(value) for value in arguments.sizes.split(",")):
                row = {"model": name, "size": size, "batch": arguments.batch, "channels": arguments.channels,
                       "device": str(device), "data": arguments.data}
                if "ceiling" not in skip:
                    row["ceiling"] = ceiling(name, size, arguments, device)
                if "medxai" not in skip:
                    row["medxai"] = medxai_pipeline(name, size, arguments, device, cache_root)
                if "imagefolder" not in skip:
                    row["imagefolder"] = imagefolder_pipeline(name, size, arguments, device)
                if "ceiling" in row:
                    top = row["ceiling"]["images_per_second"]
                    for pipeline in ("medxai", "imagefolder"):
                        if pipeline in row:
                            row[pipeline]["share_of_ceiling"] = round(row[pipeline]["images_per_second"] / top, 3)
                if "medxai" in row and "imagefolder" in row:
                    row["medxai_over_imagefolder"] = round(
                        row["medxai"]["images_per_second"] / row["imagefolder"]["images_per_second"], 2)
                print(json.dumps(row), flush=True)
                rows.append(row)
    finally:
        if temporary is not None:
            temporary.cleanup()
    document = {
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cores": _cores(),
                    "torch": torch.__version__,
                    "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None},
        "threads": torch.get_num_threads(),
        "rows": rows,
    }
    suffix = "" if device.type == "cpu" else f"_{device.type}"
    out = Path(arguments.out) if arguments.out else RESULTS / f"train_throughput{suffix}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(document, indent=2) + "\n")


if __name__ == "__main__":
    main()

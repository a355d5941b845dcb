"""Decode and preprocess a split once: into integer codes in memory, or into the on-disk cache that later commands
reuse (:mod:`medxai.data.cache`).

Preprocessing is deterministic, so training pays for decoding once, not once per epoch, and with the cache not once
per command either: each image becomes ``(C, S, S)`` codes of its ``[0, 1]`` values. Decoding runs in parallel
worker processes (``data.num_workers``; None chooses for the machine). Files that cannot be decoded are skipped and
listed with their reason, never silently lost (the cache remembers them too).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from medxai.config import DataConfig
from medxai.data.cache import (
    ImageStore,
    ShardWriter,
    cache_folder,
    cache_key,
    default_cache_root,
    facts_to_rows,
    open_cached,
    quantize,
    rows_to_facts,
)
from medxai.data.input_profile import ImageFacts, image_facts
from medxai.data.preprocess import ContentBox, Preprocessor
from medxai.data.sources import Record, Source
from medxai.errors import DataError, InvalidImageError

__all__ = [
    "PreparedSplit", "prepare_split", "preparation_options", "iterate_batches", "batch_order", "decode_workers",
    "loader_workers", "UNKNOWN_LABEL",
]

logger = logging.getLogger(__name__)

UNKNOWN_LABEL = -1
_PARALLEL_FROM = 256  # fewer records decode faster in the main process than worker start-up takes
_MAX_DECODE_WORKERS = 8


@dataclass
class PreparedSplit:
    """A split ready for the model: images (:class:`~medxai.data.cache.ImageStore`), labels, ids, skipped files.

    ``images`` may also be given as a float ``(N, C, S, S)`` tensor on ``[0, 1]``; it is stored as codes.
    """

    images: ImageStore
    labels: torch.Tensor  # (N,) int64, UNKNOWN_LABEL where unlabelled
    ids: list[str]
    boxes: list[ContentBox | None]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path or id, reason)
    facts: list[ImageFacts] = field(default_factory=list)  # per image, for the input profile of the domain guard
    # Lesion masks placed as the images are (medxai.data.ground_truth.prepare_masks), as (N, S, S) uint8 codes of
    # [0, 1] (a quarter of float32's memory), and the (N,) bool "has ground truth" vector; None without masks.
    masks: torch.Tensor | None = None
    has_mask: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if isinstance(self.images, torch.Tensor):
            self.images = ImageStore.from_unit(self.images)
        if self.masks is not None and self.masks.is_floating_point():
            self.masks = (self.masks.clamp(0.0, 1.0) * 255).round().to(torch.uint8)

    def __len__(self) -> int:
        return len(self.ids)

    def subset(self, indices: list[int]) -> PreparedSplit:
        """The images at ``indices`` (in that order, a view: no pixels copied), with their labels, ids, boxes and
        facts; nothing skipped."""
        index = torch.tensor(indices, dtype=torch.long)
        return PreparedSplit(
            images=self.images.subset(indices), labels=self.labels[index], ids=[self.ids[i] for i in indices],
            boxes=[self.boxes[i] for i in indices], facts=[self.facts[i] for i in indices] if self.facts else [],
            masks=self.masks[index] if self.masks is not None else None,
            has_mask=self.has_mask[index] if self.has_mask is not None else None,
        )

    def class_counts(self, num_classes: int) -> list[int]:
        known = self.labels[self.labels >= 0]
        return torch.bincount(known, minlength=num_classes).tolist()


class _DecodingDataset(Dataset):
    """Decodes one record per item into ``(index, codes, box, facts)``, or ``(index, None, None, (path, reason))``
    for a file that cannot be read: errors travel back as values so that workers never die on a bad file. Workers
    quantize, so only integer codes cross the process boundary."""

    def __init__(self, source: Source, records: Sequence[Record], preprocessor: Preprocessor, dtype: str) -> None:
        self.source, self.records, self.preprocessor, self.dtype = source, records, preprocessor, dtype

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int):
        record = self.records[index]
        try:
            sample = self.source.load(record)
            tensor, box = self.preprocessor.prepare(sample.image, name=record.path or record.id)
        except InvalidImageError as error:
            return index, None, None, (error.path, error.reason)
        return index, quantize(tensor, self.dtype), box, image_facts(sample.image, tensor, sample.meta)


def _collate(items):
    return items


def decode_workers(requested: int | None, count: int) -> int:
    """Decoding processes: ``requested`` when set, else one per available core (at most 8) for a split of at
    least 256 records, and none (the main process) for fewer."""
    if requested is not None:
        return max(0, requested)
    if count < _PARALLEL_FROM:
        return 0
    return min(_available_cores(), _MAX_DECODE_WORKERS)


def _available_cores() -> int:
    """The cores this process may run on (its affinity, which containers and schedulers set), not the machine's."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def preparation_options(data: DataConfig) -> dict:
    """The keyword arguments of :func:`prepare_split` that ``data`` (a run's ``data`` section) sets."""
    root = (Path(data.cache_dir).expanduser() if data.cache_dir else default_cache_root()) if data.cache else None
    return {"num_workers": data.num_workers, "cache_root": root, "dtype": data.cache_dtype}


def prepare_split(
    source: Source,
    records: Sequence[Record],
    preprocessor: Preprocessor,
    *,
    num_workers: int | None = None,
    label_map: dict[int, int] | None = None,
    description: str = "preparing",
    cache_root: Path | None = None,
    dtype: str = "uint16",
) -> PreparedSplit:
    """Decode and preprocess ``records`` (or read them from the cache under ``cache_root``); bad files are skipped
    and listed.

    Args:
        num_workers: decoding processes (None: :func:`decode_workers` chooses).
        label_map: source label index -> model label index, when the two label lists differ in order.
        cache_root: the cache folder (:func:`~medxai.data.cache.default_cache_root`); None keeps the codes in
            memory and writes nothing.
        dtype: the code type, ``uint16`` or ``uint8`` (``data.cache_dtype``).
    """
    records = list(records)
    folder = None
    if cache_root is not None:
        folder = cache_folder(cache_root, cache_key(source.fingerprint(), records, preprocessor.config, dtype))
        cached = open_cached(folder)
        if cached is not None:
            store, meta = cached
            logger.info("%s: %d preprocessed images from the cache %s", description, len(store), folder)
            return _split_from(store, records, meta, label_map)
    store, meta = _decode(source, records, preprocessor, num_workers, description, folder, dtype)
    if not len(store) and records:
        raise DataError(f"{description}: none of the {len(records)} images could be read (first: {meta['skipped'][0]})")
    return _split_from(store, records, meta, label_map)


def _decode(source: Source, records: list[Record], preprocessor: Preprocessor, num_workers: int | None,
            description: str, folder: Path | None, dtype: str) -> tuple[ImageStore, dict]:
    """Decode every record into a :class:`ShardWriter`; return the store of the readable ones and the metadata."""
    dataset = _DecodingDataset(source, records, preprocessor, dtype)
    workers = decode_workers(num_workers, len(records))
    loader = DataLoader(dataset, batch_size=32, num_workers=workers, collate_fn=_collate)
    size, channels = preprocessor.config.size, preprocessor.config.channels
    writer = ShardWriter(len(records), (channels, size, size), dtype, folder)
    boxes, facts, skipped = {}, {}, []
    try:
        with tqdm(total=len(records), desc=description, unit="img", leave=False, disable=None) as progress:
            for batch in loader:
                for index, codes, box, outcome in batch:
                    if codes is None:
                        skipped.append(list(outcome))
                        logger.warning("skipped %s: %s", *outcome)
                    else:
                        writer.put(index, codes)
                        boxes[index], facts[index] = box, outcome
                progress.update(len(batch))
        kept = sorted(boxes)
        meta = {"boxes": [boxes[i].as_tuple() if boxes[i] is not None else None for i in kept],
                "facts": facts_to_rows([facts[i] for i in kept]), "skipped": skipped}
        return writer.commit(kept, meta), meta
    except BaseException:
        writer.abandon()
        raise


def _split_from(store: ImageStore, records: list[Record], meta: dict, label_map: dict[int, int] | None) -> PreparedSplit:
    kept = store.index.tolist()
    return PreparedSplit(
        images=store,
        labels=torch.tensor([_mapped_label(records[i].label, label_map) for i in kept], dtype=torch.long),
        ids=[records[i].id for i in kept],
        boxes=[ContentBox(*box) if box is not None else None for box in meta["boxes"]],
        skipped=[tuple(item) for item in meta["skipped"]],
        facts=rows_to_facts(meta["facts"], ImageFacts),
    )


def _mapped_label(label: int | None, label_map: dict[int, int] | None) -> int:
    if label is None:
        return UNKNOWN_LABEL
    return label_map[label] if label_map is not None else label


def batch_order(count: int, batch_size: int, *, shuffle: bool, generator: torch.Generator | None = None,
                rank: int = 0, world: int = 1) -> list[torch.Tensor]:
    """The indices of each batch this process trains on, in order.

    One process: a seeded permutation (or ``0..N-1``) cut into batches of ``batch_size``. Under DDP (``world``
    processes) every rank draws the same permutation, padded to a multiple of ``world`` with its first indices (as
    :class:`torch.utils.data.DistributedSampler` pads), and rank ``r`` takes every ``world``-th index of each global
    batch from position ``r``: the ranks' batches of one step together are exactly the single-process batch, so the
    averaged gradient is the same (``batch_size`` is the global batch and must divide by ``world``).
    """
    if batch_size % world:
        raise DataError(f"the batch size {batch_size} must divide by the number of processes {world}")
    order = torch.randperm(count, generator=generator) if shuffle else torch.arange(count)
    if world > 1 and count % world:
        order = torch.cat([order, order[: world - count % world]])
    return [order[start : start + batch_size][rank::world] for start in range(0, len(order), batch_size)]


class _Batches(Dataset):
    """Item ``i`` is batch ``i``: its codes and labels, gathered from the shards (in a worker, with workers), and
    its mask codes and has-mask flags when the split carries masks."""

    def __init__(self, split: PreparedSplit, batches: list[torch.Tensor]) -> None:
        self.images, self.labels, self.batches = split.images, split.labels, batches
        self.masks, self.has_mask = split.masks, split.has_mask

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, ...]:
        indices = self.batches[index]
        if self.masks is None:
            return self.images.codes(indices), self.labels[indices]
        return self.images.codes(indices), self.labels[indices], self.masks[indices], self.has_mask[indices]


def loader_workers(device: torch.device, world: int = 1) -> int:
    """Batch-gathering processes for training: on a GPU up to 4 per process (the CPU is otherwise idle while the
    GPU computes), on the CPU none: gathering a batch from the shards is a memory copy, and worker processes would
    take cores from the model."""
    if device.type != "cuda":
        return 0
    return max(1, min(4, _available_cores() // max(world, 1) - 1))


def iterate_batches(
    split: PreparedSplit, batch_size: int, *, shuffle: bool, generator: torch.Generator | None = None,
    device: torch.device | None = None, rank: int = 0, world: int = 1,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(codes, labels)`` batches, ``(codes, labels, mask_codes, has_mask)`` for a split with masks (see
    :func:`batch_order`), through a :class:`~torch.utils.data.DataLoader`:
    pinned memory and gathering workers on a GPU (:func:`loader_workers`), memory bounded by batch x workers x
    prefetch whatever the split's size."""
    batches = batch_order(len(split), batch_size, shuffle=shuffle, generator=generator, rank=rank, world=world)
    device = device or torch.device("cpu")
    workers = loader_workers(device, world)
    loader = DataLoader(_Batches(split, batches), batch_size=None, num_workers=workers,
                        pin_memory=device.type == "cuda", prefetch_factor=4 if workers else None)
    yield from loader

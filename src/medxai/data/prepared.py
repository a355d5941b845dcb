"""Decode and preprocess a split once, into one in-memory tensor.

Preprocessing is deterministic, so training pays for decoding once, not once per epoch: each image becomes a
``float16`` ``(C, S, S)`` tensor (half precision keeps 16-bit inputs' detail after scaling to ``[0, 1]`` and halves
memory). Files that cannot be decoded are skipped and listed with their reason, never silently lost.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from medxai.data.input_profile import ImageFacts, image_facts
from medxai.data.preprocess import ContentBox, Preprocessor
from medxai.data.sources import Record, Source
from medxai.errors import DataError, InvalidImageError

__all__ = ["PreparedSplit", "prepare_split", "iterate_batches", "UNKNOWN_LABEL"]

logger = logging.getLogger(__name__)

UNKNOWN_LABEL = -1
STORAGE_DTYPE = torch.float16


@dataclass
class PreparedSplit:
    """A split ready for the model: images on the [0, 1] scale, labels, ids and what was skipped."""

    images: torch.Tensor  # (N, C, S, S) float16
    labels: torch.Tensor  # (N,) int64, UNKNOWN_LABEL where unlabelled
    ids: list[str]
    boxes: list[ContentBox]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path or id, reason)
    facts: list[ImageFacts] = field(default_factory=list)  # per image, for the input profile of the domain guard

    def __len__(self) -> int:
        return len(self.ids)

    def subset(self, indices: list[int]) -> PreparedSplit:
        """The images at ``indices`` (in that order), with their labels, ids, boxes and facts; nothing skipped."""
        index = torch.tensor(indices, dtype=torch.long)
        return PreparedSplit(
            images=self.images[index], labels=self.labels[index], ids=[self.ids[i] for i in indices],
            boxes=[self.boxes[i] for i in indices], facts=[self.facts[i] for i in indices] if self.facts else [],
        )

    def class_counts(self, num_classes: int) -> list[int]:
        known = self.labels[self.labels >= 0]
        return torch.bincount(known, minlength=num_classes).tolist()


class _DecodingDataset(Dataset):
    """Decodes one record per item into ``(index, tensor, box, facts)``, or ``(index, None, None, (path, reason))``
    for a file that cannot be read: errors travel back as values so that workers never die on a bad file."""

    def __init__(self, source: Source, records: Sequence[Record], preprocessor: Preprocessor) -> None:
        self.source, self.records, self.preprocessor = source, records, preprocessor

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int):
        record = self.records[index]
        try:
            sample = self.source.load(record)
            tensor, box = self.preprocessor.prepare(sample.image, name=record.path or record.id)
        except InvalidImageError as error:
            return index, None, None, (error.path, error.reason)
        return index, tensor.to(STORAGE_DTYPE), box, image_facts(sample.image, tensor, sample.meta)


def _collate(items):
    return items


def prepare_split(
    source: Source,
    records: Sequence[Record],
    preprocessor: Preprocessor,
    *,
    num_workers: int = 0,
    label_map: dict[int, int] | None = None,
    description: str = "preparing",
) -> PreparedSplit:
    """Decode and preprocess ``records``; bad files are skipped and listed.

    Args:
        label_map: source label index -> model label index, when the two label lists differ in order.
    """
    dataset = _DecodingDataset(source, list(records), preprocessor)
    loader = DataLoader(dataset, batch_size=64, num_workers=num_workers, collate_fn=_collate)
    size, channels = preprocessor.config.size, preprocessor.config.channels
    images = torch.empty((len(dataset), channels, size, size), dtype=STORAGE_DTYPE)
    kept = torch.zeros(len(dataset), dtype=torch.bool)
    boxes: dict[int, ContentBox] = {}
    facts: dict[int, ImageFacts] = {}
    skipped: list[tuple[str, str]] = []
    with tqdm(total=len(dataset), desc=description, unit="img", leave=False, disable=None) as progress:
        for batch in loader:
            for index, tensor, box, outcome in batch:
                if tensor is None:
                    problem = outcome
                    skipped.append(problem)
                    logger.warning("skipped %s: %s", *problem)
                else:
                    images[index] = tensor
                    kept[index] = True
                    boxes[index] = box
                    facts[index] = outcome
            progress.update(len(batch))
    keep = kept.nonzero().flatten().tolist()
    if not keep and records:
        raise DataError(f"{description}: none of the {len(records)} images could be read (first: {skipped[0]})")
    labels = [_mapped_label(dataset.records[i].label, label_map) for i in keep]
    return PreparedSplit(
        images=images[kept].contiguous() if len(keep) < len(dataset) else images,
        labels=torch.tensor(labels, dtype=torch.long),
        ids=[dataset.records[i].id for i in keep],
        boxes=[boxes[i] for i in keep],
        skipped=skipped,
        facts=[facts[i] for i in keep],
    )


def _mapped_label(label: int | None, label_map: dict[int, int] | None) -> int:
    if label is None:
        return UNKNOWN_LABEL
    return label_map[label] if label_map is not None else label


def iterate_batches(
    split: PreparedSplit, batch_size: int, *, shuffle: bool, generator: torch.Generator | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(images, labels)`` batches; a seeded generator makes the order reproducible."""
    count = len(split)
    order = torch.randperm(count, generator=generator) if shuffle else torch.arange(count)
    for start in range(0, count, batch_size):
        indices = order[start : start + batch_size]
        yield split.images[indices], split.labels[indices]

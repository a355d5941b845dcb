"""Data checks: what a dataset holds, what cannot be read, and which images appear twice, above all across splits.

A model evaluated on test images that are copies of its training images scores higher than it deserves. This module
finds such leaks two ways:

- **exact duplicates**: identical decoded pixels (SHA-256 of dtype, shape and bytes; byte-identical files are a
  special case, and so are re-saved copies with different metadata);
- **near duplicates**: images whose perceptual hashes differ in at most ``near_threshold`` of their 256 bits. The
  hash is pHash, the DCT hash of Zauner (2010, "Implementation and Benchmarking of Perceptual Image Hash Functions";
  the pHash library): the grey image reduced to a small square, its 2D DCT-II, the lowest frequencies without the DC
  row and column, each bit set where the coefficient exceeds their median. The hash ignores brightness and contrast
  changes, re-encoding, resizing and mild noise; it is not rotation or crop invariant.

  Deviations from Zauner's 64-bit version: a 64x64 reduction and 16x16 = 256 coefficients instead of 32x32 and 8x8,
  because 64 bits cannot tell different radiographs of one anatomy apart: on the Kermany chest X-rays, distinct
  images of different patients lie 4 bits apart of 64. With 256 bits (measured, ``chest_xray_kermany_224`` and
  PneumoniaMNIST): distinct images are at least 48 bits apart, while JPEG re-encoding, resizing, brightness and
  contrast changes and noise move a copy at most 12 bits, and the original-resolution Kermany files lie within 6
  bits of their 224 px copies; hence the default threshold of 24. The 7x7 mean filter before reduction is replaced
  by an antialiased (triangle-filter) resize, which low-passes the same way.

  Limitation: a picture with almost no texture in the hashed band (a few smooth blobs, a blank frame) puts its
  coefficients near their median and hashes unstably, so its re-encoded copies may be missed; its exact copies
  never are.

:func:`check_data` decodes a source's files (``medxai check-data PATH``); :func:`check_prepared` hashes the
preprocessed tensors training already holds (what the model sees), so the training-time check costs no decoding.
Exact duplicates are grouped by their SHA-256 (one dictionary pass). Near duplicates are found with an exact
multi-index hash over the 256 bits (Norouzi, Punjani & Fleet, CVPR 2012 / TPAMI 2014; see
:func:`near_duplicate_pairs`): the hashes are indexed by disjoint substrings, only pairs that agree on one substring
(within a small radius) are verified by their exact Hamming distance, and the result is the same set of pairs as
comparing all pairs against all, at a cost near linear in the number of images instead of quadratic.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import logging
import math
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from medxai.config import DataConfig
from medxai.data.ground_truth import ORPHAN_MASK_REASON, read_ground_truth
from medxai.data.readers import probe_image
from medxai.data.sources.base import SPLIT_NAMES, Record, Source
from medxai.errors import InvalidImageError

__all__ = [
    "check_data",
    "check_prepared",
    "perceptual_hashes",
    "content_hash",
    "near_duplicate_pairs",
    "leaked_ids",
    "check_data_table",
    "interpretation_lines",
    "NEAR_DUPLICATE_BITS",
    "HASH_BITS",
    "HASH_METHOD",
]

logger = logging.getLogger(__name__)

#: Default largest Hamming distance (of 256 bits) between the pHashes of two near duplicates (see the module
#: docstring for the measurements behind it); the default itself lives in ``DataConfig.near_duplicate_bits``.
NEAR_DUPLICATE_BITS = DataConfig().near_duplicate_bits

#: Bits per perceptual hash.
HASH_BITS = 256

HASH_METHOD = "pHash, 256-bit DCT (Zauner 2010, 16x16 coefficients of a 64x64 reduction), Hamming distance"

_HASH_SIDE = 64
_LOW_FREQUENCIES = 16
_MAX_LISTED = 5000  # entries per duplicate list in the report (counts are always complete)
_LUMA = (0.299, 0.587, 0.114)
_HASH_CHUNK = 1024  # images hashed at once (bounds the memory of thumbnails)


@dataclass(frozen=True)
class _Item:
    id: str
    split: str
    label: int | None


# -- hashing --------------------------------------------------------------------------------------------------------
def _dct_matrix(size: int) -> torch.Tensor:
    """Orthonormal DCT-II matrix: ``D @ x`` is the DCT of a column vector ``x``."""
    n = torch.arange(size, dtype=torch.float64)
    k = n[:, None]
    matrix = torch.cos(math.pi * (2 * n[None, :] + 1) * k / (2 * size)) * math.sqrt(2.0 / size)
    matrix[0] /= math.sqrt(2.0)
    return matrix.float()


_DCT = _dct_matrix(_HASH_SIDE)[1 : 1 + _LOW_FREQUENCIES]  # rows 1..16: the low frequencies without DC


def _grey_batch(images: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) or (N, H, W) -> (N, 1, H, W) float32 grey (BT.601 luma for 3 channels, mean otherwise)."""
    images = images.float()
    if images.dim() == 3:
        return images[:, None]
    if images.shape[1] == 1:
        return images
    if images.shape[1] == 3:
        weights = torch.tensor(_LUMA, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
        return (images * weights).sum(dim=1, keepdim=True)
    return images.mean(dim=1, keepdim=True)


def _thumbnails(images: torch.Tensor) -> torch.Tensor:
    """Grey 64x64 reductions (antialiased bilinear, so both down- and up-scaling are smooth)."""
    grey = _grey_batch(images)
    if grey.shape[-2:] != (_HASH_SIDE, _HASH_SIDE):
        grey = F.interpolate(grey, size=(_HASH_SIDE, _HASH_SIDE), mode="bilinear", antialias=True, align_corners=False)
    return grey[:, 0]


def _hash_thumbnails(thumbnails: torch.Tensor) -> np.ndarray:
    if len(thumbnails) == 0:
        return np.zeros((0, HASH_BITS // 8), dtype=np.uint8)
    coefficients = _DCT @ thumbnails.float() @ _DCT.T  # (N, 16, 16): frequencies 1..16 in both directions
    flat = coefficients.reshape(len(coefficients), -1)
    bits = (flat > flat.median(dim=1, keepdim=True).values).numpy()
    return np.packbits(bits, axis=1)


def perceptual_hashes(images: torch.Tensor | np.ndarray, chunk: int = 2048) -> np.ndarray:
    """64-bit pHashes (Zauner 2010; see the module docstring) of a batch of images.

    Args:
        images: ``(N, C, H, W)`` or ``(N, H, W)`` of any real dtype and intensity scale (the hash ignores brightness
            and contrast).
        chunk: images per step, to bound memory.

    Returns:
        ``(N, 32)`` uint8: 256 bits per image, packed.
    """
    tensor = torch.as_tensor(images)
    hashes = [
        _hash_thumbnails(_thumbnails(tensor[start : start + chunk]))
        for start in range(0, len(tensor), chunk)
    ]
    return np.concatenate(hashes) if hashes else np.zeros((0, HASH_BITS // 8), dtype=np.uint8)


def _image_thumbnail(image: np.ndarray) -> torch.Tensor:
    """One decoded image (H, W) / (H, W, C) -> its grey 64x64 reduction, (64, 64) float32.

    Large images are first averaged over integer blocks down to at most twice the hash side (cheap, and itself an
    antialiasing filter); the antialiased resize then only has a small image to work on.
    """
    array = np.asarray(image)
    if array.ndim == 3:
        channels = array[:, :, :3].astype(np.float32)
        array = channels @ np.asarray(_LUMA, dtype=np.float32) if channels.shape[2] == 3 else channels.mean(axis=2)
    array = array.astype(np.float32, copy=False)
    factor = min(array.shape) // (2 * _HASH_SIDE)
    if factor >= 2:
        height, width = (array.shape[0] // factor) * factor, (array.shape[1] // factor) * factor
        array = array[:height, :width].reshape(height // factor, factor, width // factor, factor).mean(axis=(1, 3))
    return _thumbnails(torch.from_numpy(np.ascontiguousarray(array))[None, None])[0]


def content_hash(image: np.ndarray | torch.Tensor) -> str:
    """SHA-256 (first 32 hex digits) of an image's dtype, shape and bytes: equal exactly when the pixels are."""
    array = image.numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    array = np.ascontiguousarray(array)
    digest = hashlib.sha256(f"{array.dtype.str}{array.shape}".encode())
    digest.update(array.view(np.uint8).reshape(-1).data if array.size else b"")
    return digest.hexdigest()[:32]


def near_duplicate_pairs(hashes: np.ndarray, threshold: int, block: int = 1 << 20) -> list[tuple[int, int, int]]:
    """Every pair ``(i, j, distance)`` with ``i < j`` whose packed hashes differ in at most ``threshold`` bits.

    Exact, and sub-quadratic where near duplicates are rare: multi-index hashing (Norouzi, Punjani & Fleet, "Fast
    Search in Hamming Space with Multi-Index Hashing", CVPR 2012; "Fast Exact Search in Hamming Space with
    Multi-Index Hashing", TPAMI 36(6), 2014). The 256 bits are split into ``m`` disjoint substrings. Writing
    ``threshold = m * s + a`` with ``0 <= a < m``, two hashes within ``threshold`` bits agree within ``s`` bits on
    one of the first ``a + 1`` substrings or within ``s - 1`` bits on one of the others (pigeonhole: otherwise they
    differ in at least ``(a + 1)(s + 1) + (m - a - 1) s = threshold + 1`` bits; TPAMI Proposition 2). So each
    substring is indexed (its values sorted, one bucket per value), the pairs whose substrings lie within that
    radius are the candidates (same bucket, or buckets whose values differ by one of the ``sum_{d <= r} C(L, d)``
    masks of at most ``r`` bits), and every candidate is verified by its exact Hamming distance (XOR and popcount
    of the packed hashes); a pair that collides in several substrings is verified several times and kept once.

    ``m`` minimises the expected work for uniformly random bits, ``sum_k n V_k + n^2 / 2 * V_k / 2^L_k`` over the
    searched substrings (``V_k`` masks of a substring of ``L_k`` bits); with ``L ~ log2 n`` (Norouzi's choice) the
    expected number of candidates is about ``m n V``, near linear in ``n``, plus the pairs that are output. Deviations
    from the paper: all hashes are both the database and the queries (a self-join, each pair generated once), and
    the substrings are strided (substring ``k`` holds bits ``k, k + m, ...``), because neighbouring pHash bits are
    neighbouring DCT frequencies and correlated, and a contiguous substring of correlated bits makes large buckets
    (measured on PneumoniaMNIST: 1.5-4x more candidates). Where the index would cost more than comparing all
    pairs (thresholds beyond about 64 bits, or fewer than about 100 hashes at the default threshold), all pairs are
    compared blockwise instead (:func:`_near_duplicate_pairs_brute`); both give the same pairs.

    Measured on two shared cores (``benchmarks/check_data_scale.py``): 100,000 hashes of synthetic images in about
    1 s at the default threshold, where comparing all pairs takes about 3 minutes (extrapolated from 20,000).

    Args:
        hashes: ``(N, 32)`` packed 256-bit hashes (any ``(N, B)`` uint8 works).
        threshold: largest Hamming distance kept; negative gives no pairs.
        block: candidate pairs generated and verified at once (about 50 bytes each; measured peak 81 MiB for
            100,000 hashes): bounds memory however large a bucket is (many equal substrings, as the correlated bits
            of real hashes give). In the all-pairs fallback, ``block // N`` rows at a time.

    Returns:
        The pairs, sorted by ``(i, j)``.
    """
    hashes = np.ascontiguousarray(np.asarray(hashes, dtype=np.uint8))
    count, bits = len(hashes), hashes.shape[1] * 8
    if count < 2 or threshold < 0:
        return []
    plan = _substring_plan(count, bits, threshold)
    if plan is None:
        return _near_duplicate_pairs_brute(hashes, threshold, block=max(1, block // count))
    return _multi_index_pairs(hashes, threshold, plan, block=block)


_MAX_MASKS = 4096  # masks per substring table: beyond, the index enumerates more than it saves
_BRUTE_PAIR_COST = 1.0  # a pair of the all-pairs product costs about one index candidate (15-60 ns each, measured)


def _pigeonhole_radii(threshold: int, substrings: int) -> list[int]:
    """Search radius of each of ``substrings`` substrings: with ``threshold = substrings * step + extra``, the first
    ``extra + 1`` within ``step`` bits, the others within ``step - 1`` (not searched where that is negative)."""
    step, extra = divmod(threshold, substrings)
    return [step if index <= extra else step - 1 for index in range(substrings)]


def _pigeonhole_plan(bits: int, threshold: int, substrings: int) -> list[tuple[np.ndarray, int]]:
    """``[(bit positions, search radius), ...]`` of the strided substrings to search (substring ``k`` holds bits
    ``k, k + substrings, ...``); see :func:`near_duplicate_pairs`."""
    radii = _pigeonhole_radii(threshold, substrings)
    return [(np.arange(index, bits, substrings), radius) for index, radius in enumerate(radii) if radius >= 0]


def _substring_plan(count: int, bits: int, threshold: int) -> list[tuple[np.ndarray, int]] | None:
    """The cheapest pigeonhole plan for ``count`` hashes under uniformly random bits, or ``None`` where comparing
    all pairs is expected to cost less (see :func:`near_duplicate_pairs`)."""
    pairs = count * (count - 1) / 2
    best_cost, best = _BRUTE_PAIR_COST * pairs, None
    for substrings in range(max(1, -(-bits // 63)), bits + 1):  # at most 63 bits per substring (uint64 keys)
        cost = 0.0
        for index, radius in enumerate(_pigeonhole_radii(threshold, substrings)):
            if radius < 0:
                break  # the radii never increase
            length = len(range(index, bits, substrings))
            masks = _mask_count(length, radius)
            if masks > _MAX_MASKS:
                cost = math.inf
                break
            cost += count * masks + pairs * masks / 2.0**length  # lookups + expected candidates
        if cost < best_cost:
            best_cost, best = cost, substrings
    return None if best is None else _pigeonhole_plan(bits, threshold, best)


@functools.lru_cache(maxsize=None)
def _mask_count(length: int, radius: int) -> int:
    """Values within ``radius`` bits of a ``length``-bit value: ``sum_{d <= radius} C(length, d)``."""
    return sum(math.comb(length, distance) for distance in range(min(radius, length) + 1))


def _multi_index_pairs(
    hashes: np.ndarray, threshold: int, plan: Sequence[tuple[np.ndarray, int]], block: int = 1 << 20
) -> list[tuple[int, int, int]]:
    """Multi-index hashing with a given plan (see :func:`near_duplicate_pairs`): exact for any plan whose radii
    satisfy the pigeonhole condition for ``threshold``."""
    count = len(hashes)
    unpacked = np.unpackbits(hashes, axis=1)
    words = _word_columns(hashes)
    found_codes: list[np.ndarray] = []
    found_distances: list[np.ndarray] = []
    for positions, radius in plan:
        weights = np.left_shift(np.uint64(1), np.arange(len(positions), dtype=np.uint64))
        keys = (unpacked[:, positions].astype(np.uint64) * weights).sum(axis=1, dtype=np.uint64)
        order = np.argsort(keys, kind="stable")
        columns = [np.ascontiguousarray(column[order]) for column in words]
        for left, right in _candidate_chunks(keys[order], len(positions), radius, block):
            close, distances = _within_threshold(columns, left, right, threshold)
            first, second = order[left[close]], order[right[close]]
            found_codes.append(np.minimum(first, second) * count + np.maximum(first, second))
            found_distances.append(distances)
    if not found_codes:
        return []
    codes, where = np.unique(np.concatenate(found_codes), return_index=True)
    distances = np.concatenate(found_distances)[where]
    return list(zip((codes // count).tolist(), (codes % count).tolist(), distances.tolist()))


def _candidate_chunks(
    sorted_keys: np.ndarray, length: int, radius: int, block: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Candidate pairs of one substring table, as positions ``(left, right)`` into the sorted keys, each unordered
    pair whose keys differ in at most ``radius`` of ``length`` bits exactly once, in chunks of at most ``block``.

    Equal keys pair within their bucket (``left < right``); keys that differ by a mask pair bucket against bucket,
    from the smaller key to the larger, so each pair comes once.
    """
    count = len(sorted_keys)
    values, starts, sizes = np.unique(sorted_keys, return_index=True, return_counts=True)
    positions = np.arange(count)
    bucket_ends = np.repeat(starts + sizes, sizes)
    yield from _ragged_pairs(positions, positions + 1, bucket_ends - positions - 1, block)
    masks = np.array([sum(1 << bit for bit in flipped)
                      for distance in range(1, min(radius, length) + 1)
                      for flipped in itertools.combinations(range(length), distance)], dtype=np.uint64)
    if not len(masks):
        return
    bucket_of = _bucket_lookup(values, length)
    per_step = max(1, block // max(1, count))  # masks looked up at once: rows stay within the block budget
    for offset in range(0, len(masks), per_step):
        partners = values[:, None] ^ masks[None, offset : offset + per_step]
        found = bucket_of(partners)
        bucket, column = np.nonzero((found >= 0) & (values[:, None] < partners))
        other = found[bucket, column]
        rows = _ragged_arange(starts[bucket], sizes[bucket])
        yield from _ragged_pairs(rows, np.repeat(starts[other], sizes[bucket]), np.repeat(sizes[other], sizes[bucket]),
                                 block)


_DENSE_LOOKUP_BITS = 22  # substrings this short find buckets in a direct table (2^22 int32: 16 MiB)


def _bucket_lookup(values: np.ndarray, length: int) -> Callable[[np.ndarray], np.ndarray]:
    """A function from substring values to the index of their bucket in the sorted distinct ``values``, -1 where
    there is none: a direct table for short substrings, a binary search otherwise."""
    if length <= _DENSE_LOOKUP_BITS:
        table = np.full(1 << length, -1, dtype=np.int32)
        table[values.astype(np.int64)] = np.arange(len(values), dtype=np.int32)
        return lambda partners: table[partners.astype(np.int64)]

    def search(partners: np.ndarray) -> np.ndarray:
        found = np.minimum(np.searchsorted(values, partners), len(values) - 1)
        return np.where(values[found] == partners, found, -1)

    return search


def _ragged_arange(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """``concatenate([arange(s, s + l) for s, l in zip(starts, lengths)])``, vectorised."""
    lengths = np.asarray(lengths, dtype=np.int64)
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    offsets = np.cumsum(lengths) - lengths
    return np.arange(total, dtype=np.int64) + np.repeat(np.asarray(starts, dtype=np.int64) - offsets, lengths)


def _ragged_pairs(
    firsts: np.ndarray, starts: np.ndarray, lengths: np.ndarray, block: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Pairs ``(firsts[r], starts[r] + k)`` for ``0 <= k < lengths[r]``, in chunks of at most ``block`` pairs (a
    range longer than ``block`` is cut into pieces, so a bucket of any size fits)."""
    keep = lengths > 0
    firsts, starts, lengths = firsts[keep], starts[keep], lengths[keep].astype(np.int64)
    if not len(lengths):
        return
    if lengths.max() > block:
        pieces = -(-lengths // block)
        piece = _ragged_arange(np.zeros(len(pieces), dtype=np.int64), pieces)
        firsts, starts = np.repeat(firsts, pieces), np.repeat(starts, pieces) + piece * block
        lengths = np.minimum(block, np.repeat(lengths, pieces) - piece * block)
    ends = np.cumsum(lengths)
    begin = 0
    while begin < len(lengths):
        done = int(ends[begin - 1]) if begin else 0
        end = max(begin + 1, int(np.searchsorted(ends, done + block, side="right")))
        rows = slice(begin, end)
        yield np.repeat(firsts[rows], lengths[rows]), _ragged_arange(starts[rows], lengths[rows])
        begin = end


_POPCOUNT = np.array([value.bit_count() for value in range(256)], dtype=np.uint8)
_HAS_BITWISE_COUNT = hasattr(np, "bitwise_count")  # NumPy >= 2.0: a hardware popcount per 64-bit word


def _word_columns(hashes: np.ndarray) -> list[np.ndarray]:
    """The packed hashes as columns of 64-bit words (of bytes where NumPy has no ``bitwise_count`` or the width is
    not a multiple of 8 bytes): gathering a column for a chunk of pairs reads one word per pair."""
    if _HAS_BITWISE_COUNT and hashes.shape[1] % 8 == 0:
        words = np.ascontiguousarray(hashes).view(np.uint64)
    else:
        words = hashes
    return [words[:, index] for index in range(words.shape[1])]


def _popcount(values: np.ndarray) -> np.ndarray:
    return np.bitwise_count(values) if values.dtype == np.uint64 else _POPCOUNT[values]


def _within_threshold(
    columns: Sequence[np.ndarray], left: np.ndarray, right: np.ndarray, threshold: int
) -> tuple[np.ndarray, np.ndarray]:
    """Which pairs ``(left[k], right[k])`` of rows differ in at most ``threshold`` bits: their indices ``k`` and
    distances. Words are compared one at a time and a pair is dropped once its partial distance exceeds the
    threshold (most candidates of the index are far apart, so most go after the first word)."""
    distances = _popcount(columns[0][left] ^ columns[0][right]).astype(np.int64)
    kept = np.flatnonzero(distances <= threshold)
    left, right, distances = left[kept], right[kept], distances[kept]
    for column in columns[1:]:
        distances += _popcount(column[left] ^ column[right])
        close = distances <= threshold
        kept, left, right, distances = kept[close], left[close], right[close], distances[close]
    return kept, distances


def _near_duplicate_pairs_brute(hashes: np.ndarray, threshold: int, block: int = 1024) -> list[tuple[int, int, int]]:
    """Every pair within ``threshold`` bits by comparing all pairs: in blocks of rows, as a matrix product of +-1
    vectors (Hamming distance = (bits - dot) / 2, exact in float32 for integers). The reference for the index, and
    its fallback where the index would cost more."""
    hashes = np.asarray(hashes, dtype=np.uint8)
    if len(hashes) < 2:
        return []
    signs = torch.from_numpy(np.unpackbits(hashes, axis=1).astype(np.float32) * 2.0 - 1.0)
    bits = signs.shape[1]
    pairs: list[tuple[int, int, int]] = []
    for start in range(0, len(signs), block):
        distances = (bits - signs[start : start + block] @ signs[start:].T) / 2.0
        local_i, local_j = torch.nonzero(distances <= threshold + 0.5, as_tuple=True)
        for i, j in zip(local_i.tolist(), local_j.tolist()):
            if j > i:
                pairs.append((start + i, start + j, int(round(float(distances[i, j])))))
    return pairs


# -- checks ---------------------------------------------------------------------------------------------------------
def check_data(
    data: str | Path | Source,
    *,
    near_threshold: int = NEAR_DUPLICATE_BITS,
    patient_pattern: str | None = None,
    split_folders: Mapping[str, str] | None = None,
    splits: Mapping[str, Sequence[Record]] | None = None,
) -> dict[str, Any]:
    """Decode every image of a dataset and report counts, unreadable files and duplicates within and across splits.

    Args:
        data: anything :func:`~medxai.data.open_source` opens (image folder, manifest, ``.npz``, MedMNIST name) or a
            source.
        near_threshold: largest pHash Hamming distance (of 256 bits) counted as a near duplicate; negative disables
            near-duplicate search.
        patient_pattern: passed to :func:`~medxai.data.open_source` for folders and manifests.
        split_folders: passed to :func:`~medxai.data.open_source` for folders (see ``data.split_folders``).
        splits: the records of each split; default: the source's official splits, or everything as ``"all"``.

    Returns:
        A JSON-ready dict: ``source``, ``fingerprint``, ``label_names``, ``files`` (records listed),
        ``splits`` ``{split: {"n", "per_class"}}`` (readable images), ``unreadable`` ``[{"file", "reason",
        "split"}]``, ``source_skipped``, ``duplicates`` ``{"exact", "near", "cross_split", "counts", "method",
        "near_threshold"}``, ``sizes``, ``modes``, ``seconds``. Every listed file is either counted in a split or
        unreadable. Data with masks or boxes adds ``ground_truth``: the source's pairing counts (``paired_by``,
        ``images_with_masks``, ``images_without_masks``, ``masks_without_image``...), ``with_lesion`` and
        ``empty_masks`` (masks read at their image's size), ``unusable`` ``[{"image", "file", "reason"}]`` (another
        size, undecodable), ``masks_without_image_list`` and ``images_without_masks_list``.
    """
    from medxai.data.sources import open_source

    started = time.perf_counter()
    if isinstance(data, (str, Path)):
        source = open_source(data, patient_pattern=patient_pattern, split_folders=split_folders)
    else:
        source = data
    split_records = _split_records(source, splits)
    items: list[_Item] = []
    hashes: list[str] = []
    thumbnails: list[torch.Tensor] = []
    hash_chunks: list[np.ndarray] = []
    sizes: Counter[str] = Counter()
    modes: Counter[str] = Counter()
    unreadable: list[dict[str, Any]] = []
    ground_truth = _GroundTruthCheck()
    total = sum(len(records) for records in split_records.values())
    with tqdm(total=total, desc="checking", unit="img", leave=False, disable=None) as progress:
        for split, records in split_records.items():
            for record in records:
                progress.update(1)
                try:
                    sample = source.load(record)
                except InvalidImageError as error:
                    unreadable.append({"file": record.path or record.id, "reason": error.reason, "split": split})
                    continue
                image = np.asarray(sample.image)
                ground_truth.read(record, image.shape)
                items.append(_Item(record.id, split, record.label))
                hashes.append(content_hash(image))
                thumbnails.append(_image_thumbnail(image))
                if len(thumbnails) == _HASH_CHUNK:  # hash as we go: thumbnails of a large dataset would fill memory
                    hash_chunks.append(_hash_thumbnails(torch.stack(thumbnails)))
                    thumbnails = []
                size, mode = _size_and_mode(sample.meta, image)
                sizes[size] += 1
                modes[mode] += 1
    if thumbnails:
        hash_chunks.append(_hash_thumbnails(torch.stack(thumbnails)))
    phashes = np.concatenate(hash_chunks) if hash_chunks else np.zeros((0, HASH_BITS // 8), dtype=np.uint8)
    result = _report(source, items, hashes, phashes, near_threshold, split_records.keys())
    result["files"] = sum(len(records) for records in split_records.values())
    result["unreadable"] = unreadable
    result["sizes"] = _size_summary(sizes)
    result["modes"] = dict(modes.most_common())
    if "masks" in result["layout"]:
        result["ground_truth"] = ground_truth.report(source, result["layout"]["masks"])
    result["seconds"] = round(time.perf_counter() - started, 2)
    _log_summary(result)
    return result


class _GroundTruthCheck:
    """Reads every listed image's masks at its size as the images are decoded: which fit, which are empty (normal
    images), which cannot be used (another size, undecodable)."""

    def __init__(self) -> None:
        self.with_lesion = 0
        self.empty = 0
        self.unusable: list[dict[str, str]] = []
        self.without: list[str] = []

    def read(self, record: Record, image_shape: tuple[int, ...]) -> None:
        try:
            truth = read_ground_truth(record, image_shape)
        except InvalidImageError as error:
            self.unusable.append({"image": record.id, "file": error.path, "reason": error.reason})
            return
        if truth is None:
            self.without.append(record.id)
        elif truth.mask.any():
            self.with_lesion += 1
        else:
            self.empty += 1

    def report(self, source: Source, pairing: Mapping[str, Any]) -> dict[str, Any]:
        """The pairing summary of the source's layout, what reading the masks found, and the lists behind the
        counts (masks without an image, images without a mask: first ``_MAX_LISTED`` of each)."""
        orphans = [{"file": file, "reason": reason} for file, reason in getattr(source, "skipped", [])
                   if reason.startswith(ORPHAN_MASK_REASON)]
        return {
            **pairing,
            "with_lesion": self.with_lesion,
            "empty_masks": self.empty,
            "unusable": self.unusable[:_MAX_LISTED],
            "masks_without_image_list": orphans[:_MAX_LISTED],
            "images_without_masks_list": sorted(self.without)[:_MAX_LISTED],
        }


def check_prepared(
    source: Source,
    prepared: Mapping[str, Any],
    *,
    near_threshold: int = NEAR_DUPLICATE_BITS,
    probe_sizes: bool = True,
) -> dict[str, Any]:
    """The training-time check, on the preprocessed splits training already holds.

    Exact duplicates are identical model inputs; near duplicates compare pHashes of the model inputs. Sizes and
    modes come from the files' headers (no decoding), or from the arrays of array sources.

    Args:
        source: the source the splits came from.
        prepared: ``{split: PreparedSplit}``.
        near_threshold: see :func:`check_data`.
        probe_sizes: read sizes and modes (header reads only; turn off for speed).

    Returns:
        The dict :func:`check_data` returns, with ``unreadable`` the files preparation skipped.
    """
    started = time.perf_counter()
    items: list[_Item] = []
    hashes: list[str] = []
    chunks = []
    total = sum(len(data) for data in prepared.values())
    with tqdm(total=total, desc="checking", unit="img", leave=False, disable=None) as progress:
        for split, data in prepared.items():
            labels = data.labels.tolist()
            items.extend(_Item(sample_id, split, label) for sample_id, label in zip(data.ids, labels))
            for start in range(0, len(data.images), _HASH_CHUNK):
                images = data.images[start : start + _HASH_CHUNK]
                hashes.extend(content_hash(image) for image in images)
                chunks.append(perceptual_hashes(images))
                progress.update(len(images))
    phashes = np.concatenate(chunks) if chunks else np.zeros((0, HASH_BITS // 8), dtype=np.uint8)
    result = _report(source, items, hashes, phashes, near_threshold, prepared.keys())
    result["files"] = sum(len(data) + len(data.skipped) for data in prepared.values())
    result["unreadable"] = [
        {"file": file, "reason": reason, "split": split}
        for split, data in prepared.items()
        for file, reason in data.skipped
    ]
    sizes, modes = _probe_sizes(source, [item.id for item in items]) if probe_sizes else (Counter(), Counter())
    result["sizes"] = _size_summary(sizes)
    result["modes"] = dict(modes.most_common())
    result["seconds"] = round(time.perf_counter() - started, 2)
    return result


def leaked_ids(result: Mapping[str, Any], against: Iterable[str] = ("train",), split: str = "test") -> set[str]:
    """Ids of ``split`` images that have an exact or near duplicate in one of the ``against`` splits.

    Uses the complete ``duplicates["leaked_ids"]`` the checks record (the listed pairs may be truncated).
    """
    leaked = result.get("duplicates", {}).get("leaked_ids", {})
    return {sample_id for other in against for sample_id in leaked.get(f"{split}<-{other}", [])}


# -- machinery ------------------------------------------------------------------------------------------------------
def _split_records(source: Source, splits: Mapping[str, Sequence[Record]] | None) -> dict[str, list[Record]]:
    if splits is not None:
        return {name: list(records) for name, records in splits.items()}
    official = source.official_splits()
    if official:
        return {name: source.records(name) for name in official}
    return {"all": source.records()}


def _report(
    source: Source,
    items: list[_Item],
    hashes: list[str],
    phashes: np.ndarray,
    near_threshold: int,
    split_names: Iterable[str],
) -> dict[str, Any]:
    names = list(source.label_names)
    splits: dict[str, dict[str, Any]] = {}
    for split in split_names:
        counts = Counter(item.label for item in items if item.split == split)
        splits[split] = {
            "n": sum(counts.values()),
            "per_class": {name: counts.get(index, 0) for index, name in enumerate(names)},
        }
        if counts.get(None):
            splits[split]["unlabelled"] = counts[None]
    return {
        "source": source.description,
        "layout": dict(getattr(source, "layout", {}) or {}),
        "fingerprint": source.fingerprint(),
        "label_names": names,
        "splits": splits,
        "source_skipped": [{"file": file, "reason": reason} for file, reason in getattr(source, "skipped", [])],
        "duplicates": _duplicates(items, hashes, phashes, near_threshold, names),
    }


def _duplicates(
    items: list[_Item], hashes: list[str], phashes: np.ndarray, threshold: int, names: list[str]
) -> dict[str, Any]:
    def describe(index: int) -> dict[str, Any]:
        item = items[index]
        label = names[item.label] if item.label is not None and 0 <= item.label < len(names) else None
        return {"id": item.id, "split": item.split, "label": label}

    order = {name: position for position, name in enumerate(SPLIT_NAMES)}

    def ordered(a: int, b: int) -> tuple[int, int]:
        key = lambda index: (order.get(items[index].split, len(order)), items[index].id)  # noqa: E731
        return (a, b) if key(a) <= key(b) else (b, a)

    groups: dict[str, list[int]] = defaultdict(list)
    for index, digest in enumerate(hashes):
        groups[digest].append(index)
    exact = []
    cross_pairs: list[tuple[str, int, int, int]] = []
    for digest, members in groups.items():
        if len(members) < 2:
            continue
        splits = {items[index].split for index in members}
        labels = {items[index].label for index in members}
        exact.append({
            "hash": f"sha256:{digest}",
            "items": [describe(index) for index in members],
            "cross_split": len(splits) > 1,
            "conflicting_labels": len(labels) > 1,
        })
        for position, a in enumerate(members):
            for b in members[position + 1 :]:
                if items[a].split != items[b].split:
                    cross_pairs.append(("exact", 0, *ordered(a, b)))

    near = []
    if threshold >= 0 and len(phashes) > 1:
        for a, b, distance in near_duplicate_pairs(phashes, threshold):
            if hashes[a] == hashes[b]:
                continue  # already an exact duplicate
            a, b = ordered(a, b)
            near.append((distance, a, b))
            if items[a].split != items[b].split:
                cross_pairs.append(("near", distance, a, b))
    near.sort()
    cross_pairs.sort(key=lambda entry: (entry[0] != "exact", entry[1], items[entry[2]].id, items[entry[3]].id))

    leaked: dict[str, set[str]] = defaultdict(set)
    for _, _, a, b in cross_pairs:
        leaked[f"{items[b].split}<-{items[a].split}"].add(items[b].id)
    return {
        "method": HASH_METHOD,
        "near_threshold": threshold,
        "counts": {
            "exact_groups": len(exact),
            "exact_images": sum(len(group["items"]) for group in exact),
            "near_pairs": len(near),
            "cross_split_pairs": len(cross_pairs),
            "cross_split_exact_pairs": sum(1 for entry in cross_pairs if entry[0] == "exact"),
            "conflicting_label_groups": sum(1 for group in exact if group["conflicting_labels"]),
        },
        "exact": exact[:_MAX_LISTED],
        "near": [
            {"distance": distance, "a": describe(a), "b": describe(b),
             "conflicting_labels": items[a].label != items[b].label}
            for distance, a, b in near[:_MAX_LISTED]
        ],
        "cross_split": [
            {"kind": kind, "distance": distance, "a": describe(a), "b": describe(b),
             "conflicting_labels": items[a].label != items[b].label}
            for kind, distance, a, b in cross_pairs[:_MAX_LISTED]
        ],
        "leaked_ids": {key: sorted(ids) for key, ids in sorted(leaked.items())},
        "truncated": max(len(exact), len(near), len(cross_pairs)) > _MAX_LISTED,
    }


def _size_and_mode(meta: Mapping[str, Any], image: np.ndarray) -> tuple[str, str]:
    size = meta.get("original_size")
    if not size:
        size = [image.shape[1], image.shape[0]]
    mode = meta.get("mode") or _array_mode(image)
    return f"{size[0]}x{size[1]}", str(mode)


def _array_mode(image: np.ndarray) -> str:
    channels = "RGB" if image.ndim == 3 else "grey"
    return f"{channels} {image.dtype}"


def _probe_sizes(source: Source, ids: Sequence[str]) -> tuple[Counter[str], Counter[str]]:
    sizes: Counter[str] = Counter()
    modes: Counter[str] = Counter()
    wanted = set(ids)
    for record in source.records():
        if record.id not in wanted:
            continue
        try:
            if record.path is not None:
                info = probe_image(record.path)
                meta = {"original_size": info.get("original_size"), "mode": info.get("mode")}
                image = np.zeros((1, 1))
            else:
                sample = source.load(record)
                meta, image = sample.meta, np.asarray(sample.image)
        except InvalidImageError:
            continue
        size, mode = _size_and_mode(meta, image)
        sizes[size] += 1
        modes[mode] += 1
    return sizes, modes


def _size_summary(sizes: Counter[str]) -> dict[str, Any]:
    if not sizes:
        return {"distinct": 0, "most_common": {}}
    dimensions = [tuple(int(value) for value in key.split("x")) for key in sizes]
    return {
        "distinct": len(sizes),
        "most_common": dict(sizes.most_common(20)),
        "min_width": min(width for width, _ in dimensions),
        "max_width": max(width for width, _ in dimensions),
        "min_height": min(height for _, height in dimensions),
        "max_height": max(height for _, height in dimensions),
    }


def _log_summary(result: Mapping[str, Any]) -> None:
    counts = result["duplicates"]["counts"]
    logger.info(
        "%s: %d files, %d unreadable, %d exact duplicate groups, %d near-duplicate pairs, %d cross-split pairs "
        "(%.1f s)",
        result["source"],
        result["files"],
        len(result["unreadable"]),
        counts["exact_groups"],
        counts["near_pairs"],
        counts["cross_split_pairs"],
        result["seconds"],
    )


def interpretation_lines(source: Source) -> list[str]:
    """How a source read the data, in words, for the first lines of ``medxai check-data``: where the splits came
    from and which classes were found (a wrongly read layout is the first thing to rule out)."""
    layout = getattr(source, "layout", {}) or {}
    lines = [f"{source.description}: read as {layout.get('kind', 'a data source')}"
             + (f" (chosen by {layout['chosen_by']})" if layout.get("chosen_by") else "")]
    splits = layout.get("splits") or {}
    if splits:
        lines.append("splits: " + ", ".join(f"{split} <- {where}" for split, where in splits.items()))
    else:
        lines.append("splits: none in the data (training carves val, and test when asked, stratified by class)")
    classes = list(source.label_names)
    lines.append(f"classes ({len(classes)}): " + ", ".join(str(name) for name in classes))
    masks = layout.get("masks")
    if masks:
        lines.append(
            f"masks: {masks['images_with_masks']} images with masks, {masks['images_without_masks']} without, "
            f"{masks['masks_without_image']} mask files without an image (skipped); paired by "
            + (", ".join(masks["paired_by"]) or "nothing")
        )
    return lines


def check_data_table(result: Mapping[str, Any], listed: int = 20) -> list[Any]:
    """Rich tables for people: counts per split and class, problems, and the first cross-split duplicates."""
    from rich.table import Table

    names = result["label_names"]
    counts = Table(title=f"{result['source']}: {result['files']} files")
    counts.add_column("split")
    for name in names:
        counts.add_column(name, justify="right")
    counts.add_column("total", justify="right")
    for split, row in result["splits"].items():
        counts.add_row(split, *(str(row["per_class"][name]) for name in names), str(row["n"]))

    duplicates = result["duplicates"]
    summary = Table(title="checks")
    summary.add_column("check")
    summary.add_column("result", justify="right")
    summary.add_row("unreadable files", str(len(result["unreadable"])))
    summary.add_row("entries skipped while listing", str(len(result["source_skipped"])))
    summary.add_row("exact duplicate groups (images)",
                    f"{duplicates['counts']['exact_groups']} ({duplicates['counts']['exact_images']})")
    summary.add_row(f"near-duplicate pairs (<= {duplicates['near_threshold']} bits)",
                    str(duplicates["counts"]["near_pairs"]))
    leaks = duplicates["counts"]["cross_split_pairs"]
    summary.add_row("[bold red]CROSS-SPLIT duplicate pairs[/]" if leaks else "cross-split duplicate pairs", str(leaks))
    summary.add_row("duplicates with conflicting labels", str(duplicates["counts"]["conflicting_label_groups"]))
    common_sizes = list(result["sizes"]["most_common"].items())[:5]
    summary.add_row("image sizes", ", ".join(f"{size} ({n})" for size, n in common_sizes))
    summary.add_row("modes", ", ".join(f"{mode} ({n})" for mode, n in result["modes"].items()))
    tables = [counts, summary]
    if result.get("ground_truth"):
        tables.extend(_ground_truth_tables(result["ground_truth"], summary, listed))

    if duplicates["cross_split"]:
        leak_table = Table(title=f"cross-split duplicates (first {min(listed, leaks)} of {leaks})",
                           title_style="bold red")
        for column in ("kind", "distance", "image", "duplicate"):
            leak_table.add_column(column, overflow="fold")
        for entry in duplicates["cross_split"][:listed]:
            leak_table.add_row(entry["kind"], str(entry["distance"]), f"{entry['a']['split']}: {entry['a']['id']}",
                               f"{entry['b']['split']}: {entry['b']['id']}")
        tables.append(leak_table)
    if result["unreadable"]:
        bad = Table(title=f"unreadable files (first {min(listed, len(result['unreadable']))})", title_style="yellow")
        bad.add_column("file", overflow="fold")
        bad.add_column("reason", overflow="fold")
        for entry in result["unreadable"][:listed]:
            bad.add_row(entry["file"], entry["reason"])
        tables.append(bad)
    return tables


def _ground_truth_tables(ground_truth: Mapping[str, Any], summary: Any, listed: int) -> list[Any]:
    """Rows of the checks table on masks, and tables of the masks without an image, the images without a mask and
    the masks that do not fit their image (first ``listed`` of each)."""
    from rich.table import Table

    summary.add_row("images with masks (lesion / empty)",
                    f"{ground_truth['images_with_masks']} ({ground_truth['with_lesion']} / {ground_truth['empty_masks']})")
    summary.add_row("images with boxes", str(ground_truth["images_with_boxes"]))
    summary.add_row("images without a mask", str(ground_truth["images_without_masks"]))
    summary.add_row("mask files without an image", str(ground_truth["masks_without_image"]))
    summary.add_row("masks unusable (size, decoding)", str(len(ground_truth["unusable"])))
    tables = []
    for title, entries, columns in (
        ("mask files without an image", ground_truth["masks_without_image_list"], ("file", "reason")),
        ("images without a mask", [{"image": image} for image in ground_truth["images_without_masks_list"]],
         ("image",)),
        ("masks that cannot be used", ground_truth["unusable"], ("image", "file", "reason")),
    ):
        if not entries:
            continue
        table = Table(title=f"{title} (first {min(listed, len(entries))} of {len(entries)})", title_style="yellow",
                      min_width=60)
        for column in columns:
            table.add_column(column, overflow="fold")
        for entry in entries[:listed]:
            table.add_row(*(str(entry[column]) for column in columns))
        tables.append(table)
    return tables

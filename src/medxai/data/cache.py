"""Preprocessed images as integer codes, in memory or in shard files on disk that later commands reuse.

Decoding a 2,000 px film costs far more than training on its 224 px version, and preprocessing is deterministic:
so a split is decoded and resized once, in parallel worker processes, and stored at the training resolution as
``uint16`` codes ``round(x * 65535)`` of the ``[0, 1]`` values (``uint8``, ``round(x * 255)``, on request: half
the disk, enough for 8-bit sources). ``uint16`` keeps every value within 7.6e-6, finer than the float16 storage it
replaces (2.4e-4 near 1), so 16-bit CT and X-ray keep their detail.

On disk (``data.cache``, the default) the codes live in raw shard files under
``<cache root>/<key[:2]>/<key>/``. The key is a SHA-256 of everything the pixels depend on: each record's id and
file (path, size, modification time) or array index, the source's fingerprint, the preprocessing options that shape
pixels (not the normalisation, which is applied later on the device), the code type and the medxai version. A
changed file, another size or a new release gives another key, so a stale cache is never read; the next run, a
``--resume``, ``evaluate`` and ``explain-eval`` of the same split find the same key and decode nothing.

A cache is built in a temporary sibling folder and renamed into place when complete, so a killed build leaves no
half cache behind (only a ``.partial`` folder, removed by the next build of that key), and two processes building
the same key at once both end with one complete copy. The shards are written through memory maps and read row by row
(:class:`ShardFile`): a training batch reads only its own images, and memory does not grow with the dataset (the
pages read are the kernel's page cache, not the process's).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medxai.errors import ConfigError

__all__ = [
    "CACHE_DTYPES", "CACHE_DIR_ENV", "ImageStore", "ShardWriter", "cache_key", "default_cache_root", "to_unit_range",
    "quantize", "open_cached", "PIXEL_OPTIONS",
]

logger = logging.getLogger(__name__)

CACHE_DIR_ENV = "MEDXAI_CACHE_DIR"
CACHE_FORMAT = 1
#: code type name -> (NumPy dtype, largest code)
CACHE_DTYPES: dict[str, tuple[np.dtype, int]] = {"uint16": (np.dtype(np.uint16), 65535), "uint8": (np.dtype(np.uint8), 255)}
#: The preprocessing options the stored pixels depend on; normalisation (normalize, mean, std) happens on the device.
PIXEL_OPTIONS = ("size", "resize_mode", "channels", "intensity", "clip_percentiles", "denoise", "median_kernel",
                 "gaussian_sigma")
_SHARD_BYTES = 256 * 2**20
_META_FILE = "meta.json"
_SCALES = {torch.from_numpy(np.zeros(0, dtype)).dtype: float(top) for dtype, top in CACHE_DTYPES.values()}


def default_cache_root() -> Path:
    """``$MEDXAI_CACHE_DIR``, else ``$XDG_CACHE_HOME/medxai``, else ``~/.cache/medxai``."""
    if os.environ.get(CACHE_DIR_ENV):
        return Path(os.environ[CACHE_DIR_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "medxai"


def code_type(name: str) -> tuple[np.dtype, int]:
    """The NumPy dtype and largest code of ``data.cache_dtype``."""
    if name not in CACHE_DTYPES:
        raise ConfigError(f"data.cache_dtype must be one of {sorted(CACHE_DTYPES)}, got {name!r}")
    return CACHE_DTYPES[name]


def quantize(unit: torch.Tensor, dtype_name: str) -> np.ndarray:
    """``[0, 1]`` values -> integer codes ``round(x * max)`` (clipped), as a NumPy array."""
    dtype, top = code_type(dtype_name)
    codes = unit.float().mul(top).round_().clamp_(0, top)
    return codes.to(torch.int32).numpy().astype(dtype)


def to_unit_range(codes: torch.Tensor) -> torch.Tensor:
    """Integer codes (``uint8`` or ``uint16``) -> float32 on ``[0, 1]``, on the codes' device; floats pass through
    as float32 (already on that scale)."""
    scale = _SCALES.get(codes.dtype)
    if scale is None:
        return codes.float()
    if codes.dtype == torch.uint16:  # few kernels take uint16; int32 holds every code exactly
        codes = codes.to(torch.int32)
    return codes.float().mul_(1.0 / scale)


class ImageStore:
    """``N`` preprocessed images ``(C, S, S)`` as integer codes, in shards (NumPy arrays, or shard files read by row).

    ``store[key]`` (an int, a slice, a list or a tensor of indices) returns float32 ``[0, 1]`` images on the CPU;
    :meth:`codes` returns the integer codes themselves, which the training loop moves to the device before
    converting (a quarter of the bytes of float32). :meth:`subset` is a view: it copies no pixels.
    """

    def __init__(self, shards: Sequence[np.ndarray | ShardFile], shard_size: int, index: np.ndarray | None = None,
                 shape: tuple[int, ...] | None = None) -> None:
        self._shards = list(shards)
        self.shard_size = shard_size
        self.image_shape = tuple(shape) if shape is not None else tuple(self._shards[0].shape[1:])
        total = sum(len(shard) for shard in self._shards)
        self.index = np.arange(total, dtype=np.int64) if index is None else np.asarray(index, dtype=np.int64)
        self.np_dtype = self._shards[0].dtype if self._shards else np.dtype(np.uint16)

    @classmethod
    def from_unit(cls, images: torch.Tensor, dtype_name: str = "uint16") -> ImageStore:
        """An in-memory store of ``(N, C, S, S)`` images on the ``[0, 1]`` scale."""
        return cls([quantize(images.cpu(), dtype_name)], max(1, len(images)), shape=tuple(images.shape[1:]))

    @classmethod
    def open(cls, folder: Path, meta: dict[str, Any]) -> ImageStore:
        """The shard files of a complete cache folder, read-only."""
        shape = tuple(meta["shape"])
        shards = [ShardFile(folder / name, count, meta["dtype"], shape) for name, count in meta["shards"]]
        return cls(shards, meta["shard_size"], np.asarray(meta["kept"], dtype=np.int64), shape)

    def __len__(self) -> int:
        return len(self.index)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self), *self.image_shape)

    @property
    def dtype(self) -> torch.dtype:
        return torch.from_numpy(np.zeros(0, self.np_dtype)).dtype

    def codes(self, key) -> torch.Tensor:
        """The integer codes of the images at ``key``, as a new CPU tensor ``(B, C, S, S)``."""
        positions = self.index[self._positions(key)]
        out = np.empty((len(positions), *self.image_shape), dtype=self.np_dtype)
        shard_of = positions // self.shard_size
        for shard in np.unique(shard_of):
            rows = np.nonzero(shard_of == shard)[0]
            out[rows] = self._shards[shard][positions[rows] - shard * self.shard_size]
        return torch.from_numpy(out)

    def __getitem__(self, key) -> torch.Tensor:
        return to_unit_range(self.codes(key))

    def subset(self, indices: Sequence[int]) -> ImageStore:
        view = ImageStore.__new__(ImageStore)
        view.__dict__.update(self.__dict__)
        view.index = self.index[np.asarray(indices, dtype=np.int64)]
        return view

    def _positions(self, key) -> np.ndarray:
        if isinstance(key, slice):
            return np.arange(len(self), dtype=np.int64)[key]
        if isinstance(key, (int, np.integer)):
            return np.asarray([key], dtype=np.int64)
        if isinstance(key, torch.Tensor):
            key = key.cpu().numpy()
        return np.asarray(key, dtype=np.int64).reshape(-1)


class ShardFile:
    """The rows of one shard file, read by offset (``os.pread``) rather than memory-mapped: the pages read stay in
    the kernel's page cache, shared and reclaimable, and never count in this process's resident memory, which a
    mapping's touched pages would (the whole cache, after one epoch). It pickles as its path (a DataLoader worker
    opens the file again); ``pread`` keeps no file position, so forked workers may share the descriptor."""

    def __init__(self, path: str | Path, count: int, dtype: str | np.dtype, shape: tuple[int, ...]) -> None:
        self.path, self.count, self.dtype, self.shape = Path(path), count, np.dtype(dtype), tuple(shape)
        self.row_bytes = int(np.prod(shape)) * self.dtype.itemsize
        self._fd: int | None = None

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        chunks = [os.pread(self._fd, self.row_bytes, row * self.row_bytes) for row in rows.tolist()]
        if any(len(chunk) != self.row_bytes for chunk in chunks):
            raise OSError(f"{self.path}: shorter than its metadata says (a damaged cache: delete this folder)")
        return np.frombuffer(b"".join(chunks), dtype=self.dtype).reshape(len(rows), *self.shape)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_fd": None}

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)


class ShardWriter:
    """Receives images by position (in any order) and writes them into shards: memory-mapped files in a
    ``.partial`` folder that :meth:`commit` renames into place, or in-memory arrays (``folder=None``)."""

    def __init__(self, count: int, shape: tuple[int, ...], dtype_name: str, folder: Path | None) -> None:
        self.dtype, _ = code_type(dtype_name)
        self.shape = tuple(shape)
        image_bytes = int(np.prod(shape)) * self.dtype.itemsize
        self.shard_size = max(1, min(count, _SHARD_BYTES // max(image_bytes, 1)))
        counts = [min(self.shard_size, count - start) for start in range(0, count, self.shard_size)]
        self.final = folder
        self.partial = None if folder is None else folder.with_name(f"{folder.name}.partial-{uuid.uuid4().hex[:8]}")
        if self.partial is not None:
            self.partial.mkdir(parents=True)
        self.names = [f"shard-{number:05d}.bin" for number in range(len(counts))]
        self.shards = [self._new_shard(name, rows) for name, rows in zip(self.names, counts)]

    def _new_shard(self, name: str, rows: int) -> np.ndarray:
        if self.partial is None or rows == 0:
            return np.zeros((rows, *self.shape), dtype=self.dtype)
        return np.memmap(self.partial / name, dtype=self.dtype, mode="w+", shape=(rows, *self.shape))

    def put(self, position: int, codes: np.ndarray) -> None:
        self.shards[position // self.shard_size][position % self.shard_size] = codes

    def commit(self, kept: Sequence[int], extra: dict[str, Any]) -> ImageStore:
        """Finish: the store of the ``kept`` positions; on disk, the folder is complete and in place afterwards."""
        meta = {"format": CACHE_FORMAT, "dtype": self.dtype.name, "shape": list(self.shape),
                "shard_size": self.shard_size, "shards": [[name, len(shard)] for name, shard in zip(self.names, self.shards)],
                "kept": list(map(int, kept)), **extra}
        if self.partial is None:
            return ImageStore(self.shards, self.shard_size, np.asarray(kept, dtype=np.int64), self.shape)
        for shard in self.shards:
            if isinstance(shard, np.memmap):
                shard.flush()
        (self.partial / _META_FILE).write_text(json.dumps(meta))
        try:
            os.rename(self.partial, self.final)
        except OSError:  # another process finished the same key first: keep its copy, drop ours
            if not _complete(self.final):
                raise
            shutil.rmtree(self.partial, ignore_errors=True)
            meta = json.loads((self.final / _META_FILE).read_text())
        return ImageStore.open(self.final, meta)

    def abandon(self) -> None:
        """Remove the partial folder (ours: made by this writer) after a failed build."""
        if self.partial is not None:
            shutil.rmtree(self.partial, ignore_errors=True)


def cache_key(source_fingerprint: str, records: Sequence[Any], preprocess: Any, dtype_name: str) -> str:
    """SHA-256 of what the stored pixels depend on (see the module docstring)."""
    from medxai import __version__

    digest = hashlib.sha256()
    options = {name: getattr(preprocess, name) for name in PIXEL_OPTIONS}
    header = {"format": CACHE_FORMAT, "medxai": __version__, "source": source_fingerprint, "dtype": dtype_name,
              "preprocess": options}
    digest.update(json.dumps(header, sort_keys=True, default=list).encode())
    for record in records:
        digest.update(_record_identity(record).encode())
    return digest.hexdigest()


def _record_identity(record: Any) -> str:
    if record.path is not None:
        try:
            stat = os.stat(record.path)
            return f"{record.id}\0{record.path}\0{stat.st_size}\0{stat.st_mtime_ns}\n"
        except OSError:
            return f"{record.id}\0{record.path}\0missing\n"
    return f"{record.id}\0{record.index}\n"


def cache_folder(root: Path, key: str) -> Path:
    return Path(root) / key[:2] / key


def _complete(folder: Path) -> bool:
    return (folder / _META_FILE).is_file()


def open_cached(folder: Path) -> tuple[ImageStore, dict[str, Any]] | None:
    """The complete cache at ``folder`` with its metadata, or None when there is none (or it is damaged: then it
    is logged and the caller builds it again)."""
    if not _complete(folder):
        _remove_partials(folder)
        return None
    try:
        meta = json.loads((folder / _META_FILE).read_text())
        dtype = np.dtype(meta["dtype"])
        image_bytes = int(np.prod(meta["shape"])) * dtype.itemsize
        for name, count in meta["shards"]:
            if count and (folder / name).stat().st_size != count * image_bytes:
                raise ValueError(f"{name} has the wrong size")
        return ImageStore.open(folder, meta), meta
    except (OSError, ValueError, KeyError, TypeError) as error:
        logger.warning("preprocessed cache %s is damaged (%s): decoding again", folder, error)
        damaged = folder.with_name(f"{folder.name}.partial-damaged-{uuid.uuid4().hex[:8]}")
        os.rename(folder, damaged)  # ours: a medxai cache folder with our metadata file
        shutil.rmtree(damaged, ignore_errors=True)
        return None


def _remove_partials(folder: Path) -> None:
    """Remove ``.partial`` builds of this key left by killed processes (older than an hour: not a build running
    now in another process)."""
    if not folder.parent.is_dir():
        return
    for leftover in folder.parent.glob(f"{folder.name}.partial-*"):
        try:
            if time.time() - leftover.stat().st_mtime > 3600:
                shutil.rmtree(leftover, ignore_errors=True)
        except OSError:
            continue


def facts_to_rows(facts: Sequence[Any]) -> list[list[Any]]:
    return [list(asdict(item).values()) for item in facts]


def rows_to_facts(rows: Sequence[Sequence[Any]], cls: type) -> list[Any]:
    names = [field.name for field in fields(cls)]
    return [cls(**dict(zip(names, row))) for row in rows]

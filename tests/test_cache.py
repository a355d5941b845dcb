"""The preprocessed-image cache: exact codes, reuse without decoding, keys that change with what the pixels depend on,
no half caches after a kill, damaged caches rebuilt, and a batch pipeline whose workers read the same batches."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from medxai.config import PreprocessConfig
from medxai.data import open_source
from medxai.data.cache import ImageStore, cache_key, quantize, to_unit_range
from medxai.data.prepared import iterate_batches, prepare_split
from medxai.data.preprocess import Preprocessor


@pytest.fixture
def image_folder(tmp_path):
    """Two classes of 8-bit and 16-bit PNGs at various sizes, and one truncated file."""
    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    for label in ("normal", "pneumonia"):
        (root / label).mkdir(parents=True)
        for index in range(12):
            size = (40 + 7 * index, 50 + 3 * index)
            if index % 3 == 0:
                pixels = rng.integers(0, 65535, size=size, dtype=np.uint16)
            else:
                pixels = rng.integers(0, 255, size=size, dtype=np.uint8)
            Image.fromarray(pixels).save(root / label / f"{index:02d}.png")
    (root / "normal" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 30)
    return root


def _preprocessor(**changes) -> Preprocessor:
    return Preprocessor(PreprocessConfig(size=32, normalize="none", **changes))


def _prepare(folder, cache_root, **changes):
    source = open_source(folder)
    return source, prepare_split(source, source.records(), _preprocessor(**changes), num_workers=0,
                                 cache_root=cache_root)


def test_uint16_codes_keep_every_value_within_half_a_step():
    values = torch.rand(4, 1, 8, 8, dtype=torch.float64)
    for name, top in (("uint16", 65535), ("uint8", 255)):
        codes = torch.from_numpy(quantize(values, name))
        assert codes.dtype == (torch.uint16 if name == "uint16" else torch.uint8)
        error = (to_unit_range(codes).double() - values).abs().max().item()
        assert error <= 0.5 / top + 1e-7
    assert to_unit_range(torch.tensor([0, 65535], dtype=torch.uint16)).tolist() == [0.0, 1.0]


def test_a_cached_split_equals_the_in_memory_one_and_is_read_without_decoding(image_folder, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    _, in_memory = _prepare(image_folder, None)
    _, built = _prepare(image_folder, cache)
    assert len(list(cache.rglob("meta.json"))) == 1
    source = open_source(image_folder)
    monkeypatch.setattr(type(source), "load", lambda *args: pytest.fail("decoded although cached"))
    reread = prepare_split(source, source.records(), _preprocessor(), cache_root=cache)
    for split in (built, reread):
        assert split.ids == in_memory.ids and torch.equal(split.labels, in_memory.labels)
        assert torch.equal(split.images.codes(slice(None)), in_memory.images.codes(slice(None)))
        assert split.boxes == in_memory.boxes and split.facts == in_memory.facts
        assert split.skipped == in_memory.skipped and len(split.skipped) == 1
        assert "broken.png" in split.skipped[0][0]
    assert len(in_memory) == 24


def test_the_key_follows_the_pixels_not_the_normalisation(image_folder):
    source = open_source(image_folder)
    records = source.records()
    fingerprint = source.fingerprint()
    base = cache_key(fingerprint, records, PreprocessConfig(size=32), "uint16")
    assert cache_key(fingerprint, records, PreprocessConfig(size=32, normalize="fixed", mean=[0.3], std=[0.2]),
                     "uint16") == base
    assert cache_key(fingerprint, records, PreprocessConfig(size=48), "uint16") != base
    assert cache_key(fingerprint, records, PreprocessConfig(size=32, resize_mode="pad"), "uint16") != base
    assert cache_key(fingerprint, records, PreprocessConfig(size=32), "uint8") != base
    assert cache_key(fingerprint, records[:-1], PreprocessConfig(size=32), "uint16") != base
    edited = records[0].path
    stat = os.stat(edited)
    os.utime(edited, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # same size, touched: another key
    assert cache_key(fingerprint, records, PreprocessConfig(size=32), "uint16") != base


def test_a_build_killed_halfway_leaves_no_cache_and_the_next_build_completes(image_folder, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    source = open_source(image_folder)
    original = type(source).load
    calls = {"n": 0}

    def dies_at_the_tenth(self, record):
        calls["n"] += 1
        if calls["n"] == 10:
            raise KeyboardInterrupt
        return original(self, record)

    monkeypatch.setattr(type(source), "load", dies_at_the_tenth)
    with pytest.raises(KeyboardInterrupt):
        prepare_split(source, source.records(), _preprocessor(), num_workers=0, cache_root=cache)
    assert not list(cache.rglob("meta.json")) and not list(cache.rglob("*.partial-*"))
    monkeypatch.setattr(type(source), "load", original)
    _, split = _prepare(image_folder, cache)
    assert len(split) == 24 and len(list(cache.rglob("meta.json"))) == 1


def test_a_damaged_shard_is_noticed_and_decoded_again(image_folder, tmp_path):
    cache = tmp_path / "cache"
    _, first = _prepare(image_folder, cache)
    expected = first.images.codes(slice(None))
    del first
    shard = next(cache.rglob("shard-00000.bin"))
    with shard.open("r+b") as handle:
        handle.truncate(100)
    _, second = _prepare(image_folder, cache)
    assert torch.equal(second.images.codes(slice(None)), expected)
    assert shard.stat().st_size > 100


def test_a_mapped_store_pickles_as_paths_and_workers_gather_the_same_batches(image_folder, tmp_path):
    _, split = _prepare(image_folder, tmp_path / "cache")
    assert len(pickle.dumps(split.images)) < 4096  # the shard paths, not the pixels
    restored = pickle.loads(pickle.dumps(split.images))
    assert torch.equal(restored.codes([3, 1, 2]), split.images.codes([3, 1, 2]))
    view = split.images.subset([5, 0, 7])
    assert torch.equal(view.codes(slice(None)), split.images.codes([5, 0, 7]))
    assert torch.equal(view[1:], to_unit_range(split.images.codes([0, 7])))

    def batches(workers: int):
        from medxai.data import prepared

        original = prepared.loader_workers
        prepared.loader_workers = lambda device, world=1: workers
        try:
            return list(iterate_batches(split, 5, shuffle=True, generator=torch.Generator().manual_seed(1)))
        finally:
            prepared.loader_workers = original

    for (codes_a, labels_a), (codes_b, labels_b) in zip(batches(0), batches(2), strict=True):
        assert torch.equal(codes_a, codes_b) and torch.equal(labels_a, labels_b)


def test_an_in_memory_store_from_floats_keeps_shape_and_values():
    images = torch.rand(6, 3, 5, 5)
    store = ImageStore.from_unit(images)
    assert store.shape == (6, 3, 5, 5) and len(store) == 6 and store.dtype == torch.uint16
    torch.testing.assert_close(store[:], images, atol=1 / 65535, rtol=0)

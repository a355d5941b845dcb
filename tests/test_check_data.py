"""Data checks: the perceptual hash, exact and near duplicates within and across splits, the CLI, and training's use."""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from medxai.cli import main
from medxai.data import check as check_module
from medxai.data.check import (
    HASH_BITS,
    NEAR_DUPLICATE_BITS,
    _dct_matrix,
    _multi_index_pairs,
    _near_duplicate_pairs_brute,
    _pigeonhole_plan,
    _substring_plan,
    check_data,
    check_prepared,
    content_hash,
    leaked_ids,
    near_duplicate_pairs,
    perceptual_hashes,
)


def smooth_image(seed: int, size: int = 96) -> np.ndarray:
    """A random picture with natural-image statistics (a 1/f^1.5 random field), different for every seed.

    (Textureless pictures, such as a few smooth blobs, put most of the hashed DCT coefficients near their median and
    hash unstably; photographs and radiographs do not.)
    """
    rng = np.random.default_rng(seed)
    frequency = np.sqrt(np.fft.fftfreq(size)[:, None] ** 2 + np.fft.fftfreq(size)[None, :] ** 2)
    amplitude = 1.0 / np.maximum(frequency, 1.0 / size) ** 1.5
    field = np.real(np.fft.ifft2(amplitude * np.exp(2j * np.pi * rng.random((size, size)))))
    field = (field - field.min()) / np.ptp(field)
    return (field * 220 + 20).astype(np.uint8)


def _jpeg(image: np.ndarray, quality: int = 70) -> np.ndarray:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
    return np.asarray(Image.open(io.BytesIO(buffer.getvalue())))


def _distance(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.unpackbits(np.bitwise_xor(a, b)).sum())


def _hash(image: np.ndarray) -> np.ndarray:
    return perceptual_hashes(torch.from_numpy(image.astype(np.float32))[None])[0]


# -- the hash --------------------------------------------------------------------------------------------------------
def test_dct_matrix_is_the_orthonormal_dct_ii():
    matrix = _dct_matrix(8).double()
    torch.testing.assert_close(matrix @ matrix.T, torch.eye(8, dtype=torch.float64), atol=1e-6, rtol=0)
    signal = torch.cos(math.pi * (2 * torch.arange(8.0) + 1) * 3 / 16).double()  # pure frequency 3
    coefficients = matrix @ signal
    assert int(coefficients.abs().argmax()) == 3 and coefficients[3] == pytest.approx(2.0, abs=1e-6)


def test_perceptual_hash_ignores_copies_edits_and_separates_different_images():
    images = [smooth_image(seed) for seed in range(40)]
    hashes = [_hash(image) for image in images]
    assert hashes[0].shape == (HASH_BITS // 8,) and hashes[0].dtype == np.uint8
    assert np.unpackbits(hashes[0]).sum() == HASH_BITS // 2  # median threshold: half the bits set
    edits = {
        "jpeg q70": lambda image: _jpeg(image),
        "resized to 64": lambda image: np.asarray(Image.fromarray(image).resize((64, 64), Image.BILINEAR)),
        "brighter": lambda image: np.clip(image.astype(int) + 15, 0, 255).astype(np.uint8),
        "lower contrast": lambda image: (image * 0.8 + 20).astype(np.uint8),
        "noise": lambda image: np.clip(image + np.random.default_rng(0).normal(0, 4, image.shape), 0, 255),
        "uint16 rescaled": lambda image: image.astype(np.uint16) * 257,
        "RGB": lambda image: np.repeat(image[:, :, None], 3, axis=2),
    }
    worst = {}
    for name, edit in edits.items():
        edited = torch.from_numpy(np.asarray(edit(images[0]), dtype=np.float32))
        batch = edited.permute(2, 0, 1)[None] if edited.dim() == 3 else edited[None]
        worst[name] = _distance(hashes[0], perceptual_hashes(batch)[0])
    assert max(worst.values()) <= NEAR_DUPLICATE_BITS // 2, worst
    distinct = [_distance(hashes[i], hashes[j]) for i in range(40) for j in range(i + 1, 40)]
    assert min(distinct) > NEAR_DUPLICATE_BITS, min(distinct)


def test_near_duplicate_pairs_equal_a_brute_force_count():
    rng = np.random.default_rng(3)
    hashes = rng.integers(0, 256, size=(300, HASH_BITS // 8), dtype=np.uint8)
    hashes[10] = hashes[20]
    hashes[30] = hashes[40] ^ np.eye(1, HASH_BITS // 8, 5, dtype=np.uint8).ravel()  # one bit apart
    bits = np.unpackbits(hashes, axis=1).astype(int)
    brute = {(i, j, int((bits[i] != bits[j]).sum())) for i in range(300) for j in range(i + 1, 300)
             if (bits[i] != bits[j]).sum() <= 110}
    assert set(near_duplicate_pairs(hashes, 110, block=64)) == brute
    assert {(10, 20, 0), (30, 40, 1)} <= set(near_duplicate_pairs(hashes, 1))


def clustered_hashes(count: int, seed: int, spread: int = 48) -> np.ndarray:
    """Packed 256-bit hashes in families: each family a random centre, its bits biased per position (pHash bits of
    radiographs are: 6% to 86% set on PneumoniaMNIST), and 1 to 5 members 0 to ``spread`` flipped bits from it (half
    of them 0 to 3), so that pair distances cover every tested threshold and its neighbours; 2% are exact copies of
    others."""
    rng = np.random.default_rng(seed)
    bias = rng.uniform(0.15, 0.85, HASH_BITS)
    members = []
    while len(members) < count:
        centre = rng.random(HASH_BITS) < bias
        for _ in range(int(rng.integers(1, 6))):
            member = centre.copy()
            flips = int(rng.integers(0, spread + 1) if rng.random() < 0.5 else rng.integers(0, 4))
            member[rng.choice(HASH_BITS, flips, replace=False)] ^= True
            members.append(member)
    hashes = np.packbits(np.array(members[:count]), axis=1)
    copies = rng.choice(count, size=(2, count // 50), replace=False)
    hashes[copies[1]] = hashes[copies[0]]  # exact copies
    return hashes


def _forced_plans(threshold: int) -> list[int]:
    """Substring counts whose pigeonhole plans search radii 0 (threshold + 1 substrings), 0 with spare substrings,
    and 1 or 2 where the threshold allows (at most 63 bits per substring, so at least 5 substrings)."""
    counts = {threshold + 1, threshold + 7, max(5, -(-(threshold + 1) // 2)), max(5, -(-(threshold + 1) // 3))}
    return sorted(count for count in counts if count <= HASH_BITS)


@pytest.mark.parametrize("threshold", [0, 1, 8, 24, 40])
def test_multi_index_search_finds_exactly_the_pairs_of_the_all_pairs_search(threshold):
    hashes = clustered_hashes(2000, seed=threshold)
    expected = _near_duplicate_pairs_brute(hashes, threshold)
    distances = {distance for _, _, distance in expected}
    assert {0, threshold} <= distances  # exact copies and pairs exactly at the threshold are in the data ...
    assert any(distance == threshold + 1 for _, _, distance in _near_duplicate_pairs_brute(hashes, threshold + 1))
    assert _substring_plan(len(hashes), HASH_BITS, threshold) is not None  # ... and the index, not the fallback, runs
    assert near_duplicate_pairs(hashes, threshold) == expected
    for substrings in _forced_plans(threshold):
        plan = _pigeonhole_plan(HASH_BITS, threshold, substrings)
        assert _multi_index_pairs(hashes, threshold, plan, block=997) == expected, substrings
    if threshold >= 8:
        assert max(radius for substrings in _forced_plans(threshold)
                   for _, radius in _pigeonhole_plan(HASH_BITS, threshold, substrings)) >= 1


def test_pigeonhole_plans_cover_every_bit_once_and_leave_no_pair_out():
    for threshold in (0, 1, 8, 24, 40, 100):
        for substrings in (5, 13, 25, 41, 256):
            step, extra = divmod(threshold, substrings)
            plan = _pigeonhole_plan(HASH_BITS, threshold, substrings)
            assert [radius for _, radius in plan] == ([step] * (extra + 1) + [step - 1] * (substrings - extra - 1)
                                                      if step else [0] * min(extra + 1, substrings))
            every = np.concatenate([np.arange(index, HASH_BITS, substrings) for index in range(substrings)])
            assert sorted(every.tolist()) == list(range(HASH_BITS))
            # the pigeonhole bound: differing in radius + 1 bits on every searched substring (and radius + 1 = 0
            # more on the others) costs more than the threshold
            assert sum(radius + 1 for _, radius in plan) == threshold + 1


def test_multi_index_search_on_degenerate_inputs():
    empty = np.zeros((0, HASH_BITS // 8), dtype=np.uint8)
    one = clustered_hashes(1, seed=0)
    assert near_duplicate_pairs(empty, 24) == [] == near_duplicate_pairs(one, 24)
    assert near_duplicate_pairs(clustered_hashes(50, seed=1), -1) == []

    identical = np.repeat(clustered_hashes(1, seed=2), 300, axis=0)
    every_pair = [(i, j, 0) for i in range(300) for j in range(i + 1, 300)]
    assert near_duplicate_pairs(identical, 0) == every_pair == near_duplicate_pairs(identical, 24)
    for block in (97, 10_000):  # a bucket of 300 equal substrings: ranges longer than the block, many chunks
        assert _multi_index_pairs(identical, 24, _pigeonhole_plan(HASH_BITS, 24, 13), block=block) == every_pair

    # buckets far larger than the block: 192 shared bits, so every substring has only a few free bits
    rng = np.random.default_rng(4)
    bits = np.repeat(rng.random((1, HASH_BITS)) < 0.5, 600, axis=0)
    bits[:, 192:] = rng.random((600, 64)) < 0.5
    shared = np.packbits(bits, axis=1)
    for threshold in (24, 32):
        plan = _substring_plan(len(shared), HASH_BITS, threshold)
        positions = plan[0][0]
        keys = np.packbits(np.unpackbits(shared, axis=1)[:, positions], axis=1)
        largest_bucket = np.unique(keys, axis=0, return_counts=True)[1].max()
        assert largest_bucket > 64
        expected = _near_duplicate_pairs_brute(shared, threshold)
        assert len(expected) > 1000
        assert near_duplicate_pairs(shared, threshold, block=64) == expected

    assert _substring_plan(300, HASH_BITS, 110) is None  # the index would cost more: all pairs are compared
    assert near_duplicate_pairs(one.repeat(3, axis=0), HASH_BITS) == [(0, 1, 0), (0, 2, 0), (1, 2, 0)]


def test_multi_index_search_without_64_bit_words(monkeypatch):
    """Widths that are not whole 64-bit words (and NumPy without ``bitwise_count``) verify byte by byte."""
    hashes = clustered_hashes(800, seed=5)
    monkeypatch.setattr(check_module, "_HAS_BITWISE_COUNT", False)
    assert near_duplicate_pairs(hashes, 24) == _near_duplicate_pairs_brute(hashes, 24)
    narrow = hashes[:, :5]  # 40-bit hashes
    plan = _pigeonhole_plan(40, 6, 7)
    assert _multi_index_pairs(narrow, 6, plan, block=500) == _near_duplicate_pairs_brute(narrow, 6)


def test_content_hash_is_exactly_pixel_equality():
    image = smooth_image(1)
    assert content_hash(image) == content_hash(image.copy())
    changed = image.copy()
    changed[5, 5] ^= 1
    assert content_hash(changed) != content_hash(image)
    assert content_hash(image.astype(np.uint16)) != content_hash(image)
    assert content_hash(torch.from_numpy(image)) == content_hash(image)


# -- check_data on a folder ------------------------------------------------------------------------------------------
def _leaky_folder(root: Path) -> dict[str, str]:
    """train/test class folders; test holds an exact copy and a JPEG re-encoding of train images. Returns the planted
    leaks: test id -> train id."""
    planted = {}
    for split, first in (("train", 0), ("test", 100)):
        for label, offset in (("a", 0), ("b", 50)):
            (root / split / label).mkdir(parents=True)
            for index in range(6):
                Image.fromarray(smooth_image(first + offset + index)).save(root / split / label / f"{index}.png")
    shutil.copy(root / "train" / "a" / "2.png", root / "test" / "a" / "copy of 2.png")
    planted["test/a/copy of 2.png"] = "train/a/2.png"
    Image.fromarray(_jpeg(smooth_image(53), quality=60)).save(root / "test" / "b" / "reencoded.jpg", quality=95)
    planted["test/b/reencoded.jpg"] = "train/b/3.png"
    (root / "test" / "b" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    (root / "train" / "a" / ".DS_Store").write_bytes(b"\x00")
    return planted


def test_check_data_reports_counts_unreadable_files_and_every_planted_leak(tmp_path):
    planted = _leaky_folder(tmp_path / "data")
    result = check_data(tmp_path / "data")
    assert result["splits"]["train"] == {"n": 12, "per_class": {"a": 6, "b": 6}}
    assert result["splits"]["test"] == {"n": 14, "per_class": {"a": 7, "b": 7}}
    assert result["files"] == 27 == 12 + 14 + len(result["unreadable"])
    assert [Path(item["file"]).name for item in result["unreadable"]] == ["broken.png"]
    assert [Path(item["file"]).name for item in result["source_skipped"]] == [".DS_Store"]
    duplicates = result["duplicates"]
    found = {entry["b"]["id"]: (entry["a"]["id"], entry["kind"]) for entry in duplicates["cross_split"]}
    assert found == {"test/a/copy of 2.png": ("train/a/2.png", "exact"),
                     "test/b/reencoded.jpg": ("train/b/3.png", "near")}
    assert duplicates["exact"][0]["cross_split"] and not duplicates["exact"][0]["conflicting_labels"]
    assert duplicates["counts"] == {
        "exact_groups": 1, "exact_images": 2, "near_pairs": 1, "cross_split_pairs": 2, "cross_split_exact_pairs": 1,
        "conflicting_label_groups": 0,
    }
    assert leaked_ids(result) == set(planted)
    assert result["sizes"]["most_common"] == {"96x96": 26} and result["modes"] == {"L": 26}
    json.dumps(result)  # JSON-ready


def test_check_data_command_prints_json_and_writes_the_report(tmp_path, capsys):
    _leaky_folder(tmp_path / "data")
    assert main(["check-data", str(tmp_path / "data"), "--json", "--out", str(tmp_path / "report.json")]) == 0
    printed = json.loads(capsys.readouterr().out)
    written = json.loads((tmp_path / "report.json").read_text())
    assert printed["duplicates"]["counts"] == written["duplicates"]["counts"]
    assert printed["duplicates"]["counts"]["cross_split_pairs"] == 2
    assert main(["check-data", str(tmp_path / "data")]) == 0
    table = capsys.readouterr().out
    assert "CROSS-SPLIT" in table and "copy of 2.png" in table


# -- training ------------------------------------------------------------------------------------------------------
def test_training_records_the_check_warns_about_leaks_and_can_drop_them(tmp_path):
    from conftest import make_synthetic_npz

    path = make_synthetic_npz(tmp_path / "leaky.npz", size=28, per_class=24)
    arrays = dict(np.load(path))
    arrays["test_images"][:3] = arrays["train_images"][[0, 5, 30]]  # copied from train
    arrays["test_labels"][:3] = arrays["train_labels"][[0, 5, 30]]
    np.savez(path, **arrays)
    assert main(["train", "--data", str(path), "--out", str(tmp_path), "--name", "run", "--epochs", "1",
                 "--size", "28", "--set", "train.batch_size=32", "--set", "train.threads=1",
                 "--set", "explain.per_outcome=1", "--set", "data.drop_test_duplicates=true",
                 "--set", "data.min_val_size=0"]) == 0
    check = json.loads((tmp_path / "run" / "data_check.json").read_text())
    for key in ("source", "fingerprint", "label_names", "splits", "unreadable", "source_skipped", "duplicates",
                "sizes", "modes"):
        assert key in check, key
    assert check["splits"]["test"]["n"] == 24 and check["splits"]["train"]["n"] == 48
    pairs = {(entry["a"]["id"], entry["b"]["id"]) for entry in check["duplicates"]["cross_split"]}
    assert pairs == {("leaky/train/0", "leaky/test/0"), ("leaky/train/5", "leaky/test/1"),
                     ("leaky/train/30", "leaky/test/2")}
    assert check["dropped_from_test"] == ["leaky/test/0", "leaky/test/1", "leaky/test/2"]
    assert check["sizes"]["most_common"] == {"28x28": 96}
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["test"]["n"] == 21  # 24 - 3 dropped before evaluation


# -- real data -----------------------------------------------------------------------------------------------------
@pytest.fixture
def recorded_searches(monkeypatch) -> list[tuple[np.ndarray, int, list]]:
    """Every near-duplicate search the checks run, as ``(hashes, threshold, pairs found)``."""
    searches = []
    search = check_module.near_duplicate_pairs

    def recording(hashes, threshold, *args, **kwargs):
        pairs = search(hashes, threshold, *args, **kwargs)
        searches.append((np.array(hashes, copy=True), threshold, pairs))
        return pairs

    monkeypatch.setattr(check_module, "near_duplicate_pairs", recording)
    return searches


@pytest.mark.realdata
def test_pneumoniamnist_findings_are_those_of_the_all_pairs_search(data_dir, recorded_searches, monkeypatch):
    """Same findings as the all-pairs search the index replaced, on real radiographs (whose pHash bits are
    correlated): the pairs over the hashes ``check_data`` computed, at the default and other thresholds, and the
    whole duplicate report."""
    path = data_dir / "medmnist" / "pneumoniamnist.npz"
    result = check_data(path)
    [(hashes, threshold, pairs)] = recorded_searches
    assert len(hashes) == 5856 and threshold == NEAR_DUPLICATE_BITS
    assert pairs == _near_duplicate_pairs_brute(hashes, threshold)
    assert len(pairs) == 31  # measured: the pairs of the 27 groups of pixel-identical images, nothing else
    for other in (8, 40):
        assert near_duplicate_pairs(hashes, other) == _near_duplicate_pairs_brute(hashes, other), other
    counts = result["duplicates"]["counts"]
    # Measured on the official file (md5 28209eda...): 10 train images copied into val or test.
    assert counts["cross_split_exact_pairs"] == counts["cross_split_pairs"] == 10
    assert counts["exact_groups"] == 27 and counts["near_pairs"] == 0

    monkeypatch.setattr(check_module, "near_duplicate_pairs", _near_duplicate_pairs_brute)
    assert check_data(path)["duplicates"] == result["duplicates"]


@pytest.mark.realdata
def test_kermany_has_no_cross_split_duplicates(data_dir, recorded_searches):
    started = time.perf_counter()
    result = check_data(data_dir / "chest_xray_kermany_224")
    seconds = time.perf_counter() - started
    [(hashes, threshold, pairs)] = recorded_searches
    assert pairs == _near_duplicate_pairs_brute(hashes, threshold)  # what the all-pairs search found
    assert result["files"] == 5840 and not result["unreadable"]
    assert result["splits"]["test"]["n"] == 624 and result["splits"]["train"]["n"] == 5216
    counts = result["duplicates"]["counts"]
    assert counts["cross_split_pairs"] == 0 and not result["duplicates"]["cross_split"]
    # Measured: 30 groups of pixel-identical images inside the official train split, no near duplicates.
    assert counts["exact_groups"] == 30 and counts["near_pairs"] == 0
    assert result["sizes"]["most_common"] == {"224x224": 5840}
    assert seconds < 60, f"check-data took {seconds:.0f} s on 5,840 images"


@pytest.mark.realdata
def test_test_files_copied_from_train_are_each_reported(data_dir, tmp_path):
    """A folder whose test split holds exact copies, re-encoded copies and the ORIGINAL-resolution files of train
    images (chest_xray_fullres_sample holds the originals of train images of the 224 px set), beside genuine test
    images: every planted copy is found with its train partner, and nothing else."""
    kermany = data_dir / "chest_xray_kermany_224"
    fullres = data_dir / "chest_xray_fullres_sample"
    root = tmp_path / "leaky"
    planted = {}
    for label in ("NORMAL", "PNEUMONIA"):
        (root / "train" / label).mkdir(parents=True)
        (root / "test" / label).mkdir(parents=True)
        originals = sorted(path.name for path in (fullres / label).glob("*.jpeg"))[:4]
        others = [path.name for path in sorted((kermany / "train" / label).iterdir()) if path.name not in originals]
        train_names = others[:60] + originals
        for name in train_names:
            os.symlink(kermany / "train" / label / name, root / "train" / label / name)
        for name in sorted(path.name for path in (kermany / "test" / label).iterdir())[:10]:
            os.symlink(kermany / "test" / label / name, root / "test" / label / name)
        for name in train_names[:3]:  # exact copies under new names
            shutil.copy(kermany / "train" / label / name, root / "test" / label / f"copy_{name}")
            planted[f"test/{label}/copy_{name}"] = f"train/{label}/{name}"
        for name in train_names[10:13]:  # re-encoded at another JPEG quality and size
            image = Image.open(kermany / "train" / label / name).resize((200, 200))
            image.save(root / "test" / label / f"reencoded_{name}", quality=60)
            planted[f"test/{label}/reencoded_{name}"] = f"train/{label}/{name}"
        for name in originals:  # the original-resolution file of a 224 px train image
            shutil.copy(fullres / label / name, root / "test" / label / f"original_{name}")
            planted[f"test/{label}/original_{name}"] = f"train/{label}/{name}"
    result = check_data(root)
    found = {}
    for entry in result["duplicates"]["cross_split"]:
        found.setdefault(entry["b"]["id"], set()).add(entry["a"]["id"])
    assert found == {test_id: {train_id} for test_id, train_id in planted.items()}
    assert leaked_ids(result) == set(planted)


@pytest.mark.realdata
def test_hashing_a_28_px_medmnist_dataset_is_cheap(data_dir):
    from medxai.config import PreprocessConfig
    from medxai.data import open_source
    from medxai.data.prepared import prepare_split
    from medxai.data.preprocess import Preprocessor

    source = open_source(data_dir / "medmnist" / "pneumoniamnist.npz")
    preprocessor = Preprocessor(PreprocessConfig(size=28))
    prepared = {split: prepare_split(source, source.records(split), preprocessor) for split in ("train", "val", "test")}
    started = time.perf_counter()
    result = check_prepared(source, prepared)
    seconds = time.perf_counter() - started
    assert sum(split["n"] for split in result["splits"].values()) == 5856
    # Measured on the official file (md5 28209eda...): 10 pixel-identical images shared between splits.
    assert result["duplicates"]["counts"]["cross_split_exact_pairs"] == 10
    assert seconds < 5, f"training-time data check took {seconds:.1f} s"

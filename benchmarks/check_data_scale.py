"""Scale of the data check: ``check_data`` on 100,000 synthetic images, and its near-duplicate search against the
all-pairs comparison it replaced.

    python benchmarks/check_data_scale.py                      # 100,000 images, the default threshold
    python benchmarks/check_data_scale.py --count 20000 --no-write   # a quick look

Protocol:

1. Synthetic data, MedMNIST-style: ``--count`` grey ``--side`` px images (uint8), each a random 1/f^1.5 field
   (natural-image statistics, as the tests' ``smooth_image``) blended with one shared field (a common "anatomy",
   weight 0 to 0.4, so that pHash bits are correlated across images as they are across radiographs), split 80/10/10
   into train/val/test with random binary labels and written as one ``.npz`` (a temporary file). Planted: 1% of
   the images are pixel copies of train images placed in val or test, 0.5% copies inside train, and 1% edited
   copies of train images placed in val or test (brightness +8, contrast x0.9, Gaussian noise sigma 3, JPEG
   quality 75).
2. Full check: ``medxai.data.check.check_data(npz)``, the function ``medxai check-data`` runs (reading the file,
   decoding, SHA-256 and pHash of every image, exact groups, the near-duplicate index and verification, the
   report), timed once; the planted pairs it finds (recall) and the near pairs it reports besides them.
3. Near-duplicate search alone, on the pHashes of the same images (``perceptual_hashes``, the hash ``check_data``
   computes): ``near_duplicate_pairs`` (multi-index hashing) on all of them and on subsets of 2,500 to
   ``--brute-max`` hashes (each holding both images of size/8 planted pairs, the rest drawn at random), and the
   previous all-pairs search (``_near_duplicate_pairs_brute``, a blockwise matrix product) on the same subsets
   only; the two results are compared pair for pair. The all-pairs time at ``--count`` is EXTRAPOLATED
   quadratically from the largest measured subset (its cost is ``n^2`` by construction), not measured.

Prints one JSON object and writes ``benchmarks/results/check_data_scale.json`` (unless ``--no-write``), with the
machine (processor, cores, torch threads, load average at the start: the machine may be shared).
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from medxai.config import DataConfig
from medxai.data.check import (
    _near_duplicate_pairs_brute,
    _substring_plan,
    check_data,
    near_duplicate_pairs,
    perceptual_hashes,
)

RESULTS = Path(__file__).parent / "results"
SPLIT_SHARES = {"train": 0.8, "val": 0.1, "test": 0.1}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=100_000, help="synthetic images in all")
    parser.add_argument("--side", type=int, default=64, help="image side in pixels")
    parser.add_argument("--threshold", type=int, default=DataConfig().near_duplicate_bits,
                        help="near-duplicate threshold in bits (default: the project's)")
    parser.add_argument("--brute-max", type=int, default=20_000,
                        help="largest prefix the all-pairs search is run on (beyond: extrapolated)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(RESULTS / "check_data_scale.json"))
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument("--note", help="free text stored with the results (machine, load, caveats)")
    return parser


# -- synthetic data -------------------------------------------------------------------------------------------------
def random_fields(count: int, side: int, rng: np.random.Generator) -> np.ndarray:
    """``(count, side, side)`` float32 random fields with a 1/f^1.5 amplitude spectrum, each scaled to [0, 1]."""
    frequency = np.sqrt(np.fft.fftfreq(side)[:, None] ** 2 + np.fft.rfftfreq(side)[None, :] ** 2)
    amplitude = 1.0 / np.maximum(frequency, 1.0 / side) ** 1.5
    phases = np.exp(2j * np.pi * rng.random((count, *amplitude.shape)))
    field = np.fft.irfft2(amplitude * phases, s=(side, side)).astype(np.float32)
    low = field.min(axis=(1, 2), keepdims=True)
    return (field - low) / (field.max(axis=(1, 2), keepdims=True) - low)


def synthetic_images(count: int, side: int, rng: np.random.Generator, chunk: int = 4096) -> np.ndarray:
    """``(count, side, side)`` uint8: random fields blended with one shared field (weight 0 to 0.4)."""
    template = random_fields(1, side, rng)
    images = np.empty((count, side, side), dtype=np.uint8)
    for start in range(0, count, chunk):
        size = min(chunk, count - start)
        weights = rng.uniform(0.0, 0.4, size=(size, 1, 1)).astype(np.float32)
        blended = weights * template + (1 - weights) * random_fields(size, side, rng)
        images[start : start + size] = (blended * 220 + 20).astype(np.uint8)
    return images


def edited_copy(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A near duplicate: brighter, lower contrast, noisy and JPEG re-encoded."""
    changed = (image.astype(np.float32) - 128) * 0.9 + 128 + 8 + rng.normal(0, 3, image.shape)
    buffer = io.BytesIO()
    Image.fromarray(np.clip(changed, 0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=75)
    return np.asarray(Image.open(io.BytesIO(buffer.getvalue())))


def synthetic_dataset(count: int, side: int, seed: int) -> tuple[dict[str, np.ndarray], dict[str, list]]:
    """The images of every split and the planted pairs ``{"exact_cross", "exact_train", "near_cross"}``, each a list
    of ``(train index, (split, index))``."""
    rng = np.random.default_rng(seed)
    images = synthetic_images(count, side, rng)
    sizes = {"train": int(count * SPLIT_SHARES["train"]), "val": int(count * SPLIT_SHARES["val"])}
    sizes["test"] = count - sizes["train"] - sizes["val"]
    splits, start = {}, 0
    for split, size in sizes.items():
        splits[split] = images[start : start + size]
        start += size

    held_out = [(split, index) for split in ("val", "test") for index in range(sizes[split])]
    held_out = [held_out[position] for position in rng.permutation(len(held_out))]
    train_order = rng.permutation(sizes["train"])
    exact_cross, near_cross, exact_train = count // 100, count // 100, count // 200
    sources = train_order[: exact_cross + near_cross + exact_train]  # distinct train images, never overwritten
    train_targets = train_order[len(sources) : len(sources) + exact_train]
    planted: dict[str, list] = {"exact_cross": [], "near_cross": [], "exact_train": []}
    for number, source in enumerate(sources[:exact_cross]):
        split, index = held_out[number]
        splits[split][index] = splits["train"][source]
        planted["exact_cross"].append((int(source), (split, index)))
    for number, source in enumerate(sources[exact_cross : exact_cross + near_cross]):
        split, index = held_out[exact_cross + number]
        splits[split][index] = edited_copy(splits["train"][source], rng)
        planted["near_cross"].append((int(source), (split, index)))
    for source, target in zip(sources[exact_cross + near_cross :], train_targets):
        splits["train"][target] = splits["train"][source]
        planted["exact_train"].append((int(source), ("train", int(target))))
    return splits, planted


def write_npz(path: Path, splits: dict[str, np.ndarray], seed: int) -> None:
    rng = np.random.default_rng(seed + 1)
    arrays = {}
    for split, images in splits.items():
        arrays[f"{split}_images"] = images
        arrays[f"{split}_labels"] = rng.integers(0, 2, size=(len(images), 1)).astype(np.uint8)
    np.savez(path, **arrays)


# -- measurements ---------------------------------------------------------------------------------------------------
def timed(function, *args, **kwargs):
    started = time.perf_counter()
    value = function(*args, **kwargs)
    return value, round(time.perf_counter() - started, 3)


def planted_recall(result: dict, planted: dict[str, list], stem: str) -> dict:
    """How many planted pairs the check reports: cross-split ones among its cross-split pairs, within-train copies
    among its exact groups."""
    def identifier(split: str, index: int) -> str:
        return f"{stem}/{split}/{index}"

    duplicates = result["duplicates"]
    cross = {(entry["a"]["id"], entry["b"]["id"]): entry["kind"] for entry in duplicates["cross_split"]}
    grouped = {}
    for number, group in enumerate(duplicates["exact"]):
        for item in group["items"]:
            grouped[item["id"]] = number
    recall = {}
    for kind in ("exact_cross", "near_cross"):
        expected = "exact" if kind.startswith("exact") else "near"
        pairs = [(identifier("train", source), identifier(*target)) for source, target in planted[kind]]
        recall[kind] = {"planted": len(pairs), "found": sum(cross.get(pair) == expected for pair in pairs)}
    within = planted["exact_train"]
    recall["exact_train"] = {
        "planted": len(within),
        "found": sum(grouped.get(identifier("train", source), -1) == grouped.get(identifier(*target), -2)
                     for source, target in within),
    }
    recall["listing_truncated"] = duplicates["truncated"]
    return recall


def planted_global_pairs(planted: dict[str, list], splits: dict[str, np.ndarray]) -> np.ndarray:
    """The planted pairs as ``(K, 2)`` indices into the images of all splits concatenated (train, val, test)."""
    offsets = {"train": 0, "val": len(splits["train"]), "test": len(splits["train"]) + len(splits["val"])}
    return np.array([(source, offsets[split] + index)
                     for pairs in planted.values() for source, (split, index) in pairs])


def comparison_subset(size: int, count: int, pairs: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``size`` image indices: both images of ``size // 8`` planted pairs, the rest drawn at random."""
    chosen = np.unique(pairs[rng.permutation(len(pairs))[: size // 8]].ravel())
    others = np.setdiff1d(np.arange(count), chosen)
    return np.sort(np.concatenate([chosen, rng.choice(others, size - len(chosen), replace=False)]))


def search_comparison(hashes: np.ndarray, threshold: int, brute_max: int, pairs: np.ndarray, seed: int) -> dict:
    """Index and all-pairs search on subsets of the hashes (each holding planted pairs), the index alone on all."""
    rng = np.random.default_rng(seed + 2)
    sizes = [size for size in (2_500, 5_000, 10_000, 20_000, 40_000) if size <= min(brute_max, len(hashes))]
    rows = []
    for size in sizes:
        subset = hashes[comparison_subset(size, len(hashes), pairs, rng)]
        index_pairs, index_seconds = timed(near_duplicate_pairs, subset, threshold)
        brute_pairs, brute_seconds = timed(_near_duplicate_pairs_brute, subset, threshold)
        rows.append({"n": size, "index_seconds": index_seconds, "brute_force_seconds": brute_seconds,
                     "pairs": len(index_pairs), "identical_to_brute_force": index_pairs == brute_pairs})
    plan = _substring_plan(len(hashes), hashes.shape[1] * 8, threshold)
    full_pairs, full_seconds = timed(near_duplicate_pairs, hashes, threshold)
    comparison = {
        "method": "multi-index hashing (Norouzi, Punjani & Fleet 2012/2014), exact",
        "index_plan": None if plan is None else {
            "substrings_searched": len(plan),
            "substring_bits": sorted({len(positions) for positions, _ in plan}),
            "substrings_per_radius": {str(radius): sum(1 for _, other in plan if other == radius)
                                      for radius in sorted({radius for _, radius in plan})},
        },
        "subsets_measured": rows,
        "n": len(hashes), "index_seconds": full_seconds, "pairs": len(full_pairs),
    }
    if rows:
        largest = rows[-1]
        factor = (len(hashes) / largest["n"]) ** 2
        comparison["brute_force_seconds_extrapolated"] = round(largest["brute_force_seconds"] * factor, 1)
        comparison["brute_force_extrapolation"] = (
            f"NOT measured at n={len(hashes)}: {largest['brute_force_seconds']} s measured at n={largest['n']} "
            f"x ({len(hashes)}/{largest['n']})^2"
        )
        if len(rows) >= 2:
            previous = rows[-2]
            comparison["brute_force_measured_exponent"] = round(
                np.log(largest["brute_force_seconds"] / previous["brute_force_seconds"])
                / np.log(largest["n"] / previous["n"]), 2)
        if len(hashes) > largest["n"]:
            comparison["index_measured_exponent"] = round(
                np.log(full_seconds / max(largest["index_seconds"], 1e-3)) / np.log(len(hashes) / largest["n"]), 2)
        comparison["speedup_vs_brute_force_extrapolated"] = round(
            comparison["brute_force_seconds_extrapolated"] / max(full_seconds, 1e-3), 1)
    return comparison


def machine() -> dict:
    return {
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_at_start": [round(value, 2) for value in os.getloadavg()],
        "python": sys.version.split()[0],
        "numpy": np.__version__,
        "torch": torch.__version__,
    }


def main(argv: list[str] | None = None) -> int:
    arguments = build_parser().parse_args(argv)
    report = {"command": "python benchmarks/check_data_scale.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "date": datetime.date.today().isoformat(), "machine": machine(), "count": arguments.count,
              "side": arguments.side, "threshold": arguments.threshold, "seed": arguments.seed}
    if arguments.note:
        report["note"] = arguments.note
    (splits, planted), report["generate_seconds"] = timed(
        synthetic_dataset, arguments.count, arguments.side, arguments.seed)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "synthetic_scale.npz"
        _, report["write_npz_seconds"] = timed(write_npz, path, splits, arguments.seed)
        result, full_seconds = timed(check_data, path, near_threshold=arguments.threshold)
    report["full_check"] = {
        "function": "medxai.data.check.check_data(npz) (what `medxai check-data FILE.npz` runs)",
        "seconds": full_seconds,
        "images_per_second": round(arguments.count / full_seconds, 1),
        "counts": result["duplicates"]["counts"],
        "planted_found": planted_recall(result, planted, path.stem),
    }
    images = np.concatenate([splits[split] for split in ("train", "val", "test")])
    hashes, report["phash_batch_seconds"] = timed(perceptual_hashes, torch.from_numpy(images))
    search = search_comparison(hashes, arguments.threshold, arguments.brute_max,
                               planted_global_pairs(planted, splits), arguments.seed)
    report["near_duplicate_search"] = search
    if "brute_force_seconds_extrapolated" in search:
        report["full_check"]["with_brute_force_seconds_extrapolated"] = round(
            full_seconds - search["index_seconds"] + search["brute_force_seconds_extrapolated"], 1)
    text = json.dumps(report, indent=2)
    print(text)
    if not arguments.no_write:
        Path(arguments.out).parent.mkdir(parents=True, exist_ok=True)
        Path(arguments.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

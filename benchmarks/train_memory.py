"""Peak memory of ``medxai train`` as the dataset grows: generated 64 px folders of 10,000 and 100,000 images.

Generates grey PNGs in two class folders (a bright blob left or right on smooth noise) once into ``--images-dir``,
then runs ``python -m medxai train`` on the first N of each class for every N of ``--counts`` (one epoch of
``simple_cnn`` at 64 px, the on-disk cache in a fresh folder, so the run decodes, caches, trains, evaluates and
reports), sampling the resident memory of the process and its decoding workers every 50 ms. Reported per run:
peak RSS (children included: pages the processes share, such as PyTorch's libraries, count once per process), peak
PSS (the same sum with shared pages divided among their processes: the memory the job really holds), peak anonymous RSS of the main process (``RssAnon``: memory that is not the page
page cache's view of files), wall seconds, and the cache's size on disk.

Example:
    python benchmarks/train_memory.py --counts 10000,100000
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
from PIL import Image

RESULTS = Path(__file__).parent / "results"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--counts", default="10000,100000", help="comma-separated total numbers of images")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--images-dir", default=str(Path(tempfile.gettempdir()) / "medxai-train-memory"))
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="extra medxai train --set")
    parser.add_argument("--out", default=str(RESULTS / "train_memory.json"))
    return parser


def generate(folder: Path, count: int, size: int) -> Path:
    """``count`` PNGs split over ``folder/{left,right}`` (kept between runs); a folder of the first ``count``
    is linked under ``folder/../<count>``."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size]
    for label, column in (("left", size // 4), ("right", 3 * size // 4)):
        (folder / label).mkdir(parents=True, exist_ok=True)
        for index in range(count // 2):
            path = folder / label / f"{index:06d}.png"
            if path.is_file():
                continue
            row = rng.integers(size // 4, 3 * size // 4)
            blob = 120 * np.exp(-((yy - row) ** 2 + (xx - column) ** 2) / (2 * (size / 10) ** 2))
            noise = rng.integers(0, 90, size=(size, size))
            Image.fromarray(np.clip(blob + noise, 0, 255).astype(np.uint8)).save(path, compress_level=1)
    subset = folder.parent / f"{folder.name}-{count}"
    if not subset.is_dir():
        for label in ("left", "right"):
            (subset / label).mkdir(parents=True)
            for index in range(count // 2):
                os.symlink(folder / label / f"{index:06d}.png", subset / label / f"{index:06d}.png")
    return subset


def _anon_rss(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def measure(command: list[str], env: dict[str, str]) -> dict:
    started = time.perf_counter()
    process = psutil.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    peak = peak_anon = peak_pss = 0
    while process.poll() is None:
        try:
            family = [process, *process.children(True)]
            rss = sum(member.memory_info().rss for member in family)
            pss = sum(member.memory_full_info().pss for member in family)
        except psutil.Error:
            break
        peak, peak_anon, peak_pss = max(peak, rss), max(peak_anon, _anon_rss(process.pid)), max(peak_pss, pss)
        time.sleep(0.05)
    code = process.wait()
    error = process.stderr.read().decode()[-3000:]
    if code != 0:
        sys.stderr.write(error)
    return {"exit_code": code, "peak_rss_gb": round(peak / 1e9, 3), "peak_pss_gb": round(peak_pss / 1e9, 3), "peak_anon_rss_main_gb": round(peak_anon / 1e9, 3),
            "seconds": round(time.perf_counter() - started, 1)}


def main() -> None:
    arguments = build_parser().parse_args()
    counts = [int(value) for value in arguments.counts.split(",")]
    folder = Path(arguments.images_dir) / f"png{arguments.size}"
    rows = []
    for count in counts:
        data = generate(folder, count, arguments.size)
        work = Path(tempfile.mkdtemp(prefix="medxai-train-memory-"))
        env = {**os.environ, "MEDXAI_CACHE_DIR": str(work / "cache"), "MEDXAI_OFFLINE": "1"}
        command = [sys.executable, "-m", "medxai", "train", "--data", str(data), "--model", "simple_cnn",
                   "--size", str(arguments.size), "--epochs", "1", "--batch-size", "128", "--out", str(work),
                   "--name", "run", "--positive-label", "right", "--set", "data.val_fraction=0.05", "--set", "data.test_fraction=0.05",
                   "--set", "train.bootstrap_resamples=100", *[part for item in arguments.overrides for part in ("--set", item)]]
        row = {"images": count, "size": arguments.size, **measure(command, env)}
        row["cache_gb"] = round(sum(path.stat().st_size for path in (work / "cache").rglob("*") if path.is_file())
                                / 1e9, 3)
        print(json.dumps(row), flush=True)
        rows.append(row)
        shutil.rmtree(work, ignore_errors=True)
    document = {"machine": {"platform": platform.platform(), "cores": len(os.sched_getaffinity(0)),
                            "memory_gb": round(psutil.virtual_memory().total / 1e9, 1)},
                "command": "python -m medxai train --data <generated folder> --model simple_cnn --size 64 "
                           "--epochs 1 --batch-size 128", "rows": rows}
    Path(arguments.out).parent.mkdir(parents=True, exist_ok=True)
    Path(arguments.out).write_text(json.dumps(document, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""Peak memory and rate of ``medxai predict`` and ``medxai explain`` over folders of large images.

Generates grey 2048 x 2048 JPEGs (smooth random structure, like radiographs in size, not content) once into
``--images-dir``, then runs each job as its own process (``python -m medxai ...``) on the first N of them for every N
of ``--counts`` and samples the process's resident memory (RSS, psutil, every 50 ms) until it ends. Memory that
does not grow with N is what streaming means; the rate is images per second of the whole command (start-up
included).

Prints one JSON object per run and writes them to ``--out`` (default ``benchmarks/results/batch_memory.json``).

Example:
    python benchmarks/batch_memory.py runs/demo --job explain --counts 100,400
    python benchmarks/batch_memory.py runs/demo --job predict --counts 200,2000
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
    parser.add_argument("run", help="run folder")
    parser.add_argument("--job", choices=["predict", "explain"], default="explain")
    parser.add_argument("--counts", default="100,400", help="comma-separated numbers of images")
    parser.add_argument("--size", type=int, default=2048, help="image side in pixels")
    parser.add_argument("--images-dir", default=str(Path(tempfile.gettempdir()) / "medxai-batch-memory"),
                        help="where the generated JPEGs are kept between runs")
    parser.add_argument("--out", default=None, help="JSON file (default benchmarks/results/batch_memory.json)")
    return parser


def generate(folder: Path, count: int, size: int) -> list[Path]:
    """``count`` JPEGs of ``size`` px in ``folder`` (those already there are reused)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for index in range(count):
        path = folder / f"image_{size}_{index:06d}.jpg"
        if not path.is_file():
            coarse = rng.random((size // 64, size // 64)).astype(np.float32)
            image = Image.fromarray((coarse * 255).astype(np.uint8)).resize((size, size), Image.BICUBIC)
            noise = rng.integers(0, 24, size=(size, size), dtype=np.uint8)
            Image.fromarray(np.clip(np.asarray(image, dtype=np.int16) + noise, 0, 255).astype(np.uint8)).save(
                path, quality=90)
        paths.append(path)
    return paths


def peak_rss(command: list[str]) -> tuple[int, float, int]:
    """Run ``command``; its peak RSS in bytes (children included), wall seconds and exit code."""
    started = time.perf_counter()
    process = psutil.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = 0
    while process.poll() is None:
        try:
            rss = process.memory_info().rss + sum(child.memory_info().rss for child in process.children(True))
        except psutil.Error:
            break
        peak = max(peak, rss)
        time.sleep(0.05)
    code = process.wait()
    if code != 0:
        sys.stderr.write(process.stderr.read().decode()[-3000:])
    return peak, time.perf_counter() - started, code


def main(argv: list[str] | None = None) -> int:
    arguments = build_parser().parse_args(argv)
    counts = [int(value) for value in arguments.counts.split(",")]
    images = generate(Path(arguments.images_dir), max(counts), arguments.size)
    machine = {"cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
               "platform": platform.platform(), "memory_gb": round(psutil.virtual_memory().total / 2**30, 1)}
    rows = []
    for count in counts:
        with tempfile.TemporaryDirectory(prefix="medxai-batch-") as scratch:
            folder = Path(scratch) / "in"
            folder.mkdir()
            for path in images[:count]:
                os.symlink(path, folder / path.name)
            out = Path(scratch) / "out"
            command = [sys.executable, "-m", "medxai", arguments.job, arguments.run, str(folder), "--out", str(out),
                       "--device", "cpu"]
            peak, seconds, code = peak_rss(command)
            written = len(list(out.glob("*.png"))) if arguments.job == "explain" else None
            rows.append({"job": arguments.job, "images": count, "size": arguments.size, "peak_rss_gb":
                         round(peak / 2**30, 3), "seconds": round(seconds, 1), "img_per_s": round(count / seconds, 2),
                         "exit_code": code, "overlays_written": written, "run": Path(arguments.run).name,
                         "machine": machine})
            print(json.dumps(rows[-1]), flush=True)
            shutil.rmtree(out, ignore_errors=True)
    out_path = Path(arguments.out) if arguments.out else RESULTS / "batch_memory.json"
    previous = json.loads(out_path.read_text()) if out_path.is_file() else []
    kept = [row for row in previous if row.get("job") != arguments.job]
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(kept + rows, indent=2) + "\n")
    return 0 if all(row["exit_code"] == 0 for row in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())

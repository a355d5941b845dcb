"""Resident memory of a real ``medxai serve`` under many concurrent clients: how much it grows, and whether it levels
off.

Starts ``medxai serve RUN`` in its own process as ``serve_load.py`` does (127.0.0.1, a free port, its own audit
database, no cap per client address since every caller comes from this one; ``--serve-arg`` adds options, e.g.
``--serve-arg=--worker-threads=40``), waits for ``/readyz``, records the
server's RSS (and its thread count), then sends ``--requests`` requests to ``--endpoint`` from ``--concurrency``
concurrent callers (an asyncio httpx client, one connection each), sampling the server's RSS after every
``--requests / 8`` answers, and stops the server. The inputs (``--images``, default the 40 full-resolution Kermany
chest X-rays of ``chest_xray_fullres_sample`` under ``MEDXAI_DATA_DIR``, 399-2890 px JPEGs) are sent in turn: large
decodes and large overlays are what the allocator has to hold.

Bounded in count (``--requests``) and time (``--max-seconds``); the server is always stopped. Prints one JSON object
and appends it to ``--out`` (default ``benchmarks/results/serve_memory.json``) under ``--label``.

Example (the figures of docs/serve.md):
    python benchmarks/serve_memory.py runs/demo --label "bounded workers" --endpoint predict
    python benchmarks/serve_memory.py runs/demo --label "40 threads, glibc's arenas" --endpoint predict \
        --serve-arg=--worker-threads=40 --serve-arg=--malloc-arenas=0
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
from serve_load import Server  # the same server process: loopback, a free port, its own audit database

RESULTS = Path(__file__).parent / "results"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="run folder")
    parser.add_argument("--label", required=True, help="what this measurement is (kept in the results file)")
    parser.add_argument("--endpoint", default="predict", choices=["predict", "explain"])
    parser.add_argument("--requests", type=int, default=1280)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--images", nargs="+", help="files to send (default: the full-resolution chest X-rays)")
    parser.add_argument("--max-seconds", type=float, default=420.0)
    parser.add_argument("--serve-arg", action="append", default=[], help="an extra `medxai serve` option")
    parser.add_argument("--original", action="store_true",
                        help="the server is the code before issue 17 (it has no --max-connections-per-client)")
    parser.add_argument("--out", default=str(RESULTS / "serve_memory.json"))
    return parser


def default_images() -> list[Path]:
    data = os.environ.get("MEDXAI_DATA_DIR")
    if not data:
        raise SystemExit("give --images or set MEDXAI_DATA_DIR (its chest_xray_fullres_sample is used)")
    files = sorted((Path(data) / "chest_xray_fullres_sample").rglob("*.jpeg"))
    if not files:
        raise SystemExit(f"no JPEGs under {data}/chest_xray_fullres_sample")
    return files


def megabytes(process: psutil.Process) -> float:
    return round(process.memory_info().rss / 2**20, 1)


async def load(url: str, endpoint: str, payloads: list[bytes], requests: int, concurrency: int, deadline: float,
               sample) -> dict[str, int]:
    """``requests`` requests from ``concurrency`` callers; statuses counted; ``sample()`` every eighth of them."""
    statuses: dict[str, int] = {}
    issued = answered = 0
    every = max(1, requests // 8)

    async def caller(client: httpx.AsyncClient) -> None:
        nonlocal issued, answered
        while issued < requests and time.monotonic() < deadline:
            index = issued
            issued += 1
            try:
                response = await client.post(f"/v1/{endpoint}", files={"file": ("x", payloads[index % len(payloads)])})
                status = str(response.status_code)
            except httpx.HTTPError as error:
                status = type(error).__name__
            statuses[status] = statuses.get(status, 0) + 1
            answered += 1
            if answered % every == 0:
                sample(answered)

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:
        await asyncio.gather(*(caller(client) for _ in range(concurrency)))
    return statuses


def measure(arguments: argparse.Namespace) -> dict[str, Any]:
    images = [Path(path) for path in arguments.images] if arguments.images else default_images()
    payloads = [path.read_bytes() for path in images]
    with Server(arguments.run, arguments.serve_arg, "cpu", original=arguments.original) as server:
        process = psutil.Process(server.process.pid)
        ready_mb = megabytes(process)
        samples: list[dict[str, Any]] = []

        def sample(answered: int) -> None:
            samples.append({"answered": answered, "rss_mb": megabytes(process), "threads": process.num_threads()})

        started = time.monotonic()
        statuses = asyncio.run(load(server.url, arguments.endpoint, payloads, arguments.requests,
                                    arguments.concurrency, started + arguments.max_seconds, sample))
        wall = time.monotonic() - started
        sample(sum(statuses.values()))
    peak = max(row["rss_mb"] for row in samples)
    return {
        "label": arguments.label, "endpoint": arguments.endpoint, "requests": sum(statuses.values()),
        "concurrency": arguments.concurrency, "statuses": statuses, "wall_s": round(wall, 1),
        "serve_args": arguments.serve_arg,
        "rss_ready_mb": ready_mb, "rss_peak_mb": peak, "rss_end_mb": samples[-1]["rss_mb"],
        "growth_mb": round(samples[-1]["rss_mb"] - ready_mb, 1), "peak_growth_mb": round(peak - ready_mb, 1),
        "samples": samples, "images": f"{len(images)} files, e.g. {images[0].name}",
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform()},
    }


def main(argv: list[str] | None = None) -> int:
    arguments = build_parser().parse_args(argv)
    result = measure(arguments)
    print(json.dumps(result), flush=True)
    out = Path(arguments.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    previous = json.loads(out.read_text()) if out.is_file() else []
    out.write_text(json.dumps([*previous, result], indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

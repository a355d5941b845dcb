"""Load on a real ``medxai serve``: latency percentiles, throughput and errors, with and without micro-batching.

For each run folder, each mode (``batched``: ``--max-batch 16 --max-wait-ms 10``, the defaults; ``unbatched``:
``--max-batch 1``) and each endpoint (predict, explain), the script starts ``medxai serve`` in its own process on
127.0.0.1 (a free port, its own audit database in a temporary folder), waits for ``/readyz``, and sends ``--requests``
requests at each concurrency of ``--concurrency`` from an asyncio httpx client in this process (one connection per
concurrent caller), then stops the server. With ``--onnx``, a run that has ``model.onnx`` (``medxai export``) is also
served with ``--backend onnxruntime`` and its predict throughput measured at the highest concurrency.

Inputs: the files of ``--images`` (default: the first 64 JPEGs of the Kermany test folder under ``MEDXAI_DATA_DIR``,
224 px chest X-rays), sent in turn. Every phase is bounded in count (``--requests``) and in time (``--max-seconds``,
after which it stops and reports what it did); the server is always stopped.

Latency is measured by the client (request sent to response read), so it includes HTTP, decoding, the batch wait,
the model, PNG encoding and JSON. Client and server share this machine's cores.

First, per run, the model ceiling: the service's engine in this process (no HTTP), at batch 1 and batch 16, which
bounds what micro-batching can gain on this machine.

Prints one JSON object per phase and writes them all to ``--out`` (default ``benchmarks/results/serve_load.json``).

Example:
    python benchmarks/serve_load.py runs/demo runs/kermany_resnet18_bench --onnx
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

MODES = {"batched": ["--max-batch", "16", "--max-wait-ms", "10"], "unbatched": ["--max-batch", "1"]}
RESULTS = Path(__file__).parent / "results"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="run folders")
    parser.add_argument("--requests", type=int, default=1000, help="requests per phase")
    parser.add_argument("--concurrency", default="1,4,16", help="comma-separated concurrent callers")
    parser.add_argument("--endpoints", default="predict,explain")
    parser.add_argument("--modes", default="batched,unbatched")
    parser.add_argument("--images", nargs="+", help="files to send (default: 64 Kermany test JPEGs)")
    parser.add_argument("--max-seconds", type=float, default=240.0, help="time limit of one phase")
    parser.add_argument("--onnx", action="store_true", help="also onnxruntime predict (runs with model.onnx)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--ceiling-only", action="store_true",
                        help="only the in-process model ceiling (no server, no HTTP)")
    parser.add_argument("--out", default=str(RESULTS / "serve_load.json"))
    return parser


def default_images() -> list[Path]:
    data = os.environ.get("MEDXAI_DATA_DIR")
    if not data:
        raise SystemExit("give --images or set MEDXAI_DATA_DIR (the Kermany test folder is used)")
    folder = Path(data) / "chest_xray_kermany_224" / "test"
    files = sorted(folder.rglob("*.jpeg"))[:32] + sorted(folder.rglob("*.jpeg"), reverse=True)[:32]
    if not files:
        raise SystemExit(f"no JPEGs under {folder}")
    return files


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Server:
    """``medxai serve`` in a child process on loopback, stopped on exit (SIGINT, then SIGKILL)."""

    def __init__(self, run: str, extra: list[str], device: str, *, original: bool = False) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.folder = tempfile.TemporaryDirectory(prefix="medxai-serve-load-")
        # every caller comes from this one address: no per-client cap (the code before issue 17 has none to lift)
        uncapped = [] if original else ["--max-connections-per-client", "0"]
        self.command = [sys.executable, "-m", "medxai", "serve", run, "--host", "127.0.0.1", "--port",
                        str(self.port), "--device", device, "--audit-db", str(Path(self.folder.name) / "audit.db"),
                        "--queue", "256", *uncapped, *extra]

    def __enter__(self) -> Server:  # noqa: PYI034
        self.process = subprocess.Popen(self.command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited: {self.process.stderr.read().decode()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.__exit__()
        raise RuntimeError("server not ready in 180 s")

    def __exit__(self, *exc_info: object) -> None:
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.folder.cleanup()


async def load(url: str, endpoint: str, payloads: list[bytes], requests: int, concurrency: int,
               max_seconds: float) -> dict[str, Any]:
    """``requests`` requests from ``concurrency`` callers; latencies of the successful ones, errors counted."""
    latencies: list[float] = []
    errors: dict[str, int] = {}
    issued = 0
    deadline = time.monotonic() + max_seconds

    async def caller(client: httpx.AsyncClient) -> None:
        nonlocal issued
        while issued < requests and time.monotonic() < deadline:
            index = issued
            issued += 1
            started = time.perf_counter()
            try:
                response = await client.post(f"/v1/{endpoint}",
                                             files={"file": ("x", payloads[index % len(payloads)])})
                status = str(response.status_code)
            except httpx.HTTPError as error:
                status = type(error).__name__
            if status == "200":
                latencies.append(time.perf_counter() - started)
            else:
                errors[status] = errors.get(status, 0) + 1

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        started = time.perf_counter()
        await asyncio.gather(*(caller(client) for _ in range(concurrency)))
        wall = time.perf_counter() - started
    latencies.sort()

    def percentile(share: float) -> float | None:
        if not latencies:
            return None
        return round(1000 * latencies[min(len(latencies) - 1, int(share * len(latencies)))], 2)

    return {"requests": issued, "ok": len(latencies), "errors": errors, "wall_s": round(wall, 2),
            "throughput_rps": round(len(latencies) / wall, 2), "p50_ms": percentile(0.50),
            "p95_ms": percentile(0.95), "p99_ms": percentile(0.99),
            "mean_ms": round(1000 * statistics.fmean(latencies), 2) if latencies else None,
            "stopped_by_time": issued < requests}


def main(argv: list[str] | None = None) -> int:
    arguments = build_parser().parse_args(argv)
    images = [Path(path) for path in arguments.images] if arguments.images else default_images()
    payloads = [path.read_bytes() for path in images]
    concurrencies = [int(value) for value in arguments.concurrency.split(",")]
    machine = {"cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
               "platform": platform.platform(), "device": arguments.device}
    results: list[dict[str, Any]] = []

    def report(row: dict[str, Any]) -> None:
        row = {**row, "machine": machine, "images": f"{len(images)} files, e.g. {images[0].name}"}
        results.append(row)
        print(json.dumps(row), flush=True)

    for run in arguments.runs:
        for row in model_ceiling(run, payloads, arguments.device):
            report(row)
        if arguments.ceiling_only:
            continue
        for mode in arguments.modes.split(","):
            with Server(run, MODES[mode], arguments.device) as server:
                for endpoint in arguments.endpoints.split(","):
                    for concurrency in concurrencies:
                        measured = asyncio.run(load(server.url, endpoint, payloads, arguments.requests, concurrency,
                                                    arguments.max_seconds))
                        report({"run": Path(run).name, "backend": "torch", "mode": mode, "endpoint": endpoint,
                                "concurrency": concurrency, **measured})
        if arguments.onnx and (Path(run) / "model.onnx").is_file():
            for mode in arguments.modes.split(","):
                with Server(run, [*MODES[mode], "--backend", "onnxruntime"], arguments.device) as server:
                    measured = asyncio.run(load(server.url, "predict", payloads, arguments.requests,
                                                max(concurrencies), arguments.max_seconds))
                    report({"run": Path(run).name, "backend": "onnxruntime", "mode": mode, "endpoint": "predict",
                            "concurrency": max(concurrencies), **measured})
    summary = summarize(results)
    print(json.dumps(summary), flush=True)
    out = Path(arguments.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"phases": results, "summary": summary}, indent=2) + "\n")
    return 0 if all(not row.get("errors") for row in results) else 1


def model_ceiling(run: str, payloads: list[bytes], device: str, repeats: int = 3) -> list[dict[str, Any]]:
    """What batching can gain at most: the service's own engine in this process, no HTTP, images decoded once, at
    batch 1 and batch 16 (the median of ``repeats`` passes over 32 images)."""
    from medxai.config import ServeConfig
    from medxai.serve.engine import PREDICT, Engine, explain_key

    engine = Engine.load(run, ServeConfig(device=device))
    engine.warm_up()
    decoded = [engine.decode(data) for data in payloads[:32]]
    rows = []
    for endpoint, key in (("predict", PREDICT), ("explain", explain_key("gradcam", None))):
        rates = {}
        for batch in (1, 16):
            passes = []
            for _ in range(repeats):
                started = time.perf_counter()
                for start in range(0, len(decoded), batch):
                    engine.run_batch(key, decoded[start : start + batch])
                passes.append(len(decoded) / (time.perf_counter() - started))
            rates[batch] = statistics.median(passes)
        rows.append({"run": Path(run).name, "backend": "torch", "mode": "model-only (in process, no HTTP)",
                     "endpoint": endpoint, "img_per_s_batch_1": round(rates[1], 2),
                     "img_per_s_batch_16": round(rates[16], 2), "batch_16_over_1": round(rates[16] / rates[1], 2)})
    return rows


def summarize(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Per run: p50 of explain at concurrency 1, batching speed-up at the highest concurrency, ONNX vs torch."""
    summary: dict[str, Any] = {}
    for run in sorted({row["run"] for row in results}):
        rows = [row for row in results if row["run"] == run and "concurrency" in row]
        ceilings = {row["endpoint"]: row["batch_16_over_1"] for row in results
                    if row["run"] == run and "batch_16_over_1" in row}
        if not rows:
            summary[run] = {"model_only_batch_16_over_1": ceilings}
            continue

        def find(rows: list[dict[str, Any]] = rows, **keys: Any) -> dict[str, Any] | None:
            return next((row for row in rows if all(row.get(key) == value for key, value in keys.items())), None)

        top = max(row["concurrency"] for row in rows)
        entry: dict[str, Any] = {"errors": sum(sum(row["errors"].values()) for row in rows),
                                 "model_only_batch_16_over_1": ceilings}
        single = find(backend="torch", mode="batched", endpoint="explain", concurrency=1)
        if single:
            entry["explain_p50_ms_concurrency_1"] = single["p50_ms"]
        for endpoint in ("predict", "explain"):
            batched = find(backend="torch", mode="batched", endpoint=endpoint, concurrency=top)
            unbatched = find(backend="torch", mode="unbatched", endpoint=endpoint, concurrency=top)
            if batched and unbatched and unbatched["throughput_rps"]:
                entry[f"{endpoint}_batching_speedup_concurrency_{top}"] = round(
                    batched["throughput_rps"] / unbatched["throughput_rps"], 2)
        onnx = find(backend="onnxruntime", mode="batched", endpoint="predict", concurrency=top)
        torch_predict = find(backend="torch", mode="batched", endpoint="predict", concurrency=top)
        if onnx and torch_predict and torch_predict["throughput_rps"]:
            entry["onnxruntime_vs_torch_predict_throughput"] = round(
                onnx["throughput_rps"] / torch_predict["throughput_rps"], 2)
        summary[run] = entry
    return summary


if __name__ == "__main__":
    raise SystemExit(main())

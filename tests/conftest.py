"""Shared fixtures: tiny synthetic data, the real-data location, and a guard that fails any network access."""

from __future__ import annotations

import atexit
import os
import shutil
import socket
import tempfile
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("MEDXAI_OFFLINE", "1")
# OpenMP threads (PyTorch's CPU kernels) that wait for work sleep at once instead of spinning: on the 2 cores CI
# shares with other jobs, a spinning thread takes the core its partner needs. Measured (2-core machine, one busy
# process beside it): one demo epoch 47.7 s -> 22.2 s; alone 14.4 s -> 15.3 s. Set before torch loads libgomp, which
# reads it once; subprocesses (torchrun, the CLI, Ray's workers) inherit it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("MPLBACKEND", "Agg")
# The preprocessed-image cache of this test session (subprocesses inherit it), never the user's ~/.cache.
os.environ["MEDXAI_CACHE_DIR"] = tempfile.mkdtemp(prefix="medxai-test-cache-")
atexit.register(shutil.rmtree, os.environ["MEDXAI_CACHE_DIR"], True)


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Tests never touch the network: any attempt to open a non-local connection fails loudly."""
    original = socket.socket.connect

    def guarded_connect(self, address):
        host = address[0] if isinstance(address, tuple) else address
        if isinstance(host, str) and host not in ("127.0.0.1", "localhost", "::1") and not host.startswith("/"):
            raise RuntimeError(f"network access attempted in a test: {address}")
        return original(self, address)

    monkeypatch.setattr(socket.socket, "connect", guarded_connect)


#: Debian's chromium for the browser tests (`make browser` installs it), started with the flags this machine needs
#: (no sandbox as root, no GPU, no background connections to the closed network).
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium driven by Playwright; the test skips with the reason where either is missing."""
    if not CHROMIUM.is_file():
        pytest.skip("Debian's chromium is not installed at /usr/bin/chromium (`make browser` installs it as root)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            launched.close()


def real_data_dir() -> Path | None:
    value = os.environ.get("MEDXAI_DATA_DIR")
    return Path(value) if value and Path(value).is_dir() else None


@pytest.fixture
def data_dir() -> Path:
    """The shared real-data folder; tests that need it skip with a reason where it is absent."""
    folder = real_data_dir()
    if folder is None:
        pytest.skip("real data not available: set MEDXAI_DATA_DIR to the shared data folder (see its README.md)")
    return folder


def make_synthetic_npz(path: Path, *, size: int = 28, per_class: int = 40, seed: int = 0) -> Path:
    """A tiny MedMNIST-style npz whose two classes are separable: a bright blob left (class 0) or right (class 1)."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, count in (("train", per_class), ("val", per_class // 2), ("test", per_class // 2)):
        labels = np.repeat([0, 1], count)
        images = rng.integers(0, 60, size=(2 * count, size, size)).astype(np.uint8)
        for index, label in enumerate(labels):
            column = size // 4 if label == 0 else 3 * size // 4
            row = rng.integers(size // 4, 3 * size // 4)
            images[index, max(0, row - 3) : row + 3, max(0, column - 3) : column + 3] = 220
        arrays[f"{split}_images"] = images
        arrays[f"{split}_labels"] = labels.reshape(-1, 1).astype(np.uint8)
    np.savez(path, **arrays)
    return path


@pytest.fixture
def synthetic_npz(tmp_path) -> Path:
    return make_synthetic_npz(tmp_path / "synthetic.npz")


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax of ``(N, K)`` logits, in NumPy (the reference the calibration tests compare with)."""
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def calibrated_problem(count: int, num_classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Logits whose softmax is the TRUE class distribution: labels are drawn from it, so they are calibrated."""
    generator = np.random.default_rng(seed)
    logits = generator.normal(size=(count, num_classes)) * 1.5
    labels = (generator.random((count, 1)) > softmax(logits).cumsum(axis=1)).sum(axis=1)
    return logits, np.minimum(labels, num_classes - 1)


@pytest.fixture(scope="session")
def demo_like_run(tmp_path_factory) -> Path:
    """A small trained run (grey 28 px, two classes, calibration, threshold and domain guard), shared by the
    service's tests."""
    from medxai.config import load_config
    from medxai.jobs.train import train_run

    folder = tmp_path_factory.mktemp("served")
    data = make_synthetic_npz(folder / "synthetic.npz", per_class=48)
    config = load_config(None, [f"data.source={data}", "train.epochs=2", "train.bootstrap_resamples=0",
                                "train.device=cpu", "explain.per_outcome=1"])
    config.name, config.out_dir = "served", str(folder)
    return train_run(config)


@pytest.fixture(scope="session")
def pneumoniamnist_run(tmp_path_factory) -> Path:
    """The demo recipe trained for two epochs on the real PneumoniaMNIST through the command line: one training
    shared by the real-data tests of the command line, the evaluation and the domain guard (each trained its own)."""
    if real_data_dir() is None:
        pytest.skip("real data not available: set MEDXAI_DATA_DIR to the shared data folder (see its README.md)")
    from medxai.cli import main

    folder = tmp_path_factory.mktemp("pneumoniamnist")
    assert main(["train", "--preset", "demo", "--out", str(folder), "--name", "demo2", "--epochs", "2",
                 "--set", "train.bootstrap_resamples=100", "--set", "explain.per_outcome=1"]) == 0
    return folder / "demo2"

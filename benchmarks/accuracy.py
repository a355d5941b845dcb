"""Test accuracy of medxai's training recipes on public medical image sets, beside published results.

For each dataset, a recipe (:data:`RECIPES`: preset, number of seeds, data source) is trained with
``medxai.jobs.train.train_run``, once per seed (``train.seed`` = 0, 1, ...), into ``--out-dir``. With more than one
seed, the members are combined by ``medxai.jobs.ensemble.build_ensemble`` and the ensemble is the headline result
(each member's figures are listed under ``members``).

Protocol: the validation split chooses everything (the best epoch, the calibration temperature, the binary operating
threshold); the test split chooses nothing and is read once, from the run's ``metrics.json``:

* ``test_accuracy`` / ``test_auc``: the MedMNIST protocol, i.e. metrics.json's top-level ``accuracy`` and ``auc``
  (argmax, which is the 0.5 threshold for binary tasks; ``auc`` is the macro one-vs-rest AUC for multi-class tasks);
* binary tasks: ``test_precision``, ``test_recall``, ``test_f1``, ``test_sensitivity``, ``test_specificity`` and
  ``test_accuracy_at_threshold`` at the validation-chosen threshold (``at_threshold``; the argmax when there is
  none), the argmax figures under ``at_argmax``;
* ``test_ece``: expected calibration error of the temperature-scaled probabilities (``calibration``);
* every figure has its 95% bootstrap interval (``*_ci95``, [low, high]) from metrics.json.

Prints one JSON line per dataset on stdout (logs go to stderr) and writes it to
``benchmarks/results/accuracy_<dataset>[_<tag>].json``. Run folders are not results: keep ``--out-dir`` git-ignored.

Examples:
    MEDXAI_DATA_DIR=/work/shared/data python benchmarks/accuracy.py --dataset breastmnist --epochs 2 --tag smoke
    MEDXAI_DATA_DIR=/work/shared/data python benchmarks/accuracy.py --dataset all --device cuda
    python benchmarks/accuracy.py --dataset pneumoniamnist --seeds 5 --set train.lr=0.002 --tag lr2e-3
"""

from __future__ import annotations

import argparse
import datetime
import fnmatch
import json
import logging
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch

import medxai
from medxai.config import RunConfig, load_config
from medxai.jobs.train import train_run
from medxai.train import resolve_device

logger = logging.getLogger("benchmarks.accuracy")

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "benchmarks" / "results"
DEFAULT_OUT_DIR = RESULTS_DIR / "runs"

#: dataset -> the preset that sets everything, how many seeds to train, and the data source (name or path, looked
#: up in $MEDXAI_DATA_DIR).
RECIPES: dict[str, dict[str, Any]] = {
    # The demo's simple CNN, 12 epochs, five seeds averaged: about 10 minutes on a 2-core CPU (deep ensembles
    # degrade least under the shift between PneumoniaMNIST's validation and test splits; Ovadia et al. 2019).
    "pneumoniamnist": {"preset": "demo", "seeds": 5, "source": "pneumoniamnist"},
    "breastmnist": {"preset": "breastmnist", "seeds": 5, "source": "breastmnist"},
    "retinamnist": {"preset": "retinamnist", "seeds": 3, "source": "retinamnist"},
    # ResNet-18 at 224 px from scratch: a GPU recipe (hours on a 2-core CPU; see README for the CPU figures).
    "kermany": {"preset": "kermany", "seeds": 3, "source": "chest_xray_kermany_224"},
}

#: Published test results on the same test sets (from /work/shared/data/README.md).
PUBLISHED: dict[str, list[dict[str, Any]]] = {
    "pneumoniamnist": [
        {"source": "MedMNIST v2 ResNet-18 (28)", "accuracy": 0.854, "auc": 0.944},
        {"source": "MedMNIST v2 ResNet-50 (28)", "accuracy": 0.854, "auc": 0.948},
        {"source": "MedMNIST v2 auto-keras", "accuracy": 0.878, "auc": 0.947},
        {"source": "MedMNIST v2 Google AutoML Vision", "accuracy": 0.946, "auc": 0.991},
        {"source": "MedMNIST+ best (224 px)", "accuracy": 0.9156, "auc": 0.9892},
    ],
    "breastmnist": [
        {"source": "MedMNIST v2 ResNet-18 (28)", "accuracy": 0.863, "auc": 0.901},
        {"source": "MedMNIST v2 Google AutoML Vision", "accuracy": None, "auc": 0.919},
        {"source": "MedMNIST+ best (128 px)", "accuracy": 0.906, "auc": 0.940},
    ],
    "retinamnist": [
        {"source": "MedMNIST v2 ResNet-18 (28)", "accuracy": 0.524, "auc": 0.717},
        {"source": "MedMNIST v2 Google AutoML Vision", "accuracy": 0.531, "auc": 0.750},
    ],
    "kermany": [
        {"source": "Kermany et al. 2018 (Cell 172:1122)", "accuracy": 0.928, "sensitivity": 0.932,
         "specificity": 0.901, "auc": 0.968},
    ],
}

#: Our targets: record key -> minimum. Kermany's accuracy, sensitivity and specificity are one operating point (the
#: validation-chosen threshold), as in the paper; the MedMNIST sets use the MedMNIST protocol (argmax).
GOALS: dict[str, dict[str, float]] = {
    "pneumoniamnist": {"test_accuracy": 0.95, "test_auc": 0.99},
    "breastmnist": {"test_accuracy": 0.91, "test_auc": 0.94},
    "retinamnist": {"test_accuracy": 0.55, "test_auc": 0.76},
    "kermany": {"test_accuracy_at_threshold": 0.95, "test_sensitivity": 0.95, "test_specificity": 0.90,
                "test_auc": 0.98},
}

BINARY_KEYS = ("precision", "recall", "f1", "sensitivity", "specificity")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", action="append", required=True,
                        help=f"{', '.join(RECIPES)} or all; repeatable or comma-separated")
    parser.add_argument("--seeds", type=int, help="seeds to train (0..N-1); default: the recipe's")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--preset", help="train this preset instead of the recipe's")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="config override, repeatable")
    parser.add_argument("--epochs", type=int, help="override train.epochs (quick smoke runs)")
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR, help="where the run folders go")
    parser.add_argument("--tag", help="appended to the run names and the result file name")
    return parser


def parse_datasets(values: list[str], parser: argparse.ArgumentParser) -> list[str]:
    names = [name.strip().lower() for value in values for name in value.split(",") if name.strip()]
    if "all" in names:
        return list(RECIPES)
    unknown = sorted(set(names) - set(RECIPES))
    if unknown:
        parser.error(f"unknown dataset(s) {unknown}; choose from {list(RECIPES)} or all")
    return list(dict.fromkeys(names))


def is_git_ignored(path: Path) -> bool:
    """Whether the repository's top-level .gitignore covers ``path`` (a simple reading of its patterns: negations
    and nested .gitignore files are not considered). A path outside the repository cannot be committed."""
    try:
        parts = path.resolve().relative_to(ROOT).parts
    except ValueError:
        return True
    gitignore = ROOT / ".gitignore"
    lines = gitignore.read_text().splitlines() if gitignore.is_file() else []
    for line in (line.strip() for line in lines):
        if not line or line.startswith(("#", "!")):
            continue
        pattern = line.strip("/")
        if "/" not in line.rstrip("/"):  # matches a name at any depth
            if any(fnmatch.fnmatch(part, pattern) for part in parts):
                return True
        elif any(fnmatch.fnmatch("/".join(parts[:depth]), pattern) for depth in range(1, len(parts) + 1)):
            return True
    return False


def ensemble_builder():
    """``build_ensemble`` from medxai.jobs.ensemble, or a clear error where it is missing."""
    try:
        from medxai.jobs.ensemble import build_ensemble
    except ImportError as error:
        raise SystemExit(f"seed ensembles need medxai.jobs.ensemble.build_ensemble, which failed to import ({error}); "
                         "run with --seeds 1") from None
    return build_ensemble


def run_config(args: argparse.Namespace, dataset: str, preset: str, seed: int, name: str) -> RunConfig:
    """The recipe's preset, then the data source, ``--set``, ``--epochs``, the seed and the device."""
    overrides = [f"data.source={RECIPES[dataset]['source']}", *args.overrides]
    if args.epochs is not None:
        overrides.append(f"train.epochs={args.epochs}")
    config = load_config(preset, overrides + [f"train.seed={seed}", f"train.device={args.device}"])
    config.name, config.out_dir = name, str(args.out_dir)  # set, not parsed as YAML: any path is a path
    return config


def with_ci(entry: dict[str, Any], keys: tuple[str, ...], suffix: str = "") -> dict[str, Any]:
    """``test_<key><suffix>`` and its ``_ci95`` for each key of one metrics.json entry."""
    intervals = entry.get("ci95") or {}
    figures = {}
    for key in keys:
        figures[f"test_{key}{suffix}"] = entry.get(key)
        figures[f"test_{key}{suffix}_ci95"] = intervals.get(key)
    return figures


def figures(metrics: dict[str, Any]) -> dict[str, Any]:
    """The record's figures from one run's metrics.json: test (read once here) and validation."""
    test, val = metrics["test"], metrics.get("val", {})
    out: dict[str, Any] = {"test_n": test["n"], **with_ci(test, ("accuracy", "auc"))}
    if len(test.get("label_names", ())) == 2:
        operating = test.get("at_threshold") or test  # the validation-chosen threshold, else the argmax
        out["threshold"] = operating.get("threshold")
        out.update(with_ci(operating, ("accuracy",), "_at_threshold"))
        out.update(with_ci(operating, BINARY_KEYS))
        out["at_argmax"] = with_ci(test, BINARY_KEYS)
    else:
        out["threshold"] = None
        out.update({key: None for key in with_ci({}, BINARY_KEYS)})
    calibration = test.get("calibration") or {}
    calibration_ci = calibration.get("ci95") or {}
    out["test_ece"], out["test_ece_ci95"] = calibration.get("ece"), calibration_ci.get("ece")
    out["test_ece_bins"], out["temperature"] = calibration.get("n_bins"), calibration.get("temperature")
    if "ece_adaptive" in calibration:
        out["test_ece_adaptive"] = calibration["ece_adaptive"]
        out["test_ece_adaptive_ci95"] = calibration_ci.get("ece_adaptive")
    out["val_accuracy"], out["val_auc"] = val.get("accuracy"), val.get("auc")
    return out


def read_metrics(run_dir: Path) -> dict[str, Any]:
    return json.loads((Path(run_dir) / "metrics.json").read_text())


def machine(device: torch.device) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "gpu": gpu, "platform": platform.platform()}


def goal_status(dataset: str, record: dict[str, Any]) -> dict[str, bool]:
    met = {key: record.get(key) is not None and record[key] >= minimum for key, minimum in GOALS[dataset].items()}
    return {**met, "all": all(met.values())}


def benchmark(args: argparse.Namespace, dataset: str, argv: list[str]) -> dict[str, Any]:
    recipe = RECIPES[dataset]
    preset = args.preset or recipe["preset"]
    seeds = args.seeds or recipe["seeds"]
    build_ensemble = ensemble_builder() if seeds > 1 else None  # fail before training, not after
    suffix = f"_{args.tag}" if args.tag else ""
    members, run_dirs, seconds = [], [], 0.0
    for seed in range(seeds):
        config = run_config(args, dataset, preset, seed, f"{dataset}{suffix}_seed{seed}")
        logger.info("%s: training %s seed %d (%d epochs) into %s", dataset, preset, seed, config.train.epochs,
                    Path(config.out_dir) / config.name)
        started = time.perf_counter()
        run_dir = train_run(config, overwrite=True)
        elapsed = time.perf_counter() - started
        seconds += elapsed
        run_dirs.append(run_dir)
        members.append({"seed": seed, "run_dir": str(run_dir), "seconds": round(elapsed, 1),
                        **figures(read_metrics(run_dir))})
        logger.info("%s seed %d: test accuracy %.4f, AUC %.4f (%.0f s)", dataset, seed, members[-1]["test_accuracy"],
                    members[-1]["test_auc"], elapsed)
    headline_dir = run_dirs[0]
    if build_ensemble is not None:
        started = time.perf_counter()
        headline_dir = build_ensemble(run_dirs, name=f"{dataset}{suffix}_ensemble{seeds}", out_dir=args.out_dir,
                                      overwrite=True)
        seconds += time.perf_counter() - started
    device = resolve_device(args.device)
    record = {
        "dataset": dataset,
        "preset": preset,
        "data_source": recipe["source"],
        "model": config.model.name,
        "input_size": config.preprocess.size,
        "epochs": config.train.epochs,
        "overrides": args.overrides,
        "threshold_method": config.train.threshold_method,
        "seeds": seeds,
        "ensemble": build_ensemble is not None,
        "run_dir": str(headline_dir),
        **figures(read_metrics(headline_dir)),
        "members": members,
        "published": PUBLISHED[dataset],
        "goal": GOALS[dataset],
        "seconds": round(seconds, 1),
        "device": device.type,
        "machine": machine(device),
        "torch": torch.__version__,
        "medxai": medxai.__version__,
        "command": shlex.join(["python", "benchmarks/accuracy.py", *argv]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    record["goal_met"] = goal_status(dataset, record)
    return record


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv)
    datasets = parse_datasets(args.dataset, parser)
    if args.seeds is not None and args.seeds < 1:
        parser.error("--seeds must be at least 1")
    if not is_git_ignored(args.out_dir):
        logger.warning("%s is not covered by .gitignore: run folders must not be committed", args.out_dir)
    if not os.environ.get("MEDXAI_DATA_DIR"):
        logger.warning("MEDXAI_DATA_DIR is not set: data names resolve against the current folder and caches only")
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    for dataset in datasets:
        record = benchmark(args, dataset, argv)
        path = RESULTS_DIR / f"accuracy_{dataset}{f'_{args.tag}' if args.tag else ''}.json"
        path.write_text(json.dumps(record, indent=2) + "\n")
        print(json.dumps(record), flush=True)
        logger.info("%s: wrote %s", dataset, path)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""How often a run's out-of-domain guard flags in-domain and out-of-domain image sets of the shared data.

    MEDXAI_DATA_DIR=../shared/data python benchmarks/ood.py runs/demo [--tag demo]

Sets (each image predicted with ``medxai.load(run).predict``, which applies the guard; nothing is fitted here):
PneumoniaMNIST test, the Kermany test folder (224 px JPEGs), BreastMNIST test, RetinaMNIST test, the brain MRIs, the
DICOM files other than the chest radiograph, and that chest radiograph. Prints one JSON line and writes
``benchmarks/results/ood_<tag>.json``: per set, n, the share flagged, the reasons counted, score quantiles.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

import medxai
from medxai.errors import InvalidImageError

RESULTS = Path(__file__).parent / "results"
CHEST_DICOM = "pydicom-data/RG1_J2KI.dcm"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def image_sets(data: Path) -> dict[str, list]:
    """Name -> list of inputs (arrays or paths) of every set the benchmark scores."""
    medmnist = data / "medmnist"
    dicom = sorted(path for path in (data / "dicom").rglob("*") if path.is_file() and _is_dicom_name(path))
    return {
        "pneumoniamnist_test": list(np.load(medmnist / "pneumoniamnist.npz")["test_images"]),
        "kermany_test": _files(data / "chest_xray_kermany_224" / "test"),
        "breastmnist_test": list(np.load(medmnist / "breastmnist.npz")["test_images"]),
        "retinamnist_test": list(np.load(medmnist / "retinamnist.npz")["test_images"]),
        "brain_mri": _files(data / "brain_mri_yes_no"),
        "dicom_non_chest": [path for path in dicom if not str(path).endswith(CHEST_DICOM)],
        "dicom_chest_cr": [path for path in dicom if str(path).endswith(CHEST_DICOM)],
    }


def _files(folder: Path) -> list[Path]:
    return sorted(path for path in folder.rglob("*") if path.suffix.lower() in IMAGE_SUFFIXES)


def _is_dicom_name(path: Path) -> bool:
    return path.name.endswith((".dcm", ".dcm.gz"))


def score_set(classifier, items: list) -> dict:
    """Predict every item (unreadable files are counted, not scored) and summarise the guard's verdicts."""
    predictions, unreadable = [], 0
    for start in range(0, len(items), 64):
        chunk = items[start : start + 64]
        try:
            predictions.extend(classifier.predict(chunk))
        except InvalidImageError:
            for item in chunk:
                try:
                    predictions.extend(classifier.predict([item]))
                except InvalidImageError:
                    unreadable += 1
    flagged = [item for item in predictions if item.in_domain is False]
    reasons = Counter(reason.split(" (", 1)[0] for item in flagged
                      for reason in item.domain_reasons)
    scores = np.array([item.domain_score for item in predictions], dtype=np.float64)
    return {
        "n": len(predictions),
        "unreadable": unreadable,
        "out_of_domain": len(flagged),
        "rate": round(len(flagged) / max(1, len(predictions)), 4),
        "reasons": dict(reasons.most_common()),
        "score_p05_p50_p95": [round(float(value), 3) for value in np.quantile(scores, [0.05, 0.5, 0.95])]
        if len(scores) else [],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="run folder")
    parser.add_argument("--tag", help="result file name: ood_<tag>.json (default: the run's name)")
    parser.add_argument("--device", default="cpu")
    arguments = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    data = Path(os.environ.get("MEDXAI_DATA_DIR", "../shared/data"))
    started = time.perf_counter()
    classifier = medxai.load(arguments.run, device=arguments.device)
    result = {
        "run": str(arguments.run),
        "model": classifier.card.architecture,
        "train_data": classifier.card.train_data.get("source"),
        "z_threshold": classifier.card.domain.get("z_threshold"),
        "sets": {name: score_set(classifier, items) for name, items in image_sets(data).items()},
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform()},
        "torch": torch.__version__,
        "medxai": medxai.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    result["seconds"] = round(time.perf_counter() - started, 1)
    RESULTS.mkdir(parents=True, exist_ok=True)
    tag = arguments.tag or Path(arguments.run).name
    (RESULTS / f"ood_{tag}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()

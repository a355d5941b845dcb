"""How often a run's out-of-domain guard flags in-domain and out-of-domain image sets of the shared data.

    MEDXAI_DATA_DIR=../shared/data python benchmarks/ood.py runs/demo [--tag demo]

Sets (each image predicted with ``medxai.load(run).predict``, which applies the guard; nothing is fitted here):
PneumoniaMNIST test, the Kermany test folder (224 px JPEGs), BreastMNIST test, RetinaMNIST test, the brain MRIs, the
DICOM files other than the chest radiograph, and that chest radiograph. Prints one JSON line and writes
``benchmarks/results/ood_<tag>.json``: per set, n, the share flagged, the reasons counted, score quantiles, and
how many files could not be read.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

import medxai
from medxai.config import InferenceConfig
from medxai.evaluate.domain import DomainVerdict, summarize_verdicts
from medxai.jobs.predict import predict_files

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


def score_set(run: str, classifier, items: list) -> dict:
    """Predict every item and summarise the guard's verdicts (:func:`~medxai.evaluate.domain.summarize_verdicts`).
    Files go through ``medxai predict``'s batch job, which skips and counts unreadable ones."""
    if items and isinstance(items[0], Path):
        result = predict_files(run, items, inference=InferenceConfig(device=classifier.device.type))
        predictions, unreadable = result.predictions, len(result.skipped)
    else:
        predictions, unreadable = classifier.predict(items), 0
    verdicts = [DomainVerdict(item.in_domain, item.domain_score, item.domain_reasons) for item in predictions]
    return {**summarize_verdicts(verdicts), "unreadable": unreadable}


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
        "sets": {name: score_set(arguments.run, classifier, items) for name, items in image_sets(data).items()},
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

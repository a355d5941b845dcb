"""The 2D MedMNIST v2 / MedMNIST+ subsets: one ``.npz`` file per subset and size, with official splits.

Reference: Yang et al., "MedMNIST v2 - A large-scale lightweight benchmark for 2D and 3D biomedical image
classification", Scientific Data 10:41 (2023). Label names, URLs and MD5 sums are those of the ``medmnist`` package's
``INFO`` (version 3, Zenodo record 10519652, which serves both the 28-pixel v2 files and the MedMNIST+ sizes).
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import pickle
import tempfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medxai.config import OFFLINE_ENV, is_offline
from medxai.data.sources.base import SPLIT_NAMES, Record, Sample, check_split_request
from medxai.errors import DataError, InvalidImageError

__all__ = ["MedMNISTSource", "MEDMNIST_SUBSETS", "MEDMNIST_SIZES", "is_medmnist_name"]

logger = logging.getLogger(__name__)

MEDMNIST_SIZES: tuple[int, ...] = (28, 64, 128, 224)

_DOWNLOAD_URL = "https://zenodo.org/records/10519652/files/{file_name}?download=1"
_DOWNLOAD_TIMEOUT_SECONDS = 60
_DOWNLOAD_CHUNK_BYTES = 1 << 20


@dataclass(frozen=True)
class _SubsetInfo:
    label_names: tuple[str, ...]
    md5_by_size: dict[int, str | None]
    multi_label: bool = False


_ORGAN_LABELS = (
    "bladder", "femur-left", "femur-right", "heart", "kidney-left", "kidney-right",
    "liver", "lung-left", "lung-right", "pancreas", "spleen",
)  # fmt: skip

#: The 2D subsets, with official label names and the MD5 of each size's file (28, 64, 128, 224 pixels).
MEDMNIST_SUBSETS: dict[str, _SubsetInfo] = {
    "pathmnist": _SubsetInfo(
        (
            "adipose", "background", "debris", "lymphocytes", "mucus", "smooth muscle", "normal colon mucosa",
            "cancer-associated stroma", "colorectal adenocarcinoma epithelium",
        ),
        {28: "a8b06965200029087d5bd730944a56c1", 64: "55aa9c1e0525abe5a6b9d8343a507616",
         128: "ac42d08fb904d92c244187169d1fd1d9", 224: "2c51a510bcdc9cf8ddb2af93af1eadec"},
    ),
    "chestmnist": _SubsetInfo(
        (
            "atelectasis", "cardiomegaly", "effusion", "infiltration", "mass", "nodule", "pneumonia",
            "pneumothorax", "consolidation", "edema", "emphysema", "fibrosis", "pleural", "hernia",
        ),
        {28: "02c8a6516a18b556561a56cbdd36c4a8", 64: "9de6cd0b934ebb5b7426cfba5efbae16",
         128: "db107e5590b27930b62dbaf558aebee3", 224: "45bd33e6f06c3e8cdb481c74a89152aa"},
        multi_label=True,
    ),
    "dermamnist": _SubsetInfo(
        (
            "actinic keratoses and intraepithelial carcinoma", "basal cell carcinoma",
            "benign keratosis-like lesions", "dermatofibroma", "melanoma", "melanocytic nevi", "vascular lesions",
        ),
        {28: "0744692d530f8e62ec473284d019b0c7", 64: "b70a2f5635c6199aeaa28c31d7202e1f",
         128: "2defd784463fa5243564e855ed717de1", 224: "8974907d8e169bef5f5b96bc506ae45d"},
    ),
    "octmnist": _SubsetInfo(
        ("choroidal neovascularization", "diabetic macular edema", "drusen", "normal"),
        {28: "c68d92d5b585d8d81f7112f81e2d0842", 64: "e229e9440236b774d9f0dfef9d07bdaf",
         128: "0a97e76651ace45c5d943ee3f65b63ae", 224: "abc493b6d529d5de7569faaef2773ba3"},
    ),
    "pneumoniamnist": _SubsetInfo(
        ("normal", "pneumonia"),
        {28: "28209eda62fecd6e6a2d98b1501bb15f", 64: "8f4eceb4ccffa70c672198ea285246c6",
         128: "05b46931834c231683c68f40c47b2971", 224: "d6a3c71de1b945ea11211b03746c1fe1"},
    ),
    "retinamnist": _SubsetInfo(
        ("0", "1", "2", "3", "4"),  # diabetic retinopathy grades, ordered
        {28: "bd4c0672f1bba3e3a89f0e4e876791e4", 64: "afda852cc34dcda56f86ad2b2457dbcc",
         128: "e48e916a24454daf90583d4e6efb1a18", 224: "eae7e3b6f3fcbda4ae613ebdcbe35348"},
    ),
    "breastmnist": _SubsetInfo(
        ("malignant", "normal, benign"),
        {28: "750601b1f35ba3300ea97c75c52ff8f6", 64: "742edef2a1fd1524b2efff4bd7ba9364",
         128: "363e4b3f8d712e9b5de15470a2aaadf1", 224: "b56378a6eefa9fed602bb16d192d4c8b"},
    ),
    "bloodmnist": _SubsetInfo(
        (
            "basophil", "eosinophil", "erythroblast",
            "immature granulocytes(myelocytes, metamyelocytes and promyelocytes)", "lymphocyte", "monocyte",
            "neutrophil", "platelet",
        ),
        {28: "7053d0359d879ad8a5505303e11de1dc", 64: "2b94928a2ae4916078ca51e05b6b800b",
         128: "adace1e0ed228fccda1f39692059dd4c", 224: "b718ff6835fcbdb22ba9eacccd7b2601"},
    ),
    "tissuemnist": _SubsetInfo(
        (
            "Collecting Duct, Connecting Tubule", "Distal Convoluted Tubule", "Glomerular endothelial cells",
            "Interstitial endothelial cells", "Leukocytes", "Podocytes", "Proximal Tubule Segments",
            "Thick Ascending Limb",
        ),
        {28: "ebe78ee8b05294063de985d821c1c34b", 64: "123ece2eba09d0aa5d698fda57103344",
         128: "61b955355d7425a89687b06cca3ce0c2", 224: "b077128c4a949f0a4eb01517f9037b9c"},
    ),
    "organamnist": _SubsetInfo(
        _ORGAN_LABELS,
        {28: "68e3f8846a6bd62f0c9bf841c0d9eacc", 64: "2dcccc29b88e6da5a01161ef20cda288",
         128: "eeae80d0a227a8d099027e1b3cfd3b60", 224: "50747347e05c87dd3aaf92c49f9f3170"},
    ),
    "organcmnist": _SubsetInfo(
        _ORGAN_LABELS,
        {28: "b9ceb9546e10131b32923c5bbeaea2b1", 64: "3ce34a8724ea6f548e6db4744d03b6a9",
         128: "773c1f009daa3fe5d9a2a201b2a7ed94", 224: "050f5e875dc056f6768abf94ec9995d1"},
    ),
    "organsmnist": _SubsetInfo(
        _ORGAN_LABELS,
        {28: "9ab87b696fb54e2a387ebe992d6ed5f1", 64: "53a6d115339d874c25e309a994ff46d3",
         128: "ded0c5fa01a95dc4978b956f613e9b8e", 224: "b354719e553fbbb2513d5533f52a4cb1"},
    ),
}


def is_medmnist_name(name: str) -> bool:
    """Tell whether ``name`` is a known 2D MedMNIST subset name (case-insensitive), e.g. ``"pneumoniamnist"``."""
    return name.strip().lower() in MEDMNIST_SUBSETS


class MedMNISTSource:
    """A 2D MedMNIST subset, loaded once from its ``.npz`` file and kept in memory.

    The file for subset ``name`` at ``size`` pixels is ``name.npz`` (size 28) or ``name_{size}.npz``. It is looked
    for, in order: at ``name_or_path`` when that is a path; in ``data_dir``; in ``$MEDXAI_DATA_DIR/medmnist`` and
    ``$MEDXAI_DATA_DIR``; in ``$MEDMNIST_ROOT`` and ``~/.medmnist`` (the ``medmnist`` package's cache). When it is
    nowhere and ``download`` is true (and ``MEDXAI_OFFLINE`` is not set), it is downloaded once from Zenodo into
    ``$MEDMNIST_ROOT`` or else ``~/.medmnist``, checked against its published MD5, then kept there.

    Official splits are train, val and test as the file provides them. Record ids are ``"<name>/<split>/<index>"``
    (the same for every size, since the sizes hold the same images). A file whose name is not a known subset is
    accepted with labels named ``"0"``, ``"1"``, ... and a logged warning.

    Args:
        name_or_path: a subset name such as ``"pneumoniamnist"``, or the path of an ``.npz`` file.
        size: image size in pixels: 28, 64, 128 or 224. Ignored when a path is given.
        data_dir: a folder to look in first.
        download: whether a missing file may be downloaded.

    Raises:
        DataError: unknown subset or size, a multi-label subset (ChestMNIST), a file that cannot be found,
            downloaded or read, or one whose arrays are inconsistent.
    """

    def __init__(
        self,
        name_or_path: str | Path,
        *,
        size: int = 28,
        data_dir: str | Path | None = None,
        download: bool = True,
    ) -> None:
        self.skipped: list[tuple[str, str]] = []
        text = str(name_or_path)
        if text.lower().endswith(".npz") or os.sep in text or "/" in text:
            self.path = Path(text).expanduser().absolute()
            if not self.path.is_file():
                raise DataError(f"MedMNIST file {self.path} does not exist")
            self.name, self.size = _name_and_size_from_file_name(self.path.name)
            if self.name in MEDMNIST_SUBSETS:
                _reject_multi_label(self.name)
        else:
            self.name = text.strip().lower()
            if self.name not in MEDMNIST_SUBSETS:
                raise DataError(
                    f"unknown MedMNIST subset {text!r}; known 2D subsets: {', '.join(sorted(MEDMNIST_SUBSETS))}"
                )
            if size not in MEDMNIST_SIZES:
                raise DataError(f"MedMNIST size must be one of {MEDMNIST_SIZES}, not {size!r}")
            self.size = size
            _reject_multi_label(self.name)
            self.path = _find_or_download(_file_name(self.name, self.size), self.name, self.size, data_dir, download)

        info = MEDMNIST_SUBSETS.get(self.name)
        self._images, self._labels = _load_arrays(self.path)
        if info is not None:
            self.label_names: list[str] = list(info.label_names)
        else:
            class_count = 1 + max((int(labels.max()) for labels in self._labels.values() if labels.size), default=0)
            self.label_names = [str(index) for index in range(class_count)]
            logger.warning("%s is not a known MedMNIST subset; labels are named %s", self.path, self.label_names)
        self._check_labels_in_range()

        self.description = f"medmnist {self.name}" if self.size == 28 else f"medmnist {self.name} size {self.size}"
        self.layout = {
            "kind": "medmnist",
            "file": self.path.name,
            "splits": {split: f"{split}_images" for split in self._labels},
            "classes": list(self.label_names),
        }
        self._fingerprint: str | None = None
        self._records = [
            Record(id=f"{self.name}/{split}/{index}", label=int(label), index=index, split=split)
            for split, labels in self._labels.items()
            for index, label in enumerate(labels)
        ]
        logger.info(
            "%s from %s: %s",
            self.description,
            self.path,
            ", ".join(f"{split} {len(labels)}" for split, labels in self._labels.items()),
        )

    def official_splits(self) -> list[str]:
        """The splits present in the file, in train, val, test order."""
        return list(self._labels)

    def records(self, split: str | None = None) -> list[Record]:
        """All records (train, then val, then test), or those of one split.

        Raises:
            DataError: ``split`` is not in the file.
        """
        check_split_request(split, self.official_splits(), self.description)
        return [record for record in self._records if split is None or record.split == split]

    def load(self, record: Record) -> Sample:
        """Return a copy of the record's image: (H, W) uint8 for grey subsets, (H, W, 3) for colour ones.

        Raises:
            InvalidImageError: the record does not point into this source's arrays.
        """
        images = self._images.get(record.split or "")
        if images is None or record.index is None or not 0 <= record.index < len(images):
            raise InvalidImageError(record.id, f"not an item of {self.description}")
        return Sample(
            image=np.array(images[record.index]),
            label=record.label,
            id=record.id,
            meta={"subset": self.name, "split": record.split, "index": record.index, "size": self.size},
        )

    def fingerprint(self) -> str:
        """``md5:<hex digest>`` of the ``.npz`` file (computed once; the official files have published MD5s)."""
        if self._fingerprint is None:
            self._fingerprint = f"md5:{_md5_of_file(self.path)}"
        return self._fingerprint

    def __len__(self) -> int:
        return len(self._records)

    def __repr__(self) -> str:
        return f"MedMNISTSource({self.name!r}, size={self.size}, path={str(self.path)!r})"

    def _check_labels_in_range(self) -> None:
        for split, labels in self._labels.items():
            if labels.size and (labels.min() < 0 or labels.max() >= len(self.label_names)):
                raise DataError(
                    f"{self.path}: {split} labels range {labels.min()}..{labels.max()}, outside the "
                    f"{len(self.label_names)} classes of {self.name}"
                )


def _file_name(name: str, size: int) -> str:
    return f"{name}.npz" if size == 28 else f"{name}_{size}.npz"


def _name_and_size_from_file_name(file_name: str) -> tuple[str, int]:
    stem = file_name[: -len(".npz")] if file_name.lower().endswith(".npz") else file_name
    base, _, suffix = stem.rpartition("_")
    if base and suffix.isdigit() and int(suffix) in MEDMNIST_SIZES:
        return base.lower(), int(suffix)
    return stem.lower(), 28


def _reject_multi_label(name: str) -> None:
    if MEDMNIST_SUBSETS[name].multi_label:
        raise DataError(f"MedMNIST subset {name} is multi-label; multi-label classification is not supported yet")


def _candidate_folders(data_dir: str | Path | None) -> list[Path]:
    folders: list[Path] = []
    if data_dir is not None:
        folders.append(Path(data_dir).expanduser())
    medxai_data_dir = os.environ.get("MEDXAI_DATA_DIR")
    if medxai_data_dir:
        folders += [Path(medxai_data_dir) / "medmnist", Path(medxai_data_dir)]
    folders.append(_download_folder())
    if os.environ.get("MEDMNIST_ROOT"):
        folders.append(Path.home() / ".medmnist")
    return list(dict.fromkeys(folder.absolute() for folder in folders))


def _download_folder() -> Path:
    return Path(os.environ.get("MEDMNIST_ROOT") or Path.home() / ".medmnist").expanduser()


def _find_or_download(
    file_name: str, name: str, size: int, data_dir: str | Path | None, download: bool
) -> Path:
    folders = _candidate_folders(data_dir)
    for folder in folders:
        if (folder / file_name).is_file():
            return folder / file_name

    searched = ", ".join(str(folder) for folder in folders)
    where_to_put_it = (
        f"download {_DOWNLOAD_URL.format(file_name=file_name)} and put it in one of those folders "
        "(or pass data_dir)"
    )
    offline = is_offline()
    if not download or offline:
        why = f"{OFFLINE_ENV} is set" if offline and download else "download is off"
        raise DataError(f"{file_name} not found (searched {searched}) and {why}; {where_to_put_it}")
    try:
        return _download(file_name, MEDMNIST_SUBSETS[name].md5_by_size.get(size), _download_folder().absolute())
    except DataError as error:
        raise DataError(f"{error}; {file_name} was not found in {searched} either; {where_to_put_it}") from None


def _download(file_name: str, expected_md5: str | None, folder: Path) -> Path:
    """Download into a temporary file in ``folder``, check its MD5, then move it into place."""
    url = _DOWNLOAD_URL.format(file_name=file_name)
    target = folder / file_name
    logger.info("downloading %s to %s (once)", url, target)
    temporary_path: Path | None = None
    try:
        folder.mkdir(parents=True, exist_ok=True)
        digest = hashlib.md5()
        with tempfile.NamedTemporaryFile(dir=folder, prefix=f".{file_name}.", suffix=".part", delete=False) as out:
            temporary_path = Path(out.name)
            with urllib.request.urlopen(url, timeout=_DOWNLOAD_TIMEOUT_SECONDS) as response:
                while chunk := response.read(_DOWNLOAD_CHUNK_BYTES):
                    digest.update(chunk)
                    out.write(chunk)
        if expected_md5 is not None and digest.hexdigest() != expected_md5:
            raise DataError(f"downloaded {url} has MD5 {digest.hexdigest()}, expected {expected_md5}")
        os.replace(temporary_path, target)
        temporary_path = None
    except (urllib.error.URLError, http.client.HTTPException, OSError, TimeoutError) as error:
        raise DataError(f"could not download {url}: {error}") from None
    finally:
        if temporary_path is not None:
            temporary_path.unlink(missing_ok=True)
    return target


def _load_arrays(path: Path) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Read ``<split>_images`` and ``<split>_labels`` for each split present; labels become 1-D int64."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            keys = set(archive.files)
            images: dict[str, np.ndarray] = {}
            labels: dict[str, np.ndarray] = {}
            for split in SPLIT_NAMES:
                if f"{split}_images" in keys and f"{split}_labels" in keys:
                    images[split] = archive[f"{split}_images"]
                    labels[split] = archive[f"{split}_labels"]
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, pickle.UnpicklingError) as error:
        raise DataError(f"cannot read MedMNIST file {path}: {error}") from None
    if not images:
        raise DataError(
            f"{path} is not a MedMNIST file: it has none of the arrays train_images/train_labels, "
            f"val_images/val_labels, test_images/test_labels (it has: {', '.join(sorted(keys)) or 'nothing'})"
        )
    for split in images:
        labels[split] = _labels_as_class_indices(path, split, labels[split])
        if images[split].ndim not in (3, 4) or len(images[split]) != len(labels[split]):
            raise DataError(
                f"{path}: {split}_images has shape {images[split].shape} for {len(labels[split])} labels; "
                "expected (N, H, W) or (N, H, W, C) with one label per image"
            )
    return images, labels


def _labels_as_class_indices(path: Path, split: str, labels: np.ndarray) -> np.ndarray:
    if labels.ndim == 2 and labels.shape[1] > 1:
        raise DataError(
            f"{path}: {split}_labels has {labels.shape[1]} columns, i.e. multi-label data; "
            "multi-label classification is not supported yet"
        )
    flat = labels.reshape(-1)
    if not np.issubdtype(flat.dtype, np.integer) and not np.all(np.equal(np.mod(flat, 1), 0)):
        raise DataError(f"{path}: {split}_labels are not whole numbers")
    return flat.astype(np.int64)


def _md5_of_file(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as stream:
        while chunk := stream.read(_DOWNLOAD_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()

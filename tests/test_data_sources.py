"""Data sources: image decoding, image folders, CSV manifests, MedMNIST files, and the real data sets."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import pickle
import urllib.error
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medxai.data import (
    ImageFolderSource,
    ManifestSource,
    MedMNISTSource,
    Source,
    carve_splits,
    is_hidden_or_system,
    open_source,
    read_image,
)
from medxai.data.sources import medmnist as _medmnist
from medxai.data.sources import KERMANY_PATIENT_PATTERN
from medxai.errors import ConfigError, DataError, InvalidImageError

# -- helpers -------------------------------------------------------------------------------------------------------


def gradient(height: int = 5, width: int = 7) -> np.ndarray:
    """A grey uint8 image whose every pixel differs from its neighbours, so any flip or shift shows."""
    return (np.arange(height * width, dtype=np.uint8) * 7).reshape(height, width)


def colour(height: int = 5, width: int = 7) -> np.ndarray:
    base = gradient(height, width)
    return np.stack([base, 255 - base, (base // 2) + 10], axis=-1)


def save_png(path: Path, array: np.ndarray, mode: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(array) if mode is None else Image.fromarray(array).convert(mode)
    image.save(path, format="PNG")
    return path


def jpeg_bytes(size: tuple[int, int] = (64, 48)) -> bytes:
    rng = np.random.default_rng(0)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size[1], size[0]), dtype=np.uint8)).save(buffer, format="JPEG")
    return buffer.getvalue()


def make_class_tree(root: Path, files_per_class: dict[str, list[str]]) -> Path:
    for class_name, names in files_per_class.items():
        for name in names:
            save_png(root / class_name / name, gradient())
    return root


# -- read_image ----------------------------------------------------------------------------------------------------


def test_grey_png_keeps_exact_values(tmp_path):
    expected = gradient()
    array = read_image(save_png(tmp_path / "grey.png", expected))
    assert array.dtype == np.uint8 and array.shape == (5, 7)
    np.testing.assert_array_equal(array, expected)


def test_rgb_png_keeps_exact_values(tmp_path):
    expected = colour()
    array = read_image(save_png(tmp_path / "rgb.png", expected))
    assert array.dtype == np.uint8 and array.shape == (5, 7, 3)
    np.testing.assert_array_equal(array, expected)


def test_alpha_is_dropped_not_composited(tmp_path):
    rgb = colour()
    alpha = np.zeros(rgb.shape[:2], dtype=np.uint8)  # fully transparent: compositing on black would give zeros
    alpha[0, 0] = 255
    array = read_image(save_png(tmp_path / "rgba.png", np.dstack([rgb, alpha])))
    assert array.shape == (5, 7, 3)
    np.testing.assert_array_equal(array, rgb)

    grey_alpha = Image.fromarray(np.dstack([gradient(), alpha]), mode="LA")
    grey_alpha.save(tmp_path / "la.png")
    np.testing.assert_array_equal(read_image(tmp_path / "la.png"), gradient())


def test_palette_grey_gives_2d_and_colour_gives_rgb(tmp_path):
    grey = gradient()
    Image.fromarray(grey).convert("P").save(tmp_path / "grey_palette.png")
    grey_array = read_image(tmp_path / "grey_palette.png")
    assert grey_array.shape == (5, 7)
    np.testing.assert_array_equal(grey_array, grey)

    indices = np.array([[0, 1], [2, 1]], dtype=np.uint8)
    palette_image = Image.fromarray(indices, mode="P")
    palette_image.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * (256 * 3 - 9))
    palette_image.save(tmp_path / "colour_palette.png")
    colour_array = read_image(tmp_path / "colour_palette.png")
    assert colour_array.shape == (2, 2, 3)
    np.testing.assert_array_equal(colour_array[0, 0], [255, 0, 0])
    np.testing.assert_array_equal(colour_array[0, 1], [0, 255, 0])
    np.testing.assert_array_equal(colour_array[1, 0], [0, 0, 255])


def test_one_bit_becomes_uint8_0_and_255(tmp_path):
    bits = np.array([[True, False, True], [False, False, True]])
    Image.fromarray(bits).save(tmp_path / "bits.png")
    assert Image.open(tmp_path / "bits.png").mode == "1"
    array = read_image(tmp_path / "bits.png")
    assert array.dtype == np.uint8
    np.testing.assert_array_equal(array, bits.astype(np.uint8) * 255)


def test_sixteen_bit_png_keeps_full_range(tmp_path):
    expected = np.array([[0, 1, 1000], [40000, 65534, 65535]], dtype=np.uint16)
    array = read_image(save_png(tmp_path / "deep.png", expected))
    assert array.dtype == np.uint16
    np.testing.assert_array_equal(array, expected)


def test_sixteen_bit_big_endian_tiff(tmp_path):
    expected = np.array([[0, 513, 65535]], dtype=np.uint16)
    Image.frombytes("I;16B", (3, 1), expected.astype(">u2").tobytes()).save(tmp_path / "big.tif")
    assert Image.open(tmp_path / "big.tif").mode == "I;16B"
    array = read_image(tmp_path / "big.tif")
    assert array.dtype == np.uint16 and array.dtype.byteorder in ("=", "<", "|")
    np.testing.assert_array_equal(array, expected)


def test_float_and_signed_32_bit_tiffs_become_float32(tmp_path):
    floats = np.array([[-1.5, 0.0], [3.25, 1e6]], dtype=np.float32)
    Image.fromarray(floats, mode="F").save(tmp_path / "float.tif")
    float_array = read_image(tmp_path / "float.tif")
    assert float_array.dtype == np.float32
    np.testing.assert_array_equal(float_array, floats)

    signed = np.array([[-1000, 0], [70000, 5]], dtype=np.int32)
    Image.fromarray(signed, mode="I").save(tmp_path / "signed.tif")
    signed_array = read_image(tmp_path / "signed.tif")
    assert signed_array.dtype == np.float32
    np.testing.assert_array_equal(signed_array, signed.astype(np.float32))


def test_png_named_jpg_is_read_by_content(tmp_path):
    expected = gradient()
    array = read_image(save_png(tmp_path / "scan.jpg", expected))
    np.testing.assert_array_equal(array, expected)


def test_exif_orientation_is_applied(tmp_path):
    stored = gradient(4, 6)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    Image.fromarray(stored).save(tmp_path / "rotated.png", exif=exif)
    array = read_image(tmp_path / "rotated.png")
    assert array.shape == (6, 4)
    np.testing.assert_array_equal(array, np.rot90(stored, k=-1))


def test_truncated_jpeg_is_an_invalid_image_naming_the_file(tmp_path):
    data = jpeg_bytes()
    path = tmp_path / "cut short.jpg"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InvalidImageError) as caught:
        read_image(path)
    assert caught.value.path == str(path)
    assert str(path) in str(caught.value)
    assert "truncated or corrupt" in caught.value.reason


def test_zero_byte_file(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(InvalidImageError, match="empty file"):
        read_image(tmp_path / "empty.png")


def test_text_named_png_is_not_a_recognised_format(tmp_path):
    (tmp_path / "notes.png").write_text("these are not pixels\n")
    with pytest.raises(InvalidImageError, match="not a recognised image format"):
        read_image(tmp_path / "notes.png")


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(InvalidImageError, match="file not found"):
        read_image(tmp_path / "absent.png")
    with pytest.raises(InvalidImageError, match="is a folder"):
        read_image(tmp_path)


def test_decompression_bomb_is_rejected_with_a_clear_reason(tmp_path, monkeypatch):
    save_png(tmp_path / "a little big.png", np.zeros((4, 5), dtype=np.uint8))  # 20 pixels
    save_png(tmp_path / "far too big.png", np.zeros((40, 50), dtype=np.uint8))  # 2000 pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 12)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # Pillow only warns below twice the limit
        with pytest.raises(InvalidImageError, match="decompression bomb.*MAX_IMAGE_PIXELS = 12"):
            read_image(tmp_path / "a little big.png")
    with pytest.raises(InvalidImageError, match="decompression bomb"):
        read_image(tmp_path / "far too big.png")


@pytest.mark.parametrize(
    ("name", "hidden"),
    [
        (".DS_Store", True),
        ("._scan.png", True),
        ("Thumbs.db", True),
        ("thumbs.db", True),
        ("desktop.ini", True),
        ("__MACOSX", True),
        ("scan.png", False),
        ("Y1 copy.jpg", False),
        ("folder/.hidden", True),
    ],
)
def test_hidden_or_system_names(name, hidden):
    assert is_hidden_or_system(name) is hidden


# -- ImageFolderSource ---------------------------------------------------------------------------------------------


def test_image_folder_lists_classes_files_and_skips_hidden(tmp_path):
    root = make_class_tree(tmp_path / "data", {"no tumour": ["a 1.png", "b.png"], "tumour": ["c.png"]})
    save_png(root / "tumour" / "more" / "deep.png", gradient())
    (root / "tumour" / ".DS_Store").write_bytes(b"\0\0")
    (root / "no tumour" / "Thumbs.db").write_bytes(b"\0")
    save_png(root / "tumour" / ".cache" / "x.png", gradient())
    (root / "README.txt").write_text("about this data")

    source = ImageFolderSource(root)
    assert isinstance(source, Source)
    assert source.label_names == ["no tumour", "tumour"]
    assert source.official_splits() == []
    assert [(record.id, record.label) for record in source.records()] == [
        ("no tumour/a 1.png", 0),
        ("no tumour/b.png", 0),
        ("tumour/c.png", 1),
        ("tumour/more/deep.png", 1),
    ]
    assert all(Path(record.path).is_absolute() and record.split is None for record in source.records())
    skipped = {Path(path).relative_to(root).as_posix(): reason for path, reason in source.skipped}
    assert set(skipped) == {"README.txt", "no tumour/Thumbs.db", "tumour/.DS_Store", "tumour/.cache"}
    assert skipped["README.txt"] == "not inside a class folder"

    sample = source.load(source.records()[0])
    assert (sample.id, sample.label) == ("no tumour/a 1.png", 0)
    np.testing.assert_array_equal(sample.image, gradient())
    assert sample.meta["format"] == "PNG" and sample.meta["path"] == str(root / "no tumour" / "a 1.png")


def test_image_folder_lists_non_images_and_load_rejects_them(tmp_path):
    root = make_class_tree(tmp_path, {"a": ["good.png"], "b": ["good.png"]})
    (root / "b" / "report.pdf").write_text("%PDF-1.4 not an image")
    source = ImageFolderSource(root)
    bad = next(record for record in source.records() if record.id == "b/report.pdf")
    with pytest.raises(InvalidImageError, match="not a recognised image format") as caught:
        source.load(bad)
    assert caught.value.path == str(root / "b" / "report.pdf")


def test_records_are_picklable_for_loader_workers(tmp_path):
    source = ImageFolderSource(make_class_tree(tmp_path, {"a": ["x.png"], "b": ["y.png"]}))
    record = source.records()[0]
    assert pickle.loads(pickle.dumps(record)) == record
    with pytest.raises(dataclasses.FrozenInstanceError):
        record.label = 3  # type: ignore[misc]


def test_image_folder_split_layout_in_any_case(tmp_path):
    make_class_tree(tmp_path / "Train", {"NORMAL": ["n1.png", "n2.png"], "PNEUMONIA": ["p1.png"]})
    make_class_tree(tmp_path / "TEST", {"PNEUMONIA": ["p2.png"]})  # a class missing from a split is fine
    source = ImageFolderSource(tmp_path)
    assert source.official_splits() == ["train", "test"]
    assert source.label_names == ["NORMAL", "PNEUMONIA"]
    assert [(r.id, r.label, r.split) for r in source.records("test")] == [("TEST/PNEUMONIA/p2.png", 1, "test")]
    assert len(source.records("train")) == 3 and len(source.records()) == 4
    with pytest.raises(DataError, match="no official split 'val'"):
        source.records("val")


@pytest.mark.parametrize("split_folder", ["valid", "Validation", "VAL"])
def test_validation_folder_spellings(tmp_path, split_folder):
    make_class_tree(tmp_path / "train", {"a": ["1.png"], "b": ["2.png"]})
    make_class_tree(tmp_path / split_folder, {"a": ["3.png"], "b": ["4.png"]})
    assert ImageFolderSource(tmp_path).official_splits() == ["train", "val"]


def test_image_folder_errors_name_the_folder(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        ImageFolderSource(tmp_path / "nowhere")

    (tmp_path / "flat").mkdir()
    save_png(tmp_path / "flat" / "loose.png", gradient())
    with pytest.raises(DataError, match="has no class folders"):
        ImageFolderSource(tmp_path / "flat")

    make_class_tree(tmp_path / "one", {"only": ["1.png"]})
    with pytest.raises(DataError, match="needs at least two classes"):
        ImageFolderSource(tmp_path / "one")

    make_class_tree(tmp_path / "hollow", {"a": ["1.png"]})
    (tmp_path / "hollow" / "b").mkdir()
    (tmp_path / "hollow" / "b" / ".DS_Store").write_bytes(b"\0")
    with pytest.raises(DataError, match=r"class folder .*hollow/b has no files"):
        ImageFolderSource(tmp_path / "hollow")

    make_class_tree(tmp_path / "mixed" / "train", {"a": ["1.png"], "b": ["2.png"]})
    make_class_tree(tmp_path / "mixed", {"c": ["3.png"]})
    with pytest.raises(DataError, match=r"is ambiguous: top-level folders train -> train look like splits, but c do "
                                        r"not .*data\.split_folders"):
        ImageFolderSource(tmp_path / "mixed")


def test_patient_pattern_gives_patient_ids(tmp_path):
    names = {
        "NORMAL": ["IM-0115-0001.jpeg", "IM-0115-0002.jpeg", "NORMAL2-IM-1427-0001.jpeg"],
        "PNEUMONIA": ["person1_bacteria_1.jpeg", "person1_virus_6.jpeg", "person1000_virus_1681.jpeg"],
    }
    source = ImageFolderSource(make_class_tree(tmp_path, names), patient_pattern=KERMANY_PATIENT_PATTERN)
    assert {record.id.split("/")[1]: record.patient_id for record in source.records()} == {
        "IM-0115-0001.jpeg": "IM-0115",
        "IM-0115-0002.jpeg": "IM-0115",
        "NORMAL2-IM-1427-0001.jpeg": "NORMAL2-IM-1427",
        "person1_bacteria_1.jpeg": "person1",
        "person1_virus_6.jpeg": "person1",
        "person1000_virus_1681.jpeg": "person1000",
    }
    without_group = ImageFolderSource(tmp_path, patient_pattern=r"person\d+")
    patients = Counter(r.patient_id for r in without_group.records(None))
    assert patients == {"person1": 2, "person1000": 1, None: 3}
    with pytest.raises(ConfigError, match="not a valid regular expression"):
        ImageFolderSource(tmp_path, patient_pattern="(unclosed")


def test_image_folder_fingerprint_tracks_content(tmp_path):
    root = make_class_tree(tmp_path, {"a": ["1.png"], "b": ["2.png"]})
    first = ImageFolderSource(root).fingerprint()
    assert first.startswith("sha256:") and ImageFolderSource(root).fingerprint() == first
    save_png(root / "b" / "2.png", np.zeros((30, 30), dtype=np.uint8))
    assert ImageFolderSource(root).fingerprint() != first


# -- ManifestSource ------------------------------------------------------------------------------------------------


def write_manifest(folder: Path, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "labels.csv"
    path.write_text(text)
    return path


def test_manifest_with_names_patients_splits_and_extra_columns(tmp_path):
    save_png(tmp_path / "img" / "first scan.png", gradient())
    save_png(tmp_path / "img" / "b.png", colour())
    save_png(tmp_path / "img" / "c.png", gradient())
    csv_path = write_manifest(
        tmp_path,
        "Path, Label ,patient_id,split,width\n"
        "img/first scan.png,pneumonia,p1,Train,7\n"
        "img\\b.png,normal,p1,train,7\n"
        "\n"
        "./img/c.png,normal,,TEST,7\n",
    )
    source = ManifestSource(csv_path)
    assert source.label_names == ["normal", "pneumonia"]
    assert source.official_splits() == ["train", "test"]
    assert [(r.id, r.label, r.patient_id, r.split) for r in source.records()] == [
        ("img/first scan.png", 1, "p1", "train"),
        ("img/b.png", 0, "p1", "train"),
        ("img/c.png", 0, None, "test"),
    ]
    assert [r.id for r in source.records("test")] == ["img/c.png"]
    np.testing.assert_array_equal(source.load(source.records()[1]).image, colour())
    assert source.fingerprint().startswith("sha256:")


def test_manifest_integer_labels_given_names_and_root(tmp_path):
    save_png(tmp_path / "images" / "a.png", gradient())
    csv_path = write_manifest(tmp_path / "lists", "path,label\na.png,1\nb.png,0\nc.png,\n")
    source = ManifestSource(csv_path, root=tmp_path / "images")
    assert source.label_names == ["0", "1"]
    assert [r.label for r in source.records()] == [1, 0, None]
    assert source.records()[0].path == str(tmp_path / "images" / "a.png")
    with pytest.raises(InvalidImageError, match="file not found"):
        source.load(source.records()[1])

    named = ManifestSource(csv_path, root=tmp_path / "images", label_names=["healthy", "sick"])
    assert named.label_names == ["healthy", "sick"] and [r.label for r in named.records()] == [1, 0, None]

    names_csv = write_manifest(tmp_path / "names", "path,label\na.png,sick\nb.png,healthy\n")
    assert [r.label for r in ManifestSource(names_csv, label_names=["sick", "healthy"]).records()] == [0, 1]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "the file is empty"),
        ("path,label\n", "has a header but no rows"),
        ("file,label\na.png,x\n", r"line 1: missing column\(s\) path"),
        ("path,label,split\na.png,x,train\nb.png,y,extra\n", r"line 3: unknown split 'extra'"),
        ("path,label\na.png,x\n,y\n", "line 3: empty path"),
        ("path,label\na.png,x\nb.png,y\na.png,y\n", r"line 4: path 'a.png' is listed twice \(first on line 2\)"),
        ("path,label,split\na.png,x,train\nb.png,y,\n", "filled in for 1 of 2 rows"),
    ],
)
def test_manifest_errors_name_the_csv_and_line(tmp_path, text, message):
    csv_path = write_manifest(tmp_path, text)
    with pytest.raises(DataError, match=message) as caught:
        ManifestSource(csv_path)
    assert str(csv_path) in str(caught.value)


def test_manifest_label_outside_given_names(tmp_path):
    csv_path = write_manifest(tmp_path, "path,label\na.png,normal\nb.png,tumor\n")
    with pytest.raises(DataError, match=r"line 3: label 'tumor' is not one of the label names"):
        ManifestSource(csv_path, label_names=["normal", "pneumonia"])
    with pytest.raises(DataError, match="does not exist"):
        ManifestSource(tmp_path / "absent.csv")


# -- MedMNISTSource ------------------------------------------------------------------------------------------------


def write_medmnist_npz(path: Path, *, counts=(("train", 6), ("val", 2), ("test", 3)), channels: int = 0) -> dict:
    """A tiny npz in MedMNIST's layout whose every image is distinct; returns the arrays written."""
    arrays = {}
    for offset, (split, count) in enumerate(counts):
        shape = (count, 4, 4, channels) if channels else (count, 4, 4)
        images = (np.arange(np.prod(shape)).reshape(shape) + 50 * offset) % 256
        arrays[f"{split}_images"] = images.astype(np.uint8)
        arrays[f"{split}_labels"] = (np.arange(count) % 2).reshape(-1, 1).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)
    return arrays


@pytest.fixture
def isolated_medmnist_folders(tmp_path, monkeypatch):
    """No real cache or data folder is visible: every look-up folder is an empty temporary one."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MEDMNIST_ROOT", str(tmp_path / "medmnist_root"))
    monkeypatch.setenv("MEDXAI_DATA_DIR", str(tmp_path / "medxai_data"))
    return tmp_path


def test_medmnist_from_a_file(tmp_path):
    arrays = write_medmnist_npz(tmp_path / "pneumoniamnist.npz")
    source = MedMNISTSource(tmp_path / "pneumoniamnist.npz")
    assert isinstance(source, Source)
    assert source.description == "medmnist pneumoniamnist"
    assert source.label_names == ["normal", "pneumonia"]
    assert source.official_splits() == ["train", "val", "test"]
    assert [len(source.records(split)) for split in ("train", "val", "test")] == [6, 2, 3]
    record = source.records("val")[1]
    assert (record.id, record.label, record.index, record.split) == ("pneumoniamnist/val/1", 1, 1, "val")
    sample = source.load(record)
    np.testing.assert_array_equal(sample.image, arrays["val_images"][1])
    assert sample.image.dtype == np.uint8 and sample.label == 1
    sample.image[:] = 0  # the source keeps its own copy
    assert source.load(record).image.any()
    expected_md5 = hashlib.md5((tmp_path / "pneumoniamnist.npz").read_bytes()).hexdigest()
    assert source.fingerprint() == f"md5:{expected_md5}"


def test_medmnist_by_name_searches_folders_and_sizes(isolated_medmnist_folders):
    folders = isolated_medmnist_folders
    write_medmnist_npz(folders / "medxai_data" / "medmnist" / "breastmnist.npz")
    write_medmnist_npz(folders / "mine" / "breastmnist_64.npz", channels=3)
    assert MedMNISTSource("BreastMNIST").path == folders / "medxai_data" / "medmnist" / "breastmnist.npz"
    larger = MedMNISTSource("breastmnist", size=64, data_dir=folders / "mine")
    assert larger.size == 64 and larger.description == "medmnist breastmnist size 64"
    assert larger.label_names == ["malignant", "normal, benign"]
    assert larger.load(larger.records()[0]).image.shape == (4, 4, 3)
    assert larger.records()[0].id == "breastmnist/train/0"
    with pytest.raises(DataError, match="size must be one of"):
        MedMNISTSource("breastmnist", size=32)


def test_medmnist_absent_offline_says_where_to_put_it(isolated_medmnist_folders):
    with pytest.raises(DataError) as caught:
        MedMNISTSource("retinamnist", size=128, download=False)
    message = str(caught.value)
    assert "retinamnist_128.npz not found" in message
    assert str(isolated_medmnist_folders / "medxai_data" / "medmnist") in message
    assert str(isolated_medmnist_folders / "home" / ".medmnist") in message
    assert "zenodo.org/records/10519652/files/retinamnist_128.npz" in message


def test_medmnist_download_checks_md5_then_keeps_the_file(isolated_medmnist_folders, monkeypatch):
    monkeypatch.delenv("MEDXAI_OFFLINE", raising=False)
    write_medmnist_npz(isolated_medmnist_folders / "payload.npz")
    payload = (isolated_medmnist_folders / "payload.npz").read_bytes()
    requested = []

    def fake_urlopen(url, timeout):
        requested.append((url, timeout))
        return io.BytesIO(payload)

    monkeypatch.setattr("urllib.request.urlopen", fake_urlopen)
    cache = isolated_medmnist_folders / "medmnist_root"
    with pytest.raises(DataError, match="MD5"):  # the published MD5 is not that of the synthetic payload
        MedMNISTSource("pneumoniamnist")
    assert not cache.exists() or list(cache.iterdir()) == []  # nothing half-written is left behind

    info = _medmnist.MEDMNIST_SUBSETS["pneumoniamnist"]
    correct = dataclasses.replace(info, md5_by_size={28: hashlib.md5(payload).hexdigest()})
    monkeypatch.setitem(_medmnist.MEDMNIST_SUBSETS, "pneumoniamnist", correct)
    source = MedMNISTSource("pneumoniamnist")
    assert source.path == cache / "pneumoniamnist.npz" and len(source.records()) == 11
    assert requested[-1][0] == "https://zenodo.org/records/10519652/files/pneumoniamnist.npz?download=1"


def test_medmnist_network_failure_is_a_data_error(isolated_medmnist_folders, monkeypatch):
    monkeypatch.delenv("MEDXAI_OFFLINE", raising=False)

    def failing_urlopen(url, timeout):
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr("urllib.request.urlopen", failing_urlopen)
    with pytest.raises(DataError, match=r"could not download .*no route to host.*put it in one of those folders"):
        MedMNISTSource("octmnist")


def test_medmnist_rejects_multi_label_and_unknown_names(tmp_path):
    with pytest.raises(DataError, match="multi-label"):
        MedMNISTSource("chestmnist", download=False)
    arrays = {"train_images": np.zeros((3, 4, 4), np.uint8), "train_labels": np.zeros((3, 14), np.uint8)}
    np.savez(tmp_path / "mystery.npz", **arrays)
    with pytest.raises(DataError, match="multi-label"):
        MedMNISTSource(tmp_path / "mystery.npz")
    with pytest.raises(DataError, match="unknown MedMNIST subset 'mnist'"):
        MedMNISTSource("mnist")
    np.savez(tmp_path / "other.npz", pixels=np.zeros(3))
    with pytest.raises(DataError, match="not a MedMNIST file"):
        MedMNISTSource(tmp_path / "other.npz")


def test_medmnist_unknown_file_name_gets_numbered_labels(synthetic_npz):
    source = MedMNISTSource(synthetic_npz)
    assert source.label_names == ["0", "1"]
    assert Counter(record.label for record in source.records("train")) == {0: 40, 1: 40}


# -- open_source ---------------------------------------------------------------------------------------------------


def test_open_source_chooses_by_spec(tmp_path, isolated_medmnist_folders):
    folder = make_class_tree(tmp_path / "folder", {"a": ["1.png"], "b": ["2.png"]})
    csv_path = write_manifest(tmp_path / "manifest", "path,label\nx.png,a\n")
    write_medmnist_npz(tmp_path / "npz" / "dermamnist.npz")
    assert isinstance(open_source(folder), ImageFolderSource)
    assert isinstance(open_source(str(csv_path)), ManifestSource)
    assert isinstance(open_source(tmp_path / "npz" / "dermamnist.npz"), MedMNISTSource)
    by_name = open_source("dermamnist", data_dir=tmp_path / "npz", patient_pattern=None)
    assert isinstance(by_name, MedMNISTSource) and by_name.label_names[4] == "melanoma"

    with pytest.raises(DataError, match="no such file or folder"):
        open_source(tmp_path / "nothing here")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="cannot use .*notes.txt as a data source"):
        open_source(tmp_path / "notes.txt")
    with pytest.raises(ConfigError, match="size do not apply to ImageFolderSource"):
        open_source(folder, size=64)


# -- real data (MEDXAI_DATA_DIR) -----------------------------------------------------------------------------------


@pytest.mark.realdata
def test_real_pneumoniamnist_counts(data_dir):
    source = MedMNISTSource(data_dir / "medmnist" / "pneumoniamnist.npz")
    assert source.label_names == ["normal", "pneumonia"]
    counts = {split: Counter(r.label for r in source.records(split)) for split in source.official_splits()}
    assert counts == {
        "train": {0: 1214, 1: 3494},
        "val": {0: 135, 1: 389},
        "test": {0: 234, 1: 390},
    }
    assert source.fingerprint() == "md5:28209eda62fecd6e6a2d98b1501bb15f"
    sample = source.load(source.records("test")[0])
    assert sample.image.shape == (28, 28) and sample.image.dtype == np.uint8


@pytest.mark.realdata
def test_real_kermany_splits_and_patients(data_dir):
    source = ImageFolderSource(data_dir / "chest_xray_kermany_224", patient_pattern=KERMANY_PATIENT_PATTERN)
    assert source.label_names == ["NORMAL", "PNEUMONIA"]
    assert source.official_splits() == ["train", "test"]
    assert Counter(r.label for r in source.records("train")) == {0: 1341, 1: 3875}
    assert Counter(r.label for r in source.records("test")) == {0: 234, 1: 390}
    assert all(record.patient_id for record in source.records())

    carved = carve_splits(source.records("train"), val_fraction=0.1, seed=0)
    train_patients = {r.patient_id for r in carved["train"]}
    val_patients = {r.patient_id for r in carved["val"]}
    assert not train_patients & val_patients
    assert len(carved["train"]) + len(carved["val"]) == 5216
    val_counts = Counter(r.label for r in carved["val"])
    assert abs(val_counts[0] - 134) <= 5 and abs(val_counts[1] - 388) <= 8

    sample = source.load(source.records("test")[0])
    assert sample.image.shape == (224, 224, 3)


@pytest.mark.realdata
def test_real_brain_mri_every_file_loads(data_dir):
    source = open_source(data_dir / "brain_mri_yes_no")
    assert source.label_names == ["no", "yes"]
    assert Counter(r.label for r in source.records()) == {0: 98, 1: 155}
    formats = Counter()
    for record in source.records():
        sample = source.load(record)
        assert sample.image.dtype == np.uint8 and sample.image.ndim in (2, 3)
        formats[(sample.meta["format"], Path(record.id).suffix.lower())] += 1
    assert formats[("PNG", ".jpg")] >= 1  # PNGs named .jpg are read by content
    assert any(" " in record.id for record in source.records())


@pytest.mark.realdata
def test_real_fullres_manifest(data_dir):
    source = ManifestSource(data_dir / "chest_xray_fullres_sample" / "manifest.csv")
    assert source.label_names == ["NORMAL", "PNEUMONIA"]
    assert Counter(r.label for r in source.records()) == {0: 20, 1: 20}

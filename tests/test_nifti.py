"""NIfTI: slices in the radiological convention whatever the stored orientation, 4D series, slices as a dataset."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medxai.data import read_image
from medxai.data.readers.image import read_image_with_info
from medxai.data.readers.nifti import volume_slice
from medxai.data.sources import VolumeSliceSource
from medxai.data.sources import ImageFolderSource
from medxai.data.splits import carve_splits
from medxai.errors import ConfigError, ImageTooLargeError, InvalidImageError

NIBABEL_DATA = Path(nib.__file__).parent / "tests" / "data"
SHAPE = (6, 5, 4)  # x (R), y (A), z (S)


def ras_volume() -> np.ndarray:
    """A volume whose every voxel is unique: value = 100 x + 10 y + z."""
    x, y, z = np.meshgrid(*(np.arange(n) for n in SHAPE), indexing="ij")
    return (100 * x + 10 * y + z).astype(np.int16)


def save(path: Path, data: np.ndarray, affine: np.ndarray, **header) -> Path:
    image = nib.Nifti1Image(data, affine)
    for key, value in header.items():
        image.header[key] = value
    nib.save(image, path)
    return path


def stored_variants(tmp_path: Path) -> dict[str, Path]:
    """The same anatomy stored RAS, LPS (x and y flipped) and with permuted axes (S, R, A order)."""
    data = ras_volume()
    ras = np.diag([2.0, 2.0, 3.0, 1.0])
    lps = np.diag([-2.0, -2.0, 3.0, 1.0])
    lps[:3, 3] = [2.0 * (SHAPE[0] - 1), 2.0 * (SHAPE[1] - 1), 0]
    permuted = np.zeros((4, 4))
    permuted[0, 1], permuted[1, 2], permuted[2, 0], permuted[3, 3] = 2.0, 2.0, 3.0, 1.0  # array axes (S, R, A)
    return {
        "ras": save(tmp_path / "ras.nii", data, ras),
        "lps": save(tmp_path / "lps.nii.gz", data[::-1, ::-1, :].copy(), lps),
        "sra": save(tmp_path / "sra.nii", np.transpose(data, (2, 0, 1)).copy(), permuted),
    }


def test_the_middle_axial_slice_is_the_default_in_the_radiological_convention(tmp_path):
    path = stored_variants(tmp_path)["ras"]
    image, info = read_image_with_info(path)
    z = SHAPE[2] // 2
    # Rows: anterior (high y) at the top; columns: the patient's right (high x) on the viewer's left.
    expected = np.array([[100 * x + 10 * y + z for x in reversed(range(SHAPE[0]))] for y in reversed(range(SHAPE[1]))])
    np.testing.assert_array_equal(image, expected)
    assert image.dtype == np.int16
    assert info["format"] == "NIfTI" and info["axis"] == "axial" and info["slice"] == z
    assert info["original_size"] == [SHAPE[0], SHAPE[1]] and info["orientation"] == "RAS"


def test_orientation_is_undone_with_the_affine(tmp_path):
    variants = stored_variants(tmp_path)
    for axis in ("axial", "coronal", "sagittal"):
        reference = read_image(variants["ras"], axis=axis, slice_index=1)
        for name in ("lps", "sra"):
            np.testing.assert_array_equal(read_image(variants[name], axis=axis, slice_index=1), reference, err_msg=name)
    assert read_image_with_info(variants["lps"])[1]["orientation"] == "LPS"


def test_coronal_and_sagittal_put_superior_at_the_top(tmp_path):
    path = stored_variants(tmp_path)["ras"]
    coronal = read_image(path, axis="coronal", slice_index=2)  # fixed y = 2; rows z high -> low; columns x high -> low
    assert coronal.shape == (SHAPE[2], SHAPE[0])
    assert coronal[0, 0] == 100 * (SHAPE[0] - 1) + 20 + (SHAPE[2] - 1)
    sagittal = read_image(path, axis="sagittal", slice_index=3)  # fixed x = 3; columns y high (anterior) -> low
    assert sagittal.shape == (SHAPE[2], SHAPE[1])
    assert sagittal[0, 0] == 300 + 10 * (SHAPE[1] - 1) + (SHAPE[2] - 1)
    assert sagittal[-1, -1] == 300
    with pytest.raises(ConfigError, match="axis"):
        read_image(path, axis="oblique")


def test_4d_series_volume_and_slice_choice(tmp_path):
    data = np.stack([ras_volume() + 1000 * t for t in range(3)], axis=-1)
    path = save(tmp_path / "series.nii.gz", data, np.eye(4))
    np.testing.assert_array_equal(read_image(path, volume=2, slice_index=0), volume_slice(data[..., 2], "axial", 0))
    assert read_image(path).min() == 2  # volume 0, middle slice z = 2
    with pytest.raises(InvalidImageError, match="slice 9"):
        read_image(path, slice_index=9)
    with pytest.raises(InvalidImageError, match="volume 5"):
        read_image(path, volume=5)


def test_scaling_non_finite_voxels_byte_order_and_content_dispatch(tmp_path):
    data = ras_volume().astype(np.float32)
    data[0, 0, 2] = np.nan
    scaled = save(tmp_path / "scaled.nii", ras_volume() + 1, np.eye(4), scl_slope=0.5, scl_inter=10.0)
    image = read_image(scaled)
    assert image.dtype == np.float32
    np.testing.assert_allclose(image, (volume_slice(ras_volume(), "axial", 2) + 1) * 0.5 + 10.0)

    nan_path = save(tmp_path / "nan.nii", data, np.eye(4))
    with_nan = read_image(nan_path)
    assert np.isfinite(with_nan).all() and with_nan[-1, -1] == with_nan[np.isfinite(with_nan)].min()

    big_endian = nib.Nifti1Image(ras_volume().astype(">i2"), np.eye(4))
    nib.save(big_endian, tmp_path / "big.nii")
    np.testing.assert_array_equal(read_image(tmp_path / "big.nii"), volume_slice(ras_volume(), "axial", 2))
    assert read_image(tmp_path / "big.nii").dtype.isnative

    shutil.copy(scaled, tmp_path / "volume.dat")  # the content decides, not the name
    np.testing.assert_array_equal(read_image(tmp_path / "volume.dat"), image)
    (tmp_path / "volume.bin").write_bytes(gzip.compress(scaled.read_bytes()))
    np.testing.assert_array_equal(read_image(tmp_path / "volume.bin"), image)


def test_damaged_and_oversized_volumes_are_rejected(tmp_path):
    path = save(tmp_path / "v.nii", ras_volume(), np.eye(4))
    content = path.read_bytes()
    (tmp_path / "truncated.nii").write_bytes(content[: len(content) - 40])
    with pytest.raises(InvalidImageError, match="truncated"):
        read_image(tmp_path / "truncated.nii")
    huge = bytearray(content)
    huge[42:48] = np.array([30000, 30000, 30000], dtype="<i2").tobytes()  # dim[1..3]: 2.7e13 voxels
    (tmp_path / "huge.nii").write_bytes(bytes(huge))
    with pytest.raises(ImageTooLargeError, match="MAX_VOLUME_VOXELS"):
        read_image(tmp_path / "huge.nii")
    pair = bytearray(content)
    pair[344:348] = b"ni1\x00"
    (tmp_path / "pair.hdr").write_bytes(bytes(pair))
    with pytest.raises(InvalidImageError, match="pairs are not supported"):
        read_image(tmp_path / "pair.hdr")


@pytest.mark.parametrize("name", ["anatomical.nii", "example4d.nii.gz", "example_nifti2.nii.gz", "standard.nii.gz"])
def test_real_volumes_match_nibabels_closest_canonical_orientation(name):
    """nibabel's installed test volumes; the reference reorients with nib.as_closest_canonical instead."""
    if not (NIBABEL_DATA / name).is_file():
        pytest.skip(f"nibabel test file {name} not installed")
    canonical = nib.as_closest_canonical(nib.load(NIBABEL_DATA / name))
    data = np.asanyarray(canonical.dataobj)
    if data.ndim == 4:
        data = data[..., 0]
    expected = data[::-1, ::-1, data.shape[2] // 2].T
    image = read_image(NIBABEL_DATA / name)
    np.testing.assert_allclose(image, expected.astype(image.dtype))


def test_every_slice_of_a_set_of_volumes_as_a_dataset(tmp_path):
    rng = np.random.default_rng(0)
    for label, count in (("healthy", 2), ("lesion", 2)):
        for index in range(count):
            volume = rng.integers(0, 1000, size=(8, 7, 5 + index)).astype(np.int16)
            (tmp_path / "vols" / label).mkdir(parents=True, exist_ok=True)
            save(tmp_path / "vols" / label / f"subject {index}.nii.gz", volume, np.eye(4))
    (tmp_path / "vols" / "lesion" / "notes.txt").write_text("not a volume")
    source = VolumeSliceSource(ImageFolderSource(tmp_path / "vols"), axis="axial")
    records = source.records()
    assert len(records) == 2 * (5 + 6)  # z slices of every volume
    assert [path for path, _ in source.skipped if path.endswith("notes.txt")]
    first = records[0]
    assert first.id == "healthy/subject 0.nii.gz#axial0000" and first.patient_id == "healthy/subject 0.nii.gz"
    sample = source.load(records[3])
    np.testing.assert_array_equal(sample.image, read_image(records[3].path, slice_index=3))
    assert sample.label == 0 and sample.meta["slice"] == 3
    # Slices of one volume never straddle splits.
    splits = carve_splits(records, val_fraction=0.5, seed=1)
    volumes = {name: {record.patient_id for record in split} for name, split in splits.items()}
    assert not volumes["train"] & volumes["val"]
    coronal = VolumeSliceSource(ImageFolderSource(tmp_path / "vols"), axis="coronal")
    assert len(coronal) == 4 * 7

"""NIfTI: slices in the radiological convention whatever the stored orientation, 4D series, slices as a dataset."""

from __future__ import annotations

import gzip
import shutil
import struct
import tracemalloc
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medxai.data import read_image
from medxai.data.readers import probe_image, read_image_bytes
from medxai.data.readers.image import read_image_with_info
from medxai.data.readers.nifti import AXES, read_nifti_volume, volume_slice
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


# -- hostile headers (issue 17, defect 1) ------------------------------------------------------------------------------
#: Where each header field lies, per NIfTI version: (offset, struct format of the whole field).
NIFTI_FIELDS = {
    1: {"dim": (40, "8h"), "datatype": (70, "h"), "bitpix": (72, "h"), "pixdim": (76, "8f"), "vox_offset": (108, "f"),
        "scl_slope": (112, "f"), "scl_inter": (116, "f"), "qform_code": (252, "h"), "sform_code": (254, "h"),
        "quatern": (256, "6f"), "srow": (280, "12f")},
    2: {"datatype": (12, "h"), "bitpix": (14, "h"), "dim": (16, "8q"), "pixdim": (104, "8d"), "vox_offset": (168, "q"),
        "scl_slope": (176, "d"), "scl_inter": (184, "d"), "qform_code": (344, "i"), "sform_code": (348, "i"),
        "quatern": (352, "6d"), "srow": (400, "12d")},
}
NIFTI_VARIANTS = [(1, "<"), (1, ">"), (2, "<"), (2, ">")]


def nifti_bytes(version: int = 1, order: str = "<", data: np.ndarray | None = None) -> bytes:
    """A valid single-file NIfTI-1 or NIfTI-2 volume (int16, 6 x 5 x 4 by default) in the given byte order."""
    data = ras_volume() if data is None else data
    header_class, image_class = (nib.Nifti1Header, nib.Nifti1Image) if version == 1 else (nib.Nifti2Header,
                                                                                         nib.Nifti2Image)
    header = header_class(endianness=order)
    header.set_data_dtype(data.dtype)
    return image_class(data, np.diag([2.0, 2.0, 3.0, 1.0]), header=header).to_bytes()


def patched(content: bytes, version: int, order: str, field: str, value: float | tuple, index: int = 0) -> bytes:
    """``content`` with values of a header field replaced from its ``index``-th value on (``value``: one or more)."""
    offset, layout = NIFTI_FIELDS[version][field]
    code = layout[-1]
    values = value if isinstance(value, tuple) else (value,)
    position = offset + index * struct.calcsize(code)
    result = bytearray(content)
    result[position : position + struct.calcsize(code) * len(values)] = struct.pack(order + code * len(values), *values)
    return bytes(result)


def the_issues_header() -> bytes:
    """Issue 17's reproduction: 352 bytes, dims 3 x 64 x 64 x 8, datatype 2, ``n+1``, vox_offset NaN at byte 108."""
    header = bytearray(352)
    struct.pack_into("<i", header, 0, 348)
    struct.pack_into("<8h", header, 40, 3, 64, 64, 8, 1, 1, 1, 1)
    struct.pack_into("<hh", header, 70, 2, 8)
    struct.pack_into("<f", header, 108, float("nan"))
    header[344:348] = b"n+1\x00"
    return bytes(header)


def test_the_issues_header_with_vox_offset_nan_is_a_clear_error(tmp_path):
    path = tmp_path / "nan.nii"
    path.write_bytes(the_issues_header())
    for read in (lambda: read_image(path), lambda: probe_image(path),
                 lambda: read_image_bytes(the_issues_header(), name="upload"),
                 lambda: read_image_bytes(gzip.compress(the_issues_header()), name="upload")):
        with pytest.raises(InvalidImageError, match="NIfTI header is damaged: vox_offset nan"):
            read()


# field, value, index, reason: each value gets the same reason in NIfTI-1 and NIfTI-2, in both byte orders.
DAMAGED_FIELDS = [
    ("vox_offset", float("nan"), 0, "vox_offset nan"),
    ("vox_offset", float("inf"), 0, "vox_offset inf"),
    ("vox_offset", float("-inf"), 0, "vox_offset -inf"),
    ("vox_offset", 352.5, 0, "vox_offset 352.5 .not a whole number"),
    ("vox_offset", -352, 0, "vox_offset -352 .expected"),
    ("vox_offset", 0, 0, "vox_offset 0 .expected"),
    ("vox_offset", 300, 0, "vox_offset 300 .expected"),
    ("vox_offset", 2**30, 0, "vox_offset 1073741824 .expected"),
    ("vox_offset", 10_000, 0, "truncated NIfTI file"),  # valid, but past the end of the file
    ("dim", 0, 0, "dim.0. = 0"),
    ("dim", -1, 0, "dim.0. = -1"),
    ("dim", 8, 0, "dim.0. = 8"),
    ("dim", 0, 2, "empty dimension: 6x0x4"),
    ("dim", -5, 1, "empty dimension: -5x5x4"),
    ("dim", 30000, 1, "truncated NIfTI file: [0-9]+ of 1200[0-9]{3} bytes"),  # more data than the file holds
    ("dim", (30000, 30000, 30000), 1, "MAX_VOLUME_VOXELS"),
    ("datatype", 0, 0, "unknown datatype 0"),
    ("datatype", 3, 0, "unknown datatype 3"),
    ("datatype", -4, 0, "unknown datatype -4"),
    ("datatype", 16, 0, "bitpix 16 does not match datatype 16 .32 bits"),
    ("bitpix", 0, 0, "bitpix 0 does not match datatype 4"),
    ("bitpix", -16, 0, "bitpix -16 does not match"),
    ("bitpix", 64, 0, "bitpix 64 does not match"),
]


@pytest.mark.parametrize("version, order", NIFTI_VARIANTS, ids=[f"nifti{v}{o}" for v, o in NIFTI_VARIANTS])
def test_every_header_field_that_sizes_or_places_the_data_is_validated(version, order, tmp_path):
    content = nifti_bytes(version, order)
    for field, value, index, reason in DAMAGED_FIELDS:
        if version == 2 and field == "vox_offset" and not float(value).is_integer():
            continue  # NIfTI-2 stores vox_offset as an integer
        damaged = patched(content, version, order, field, value, index)
        (tmp_path / "damaged.nii").write_bytes(damaged)
        for read in (lambda: read_image_bytes(damaged), lambda: read_image(tmp_path / "damaged.nii"),
                     lambda: probe_image(tmp_path / "damaged.nii"), lambda: read_image_bytes(gzip.compress(damaged))):
            with pytest.raises(InvalidImageError, match=reason):
                read()


@pytest.mark.parametrize("version, order", NIFTI_VARIANTS, ids=[f"nifti{v}{o}" for v, o in NIFTI_VARIANTS])
def test_non_finite_scaling_and_placement_fields_do_not_crash(version, order):
    """pixdim, qform and sform only place the volume in space: when they cannot give an affine the stored axis order
    is kept; a non-finite scl_slope means no scaling (as nibabel reads it), a non-finite scl_inter no offset."""
    content = nifti_bytes(version, order)
    reference = read_image_bytes(content)[0]
    for field, value, index in [("pixdim", float("nan"), 1), ("pixdim", float("inf"), 2), ("pixdim", -2.0, 1),
                                ("pixdim", 0.0, 3), ("quatern", float("nan"), 0), ("srow", float("inf"), 0),
                                ("qform_code", 1, 0), ("scl_slope", float("nan"), 0), ("scl_slope", float("inf"), 0)]:
        damaged = patched(content, version, order, field, value, index)
        if field in ("quatern", "srow"):
            damaged = patched(damaged, version, order, "qform_code" if field == "quatern" else "sform_code", 1)
        image, info = read_image_bytes(damaged)
        assert image.shape in (reference.shape, reference.shape[::-1]) and np.isfinite(image).all(), (field, value)
        if field == "scl_slope":
            np.testing.assert_array_equal(image, reference)  # no scaling, and the affine untouched
    offset_only = patched(patched(content, version, order, "scl_slope", 2.0), version, order, "scl_inter", float("nan"))
    np.testing.assert_array_equal(read_image_bytes(offset_only)[0], reference * 2.0)


def test_a_truncated_file_is_found_from_its_header_before_reading(tmp_path):
    content = nifti_bytes()
    expected = len(content)
    for cut in (352, 353, expected - 1):
        (tmp_path / "cut.nii").write_bytes(content[:cut])
        for read in (lambda: read_image(tmp_path / "cut.nii"), lambda: probe_image(tmp_path / "cut.nii"),
                     lambda: read_image_bytes(content[:cut])):
            with pytest.raises(InvalidImageError, match=f"truncated NIfTI file: {cut} of {expected} bytes"):
                read()
        with pytest.raises(InvalidImageError, match=f"truncated NIfTI file: {cut} of {expected} bytes"):
            read_image_bytes(gzip.compress(content[:cut]))  # the inflated length counts


def test_one_slice_costs_that_slice_not_the_whole_volume_in_float64(tmp_path):
    """A scaled int16 volume of 8 MB: nibabel would make all of it float64 (32 MB) to give one slice."""
    volume = np.random.default_rng(0).integers(0, 1000, (160, 160, 160)).astype(np.int16)
    path = save(tmp_path / "scaled.nii", volume, np.eye(4), scl_slope=0.5, scl_inter=1.0)
    tracemalloc.start()
    try:
        image = read_image(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    np.testing.assert_allclose(image, volume_slice(volume, "axial", 80) * 0.5 + 1.0)
    assert peak < volume.nbytes * 1.3, peak  # the file's bytes and one slice


@pytest.mark.parametrize("axis", AXES)
def test_a_slice_read_alone_equals_the_slice_of_the_whole_volume(axis, tmp_path):
    for name, path in stored_variants(tmp_path).items():
        whole, _ = read_nifti_volume(path, compressed=name == "lps")
        for index in range(whole.shape[AXES.index(axis)]):
            np.testing.assert_array_equal(read_image(path, axis=axis, slice_index=index),
                                          volume_slice(whole, axis, index), err_msg=f"{name} {axis} {index}")

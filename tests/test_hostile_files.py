"""Hostile and broken inputs: each one a typed error with a clear reason; batches account for every file; a fuzz test
over the decoders never crashes the process."""

from __future__ import annotations

import csv
import gzip
import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from pydicom.encaps import encapsulate

from medxai.cli import main
from medxai.data import read_image
from medxai.data.readers import limits as _limits
from medxai.errors import ImageTooLargeError, InvalidImageError, UnsupportedDicomError
from test_dicom import PYDICOM_TEST_FILES, make_dicom


def _png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _jpeg_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header (with a valid CRC) claims ``width`` x ``height`` grey pixels, followed by almost nothing."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    chunk = b"IHDR" + header
    ihdr = struct.pack(">I", len(header)) + chunk + struct.pack(">I", zlib.crc32(chunk))
    data = zlib.compress(b"\x00" * 64)
    idat = struct.pack(">I", len(data)) + b"IDAT" + data + struct.pack(">I", zlib.crc32(b"IDAT" + data))
    return b"\x89PNG\r\n\x1a\n" + ihdr + idat + struct.pack(">I", 0) + b"IEND" + struct.pack(">I", zlib.crc32(b"IEND"))


def _dicom_with(tmp_path: Path, name: str, pixels: np.ndarray | None = None, **attributes) -> Path:
    pixels = np.arange(64, dtype=np.uint16).reshape(8, 8) if pixels is None else pixels
    return make_dicom(tmp_path / name, pixels, **attributes)


def _edit(path: Path, **attributes) -> Path:
    ds = pydicom.dcmread(path)
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    ds.save_as(path)
    return path


def _encapsulated(tmp_path: Path, name: str, codestream: bytes, syntax: str, rows: int, columns: int) -> Path:
    path = _dicom_with(tmp_path, name, np.zeros((rows, columns), np.uint8))
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = syntax
    ds.PixelData = encapsulate([codestream])
    ds["PixelData"].VR = "OB"
    ds.save_as(path)
    return path


HOSTILE = {
    # name: (builder(tmp_path) -> path, error type, message pattern)
    "zero bytes": (lambda t: _write(t / "empty.png", b""), InvalidImageError, "empty file"),
    "text": (lambda t: _write(t / "notes.jpg", b"patient list, do not share\n" * 20), InvalidImageError,
             "not a recognised image format"),
    "random bytes": (lambda t: _write(t / "noise.dcm", np.random.default_rng(0).bytes(5000)), InvalidImageError,
                     "not a recognised image format"),
    "truncated PNG": (lambda t: _write(t / "cut.png", _png_bytes(_noise())[:300]), InvalidImageError,
                      "truncated or corrupt"),
    "truncated JPEG": (lambda t: _write(t / "cut.jpg", _jpeg_bytes(_noise())[:400]), InvalidImageError,
                       "truncated or corrupt"),
    "truncated DICOM": (lambda t: _write(t / "cut.dcm", _dicom_with(t, "full.dcm").read_bytes()[:-40]),
                        InvalidImageError, "pixel data"),
    "DICOM header only": (lambda t: _write(t / "head.dcm", _header_only(t)), UnsupportedDicomError,
                          "without pixel data"),
    "PNG claiming 100000 x 100000": (lambda t: _write(t / "claim.png", _png_claiming(100_000, 100_000)),
                                     ImageTooLargeError, "decompression bomb"),
    "DICOM claiming 60000 x 60000": (lambda t: _edit(_dicom_with(t, "big.dcm"), Rows=60000, Columns=60000),
                                     ImageTooLargeError, "decompression bomb"),
    "DICOM claiming 60000 frames": (lambda t: _edit(_dicom_with(t, "frames.dcm", np.zeros((512, 512), np.uint16)),
                                                    NumberOfFrames=60000),
                                    ImageTooLargeError, "MAX_VOLUME_VOXELS"),
    "DICOM with zero rows": (lambda t: _edit(_dicom_with(t, "zero.dcm"), Rows=0), InvalidImageError, "no pixels"),
    "JPEG inside DICOM larger than its header": (
        lambda t: _encapsulated(t, "jpeg.dcm", _jpeg_bytes(_gradient((400, 300))), pydicom.uid.JPEGBaseline8Bit,
                                20, 20),
        InvalidImageError, "compressed frame claims 300x400"),
    "gzip holding text": (lambda t: _write(t / "x.nii.gz", gzip.compress(b"hello " * 100)), InvalidImageError,
                          "neither a NIfTI volume nor a DICOM"),
    "corrupt gzip": (lambda t: _write(t / "y.nii.gz", gzip.compress(b"x" * 1000)[:30]), InvalidImageError,
                     "gzip"),
    "structured report": (lambda t: make_dicom(t / "sr.dcm", None, sop_class="1.2.840.10008.5.1.4.1.1.88.22"),
                          UnsupportedDicomError, "structured report"),
    "waveform": (lambda t: make_dicom(t / "ecg.dcm", None, sop_class="1.2.840.10008.5.1.4.1.1.9.1.1"),
                 UnsupportedDicomError, "waveform"),
    "a folder": (lambda t: t, InvalidImageError, "is a folder"),
}


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _gradient(shape: tuple[int, int] = (64, 64)) -> np.ndarray:
    return (np.add.outer(np.arange(shape[0]), np.arange(shape[1])) % 256).astype(np.uint8)


def _noise(shape: tuple[int, int] = (64, 64)) -> np.ndarray:
    return np.random.default_rng(1).integers(0, 256, size=shape).astype(np.uint8)


def _header_only(tmp_path: Path) -> bytes:
    ds = pydicom.dcmread(_dicom_with(tmp_path, "whole.dcm"))
    del ds.PixelData
    buffer = io.BytesIO()
    ds.save_as(buffer)
    return buffer.getvalue()


@pytest.mark.parametrize("case", list(HOSTILE), ids=list(HOSTILE))
def test_each_hostile_file_raises_a_typed_error_with_a_clear_reason(case, tmp_path):
    build, error_type, pattern = HOSTILE[case]
    path = build(tmp_path)
    with pytest.raises(error_type, match=pattern) as caught:
        read_image(path)
    assert caught.value.path == str(path) and caught.value.reason


def test_a_real_decompression_bomb_stops_at_the_pixel_limit(tmp_path, monkeypatch):
    path = tmp_path / "bomb.png"
    Image.new("L", (3000, 3000)).save(path)  # 9 M pixels in a few kB
    assert path.stat().st_size < 50_000
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000_000)
    with pytest.raises(ImageTooLargeError, match="9000000 pixels"):
        read_image(path)
    tiff = tmp_path / "bomb.tif"
    Image.new("I;16", (2000, 2000)).save(tiff, compression="tiff_deflate")
    with pytest.raises(ImageTooLargeError):
        read_image(tiff)


def test_a_gzip_bomb_stops_at_the_decompression_limit(tmp_path, monkeypatch):
    dicom = _dicom_with(tmp_path, "small.dcm").read_bytes()
    (tmp_path / "bomb.dcm.gz").write_bytes(gzip.compress(dicom + b"\x00" * 8_000_000))
    monkeypatch.setattr(_limits, "MAX_DECOMPRESSED_BYTES", 1_000_000)
    with pytest.raises(ImageTooLargeError, match="inflates past 1000000 bytes"):
        read_image(tmp_path / "bomb.dcm.gz")


def test_sixteen_bit_png_and_tiff_keep_their_dynamic_range(tmp_path):
    values = (np.arange(40 * 50, dtype=np.uint32).reshape(40, 50) * 31 % 65536).astype(np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    Image.fromarray(values).save(tmp_path / "deep.tif")
    for name in ("deep.png", "deep.tif"):
        image = read_image(tmp_path / name)
        assert image.dtype == np.uint16
        np.testing.assert_array_equal(image, values)
        assert len(np.unique(image)) > 256  # more levels than 8 bits could hold


# -- compressed frame headers (issue 17, defect 2) ----------------------------------------------------------------
def _with_app_segments(jpeg: bytes, count: int, size: int = 65535) -> bytes:
    """``count`` APP1 segments of ``size`` bytes (the most a segment holds) right after SOI, pushing SOF back."""
    app1 = b"\xff\xe1" + struct.pack(">H", size) + bytes(size - 2)
    return jpeg[:2] + app1 * count + jpeg[2:]


def _claiming(jpeg: bytes, width: int, height: int) -> bytes:
    """The JPEG with its (baseline) SOF patched to claim ``width`` x ``height``."""
    at = jpeg.index(b"\xff\xc0")
    return jpeg[: at + 5] + struct.pack(">HH", height, width) + jpeg[at + 9 :]


def test_a_frame_header_behind_two_64_kib_segments_is_still_checked(tmp_path, monkeypatch):
    """Issue 17, defect 2: the SOF was looked for in the first 64 KiB only, so the file was decoded blind."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)
    small = _jpeg_bytes(_gradient((20, 20)))
    for name, stream in (("early", _claiming(small, 300, 400)),
                         ("late", _with_app_segments(_claiming(small, 300, 400), 2))):
        path = _encapsulated(tmp_path, f"{name}.dcm", stream, pydicom.uid.JPEGBaseline8Bit, 20, 20)
        with pytest.raises(ImageTooLargeError, match="300x400 = 120000 pixels exceeds"):
            read_image(path)


def test_frame_headers_are_found_by_walking_each_stream_to_its_end():
    from medxai.data.readers.codestreams import CodestreamError, FrameHeader, jpeg_frame_header

    jpeg = _jpeg_bytes(_gradient((40, 30)))
    expected = FrameHeader(width=30, height=40, components=1, precision=8)
    assert jpeg_frame_header(jpeg) == expected
    assert jpeg_frame_header(_with_app_segments(jpeg, 3)) == expected
    sof = jpeg.index(b"\xff\xc0")
    assert jpeg_frame_header(jpeg[:sof] + b"\xff\xff\xff" + jpeg[sof:]) == expected  # fill bytes before a marker
    without_sof = jpeg[:sof] + jpeg[sof + 2 + struct.unpack(">H", jpeg[sof + 2 : sof + 4])[0] :]
    for stream, reason in [
        (without_sof, "reaches its scan .SOS. without a frame header"),
        (b"\x00" + jpeg[1:], "without its start-of-image marker"),
        (jpeg[:sof], "ends before its frame header"),
        (jpeg[: sof + 5], "with a bad or cut length"),
        (jpeg[:sof] + b"\x00" + jpeg[sof:], "no marker at byte"),
        (jpeg[:2] + b"\xff\xe1\x00\x01" + jpeg[2:], "bad or cut length .1."),
        (_claiming(jpeg, 30, 0), "no height"),
    ]:
        with pytest.raises(CodestreamError, match=reason):
            jpeg_frame_header(stream)


def _j2k_codestream() -> bytes:
    from pydicom.encaps import generate_frames

    ds = pydicom.dcmread(PYDICOM_TEST_FILES / "MR_small_jp2klossless.dcm")
    return next(generate_frames(ds.PixelData, number_of_frames=1))


def test_jpeg_2000_size_comes_from_the_siz_right_after_soc():
    from medxai.data.readers.codestreams import CodestreamError, FrameHeader, j2k_frame_header

    if not (PYDICOM_TEST_FILES / "MR_small_jp2klossless.dcm").is_file():
        pytest.skip("pydicom test file MR_small_jp2klossless.dcm not installed")
    stream = _j2k_codestream()
    expected = FrameHeader(width=64, height=64, components=1, precision=16)
    assert j2k_frame_header(stream) == expected
    jp2 = (b"\x00\x00\x00\x0cjP  \r\n\x87\n" + struct.pack(">I4s", 20, b"ftyp") + b"jp2 \x00\x00\x00\x00jp2 "
           + struct.pack(">I4s", 8 + len(stream), b"jp2c") + stream)
    assert j2k_frame_header(jp2) == expected
    comment = b"\xff\x64\x00\x06\x00\x01ab"
    siz_length = struct.unpack(">H", stream[4:6])[0]
    for damaged, reason in [
        (stream[:2] + comment + stream[2:], "SIZ. does not follow SOC"),  # a fake SIZ later never counts
        (stream[:20], "bad or cut length"),
        (stream[:40] + b"\x00\x00" + stream[42:], "0 components"),
        (stream[:8] + struct.pack(">I", 0) + stream[12:], "empty image or tile area"),
        (b"\xff\xd8" + stream[2:], "without its start-of-codestream marker"),
        (jp2.replace(b"jp2c", b"jp2x"), "without a contiguous codestream box"),
    ]:
        with pytest.raises(CodestreamError, match=reason):
            j2k_frame_header(damaged)
    assert siz_length == 41  # one component


def test_rle_segment_tables_are_checked_against_the_fragment():
    from medxai.data.readers.codestreams import CodestreamError, rle_segment_offsets

    header = struct.pack("<16I", 2, 64, 100, *([0] * 13))
    assert rle_segment_offsets(header + bytes(100)) == [64, 100]
    for table, size, reason in [
        ((0, 64), 100, "0 segments"), ((16, 64), 100, "16 segments"), ((2, 80, 100), 200, "does not start right"),
        ((2, 64, 64), 200, "do not increase"), ((2, 64, 500), 200, "do not increase"),
    ]:
        fragment = struct.pack(f"<{len(table)}I", *table) + bytes(64 - 4 * len(table)) + bytes(size - 64)
        with pytest.raises(CodestreamError, match=reason):
            rle_segment_offsets(fragment)
    with pytest.raises(CodestreamError, match="shorter than its 64-byte header"):
        rle_segment_offsets(header[:40])


# -- fuzzing -------------------------------------------------------------------------------------------------------
def _fuzz_seeds() -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    seeds = {
        "png": _png_bytes(rng.integers(0, 255, (24, 24), dtype=np.uint8)),
        "png16": _png_bytes(rng.integers(0, 65535, (16, 16), dtype=np.uint16)),
        "jpeg": _jpeg_bytes(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)),
    }
    for name in ("MR_small.dcm", "MR_small_RLE.dcm", "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm",
                 "SC_rgb_jpeg_dcmtk.dcm", "examples_palette.dcm", "emri_small.dcm"):
        if (PYDICOM_TEST_FILES / name).is_file():
            seeds[name] = (PYDICOM_TEST_FILES / name).read_bytes()
    import nibabel as nib

    buffer = io.BytesIO()
    image = nib.Nifti1Image(rng.integers(0, 100, (6, 5, 4)).astype(np.int16), np.eye(4))
    image.to_file_map({"image": nib.FileHolder(fileobj=buffer), "header": nib.FileHolder(fileobj=buffer)})
    seeds["nifti"] = buffer.getvalue()
    seeds["nifti.gz"] = gzip.compress(buffer.getvalue())
    return seeds


FUZZ_SEEDS = _fuzz_seeds()
_FUZZ_FILE = {}


@st.composite
def mutated_files(draw) -> bytes:
    data = bytearray(FUZZ_SEEDS[draw(st.sampled_from(sorted(FUZZ_SEEDS)))])
    for _ in range(draw(st.integers(1, 6))):
        if not data:
            break
        # Mostly in the headers, where a mutation changes what decoders are told to do.
        position = draw(st.integers(0, min(len(data) - 1, draw(st.sampled_from([200, 1000, len(data) - 1])))))
        kind = draw(st.sampled_from(["byte", "word", "cut", "insert"]))
        if kind == "byte":
            data[position] = draw(st.integers(0, 255))
        elif kind == "word":
            data[position : position + 4] = draw(st.sampled_from([b"\xff\xff\xff\xff", b"\x00\x00\x00\x00",
                                                                   b"\xff\xff\x00\x00", b"\x00\x00\x01\x00"]))
        elif kind == "cut":
            del data[position:]
        else:
            data[position:position] = draw(st.binary(min_size=1, max_size=8))
    return bytes(data)


def _decode_or_typed_error(tmp_path_factory, content: bytes) -> None:
    if "path" not in _FUZZ_FILE:
        _FUZZ_FILE["path"] = tmp_path_factory.mktemp("fuzz") / "input"
    path = _FUZZ_FILE["path"]
    path.write_bytes(content)
    try:
        image = read_image(path)
    except InvalidImageError as error:  # the only acceptable failure, with a reason
        assert error.reason
    else:
        assert image.ndim in (2, 3) and image.size > 0


@settings(max_examples=1500, deadline=2000, database=None, suppress_health_check=list(HealthCheck))
@given(content=mutated_files())
def test_fuzzed_real_headers_never_crash_the_decoders(tmp_path_factory, content):
    _decode_or_typed_error(tmp_path_factory, content)


@settings(max_examples=500, deadline=2000, database=None, suppress_health_check=list(HealthCheck))
@given(content=st.one_of(st.binary(max_size=2048),
                         st.builds(lambda tail: b"\x00" * 128 + b"DICM" + tail, st.binary(max_size=600)),
                         st.builds(lambda tail: b"\x1f\x8b" + tail, st.binary(max_size=200))))
def test_random_bytes_never_crash_the_decoders(tmp_path_factory, content):
    _decode_or_typed_error(tmp_path_factory, content)


# -- batches account for every file -----------------------------------------------------------------------------
def train_tiny_run(folder: Path) -> Path:
    """simple_cnn, 32 px, one epoch on a tiny synthetic MedMNIST-style file: a model to predict and explain with."""
    from conftest import make_synthetic_npz

    data = make_synthetic_npz(folder / "synthetic.npz", size=32, per_class=16)
    assert main(["train", "--data", str(data), "--out", str(folder), "--name", "run", "--epochs", "1", "--size", "32",
                 "--model", "simple_cnn", "--set", "train.batch_size=32", "--set", "train.threads=1",
                 "--set", "explain.per_outcome=1"]) == 0
    return folder / "run"


@pytest.fixture(scope="module")
def one_thread():
    """torch on one thread for the batch runs: on two busy cores, two intra-op threads spin against the other
    processes and make small tensor operations many times slower (measured: explain over 253 MRIs 48 s vs 23 s)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, one_thread) -> Path:
    return train_tiny_run(tmp_path_factory.mktemp("tiny_run"))


def _accounting(out: Path, capsys) -> tuple[int, list[dict]]:
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    skipped = list(csv.DictReader((out / "skipped.csv").open()))
    return len([line for line in lines if "skipped" not in line]), skipped


def test_predict_and_explain_list_every_hostile_file_in_skipped_csv(tiny_run, tmp_path, capsys):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for index, case in enumerate(name for name in HOSTILE if name != "a folder"):
        scratch = tmp_path / f"case{index}"
        scratch.mkdir()
        built = HOSTILE[case][0](scratch)
        (inputs / f"{index:02d} {built.name}").write_bytes(built.read_bytes())
    Image.fromarray(_gradient()).save(inputs / "good.png")
    _dicom_with(inputs, "good.dcm")
    files = sorted(path for path in inputs.iterdir())
    assert main(["predict", str(tiny_run), str(inputs), "--out", str(tmp_path / "p"), "--json"]) == 0
    predicted, skipped = _accounting(tmp_path / "p", capsys)
    assert predicted == 2 and len(skipped) == len(files) - 2
    assert all(row["reason"] for row in skipped)
    assert main(["explain", str(tiny_run), str(inputs), "--out", str(tmp_path / "e"), "--json"]) == 0
    explained, skipped = _accounting(tmp_path / "e", capsys)
    assert explained + len(skipped) == len(files) and explained == 2


def test_an_exception_no_reader_anticipated_costs_that_file_only(tiny_run, tmp_path, monkeypatch, capsys):
    """Issue 17, defect 1: a ValueError from a reader aborted `medxai predict`, losing every other file's result.
    The issue's NIfTI header (vox_offset NaN) and a reader failing in an unforeseen way, among good files."""
    from medxai.data.readers import nifti
    from test_nifti import nifti_bytes, the_issues_header

    real_native_slice = nifti.native_slice

    def failing_for_one_file(path, plane):
        if str(path).endswith("unforeseen.nii"):
            raise ValueError("unforeseen at /srv/secret/volumes/unforeseen.nii")
        return real_native_slice(path, plane)

    monkeypatch.setattr(nifti, "native_slice", failing_for_one_file)
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for index in range(3):
        Image.fromarray(_gradient((40 + index, 40))).save(inputs / f"good{index}.png")
    (inputs / "good.nii").write_bytes(nifti_bytes())
    (inputs / "nan.nii").write_bytes(the_issues_header())
    (inputs / "unforeseen.nii").write_bytes(nifti_bytes())
    assert main(["predict", str(tiny_run), str(inputs), "--out", str(tmp_path / "p"), "--json"]) == 0
    predicted, skipped = _accounting(tmp_path / "p", capsys)
    assert predicted == 4 and len(skipped) == 2  # files in = results + skipped
    reasons = {Path(row["file"]).name: row["reason"] for row in skipped}
    assert reasons["nan.nii"] == "NIfTI header is damaged: vox_offset nan (not a whole number of bytes)"
    assert reasons["unforeseen.nii"] == "unreadable (ValueError: unforeseen at <path>)"


def test_an_images_unforeseen_preprocessing_error_costs_it_alone_and_a_broken_model_stops_the_job(
        tiny_run, tmp_path, monkeypatch, capsys):
    """The classifier makes an image's own unforeseen error (in its preprocessing) that image's skip; an error of the
    whole batch (the network) is nobody's file and stops the job instead of skipping every input in its name."""
    from medxai.classifier import Classifier
    from medxai.data.preprocess import Preprocessor

    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for index in range(3):
        Image.fromarray(_gradient((40 + index, 40))).save(inputs / f"good{index}.png")
    Image.fromarray(_gradient((41, 43))).save(inputs / "odd.png")
    real_prepare = Preprocessor.prepare

    def failing_for_one_shape(self, image, name="<array>"):
        if image.shape[:2] == (41, 43):
            raise RuntimeError("tensor shape mismatch in /opt/medxai/preprocess.py")
        return real_prepare(self, image, name=name)

    monkeypatch.setattr(Preprocessor, "prepare", failing_for_one_shape)
    assert main(["predict", str(tiny_run), str(inputs), "--out", str(tmp_path / "p"), "--json"]) == 0
    predicted, skipped = _accounting(tmp_path / "p", capsys)
    assert predicted == 3 and [(Path(row["file"]).name, row["reason"]) for row in skipped] == [
        ("odd.png", "unreadable (RuntimeError: tensor shape mismatch in <path>)")]

    def broken_network(self, batch):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(Classifier, "_forward", broken_network)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        main(["predict", str(tiny_run), str(inputs), "--out", str(tmp_path / "q")])
    skipped_rows = list(csv.DictReader((tmp_path / "q" / "skipped.csv").open()))
    assert skipped_rows == []  # nothing was written off as unreadable: --resume will predict every file


@pytest.mark.realdata
def test_predict_and_explain_over_the_messy_brain_mri_folder(tiny_run, data_dir, tmp_path, capsys):
    """253 real MRIs (PNGs named .jpg, spaces in names, grey/RGB/RGBA/palette) and an MD5SUMS file."""
    folder = data_dir / "brain_mri_yes_no"
    files = [path for path in folder.rglob("*") if path.is_file() and not path.name.startswith(".")]
    assert main(["predict", str(tiny_run), str(folder), "--out", str(tmp_path / "p"), "--json"]) == 0
    predicted, skipped = _accounting(tmp_path / "p", capsys)
    assert predicted + len(skipped) == len(files) == 254
    assert [Path(row["file"]).name for row in skipped] == ["MD5SUMS"] and predicted == 253
    assert main(["explain", str(tiny_run), str(folder), "--out", str(tmp_path / "e"), "--json"]) == 0
    explained, skipped = _accounting(tmp_path / "e", capsys)
    assert explained == 253 and len(skipped) == 1
    overlays = list((tmp_path / "e").glob("*.png"))
    assert len(overlays) == 253  # one per image: names from relative paths never collide
    assert any(" " not in path.name and "yes__" in path.name for path in overlays)

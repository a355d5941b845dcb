"""Issue 17's hostile-input corpus, generated at test time: every reader's structures with header fields at NaN, inf,
negative, zero and huge values, offsets past the end, and cut at every structural boundary; through the batch job and
the service. Nothing is lost (files in = results + skipped), nothing crashes (no 5xx), no answer or log line carries a
traceback or a server path, and memory stays bounded; the service's decode budget bounds concurrent bombs.

Each case says what the service must answer: 200 (damage a reader tolerates, e.g. a non-finite NIfTI pixdim), 400
``invalid_image`` or 413 ``image_too_large``; the batch job predicts the 200s and lists every other in skipped.csv.
"""

from __future__ import annotations

import copy
import csv
import gzip
import io
import logging
import struct
import tempfile
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.encaps import encapsulate, generate_frames
from serve_helpers import running_server
from test_dicom import CRAFTED, DAMAGED_ATTRIBUTES, PYDICOM_TEST_FILES, collect_logs, make_dicom, with_element
from test_nifti import NIFTI_VARIANTS, nifti_bytes, patched, the_issues_header

from medxai.data.readers import limits as _limits
from medxai.jobs.predict import predict_files

psutil = pytest.importorskip("psutil")

MB = 2**20
#: The decoded-bytes limit both paths run under here (the service's is --max-decoded-mb; batch jobs' the module's).
DECODED_LIMIT_MB = 64
#: What neither a response nor a log line may carry: a traceback, a server path, the upload's old temporary folder.
LEAKS = ("Traceback", 'File "', "site-packages", tempfile.gettempdir(), "medxai-upload", CRAFTED)


@dataclass(frozen=True)
class Case:
    """One corpus file: its name, its bytes and the service's answer (200, 400 or 413)."""

    name: str
    data: bytes
    status: int


# -- builders --------------------------------------------------------------------------------------------------------
def _gradient(height: int = 40, width: int = 48) -> np.ndarray:
    return (np.add.outer(np.arange(height) * 3, np.arange(width) * 5) % 256).astype(np.uint8)


def _saved(image: Image.Image, kind: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=kind, **options)
    return buffer.getvalue()


def _cuts(data: bytes, boundaries: list[int], status: int = 400) -> list[tuple[str, bytes, int]]:
    """``data`` cut at every boundary (and two bytes past it), each a case of its own."""
    cuts = sorted({point for boundary in boundaries for point in (boundary, boundary + 2) if 0 < point < len(data)})
    return [(f"cut{point}", data[:point], status) for point in cuts]


def png_cases() -> list[tuple[str, bytes, int]]:
    good = _saved(Image.fromarray(_gradient()), "PNG")

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    def with_ihdr(width: int, height: int) -> bytes:
        return good[:8] + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)) + good[33:]

    boundaries, position = [8], 8
    while position < len(good):
        position += 12 + struct.unpack(">I", good[position : position + 4])[0]
        boundaries.append(position)
    bad_crc = bytearray(good)
    bad_crc[20] ^= 0xFF
    iend = boundaries[-2]  # cut there, only IEND is missing: every pixel is in, and Pillow reads them
    return [("good", good, 200), ("width0", with_ihdr(0, 40), 400), ("height0", with_ihdr(48, 0), 400),
            ("huge", with_ihdr(100_000, 100_000), 413), ("max", with_ihdr(2**31 - 1, 2**31 - 1), 413),
            ("badcrc", bytes(bad_crc), 400), *_cuts(good, boundaries[:-2]), *_cuts(good, [iend], status=200)]


def _jpeg_segments(jpeg: bytes) -> list[int]:
    """Where each marker segment of a JPEG starts, up to and including its scan, then the scan's middle and EOI."""
    starts, position = [2], 2
    while jpeg[position + 1] != 0xDA:
        position += 2 + struct.unpack(">H", jpeg[position + 2 : position + 4])[0]
        starts.append(position)
    scan = position + 2 + struct.unpack(">H", jpeg[position + 2 : position + 4])[0]
    return [*starts, scan, (scan + len(jpeg)) // 2, len(jpeg) - 2]


def _with_sof(jpeg: bytes, *, width: int | None = None, height: int | None = None, components: int | None = None,
              precision: int | None = None) -> bytes:
    """A baseline JPEG with fields of its SOF replaced (its length kept)."""
    at = jpeg.index(b"\xff\xc0")
    old_precision, old_height, old_width, old_components = struct.unpack(">BHHB", jpeg[at + 4 : at + 10])
    fields = struct.pack(">BHHB", old_precision if precision is None else precision,
                         old_height if height is None else height, old_width if width is None else width,
                         old_components if components is None else components)
    return jpeg[: at + 4] + fields + jpeg[at + 10 :]


def _behind_app_segments(jpeg: bytes, count: int = 2) -> bytes:
    app1 = b"\xff\xe1\xff\xff" + bytes(65533)  # the largest segment there is: 64 KiB
    return jpeg[:2] + app1 * count + jpeg[2:]


def jpeg_cases() -> list[tuple[str, bytes, int]]:
    good = _saved(Image.fromarray(_gradient()), "JPEG", quality=90)
    return [("good", good, 200), ("height0", _with_sof(good, height=0), 400), ("width0", _with_sof(good, width=0), 400),
            ("huge", _with_sof(good, width=65535, height=65535), 413),
            ("huge-late", _behind_app_segments(_with_sof(good, width=65535, height=65535)), 413),
            *_cuts(good, _jpeg_segments(good))]


def tiff_cases() -> list[tuple[str, bytes, int]]:
    good = _saved(Image.fromarray(_gradient()), "TIFF")
    (ifd,) = struct.unpack("<I", good[4:8])
    (count,) = struct.unpack("<H", good[ifd : ifd + 2])
    entries = {struct.unpack("<H", good[ifd + 2 + 12 * index : ifd + 4 + 12 * index])[0]: ifd + 2 + 12 * index
               for index in range(count)}

    def with_values(**values: int) -> bytes:
        result = bytearray(good)
        for name, value in values.items():
            at = entries[_TIFF_TAGS[name]]
            kind = struct.unpack("<H", good[at + 2 : at + 4])[0]
            result[at + 8 : at + 12] = struct.pack("<HH", value, 0) if kind == 3 else struct.pack("<I", value)
        return bytes(result)

    strip = struct.unpack("<I", good[entries[273] + 8 : entries[273] + 12])[0]
    return [("good", good, 200), ("huge", with_values(width=65535, height=65535), 413),
            ("width-large", with_values(width=65535), 400), ("width0", with_values(width=0), 400),
            ("offset-past-end", with_values(offsets=10**9), 400),
            ("bytecount-huge", with_values(counts=2**31), 200),  # Pillow reads the strip there is, no more
            ("ifd-past-end", good[:4] + struct.pack("<I", 10**9) + good[8:], 400),
            *_cuts(good, [8, ifd, ifd + 2 + 6 * count, strip, strip + 960])]


_TIFF_TAGS = {"width": 256, "height": 257, "offsets": 273, "counts": 279}


def nifti_cases() -> list[tuple[str, bytes, int]]:
    cases = [("issue-nan", the_issues_header(), 400), ("issue-nan.gz", gzip.compress(the_issues_header()), 400)]
    for version, order in NIFTI_VARIANTS:
        good = nifti_bytes(version, order)
        tag = f"v{version}{'le' if order == '<' else 'be'}"
        damaged = [("vox-neg", "vox_offset", -1, 0, 400),
                   ("vox-0", "vox_offset", 0, 0, 400), ("vox-huge", "vox_offset", 2**40, 0, 400),
                   ("vox-past-end", "vox_offset", 4096, 0, 400), ("dim0-0", "dim", 0, 0, 400),
                   ("dim0-8", "dim", 8, 0, 400), ("dim-0", "dim", 0, 1, 400), ("dim-neg", "dim", -1, 2, 400),
                   ("dims-huge", "dim", (30000, 30000, 30000), 1, 413), ("datatype-unknown", "datatype", 3, 0, 400),
                   ("datatype-complex", "datatype", 32, 0, 400), ("bitpix", "bitpix", 7, 0, 400),
                   ("pixdim-nan", "pixdim", float("nan"), 1, 200), ("pixdim-neg", "pixdim", -1.0, 2, 200),
                   ("slope-inf", "scl_slope", float("inf"), 0, 200)]
        if version == 1:  # NIfTI-2 stores vox_offset as an integer
            damaged += [("vox-nan", "vox_offset", float("nan"), 0, 400), ("vox-inf", "vox_offset", float("inf"), 0, 400),
                        ("vox-fraction", "vox_offset", 352.5, 0, 400)]
        cases += [(f"{tag}-{name}", patched(good, version, order, field, value, index), status)
                  for name, field, value, index, status in damaged]
        sform = patched(patched(good, version, order, "srow", float("inf")), version, order, "sform_code", 1)
        cases += [(f"{tag}-good", good, 200), (f"{tag}-sform-inf", sform, 200)]
        if (version, order) in ((1, "<"), (2, ">")):
            cases += [(f"{tag}-{name}", data, status) for name, data, status in
                      _cuts(good, [4, 348, 352, 540, 544, (len(good) + 544) // 2, len(good) - 1])]
    packed = gzip.compress(nifti_bytes())
    cases += [(f"gz-{name}", data, status) for name, data, status in _cuts(packed, [10, len(packed) // 2])]
    cases.append(("gz-bomb-1GiB", gzip.compress(_nifti_claiming((1024, 1024, 256), 16) + bytes(MB)), 413))
    return cases


def _nifti_claiming(shape: tuple[int, ...], datatype: int) -> bytes:
    """A NIfTI-1 header (and its 4 extension bytes) claiming ``shape`` voxels of ``datatype``."""
    bits = {2: 8, 4: 16, 16: 32}[datatype]
    header = bytearray(352)
    struct.pack_into("<i", header, 0, 348)
    struct.pack_into("<8h", header, 40, len(shape), *shape, *([1] * (7 - len(shape))))
    struct.pack_into("<hh", header, 70, datatype, bits)
    struct.pack_into("<8f", header, 76, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0)
    struct.pack_into("<f", header, 108, 352.0)
    header[344:348] = b"n+1\x00"
    return bytes(header)


def _dicom(tmp: Path, pixels: np.ndarray, **attributes) -> bytes:
    return make_dicom(tmp / "scratch.dcm", pixels, **attributes).read_bytes()


def _data_set_start(data: bytes) -> int:
    """Where the data set begins after a Part 10 file's meta information group."""
    (length,) = struct.unpack("<I", data[140:144])  # (0002,0000) UL: the group's length after it
    return 144 + length


def dicom_native_cases(tmp: Path) -> list[tuple[str, bytes, int]]:
    pixels = np.arange(256, dtype=np.uint16).reshape(16, 16) * 13
    good = _dicom(tmp, pixels)
    cases = [("good", good, 200), ("mono1", _dicom(tmp, pixels, photometric="MONOCHROME1"), 200)]
    for keyword, value, vr, reason in DAMAGED_ATTRIBUTES:
        path = with_element(make_dicom(tmp / "attribute.dcm", pixels), keyword, value, vr)
        status = 413 if "MAX_VOLUME_VOXELS" in reason else 400
        cases.append((f"{keyword}-{value}", path.read_bytes(), status))
    start, pixel_data = _data_set_start(good), good.index(b"\xe0\x7f\x10\x00")
    cases += _cuts(good, [132, 140, start, (start + pixel_data) // 2, pixel_data, pixel_data + 6, pixel_data + 12,
                          len(good) - 100])
    return cases


_SEEDS = {  # transfer syntax: a single-frame file of pydicom's test data in it (its JPEG extended file does not decode)
    "jpeg-lossless": "SC_rgb_jpeg_gdcm.dcm",
    "jpeg-ls": "MR_small_jpeg_ls_lossless.dcm",
    "jpeg-ls-near": "JPEGLSNearLossless_08.dcm",
    "j2k-lossless": "MR_small_jp2klossless.dcm",
    "j2k": "693_J2KI.dcm",
    "rle": "MR_small_RLE.dcm",
}


def _with_fragment(seed, fragment: bytes, syntax: str | None = None) -> bytes:
    dataset = copy.deepcopy(seed)
    dataset.PixelData = encapsulate([fragment])
    dataset["PixelData"].VR = "OB"
    if syntax is not None:
        dataset.file_meta.TransferSyntaxUID = syntax
    buffer = io.BytesIO()
    dataset.save_as(buffer)
    return buffer.getvalue()


def _jpeg_in_dicom(tmp: Path):
    """A JPEG baseline DICOM made here (Pillow's JPEG in a grey 8-bit data set) and its codestream."""
    dataset = pydicom.dcmread(io.BytesIO(_dicom(tmp, _gradient(16, 16))))
    return dataset, _saved(Image.fromarray(_gradient(16, 16)), "JPEG", quality=90)


def dicom_compressed_cases(tmp: Path) -> list[tuple[str, bytes, int]]:
    seed, jpeg = _jpeg_in_dicom(tmp)
    baseline = pydicom.uid.JPEGBaseline8Bit
    sof = jpeg.index(b"\xff\xc0")
    no_sof = jpeg[:sof] + jpeg[sof + 2 + struct.unpack(">H", jpeg[sof + 2 : sof + 4])[0] :]
    cases = [("jpeg-good", _with_fragment(seed, jpeg, baseline), 200),
             ("jpeg-claims-20000-late", _with_fragment(seed, _behind_app_segments(
                 _with_sof(jpeg, width=20000, height=20000)), baseline), 413),
             ("jpeg-claims-20000-early", _with_fragment(seed, _with_sof(jpeg, width=20000, height=20000), baseline),
              413),
             ("jpeg-larger-than-header", _with_fragment(seed, _with_sof(jpeg, width=64, height=64), baseline), 400),
             ("jpeg-no-sof", _with_fragment(seed, no_sof, baseline), 400),
             ("jpeg-3-components", _with_fragment(seed, _with_sof(jpeg, components=3), baseline), 400),
             ("jpeg-16-bit", _with_fragment(seed, _with_sof(jpeg, precision=16), baseline), 400),
             ("jpeg-two-byte-fragment", _with_fragment(seed, b"\xff\xd8", baseline), 400)]
    cases += [(f"jpeg-{name}", _with_fragment(seed, data, baseline), status)
              for name, data, status in _cuts(jpeg, _jpeg_segments(jpeg))]
    # a baseline stream is a valid stream of the extended process too (SOF0 is one of its frame types)
    cases.append(("jpeg-extended-good", _with_fragment(seed, jpeg, pydicom.uid.JPEGExtended12Bit), 200))
    for kind, name in _SEEDS.items():
        if not (PYDICOM_TEST_FILES / name).is_file():
            continue
        dataset = pydicom.dcmread(PYDICOM_TEST_FILES / name)
        fragment = next(generate_frames(dataset.PixelData, number_of_frames=1))
        cases.append((f"{kind}-good", _with_fragment(dataset, fragment), 200))
        cases += [(f"{kind}-{label}", _with_fragment(dataset, data), status)
                  for label, data, status in _codestream_damage(kind, fragment, dataset)]
        if kind == "jpeg-lossless":  # selection value 1 is one of the predictors of process 14
            cases.append(("jpeg-lossless-14-good", _with_fragment(dataset, fragment, pydicom.uid.JPEGLossless), 200))
        if kind == "j2k-lossless":  # HTJ2K: the same codestream under the HTJ2K lossless syntax
            cases.append(("htj2k-good", _with_fragment(dataset, fragment, "1.2.840.10008.1.2.4.201"), 200))
            cases.append(("htj2k-huge", _with_fragment(dataset, _j2k_size(fragment, 2**31, 2**31),
                                                       "1.2.840.10008.1.2.4.201"), 413))
    return cases


def _j2k_size(stream: bytes, width: int, height: int) -> bytes:
    return stream[:8] + struct.pack(">II", width, height) + stream[16:]


def _codestream_damage(kind: str, fragment: bytes, dataset) -> list[tuple[str, bytes, int]]:
    if kind.startswith("jpeg"):
        marker = next(position for position in range(2, len(fragment) - 1)
                      if fragment[position] == 0xFF and fragment[position + 1] in (0xC1, 0xC3, 0xF7))
        size = marker + 5
        return [("huge", fragment[:size] + struct.pack(">HH", 65535, 65535) + fragment[size + 4 :], 413),
                ("cut-in-sof", fragment[: marker + 6], 400), ("cut-after-soi", fragment[:2], 400),
                ("cut-in-scan", fragment[: len(fragment) * 2 // 3], 400)]
    if kind.startswith("j2k"):
        comment = b"\xff\x64\x00\x06\x00\x01ab"
        return [("huge", _j2k_size(fragment, 2**31, 2**31), 413), ("siz-not-after-soc", fragment[:2] + comment
                                                                    + fragment[2:], 400),
                ("cut-in-siz", fragment[:30], 400), ("components-0", fragment[:40] + b"\x00\x00" + fragment[42:], 400),
                ("offset-past-size", fragment[:16] + struct.pack(">I", 2**31) + fragment[20:], 400),
                ("cut-in-tiles", fragment[: len(fragment) * 2 // 3], 400)]
    header = bytearray(fragment[:64])
    segments, first = struct.unpack("<II", header[:8])
    return [("segments-0", struct.pack("<I", 0) + fragment[4:], 400),
            ("segments-16", struct.pack("<I", 16) + fragment[4:], 400),
            ("offset-past-end", fragment[:4] + struct.pack("<I", 10**8) + fragment[8:], 400),
            ("segments-mismatch", struct.pack("<I", segments + 1) + fragment[4:8]
             + struct.pack("<I", first + 8) + fragment[12:], 400),
            ("cut-in-header", fragment[:40], 400)]


def dicom_wrapped_cases(tmp: Path) -> list[tuple[str, bytes, int]]:
    """Deflated data sets and gzip-compressed DICOM files: their bombs, their damage, their cuts."""
    pixels = np.arange(256, dtype=np.uint16).reshape(16, 16)
    plain = pydicom.dcmread(io.BytesIO(_dicom(tmp, pixels)))
    deflated = copy.deepcopy(plain)
    deflated.file_meta.TransferSyntaxUID = pydicom.uid.DeflatedExplicitVRLittleEndian
    bomb = copy.deepcopy(deflated)
    bomb.add_new(0x00091010, "OB", bytes(100 * MB))  # 100 MB of zeros: 100 kB deflated
    good, bomb_bytes = _written(deflated), _written(bomb)
    start = _data_set_start(good)
    corrupt = bytearray(good)
    corrupt[start + 4 : start + 12] = b"\xff" * 8
    dicom = _written(plain)
    return [("deflate-good", good, 200), ("deflate-bomb", bomb_bytes, 413), ("deflate-corrupt", bytes(corrupt), 400),
            ("deflate-cut", good[: (start + len(good)) // 2], 400), ("gz-good", gzip.compress(dicom), 200),
            ("gz-bomb", gzip.compress(dicom + bytes(100 * MB)), 413),
            ("gz-cut", gzip.compress(dicom)[: len(dicom) // 4], 400)]


def _written(dataset) -> bytes:
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def build_corpus(tmp: Path) -> list[Case]:
    groups: dict[str, Callable[[], list[tuple[str, bytes, int]]]] = {
        "png": png_cases, "jpeg": jpeg_cases, "tiff": tiff_cases, "nifti": nifti_cases,
        "dicom": lambda: dicom_native_cases(tmp), "dicomz": lambda: dicom_compressed_cases(tmp),
        "wrapped": lambda: dicom_wrapped_cases(tmp),
    }
    return [Case(f"{group}-{name}".replace(" ", "_").replace("/", "_"), data, status)
            for group, build in groups.items() for name, data, status in build()]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> list[Case]:
    cases = build_corpus(tmp_path_factory.mktemp("corpus-scratch"))
    assert len({case.name for case in cases}) == len(cases)
    return cases


# -- measuring -------------------------------------------------------------------------------------------------------
@contextmanager
def peak_rss_growth(interval: float = 0.005) -> Iterator[dict[str, int]]:
    """The largest RSS growth of this process (which runs the server) while the block runs, sampled in a thread."""
    process = psutil.Process()
    result = {"baseline": process.memory_info().rss, "peak": 0}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            result["peak"] = max(result["peak"], process.memory_info().rss - result["baseline"])
            time.sleep(interval)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield result
    finally:
        done.set()
        sampler.join(5)


# -- the batch job ---------------------------------------------------------------------------------------------------
def test_the_batch_job_accounts_for_every_hostile_file(demo_like_run, corpus, tmp_path, monkeypatch):
    monkeypatch.setattr(_limits, "MAX_DECOMPRESSED_BYTES", DECODED_LIMIT_MB * MB)
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for case in corpus:
        (inputs / case.name).write_bytes(case.data)
    started = time.monotonic()
    with peak_rss_growth() as memory:
        result = predict_files(demo_like_run, [inputs], out=tmp_path / "out", keep=False)
    elapsed = time.monotonic() - started
    predicted = {Path(row["file"]).name for row in _rows(tmp_path / "out" / "predictions.csv")}
    skipped = {Path(row["file"]).name: row["reason"] for row in _rows(tmp_path / "out" / "skipped.csv")}
    assert len(predicted) + len(skipped) == len(corpus) == result.inputs  # nothing lost, nothing twice
    assert predicted == {case.name for case in corpus if case.status == 200}, sorted(
        predicted ^ {case.name for case in corpus if case.status == 200})
    for name, reason in skipped.items():
        assert reason and not any(leak in reason for leak in LEAKS), (name, reason)
    assert memory["peak"] < 400 * MB, f"RSS grew by {memory['peak'] / MB:.0f} MiB over the corpus"
    assert elapsed < 60, elapsed


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


# -- the service -----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def service(demo_like_run, tmp_path_factory) -> Iterator[str]:
    audit = tmp_path_factory.mktemp("corpus-audit") / "audit.sqlite"
    with running_server(demo_like_run, max_decoded_mb=DECODED_LIMIT_MB, decode_budget_mb=1.5 * DECODED_LIMIT_MB,
                        max_decodes=2, max_upload_mb=8, audit_db=str(audit)) as url:
        yield url


def test_the_service_answers_every_hostile_upload_with_a_clear_4xx(service, corpus):
    answers = {}
    with collect_logs(logging.DEBUG) as logs, peak_rss_growth() as memory, httpx.Client(timeout=60) as client:
        for case in corpus:
            response = client.post(f"{service}/v1/predict", files={"file": (case.name, case.data)})
            answers[case.name] = response.status_code
            assert not any(leak in response.text for leak in LEAKS), (case.name, response.text)
            if response.status_code != 200:
                body = response.json()
                assert set(body) == {"error", "detail"} and body["detail"], (case.name, body)
                assert body["error"] == {400: "invalid_image", 413: "image_too_large"}[response.status_code]
    wrong = {case.name: (answers[case.name], case.status) for case in corpus if answers[case.name] != case.status}
    assert not wrong, wrong  # (answer, expected) of every case answered otherwise: no 5xx among them
    assert not any(leak in logs.text for leak in LEAKS), [line for line in logs.lines
                                                           if any(leak in line for leak in LEAKS)][:5]
    assert "upload: MONOCHROME1" in logs.text  # issue 17, defect 5: the log names the upload, never a temporary file
    assert memory["peak"] < 400 * MB, f"RSS grew by {memory['peak'] / MB:.0f} MiB over the corpus"


def _gz_nifti_bomb(shape: tuple[int, ...], datatype: int) -> bytes:
    """A gzip-compressed NIfTI-1 whose zeros inflate to all the header claims."""
    header = _nifti_claiming(shape, datatype)
    size = int(np.prod(shape)) * {2: 1, 4: 2, 16: 4}[datatype]
    compressor = zlib.compressobj(1, zlib.DEFLATED, 31)  # gzip framing
    block = bytes(4 * MB)
    parts = [compressor.compress(header)]
    for _ in range(size // len(block)):
        parts.append(compressor.compress(block))
    parts.append(compressor.compress(bytes(size % len(block))))
    return b"".join(parts) + compressor.flush()


def test_bombs_claiming_more_than_the_limit_are_refused_at_once(service):
    """The issue's bomb: 1 MB of gzip claiming 1 GiB of float32 (it took the service from 1.0 to 6.1 GB, three at a
    time). Refused from the header before a voxel is inflated."""
    bomb = gzip.compress(_nifti_claiming((1024, 1024, 256), 16) + bytes(MB))
    with peak_rss_growth() as memory, ThreadPoolExecutor(3) as pool:
        started = time.monotonic()
        responses = list(pool.map(lambda _: httpx.post(f"{service}/v1/predict", files={"file": ("b", bomb)},
                                                       timeout=60), range(3)))
        elapsed = time.monotonic() - started
    assert [response.status_code for response in responses] == [413] * 3
    assert "268435456 voxels exceeds --max-voxels = 64000000" in responses[0].json()["detail"]
    assert elapsed < 5 and memory["peak"] < 100 * MB, (elapsed, memory["peak"] / MB)
    fewer_voxels = gzip.compress(_nifti_claiming((512, 512, 128), 16) + bytes(MB))  # 128 MiB of float32
    response = httpx.post(f"{service}/v1/predict", files={"file": ("b", fewer_voxels)}, timeout=60)
    assert response.status_code == 413
    assert "exceeds the limit of 67108864 bytes (--max-decoded-mb)" in response.json()["detail"]


def test_concurrent_bombs_within_the_limit_wait_for_the_decode_budget(service):
    """Six gzipped NIfTI of 60 MiB each (allowed one by one): the budget (96 MiB, two decodes) lets one inflate at a
    time, so memory holds one, not six."""
    bomb = _gz_nifti_bomb((512, 512, 120), 4)
    assert len(bomb) < MB  # a small upload
    with peak_rss_growth() as memory, ThreadPoolExecutor(6) as pool:
        responses = list(pool.map(lambda _: httpx.post(f"{service}/v1/predict", files={"file": ("b", bomb)},
                                                       timeout=120), range(6)))
    assert [response.status_code for response in responses] == [200] * 6
    assert memory["peak"] < 200 * MB, f"RSS grew by {memory['peak'] / MB:.0f} MiB for 6 concurrent 60 MiB bombs"


def test_the_decode_budget_admits_what_fits_and_times_out_the_rest():
    from medxai.serve.engine import DecodeBudget

    budget = DecodeBudget(max_decodes=2, max_bytes=100)
    with budget.reserve(60, timeout=1):
        with pytest.raises(TimeoutError):
            with budget.reserve(50, timeout=0.05):  # 60 + 50 > 100
                pass
        with budget.reserve(40, timeout=0.05):  # fits beside it
            assert (budget.decodes, budget.reserved) == (2, 100)
            with pytest.raises(TimeoutError):
                with budget.reserve(0, timeout=0.05):  # two decodes already
                    pass
    with budget.reserve(500, timeout=0.05):  # more than the whole budget runs alone rather than never
        assert budget.reserved == 500
    assert (budget.decodes, budget.reserved) == (0, 0)

"""The service on a real uvicorn on loopback, through httpx: every endpoint, the micro-batcher, readiness, the bearer
token, limits and bad inputs (each a 4xx JSON error), the audit log, flat memory, and a bounded schemathesis run."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import re
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pydicom
import pytest
from PIL import Image
from serve_helpers import running_server, wait_until_ready
from test_hostile_files import _header_only, _png_claiming

import medxai
from medxai.config import ServeConfig
from medxai.errors import ConfigError
from medxai.explain import CAM_METHODS
from medxai.serve.app import check_exposure, is_loopback
from medxai.serve.audit import read_audit
from medxai.serve.batcher import MicroBatcher, QueueFullError
from medxai.serve.engine import Engine

LEAKS = ("Traceback", "/tmp", "site-packages", 'File "')  # nothing of the server's files or stack in an answer
# The service's probabilities against the Python classifier's: both are rounded to 6 decimals (Classifier.predict,
# docs/serve.md), so values that differ in the last bits can round one unit apart (1e-6); and they do differ: the
# service runs the network channels-last (ServeConfig.channels_last), the reference contiguous, and float32
# convolutions in another memory layout sum in another order (at most 2.4e-7 unrounded over 80 blob images, this
# machine). One rounding unit plus twice that; a real discrepancy (another image, preprocessing or calibration) is
# orders of magnitude larger.
SAME_PROBABILITY = 1e-6 + 5e-7


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def blob_image(side: str, size: tuple[int, int] = (84, 84), seed: int = 0) -> np.ndarray:
    """Like the training data (tests/conftest.py): a bright blob on the left (class 0) or right (class 1)."""
    rng = np.random.default_rng(seed)
    height, width = size
    image = rng.integers(0, 60, size=size).astype(np.uint8)
    column = width // 4 if side == "left" else 3 * width // 4
    image[height // 2 - 9 : height // 2 + 9, column - 9 : column + 9] = 220
    return image


def upload(data: bytes, name: str = "image.png") -> dict:
    return {"file": (name, data, "application/octet-stream")}


def assert_json_error(response: httpx.Response, status: int, error: str) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error", "detail"} and body["error"] == error and body["detail"], body
    assert not any(leak in response.text for leak in LEAKS), response.text
    return body


@pytest.fixture(scope="module")
def server(demo_like_run, tmp_path_factory):
    audit = tmp_path_factory.mktemp("audit") / "audit.sqlite"
    with running_server(demo_like_run, max_upload_mb=2, max_pixels=20_000_000, audit_db=str(audit)) as url:
        yield url, audit


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server[0], timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def reference(demo_like_run):
    return medxai.load(demo_like_run, device="cpu")


# -- the micro-batcher alone -----------------------------------------------------------------------------------
def run(coroutine):
    return asyncio.run(coroutine)


def test_the_batcher_keeps_order_and_gives_each_caller_its_own_result():
    batches = []

    def run_batch(key, items):
        batches.append((key, list(items)))
        return [item * 10 for item in items]

    async def scenario():
        batcher = MicroBatcher(run_batch, max_batch=4, max_wait_ms=200, max_queue=64)
        await batcher.start()
        try:
            return await asyncio.gather(*(batcher.submit("k", index) for index in range(10)))
        finally:
            await batcher.stop()

    assert run(scenario()) == [index * 10 for index in range(10)]
    assert [items for _, items in batches] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def test_the_batcher_never_mixes_kinds_and_an_items_error_reaches_only_its_caller():
    batches = []

    def run_batch(key, items):
        batches.append((key, list(items)))
        return [ValueError(f"bad {item}") if item == 3 else (key, item) for item in items]

    async def scenario():
        batcher = MicroBatcher(run_batch, max_batch=8, max_wait_ms=100, max_queue=64)
        await batcher.start()
        try:
            calls = [batcher.submit("a" if index % 2 else "b", index) for index in range(6)]
            return await asyncio.gather(*calls, return_exceptions=True)
        finally:
            await batcher.stop()

    results = run(scenario())
    assert isinstance(results[3], ValueError) and str(results[3]) == "bad 3"
    assert [result for index, result in enumerate(results) if index != 3] == [
        ("b", 0), ("a", 1), ("b", 2), ("b", 4), ("a", 5)]
    assert sorted((key, items) for key, items in batches) == [("a", [1, 3, 5]), ("b", [0, 2, 4])]


def test_a_full_batcher_queue_refuses_at_once():
    release = threading.Event()

    def run_batch(key, items):
        release.wait(10)
        return list(items)

    async def scenario():
        batcher = MicroBatcher(run_batch, max_batch=1, max_wait_ms=0, max_queue=2)
        await batcher.start()
        running = asyncio.create_task(batcher.submit("k", 0))
        await asyncio.sleep(0.05)  # taken off the queue: running, held
        waiting = [asyncio.create_task(batcher.submit("k", index)) for index in (1, 2)]
        await asyncio.sleep(0.05)
        assert batcher.depth == 2
        started = time.perf_counter()
        with pytest.raises(QueueFullError):
            await batcher.submit("k", 3)
        refused_in = time.perf_counter() - started
        release.set()
        results = await asyncio.gather(running, *waiting)
        await batcher.stop()
        return results, refused_in

    results, refused_in = run(scenario())
    assert results == [0, 1, 2] and refused_in < 0.05


def test_a_timed_out_request_leaves_the_queue_and_the_others_are_answered():
    release = threading.Event()
    seen = []

    def run_batch(key, items):
        release.wait(10)
        seen.extend(items)
        return list(items)

    async def scenario():
        batcher = MicroBatcher(run_batch, max_batch=1, max_wait_ms=0, max_queue=8)
        await batcher.start()
        first = asyncio.create_task(batcher.submit("k", "first"))
        await asyncio.sleep(0.05)
        with pytest.raises(asyncio.TimeoutError):
            await batcher.submit("k", "late", timeout=0.05)
        assert batcher.depth == 0
        release.set()
        result = await first
        after = await batcher.submit("k", "after", timeout=5)
        await batcher.stop()
        return result, after

    assert run(scenario()) == ("first", "after")
    assert seen == ["first", "after"]  # the timed-out request never ran


def test_a_batch_waits_for_company_only_while_some_is_on_its_way():
    on_the_way = [0]

    async def waited(incoming):
        batcher = MicroBatcher(lambda key, items: list(items), max_batch=16, max_wait_ms=80, max_queue=8,
                               incoming=incoming)
        await batcher.start()
        started = time.perf_counter()
        await batcher.submit("k", 1)
        seconds = time.perf_counter() - started
        await batcher.stop()
        return seconds

    assert 0.07 <= run(waited(None)) < 0.5  # no signal: up to max_wait_ms
    assert run(waited(lambda: on_the_way[0])) < 0.03  # an idle service answers a lone request at once
    on_the_way[0] = 3
    assert 0.07 <= run(waited(lambda: on_the_way[0])) < 0.5  # three more are being decoded: worth waiting


# -- the API -----------------------------------------------------------------------------------------------------
def test_probes_model_card_docs_and_metrics(client, demo_like_run):
    assert client.get("/livez").json() == {"status": "alive"}
    ready = client.get("/readyz").json()
    assert ready["status"] == "ready" and ready["model"] == "served"
    card = client.get("/v1/model").json()
    assert card["id"] == "served" and len(card["version"]) == 12
    assert card["label_names"] == medxai.load(demo_like_run, device="cpu").label_names
    assert card["cam_methods"] == sorted(CAM_METHODS) and card["explain_available"] is True
    assert card["clinical_use"] is False and "Not a medical device" in card["intended_use"]
    assert card["domain_guard"] is True and "train_data" not in card
    schema = client.get("/openapi.json").json()
    assert {"/v1/predict", "/v1/explain", "/v1/model", "/livez", "/readyz", "/metrics"} <= set(schema["paths"])
    assert client.get("/docs").status_code == 200
    client.post("/v1/predict", files=upload(png_bytes(blob_image("left"))))
    metrics = client.get("/metrics").text
    assert 'medxai_requests_total{endpoint="predict",status="200"}' in metrics
    for name in ("medxai_request_latency_seconds_bucket", "medxai_batch_size_bucket", "medxai_queue_depth",
                 "medxai_ready 1.0"):
        assert name in metrics


def test_predict_equals_the_python_classifier(client, reference):
    for side in ("left", "right"):
        image = blob_image(side, (120, 90))
        data = png_bytes(image)
        body = client.post("/v1/predict", files=upload(data)).json()
        expected = reference.predict(image)[0]
        assert body["label"] == expected.label and body["label_index"] == expected.label_index
        for label, probability in expected.probabilities.items():
            assert body["probabilities"][label] == pytest.approx(probability, abs=SAME_PROBABILITY)
        assert sum(body["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
        assert body["decision_rule"] == reference.decision_rule()
        assert body["in_domain"] == expected.in_domain
        assert body["domain_score"] == pytest.approx(expected.domain_score, rel=1e-5)
        assert body["image"] == {"width": 90, "height": 120, "format": "PNG",
                                 "sha256": hashlib.sha256(data).hexdigest()}
        assert body["model"]["id"] == "served" and body["backend"] == "torch" and body["latency_ms"] > 0


def test_explain_gives_the_overlay_at_the_original_size_and_the_same_map_as_python(client, reference):
    image = blob_image("right", (150, 110))
    response = client.post("/v1/explain", files=upload(png_bytes(image)), params={"raw": "true", "layers": "true"})
    body = response.json()
    explanation = reference.explain(image)[0]
    assert body["label"] == explanation.prediction.label
    fields = body["explanation"]
    assert (fields["width"], fields["height"]) == (110, 150) and fields["method"] == "gradcam"
    assert fields["target_label"] == explanation.target_label
    for key in ("overlay_png", "image_png", "heatmap_png"):
        picture = Image.open(io.BytesIO(base64.b64decode(fields[key])))
        assert picture.size == (110, 150), key
    expected = np.asarray(explanation.overlay(alpha=0.4))
    overlay = np.asarray(Image.open(io.BytesIO(base64.b64decode(fields["overlay_png"]))).convert("RGB"))
    if body["in_domain"] is not False:  # out-of-domain overlays carry a banner across the top
        assert np.abs(overlay.astype(int) - expected.astype(int)).max() <= 1
    raw = fields["raw_map"]
    values = np.frombuffer(base64.b64decode(raw["data"]), dtype="<f4").reshape(raw["shape"])
    np.testing.assert_allclose(values, explanation.model_heatmap, atol=1e-5)


def test_every_cam_method_and_the_overlay_url(client):
    data = png_bytes(blob_image("left"))
    for method in sorted(CAM_METHODS):
        body = client.post("/v1/explain", files=upload(data), params={"method": method}).json()
        assert body["explanation"]["method"] == method and body["explanation"]["overlay_png"]
    body = client.post("/v1/explain", files=upload(data), params={"overlay": "url", "alpha": "0.7"}).json()
    assert body["explanation"]["overlay_png"] is None
    picture = client.get(body["explanation"]["overlay_url"])
    assert picture.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(picture.content)).size == (84, 84)
    assert_json_error(client.get("/v1/explanations/0123abcd/overlay.png"), 404, "not_found")


def test_sixteen_bit_png_nifti_and_a_target(client):
    wide = (blob_image("left").astype(np.uint16) * 250)
    buffer = io.BytesIO()
    Image.fromarray(wide).save(buffer, format="PNG")
    sixteen = client.post("/v1/predict", files=upload(buffer.getvalue()))
    assert sixteen.status_code == 200 and Image.open(buffer).mode.startswith("I")
    import nibabel

    volume = np.stack([blob_image("right")] * 5, axis=-1).astype(np.int16)
    nifti = nibabel.Nifti1Image(volume, np.eye(4)).to_bytes()
    body = client.post("/v1/predict", files=upload(nifti, "scan.nii")).json()
    assert body["image"]["format"] == "NIfTI" and (body["image"]["width"], body["image"]["height"]) == (84, 84)
    card = client.get("/v1/model").json()
    target = card["label_names"][0]
    explained = client.post("/v1/explain", files=upload(png_bytes(blob_image("right"))), params={"target": target})
    assert explained.json()["explanation"]["target_label"] == target


@pytest.mark.realdata
def test_a_real_dicom_radiograph_and_no_tag_is_echoed(client, data_dir):
    path = data_dir / "dicom" / "pydicom-data" / "RG1_J2KI.dcm"
    header = pydicom.dcmread(path, stop_before_pixels=True)
    response = client.post("/v1/explain", files=upload(path.read_bytes(), "RG1_J2KI.dcm"))
    body = response.json()
    assert response.status_code == 200 and body["image"]["format"] == "DICOM"
    assert (body["explanation"]["width"], body["explanation"]["height"]) == (header.Columns, header.Rows)
    fields = body.pop("explanation")
    text = json.dumps({**body, "explanation": {key: value for key, value in fields.items()
                                               if not str(key).endswith("_png")}})  # base64 matches anything
    for keyword in ("PatientName", "PatientID", "StudyInstanceUID", "SOPInstanceUID", "AccessionNumber"):
        value = str(header.get(keyword, "") or "")
        if len(value) >= 4:
            assert value not in text, keyword
    assert "RG1_J2KI" not in text


def test_bad_inputs_are_4xx_json_errors(client, tmp_path):
    truncated = png_bytes(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8))[:300]
    cases = {
        "zero bytes": (b"", 400, "invalid_image"),
        "text": (b"patient list, do not share\n" * 20, 400, "invalid_image"),
        "truncated PNG": (truncated, 400, "invalid_image"),
        "decompression bomb": (_png_claiming(100_000, 100_000), 413, "image_too_large"),
        "DICOM without pixels": (_header_only(tmp_path), 400, "invalid_image"),
        "huge upload": (b"\x89PNG" + bytes(3 * 1024 * 1024), 413, "upload_too_large"),
    }
    for name, (data, status, error) in cases.items():
        for endpoint in ("/v1/predict", "/v1/explain"):
            body = assert_json_error(client.post(endpoint, files=upload(data, "x.png")), status, error)
            assert "medxai-upload" not in body["detail"] and "x.png" not in body["detail"], (name, body)
    real_bomb = io.BytesIO()
    Image.new("L", (6000, 6000)).save(real_bomb, format="PNG")  # 36 M pixels in a few kB, over the 20 M limit
    assert_json_error(client.post("/v1/predict", files=upload(real_bomb.getvalue())), 413, "image_too_large")
    assert_json_error(client.post("/v1/predict"), 422, "validation_error")
    assert_json_error(client.post("/v1/predict", content=b"plain body"), 422, "validation_error")
    data = png_bytes(blob_image("left"))
    assert_json_error(client.post("/v1/explain", files=upload(data), params={"alpha": "2"}), 422,
                      "validation_error")
    assert_json_error(client.post("/v1/explain", files=upload(data), params={"method": "nope"}), 422,
                      "validation_error")
    assert_json_error(client.post("/v1/explain", files=upload(data), params={"target": "cat"}), 400, "bad_request")
    assert_json_error(client.post("/v1/explain", files=upload(data), params={"colormap": "x"}), 400, "bad_request")
    assert_json_error(client.get("/v1/nothing"), 404, "not_found")
    assert_json_error(client.get("/v1/predict"), 405, "method_not_allowed")


def test_an_upload_past_the_limit_without_content_length_is_cut_off(server):
    url, _ = server

    def chunks():
        boundary_start = b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x\"\r\n\r\n"
        yield boundary_start
        for _ in range(40):
            yield bytes(100_000)
        yield b"\r\n--b--\r\n"

    response = httpx.post(f"{url}/v1/predict", content=chunks(),
                          headers={"content-type": "multipart/form-data; boundary=b"}, timeout=30)
    assert_json_error(response, 413, "upload_too_large")


def test_concurrent_requests_are_batched_and_each_gets_its_own_answer(demo_like_run, reference, tmp_path):
    images = [blob_image("left" if index % 2 else "right", seed=index) for index in range(8)]

    def post(url, image):
        return httpx.post(f"{url}/v1/predict", files=upload(png_bytes(image)), timeout=30).json()

    with running_server(demo_like_run, max_batch=8, max_wait_ms=300, audit_db=str(tmp_path / "a.sqlite")) as url, \
            ThreadPoolExecutor(8) as pool:
        bodies = list(pool.map(lambda image: post(url, image), images))
        metrics = httpx.get(f"{url}/metrics").text
    for image, body in zip(images, bodies):
        expected = reference.predict(image)[0]
        assert body["label"] == expected.label
        for label, probability in expected.probabilities.items():
            assert body["probabilities"][label] == pytest.approx(probability, abs=1e-5)
    batched = [line for line in metrics.splitlines() if line.startswith('medxai_batch_size_count{kind="predict"}')]
    # the warm-up batch and at most a few batches for 8 requests gathered within 300 ms
    assert batched and float(batched[0].split()[-1]) <= 4


class _HeldEngine:
    """Engine factory whose loading, or whose batches, wait for the test's signal."""

    def __init__(self, hold_loading: bool = False, hold_batches: bool = False) -> None:
        self.loading = threading.Event()
        self.batches = threading.Event()
        if not hold_loading:
            self.loading.set()
        if not hold_batches:
            self.batches.set()

    def __call__(self, run_dir, config):
        self.loading.wait(30)
        engine = Engine.load(run_dir, config)
        original = engine.run_batch

        def held(key, items):
            if items and items[0].name != "warm-up":
                self.batches.wait(30)
            return original(key, items)

        engine.run_batch = held
        return engine


def test_readiness_waits_for_the_model_and_its_warm_up(demo_like_run, tmp_path):
    factory = _HeldEngine(hold_loading=True)
    with running_server(demo_like_run, engine_factory=factory, wait_ready=False,
                        audit_db=str(tmp_path / "a.sqlite")) as url:
        assert httpx.get(f"{url}/livez").status_code == 200
        not_ready = httpx.get(f"{url}/readyz")
        assert_json_error(not_ready, 503, "not_ready")
        assert not_ready.headers["retry-after"]
        refused = httpx.post(f"{url}/v1/predict", files=upload(png_bytes(blob_image("left"))))
        assert_json_error(refused, 503, "not_ready")
        assert_json_error(httpx.get(f"{url}/v1/model"), 503, "not_ready")
        factory.loading.set()
        wait_until_ready(url)
        assert httpx.post(f"{url}/v1/predict", files=upload(png_bytes(blob_image("left")))).status_code == 200


def test_a_full_queue_answers_503_with_retry_after_and_a_stuck_batch_504(demo_like_run, tmp_path):
    factory = _HeldEngine(hold_batches=True)
    data = png_bytes(blob_image("left"))
    with running_server(demo_like_run, engine_factory=factory, max_batch=1, queue=2, timeout_s=20,
                        audit_db=str(tmp_path / "a.sqlite")) as url, ThreadPoolExecutor(2) as pool:
        held = [pool.submit(httpx.post, f"{url}/v1/predict", files=upload(data), timeout=30) for _ in range(2)]
        deadline = time.monotonic() + 10
        while "medxai_queue_depth 2.0" not in httpx.get(f"{url}/metrics").text:
            assert time.monotonic() < deadline, "the two requests were never admitted"
            time.sleep(0.02)
        full = httpx.post(f"{url}/v1/predict", files=upload(data))
        assert_json_error(full, 503, "queue_full")
        assert full.headers["retry-after"] == "1"
        factory.batches.set()
        assert [future.result().status_code for future in held] == [200, 200]
    factory = _HeldEngine(hold_batches=True)
    with running_server(demo_like_run, engine_factory=factory, timeout_s=0.3,
                        audit_db=str(tmp_path / "b.sqlite")) as url:
        assert_json_error(httpx.post(f"{url}/v1/predict", files=upload(data), timeout=30), 504, "timeout")
        factory.batches.set()


def test_the_bearer_token_is_required_when_configured(demo_like_run, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("s3cret-token-0123456789\n")
    with running_server(demo_like_run, token_file=str(token_file), audit_db=str(tmp_path / "a.sqlite")) as url:
        missing = httpx.get(f"{url}/v1/model")
        assert_json_error(missing, 401, "unauthorized")
        assert missing.headers["www-authenticate"] == "Bearer"
        assert_json_error(httpx.get(f"{url}/v1/model", headers={"Authorization": "Bearer wrong"}), 401,
                          "unauthorized")
        assert_json_error(httpx.post(f"{url}/v1/predict", files=upload(b"x")), 401, "unauthorized")
        assert_json_error(httpx.get(f"{url}/metrics"), 401, "unauthorized")
        good = {"Authorization": "Bearer s3cret-token-0123456789"}
        assert httpx.get(f"{url}/v1/model", headers=good).status_code == 200
        assert httpx.post(f"{url}/v1/predict", files=upload(png_bytes(blob_image("left"))),
                          headers=good).status_code == 200
        assert httpx.get(f"{url}/livez").status_code == 200 and httpx.get(f"{url}/").status_code == 200


def test_the_onnxruntime_backend_predicts_alike_and_declines_to_explain(demo_like_run, reference, tmp_path):
    from medxai.jobs.export import export_run

    export_run(demo_like_run)
    image = blob_image("right", (100, 100))
    with running_server(demo_like_run, backend="onnxruntime", audit_db=str(tmp_path / "a.sqlite")) as url:
        body = httpx.post(f"{url}/v1/predict", files=upload(png_bytes(image))).json()
        card = httpx.get(f"{url}/v1/model").json()
        declined = httpx.post(f"{url}/v1/explain", files=upload(png_bytes(image)))
    expected = reference.predict(image)[0]
    assert body["backend"] == "onnxruntime" and body["label"] == expected.label
    for label, probability in expected.probabilities.items():
        assert body["probabilities"][label] == pytest.approx(probability, abs=1e-5)
    assert body["in_domain"] == expected.in_domain
    assert card["explain_available"] is False and card["backend"] == "onnxruntime"
    assert_json_error(declined, 501, "not_available")


def test_the_command_line_serve_refuses_exposure_and_audit_exports(demo_like_run, tmp_path, capsys):
    from medxai.cli import main

    assert main(["serve", str(demo_like_run), "--host", "0.0.0.0"]) == 2
    assert "--token-file" in capsys.readouterr().err
    audit = tmp_path / "audit.sqlite"
    with running_server(demo_like_run, audit_db=str(audit)) as url:
        for side in ("left", "right"):
            httpx.post(f"{url}/v1/predict", files=upload(png_bytes(blob_image(side))))
    assert main(["audit", str(demo_like_run), "--audit-db", str(audit), "--out", str(tmp_path / "audit.csv")]) == 0
    lines = (tmp_path / "audit.csv").read_text().splitlines()
    assert len(lines) == 3 and "input_sha256" in lines[0]
    assert main(["audit", str(demo_like_run), "--audit-db", str(audit)]) == 0
    assert '"count": 2' in capsys.readouterr().out


def test_only_loopback_is_served_without_a_token(tmp_path):
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.1.2.3")
    with pytest.raises(ConfigError, match="--token-file"):
        check_exposure(ServeConfig(host="0.0.0.0"))
    check_exposure(ServeConfig(host="0.0.0.0", token_file=str(tmp_path / "t")))
    check_exposure(ServeConfig())


def test_cors_is_off_unless_configured(server, demo_like_run, tmp_path):
    url, _ = server
    preflight = {"Origin": "https://elsewhere.example", "Access-Control-Request-Method": "POST"}
    assert "access-control-allow-origin" not in httpx.options(f"{url}/v1/predict", headers=preflight).headers
    with running_server(demo_like_run, cors_origins=["https://elsewhere.example"],
                        audit_db=str(tmp_path / "a.sqlite")) as allowed:
        answer = httpx.options(f"{allowed}/v1/predict", headers=preflight)
        assert answer.headers["access-control-allow-origin"] == "https://elsewhere.example"


def test_every_request_is_audited_without_images_or_names(demo_like_run, tmp_path):
    audit = tmp_path / "audit.sqlite"
    good = png_bytes(blob_image("right"))
    with running_server(demo_like_run, audit_db=str(audit)) as url:
        ok = httpx.post(f"{url}/v1/predict", files=upload(good, "Doe_John_1950.png")).json()
        httpx.post(f"{url}/v1/explain", files=upload(good, "Doe_John_1950.png"), params={"method": "hirescam"})
        httpx.post(f"{url}/v1/predict", files=upload(b"not an image", "Doe_John_1950.png"))
    rows = read_audit(str(audit))
    assert [(row["endpoint"], row["status"], row["outcome"]) for row in rows] == [
        ("predict", 200, "ok"), ("explain", 200, "ok"), ("predict", 400, "invalid_image")]
    first = rows[0]
    assert first["request_id"] == ok["request_id"] and first["input_sha256"] == hashlib.sha256(good).hexdigest()
    assert first["model_id"] == "served" and first["model_version"] == ok["model"]["version"]
    assert first["label"] == ok["label"] and first["in_domain"] == ok["in_domain"]
    assert json.loads(first["probabilities"]) if isinstance(first["probabilities"], str) else first["probabilities"]
    assert rows[1]["cam_method"] == "hirescam" and rows[2]["input_sha256"] == hashlib.sha256(
        b"not an image").hexdigest()
    assert "Doe_John" not in json.dumps(rows, default=str)


def test_memory_stays_flat_over_1000_explain_calls(client):
    psutil = pytest.importorskip("psutil")
    process = psutil.Process()
    data = [png_bytes(blob_image(side, (96, 96), seed)) for seed, side in enumerate(["left", "right"] * 4)]

    def calls(count):
        for index in range(count):
            response = client.post("/v1/explain", files=upload(data[index % len(data)]))
            assert response.status_code == 200

    calls(150)
    before = process.memory_info().rss
    started = time.monotonic()
    calls(1000)
    growth = process.memory_info().rss - before
    assert time.monotonic() - started < 300
    assert growth < 40 * 1024 * 1024, f"RSS grew by {growth / 2**20:.1f} MiB over 1000 explain calls"


def test_a_bounded_schemathesis_run_finds_no_server_error(server, tmp_path):
    url, _ = server
    command = [sys.executable, "-m", "schemathesis.cli", "run", f"{url}/openapi.json", "--checks",
               "not_a_server_error", "--max-examples", "12", "--seed", "1", "--workers", "1",
               "--phases", "examples,coverage,fuzzing", "--max-time", "10", "--no-color"]
    finished = subprocess.run(command, check=False, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert finished.returncode == 0, finished.stdout[-4000:] + finished.stderr[-2000:]
    generated = re.search(r"(\d+) generated, (\d+) passed", finished.stdout)
    assert generated and int(generated.group(1)) >= 100 and generated.group(1) == generated.group(2), finished.stdout
    assert "Tested: 7" in finished.stdout  # every operation of the schema was exercised

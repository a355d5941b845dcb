"""The service under hostile clients (issue 17): slow uploads and headers, many requests from one address, answers
that could carry a server path, client errors in the log, every refusal audited and counted, and what browsers are
told (Host, CSP, framing, caching, cross-site posts, /docs without a CDN).

A real uvicorn on loopback, configured as ``medxai serve`` configures it (tests/serve_helpers.py); raw sockets where a
client must misbehave, bound to 127.0.0.2 to stand for another machine.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import logging
import platform
import re
import select
import shutil
import socket
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import httpx
import nibabel as nib
import numpy as np
import pytest
from serve_helpers import running_server
from test_serve import LEAKS, assert_json_error, blob_image, png_bytes, upload

from medxai.errors import ConfigError, InvalidImageError
from medxai.serve.audit import read_audit
from medxai.serve.engine import Engine
from medxai.serve.gate import allowed_hosts
from medxai.serve.server import MAX_HEADER_BYTES, tune_malloc

OTHER_MACHINE = "127.0.0.2"  # a loopback address of its own: another client address for the per-client cap
ANY_PATH = re.compile(r"(?<![\w.])(?:/[\w.@+-]+){2,}")  # /srv/runs, /tmp/x: anything like a path in an answer
FAULT_SIDE = 77  # the faulty engine's run_batch raises an unexpected error for a 77 x 77 image


def slow_settings(**settings) -> dict:
    """Short limits, so that each misbehaving client is cut off within a few seconds."""
    return {"header_timeout_s": 2.5, "read_timeout_s": 2.5, "min_upload_rate": 1024.0, **settings}


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


class RawClient:
    """One connection from ``source`` that sends what the test says, when it says."""

    def __init__(self, url: str, source: str = OTHER_MACHINE) -> None:
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.socket.bind((source, 0))
        self.socket.settimeout(5)
        self.socket.connect(("127.0.0.1", port_of(url)))
        self.opened = time.monotonic()
        self.host = f"127.0.0.1:{port_of(url)}"

    def send(self, data: bytes) -> bool:
        try:
            self.socket.sendall(data)
            return True
        except OSError:
            return False

    def post_headers(self, length: int = 100_000, path: str = "/v1/predict") -> bytes:
        return (f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Length: {length}\r\n"
                "Content-Type: multipart/form-data; boundary=b\r\n\r\n").encode()

    def answer(self, trickle: bool = False, limit_s: float = 15.0) -> tuple[int | None, float]:
        """(status or None for a close without an answer, seconds since the connection opened); one byte a second
        meanwhile with ``trickle``."""
        deadline = time.monotonic() + limit_s
        while time.monotonic() < deadline:
            readable, _, _ = select.select([self.socket], [], [], 1.0)
            if readable:
                break
            if trickle and not self.send(b"-"):
                break
        try:
            head = self.socket.recv(65536)
        except OSError:
            head = b""
        finally:
            self.socket.close()
        seconds = time.monotonic() - self.opened
        match = re.match(rb"HTTP/1\.1 (\d{3}) ", head)
        return (int(match.group(1)) if match else None), seconds


def metric(text: str, endpoint: str, status: int) -> float:
    line = f'medxai_requests_total{{endpoint="{endpoint}",status="{status}"}} '
    return sum(float(row.split()[-1]) for row in text.splitlines() if row.startswith(line))


def outcomes(audit) -> Counter:
    return Counter((row["endpoint"], row["status"], row["outcome"]) for row in read_audit(str(audit)))


class FaultyEngine:
    """:meth:`Engine.load`, with errors that carry a server path and an unexpected failure on cue."""

    def __call__(self, run_dir, config):
        engine = Engine.load(run_dir, config)
        secret = f"{run_dir}/secret"
        decode, check_explain, run_batch = engine.decode, engine.check_explain, engine.run_batch

        def leaky_decode(data: bytes):
            if data.startswith(b"LEAK"):
                raise InvalidImageError(f"{secret}/upload.png", f"cannot read {secret}/upload.png")
            return decode(data)

        def leaky_check(method, target):
            if target == "leak":
                raise ConfigError(f"{secret}/model_card.json: no label 'leak'")
            return check_explain(method, target)

        def failing_batch(key, items):
            if any(item.image.shape[:2] == (FAULT_SIDE, FAULT_SIDE) for item in items):
                raise RuntimeError(f"{secret}/weights.bin: unexpected failure")
            return run_batch(key, items)

        engine.decode, engine.check_explain, engine.run_batch = leaky_decode, leaky_check, failing_batch
        return engine


@pytest.fixture(scope="module")
def server(demo_like_run, tmp_path_factory):
    audit = tmp_path_factory.mktemp("hardening") / "audit.sqlite"
    with running_server(demo_like_run, engine_factory=FaultyEngine(), max_upload_mb=2, audit_db=str(audit),
                        **slow_settings()) as url:
        yield url


# -- slow clients (defect 3) ----------------------------------------------------------------------------------------
def test_slow_clients_never_hold_the_queue_and_are_cut_off_in_time(demo_like_run, tmp_path):
    """--queue 4; 2 x 4 slow clients from one address: three trickle a byte a second, three idle after their headers,
    two idle before their headers are complete. Meanwhile another address is answered 200, a seventh request from the
    slow address gets 429, every slow one gets 408 within the bounds, and the server ends healthy."""
    audit = tmp_path / "audit.sqlite"
    image = png_bytes(blob_image("left"))
    with running_server(demo_like_run, queue=4, timeout_s=5, max_connections_per_client=6, audit_db=str(audit),
                        **slow_settings()) as url:
        results: dict[str, list] = {"trickle": [], "idle_body": [], "idle_headers": []}

        def slow(kind: str) -> None:
            client = RawClient(url)
            if kind == "idle_headers":
                client.send(f"POST /v1/predict HTTP/1.1\r\nHost: {client.host}\r\n".encode())  # never finished
            else:
                client.send(client.post_headers())
            results[kind].append(client.answer(trickle=kind == "trickle"))

        threads = [threading.Thread(target=slow, args=(kind,), daemon=True)
                   for kind in ["trickle"] * 3 + ["idle_body"] * 3 + ["idle_headers"] * 2]
        started = time.monotonic()
        for thread in threads:
            thread.start()
        time.sleep(0.4)  # every slow client connected and sending
        answered = []
        while time.monotonic() - started < 1.6 and len(answered) < 40:
            answered.append(httpx.post(f"{url}/v1/predict", files=upload(image), timeout=5).status_code)
        extra = httpx.Client(transport=httpx.HTTPTransport(local_address=OTHER_MACHINE))
        refused = extra.post(f"{url}/v1/predict", files=upload(image), timeout=5)
        extra.close()
        assert time.monotonic() - started < 2.3, "the legitimate requests ran past the slow clients' deadline"
        for thread in threads:
            thread.join(20)
        assert answered and set(answered) == {200}, answered
        assert_json_error(refused, 429, "too_many_requests")
        for kind, answers in results.items():
            assert len(answers) == (2 if kind == "idle_headers" else 3), (kind, answers)
            for status, seconds in answers:
                assert status == 408 and 2.3 < seconds < 4.5, (kind, status, seconds)  # limits 2.5 s (+1 s trickle)
        assert httpx.get(f"{url}/readyz").status_code == 200
        assert httpx.post(f"{url}/v1/predict", files=upload(image)).status_code == 200
        text = httpx.get(f"{url}/metrics").text
        assert "medxai_queue_depth 0.0" in text
        assert (metric(text, "predict", 408), metric(text, "predict", 429)) == (6, 1)
        assert metric(text, "predict", 200) == len(answered) + 1
    # the two whose headers never ended were not requests yet: no row; everything else one row each
    assert outcomes(audit) == Counter({("predict", 200, "ok"): len(answered) + 1,
                                       ("predict", 408, "request_timeout"): 6,
                                       ("predict", 429, "too_many_requests"): 1})


def test_headers_past_the_limit_are_refused(server):
    client = RawClient(server, source="127.0.0.1")
    client.send(f"GET /livez HTTP/1.1\r\nHost: {client.host}\r\nX-Pad: ".encode() + b"a" * (MAX_HEADER_BYTES + 10))
    assert client.answer()[0] == 431
    assert httpx.get(f"{server}/livez").status_code == 200


def test_a_body_larger_than_declared_or_undeclared_is_cut_off_at_the_limit(server):
    def chunks():
        yield b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x\"\r\n\r\n"
        for _ in range(40):
            yield bytes(100_000)  # 4 MB against --max-upload-mb 2, no Content-Length
        yield b"\r\n--b--\r\n"

    streamed = httpx.post(f"{server}/v1/predict", content=chunks(), timeout=30,
                          headers={"content-type": "multipart/form-data; boundary=b"})
    assert_json_error(streamed, 413, "upload_too_large")
    client = RawClient(server, source="127.0.0.1")
    client.send(client.post_headers(length=3 * 1024 * 1024))  # declared past the limit: refused before the body
    assert client.answer()[0] == 413


def test_uploads_being_received_share_a_memory_budget(demo_like_run, tmp_path):
    """--receive-budget-mb 2: two clients that declared 1 MB each and send nothing hold it; a third upload gets 503
    ``busy`` before its body is read, and is answered once they are cut off."""
    audit = tmp_path / "audit.sqlite"
    image = png_bytes(blob_image("left"))
    with running_server(demo_like_run, max_upload_mb=1, receive_budget_mb=2, audit_db=str(audit),
                        **slow_settings()) as url:
        holders = [RawClient(url) for _ in range(2)]
        for holder in holders:
            holder.send(holder.post_headers(length=1024 * 1024))
        time.sleep(0.3)
        busy = httpx.post(f"{url}/v1/predict", files=upload(image))
        assert_json_error(busy, 503, "busy")
        assert busy.headers["retry-after"] == "1"
        assert [holder.answer()[0] for holder in holders] == [408, 408]
        assert httpx.post(f"{url}/v1/predict", files=upload(image)).status_code == 200
    assert outcomes(audit) == Counter({("predict", 503, "busy"): 1, ("predict", 408, "request_timeout"): 2,
                                       ("predict", 200, "ok"): 1})


# -- no path in any answer (defect 4) ---------------------------------------------------------------------------------
def test_a_model_that_fails_to_load_says_what_failed_without_a_path(demo_like_run, tmp_path, caplog):
    run = tmp_path / "broken"
    shutil.copytree(demo_like_run, run)
    (run / "checkpoints" / "best.safetensors").write_bytes(b"not weights at all")
    token = "load-failure-token-0123456789"
    (tmp_path / "token").write_text(token)
    expected = "the model failed to load (checkpoint unreadable); see the server log"
    with caplog.at_level(logging.INFO), running_server(run, wait_ready=False, token_file=str(tmp_path / "token"),
                                                       audit_db=str(tmp_path / "a.sqlite")) as url:
        deadline = time.monotonic() + 60
        while "failed" not in httpx.get(f"{url}/readyz").text:
            assert time.monotonic() < deadline, "loading never failed"
            time.sleep(0.05)
        for headers in ({}, {"Authorization": f"Bearer {token}"}):
            answers = [httpx.get(f"{url}/readyz", headers=headers), httpx.get(f"{url}/v1/model", headers=headers)]
            if headers:
                answers.append(httpx.post(f"{url}/v1/predict", files=upload(b"x"), headers=headers))
            else:
                assert_json_error(answers.pop(), 401, "unauthorized")
            for answer in answers:
                assert assert_json_error(answer, 503, "not_ready")["detail"] == expected
                assert str(tmp_path) not in answer.text and not ANY_PATH.search(answer.text), answer.text
    failures = [record for record in caplog.records if record.levelno >= logging.ERROR]
    assert len(failures) == 1 and str(run) in failures[0].getMessage() and failures[0].exc_info is None
    assert [(row["status"], row["outcome"]) for row in read_audit(str(tmp_path / "a.sqlite"))] == [
        (503, "not_ready")]


def test_no_error_answer_carries_a_server_path(server, demo_like_run):
    image = png_bytes(blob_image("left"))
    answers = {
        "reader error": (httpx.post(f"{server}/v1/predict", files=upload(b"LEAK" + bytes(20))), 400),
        "config error": (httpx.post(f"{server}/v1/explain", files=upload(image), params={"target": "leak"}), 400),
        "echoed input": (httpx.post(f"{server}/v1/explain", files=upload(image),
                                    params={"colormap": "/srv/secret/cmap"}), 400),
        "validation": (httpx.post(f"{server}/v1/explain", files=upload(image),
                                  params={"alpha": "/srv/secret", "method": "/srv/x/y"}), 422),
        "unexpected": (httpx.post(f"{server}/v1/predict",
                                  files=upload(png_bytes(blob_image("left", (FAULT_SIDE, FAULT_SIDE))))), 500),
    }
    for name, (answer, status) in answers.items():
        assert answer.status_code == status, (name, answer.text)
        assert str(demo_like_run) not in answer.text and not ANY_PATH.search(answer.text), (name, answer.text)
        assert not any(leak in answer.text for leak in LEAKS), (name, answer.text)
    assert "<path>" in answers["reader error"][0].json()["detail"]


# -- client errors in the log (defect 6) -------------------------------------------------------------------------------
def nifti_bytes(shape: tuple[int, ...]) -> bytes:
    buffer = io.BytesIO()
    image = nib.Nifti1Image(np.full(shape, 50, dtype=np.int16), np.eye(4))
    image.to_file_map({"image": nib.FileHolder(fileobj=buffer), "header": nib.FileHolder(fileobj=buffer)})
    return buffer.getvalue()


def test_client_errors_are_one_info_line_each_and_never_a_traceback(server, caplog):
    cases = {
        "1 x 1 PNG": png_bytes(np.zeros((1, 1), dtype=np.uint8)),
        "1 x 30000 NIfTI": nifti_bytes((1, 30000, 1)),
        "1 x 30000 NIfTI, gzipped": gzip.compress(nifti_bytes((1, 30000, 1))),
        "text": b"not an image\n" * 10,
        "zero bytes": b"",
    }
    with caplog.at_level(logging.DEBUG):
        for name, data in cases.items():
            for endpoint in ("predict", "explain"):
                answer = httpx.post(f"{server}/v1/{endpoint}", files=upload(data))
                assert answer.status_code == 400, (name, endpoint, answer.text)
    served = [record for record in caplog.records if not record.name.startswith(("httpx", "httpcore"))]
    assert not [record for record in served if record.levelno >= logging.WARNING], caplog.text
    assert not any(record.exc_info for record in served) and "Traceback" not in caplog.text
    lines = [record.getMessage() for record in served if record.levelno == logging.INFO]
    assert len(lines) == 2 * len(cases), lines
    assert all(re.match(r"(predict|explain) 400 invalid_image \(request \w+\): ", line) for line in lines), lines


# -- every answer recorded once (defect 7) ---------------------------------------------------------------------------
def test_every_answer_to_a_model_request_is_audited_and_counted_once(demo_like_run, tmp_path):
    audit = tmp_path / "audit.sqlite"
    image = png_bytes(blob_image("right"))
    expected: Counter = Counter()
    with running_server(demo_like_run, engine_factory=FaultyEngine(), max_upload_mb=1, audit_db=str(audit),
                        **slow_settings(read_timeout_s=0.5)) as url:

        def check(endpoint: str, answer: httpx.Response | int, status: int, outcome: str) -> None:
            code = answer if isinstance(answer, int) else answer.status_code
            assert code == status, (endpoint, outcome, getattr(answer, "text", ""))
            expected[(endpoint, status, outcome)] += 1

        post = httpx.post
        multipart = {"content-type": "multipart/form-data; boundary=b"}
        nameless = b"--b\r\nContent-Disposition: form-data; filename=\"x\"\r\n\r\nabc\r\n--b--\r\n"
        for endpoint in ("predict", "explain"):
            target = f"{url}/v1/{endpoint}"
            check(endpoint, post(target, files=upload(image)), 200, "ok")
            check(endpoint, post(target), 422, "validation_error")
            check(endpoint, post(target, content=b"x", headers={"content-type": "multipart/form-data"}), 400,
                  "bad_request")  # no boundary: Starlette's parser refuses
            check(endpoint, post(target, content=nameless, headers=multipart), 400, "bad_request")
            check(endpoint, post(target, files=upload(b"not an image")), 400, "invalid_image")
            check(endpoint, post(target, files=upload(bytes(2 * 1024 * 1024))), 413, "upload_too_large")
            check(endpoint, post(target, files=upload(image), headers={"Origin": "https://evil.example"}), 403,
                  "cross_site")
            check(endpoint, post(target, files=upload(image), headers={"Host": "evil.example"}), 400, "bad_host")
            faulty = png_bytes(blob_image("left", (FAULT_SIDE, FAULT_SIDE)))
            check(endpoint, post(target, files=upload(faulty)), 500, "internal")
            client = RawClient(url, source="127.0.0.1")
            client.send(client.post_headers(path=f"/v1/{endpoint}"))
            check(endpoint, client.answer()[0], 408, "request_timeout")
        check("explain", post(f"{url}/v1/explain", files=upload(image), params={"alpha": "2"}), 422,
              "validation_error")
        check("explain", post(f"{url}/v1/explain", files=upload(image), params={"method": "nope"}), 422,
              "validation_error")
        text = httpx.get(f"{url}/metrics").text
        by_status: Counter = Counter()
        for (endpoint, status, _), count in expected.items():
            by_status[(endpoint, status)] += count
        for (endpoint, status), count in by_status.items():
            assert metric(text, endpoint, status) == count, (endpoint, status, text)
    assert outcomes(audit) == expected


# -- browsers ---------------------------------------------------------------------------------------------------------
def test_answers_carry_the_security_headers_and_results_are_not_cached(server):
    image = png_bytes(blob_image("left"))
    answers = {
        "page": httpx.get(f"{server}/"),
        "model": httpx.get(f"{server}/v1/model"),
        "predict": httpx.post(f"{server}/v1/predict", files=upload(image)),
        "explain": httpx.post(f"{server}/v1/explain", files=upload(image), params={"overlay": "url"}),
        "error": httpx.post(f"{server}/v1/predict", files=upload(b"x")),
    }
    answers["overlay"] = httpx.get(server + answers["explain"].json()["explanation"]["overlay_url"])
    for name, answer in answers.items():
        headers = answer.headers
        assert headers["x-content-type-options"] == "nosniff" and headers["x-frame-options"] == "DENY", name
        assert headers["cache-control"] == "no-store", name
        policy = headers["content-security-policy"]
        assert "default-src 'self'" in policy and "frame-ancestors 'none'" in policy, name
        assert "unsafe-inline" not in policy and "unsafe-eval" not in policy and "http" not in policy, name
    assert answers["predict"].headers["x-request-id"] == answers["predict"].json()["request_id"]
    script = httpx.get(f"{server}/static/app.js")
    assert script.status_code == 200 and "cache-control" not in script.headers
    assert script.headers["x-content-type-options"] == "nosniff"


def test_a_host_other_than_this_server_is_refused(server, demo_like_run, tmp_path):
    for path in ("/", "/v1/model", "/docs", "/metrics", "/static/app.js"):
        assert_json_error(httpx.get(f"{server}{path}", headers={"Host": "evil.example"}), 400, "bad_host")
        assert httpx.get(f"{server}{path}", headers={"Host": f"localhost:{port_of(server)}"}).status_code == 200
    assert_json_error(httpx.post(f"{server}/v1/predict", files=upload(png_bytes(blob_image("left"))),
                                 headers={"Host": "evil.example:80"}), 400, "bad_host")
    assert httpx.get(f"{server}/livez", headers={"Host": "10.0.0.7:8000"}).status_code == 200  # probes: any Host
    with running_server(demo_like_run, wait_ready=False, allowed_hosts=["medxai.hospital.example"],
                        audit_db=str(tmp_path / "a.sqlite")) as named:
        for host, status in (("medxai.hospital.example", 200), ("MEDXAI.hospital.example:8000", 200),
                             ("localhost", 200), ("[::1]:80", 200), ("0.0.0.0", 400), ("other.example", 400),
                             ("medxai.hospital.example.evil.example", 400)):
            assert httpx.get(f"{named}/", headers={"Host": host}).status_code == status, host


def test_allowed_hosts_follow_the_bound_address():
    assert allowed_hosts("0.0.0.0", []) == {"localhost", "127.0.0.1", "::1"}  # a wildcard names no host
    assert allowed_hosts("10.1.2.3", ["PACS-Viewer.hospital "]) == {"localhost", "127.0.0.1", "::1", "10.1.2.3",
                                                                     "pacs-viewer.hospital"}
    assert allowed_hosts("[::]", []) == {"localhost", "127.0.0.1", "::1"}


def test_cross_site_posts_without_a_token_are_refused(server, demo_like_run, tmp_path):
    image = png_bytes(blob_image("left"))
    own = f"http://127.0.0.1:{port_of(server)}"
    for headers in ({"Origin": "https://evil.example"}, {"Sec-Fetch-Site": "cross-site"},
                    {"Sec-Fetch-Site": "same-site", "Origin": "http://localhost:3000"}, {"Origin": "null"}):
        assert_json_error(httpx.post(f"{server}/v1/predict", files=upload(image), headers=headers), 403,
                          "cross_site")
    for headers in ({}, {"Origin": own, "Sec-Fetch-Site": "same-origin"}, {"Origin": own},
                    {"Origin": "https://evil.example", "Authorization": "Bearer not-a-form-post"}):
        assert httpx.post(f"{server}/v1/predict", files=upload(image), headers=headers).status_code == 200, headers
    assert httpx.get(f"{server}/v1/model", headers={"Sec-Fetch-Site": "cross-site"}).status_code == 200  # reads: CORS
    with running_server(demo_like_run, cors_origins=["https://viewer.example"],
                        audit_db=str(tmp_path / "a.sqlite")) as allowed:
        answer = httpx.post(f"{allowed}/v1/predict", files=upload(image),
                            headers={"Origin": "https://viewer.example", "Sec-Fetch-Site": "cross-site"})
        assert answer.status_code == 200 and answer.headers["access-control-allow-origin"] == "https://viewer.example"


def test_the_api_docs_come_from_the_service_itself(server):
    page = httpx.get(f"{server}/docs")
    assert page.status_code == 200
    sources = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert sources and all(source.startswith("/docs/assets/") for source in sources), sources
    assert "cdn" not in page.text.lower() and "https://" not in page.text
    inline = re.findall(r"<script>(.*?)</script>", page.text, flags=re.DOTALL)
    digest = base64.b64encode(hashlib.sha256(inline[0].encode()).digest()).decode()
    assert f"'sha256-{digest}'" in page.headers["content-security-policy"]
    assert "sha256-" not in httpx.get(f"{server}/").headers["content-security-policy"]  # no inline script elsewhere
    for source in sources:
        asset = httpx.get(server + source)
        assert asset.status_code == 200 and len(asset.content) > 100, source
    assert "SwaggerUIBundle" in httpx.get(f"{server}/docs/assets/swagger-ui-bundle.js").text


# -- memory under many clients ---------------------------------------------------------------------------------------
def test_uploads_are_decoded_on_the_services_few_worker_threads(demo_like_run, tmp_path):
    """--worker-threads bounds the decodes running at once (anyio's default pool would run up to 40): every thread
    that allocates at once gets a malloc arena that keeps what it freed (benchmarks/serve_memory.py)."""
    running, most = [0], [0]
    lock = threading.Lock()

    def counting_engine(run_dir, config):
        engine = Engine.load(run_dir, config)
        decode = engine.decode

        def counted(data: bytes):
            with lock:
                running[0] += 1
                most[0] = max(most[0], running[0])
            try:
                time.sleep(0.05)  # long enough for the callers to pile up
                return decode(data)
            finally:
                with lock:
                    running[0] -= 1

        engine.decode = counted
        return engine

    image = png_bytes(blob_image("right"))
    with running_server(demo_like_run, engine_factory=counting_engine, worker_threads=2, max_connections_per_client=0,
                        audit_db=str(tmp_path / "a.sqlite")) as url, ThreadPoolExecutor(12) as pool:
        statuses = list(pool.map(lambda _: httpx.post(f"{url}/v1/predict", files=upload(image), timeout=30)
                                 .status_code, range(24)))
    assert statuses == [200] * 24 and most[0] == 2


def test_the_allocator_is_bounded_on_glibc():
    if platform.libc_ver()[0] != "glibc":
        pytest.skip("mallopt is glibc's")
    assert tune_malloc(2)

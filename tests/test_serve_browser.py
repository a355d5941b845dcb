"""The page of ``medxai serve`` in a real browser: Debian's headless Chromium, driven by Playwright, against the real app
on loopback. A clinician's session: a full-resolution chest X-ray (JPEG) and a chest CR (DICOM) uploaded, the decision,
the probabilities, the heatmap blended at the image's original size, the opacity slider, the history, the download, the
keyboard, and not one request outside the service.

Needs /usr/bin/chromium (``make test`` installs Debian's package when it can; never downloads a browser) and the shared
real data (``MEDXAI_DATA_DIR``).
"""

from __future__ import annotations

import io
import re
from pathlib import Path

import httpx
import numpy as np
import pydicom
import pytest
from conftest import real_data_dir
from PIL import Image
from serve_helpers import running_server  # the run served: conftest.py demo_like_run

# Full resolution: 1422 x 1152 grey JPEG, and the pydicom-data chest CR PA, 1841 x 1955 JPEG 2000 MONOCHROME1.
CHEST_JPEG = Path("chest_xray_fullres_sample/NORMAL/IM-0117-0001.jpeg")
CHEST_DICOM = Path("dicom/pydicom-data/RG1_J2KI.dcm")
RESULT_TIMEOUT_MS = 90_000  # a 3.6-megapixel DICOM decoded, explained and sent back as two PNGs, on a small CPU

# What the picture on #canvas is: its size, a position-weighted checksum, its colourfulness (|R-G| + |G-B|: zero for
# a grey X-ray, large under a jet heatmap) and whether all its pixels are the same.
CANVAS_FACTS = """() => {
  const canvas = document.getElementById("canvas");
  const data = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
  let checksum = 0, colour = 0, uniform = true;
  for (let i = 0; i < data.length; i += 4) {
    checksum = (Math.imul(checksum, 31) + data[i] * 65536 + data[i + 1] * 256 + data[i + 2]) | 0;
    colour += Math.abs(data[i] - data[i + 1]) + Math.abs(data[i + 1] - data[i + 2]);
    if (uniform && (data[i] !== data[0] || data[i + 1] !== data[1] || data[i + 2] !== data[2])) uniform = false;
  }
  return {width: canvas.width, height: canvas.height, checksum, colour: colour / (data.length / 4), uniform};
}"""
IDLE = ("() => !document.body.classList.contains('busy') && document.querySelector('#label').textContent.trim() !== ''"
        " && document.querySelectorAll('#history li').length === {count}")


@pytest.fixture(scope="module", autouse=True)
def real_data():
    """Skip before a browser starts or a model is trained when the shared data is absent."""
    if real_data_dir() is None:
        pytest.skip("real data not available: set MEDXAI_DATA_DIR to the shared data folder (see its README.md)")


@pytest.fixture(scope="module")
def service(demo_like_run):
    with running_server(demo_like_run) as url:
        yield url


def open_page(browser, url: str, path: str = "/"):
    """A fresh page on the service, every request it makes and every script error it raises recorded (a Content
    Security Policy violation is a console error)."""
    opened = browser.new_page(viewport={"width": 1280, "height": 900}, accept_downloads=True)
    opened.requests, opened.errors = [], []
    opened.on("request", lambda request: opened.requests.append(request))
    opened.on("pageerror", lambda error: opened.errors.append(str(error)))
    opened.on("console", lambda message: message.type == "error" and opened.errors.append(message.text))
    opened.goto(f"{url}{path}", wait_until="load")
    return opened


@pytest.fixture(scope="module")
def token_service(demo_like_run, tmp_path_factory):
    """The same run behind a bearer token: (base URL, token)."""
    folder = tmp_path_factory.mktemp("token")
    token = "page-test-token-0123456789"
    (folder / "token").write_text(token)
    with running_server(demo_like_run, token_file=str(folder / "token"), audit_db=str(folder / "audit.sqlite")) as url:
        yield url, token


@pytest.fixture
def page(browser, service):
    opened = open_page(browser, service)
    opened.wait_for_function("() => document.querySelector('#method').options.length > 0")  # the card is in
    try:
        yield opened
    finally:
        opened.close()


def wait_for_results(page, count: int) -> None:
    page.wait_for_function(IDLE.replace("{count}", str(count)), timeout=RESULT_TIMEOUT_MS)
    assert not page.locator("#status [role=alert]").count(), page.inner_text("#status")


def shown_probabilities(page) -> list[dict]:
    return page.eval_on_selector_all(
        "#probabilities .prob-bar",
        "bars => bars.map(bar => ({label: bar.dataset.label, probability: Number(bar.dataset.probability),"
        " text: bar.querySelector('.prob-value').textContent, decided: bar.classList.contains('decided')}))",
    )


def test_page_explains_a_full_resolution_jpeg_and_a_dicom_file(page, service, data_dir):
    card = httpx.get(f"{service}/v1/model", timeout=10).json()
    assert card["explain_available"], "the demo-like run is served with the PyTorch backend"
    jpeg, dicom = data_dir / CHEST_JPEG, data_dir / CHEST_DICOM
    with Image.open(jpeg) as image:
        jpeg_size = image.size
    header = pydicom.dcmread(dicom, stop_before_pixels=True)
    dicom_size = (int(header.Columns), int(header.Rows))

    banner = page.locator("#clinical-banner")
    assert banner.is_visible() and "Not for clinical use" in banner.inner_text()  # clinical_use is false
    assert card["intended_use"] in banner.inner_text()
    assert page.eval_on_selector("#method", "select => select.value") == card["default_method"]

    page.set_input_files("#file-input", str(jpeg))
    wait_for_results(page, 1)
    bars = shown_probabilities(page)
    assert [bar["label"] for bar in bars] == card["label_names"]
    assert sum(bar["probability"] for bar in bars) == pytest.approx(1.0, abs=1e-3)
    shown_percent = [float(re.match(r"\s*([\d.]+)\s*%", bar["text"]).group(1)) for bar in bars]
    assert sum(shown_percent) == pytest.approx(100.0, abs=0.2)  # the numbers a reader sees, rounded to 0.1
    decided = [bar["label"] for bar in bars if bar["decided"]]
    assert decided == [page.inner_text("#label").strip()]
    if card["threshold"] is not None:
        assert page.locator(f'.prob-bar[data-label="{card["threshold"]["label"]}"] .prob-threshold').count() == 1
    assert card["decision_rule"] in page.inner_text("#result")

    first = page.evaluate(CANVAS_FACTS)
    assert (first["width"], first["height"]) == jpeg_size  # the bitmap is the original, CSS only scales it down
    assert f"{jpeg_size[0]} × {jpeg_size[1]}" in page.inner_text("#caption")
    assert not first["uniform"] and first["colour"] > 5  # a grey X-ray with a coloured heatmap over it
    shown_width = page.eval_on_selector("#canvas", "canvas => canvas.getBoundingClientRect().width")
    assert shown_width < jpeg_size[0]  # scaled to fit the page

    assert page.input_value("#opacity") == "0.4"  # the response's alpha
    page.fill("#opacity", "0.9")
    stronger = page.evaluate(CANVAS_FACTS)
    assert stronger["checksum"] != first["checksum"] and stronger["colour"] > first["colour"]
    page.focus("#opacity")
    page.keyboard.press("ArrowLeft")
    page.keyboard.press("ArrowLeft")
    assert float(page.input_value("#opacity")) == pytest.approx(0.8)
    assert page.evaluate(CANVAS_FACTS)["checksum"] != stronger["checksum"]

    with page.expect_download() as download_info:
        page.click("#download")
    download = download_info.value
    assert re.fullmatch(r"overlay-1-[\w.+-]+\.png", download.suggested_filename), download.suggested_filename
    with Image.open(download.path()) as saved:
        assert saved.format == "PNG" and saved.size == jpeg_size

    page.set_input_files("#file-input", str(dicom))
    wait_for_results(page, 2)
    second = page.evaluate(CANVAS_FACTS)
    assert (second["width"], second["height"]) == dicom_size  # Columns x Rows
    assert not second["uniform"]
    assert "DICOM" in page.inner_text("#caption")
    assert len(shown_probabilities(page)) == len(card["label_names"])
    with dicom.open("rb") as upload:  # the page shows what the API answers for the same file
        answer = httpx.post(f"{service}/v1/predict", files={"file": ("x", upload)}, timeout=60).json()
    assert page.inner_text("#label").strip() == answer["label"]
    for bar in shown_probabilities(page):
        assert bar["probability"] == pytest.approx(answer["probabilities"][bar["label"]], abs=1e-4)
    assert page.locator("#ood-banner").is_visible() == (answer["in_domain"] is False)
    if answer["in_domain"] is False:
        assert page.locator("#ood-reasons li").count() == len(answer["domain_reasons"])

    other = next(method for method in card["cam_methods"] if method != card["default_method"])
    page.select_option("#method", other)  # re-explains the image on show, in place in the history
    page.wait_for_function(f"() => document.querySelector('#caption').textContent.includes('{other}')",
                           timeout=RESULT_TIMEOUT_MS)
    wait_for_results(page, 2)
    assert other in page.locator("#history li").nth(1).inner_text()

    page.locator("#history li button").first.focus()
    page.keyboard.press("Enter")  # back to the first result, from the keyboard
    again = page.evaluate(CANVAS_FACTS)
    assert (again["width"], again["height"]) == jpeg_size
    assert page.locator("#history li button").first.get_attribute("aria-current") == "true"

    screenshot = np.asarray(Image.open(io.BytesIO(page.screenshot(full_page=True))).convert("RGB"), dtype=np.float32)
    assert screenshot.std() > 20  # text, bars and a heatmap, not a blank page

    assert not page.errors, page.errors
    outside = [request.url for request in page.requests
               if not request.url.startswith((f"{service}/", "data:", "blob:"))]
    assert not outside, outside


def test_page_is_usable_from_the_keyboard(page, service, data_dir):
    # Playwright intercepts file choosers once a listener exists, switched on asynchronously: added only by
    # expect_file_chooser below, the key press could win that race and open Chromium's own dialog instead.
    page.on("filechooser", lambda chooser: None)
    page.evaluate("() => document.activeElement && document.activeElement.blur()")
    for _ in range(10):  # the drop zone is the first stop of the tab order, the banner and header have no control
        page.keyboard.press("Tab")
        if page.evaluate("() => document.activeElement.id") == "dropzone":
            break
    assert page.evaluate("() => document.activeElement.id") == "dropzone"
    outline = page.eval_on_selector("#dropzone", "zone => getComputedStyle(zone).outlineStyle")
    assert outline not in ("", "none")  # a visible focus ring
    for control in ("file-input", "method", "opacity", "token"):  # every control has a label
        assert page.locator(f'label[for="{control}"]').count() == 1, control
    assert page.get_attribute("#status", "aria-live") == "polite"

    with page.expect_file_chooser() as chooser_info:
        page.keyboard.press("Enter")  # Enter on the drop zone opens the file picker
    chooser_info.value.set_files(str(data_dir / CHEST_JPEG))
    wait_for_results(page, 1)
    assert page.inner_text("#label").strip() in httpx.get(f"{service}/v1/model", timeout=10).json()["label_names"]
    assert page.locator("#history li").count() == 1
    assert not page.errors, page.errors


def test_page_asks_for_the_token_keeps_it_in_memory_and_sends_it(browser, token_service, data_dir):
    url, token = token_service
    page = open_page(browser, url)
    try:
        page.wait_for_selector("#token", state="visible")  # /v1/model answered 401
        assert "token" in page.inner_text("#status [role=alert]").lower()
        page.fill("#token", "not-the-token-at-all")
        page.keyboard.press("Enter")
        page.wait_for_selector("#token", state="visible")  # refused: asked again
        assert "not accepted" in page.inner_text("#status [role=alert]")
        page.fill("#token", token)
        page.keyboard.press("Enter")
        page.wait_for_function("() => document.querySelector('#method').options.length > 0")
        page.set_input_files("#file-input", str(data_dir / CHEST_JPEG))
        wait_for_results(page, 1)
        sent = [request for request in page.requests if "/v1/" in request.url]
        assert sent[-1].headers.get("authorization") == f"Bearer {token}"
        assert all(token not in request.url for request in page.requests)
        stored = page.evaluate("() => JSON.stringify([{...localStorage}, {...sessionStorage}, document.cookie])")
        assert token not in stored and page.input_value("#token") == ""
        page.errors = [error for error in page.errors if "401" not in error]  # the refused requests, logged
        assert not page.errors, page.errors
    finally:
        page.close()


def test_api_docs_render_from_the_service_alone_under_its_policy(browser, service):
    """Swagger UI from the package's files: every operation listed, one expanded, nothing fetched from elsewhere and
    nothing the Content-Security-Policy had to block."""
    page = open_page(browser, service, "/docs")
    try:
        page.wait_for_selector(".opblock", timeout=RESULT_TIMEOUT_MS)
        paths = set(httpx.get(f"{service}/openapi.json", timeout=10).json()["paths"])
        shown = set(page.eval_on_selector_all(".opblock-summary-path", "nodes => nodes.map(n => n.dataset.path)"))
        assert shown == paths
        page.locator(".opblock-summary", has_text="/v1/predict").first.click()
        page.wait_for_selector(".opblock.is-open .parameters-container, .opblock.is-open .opblock-section",
                               timeout=RESULT_TIMEOUT_MS)
        assert not page.errors, page.errors
        outside = [request.url for request in page.requests if not request.url.startswith((f"{service}/", "data:"))]
        assert not outside, outside
    finally:
        page.close()

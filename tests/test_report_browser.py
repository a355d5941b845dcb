"""The report in a real browser: Debian's headless Chromium, driven by Playwright, opens the file offline, finds every
section, every image decoded, and renders a page that is not blank.

Needs /usr/bin/chromium (``make test`` installs Debian's package when it can); never downloads a browser.
"""

from __future__ import annotations

import shutil

import numpy as np
from test_report import MAX_REPORT_BYTES, noisy_run  # noqa: F401  (the shared run fixture)

from medxai.report.html import SECTION_IDS


def test_report_opens_offline_with_every_section_and_image(browser, noisy_run, tmp_path):  # noqa: F811
    report = tmp_path / "report.html"
    shutil.copy(noisy_run / "report.html", report)  # alone in a folder: nothing beside it to load
    assert report.stat().st_size < MAX_REPORT_BYTES
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    requests: list[str] = []
    page.on("request", lambda request: requests.append(request.url))
    page.goto(report.as_uri(), wait_until="load")

    for section in SECTION_IDS:
        locator = page.locator(f"section#{section}")
        assert locator.count() == 1, section
        assert locator.locator("h2").inner_text().strip(), section
    images = page.evaluate(
        "() => Array.from(document.images).map(image => "
        "({complete: image.complete, width: image.naturalWidth, height: image.naturalHeight, alt: image.alt}))"
    )
    assert len(images) >= 10  # training curves, 4 figures per split, the gallery
    broken = [image["alt"] for image in images
              if not (image["complete"] and image["width"] > 0 and image["height"] > 0)]
    assert not broken, f"images that did not load: {broken}"
    gallery_images = page.locator("section#gallery img").count()
    assert gallery_images > 0
    assert page.locator("section#metrics table.metrics tbody tr").count() == 4  # val, test at 0.5 and at threshold
    assert all(url.startswith(("file:", "data:")) for url in requests), requests

    screenshot = tmp_path / "report.png"
    page.screenshot(path=str(screenshot), full_page=True)
    page.close()
    from PIL import Image

    pixels = np.asarray(Image.open(screenshot).convert("RGB"), dtype=np.float32)
    assert pixels.shape[0] > 3000 and pixels.shape[1] == 1280  # the whole long page, not a blank viewport
    assert pixels.std() > 20  # not a blank page
    distinct = np.unique(pixels[::4, ::4].reshape(-1, 3).astype(np.uint8), axis=0).shape[0]
    assert distinct > 200  # figures and heatmaps rendered, not just text on white

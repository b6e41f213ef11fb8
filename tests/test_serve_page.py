"""The page `swinx serve` shows at /, driven in headless Chromium (Debian's, through Playwright) against
the real server: upload a digit, read the right class, click a token and get its attention picture,
do the same with the keyboard, draw the windows, and fit a narrow screen. Screenshots go to
test-artefacts/ (docs/images/serve.png in the README is one of them)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from test_serve import serving

FIXTURES = Path(__file__).parent / "fixtures" / "serve"
ARTEFACTS = Path(__file__).parent.parent / "test-artefacts"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

if CHROMIUM is None and os.environ.get("CI"):
    raise RuntimeError("Chromium is missing: `make install` installs Debian's chromium for these tests")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium on this machine (make install adds it)")


@pytest.fixture(scope="module")
def page_url():
    with serving(FIXTURES / "digits32.safetensors") as server:
        yield f"http://127.0.0.1:{server.port}/"


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        yield browser
        browser.close()


def loaded_picture(page, selector: str) -> bool:
    page.wait_for_selector(f"{selector}:not([hidden])", timeout=60_000)
    page.wait_for_function(f"document.querySelector('{selector}').naturalWidth > 0", timeout=60_000)
    return True


def test_upload_predict_click_a_token(browser, page_url):
    ARTEFACTS.mkdir(exist_ok=True)
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(page_url)
    page.wait_for_function("!document.querySelector('#about').textContent.includes('loading')")
    assert "3 stages, depths 2-2-2" in page.text_content("#about")
    page.set_input_files("#file", str(FIXTURES / "digit3.png"))
    page.wait_for_selector("#prediction .bar")
    assert page.locator("#prediction .bar .name").first.text_content() == "3"
    assert page.locator("#prediction .bar").count() == 5

    box = page.locator("#preview").bounding_box()
    page.mouse.click(box["x"] + box["width"] * 0.6, box["y"] + box["height"] * 0.4)  # stage 1: 16x16 tokens
    assert loaded_picture(page, "#attention")
    page.wait_for_function("document.querySelector('#status').textContent.startsWith('attention of token 6,9')")

    page.click("#windows-button")
    assert loaded_picture(page, "#windows")
    page.screenshot(path=str(ARTEFACTS / "serve-page.png"), full_page=True)
    page.close()


def test_keyboard_only(browser, page_url):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(page_url)
    page.wait_for_function("!document.querySelector('#about').textContent.includes('loading')")
    page.set_input_files("#file", str(FIXTURES / "digit7.png"))
    page.wait_for_selector("#prediction .bar")
    assert page.locator("#prediction .bar .name").first.text_content() == "7"
    page.select_option("#stage", "2")
    page.focus("#preview")
    for key in ["ArrowRight", "ArrowRight", "ArrowDown", "Enter"]:
        page.keyboard.press(key)
    assert loaded_picture(page, "#attention")
    page.wait_for_function(
        "document.querySelector('#status').textContent.startsWith('attention of token 1,2 in stage 2')"
    )
    page.close()


def test_narrow_screen(browser, page_url):
    page = browser.new_page(viewport={"width": 380, "height": 800})
    page.goto(page_url)
    page.wait_for_function("!document.querySelector('#about').textContent.includes('loading')")
    page.set_input_files("#file", str(FIXTURES / "digit0.png"))
    page.wait_for_selector("#prediction .bar")
    assert page.locator("#prediction .bar .name").first.text_content() == "0"
    assert page.evaluate("document.documentElement.scrollWidth") <= 380  # no sideways scrolling
    ARTEFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTEFACTS / "serve-page-narrow.png"), full_page=True)
    page.close()


def test_windows_of_one_stage(browser, page_url):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(page_url)
    page.wait_for_function("!document.querySelector('#about').textContent.includes('loading')")
    page.set_input_files("#file", str(FIXTURES / "digit3.png"))
    page.wait_for_selector("#prediction .bar")
    page.select_option("#windows-stage", "2")
    page.click("#windows-button")
    assert loaded_picture(page, "#windows")
    one = page.evaluate("document.querySelector('#windows').naturalHeight")
    page.select_option("#windows-stage", "0")
    page.click("#windows-button")
    page.wait_for_function(f"document.querySelector('#windows').naturalHeight > {one * 2}", timeout=60_000)
    page.close()


@pytest.mark.parametrize("task", ["detection", "segmentation"])
def test_dense_models_draw_over_the_image(browser, task, tmp_path_factory):
    """A detector's boxes are drawn over the image, a segmenter's mask laid on it; bars list them."""
    checkpoint = make_dense(task, tmp_path_factory)
    with serving(checkpoint, "--threshold", "0") as server:
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(f"http://127.0.0.1:{server.port}/")
        page.wait_for_function(f"document.querySelector('#about').textContent.startsWith('{task}')")
        page.set_input_files("#file", str(FIXTURES / "digit3.png"))
        page.wait_for_selector("#prediction .bar")
        if task == "detection":
            assert page.locator("#boxes rect").count() == 5 and page.locator("#prediction .bar").count() == 5
        else:
            assert page.is_visible("#mask")
            page.wait_for_function("document.querySelector('#mask').naturalWidth === 32")
        assert page.is_visible("#dense-hint")
        page.screenshot(path=str(ARTEFACTS / f"serve-page-{task}.png"), full_page=True)
        page.close()


def make_dense(task, tmp_path_factory):
    import json

    import torch

    from swinx.weights.checkpoint import save_task_model

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp(task)
    if task == "detection":
        from swinx.detection.train import DetectConfig, build_detector, detector_spec, save_detector, scenes_preset

        spec = detector_spec(DetectConfig.from_dict(scenes_preset()), 3)
        spec["detector_args"].update(score_thresh=0.0, detections_per_img=5)
        save_detector(build_detector(spec).eval(), folder / "m.safetensors", spec, ["a", "b", "c"], {})
    else:
        from swinx.segmentation.train import SegmentConfig, build_segmenter, scenes_preset, segmenter_spec

        spec = segmenter_spec(SegmentConfig.from_dict(scenes_preset()), 3)
        meta = {"segmenter": json.dumps(spec), "classes": json.dumps(["a", "b", "c"]),
                "palette": json.dumps([[255, 0, 0], [0, 255, 0], [0, 0, 255]])}  # fmt: skip
        save_task_model(build_segmenter(spec).eval(), folder / "m.safetensors", "segmentation", meta)
    return folder / "m.safetensors"

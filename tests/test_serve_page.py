"""The chat page in a real headless Chromium (Debian's package, through Playwright), against the real command
`python -m mm_moslora.serve` on the tiny model: model name and adapter shown, an image attached, a streamed
answer equal to the API's, a second turn, stop, regenerate, clear, a refused image, a drop. Screenshots of
each step are kept in the test's output folder (the path is printed).

Chromium must be there (scripts/setup_env.sh installs it with apt): without it these tests fail, never skip.
"""
from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from PIL import Image
from playwright.sync_api import expect, sync_playwright

from tests.helpers import make_images, subprocess_env

CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]
MAX_NEW = 8


def chromium_path() -> str:
    found = os.environ.get("MM_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        pytest.fail("Chromium is not installed: run scripts/setup_env.sh (apt-get install chromium), or set "
                    "MM_CHROMIUM to a Chromium binary")
    return found


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("page_screenshots")
    print(f"\nscreenshots of the chat page: {folder}")
    return folder


@pytest.fixture(scope="module")
def served(tiny_checkpoint_files):
    """The real CLI in a subprocess on a free port; yields its URL once it says it is ready."""
    command = [sys.executable, "-m", "mm_moslora.serve", "--model", str(tiny_checkpoint_files[0]), "--port", "0",
               "--max-tokens", str(MAX_NEW), "--temperature", "0", "--max-image-pixels", "500000",
               "--log-level", "warning"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env=subprocess_env())
    url, lines = None, []
    for line in process.stdout:
        lines.append(line)
        found = re.search(r"at (http://127\.0\.0\.1:\d+)", line)
        url = url or (found and found.group(1))
        if "ready" in line or process.poll() is not None:
            break
    if url is None or "ready" not in lines[-1]:
        process.kill()
        pytest.fail("the server did not start:\n" + "".join(lines))
    yield url
    process.terminate()
    process.wait(timeout=30)


@pytest.fixture(scope="module")
def page(served, shots):
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_FLAGS)
        context = browser.new_context(viewport={"width": 1200, "height": 820})
        page = context.new_page()
        page.set_default_timeout(60_000)
        page.goto(served + "/")
        yield page
        browser.close()


@pytest.fixture(scope="module")
def image_file(tmp_path_factory) -> Path:
    return make_images(tmp_path_factory.mktemp("page_images"), 2, size=(64, 64))[1]


def api_answer(url: str, messages: list[dict], **settings) -> str:
    body = json.dumps({"model": "ckpt", "messages": messages, "temperature": 0, "max_tokens": MAX_NEW,
                       **settings}).encode()
    request = urllib.request.Request(url + "/v1/chat/completions", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.load(response)["choices"][0]["message"]["content"]


def data_url(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def assistant_texts(page) -> list[str]:
    return page.locator(".msg.assistant[data-state=done] .text").all_inner_texts()


def test_page_shows_the_model(page, shots):
    expect(page.locator("#status")).to_have_text("ready")
    expect(page.locator("#model-name")).to_have_text("ckpt")
    expect(page.locator("#adapter")).to_have_text("adapter: MoSLoRA r=8")
    expect(page.locator("#template")).to_have_text("template: vicuna_v1")
    assert page.locator("#temperature").input_value() == "0" and page.locator("#max-tokens").input_value() == "8"
    page.screenshot(path=str(shots / "01_ready.png"))


def test_ask_about_an_image_then_follow_up(page, served, image_file, shots):
    page.set_input_files("#file-input", str(image_file))
    expect(page.locator("#attachment")).to_be_visible()
    page.fill("#prompt", "What is in the image?")
    page.screenshot(path=str(shots / "02_attached.png"))
    page.click("#send")
    expect(page.locator(".msg.assistant[data-state=done]")).to_have_count(1)
    first = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(image_file)}},
                                          {"type": "text", "text": "What is in the image?"}]}]
    expected = api_answer(served, first)
    assert assistant_texts(page) == [expected] and expected
    assert page.locator(".msg.user img").count() == 1
    expect(page.locator("#usage")).to_contain_text("reply tokens")

    page.fill("#prompt", "And the colours?")
    page.keyboard.press("Enter")
    expect(page.locator(".msg.assistant[data-state=done]")).to_have_count(2)
    second = first + [{"role": "assistant", "content": expected}, {"role": "user", "content": "And the colours?"}]
    assert assistant_texts(page)[1] == api_answer(served, second)
    page.screenshot(path=str(shots / "03_two_turns.png"))

    # Regenerate replaces the last answer (greedy here: the same text); the first turn stays.
    before = assistant_texts(page)
    page.click("#regenerate")
    expect(page.locator(".msg.assistant[data-state=streaming]")).to_have_count(0)
    expect(page.locator(".msg.assistant[data-state=done]")).to_have_count(2)
    assert assistant_texts(page) == before and page.locator(".msg.user").count() == 2


def test_sampling_settings_reach_the_server(page, served, image_file):
    page.fill("#max-tokens", "2")
    page.fill("#prompt", "Describe it.")
    page.click("#send")
    expect(page.locator(".msg.assistant[data-state=done]")).to_have_count(3)
    expect(page.locator("#usage")).to_contain_text("+ 2 reply tokens")
    assert page.locator(".msg.assistant").last.get_attribute("data-finish") == "length"
    page.fill("#max-tokens", "8")


def test_refused_image_and_clear(page, tmp_path, shots):
    big = tmp_path / "big.png"
    Image.new("RGB", (1000, 700), (200, 200, 40)).save(big)  # 0.7 MP: over this server's --max-image-pixels
    page.set_input_files("#file-input", str(big))
    expect(page.locator("#attachment")).to_be_visible()
    page.fill("#prompt", "What colour?")
    page.click("#send")
    error = page.locator(".msg.error")
    expect(error).to_contain_text("1000x700 = 700000 pixels, more than the limit of 500000")
    assert page.locator("#prompt").input_value() == "What colour?"  # the refused turn is given back
    page.screenshot(path=str(shots / "04_refused.png"))
    page.click("#clear")
    expect(page.locator(".msg")).to_have_count(0)
    expect(page.locator("#empty")).to_be_visible()


def test_drop_an_image_and_stop(page, image_file, shots):
    """A file dropped on the page is attached; Stop ends a long reply and keeps what arrived."""
    encoded = base64.b64encode(image_file.read_bytes()).decode()
    page.evaluate("""(data) => {
        const bytes = Uint8Array.from(atob(data), (c) => c.charCodeAt(0));
        const transfer = new DataTransfer();
        transfer.items.add(new File([bytes], "dropped.png", {type: "image/png"}));
        window.dispatchEvent(new DragEvent("drop", {dataTransfer: transfer, bubbles: true, cancelable: true}));
    }""", encoded)
    expect(page.locator("#attachment-name")).to_have_text("dropped.png")
    page.fill("#max-tokens", "900")
    page.fill("#prompt", "Tell me a long story about it.")
    page.click("#send")
    expect(page.locator(".msg.assistant[data-state=streaming] .text")).not_to_be_empty()
    page.click("#stop")
    expect(page.locator(".msg.assistant[data-state=done]")).to_have_count(1)
    expect(page.locator("#send")).to_be_enabled()
    assert page.locator(".msg.assistant").last.get_attribute("data-finish") is None  # stopped, not finished
    page.screenshot(path=str(shots / "05_stopped.png"))

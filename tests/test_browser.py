"""Real-browser end-to-end tests: Playwright driving Debian's Chromium against the studio started on a
free port with the tiny demo model. Screenshots of each tab are kept in ``artifacts/screenshots``.

Skipped, with the reason, where Chromium or Playwright is missing (``.ci/run`` installs Chromium).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHOTS = ROOT / "artifacts" / "screenshots"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or "/usr/bin/chromium"

pytestmark = pytest.mark.browser

if not Path(CHROMIUM).exists():
    pytest.skip(f"no Chromium at {CHROMIUM} (install Debian's 'chromium' package)", allow_module_level=True)
try:
    from playwright.sync_api import expect, sync_playwright
except ImportError:
    pytest.skip("the playwright package is not installed (pip install -r requirements-dev.txt)",
                allow_module_level=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    base = tmp_path_factory.mktemp("browser")
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "STUDIO_CONFIG_DIR": str(base / "cfg"),
           "STUDIO_CACHE_DIR": str(base / "cache"), "STUDIO_WORKSPACE": str(base / "ws"), "PYTHONUNBUFFERED": "1"}
    log = open(base / "studio.log", "w")
    proc = subprocess.Popen([sys.executable, "app.py", "--no-browser", "--port", str(port)], cwd=ROOT, env=env,
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 120
    while True:
        try:
            urllib.request.urlopen(url, timeout=5)
            break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                raise AssertionError((base / "studio.log").read_text())
            time.sleep(0.5)
    yield {"url": url, "workspace": base / "ws", "log": base / "studio.log"}
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def page(studio):
    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"])
        pg = browser.new_page(viewport={"width": 1400, "height": 1000})
        pg.set_default_timeout(60_000)
        pg.goto(studio["url"])
        yield pg
        browser.close()


def open_tab(page, name: str) -> None:
    page.get_by_role("tab", name=name).click()


def test_page_shows_five_tabs_and_the_tiny_model(page):
    for name in ["Dataset", "Train", "Merge", "Generate", "Inspect"]:
        expect(page.get_by_role("tab", name=name)).to_be_visible()
    expect(page.get_by_label("Base model")).to_have_value(
        "[sd1] Tiny demo model (random weights, for trying the studio without a download) - SD1.x")
    for name in ["Dataset", "Train", "Merge", "Generate", "Inspect"]:
        open_tab(page, name)
        page.wait_for_timeout(500)
        page.screenshot(path=str(SHOTS / f"{name.lower()}.png"), full_page=True)
        assert (SHOTS / f"{name.lower()}.png").stat().st_size > 10_000


def set_number(page, label: str, value) -> None:
    box = page.get_by_label(f"number input for {label}").locator("visible=true").first
    box.fill(str(value))
    box.press("Enter")


def textbox(page, label: str):
    return page.locator(f"label:has-text('{label}') textarea:visible").first


def _images(folder: Path, n: int = 4) -> list[Path]:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        img = Image.new("RGB", (96, 96), (40 * i, 200 - 30 * i, 120))
        for x in range(0, 96, 8):  # a little structure, so near-duplicate detection keeps them apart
            for y in range(0, 96, 8):
                if (x // 8 + y // 8 + i) % (i + 2) == 0:
                    img.paste((250, 250 - 50 * i, 10 * i), (x, y, x + 8, y + 8))
        p = folder / f"dog_{i}.png"
        img.save(p)
        out.append(p)
    return out


def test_dataset_upload_and_template_captions(page, studio, tmp_path):
    open_tab(page, "Dataset")
    files = _images(tmp_path / "photos")
    page.locator("input[type=file]:not([disabled])").first.set_input_files([str(p) for p in files])
    page.get_by_label("Name in the workspace (optional)").locator("visible=true").first.fill("mydog")
    page.wait_for_timeout(1500)  # the upload finishes before the button reads the files
    page.get_by_role("button", name="Bring in").click()
    expect(page.get_by_text("Copied into the workspace as")).to_be_visible(timeout=60_000)
    dataset = studio["workspace"] / "datasets" / "mydog"
    assert sorted(p.name for p in dataset.glob("*.png")) == [p.name for p in files]

    page.get_by_text("3. Caption").click()
    page.get_by_label("Trigger word").locator("visible=true").first.fill("sks")
    page.get_by_label("Class word").locator("visible=true").first.fill("dog")
    page.get_by_role("button", name="Caption", exact=True).click()
    expect(page.get_by_text(re.compile(r"captioned 4|4 captioned|Captioned 4", re.I))).to_be_visible(timeout=120_000)
    captions = {p.stem: p.read_text() for p in dataset.glob("*.txt")}
    assert len(captions) == 4 and all(c.startswith("sks") and "dog" in c for c in captions.values())
    page.screenshot(path=str(SHOTS / "dataset.png"), full_page=True)


def test_train_ten_steps_shows_loss_and_preview(page, studio):
    """Train a 10-step LoRA on the dataset the Dataset test brought in (tiny SD1, 64 px)."""
    dataset = studio["workspace"] / "datasets" / "mydog"
    if not dataset.exists():
        pytest.skip("needs the dataset from test_dataset_upload_and_template_captions")
    open_tab(page, "Train")
    page.get_by_role("button", name="Refresh").locator("visible=true").first.click()
    pick(page, "#train-dataset", str(dataset))
    pick(page, "#train-resolution", "64")
    for sel, value in [("#train-max-steps", 10), ("#train-sample-every", 5), ("#train-save-every", 5)]:
        box = page.locator(f"{sel} input").first
        box.fill(str(value))
        box.press("Enter")
    page.locator("#train-prompts textarea").fill("sks dog")
    page.locator("#train-start").click()
    expect(page.locator("#train-status")).to_contain_text("Finished", timeout=300_000)
    expect(page.locator("#train-previews img").first).to_be_visible(timeout=30_000)
    expect(page.locator("#train-loss canvas, #train-loss svg").first).to_be_visible()
    outputs = list((studio["workspace"] / "runs").rglob("*.safetensors"))
    assert any(p.parent.parent == studio["workspace"] / "runs" for p in outputs), outputs
    # the result is also published where Merge, Generate and <lora:...> tags look
    assert (studio["workspace"] / "outputs" / "loras" / "adapter.safetensors").exists()
    page.screenshot(path=str(SHOTS / "train.png"), full_page=True)


def pick(page, where, value: str) -> None:
    """Choose ``value`` in a Gradio dropdown (it may be a custom value): ``where`` is a CSS selector
    of the component (its input inside) or a Playwright locator of the input itself."""
    box = page.locator(f"{where} input").first if isinstance(where, str) else where
    box.click()
    box.fill(value)
    box.press("Enter")
    page.wait_for_timeout(300)


def test_merge_two_loras_then_inspect_the_result(page, studio):
    """Merge the LoRA trained above with a second one dropped into the LoRA folder; open it in Inspect."""
    import torch

    from studio.adapters import load_adapter, save_adapter

    trained = studio["workspace"] / "outputs" / "loras" / "adapter.safetensors"
    if not trained.exists():
        pytest.skip("needs the LoRA from test_train_ten_steps_shows_loss_and_preview")
    first = load_adapter(trained)
    g = torch.Generator().manual_seed(0)
    other = {name: {"lora_down.weight": torch.randn(2, m.tensors["lora_down.weight"].shape[1], generator=g),
                    "lora_up.weight": torch.randn(m.tensors["lora_up.weight"].shape[0], 2, generator=g) * 0.01,
                    "alpha": torch.tensor(2.0)} for name, m in first.modules.items()}
    save_adapter(trained.with_name("style.safetensors"), other, "sd1", "lora")

    open_tab(page, "Merge")
    page.get_by_role("button", name="Rescan adapter folders").click()
    for i, path in enumerate([trained, trained.with_name("style.safetensors")], start=1):
        pick(page, page.get_by_label(f"Adapter {i}", exact=True).locator("visible=true").first, str(path))
    page.get_by_label("Output name").locator("visible=true").first.fill("blend")
    page.get_by_role("button", name="Merge", exact=True).click()
    result = studio["workspace"] / "outputs" / "loras" / "blend.safetensors"
    expect(page.locator("label:has-text('Result') input:visible, label:has-text('Result') textarea:visible").first
           ).to_have_value(re.compile("blend.safetensors"), timeout=120_000)
    merged = load_adapter(result)
    assert merged.family == "sd1" and set(merged.modules) == set(first.modules)
    page.screenshot(path=str(SHOTS / "merge.png"), full_page=True)

    page.get_by_role("button", name="Open in Inspect").click()
    expect(page.get_by_text("Merged from").locator("visible=true").first).to_be_visible(timeout=60_000)
    expect(page.get_by_text("method concat").locator("visible=true").first).to_be_visible()
    page.screenshot(path=str(SHOTS / "inspect.png"), full_page=True)


def test_generate_one_image_with_the_lora(page, studio):
    if not (studio["workspace"] / "outputs" / "loras" / "adapter.safetensors").exists():
        pytest.skip("needs the LoRA from test_train_ten_steps_shows_loss_and_preview")
    open_tab(page, "Generate")
    textbox(page, "Prompt").fill("a photo of sks dog <lora:adapter:0.8>")
    set_number(page, "Steps", 2)
    set_number(page, "Width", 64)
    set_number(page, "Height", 64)
    page.get_by_label("Seed (-1 random)").locator("visible=true").first.fill("7")
    page.get_by_role("button", name="Generate", exact=True).click()
    params = textbox(page, "Parameters (what a webUI reads)")
    expect(params).to_have_value(re.compile(r"Steps: 2,.*Seed: 7"), timeout=180_000)
    expect(params).to_have_value(re.compile(r'<lora:adapter:0.8>.*Lora hashes: "adapter: [0-9a-f]{12}"', re.S))
    saved = list((studio["workspace"] / "outputs" / "images").rglob("*.png"))
    assert saved, "no image saved in the workspace"
    page.screenshot(path=str(SHOTS / "generate.png"), full_page=True)

"""The app in a real browser: `python app.py` as a subprocess, Debian's chromium driven by Playwright.

Like Gradio's own browser tests: start the app, wait for "Running on local URL", then find elements
by label, role and test id. `playwright install` cannot download its browser here, so Playwright is
pointed at /usr/bin/chromium (installed by .ci/run). The screenshot goes to the test's tmp dir and to
/tmp/app_screenshot.png, to look at.
"""

import contextlib
import os
import queue
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests.serving import free_port
from tests.tiny import OWN_CAPTIONS, tiny_pipeline

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]
START_TIMEOUT_S = 120  # importing torch + gradio on 2 busy cores


def wait_for_url(proc: subprocess.Popen, timeout: float) -> str:
    """Read the app's output until Gradio prints its URL; fail with the output if it never does."""
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    seen = []
    while True:
        try:
            line = lines.get(timeout=timeout)
        except queue.Empty:
            pytest.fail(f"the app printed no URL within {timeout} s:\n{''.join(seen)}")
        seen.append(line)
        if match := re.search(r"Running on local URL:\s+(\S+)", line):
            return match.group(1)
        if proc.poll() is not None and lines.empty():
            pytest.fail(f"the app exited with {proc.returncode}:\n{''.join(seen)}")


@contextlib.contextmanager
def served_app(tmp_path: Path, *args: str):
    """`python app.py ARGS` on a free port, offline, its Gradio files in tmp_path; yields its URL, stops it after."""
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
           "GRADIO_TEMP_DIR": str(tmp_path / "gradio")}
    proc = subprocess.Popen([sys.executable, "app.py", *args, "--port", str(free_port())], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        yield wait_for_url(proc, START_TIMEOUT_S)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def opened(url: str):
    """A page of Debian's chromium (headless, 1400 × 1000) at url; the browser closes after."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(url)
            yield page
        finally:
            browser.close()


@pytest.fixture
def app_url(tmp_path):
    model, own = tmp_path / "shapes", tmp_path / "own"  # two models: the selector offers both
    tiny_pipeline().save_pretrained(model)
    tiny_pipeline(OWN_CAPTIONS, grammar=None).save_pretrained(own)
    with served_app(tmp_path, "--model", str(model), "--model", str(own)) as url:
        yield url


@pytest.mark.slow
# Skipped only outside CI (a developer without chromium); in CI a missing browser is a failure.
@pytest.mark.skipif(not Path(CHROMIUM).exists() and not os.environ.get("CI"),
                    reason=f"needs Debian's chromium at {CHROMIUM} (.ci/run installs it)")
def test_prompt_to_samples_to_attention_maps_in_a_browser(app_url, tmp_path):
    from playwright.sync_api import expect

    with opened(app_url) as page:
        page.locator("#prompt textarea").fill("a red circle above a blue square")
        page.get_by_role("button", name="Generate").click()

        # Samples, the seed used, and one overlay per word.
        expect(page.locator("#samples img")).to_have_count(4, timeout=60_000)
        expect(page.locator("#status")).to_contain_text(re.compile(r"Seed \d+"))
        words = page.locator("#word-maps")
        expect(words.locator("img")).to_have_count(7, timeout=30_000)
        for word in ["red", "circle", "blue", "square"]:
            expect(words.get_by_text(word, exact=True)).to_be_visible()

        # Another layer: the summary line names it.
        page.get_by_label("Cross-attention layer").click()
        page.get_by_role("option", name=re.compile(r"^mid\.0\.cross_attn")).click()
        expect(page.get_by_text(re.compile(r"mid\.0\.cross_attn \(8×8\)"))).to_be_visible(timeout=30_000)

        # Another word in the per-head view.
        page.get_by_role("tab", name="Heads of one word").click()
        page.get_by_label("Word", exact=True).click()
        page.get_by_role("option", name="square", exact=True).click()
        expect(page.get_by_label("Word", exact=True)).to_have_value("square", timeout=30_000)

        # Self-attention: clicking the sample moves the pixel.
        page.get_by_role("tab", name="Self-attention").click()
        page.locator("#self-target img").click(position={"x": 40, "y": 200})
        expect(page.get_by_label("Pixel y (row)")).not_to_have_value("8", timeout=30_000)
        page.get_by_role("tab", name="Words", exact=True).click()

        page.screenshot(path=tmp_path / "app.png", full_page=True)
        shutil.copy(tmp_path / "app.png", "/tmp/app_screenshot.png")

        # A too-long prompt: an error toast that names the limit; the samples stay.
        page.locator("#prompt textarea").fill("x" * 400)
        page.locator("#prompt textarea").press("Enter")
        expect(page.get_by_test_id("toast-body").first).to_contain_text("limit is 300", timeout=30_000)
        expect(page.locator("#samples img")).to_have_count(4)
        page.screenshot(path=tmp_path / "error.png")

        # The other model: its own examples, and its words are known.
        page.get_by_label("Model").click()
        page.get_by_role("option", name="own", exact=True).click()
        expect(page.get_by_text("a polar bear on the ice").first).to_be_visible(timeout=30_000)
        page.locator("#prompt textarea").fill("a polar bear")
        page.get_by_role("button", name="Generate").click()
        expect(words.get_by_text("polar", exact=True)).to_be_visible(timeout=60_000)
        expect(page.locator("#status")).not_to_contain_text("unknown words")
        page.screenshot(path=tmp_path / "own.png", full_page=True)
        shutil.copy(tmp_path / "own.png", "/tmp/app_own_screenshot.png")


@pytest.fixture
def finetune_app(tmp_path):
    """The app over one tiny model, its Fine-tune runs in tmp_path/runs; and a zip of captioned pictures with a
    corrupt image in it."""
    import json
    import zipfile

    from PIL import Image

    base = tmp_path / "base"
    tiny_pipeline(OWN_CAPTIONS, grammar=None).save_pretrained(base)
    archive = tmp_path / "pictures.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        rows = []
        for i, caption in enumerate(OWN_CAPTIONS[:6]):
            path = tmp_path / f"{i}.png"
            Image.new("RGB", (20, 20), (40 * i, 200 - 30 * i, 90)).save(path)
            zf.write(path, f"pictures/{i}.png")
            rows.append({"file_name": f"{i}.png", "text": caption})
        zf.writestr("pictures/broken.png", b"\x89PNG not really")
        rows.append({"file_name": "broken.png", "text": "a broken picture"})
        zf.writestr("pictures/metadata.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    with served_app(tmp_path, "--model", str(base), "--finetune-dir", str(tmp_path / "runs")) as url:
        yield url, archive


@pytest.mark.slow
@pytest.mark.skipif(not Path(CHROMIUM).exists() and not os.environ.get("CI"),
                    reason=f"needs Debian's chromium at {CHROMIUM} (.ci/run installs it)")
def test_upload_pictures_train_draw_zip_and_compare_the_new_model_with_the_base(finetune_app, tmp_path):
    from playwright.sync_api import expect

    url, archive = finetune_app
    with opened(url) as page:
        page.get_by_role("tab", name="Fine-tune").click()
        page.locator("#finetune-upload input[type=file]").set_input_files(str(archive))
        page.locator("#finetune-name").locator("textarea, input").first.fill("mine")
        page.get_by_text("Advanced", exact=True).last.click()
        page.locator("#finetune-steps input").fill("3")
        page.locator("#finetune-check").click()

        # The check: what was found, the corrupt picture by name, the time it will take.
        report = page.locator("#finetune-report")
        expect(report).to_contain_text("6 pictures", timeout=60_000)
        expect(report).to_contain_text("broken.png")
        expect(report).to_contain_text("3 steps")

        # Train: the loss plot, a validation grid, and the new model in the selector, selected.
        page.locator("#finetune-start").click()
        expect(page.locator("#finetune-state")).to_contain_text("Finished", timeout=180_000)
        expect(page.locator("#finetune-loss canvas, #finetune-loss svg").first).to_be_visible(timeout=30_000)
        expect(page.locator("#finetune-grid img")).to_be_visible(timeout=30_000)
        expect(page.get_by_label("Model", exact=True)).to_have_value("mine", timeout=60_000)
        page.screenshot(path=tmp_path / "finetune.png", full_page=True)
        shutil.copy(tmp_path / "finetune.png", "/tmp/app_finetune_screenshot.png")

        # And it draws.
        page.locator("#prompt textarea").fill("a polar bear")
        page.get_by_role("button", name="Generate").click()
        expect(page.locator("#samples img")).to_have_count(4, timeout=60_000)
        expect(page.locator("#status")).to_contain_text(re.compile(r"Seed \d+"))

        # Share: the fine-tuned model as a zip.
        page.get_by_text("Share the model", exact=True).click()
        page.get_by_role("button", name="Zip the model").click()
        expect(page.locator("#finetune-zip")).to_contain_text(re.compile(r"mine\s*\.zip"), timeout=60_000)

        # Compare it with the base model: the same prompt and seeds, one row each.
        page.get_by_role("tab", name="Compare").click()
        page.locator("#compare-prompt-a textarea").fill("a polar bear")
        page.get_by_label("A drawn by").click()
        page.get_by_role("option", name="base", exact=True).click()
        page.get_by_label("B drawn by").click()
        page.get_by_role("option", name="mine", exact=True).last.click()  # A's closed list stays in the page
        page.get_by_role("button", name="Compare", exact=True).click()
        expect(page.locator("#compare-samples-a img")).to_have_count(4, timeout=180_000)
        expect(page.locator("#compare-samples-b img")).to_have_count(4, timeout=30_000)
        expect(page.locator("#compare-note")).to_contain_text("A: base", timeout=30_000)


@pytest.mark.slow
@pytest.mark.skipif(not Path(CHROMIUM).exists() and not os.environ.get("CI"),
                    reason=f"needs Debian's chromium at {CHROMIUM} (.ci/run installs it)")
def test_compare_two_models_word_by_word_in_a_browser(app_url, tmp_path):
    from playwright.sync_api import expect

    with opened(app_url) as page:
        page.get_by_role("tab", name="Compare").click()
        page.locator("#compare-prompt-a textarea").fill("a red circle")
        page.locator("#compare-prompt-b textarea").fill("a blue circle")
        page.get_by_role("button", name="Compare", exact=True).click()

        # Two rows of samples with the same seeds, the aligned grid, and a note on what moved. Two runs of 4
        # images and 20 steps: ~3 s on 2 free cores, but 40-50 s each while another process holds one of them.
        expect(page.locator("#compare-samples-a img")).to_have_count(4, timeout=180_000)
        expect(page.locator("#compare-samples-b img")).to_have_count(4, timeout=30_000)
        expect(page.locator("#compare-grid img")).to_be_visible(timeout=30_000)
        note = page.locator("#compare-note")
        expect(note).to_contain_text("only in A: red · only in B: blue", timeout=30_000)
        expect(note).to_contain_text("Moved most")

        # Another image of the comparison.
        page.get_by_label("Compare image").click()
        page.get_by_role("option", name=re.compile(r"^image 2 · seed")).click()
        expect(note).to_contain_text("Image 2 ·", timeout=30_000)
        page.screenshot(path=tmp_path / "compare.png", full_page=True)
        shutil.copy(tmp_path / "compare.png", "/tmp/app_compare_screenshot.png")

"""The playground in a real browser: Debian's chromium driven by Playwright, against a real
``promptswap serve`` process on tiny random-weight models.

The browser is the system's (``/usr/bin/chromium``; ``playwright install`` downloads one and is
never run). Without chromium or Playwright the tests skip, unless
PROMPTSWAP_REQUIRE_CLUSTER_TOOLS=1 (CI), where they fail.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image

from fixtures.adapters import adapter_bytes
from tests.llava_fixtures import save_tiny_llava
from tests.test_cli import free_port, serve, wait_ready

pytestmark = [pytest.mark.slow, pytest.mark.cluster]

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"]
TOKEN = "browser-test-admin-token"
KEY = "browser-test-api-key"
LABELS = ["cat", "dog", "tiger", "sports car", "teapot"]
ARTIFACTS = Path(os.environ.get("PROMPTSWAP_TEST_ARTIFACTS", "test-artifacts"))


def need(reason: str) -> None:
    if os.environ.get("PROMPTSWAP_REQUIRE_CLUSTER_TOOLS") == "1":
        pytest.fail(f"{reason}, and PROMPTSWAP_REQUIRE_CLUSTER_TOOLS=1 requires it")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def photo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real photograph (scikit-image's Chelsea the cat), as a JPEG a user would pick."""
    try:
        from skimage import data
    except ImportError:
        need("scikit-image (the test extra) is not installed")
    path = tmp_path_factory.mktemp("photo") / "chelsea.jpg"
    Image.fromarray(data.chelsea()).save(path, quality=92)
    return path


@pytest.fixture(scope="module")
def server(tiny_clip_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real server with a tiny CLIP and a tiny LLaVA, API keys on, one MaPLe adapter."""
    tmp = tmp_path_factory.mktemp("browser-server")
    llava = save_tiny_llava(tmp / "llava")
    keys = tmp / "keys"
    keys.write_text(f"{KEY}\n")
    port = free_port()
    args = ["--clip-model", str(tiny_clip_dir), "--llava-model", str(llava), "--port", str(port)]
    args += ["--device", "cpu", "--api-keys-file", str(keys), "--adapter-dir", str(tmp / "store")]
    proc = serve(args, env={"PROMPTSWAP_ADMIN_TOKEN": TOKEN})
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(proc, url)
        upload = httpx.post(
            f"{url}/v1/admin/adapters",
            files={"file": ("pets.safetensors", adapter_bytes(tiny_clip_dir, "pets", seed=4))},
            headers={"Authorization": f"Bearer {TOKEN}"},
            timeout=60,
        )
        assert upload.status_code == 201, upload.text
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        need("playwright (the test extra) is not installed")
    if not shutil.which(CHROMIUM):
        need(f"{CHROMIUM} is missing (apt-get install chromium chromium-driver)")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, server):
    context = browser.new_context(viewport={"width": 1280, "height": 860})
    page = context.new_page()
    requested: list[str] = []
    page.on("request", lambda r: requested.append(r.url))
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(server + "/")
    page.fill("#api-key", KEY)
    page.dispatch_event("#api-key", "change")  # the page reloads models and adapters with the key
    page.wait_for_selector("#adapter option[value='pets']", state="attached", timeout=30_000)
    yield page
    assert not errors, errors
    outside = [u for u in requested if not u.startswith(server) and not u.startswith(("blob:", "data:"))]
    assert not outside, f"the page reached outside the service: {outside}"
    context.close()


def api_scores(server: str, photo: Path, adapter: str | None) -> dict[str, float]:
    data = {"labels": json.dumps(LABELS), **({"adapter": adapter} if adapter else {})}
    response = httpx.post(
        f"{server}/v1/classify",
        files={"image": ("chelsea.jpg", photo.read_bytes(), "image/jpeg")},
        data=data,
        headers={"X-API-Key": KEY},
        timeout=60,
    )
    assert response.status_code == 200, response.text
    return {row["label"]: row["score"] for row in response.json()["labels"]}


def classify_in_page(page, photo: Path, adapter: str) -> list[tuple[str, float]]:
    page.set_input_files("#image", str(photo))
    page.fill("#labels", "\n".join(LABELS))
    page.select_option("#adapter", adapter)
    page.evaluate("document.getElementById('results').dataset.state = ''")
    page.click("#classify")
    page.wait_for_selector("#results[data-state='done']", timeout=60_000)
    rows = page.query_selector_all("#results [data-label]")
    assert rows, page.inner_text("#classify-status")
    return [(r.get_attribute("data-label"), float(r.get_attribute("data-score"))) for r in rows]


def test_classify_a_photo_in_the_page_matches_the_api(page, server, photo):
    shown = {}
    for adapter in ("", "pets"):
        rows = classify_in_page(page, photo, adapter)
        scores = [score for _, score in rows]
        assert scores == sorted(scores, reverse=True), "bars are not sorted"
        expected = api_scores(server, photo, adapter or None)
        assert dict(rows).keys() == expected.keys()
        for label, score in rows:
            assert score == pytest.approx(expected[label], abs=1e-9), label
        widths = page.eval_on_selector_all(
            "#results .bar", "bars => bars.map(b => parseFloat(b.style.width))"
        )
        assert widths == pytest.approx([s * 100 for s in scores], abs=0.01)
        status = page.inner_text("#classify-status")
        assert ("pets@1" in status) if adapter else ("zero-shot" in status)
        shown[adapter] = dict(rows)
    # Sensitive: the adapter changes the scores, so a page that ignored it would fail above.
    assert max(abs(shown[""][k] - shown["pets"][k]) for k in LABELS) > 1e-3
    # The adapters panel lists the adapter, its size, and that it is loaded now.
    page.click("#refresh-adapters")
    page.wait_for_selector("#adapters tr[data-adapter='pets@1'][data-loaded='true']", timeout=30_000)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "playground.png"), full_page=True)
    shot = Image.open(io.BytesIO((ARTIFACTS / "playground.png").read_bytes()))
    assert shot.size[0] == 1280 and shot.size[1] >= 600


def test_chat_answer_streams_into_the_page(page, server, photo):
    assert page.is_visible("#chat-panel"), "a LLaVA is served: the chat panel must show"
    instruction = "Describe the picture."
    page.set_input_files("#chat-image", str(photo))
    page.fill("#instruction", instruction)
    page.fill("#max-tokens", "12")
    # Record every text the answer element is given while it streams: each delta replaces its text
    # node, so the added nodes hold every step even when deltas arrive in one network read.
    page.evaluate(
        """() => { window.seen = []; new MutationObserver((records) => {
             for (const r of records) for (const n of r.addedNodes) window.seen.push(n.textContent); })
           .observe(document.getElementById('answer'), {childList: true}); }"""
    )
    page.click("#chat")
    page.wait_for_selector("#answer[data-state='done']", timeout=120_000)
    answer = page.inner_text("#answer")
    seen = [s for s in page.evaluate("window.seen") if s]
    expected = httpx.post(
        f"{server}/v1/chat",
        files={"image": ("chelsea.jpg", photo.read_bytes(), "image/jpeg")},
        data={"instruction": instruction, "max_tokens": "12"},
        headers={"X-API-Key": KEY},
        timeout=120,
    )
    assert expected.status_code == 200, expected.text
    assert answer == expected.json()["text"] and answer, page.inner_text("#chat-status")
    assert len(seen) >= 2, f"the answer arrived in one piece, not streamed: {seen}"
    assert all(answer.startswith(s) for s in seen)  # each update extends the text shown
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "playground-chat.png"), full_page=True)

"""The chat page in a real browser: Debian's Chromium driven by Playwright's Python package,
against live servers on 127.0.0.1 with the tiny fused model (decode slowed to ~30 ms a token so
that streaming and Stop can be watched). Screenshots (wide and narrow) are saved under
build/test-artifacts/web/ (or $LLAMA2_ONNX_ARTIFACTS).

The browser is never downloaded: /usr/bin/chromium comes from Debian's packages (make setup
installs it; so does the fixture below when it is missing, as root), else the tests skip and say why.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

pytest.importorskip("fastapi")
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is in the dev extra: pip install -e '.[dev]'")

from serve_live import LiveServer, rows_busy  # noqa: E402

from llama2_onnx.serve.app import ServerState, create_app  # noqa: E402
from llama2_onnx.serve.service import Service  # noqa: E402

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
KEY = "sk-web-test"
MODEL = "tiny"
STEP_S = 0.03  # the slowed decode step
QUESTION = "What is the capital of France?"
XSS = '<img src=x onerror="window.__pwned=1">'
ARTIFACTS = Path(os.environ.get("LLAMA2_ONNX_ARTIFACTS", Path(__file__).resolve().parents[1] / "build" / "test-artifacts")) / "web"


def ensure_chromium() -> None:
    """Install Debian's chromium when it is missing (root only); skip, saying why, when that fails."""
    if CHROMIUM.exists():
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip(f"{CHROMIUM} is missing and apt-get cannot install it here (not root or not Debian): "
                    "apt-get install chromium")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "chromium"]):
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
        if done.returncode:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            pytest.skip(f"{CHROMIUM} is missing and '{' '.join(cmd)}' failed: {last}")


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    ensure_chromium()
    with sync_api.sync_playwright() as pw:
        # launch() gives every run a fresh temporary profile (user-data dir) of its own
        b = pw.chromium.launch(executable_path=str(CHROMIUM), args=ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


def slowed(service: Service) -> Service:
    decode = service.engine.slots.decode

    def slow(*args):
        time.sleep(STEP_S)
        return decode(*args)

    service.engine.slots.decode = slow
    return service


@pytest.fixture(scope="module")
def service(tiny_onnx_ort):
    svc = slowed(Service.open(tiny_onnx_ort, max_batch=2, max_queue=4, model_id=MODEL, provider="cpu", threads=1))
    try:
        yield svc
    finally:
        svc.close()


@pytest.fixture(scope="module")
def url(service):
    state = ServerState()
    state.attach(service)
    with LiveServer(create_app(state, api_key=KEY, metrics=True, web=True)) as u:
        yield u


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1100, "height": 800})
    pg = context.new_page()
    pg.set_default_timeout(15_000)
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    yield pg
    context.close()
    assert not errors, errors  # no uncaught script error on any page


def with_key(page, key: str = KEY, settings: dict | None = None) -> None:
    """Store the API key (and settings) before the page's script runs, as a returning user has them."""
    chat = {"system": "", "settings": settings or {}, "messages": []}
    page.add_init_script(f"""if (!sessionStorage.getItem("seeded")) {{
        sessionStorage.setItem("seeded", "1");
        localStorage.setItem("llama2-onnx.api-key", {json.dumps(key)});
        localStorage.setItem("llama2-onnx.chat", {json.dumps(json.dumps(chat))});
    }}""")


def running(url: str) -> int:
    text = httpx.get(url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}, timeout=10).text
    return int(float(next(line.split()[-1] for line in text.splitlines() if line.startswith("llama2_onnx_requests_running "))))


def shot(page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def assistant(page):
    return page.locator(".msg.assistant .content").last


# ---- the tests ------------------------------------------------------------------------------------


def test_key_asked_once_streaming_answer_stats_and_reload(page, url, service):
    page.goto(url + "/")
    page.locator("#key-dialog.shown").wait_for()  # /v1/models answered 401: the page asks for the key
    page.fill("#key-input", KEY)
    page.click("#key-save")
    page.wait_for_function("() => document.getElementById('model-name').textContent.startsWith('tiny')")
    page.click("#settings summary")
    card = httpx.get(url + "/v1/models", headers={"Authorization": f"Bearer {KEY}"}, timeout=10).json()["data"][0]
    defaults = card["chat_defaults"]  # the server's defaults (the folder's generation_config.json, else Meta's)
    assert float(page.input_value("#temperature")) == defaults["temperature"]
    assert float(page.input_value("#top-p")) == defaults["top_p"]
    page.fill("#temperature", "0")
    page.dispatch_event("#temperature", "change")
    page.fill("#max-tokens", "16")
    page.dispatch_event("#max-tokens", "change")

    page.fill("#input", "line one")
    page.press("#input", "Shift+Enter")  # a new line, not a send
    page.type("#input", "line two")
    assert page.input_value("#input") == "line one\nline two" and page.locator(".msg").count() == 0
    page.fill("#input", QUESTION)
    page.press("#input", "Enter")
    # streamed: text is on the page while the request still runs (Stop shown)
    page.wait_for_function("""() => { const c = document.querySelectorAll('.msg.assistant .content');
        return c.length && c[c.length - 1].textContent.length > 0 && !document.getElementById('stop').hidden; }""")
    page.locator(".msg.assistant .stats", has_text="tokens/s").wait_for()
    stats = page.locator(".msg.assistant .stats").text_content()
    assert "TTFT" in stats and "16 tokens" in stats, stats
    want = service.gen.chat([{"role": "user", "content": QUESTION}], max_new_tokens=16).text
    assert assistant(page).text_content() == want
    assert page.locator(".msg.user .content").text_content() == QUESTION
    shot(page, "wide")

    page.reload()
    page.locator(".msg.assistant .stats", has_text="tokens/s").wait_for()
    assert [page.locator(".msg .content").nth(i).text_content() for i in range(2)] == [QUESTION, want]
    page.wait_for_function("() => document.getElementById('model-name').textContent.startsWith('tiny')")
    assert not page.locator("#key-dialog.shown").count()  # asked once: the key was kept
    assert page.input_value("#temperature") == "0"


def test_stop_cancels_and_frees_the_row(page, url):
    with_key(page, settings={"temperature": 0})  # no max tokens: to the end of the context, ~3 s
    page.goto(url + "/")
    page.fill("#input", "Tell me a long story.")
    page.press("#input", "Enter")
    page.wait_for_function("() => document.querySelector('.msg.assistant .content')?.textContent.length > 0")
    assert running(url) == 1
    page.click("#stop")
    page.locator(".msg.assistant .stats", has_text="stopped").wait_for()
    deadline = time.monotonic() + 5
    while running(url) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert running(url) == 0
    assert page.locator("#send").is_visible() and not page.locator("#stop").is_visible()
    kept = assistant(page).text_content()
    page.reload()  # the partial answer was kept
    assert assistant(page).text_content() == kept


def test_html_is_shown_as_text(page, url):
    with_key(page)
    # the model's reply, split across chunks the way a stream cuts it
    pieces = ["Sure: ", XSS[:9], XSS[9:], " <b>bold</b>"]
    chunks = [{"choices": [{"index": 0, "delta": {"content": p}, "finish_reason": None}]} for p in pieces]
    chunks += [{"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
               {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9}}]
    sse = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"
    page.route("**/v1/chat/completions", lambda route: route.fulfill(status=200, body=sse,
                                                                     headers={"Content-Type": "text/event-stream"}))
    page.goto(url + "/")
    page.fill("#input", XSS)
    page.press("#input", "Enter")
    page.locator(".msg.assistant .stats", has_text="tokens/s").wait_for()
    assert page.locator(".msg.user .content").text_content() == XSS
    assert assistant(page).text_content() == "".join(pieces)
    # a conversation restored from storage is text too
    page.evaluate("""xss => localStorage.setItem('llama2-onnx.chat', JSON.stringify({system: '', settings: {},
        messages: [{role: 'user', content: 'hi'}, {role: 'assistant', content: xss}]}))""", XSS)
    page.reload()
    assert assistant(page).text_content() == XSS
    assert page.locator("#messages img, #messages b").count() == 0
    assert page.evaluate("window.__pwned") is None
    assert "script-src 'sha256-" in httpx.get(url + "/").headers["content-security-policy"]


def test_error_messages(page, url, tiny_onnx_ort):
    with_key(page, key="sk-wrong")
    page.goto(url + "/")
    page.locator("#key-dialog.shown").wait_for()  # a stored key that is refused: asked again
    page.click("#key-cancel")
    page.fill("#input", "Hello")
    page.press("#input", "Enter")
    page.locator("#error.shown", has_text="API key").wait_for()
    assert page.input_value("#input") == "Hello" and page.locator(".msg").count() == 0  # the turn is given back

    page.fill("#key-input", KEY)
    page.click("#key-save")
    page.wait_for_function("() => document.getElementById('model-name').textContent.startsWith('tiny')")
    page.fill("#input", "fox " * 200)  # past the 128-token context
    page.press("#input", "Enter")
    page.locator("#error.shown", has_text="too long for the model's context").wait_for()

    full = Service.open(tiny_onnx_ort, max_batch=1, max_queue=0, model_id=MODEL, provider="cpu", threads=1)
    state = ServerState()
    state.attach(full)
    try:
        with LiveServer(create_app(state, web=True)) as busy, rows_busy(full):  # the row taken, max_queue 0: refused
            page.goto(busy + "/")
            page.fill("#input", "Hello")
            page.press("#input", "Enter")
            page.locator("#error.shown", has_text="The server is busy").wait_for()
            assert "retry in 1 s" in page.locator("#error").text_content()
    finally:
        full.close()


def test_narrow_window(page, url):
    with_key(page, settings={"temperature": 0, "max_tokens": 12})
    page.set_viewport_size({"width": 360, "height": 740})
    page.goto(url + "/")
    page.fill("#input", "A long line without breaks: " + "x" * 120)
    page.press("#input", "Enter")
    page.locator(".msg.assistant .stats", has_text="tokens/s").wait_for()
    page.click("#settings summary")
    assert page.evaluate("document.documentElement.scrollWidth") <= 360  # nothing runs off the side
    for sel in ("#input", "#send", "#new-chat", "#temperature", "#max-tokens"):
        box = page.locator(sel).bounding_box()
        assert box and box["x"] >= 0 and box["x"] + box["width"] <= 360, sel
    shot(page, "narrow")
    page.click("#new-chat")
    assert page.locator(".msg").count() == 0


def test_no_web_and_open_without_torch(tiny_onnx_ort, tmp_path):
    state = ServerState()
    with LiveServer(create_app(state)) as u:  # create_app's default, as --no-web: no page
        assert httpx.get(u + "/").status_code == 404
    opened = tmp_path / "opened"
    opener = tmp_path / "browser.sh"
    opener.write_text(f'#!/bin/sh\necho "$1" > {opened}\n')
    opener.chmod(0o755)
    no_torch = "import sys; sys.modules['torch'] = None; from llama2_onnx.cli import main; sys.exit(main())"
    proc = subprocess.Popen([sys.executable, "-c", no_torch, "serve", str(tiny_onnx_ort), "--port", "0",
                             "--open", "--provider", "cpu", "--threads", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "BROWSER": f"{opener} %s"})
    try:
        line = proc.stdout.readline()
        assert "chat page: http://127.0.0.1:" in line, (line, proc.poll())
        deadline = time.monotonic() + 10
        while not opened.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        page_url = opened.read_text().strip()
        assert page_url == line.split("chat page: ")[1].rstrip(")\n")
        r = httpx.get(page_url, timeout=10)
        assert r.status_code == 200 and "<title>llama2-onnx chat</title>" in r.text
    finally:
        proc.terminate()
        proc.wait(timeout=20)


@pytest.mark.slow
def test_default_model_answers_paris(browser, smollm2_onnx):
    svc = Service.open(smollm2_onnx, max_batch=2, max_queue=4, provider="cpu")
    state = ServerState()
    state.attach(svc)
    context = browser.new_context(viewport={"width": 1100, "height": 800})
    try:
        with LiveServer(create_app(state, web=True)) as u:
            page = context.new_page()
            page.set_default_timeout(60_000)
            with_key(page, key="", settings={"temperature": 0, "max_tokens": 48})
            page.goto(u + "/")
            page.fill("#input", QUESTION)
            page.press("#input", "Enter")
            page.wait_for_function("() => document.querySelector('.msg.assistant .content')?.textContent.includes('Paris')")
            page.locator(".msg.assistant .stats", has_text="tokens/s").wait_for()
            shot(page, "smollm2-paris")
    finally:
        context.close()
        svc.close()

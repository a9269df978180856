"""The chat page's Markdown (serve/web/index.html with the vendored marked and DOMPurify, inlined by
serve/page.py) in Debian's Chromium, with tests/test_web_page.py's browser, server and helpers: a
scripted answer streams rendered (list, code block with a working Copy button) with raw HTML shown as
text; hostile links and HTML are sanitized; the vendored scripts are inlined under the hash CSP.
Screenshots: build/test-artifacts/web/markdown*.png."""

from __future__ import annotations

import threading
import time

import httpx

from test_web_page import STEP_S, XSS, assistant, browser, page, service, shot, url, with_key  # noqa: F401 (fixtures)

from llama2_onnx.runtime.events import FinishEvent, TokenEvent


class Scripted:
    """Stands in for Engine.submit: every request's answer is `pieces`, one TokenEvent each, STEP_S
    apart, from a thread as the scheduler's would be; at GATE it waits for gate.set(). What the tiny
    model writes cannot be chosen, so the test chooses it here; the server above the engine (its
    queue, the SSE stream, usage) runs as it does for the model."""

    GATE = object()

    def __init__(self, pieces: list):
        self.pieces, self.gate = pieces, threading.Event()

    def __call__(self, req, on_event, **_):
        handle = type("Handle", (), {"cancelled": False, "cancel": lambda h: setattr(h, "cancelled", True)})()
        text = "".join(p for p in self.pieces if p is not self.GATE)
        t0 = time.perf_counter()

        def run():
            sent = 0
            for piece in self.pieces:
                if piece is self.GATE:
                    self.gate.wait(30)
                    continue
                time.sleep(STEP_S)
                if handle.cancelled:
                    break
                on_event(TokenEvent(token=1, text=piece, logprob=None, top_logprobs=None))
                sent += 1
            on_event(FinishEvent(reason="cancelled" if handle.cancelled else "stop", text=text,
                                 prompt_tokens=len(req.prompt), completion_tokens=sent, prompt_logprobs=None,
                                 ttft_s=time.perf_counter() - t0))

        threading.Thread(target=run, daemon=True).start()
        return handle


CODE = "def add(a, b):\n    return a + b  # " + "a long line " * 12 + "end"
ANSWER = ["## Steps\n\n", "Some **bold**, *emphasis* and `inline code`; the tag ", XSS[:9], XSS[9:],
          " stays text.\n\n", "- first item\n", "- second ", "item\n", "- third item\n\n",
          "A [safe link](https://example.com/docs) and a [bad link](javascript:window.__pwned=2).\n\n",
          "```python\n", CODE.split("\n")[0] + "\n", Scripted.GATE, CODE.split("\n")[1] + "\n", "```\n", "\nDone."]


def test_markdown_streams_rendered_and_safe(page, url, service, monkeypatch):
    scripted = Scripted(ANSWER)
    monkeypatch.setattr(service.engine, "submit", scripted)
    page.context.grant_permissions(["clipboard-read", "clipboard-write"], origin=url)
    with_key(page)
    page.goto(url + "/")
    page.fill("#input", "Show me some Markdown.")
    page.press("#input", "Enter")
    # mid-stream (the fence still open, Stop shown): what has come is already rendered
    page.wait_for_function("""() => { const c = document.querySelector('.msg.assistant .content');
        return c && c.querySelectorAll('li').length === 3 && c.querySelector('pre code')?.textContent.startsWith('def add')
            && !document.getElementById('stop').hidden; }""")
    assert page.locator(".msg.assistant .content h2").text_content() == "Steps"
    shot(page, "markdown-streaming")
    scripted.gate.set()
    page.locator(".msg.assistant .stats", has_text="tokens/s").wait_for()

    answer = assistant(page)
    assert answer.locator("li").all_text_contents() == ["first item", "second item", "third item"]
    assert answer.locator("h2").text_content() == "Steps"
    assert answer.locator("strong").text_content() == "bold" and answer.locator("em").text_content() == "emphasis"
    assert answer.locator("p > code").text_content() == "inline code"
    assert answer.locator("pre code").text_content().rstrip("\n") == CODE
    # the model's HTML is text: no element made from it, its handler never ran
    assert f"the tag {XSS} stays text." in answer.text_content()
    assert page.locator("#messages img").count() == 0 and page.evaluate("window.__pwned") is None
    # links: a safe one opens in a new tab without opener or referrer; the javascript: one has no href
    safe = answer.get_by_text("safe link")
    assert (safe.get_attribute("href"), safe.get_attribute("target"), safe.get_attribute("rel")) == \
        ("https://example.com/docs", "_blank", "noopener noreferrer")
    bad = answer.get_by_text("bad link")
    assert bad.get_attribute("href") is None
    bad.click()
    assert page.evaluate("window.__pwned") is None and page.url.startswith(url)

    copy = answer.locator(".code button.copy")
    assert copy.count() == 1
    copy.click()
    page.locator(".msg.assistant .code button.copy", has_text="Copied").wait_for()
    assert page.evaluate("navigator.clipboard.readText()") == CODE
    shot(page, "markdown")
    page.set_viewport_size({"width": 360, "height": 740})
    assert page.evaluate("document.documentElement.scrollWidth") <= 360  # a long code line scrolls in its box
    shot(page, "markdown-narrow")

    page.reload()  # a stored answer is rendered the same way
    page.wait_for_function("() => document.querySelectorAll('.msg.assistant li').length === 3")
    assert page.locator("#messages img").count() == 0 and page.evaluate("window.__pwned") is None
    assert page.locator(".msg.user .content").text_content() == "Show me some Markdown."  # the user's text: as typed


# Markdown that tries to run script, load something or navigate to an unsafe scheme
HOSTILE = [
    "[a](javascript:window.__pwned=1)", "[b](JaVaScRiPt:window.__pwned=1)", "[c](  javascript:window.__pwned=1)",
    "[d](javascript&#58;window.__pwned=1)", "[e](java\tscript:window.__pwned=1)", "<javascript:window.__pwned=1>",
    "[f](vbscript:msgbox)", "[g](data:text/html;base64,PHNjcmlwdD5hbGVydCgxKTwvc2NyaXB0Pg==)", "[h](file:///etc/passwd)",
    "![i](javascript:window.__pwned=1)", "![j](https://example.com/track.png)", '<a href="javascript:window.__pwned=1">k</a>',
    "<script>window.__pwned=1</script>", '<iframe src="javascript:window.__pwned=1"></iframe>',
    '<svg onload="window.__pwned=1">', '<img src=x onerror="window.__pwned=1">',
    '[l](https://example.com/" onmouseover="window.__pwned=1)', "<style>body{display:none}</style>",
]
SAFE = ["[m](https://example.com/a)", "<https://example.org/b>", "[n](http://example.net/c 'title')",
        "[o](mailto:someone@example.com)"]


def test_markdown_links_and_html_sanitized(page, url):
    with_key(page)
    page.goto(url + "/")
    text = "\n\n".join(HOSTILE + SAFE)
    got = page.evaluate("""text => {
        const box = document.createElement('div');
        box.append(markdown(text));
        document.getElementById('messages').append(box);
        for (const a of box.querySelectorAll('a')) a.click();  // none may run script or leave the page
        return { tags: [...new Set([...box.querySelectorAll('*')].map((n) => n.localName))],
                 attrs: [...new Set([...box.querySelectorAll('*')].flatMap((n) => n.getAttributeNames()))],
                 links: [...box.querySelectorAll('a')].map((a) => [a.textContent, a.getAttribute('href'),
                                                                   a.getAttribute('target'), a.getAttribute('rel')]),
                 text: box.textContent };
    }""", text)
    assert set(got["tags"]) <= {"p", "a", "br"}, got["tags"]
    assert set(got["attrs"]) <= {"href", "title", "target", "rel"}, got["attrs"]
    for label, href, target, rel in got["links"]:
        if href is not None:  # every link left is http(s) or mailto, opened apart from this page
            assert href.startswith(("https://", "http://", "mailto:")), (label, href)
            assert (target, rel) == ("_blank", "noopener noreferrer"), (label, href)
    hrefs = {href for _, href, _, _ in got["links"]}
    assert {"https://example.com/a", "https://example.org/b", "http://example.net/c", "mailto:someone@example.com"} <= hrefs
    assert "<script>window.__pwned=1</script>" in got["text"]  # raw HTML is shown, as text
    page.wait_for_timeout(200)
    assert page.evaluate("window.__pwned") is None and page.url.startswith(url)


def test_page_inlines_its_vendored_scripts(url):
    r = httpx.get(url + "/", timeout=10)
    csp = r.headers["content-security-policy"]
    script_src = next(d for d in csp.split(";") if d.strip().startswith("script-src"))
    assert "unsafe" not in script_src and "http" not in script_src and "'self'" not in script_src
    assert script_src.count("'sha256-") == r.text.count("<script>") == 3  # DOMPurify, marked, the page's own
    assert "<script src=" not in r.text and "sourceMappingURL" not in r.text
    assert "@license DOMPurify" in r.text and "marked v" in r.text  # their license headers kept

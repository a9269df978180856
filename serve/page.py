"""The chat page at `/`: serve/web/index.html, shipped in the package (no CDN, no build step).

The page talks only to this server's /v1 routes. Its Markdown libraries (serve/web/vendor/: marked
and DOMPurify, see the README there) are package data too: each `<script src="vendor/NAME.js"></script>`
in the page is replaced here by an inline script holding that file, so the page is one response and
needs no route of its own. It is sent with a Content-Security-Policy that allows those inline
scripts by hash and nothing else (no inline event handlers, no remote scripts, connections to this
origin only): a second guard, behind the page's own rules (the user's text set as text only, the
model's Markdown sanitized into a DOM fragment).
"""

from __future__ import annotations

import base64
import hashlib
import re
from functools import lru_cache
from importlib import resources

PAGE = "web/index.html"
VENDOR = "web/vendor"
VENDOR_TAG = re.compile(r'<script src="vendor/([A-Za-z0-9_.-]+\.js)"></script>')
SOURCE_MAP = re.compile(r"\n//# sourceMappingURL=\S+\s*$")  # the .map files are not shipped
SCRIPT_TAG = re.compile(r"<(/?)script", re.I)  # would end (or nest) the inline script early


def vendored(name: str) -> str:
    """serve/web/vendor/NAME as the body of an inline <script>."""
    js = (resources.files(__package__) / VENDOR / name).read_text(encoding="utf-8")
    if SCRIPT_TAG.search(js):
        raise ValueError(f"{VENDOR}/{name} contains '<script' or '</script', so it cannot be inlined in the page")
    return SOURCE_MAP.sub("\n", js)


@lru_cache(maxsize=1)
def page() -> tuple[bytes, dict[str, str]]:
    """(the page's bytes, its response headers)."""
    html = (resources.files(__package__) / PAGE).read_text(encoding="utf-8")
    html = VENDOR_TAG.sub(lambda m: f"<script>{vendored(m.group(1))}</script>", html)
    scripts = re.findall(r"<script>(.*?)</script>", html, flags=re.S)
    hashes = " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(s.encode()).digest()).decode()}'" for s in scripts)
    csp = (f"default-src 'none'; script-src {hashes}; style-src 'unsafe-inline'; img-src data:; "
           "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
    return html.encode(), {"Content-Security-Policy": csp, "X-Content-Type-Options": "nosniff",
                           "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache"}

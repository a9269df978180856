"""The chat page at `/`: serve/web/index.html, one file shipped in the package (no CDN, no build step).

The page talks only to this server's /v1 routes. It is sent with a Content-Security-Policy that
allows its own inline script by hash and nothing else (no inline event handlers, no remote
scripts, connections to this origin only): a second guard, behind the page's own rule of
setting model output as text only.
"""

from __future__ import annotations

import base64
import hashlib
import re
from functools import lru_cache
from importlib import resources

PAGE = "web/index.html"


@lru_cache(maxsize=1)
def page() -> tuple[bytes, dict[str, str]]:
    """(the page's bytes, its response headers)."""
    html = (resources.files(__package__) / PAGE).read_text(encoding="utf-8")
    scripts = re.findall(r"<script>(.*?)</script>", html, flags=re.S)
    hashes = " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(s.encode()).digest()).decode()}'" for s in scripts)
    csp = (f"default-src 'none'; script-src {hashes}; style-src 'unsafe-inline'; img-src data:; "
           "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
    return html.encode(), {"Content-Security-Policy": csp, "X-Content-Type-Options": "nosniff",
                           "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache"}

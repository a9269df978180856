"""The server's address as a URL, and the one a browser on this machine opens."""

from __future__ import annotations


def http_url(host: str, port: int) -> str:
    """http://host:port, an IPv6 host in brackets."""
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def browser_url(host: str, port: int) -> str:
    """The chat page's URL for a browser on this machine: a wildcard bind (0.0.0.0, ::) is reached at 127.0.0.1."""
    return http_url("127.0.0.1" if host in ("0.0.0.0", "::") else host, port) + "/"

"""The ASGI guard in front of every route (outermost after CORS), in the order it checks:

1. Host: the Host header must name this server (DNS-rebinding protection, as Jupyter and Vite
   have): a loopback server answers only `localhost`, `*.localhost` and IP literals unless
   --allowed-host adds names; `*` allows any. 403 otherwise.
2. Stopping: once the server is stopping (SIGTERM/SIGINT), a new request is 503 shutting_down.
3. API key: `Authorization: Bearer KEY`, compared with hmac.compare_digest; /health, the chat
   page and the OpenAPI schema stay open. 401 otherwise.
4. Body: read whole before any route runs, so every route sees the same limits: over max_body
   bytes is 413 whether Content-Length says so or a chunked body grows past it; a body that has
   not arrived within read_timeout_s of its headers is 408 and the connection is closed (slow
   bodies). The route then reads the buffered body.

It also counts requests by route and status for /metrics.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
from dataclasses import dataclass

from fastapi.responses import JSONResponse

from .errors import APIError

OPEN_PATHS = ("/", "/health", "/openapi.json")  # no API key needed
ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/score", "/tokenize", "/detokenize",
          "/health", "/metrics", "/")
LOOPBACK_NAMES = ("localhost",)  # and *.localhost, which resolves to loopback too (RFC 6761)
ANY_HOST = "*"


def error_response(e: APIError, *, close: bool = False) -> JSONResponse:
    headers = e.headers() | ({"Connection": "close"} if close else {})
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


def host_name(header: bytes) -> str:
    """The name in a Host header, port and IPv6 brackets dropped, lower case: b"[::1]:80" -> "::1"."""
    host = header.decode("latin-1").strip().lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def host_allowed(name: str, allowed: tuple[str, ...] | None) -> bool:
    """allowed None: any host. Otherwise IP literals, localhost names and the names in allowed.
    An IP literal is never a rebinding risk: rebinding needs a name the attacker's DNS answers."""
    if allowed is None or ANY_HOST in allowed or name in allowed:
        return True
    if name in LOOPBACK_NAMES or name.endswith(".localhost"):
        return True
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class GuardOptions:
    api_key: str | None = None
    max_body: int = 1 << 20  # bytes: ~250k tokens of text, far past any context we serve
    read_timeout_s: float = 30.0  # a request's body must arrive within this of its headers
    allowed_hosts: tuple[str, ...] | None = ()  # () = loopback names and IP literals only; None = any


class Guard:
    def __init__(self, app, *, state, options: GuardOptions):
        self.app, self.state, self.options = app, state, options
        self.key = options.api_key.encode() if options.api_key else None
        self.too_large = APIError(413, f"the request body is larger than {options.max_body} bytes; send at most "
                                       f"{options.max_body} (the server's --max-body)", code="request_too_large")
        self.too_slow = APIError(408, f"the request body did not arrive within {options.read_timeout_s:g} s",
                                 code="request_timeout")

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        route = path if path in ROUTES else ("/v1/models/{id}" if path.startswith("/v1/models/") else "other")

        async def counted_send(message) -> None:
            if message["type"] == "http.response.start":
                self.state.metrics.request(route, message["status"])
            await send(message)

        headers = dict(scope["headers"])
        # a refusal before the body is read closes the connection: the unread body (or one a client
        # holds back after Expect: 100-continue) must not be taken for the next request
        has_body = headers.get(b"content-length", b"0") != b"0" or b"transfer-encoding" in headers

        async def refuse(e: APIError, *, close: bool = has_body) -> None:
            await error_response(e, close=close)(scope, receive, counted_send)

        host = host_name(headers.get(b"host", b""))
        if b"host" in headers and not host_allowed(host, self.options.allowed_hosts):
            return await refuse(APIError(403, f"the Host header {host!r} is not allowed (DNS-rebinding protection); "
                                              f"start the server with --allowed-host {host} to allow it",
                                         code="host_not_allowed"))
        if self.state.closing:
            return await refuse(APIError(503, "the server is shutting down", code="shutting_down"), close=True)
        if self.key is not None and path not in OPEN_PATHS and scope["method"] != "OPTIONS":
            given = headers.get(b"authorization", b"")
            if not hmac.compare_digest(given, b"Bearer " + self.key):
                what = "Incorrect API key provided" if given else "Missing API key: send it as 'Authorization: Bearer KEY'"
                return await refuse(APIError(401, what, code="invalid_api_key"))
        try:
            length = int(headers.get(b"content-length", b"0"))
        except ValueError:
            length = 0
        if length > self.options.max_body:
            return await refuse(self.too_large)
        body, problem = await self._read_body(receive)
        if problem is not None:
            return await refuse(problem, close=True)
        if body is None:
            return  # the client went away before its body arrived
        await self.app(scope, _replay(body, receive), counted_send)

    async def _read_body(self, receive) -> tuple[bytes | None, APIError | None]:
        """(body, None), (None, the error to answer), or (None, None) when the client disconnected."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.options.read_timeout_s
        parts, size, more = [], 0, True
        while more:
            try:
                message = await asyncio.wait_for(receive(), max(deadline - loop.time(), 0))
            except asyncio.TimeoutError:
                return None, self.too_slow
            if message["type"] == "http.disconnect":
                return None, None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.options.max_body:
                return None, self.too_large
            parts.append(chunk)
            more = message.get("more_body", False)
        return b"".join(parts), None


def _replay(body: bytes, receive):
    """A receive that gives the buffered body once, then the client's own messages (its disconnect)."""
    pending = True

    async def replayed():
        nonlocal pending
        if pending:
            pending = False
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()
    return replayed

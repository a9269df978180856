"""The uvicorn server `llama2-onnx serve` runs, with the connection limits uvicorn lacks and a
graceful stop on SIGTERM as on SIGINT.

    limits = Limits(max_connections=512, read_timeout_s=30, grace_s=30)
    server = make_server(app, state, limits)
    server.run(sockets=[sock])            # returns once stopped; never re-raises the signal

Connections (HTTP/1.1 through h11, one protocol object per connection):
- At most `max_connections` are open at once. One past the cap is answered 503 (Retry-After: 1,
  Connection: close) and closed at once, so a client holding thousands of sockets never uses up
  the process's descriptors and /health keeps answering.
- A request's headers must arrive within `read_timeout_s` of the connection opening, or of the
  previous response on a kept-alive connection, however the bytes trickle in (slowloris); the
  connection is then closed. The body's deadline is the guard's (serve/app.py: 408).
- An idle kept-alive connection is closed after `keep_alive_s` (uvicorn's timeout_keep_alive).

Stopping (SIGTERM or SIGINT, the first one): the listening socket closes, idle connections close,
new requests on open ones get 503 shutting_down, and running requests go on for up to `grace_s`.
Those still running then end as errors: a stream with an {"error": ...} event and [DONE], a whole
answer with a 503 body (ServerState.shut_down). A second signal ends them at once. The process
then exits normally: uvicorn's habit of re-raising the signal afterwards (exit 143 on SIGTERM)
is not kept.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import threading

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from .app import ServerState
from .errors import APIError
from .limits import Limits

SIGNALS = (signal.SIGINT, signal.SIGTERM)
LINGER_S = 0.5  # a refused connection stays open this long after its 503, for the client to read it
FORCE_S = 1.0  # after a second stop signal: time for the ended requests' last bytes, then exit


def _refusal(status: int, reason: str, error: APIError) -> bytes:
    """A whole HTTP/1.1 response that closes the connection, for answers given before any request."""
    body = json.dumps(error.body()).encode()
    head = (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            f"retry-after: 1\r\nconnection: close\r\n\r\n")
    return head.encode() + body


BUSY = _refusal(503, "Service Unavailable", APIError(503, "the server has too many open connections; retry shortly",
                                                     code="too_many_connections", retry_after=1))


class LimitedH11(H11Protocol):
    """uvicorn's h11 protocol with a connection cap and a deadline for each request's headers."""

    limits: Limits = Limits()

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._header_timer: asyncio.TimerHandle | None = None
        self._waiting_on = None  # the cycle that was current when the header clock started
        self._refused = len(self.connections) > self.limits.max_connections
        if self._refused:
            # answer, stop sending, and close a moment later: closing at once with a request unread
            # would make the kernel reset the connection before the client reads the 503
            transport.write(BUSY)
            if transport.can_write_eof():
                transport.write_eof()
            self.loop.call_later(LINGER_S, transport.close)
            return
        self._arm()

    def _arm(self) -> None:
        """Start the clock for the next request's headers; only a new request stops it."""
        self._disarm()
        self._waiting_on = self.cycle
        self._header_timer = self.loop.call_later(self.limits.read_timeout_s, self._headers_late)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_late(self) -> None:
        self._header_timer = None
        idle = self.cycle is None or self.cycle.response_complete  # not serving a request
        if idle and self.cycle is self._waiting_on and not self.transport.is_closing():
            self.transport.close()  # nothing to answer: the request never arrived

    def data_received(self, data: bytes) -> None:
        if not self._refused:  # a refused connection's request is read and dropped until it closes
            super().data_received(data)

    def handle_events(self) -> None:
        super().handle_events()
        if self._header_timer is not None and self.cycle is not self._waiting_on:
            self._disarm()  # a request's headers are in; its body has the guard's deadline

    def on_response_complete(self) -> None:
        self._arm()  # first: super() may start a pipelined request, which then stops this clock
        super().on_response_complete()
        if self.transport.is_closing():
            self._disarm()

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)


def _raise_descriptor_limit(needed: int) -> None:
    """Let the process hold `needed` sockets plus its model files (the soft limit is often 1024)."""
    try:
        import resource
    except ImportError:  # Windows: no such limit
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = needed + 256
    if soft != resource.RLIM_INFINITY and soft < want:
        with contextlib.suppress(ValueError, OSError):  # past the kernel's nr_open: keep what we have
            resource.setrlimit(resource.RLIMIT_NOFILE, (want if hard == resource.RLIM_INFINITY else min(want, hard), hard))


class Server(uvicorn.Server):
    """uvicorn.Server that drains on SIGTERM as on SIGINT and exits normally afterwards."""

    def __init__(self, config: uvicorn.Config, state: ServerState, limits: Limits):
        super().__init__(config)
        self.state, self.limits = state, limits
        self.loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets=None) -> None:
        self.loop = asyncio.get_running_loop()
        await super().serve(sockets=sockets)

    @contextlib.contextmanager
    def capture_signals(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in SIGNALS}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def handle_exit(self, sig, frame) -> None:
        first = not self.should_exit
        self.should_exit = True
        if self.loop is None:
            return
        if first:
            self.loop.call_soon_threadsafe(self._drain)
        else:  # a second signal: end what is still running now, and stop waiting for slow connections
            self.loop.call_soon_threadsafe(self.state.shut_down)
            self.loop.call_soon_threadsafe(self.loop.call_later, FORCE_S, setattr, self, "force_exit", True)

    def _drain(self) -> None:
        self.state.closing = True
        self.loop.call_later(self.limits.grace_s, self.state.shut_down)


def make_server(app, state: ServerState, limits: Limits = Limits(), *, log_level: str = "warning") -> Server:
    _raise_descriptor_limit(limits.max_connections)
    protocol = type("LimitedH11", (LimitedH11,), {"limits": limits})
    # uvicorn waits this long for running requests before cancelling them; shut_down ends them
    # (an error event, [DONE]) at grace_s, so the margin only covers writing those last bytes
    # no websockets: the app has no websocket routes, and the guard and header clock are HTTP's
    config = uvicorn.Config(app, http=protocol, ws="none", log_level=log_level, lifespan="off",
                            timeout_keep_alive=limits.keep_alive_s, timeout_graceful_shutdown=limits.grace_s + 5)
    return Server(config, state, limits)

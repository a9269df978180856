"""A real uvicorn server on a free 127.0.0.1 port, in a background thread, for the serve tests.

    with LiveServer(app) as url:         # "http://127.0.0.1:PORT"; stopped on exit, even on failure
        ...
    with rows_busy(service):             # every engine row taken: the next request queues
        ...
    with serving(folder, model_id="m") as (url, service):   # Service.open + LiveServer, both stopped
        ...
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time


class LiveServer:
    """The server `llama2-onnx serve` runs (serve.server.make_server: its connection limits)."""

    def __init__(self, app, start_timeout_s: float = 20.0, *, state=None, limits=None):
        from llama2_onnx.serve.app import ServerState
        from llama2_onnx.serve.limits import Limits
        from llama2_onnx.serve.server import make_server

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = make_server(app, state or ServerState(), limits or Limits(grace_s=0))  # stop: 5 s for open requests
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.start_timeout_s = start_timeout_s

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + self.start_timeout_s
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                self.stop()
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self.url

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        self.server.should_exit = True  # not handle_exit: its shut_down would stop a service other servers share
        self.thread.join(timeout=10)
        self.sock.close()


@contextlib.contextmanager
def rows_busy(service, step_s: float = 0.05, timeout_s: float = 20.0):
    """Every row of service's engine taken by a slowed request that would run to the context, so the
    next request must queue; the rows are freed (cancelled) and the speed restored on exit."""
    from llama2_onnx.runtime.engine import GenRequest
    from llama2_onnx.runtime.sampler import SamplingParams

    engine = service.engine
    prompt = service.gen.encode_prompt("busy")
    req = GenRequest(prompt=tuple(prompt), max_tokens=engine.context - len(prompt), params=SamplingParams())
    with slowed(service, step_s):
        handles = [engine.submit(req, lambda event: None) for _ in range(engine.max_batch)]
        try:
            deadline = time.monotonic() + timeout_s
            while engine.stats()["free_slots"] or engine.stats()["queued"]:
                assert time.monotonic() < deadline, "the busy requests did not take every row"
                time.sleep(0.01)
            yield
        finally:
            for h in handles:
                h.cancel()


@contextlib.contextmanager
def open_service(folder, **kwargs):
    """Service.open(folder, provider="cpu", **kwargs), closed on exit."""
    from llama2_onnx.serve.service import Service

    service = Service.open(folder, provider="cpu", **kwargs)
    try:
        yield service
    finally:
        service.close()


@contextlib.contextmanager
def serving(folder, app_kwargs: dict | None = None, **kwargs):
    """(url, service): a service on folder (open_service's kwargs) behind a LiveServer; both stopped on exit."""
    from llama2_onnx.serve.app import ServerState, create_app

    with open_service(folder, **kwargs) as service:
        state = ServerState()
        state.attach(service)
        with LiveServer(create_app(state, **(app_kwargs or {}))) as url:
            yield url, service


@contextlib.contextmanager
def slowed(service, step_s: float):
    """Every decode step of service's engine takes at least step_s more (restored on exit)."""
    slots = service.engine.slots
    decode = slots.decode

    def slow(*args):
        time.sleep(step_s)
        return decode(*args)

    slots.decode = slow
    try:
        yield
    finally:
        slots.decode = decode

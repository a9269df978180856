"""The HTTP app: FastAPI routes over a Service, behind one ASGI guard.

    state = ServerState()                      # state.service stays None while the model loads
    app = create_app(state, api_key="sk-...", metrics=True)
    state.service = Service.open(folder)       # /health turns from 503 to 200

Routes: POST /v1/chat/completions, POST /v1/completions, GET /v1/models(/{id}), POST /score
(Azure ML), POST /tokenize, POST /detokenize, GET|HEAD /health, GET /metrics (with metrics=True),
GET|HEAD / the chat page (with web=True; serve/page.py). The model card adds max_model_len and
chat_defaults (the sampling a chat request gets for the fields it leaves out) for the page.

The guard, outermost after CORS (serve/guard.py): Host allowlist (403), 503 once stopping, API key
(401; /health, the page and the OpenAPI schema stay open), the whole body read under a size limit
(413) and a deadline (408), and the requests-by-status counter. Tokenizing runs off the event loop
(Service.off_loop), so a 1 MiB prompt never stalls /health or running streams. Every error,
FastAPI's own included (404, 405, validation: never 422), is the OpenAI error body. A handler
races its work against the client's disconnect (vLLM's with_cancellation), so a client that goes
away cancels its engine rows at once, streaming or not.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import AsyncIterator, Awaitable, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import azure, openai_api, page
from .errors import APIError, from_validation
from .guard import Guard, GuardOptions, error_response
from .metrics import Metrics
from .schemas import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, ScoreRequest, TokenizeRequest
from llama2_onnx.runtime.request import sampling

from .service import RunGroup, Service

log = logging.getLogger(__name__)

MAX_BODY = GuardOptions.max_body
CLIENT_GONE = 499  # nginx's code for "client closed request": logged, never seen by anyone


class ServerState:
    """What the routes serve: None until the model has loaded. closing: the server is stopping
    (the guard answers new requests 503); shut_down() ends the requests still running."""

    def __init__(self, metrics: Metrics | None = None):
        self.service: Service | None = None
        self.metrics = metrics or Metrics()
        self.closing = False

    def attach(self, service: Service) -> None:
        """The model has loaded: serve it (its counters are the server's)."""
        service.metrics = self.metrics
        self.service = service

    def ready(self) -> Service:
        if self.service is None:
            raise APIError(503, "the model is still loading; retry shortly", code="model_loading", retry_after=1)
        return self.service

    def shut_down(self) -> None:
        """End every running request now, as an error (a stream: an error event, then [DONE])."""
        self.closing = True
        if self.service is not None:
            self.service.end_requests()


# ---- disconnects -----------------------------------------------------------------------------------


async def _disconnected(request: Request) -> None:
    """Return once the client has gone (the body has been read: the next message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(request: Request, work: Awaitable):
    """work's result, or CLIENT_GONE when the client disconnects first (work is then cancelled,
    which cancels its engine rows, and awaited, so nothing is left running or unlogged)."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
    if task in done:
        return task.result()
    await asyncio.gather(task, return_exceptions=True)  # its cancellation, or an error nobody will read
    return Response(status_code=CLIENT_GONE)


def _sse(request: Request, group: RunGroup, chunks: AsyncIterator[dict]) -> StreamingResponse:
    async def body() -> AsyncIterator[str]:
        watch = asyncio.ensure_future(_disconnected(request))
        watch.add_done_callback(lambda t: t.cancelled() or group.cancel())
        try:
            async for chunk in chunks:
                yield f"data: {json.dumps(chunk)}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            watch.cancel()
            group.cancel()
            await chunks.aclose()

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


# ---- the app --------------------------------------------------------------------------------------


def create_app(state: ServerState, *, api_key: str | None = None, cors_origins: tuple[str, ...] = (),
               metrics: bool = False, max_body: int = MAX_BODY, web: bool = False,
               read_timeout_s: float = GuardOptions.read_timeout_s,
               allowed_hosts: tuple[str, ...] | None = ()) -> FastAPI:
    """allowed_hosts: () = loopback names and IP literals only (a loopback server's default),
    names to add to those, or None for any host."""
    # no /docs or /redoc: FastAPI's load their scripts from a CDN; the schema is at /openapi.json
    app = FastAPI(title="llama2-onnx", version="0", summary="OpenAI-compatible and Azure ML endpoints for an ONNX Llama model",
                  docs_url=None, redoc_url=None)

    @app.exception_handler(APIError)
    async def api_error(_request, e: APIError):
        return error_response(e)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request, e: RequestValidationError):
        return error_response(from_validation(list(e.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        message = {404: f"Unknown route {request.method} {request.url.path}",
                   405: f"{request.method} is not allowed on {request.url.path}"}.get(e.status_code, str(e.detail))
        return error_response(APIError(e.status_code, message, code="not_found" if e.status_code == 404 else None))

    @app.exception_handler(Exception)
    async def crashed(_request, e: Exception):
        log.exception("unhandled error")
        return error_response(APIError(500, f"internal error: {type(e).__name__}", code="internal_error"))

    async def answer(request: Request, body, chunks: Callable, whole: Callable):
        """A streamed (SSE) or whole OpenAI answer, as the request asks."""
        service = state.ready()
        if body.stream:
            return _sse(request, *await chunks(service, body))
        return await _unless_disconnected(request, whole(service, body))

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        return await answer(request, body, openai_api.chat_chunks, openai_api.chat_completion)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        return await answer(request, body, openai_api.completion_chunks, openai_api.completion)

    @app.get("/v1/models")
    async def models():
        service = state.ready()
        return {"object": "list", "data": [_model_card(service)]}

    @app.get("/v1/models/{model_id}")
    async def model(model_id: str):
        service = state.ready()
        service.check_model(model_id)
        return _model_card(service)

    @app.post("/score")
    async def score(body: ScoreRequest, request: Request):
        return await _unless_disconnected(request, azure.score(state.ready(), body))

    # tokenizing a large body takes seconds: off the event loop, answer serialised there too
    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        service = state.ready()
        return await service.off_loop(lambda: JSONResponse(service.tokenize(body)))

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        service = state.ready()
        return await service.off_loop(lambda: JSONResponse(service.detokenize(body)))

    @app.get("/health")
    @app.head("/health", include_in_schema=False)
    async def health():
        state.ready()
        return {"status": "ok"}

    if web:
        @app.get("/", include_in_schema=False)
        @app.head("/", include_in_schema=False)
        async def chat_page():
            body, headers = page.page()
            return Response(body, media_type="text/html; charset=utf-8", headers=headers)

    if metrics:
        @app.get("/metrics", response_class=PlainTextResponse)
        async def prometheus():
            stats = state.service.stats() if state.service is not None else None
            return PlainTextResponse(state.metrics.render(stats), media_type="text/plain; version=0.0.4")

    app.add_middleware(Guard, state=state, options=GuardOptions(api_key=api_key, max_body=max_body,
                                                                read_timeout_s=read_timeout_s, allowed_hosts=allowed_hosts))
    if cors_origins:
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type", "X-Session-ID"])
    return app


def _model_card(service: Service) -> dict:
    chat = sampling("chat", folder=service.gen.generation)  # what a chat request gets for the fields it leaves out
    return {"id": service.model_id, "object": "model", "created": service.created, "owned_by": "llama2-onnx",
            "max_model_len": service.context,
            "chat_defaults": {"temperature": chat.temperature, "top_p": chat.top_p, "max_tokens": None}}


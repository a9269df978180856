"""The HTTP app: FastAPI routes over a Service, behind one ASGI guard.

    state = ServerState()                      # state.service stays None while the model loads
    app = create_app(state, api_key="sk-...", metrics=True)
    state.service = Service.open(folder)       # /health turns from 503 to 200

Routes: POST /v1/chat/completions, POST /v1/completions, GET /v1/models(/{id}), POST /score
(Azure ML), POST /tokenize, POST /detokenize, GET /health, GET /metrics (with metrics=True),
GET / the chat page (with web=True; serve/page.py). The model card adds max_model_len and
chat_defaults (the sampling a chat request gets for the fields it leaves out) for the page.

The guard, outermost after CORS: body size limit (413), API key (401, compared with
hmac.compare_digest; /health and the OpenAPI schema stay open), and the requests-by-status
counter. Every error, FastAPI's own included (404, 405, validation: never 422), is the OpenAI
error body. A handler races its work against the client's disconnect (vLLM's with_cancellation),
so a client that goes away cancels its engine rows at once, streaming or not.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from typing import AsyncIterator, Awaitable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import azure, openai_api, page
from .errors import APIError, from_validation
from .metrics import Metrics
from .schemas import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, ScoreRequest, TokenizeRequest
from .service import RunGroup, Sampling, Service

log = logging.getLogger(__name__)

MAX_BODY = 1 << 20  # bytes: ~250k tokens of text, far past any context we serve
OPEN_PATHS = ("/", "/health", "/openapi.json", "/docs", "/docs/oauth2-redirect")  # no API key needed
ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/score", "/tokenize", "/detokenize",
          "/health", "/metrics", "/")
CLIENT_GONE = 499  # nginx's code for "client closed request": logged, never seen by anyone


class ServerState:
    """What the routes serve: None until the model has loaded."""

    def __init__(self, metrics: Metrics | None = None):
        self.service: Service | None = None
        self.metrics = metrics or Metrics()

    def attach(self, service: Service) -> None:
        """The model has loaded: serve it (its counters are the server's)."""
        service.metrics = self.metrics
        self.service = service

    def ready(self) -> Service:
        if self.service is None:
            raise APIError(503, "the model is still loading; retry shortly", code="model_loading", retry_after=1)
        return self.service


def _error_response(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers())


# ---- the guard: size limit, API key, status counter ------------------------------------------


class _TooLarge(Exception):
    pass


class Guard:
    def __init__(self, app, *, state: ServerState, api_key: str | None, max_body: int):
        self.app, self.state, self.max_body = app, state, max_body
        self.key = api_key.encode() if api_key else None
        self.too_large = APIError(413, f"the request body is larger than {max_body} bytes", code="request_too_large")

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        route = path if path in ROUTES else ("/v1/models/{id}" if path.startswith("/v1/models/") else "other")
        started = False

        async def counted_send(message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                self.state.metrics.request(route, message["status"])
            await send(message)

        headers = dict(scope["headers"])
        if self.key is not None and path not in OPEN_PATHS and scope["method"] != "OPTIONS":
            given = headers.get(b"authorization", b"")
            if not hmac.compare_digest(given, b"Bearer " + self.key):
                what = "Incorrect API key provided" if given else "Missing API key: send it as 'Authorization: Bearer KEY'"
                err = APIError(401, what, code="invalid_api_key")
                return await _error_response(err)(scope, receive, counted_send)
        try:
            length = int(headers.get(b"content-length", b"0"))
        except ValueError:
            length = 0
        if length > self.max_body:
            return await _error_response(self.too_large)(scope, receive, counted_send)
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body:
                    raise _TooLarge()
            return message

        try:
            await self.app(scope, limited_receive, counted_send)
        except _TooLarge:
            if not started:
                await _error_response(self.too_large)(scope, receive, counted_send)


# ---- disconnects -----------------------------------------------------------------------------------


async def _disconnected(request: Request) -> None:
    """Return once the client has gone (the body has been read: the next message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(request: Request, work: Awaitable):
    """work's result, or CLIENT_GONE when the client disconnects first (work is then cancelled,
    which cancels its engine rows)."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
    if task.cancelled():
        return Response(status_code=CLIENT_GONE)
    return task.result()


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
               metrics: bool = False, max_body: int = MAX_BODY, web: bool = False) -> FastAPI:
    app = FastAPI(title="llama2-onnx", version="0", summary="OpenAI-compatible and Azure ML endpoints for an ONNX Llama model")

    @app.exception_handler(APIError)
    async def api_error(_request, e: APIError):
        return _error_response(e)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request, e: RequestValidationError):
        return _error_response(from_validation(list(e.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        message = {404: f"Unknown route {request.method} {request.url.path}",
                   405: f"{request.method} is not allowed on {request.url.path}"}.get(e.status_code, str(e.detail))
        return _error_response(APIError(e.status_code, message, code="not_found" if e.status_code == 404 else None))

    @app.exception_handler(Exception)
    async def crashed(_request, e: Exception):
        log.exception("unhandled error")
        return _error_response(APIError(500, f"internal error: {type(e).__name__}", code="internal_error"))

    async def answer(request: Request, body, chunks, whole):
        """A streamed (SSE) or whole OpenAI answer, as the request asks."""
        service = state.ready()
        if body.stream:
            return _sse(request, *chunks(service, body))
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

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        return state.ready().tokenize(body)

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        return state.ready().detokenize(body)

    @app.get("/health")
    async def health():
        state.ready()
        return {"status": "ok"}

    if web:
        @app.get("/", include_in_schema=False)
        async def chat_page():
            body, headers = page.page()
            return Response(body, media_type="text/html; charset=utf-8", headers=headers)

    if metrics:
        @app.get("/metrics", response_class=PlainTextResponse)
        async def prometheus():
            stats = state.service.stats() if state.service is not None else None
            return PlainTextResponse(state.metrics.render(stats), media_type="text/plain; version=0.0.4")

    app.add_middleware(Guard, state=state, api_key=api_key, max_body=max_body)
    if cors_origins:
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    return app


def _model_card(service: Service) -> dict:
    chat = Service.params(Sampling())  # what a chat request gets for the fields it leaves out
    return {"id": service.model_id, "object": "model", "created": service.created, "owned_by": "llama2-onnx",
            "max_model_len": service.context,
            "chat_defaults": {"temperature": chat.temperature, "top_p": chat.top_p, "max_tokens": None}}


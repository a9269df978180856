"""Service: the model behind every route and `score`: validated requests -> engine requests,
and the engine's events delivered on the asyncio event loop.

    service = Service.open(folder, max_batch=8)            # Generator + Engine, started
    gen_reqs = service.chat_requests(req)                  # one per choice; APIError 400/404 naming the field
    group = service.submit(gen_reqs)                       # APIError 503 when the queue is full
    async for index, event in group.events(): ...          # TokenEvent ..., FinishEvent

The engine's scheduler thread calls on_event; it must not block, so each event is handed to
the loop with call_soon_threadsafe onto the group's queue. Leaving `events()` early (the
client went away, the task was cancelled) cancels every unfinished row in the engine.
"""

from __future__ import annotations

import asyncio
import time
import weakref
from pathlib import Path
from typing import AsyncIterator, Callable, Sequence, TypeVar

from llama2_onnx.errors import UserError
from llama2_onnx.runtime.generator import Generator
from llama2_onnx.runtime.request import ContextError, sampling, token_budget
from llama2_onnx.runtime.sampler import MAX_SEED, SamplingParams

from llama2_onnx.runtime.engine import Engine, EngineClosed, FinishEvent, GenRequest, QueueFull, RequestError, TokenEvent
from .errors import APIError, bad_request
from .metrics import Metrics
from .schemas import ChatCompletionRequest, ChatMessage, CompletionRequest, DetokenizeRequest, TokenizeRequest
from .tokens import TokenTexts
from .tools import tools_grammar, with_tools

RETRY_AFTER_S = 1
SHUTDOWN = "shutdown"  # the finish reason of a request the server ended because it is stopping
T = TypeVar("T")


class Service:
    def __init__(self, generator: Generator, engine: Engine, *, model_id: str, timeout_s: float | None = None,
                 metrics: Metrics | None = None):
        self.gen, self.engine = generator, engine
        self.tokenizer = generator.tokenizer
        self.model_id = model_id
        self.context = engine.context  # tokens a row holds, prompt included
        self.timeout_s = timeout_s
        self.metrics = metrics or Metrics()
        self.texts = TokenTexts(self.tokenizer)
        self.created = int(time.time())
        self.groups: weakref.WeakSet[RunGroup] = weakref.WeakSet()  # the running requests, for end_requests
        self.stopping = False

    @classmethod
    def open(cls, folder: str | Path, *, max_batch: int = 8, max_queue: int = 64, timeout_s: float | None = None,
             metrics: Metrics | None = None, model_id: str | None = None, **model_kwargs) -> "Service":
        """Open a model folder (model_kwargs as Generator.from_dir) and start its engine."""
        gen = Generator.from_dir(folder, max_batch=max_batch, **model_kwargs)
        return cls.from_generator(gen, max_batch=max_batch, max_queue=max_queue, timeout_s=timeout_s,
                                  metrics=metrics, model_id=model_id or Path(folder).name)

    @classmethod
    def from_generator(cls, gen: Generator, *, max_batch: int = 8, max_queue: int = 64, model_id: str,
                       timeout_s: float | None = None, metrics: Metrics | None = None) -> "Service":
        engine = gen.engine  # one engine: the generator's, when its rows are the ones asked for
        if engine.max_batch != max_batch:
            engine = Engine.from_generator(gen, max_batch=max_batch, max_queue=max_queue, context=engine.context,
                                           prefix_cache=engine.pool.enabled, prefix_cache_gb=engine.pool.host_gb,
                                           speculator=engine.speculator)
        engine.max_queue = max_queue
        engine.start()
        return cls(gen, engine, model_id=model_id, timeout_s=timeout_s, metrics=metrics)

    def close(self) -> None:
        self.engine.close()

    def stats(self) -> dict:
        return self.engine.stats()

    async def off_loop(self, work: Callable[[], T]) -> T:
        """work() on a worker thread: tokenizing a 1 MiB body takes seconds, and the event loop
        must keep answering /health and feeding streams meanwhile (the tokenizers release the GIL)."""
        return await asyncio.get_running_loop().run_in_executor(None, work)

    def end_requests(self) -> None:
        """The server is stopping: refuse new requests and end the running ones (finish "shutdown")."""
        self.stopping = True
        for group in list(self.groups):
            group.end(SHUTDOWN)

    # ---- requests -> engine requests -----------------------------------------------------
    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_id:
            raise APIError(404, f"The model `{name}` does not exist; this server has `{self.model_id}`",
                           param="model", code="model_not_found")

    def chat_ids(self, messages: Sequence[ChatMessage], param: str = "messages", tools: list[dict] | None = None) -> list[int]:
        """The prompt ids of OpenAI messages (with tools: described in the system message, serve/tools.py)."""
        dialog = [m.as_message() for m in messages]
        if tools:
            dialog = with_tools(dialog, tools)
        try:
            return self.gen.chat_ids(dialog)
        except UserError as e:
            raise bad_request(str(e), param=param) from None

    def prompt_ids(self, prompt: str, param: str = "prompt") -> list[int]:
        try:
            return self.gen.encode_prompt(prompt)
        except UserError as e:
            raise bad_request(str(e), param=param) from None

    def budget(self, n_prompt: int, asked: int | None, *, explicit: bool, param: str) -> int:
        """New tokens a prompt of n_prompt tokens may have: asked, or the context left when not
        given; 400 context_length_exceeded when the prompt fills the context or an explicit
        ask does not fit in what is left."""
        try:
            return token_budget(n_prompt, asked, self.context, explicit=explicit)  # the one rule
        except ContextError as e:  # in OpenAI's words
            if e.asked is None:
                raise APIError(400, f"This model's maximum context length is {self.context} tokens. However, your "
                               f"prompt is {n_prompt} tokens. Please shorten it.", param=param,
                               code="context_length_exceeded") from None
            raise APIError(400, f"This model's maximum context length is {self.context} tokens. However, you requested "
                           f"{n_prompt + e.asked} tokens ({n_prompt} in the prompt, {e.asked} for the completion). "
                           "Please reduce the prompt or the completion length.",
                           param="max_tokens", code="context_length_exceeded") from None

    def make_request(self, ids: list[int], max_tokens: int, params: SamplingParams) -> GenRequest:
        """A plain request (the Azure /score schema's): no seed, stops or grammar; the server's time limit."""
        return GenRequest(prompt=tuple(ids), max_tokens=max_tokens, params=params, timeout_s=self.timeout_s)

    def grammar(self, req):
        """The request's grammar, compiled once here so that a bad one is a 400 naming its field."""
        spec, param = req.grammar_spec
        return self.compiled(spec, param)

    def compiled(self, spec, param: str):
        if spec is not None:
            try:
                self.engine.grammars.compile(spec)
            except UserError as e:
                raise bad_request(str(e), param=param) from None
        return spec

    def openai_requests(self, req, ids: list[int], max_tokens: int, *, logprobs: int | None, grammar,
                        prompt_logprobs: bool = False) -> list[GenRequest]:
        """An OpenAI request's n engine requests for one prompt (choice k samples with seed + k)."""
        if (req.n or 1) > self.engine.max_batch:
            raise bad_request(f"n is at most the server's --max-batch ({self.engine.max_batch}), got {req.n}", param="n")
        vocab = self.gen.model.config.model.vocab_size
        if bad := [t for t, _ in req.bias if t >= vocab]:
            raise bad_request(f"logit_bias token id {bad[0]} is outside the vocabulary [0, {vocab})", param="logit_bias")
        common = dict(params=self.sampling(req), stop=req.stops, logprobs=logprobs, prompt_logprobs=prompt_logprobs,
                      timeout_s=self.timeout_s, cache_prompt=req.cache_prompt, grammar=grammar, logit_bias=req.bias,
                      presence_penalty=req.presence_penalty or 0.0, frequency_penalty=req.frequency_penalty or 0.0)
        seeds = [None if req.seed is None else (req.seed + k) % (MAX_SEED + 1) for k in range(req.n or 1)]
        return [GenRequest(prompt=tuple(ids), max_tokens=max_tokens, seed=s, **common) for s in seeds]

    def sampling(self, req) -> SamplingParams:
        """An OpenAI request's sampling: what it gives, else the model folder's generation_config.json,
        else the route's defaults (runtime/request.py's table: chat Meta's temperature 0.6 and top_p 0.9,
        completions OpenAI's 1 and 1)."""
        api = "chat" if isinstance(req, ChatCompletionRequest) else "openai"
        return sampling(api, folder=self.gen.generation, temperature=req.temperature, top_p=req.top_p,
                        top_k=req.top_k, repetition_penalty=req.repetition_penalty)

    def chat_requests(self, req: ChatCompletionRequest) -> list[GenRequest]:
        """Sampling as self.sampling; without max_tokens, up to the end of the context.
        One engine request per choice (n)."""
        self.check_model(req.model)
        tools = [t.model_dump(exclude_none=True) for t in req.tools or []]  # described even for "none"
        ids = self.chat_ids(req.messages, tools=tools)
        limit = req.limit
        n = self.budget(len(ids), limit, explicit=limit is not None, param="messages")
        grammar = self.grammar(req)
        if tools and req.choice != "none":
            grammar = self.compiled(tools_grammar(tools, req.choice, req.parallel_tool_calls is not False), "tools")
        return self.openai_requests(req, ids, n, logprobs=(req.top_logprobs or 0) if req.logprobs else None,
                                    grammar=grammar)

    def completion_requests(self, req: CompletionRequest) -> list[tuple[str, GenRequest]]:
        """(prompt text, engine request) per choice: each prompt's n choices in turn (OpenAI's order);
        max_tokens 16 unless given (OpenAI's default). A token-id prompt's text is its ids decoded."""
        self.check_model(req.model)
        explicit = "max_tokens" in req.model_fields_set and req.max_tokens is not None
        asked = req.max_tokens if req.max_tokens is not None else 16
        echo_logprobs = bool(req.echo and req.logprobs is not None)
        grammar, out = self.grammar(req), []
        single = len(req.prompts) == 1 and req.prompts[0] is req.prompt
        for i, prompt in enumerate(req.prompts):
            param = "prompt" if single else f"prompt[{i}]"
            if isinstance(prompt, str):
                ids = self.prompt_ids(prompt, param)
            else:
                ids = self.token_prompt(prompt, param)
                prompt = self.tokenizer.decode(ids)
            n = self.budget(len(ids), asked, explicit=explicit, param=param)
            out += [(prompt, r) for r in self.openai_requests(req, ids, n, logprobs=req.logprobs, grammar=grammar,
                                                              prompt_logprobs=echo_logprobs)]
        return out

    def token_prompt(self, ids: list[int], param: str) -> list[int]:
        vocab = self.gen.model.config.model.vocab_size
        if bad := [t for t in ids if not 0 <= t < vocab]:
            raise bad_request(f"token id {bad[0]} is outside the vocabulary [0, {vocab})", param=param)
        return list(ids)

    def lead_space(self, first_token: int | None, text: str) -> str:
        """A completion's text as it continues its prompt. SentencePiece drops the first piece's
        leading space when a completion is decoded alone (as Meta's reference returns it); a
        continuation needs it back ("the meaning of life is" + " to ...")."""
        if first_token is not None and text[:1] not in ("", " ") and self.texts.bytes(first_token).startswith(b" "):
            return " " + text
        return text

    # ---- running --------------------------------------------------------------------------
    def submit(self, requests: Sequence[GenRequest]) -> "RunGroup":
        """Put the requests in the engine (all or none); 503 with Retry-After when its queue is full."""
        return RunGroup(self, requests)

    # ---- tokenizer routes -----------------------------------------------------------------
    def tokenize(self, req: TokenizeRequest) -> dict:
        self.check_model(req.model)
        if req.messages is not None:
            ids = self.chat_ids(req.messages)
        else:
            ids = self.tokenizer.encode(req.prompt, bos=req.add_special_tokens and self.gen.model.config.add_bos, eos=False)
        return {"tokens": ids, "count": len(ids), "max_model_len": self.context}

    def detokenize(self, req: DetokenizeRequest) -> dict:
        self.check_model(req.model)
        vocab = self.tokenizer.vocab_size
        for i, t in enumerate(req.tokens):
            if not 0 <= t < vocab:
                raise bad_request(f"token {t} is outside the vocabulary (0 to {vocab - 1})", param=f"tokens[{i}]")
        return {"prompt": self.tokenizer.decode(req.tokens)}




class RunGroup:
    """Engine requests whose events arrive, tagged with their index, on one asyncio queue."""

    def __init__(self, service: Service, requests: Sequence[GenRequest]):
        self.service, self.requests = service, requests
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.tokens: list[list[TokenEvent]] = [[] for _ in requests]
        self.finished: list[FinishEvent | None] = [None] * len(requests)
        self._last: list[float] = [0.0] * len(requests)
        self.handles = []
        if service.stopping:
            raise APIError(503, "The server is shutting down.", code="shutting_down")
        try:
            for i, req in enumerate(requests):
                self.handles.append(service.engine.submit(req, self._sink(i)))
        except QueueFull:
            self.cancel()
            raise APIError(503, "The server is busy: its request queue is full. Retry shortly.",
                           code="queue_full", retry_after=RETRY_AFTER_S) from None
        except EngineClosed:
            self.cancel()
            raise APIError(503, "The server is shutting down.", code="shutting_down") from None
        except RequestError as e:  # serve checks these first; the engine's word is final
            self.cancel()
            raise bad_request(str(e)) from None
        service.groups.add(self)

    def _sink(self, index: int):
        def on_event(event) -> None:  # on the scheduler thread
            try:
                self.loop.call_soon_threadsafe(self.queue.put_nowait, (index, event))
            except RuntimeError:  # the loop is closed: nobody is listening any more
                pass
        return on_event

    def cancel(self) -> None:
        for i, handle in enumerate(self.handles):
            if self.finished[i] is None:
                handle.cancel()

    def end(self, reason: str) -> None:
        """Finish every unfinished request now with reason, and cancel its engine row."""
        for i, fin in enumerate(self.finished):
            if fin is None:
                self.handles[i].cancel()
                done = len(self.tokens[i])
                self.queue.put_nowait((i, FinishEvent(reason=reason, text="", prompt_tokens=len(self.requests[i].prompt),
                                                      completion_tokens=done, prompt_logprobs=None)))

    def first_token(self, index: int) -> int | None:
        """Request index's first generated token (lead_space needs it); None before it comes."""
        return self.tokens[index][0].token if self.tokens[index] else None

    @property
    def done(self) -> bool:
        return all(f is not None for f in self.finished)

    async def events(self) -> AsyncIterator[tuple[int, TokenEvent | FinishEvent]]:
        """(index, event) until every request has finished; leaving early cancels the rest."""
        metrics = self.service.metrics
        try:
            while not self.done:
                index, event = await self.queue.get()
                now = time.perf_counter()
                if self.finished[index] is not None:
                    continue  # the engine's own finish after end(), or end()'s after the engine's
                if isinstance(event, FinishEvent):
                    self.finished[index] = event
                    metrics.finish(event.reason, event.prompt_tokens, event.completion_tokens, event.ttft_s,
                                   event.cached_tokens)
                else:
                    if self.tokens[index]:
                        metrics.token_latency.observe(now - self._last[index])
                    self._last[index] = now
                    self.tokens[index].append(event)
                yield index, event
        finally:
            self.cancel()

    async def wait(self) -> list[FinishEvent]:
        async for _ in self.events():
            pass
        return list(self.finished)


def check_finish(event: FinishEvent, timeout_s: float | None) -> None:
    """A finish that is an error for the client: 504 past the time limit, 500 on an engine error."""
    if event.reason == SHUTDOWN:
        raise APIError(503, "the server is shutting down; this request was ended before it finished", code="shutting_down")
    if event.reason == "timeout":
        raise APIError(504, f"the request ran past the server's time limit of {timeout_s} s", code="timeout")
    if event.reason == "error":
        raise APIError(500, f"generation failed: {event.error or 'unknown error'}", code="engine_error")

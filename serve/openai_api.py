"""The OpenAI routes' work, framework-free: validated request -> response body or chunk stream.

    body = await chat_completion(service, req)          # the chat.completion object
    group, chunks = await chat_chunks(service, req)     # submits now (errors raise here), then
    async for chunk in chunks: ...                      # chat.completion.chunk dicts

Requests are tokenized off the event loop (Service.off_loop).

Shapes follow the OpenAI API: chat logprobs are choices[].logprobs.content[] entries
{token, logprob, bytes, top_logprobs}; completion logprobs are the legacy {tokens,
token_logprobs, top_logprobs (dicts), text_offset}, with text_offset counted in the returned
text. echo puts the prompt (its tokens' logprobs and top alternatives, the first null) before
the completion.
A stream that fails after it started (time limit, engine error) ends with an {"error": ...}
chunk, as vLLM does, since its status line has already been sent.
"""

from __future__ import annotations

import math
import time
import uuid
from typing import AsyncIterator

from llama2_onnx.runtime.engine import FinishEvent, TokenEvent
from .errors import APIError, bad_request
from .schemas import ChatCompletionRequest, CompletionRequest
from .service import RunGroup, Service, check_finish
from .tokens import TokenTexts
from .tools import may_be_call, parse_calls

FLOOR = -9999.0  # a logprob of -inf, as OpenAI writes it (JSON has no infinity)


def _lp(x: float | None) -> float | None:
    return None if x is None else (float(x) if math.isfinite(x) else FLOOR)


def _stream_error(event: FinishEvent, timeout_s: float | None) -> dict | None:
    """The {"error": ...} chunk that ends a stream whose request failed after it started, else None."""
    try:
        check_finish(event, timeout_s)
    except APIError as e:
        return e.body()
    return None


def _usage(finished: list[FinishEvent], n: int = 1) -> dict:
    """Each prompt counted once, as OpenAI counts it, with the first choice's cached tokens (its n
    choices share one prompt; with the prefix cache on, the others copy the first's cache)."""
    p = sum(f.prompt_tokens for f in finished[::n])
    c = sum(f.completion_tokens for f in finished)
    cached = sum(f.cached_tokens for f in finished[::n])
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c,
            "prompt_tokens_details": {"cached_tokens": cached}}


# ---- logprobs shapes ------------------------------------------------------------------------


def chat_logprob(texts: TokenTexts, event: TokenEvent) -> dict:
    def entry(token: int, lp: float | None) -> dict:
        return {"token": texts.text(token), "logprob": _lp(lp), "bytes": list(texts.bytes(token))}
    return {**entry(event.token, event.logprob), "top_logprobs": [entry(t, lp) for t, lp in event.top_logprobs or []]}


def legacy_logprobs(texts: TokenTexts, tokens: list[TokenEvent], *, start: int = 0, after: int | None = None,
                    prompt: tuple[int, ...] = (), prompt_logprobs: list[float | None] | None = None,
                    prompt_top: list[list[tuple[int, float]] | None] | None = None) -> dict:
    """The completions shape. start: where the completion begins in the returned text; after: the
    prompt's last token, which the completion's text continues (its offsets count the leading space
    the returned text keeps); with prompt/prompt_logprobs/prompt_top (echo) the prompt's tokens
    come first, from offset 0, each with its top alternatives as the completion's tokens have them
    (the first: null)."""
    def top(alternatives, token: int, lp: float | None) -> dict:
        d = {texts.text(t): _lp(x) for t, x in alternatives or []}
        d.setdefault(texts.text(token), _lp(lp))
        return d

    ids = list(prompt) + [t.token for t in tokens]
    offsets = texts.offsets(list(prompt)) + texts.offsets([t.token for t in tokens], start, after)
    tops: list[dict | None] = []
    alternatives = prompt_top or [None] * len(prompt)
    for i, (tok, lp) in enumerate(zip(prompt, prompt_logprobs or [None] * len(prompt))):
        tops.append(None if i == 0 or lp is None else top(alternatives[i], tok, lp))
    tops += [top(t.top_logprobs, t.token, t.logprob) for t in tokens]
    lps = [_lp(x) for x in (prompt_logprobs or [None] * len(prompt))] + [_lp(t.logprob) for t in tokens]
    return {"tokens": [texts.text(i) for i in ids], "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


# ---- chat -------------------------------------------------------------------------------------


def _head(kind: str, service: Service) -> dict:
    prefix = "chatcmpl" if kind.startswith("chat") else "cmpl"
    return {"id": f"{prefix}-{uuid.uuid4().hex}", "object": kind, "created": int(time.time()), "model": service.model_id,
            "system_fingerprint": None}


async def chat_completion(service: Service, req: ChatCompletionRequest) -> dict:
    group = service.submit(await service.off_loop(lambda: service.chat_requests(req)))
    finished = await group.wait()
    choices = []
    calling = bool(req.tools) and req.choice != "none"
    for i, fin in enumerate(finished):
        check_finish(fin, service.timeout_s)
        logprobs = {"content": [chat_logprob(service.texts, t) for t in group.tokens[i]]} if req.logprobs else None
        message, reason = {"role": "assistant", "content": fin.text}, fin.reason
        if calling and (parsed := parse_calls(fin.text))[1]:
            message = {"role": "assistant", "content": parsed[0], "tool_calls": parsed[1]}
            reason = "tool_calls" if reason == "stop" else reason
        choices.append({"index": i, "message": message, "logprobs": logprobs, "finish_reason": reason})
    return {**_head("chat.completion", service), "choices": choices, "usage": _usage(finished, req.n or 1)}


async def chat_chunks(service: Service, req: ChatCompletionRequest) -> tuple[RunGroup, AsyncIterator[dict]]:
    """Submit now (so bad requests and a full queue fail before the stream starts); the chunks after."""
    group = service.submit(await service.off_loop(lambda: service.chat_requests(req)))
    return group, _chat_stream(service, req, group)


async def _chat_stream(service: Service, req: ChatCompletionRequest, group: RunGroup) -> AsyncIterator[dict]:
    head = _head("chat.completion.chunk", service)
    usage = bool(req.stream_options and req.stream_options.include_usage)

    def chunk(i: int, delta: dict, finish: str | None = None, logprobs: dict | None = None) -> dict:
        c = {**head, "choices": [{"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]}
        return {**c, "usage": None} if usage else c

    calling = bool(req.tools) and req.choice != "none"
    held = [""] * len(group.requests)  # with tools: text that may still be the start of a call
    held_lp: list[list] = [[] for _ in group.requests]  # and its tokens' logprobs, sent with it

    def release_lp(i: int) -> dict | None:
        entries, held_lp[i] = held_lp[i], []
        return {"content": entries} if req.logprobs else None
    for i in range(len(group.requests)):
        yield chunk(i, {"role": "assistant", "content": ""})
    async for i, event in group.events():
        if isinstance(event, TokenEvent):
            lp = {"content": [chat_logprob(service.texts, event)]} if req.logprobs else None
            text = event.text
            if calling and held[i] is not None:
                held[i] += text
                if lp:
                    held_lp[i] += lp["content"]
                if may_be_call(held[i]):
                    continue
                text, held[i] = held[i], None  # a plain answer: what was held goes out, and the rest as it comes
                lp = release_lp(i)
            if text or lp:
                yield chunk(i, {"content": text}, logprobs=lp)
            continue
        if event.reason == "cancelled":
            return
        if (error := _stream_error(event, service.timeout_s)) is not None:
            yield error
            group.cancel()  # the other choices' rows
            return
        reason = event.reason
        if calling and held[i] is not None:  # the answer was held back as a possible call
            content, calls = parse_calls(held[i] + event.tail)
            if calls:
                if content:
                    yield chunk(i, {"content": content}, logprobs=release_lp(i))
                for k, call in enumerate(calls):  # as OpenAI streams a call: id and name, then the arguments
                    fn = call["function"]
                    yield chunk(i, {"tool_calls": [{"index": k, "id": call["id"], "type": "function",
                                                    "function": {"name": fn["name"], "arguments": ""}}]},
                                logprobs=release_lp(i) if k == 0 else None)
                    yield chunk(i, {"tool_calls": [{"index": k, "function": {"arguments": fn["arguments"]}}]})
                reason = "tool_calls" if reason == "stop" else reason
            elif content or held_lp[i]:
                yield chunk(i, {"content": content}, logprobs=release_lp(i))
        elif event.tail:
            yield chunk(i, {"content": event.tail})
        yield chunk(i, {}, finish=reason)
    if usage:
        yield {**head, "choices": [], "usage": _usage(group.finished, req.n or 1)}


# ---- completions --------------------------------------------------------------------------------


async def _completion_setup(service: Service, req: CompletionRequest):
    if req.echo and req.stream and req.logprobs is not None:
        raise bad_request("echo with logprobs is not supported when streaming", param="echo")
    prepared = await service.off_loop(lambda: service.completion_requests(req))
    requests = [r for _, r in prepared]
    return [p for p, _ in prepared], service.submit(requests), requests


async def completion(service: Service, req: CompletionRequest) -> dict:
    prompts, group, requests = await _completion_setup(service, req)
    finished = await group.wait()
    choices = []
    for i, (prompt, fin, gen_req) in enumerate(zip(prompts, finished, requests)):
        check_finish(fin, service.timeout_s)
        text = service.lead_space(group.first_token(i), fin.text)
        text = prompt + text if req.echo else text
        logprobs = None
        if req.logprobs is not None:
            if req.echo:
                logprobs = legacy_logprobs(service.texts, group.tokens[i], start=len(prompt), after=gen_req.prompt[-1],
                                           prompt=gen_req.prompt, prompt_logprobs=fin.prompt_logprobs,
                                           prompt_top=fin.prompt_top_logprobs)
            else:
                logprobs = legacy_logprobs(service.texts, group.tokens[i], after=gen_req.prompt[-1])
        choices.append({"index": i, "text": text, "logprobs": logprobs, "finish_reason": fin.reason})
    return {**_head("text_completion", service), "choices": choices, "usage": _usage(finished, req.n or 1)}


async def completion_chunks(service: Service, req: CompletionRequest) -> tuple[RunGroup, AsyncIterator[dict]]:
    prompts, group, _ = await _completion_setup(service, req)
    return group, _completion_stream(service, req, prompts, group)


async def _completion_stream(service: Service, req: CompletionRequest, prompts: list[str],
                             group: RunGroup) -> AsyncIterator[dict]:
    head = _head("text_completion", service)
    usage = bool(req.stream_options and req.stream_options.include_usage)

    def chunk(index: int, text: str, finish: str | None = None, logprobs: dict | None = None) -> dict:
        c = {**head, "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}]}
        return {**c, "usage": None} if usage else c

    if req.echo:
        for i, prompt in enumerate(prompts):
            yield chunk(i, prompt)
    streamed = [""] * len(prompts)
    offsets = [len(p) if req.echo else 0 for p in prompts]
    async for i, event in group.events():
        if isinstance(event, TokenEvent):
            lp = None
            if req.logprobs is not None:
                lp = legacy_logprobs(service.texts, [event], start=offsets[i])
            if event.text or lp:
                text = event.text if streamed[i] else service.lead_space(group.first_token(i), event.text)
                streamed[i] += event.text
                offsets[i] += len(text)
                yield chunk(i, text, logprobs=lp)
            continue
        if event.reason == "cancelled":
            return
        if (error := _stream_error(event, service.timeout_s)) is not None:
            yield error
            group.cancel()  # the other prompts' rows
            return
        tail = event.tail if streamed[i] else service.lead_space(group.first_token(i), event.tail)
        yield chunk(i, tail, finish=event.reason)
    if usage:
        yield {**head, "choices": [], "usage": _usage(group.finished, req.n or 1)}

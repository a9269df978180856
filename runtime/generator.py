"""Generator: tokenizer + chat format over the engine (runtime/engine.py): generate, stream, chat.

    gen = Generator.from_dir(folder)                   # its engine: max_batch rows of KV cache
    gen.generate("The capital of France is", max_new_tokens=16).text
    for piece in gen.stream_chat([{"role": "user", "content": "Hi!"}]): print(piece, end="")

Every call submits its prompts as sequences to the Generator's one engine, the same engine the
server drives: calls from several threads are decoded together in one batch (each still gets
exactly what it would get alone: the engine's rows are bit-exact), a batch of prompts is
max_batch rows at a time, and stop tokens, stop strings, limits and finish reasons ("stop",
"length", "cancelled") follow runtime/sequence.py's rules. A stream is pulled: the engine decodes
one token ahead of what the caller has read, so a paused reader costs one token at most (one
speculative round, with speculative=), and
`stream.cancel()` from any thread ends it before its next step. A finished call's rows keep their
KV cache (runtime/prefix_cache.py): the next turn of a chat, which repeats the dialog so far, reads
only its new message, so `stream_chat` turn after turn answers as fast at the tenth turn as at the first.
"""

from __future__ import annotations

import queue
import threading
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from llama2_onnx.errors import UserError

from .chat_format import CHAT_FORMATS, Dialog, format_dialog
from .engine import ERROR, Engine, FinishEvent, GenRequest, Handle, TokenEvent
from .generation_config import GenerationConfig
from .grammar import grammar_of
from .prefix_cache import HOST_GB
from .sampler import MAX_SEED, SamplingParams, make_rng
from .request import sampling, token_budget
from .sequence import LENGTH, stop_strings
from .session import LOAD_STAGES, Model
from .speculate import DRAFT_TOKENS, Speculator, make_speculator
from .tokenizer import Tokenizer, load_tokenizer

# rows of KV cache a Generator's engine keeps (calls and prompts decoded together): on the CPU rows
# cost memory only as tokens fill them; on a GPU each is allocated whole, for the whole context
MAX_BATCH = {"cpu": 4}
OTHER_MAX_BATCH = 1


@dataclass
class Timings:
    prompt_ms: float = 0.0  # prompt pass + first token: the time to first token
    token_ms: list[float] = field(default_factory=list)  # each later token

    @property
    def per_token_ms(self) -> float:
        return float(np.median(self.token_ms)) if self.token_ms else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        total = sum(self.token_ms)
        return len(self.token_ms) / total * 1000 if total else 0.0

    def to_dict(self) -> dict:
        return {"prompt_ms": round(self.prompt_ms, 3), "per_token_ms": round(self.per_token_ms, 3),
                "decode_tokens_per_s": round(self.decode_tokens_per_s, 2), "new_tokens": len(self.token_ms) + 1}


@dataclass
class GenerationResult:
    text: str
    tokens: list[int]
    finish_reason: str
    prompt_tokens: int
    timings: Timings
    logprobs: list[float] | None = None  # with logprobs=True: one per token, log-softmax of the raw logits
    prompt_logprobs: list[float] | None = None  # with prompt_logprobs=True: one per prompt token, the first 0.0
    cached_tokens: int = 0  # prompt tokens whose KV cache was reused from an earlier call, not computed
    stop_token: int | None = None  # the stop token that ended it (not in tokens), if one did

    def to_dict(self) -> dict:
        d = {"text": self.text, "tokens": self.tokens, "finish_reason": self.finish_reason,
             "prompt_tokens": self.prompt_tokens, "timings": self.timings.to_dict()}
        if self.logprobs is not None:
            d["logprobs"] = self.logprobs
        if self.prompt_logprobs is not None:
            d["prompt_logprobs"] = self.prompt_logprobs
        return d


class TextStream:
    """Iterate for text pieces as they are produced; `result` holds the GenerationResult after.

    cancel() may be called from any thread: the engine decodes no further token for it and the
    result's finish_reason is "cancelled" (the text so far is kept, and still comes out of the
    iteration)."""

    def __init__(self, pieces: Iterator[str], results: list, cancel: Callable[[], None]):
        self._pieces, self._results, self._cancel = pieces, results, cancel
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        self._cancelled.set()
        self._cancel()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def __iter__(self) -> Iterator[str]:
        yield from self._pieces

    @property
    def result(self) -> GenerationResult:
        if not self._results:
            raise RuntimeError("the stream has not finished yet")
        return self._results[0]


class _Run:
    """One call's sequences in the engine: their events on one queue, read by the calling thread."""

    def __init__(self, engine: Engine, requests: list[GenRequest], pulled: bool):
        self.events: queue.Queue = queue.Queue()
        self.start = time.perf_counter()
        self.handles: list[Handle] = []
        try:
            for i, req in enumerate(requests):
                self.handles.append(engine.submit(req, lambda e, i=i: self.events.put((i, e)), credit=1 if pulled else None))
        except Exception:
            self.cancel()
            raise

    def cancel(self) -> None:
        for h in self.handles:
            h.cancel()

    def __iter__(self) -> Iterator[tuple[int, TokenEvent | FinishEvent, float]]:
        """(row, event, seconds since the call began) until every row has finished."""
        left = len(self.handles)
        try:
            while left:
                i, event = self.events.get()
                left -= isinstance(event, FinishEvent)
                yield i, event, time.perf_counter() - self.start
        finally:
            self.cancel()  # left early: nothing keeps running


class Generator:
    def __init__(self, model: Model, tokenizer: Tokenizer, max_batch: int | None = None, context: int | None = None,
                 prefix_cache: bool = True, prefix_cache_gb: float = HOST_GB, speculator: Speculator | None = None):
        self.model, self.tokenizer = model, tokenizer
        cfg = model.config
        self.args = cfg.model
        self.chat_style = cfg.chat_format
        self.pad_id = self.args.fill_id
        # the checkpoint's sampling defaults (runtime/generation_config.py); arguments given always win
        folder = getattr(model, "folder", None)
        self.generation = GenerationConfig.read(folder) if folder is not None else GenerationConfig()
        # one engine for every call; its thread starts with the first
        rows = max_batch or MAX_BATCH.get(model.provider.name, OTHER_MAX_BATCH)
        self.engine = Engine(model, tokenizer, self.stop_ids(), max_batch=rows, max_queue=1 << 30, context=context,
                             prefix_cache=prefix_cache, prefix_cache_gb=prefix_cache_gb, speculator=speculator)
        weakref.finalize(self, self.engine.close)  # a dropped Generator stops its engine's thread

    @classmethod
    def from_dir(cls, path: str | Path, progress=None, max_batch: int | None = None, context: int | None = None,
                 prefix_cache: bool = True, prefix_cache_gb: float = HOST_GB, speculative: str | None = None,
                 draft_tokens: int = DRAFT_TOKENS, **model_kwargs) -> "Generator":
        """Open a model folder: Model.from_dir(path, progress=progress, **model_kwargs) plus its tokenizer.

        progress(stage, done, total), if given, is called as each of session.LOAD_STAGES begins
        (done = stages finished) and once more as ("ready", total, total). max_batch: the engine's rows
        (default 4 on the CPU, 1 on a GPU); context: the tokens a row holds, prompt and answer (default
        and cap: the model's); prefix_cache: a prompt that begins as an earlier one (the next turn of a
        chat) reads only what is new, with prefix_cache_gb of host memory for prefixes that lose their
        row (runtime/prefix_cache.py); speculative: "ngram" or a draft model folder, draft_tokens guesses a
        round at most: one stream's tokens faster with the same output (runtime/speculate.py)."""
        model = Model.from_dir(path, progress=progress, **model_kwargs)
        if not model.config.tokenizer:
            raise UserError(f"{path} has no tokenizer; export it again with --tokenizer PATH")
        if progress:
            progress("tokenizer", 2, len(LOAD_STAGES))
        tok = load_tokenizer(model.folder, bos_id=model.config.model.bos_id, eos_id=model.config.model.eos_id)
        if progress:
            progress("ready", len(LOAD_STAGES), len(LOAD_STAGES))
        spec_kwargs = {k: v for k, v in model_kwargs.items() if k in ("provider", "threads", "device_id", "io_binding")}
        speculator = make_speculator(speculative, model, min(context or model.config.model.max_seq_len,
                                                             model.config.model.max_seq_len), draft_tokens, **spec_kwargs)
        return cls(model, tok, max_batch=max_batch, context=context, prefix_cache=prefix_cache,
                   prefix_cache_gb=prefix_cache_gb, speculator=speculator)

    def stop_ids(self) -> set[int]:
        """The tokens that end a generation: EOS (and the checkpoint's other end ids) + the chat format's."""
        ids = set(self.args.eos_ids)
        if self.chat_style in CHAT_FORMATS:
            ids |= set(CHAT_FORMATS[self.chat_style].stop_ids(self.tokenizer))
        return ids

    def close(self) -> None:
        """Stop the engine's thread (calls still running end "cancelled")."""
        self.engine.close()

    # ---- public API --------------------------------------------------------------
    def encode_prompt(self, prompt: str) -> list[int]:
        if not prompt.strip():
            raise UserError("the prompt is empty; give some text to continue")
        return self.tokenizer.encode(prompt, bos=self.model.config.add_bos, eos=False)

    def generate(self, prompts: str | Sequence[str], max_new_tokens: int = 256, temperature: float | None = None,
                 top_p: float | None = None, top_k: int | None = None, repetition_penalty: float | None = None,
                 seed: int | None = None, stop: str | Sequence[str] = (), logprobs: bool = False,
                 prompt_logprobs: bool = False, response_format=None) -> GenerationResult | list[GenerationResult]:
        """Continue one prompt (returns a result) or a batch (returns a list; row i samples with seed + i).

        Sampling left out (None) is the model folder's generation_config.json (sampled where it says
        do_sample, as transformers reads it), else greedy (runtime/request.py).

        logprobs: each result carries its tokens' logprobs (log-softmax of the raw logits, before
        temperature, top-k, top-p and the penalty); prompt_logprobs: its prompt's as well (each
        token given those before it; the first, with nothing before it, 0.0 as in Meta's echo).
        response_format: the output keeps to a grammar (runtime/grammar.py): a Grammar, or OpenAI's
        {"type": "json_object"} / {"type": "json_schema", "json_schema": {"schema": {...}}}."""
        single = isinstance(prompts, str)
        ids = [self.encode_prompt(p) for p in ([prompts] if single else prompts)]
        params = sampling("generator", folder=self.generation, temperature=temperature, top_p=top_p, top_k=top_k,
                          repetition_penalty=repetition_penalty)
        results = self.generate_ids(ids, max_new_tokens, params, seed, stop, logprobs, prompt_logprobs,
                                    response_format=response_format)
        return results[0] if single else results

    def stream(self, prompt: str, **kwargs) -> TextStream:
        """Like generate for one prompt, but yields text as it is produced."""
        return self.stream_ids(self.encode_prompt(prompt), **kwargs)

    def stream_ids(self, prompt_ids: Sequence[int], max_new_tokens: int = 256, temperature: float | None = None,
                   top_p: float | None = None, top_k: int | None = None, repetition_penalty: float | None = None,
                   seed: int | None = None,
                   stop: str | Sequence[str] = (), logprobs: bool = False, prompt_logprobs: bool = False,
                   response_format=None) -> TextStream:
        """stream() for a prompt already encoded (BOS or chat format applied)."""
        params = sampling("generator", folder=self.generation, temperature=temperature, top_p=top_p, top_k=top_k,
                          repetition_penalty=repetition_penalty)
        requests = self._requests([list(prompt_ids)], max_new_tokens, params, seed, stop, logprobs, prompt_logprobs,
                                  response_format)
        results: list[GenerationResult] = []
        runs: list[_Run] = []  # submitted on the first next(): a stream never iterated holds no row

        def cancel() -> None:
            for run in runs:
                run.cancel()

        def pieces() -> Iterator[str]:
            self.engine.start()
            runs.append(_Run(self.engine, requests, pulled=True))  # one row, max_new_tokens >= 1: never None
            yield from self._pieces(runs[0], requests, results)

        stream = TextStream(pieces(), results, cancel)
        weakref.finalize(stream, cancel)  # dropped half-read: its row is freed
        return stream

    def chat(self, dialog: Dialog, **kwargs) -> GenerationResult:
        """Answer the dialog's last user message (kwargs as generate)."""
        stream = self.stream_chat(dialog, **kwargs)
        for _ in stream:
            pass
        return stream.result

    def stream_chat(self, dialog: Dialog, **kwargs) -> TextStream:
        return self.stream_ids(self.chat_ids(dialog), **kwargs)

    def chat_ids(self, dialog: Dialog) -> list[int]:
        if not self.chat_style:
            raise UserError("this model folder names no chat format; export it again with --chat-format llama2 or chatml")
        return format_dialog(dialog, self.tokenizer, self.chat_style)

    def generate_ids(self, prompts: list[list[int]], max_new_tokens: int | Sequence[int], params: SamplingParams,
                     seed: int | None = None, stop: str | Sequence[str] = (), logprobs: bool = False,
                     prompt_logprobs: bool = False, response_format=None,
                     stop_ids: Sequence[int] | None = None) -> list[GenerationResult]:
        """Generate from token-id prompts; one result per prompt (row i samples with seed + i).
        stop_ids: the tokens that end a row (default: stop_ids(), EOS and the chat format's).

        max_new_tokens: one limit for all rows, or one per row (0 allowed: that row's prompt is
        only scored); each row is also capped by the context its own prompt leaves."""
        requests = self._requests(prompts, max_new_tokens, params, seed, stop, logprobs, prompt_logprobs,
                                  response_format, stop_ids)
        results: list[GenerationResult | None] = [None] * len(prompts)
        submit = [r for r in requests if r is not None]
        if submit:
            self.engine.start()
            for row, result in self._collect(_Run(self.engine, submit, pulled=False), logprobs).items():
                results[[i for i, r in enumerate(requests) if r is not None][row]] = result
        for i, req in enumerate(requests):
            if req is None:  # nothing to generate and nothing to score
                results[i] = GenerationResult("", [], LENGTH, len(prompts[i]), Timings(), [] if logprobs else None)
        return results

    # ---- requests and their events ---------------------------------------------------------
    def _requests(self, prompts, max_new_tokens, params: SamplingParams, seed, stop, logprobs: bool,
                  prompt_logprobs: bool, response_format=None, stop_ids=None) -> list[GenRequest | None]:
        """One engine request per prompt (None: a row with nothing to do), every limit checked here."""
        if not prompts or any(not p for p in prompts):
            raise UserError("the prompt is empty; give some text to continue")
        stops = tuple(stop_strings(stop))
        grammar = grammar_of(response_format)
        if grammar is not None:
            self.engine.grammars.compile(grammar)  # a bad grammar is one line before anything runs
        make_rng(seed)  # a bad seed is one line before anything runs
        budgets = self._budgets(prompts, max_new_tokens, prompt_logprobs)
        out = []
        for i, (p, b) in enumerate(zip(prompts, budgets)):
            row_seed = None if seed is None else (int(seed) + i) % (MAX_SEED + 1)
            if b == 0 and not prompt_logprobs:
                out.append(None)
                continue
            out.append(GenRequest(tuple(int(t) for t in p), b, params, seed=row_seed, stop=stops, grammar=grammar,
                                  logprobs=0 if logprobs else None, prompt_logprobs=prompt_logprobs,
                                  stop_ids=None if stop_ids is None else tuple(int(t) for t in stop_ids)))
        return out

    def _budgets(self, prompts: list[list[int]], max_new_tokens: int | Sequence[int], scoring: bool) -> list[int]:
        """Each row's token limit: its max_new_tokens, capped by the context its prompt leaves."""
        ctx = self.engine.context
        if isinstance(max_new_tokens, (int, np.integer)):
            least = 0 if scoring else 1  # 0 new tokens only makes sense when the prompt is scored
            if max_new_tokens < least:
                raise UserError(f"max_new_tokens must be at least {least}, got {max_new_tokens}")
            max_new_tokens = [int(max_new_tokens)] * len(prompts)
        limits = list(max_new_tokens)
        if len(limits) != len(prompts) or min(limits, default=0) < 0:
            raise ValueError(f"max_new_tokens needs one limit >= 0 per prompt, got {limits}")
        return [token_budget(len(p), m, ctx) for p, m in zip(prompts, limits)]

    def _collect(self, run: _Run, logprobs: bool) -> dict[int, GenerationResult]:
        timings: dict[int, Timings] = {}
        last: dict[int, float] = {}
        out = {}
        for i, event, at in run:
            if isinstance(event, TokenEvent):
                _time(timings.setdefault(i, Timings()), last, i, at)
                continue
            if i not in last:  # ended at its first token (a stop token): that was its time to first token
                _time(timings.setdefault(i, Timings()), last, i, at)
            out[i] = _result(event, timings[i], logprobs)
        return out

    def _pieces(self, run: _Run, requests: list, results: list) -> Iterator[str]:
        """The stream's text pieces; each later token is decoded only once the caller asks for it."""
        timings, last = Timings(), {}
        for _, event, at in run:
            if isinstance(event, TokenEvent):
                _time(timings, last, 0, at)
                if event.text:
                    yield event.text
                run.handles[0].grant()  # the caller wants the next piece: one more token
                continue
            if not last:  # ended at its first token (a stop token): that was its time to first token
                _time(timings, last, 0, at)
            if event.tail:
                yield event.tail
            results.append(_result(event, timings, requests[0].logprobs is not None))


def _time(timings: Timings, last: dict, i: int, at: float) -> None:
    if i not in last:
        timings.prompt_ms = at * 1000
    else:
        timings.token_ms.append((at - last[i]) * 1000)
    last[i] = at


def _result(fin: FinishEvent, timings: Timings, logprobs: bool) -> GenerationResult:
    if fin.reason == ERROR:
        raise UserError(f"generation failed: {fin.error}")
    prompt_lp = None
    if fin.prompt_logprobs is not None:  # the first token has nothing before it: 0.0, as Meta's echo
        prompt_lp = [0.0 if x is None else x for x in fin.prompt_logprobs]
    return GenerationResult(fin.text, list(fin.tokens), fin.reason, fin.prompt_tokens, timings,
                            list(fin.logprobs) if logprobs else None, prompt_lp, fin.cached_tokens, fin.stop_token)

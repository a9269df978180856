"""Generator: tokenizer + chat format + sampler + stop rules over a Model, batched and streaming.

Threads: one Generator may be shared. Each call keeps its own state (cache, rows, random
generator); the model runs one step at a time under the Generator's lock, so calls from several
threads interleave step by step and each gets what it would get alone. A stream can be cancelled
from any thread (`stream.cancel()`): its loop stops before the next step, finish reason "cancelled".
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from llama2_onnx.errors import UserError

from .chat_format import CHAT_FORMATS, Dialog, format_dialog
from .logprobs import prompt_logprobs as score_prompt, token_logprobs
from .sampler import SamplingParams, make_rng, sample
from .session import LOAD_STAGES, Model
from .tokenizer import StreamDecoder, Tokenizer, load_tokenizer

FINISH_EOS, FINISH_LENGTH, FINISH_STOP, FINISH_CANCELLED = "eos", "length", "stop", "cancelled"


def stop_strings(stop: str | Sequence[str] | None) -> list[str]:
    """The stop strings as a list: one string is one stop string (not its characters); each non-empty."""
    stops = [stop] if isinstance(stop, str) else list(stop or ())
    for s in stops:
        if not isinstance(s, str) or not s:
            raise UserError(f"stop strings must be non-empty strings, got {s!r}")
    return stops


def split_at_stop(pending: str, stop: Sequence[str]) -> tuple[str, str, bool]:
    """Decoded text not yet released -> (text to release now, text held back, whether a stop string
    was hit): cut before the first stop string, else hold back a tail that may yet become one."""
    hits = [h for h in (pending.find(s) for s in stop) if h >= 0]
    if hits:
        return pending[:min(hits)], "", True
    keep = max((k for s in stop for k in range(1, len(s)) if pending.endswith(s[:k])), default=0)
    cut = len(pending) - keep
    return pending[:cut], pending[cut:], False


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

    def to_dict(self) -> dict:
        d = {"text": self.text, "tokens": self.tokens, "finish_reason": self.finish_reason,
             "prompt_tokens": self.prompt_tokens, "timings": self.timings.to_dict()}
        if self.logprobs is not None:
            d["logprobs"] = self.logprobs
        if self.prompt_logprobs is not None:
            d["prompt_logprobs"] = self.prompt_logprobs
        return d


@dataclass
class _Row:
    prompt: list[int]
    decoder: StreamDecoder
    tokens: list[int] = field(default_factory=list)
    text: str = ""  # emitted so far
    pending: str = ""  # decoded but held back: it may be the start of a stop string
    finish: str | None = None
    logprobs: list[float] = field(default_factory=list)  # per token in `tokens` (when asked for)
    prompt_logprobs: list[float] | None = None


class TextStream:
    """Iterate for text pieces as they are produced; `result` holds the GenerationResult after.

    cancel() may be called from any thread: the loop stops before its next model step and the
    result's finish_reason is "cancelled" (the text so far is kept)."""

    def __init__(self, pieces: Iterator[str], results: list, cancelled: threading.Event | None = None):
        self._pieces, self._results = pieces, results
        self._cancelled = cancelled or threading.Event()

    def cancel(self) -> None:
        self._cancelled.set()

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


class Generator:
    def __init__(self, model: Model, tokenizer: Tokenizer):
        self.model, self.tokenizer = model, tokenizer
        cfg = model.config
        self.args = cfg.model
        self.chat_style = cfg.chat_format
        self.pad_id = self.args.fill_id
        self._lock = threading.Lock()  # one model step at a time (see the module docstring)

    @classmethod
    def from_dir(cls, path: str | Path, progress=None, **model_kwargs) -> "Generator":
        """Open a model folder: Model.from_dir(path, progress=progress, **model_kwargs) plus its tokenizer.

        progress(stage, done, total), if given, is called as each of session.LOAD_STAGES begins
        (done = stages finished) and once more as ("ready", total, total)."""
        model = Model.from_dir(path, progress=progress, **model_kwargs)
        if not model.config.tokenizer:
            raise UserError(f"{path} has no tokenizer; export it again with --tokenizer PATH")
        if progress:
            progress("tokenizer", 2, len(LOAD_STAGES))
        tok = load_tokenizer(model.folder, bos_id=model.config.model.bos_id, eos_id=model.config.model.eos_id)
        if progress:
            progress("ready", len(LOAD_STAGES), len(LOAD_STAGES))
        return cls(model, tok)

    def stop_ids(self) -> set[int]:
        """The tokens that end a generation: EOS (and the checkpoint's other end ids) + the chat format's."""
        ids = set(self.args.eos_ids)
        if self.chat_style in CHAT_FORMATS:
            ids |= set(CHAT_FORMATS[self.chat_style].stop_ids(self.tokenizer))
        return ids

    # ---- public API --------------------------------------------------------------
    def encode_prompt(self, prompt: str) -> list[int]:
        if not prompt.strip():
            raise UserError("the prompt is empty; give some text to continue")
        return self.tokenizer.encode(prompt, bos=self.model.config.add_bos, eos=False)

    def generate(self, prompts: str | Sequence[str], max_new_tokens: int = 256, temperature: float = 0.0,
                 top_p: float = 1.0, top_k: int = 0, repetition_penalty: float = 1.0, seed: int | None = None,
                 stop: str | Sequence[str] = (), logprobs: bool = False,
                 prompt_logprobs: bool = False) -> GenerationResult | list[GenerationResult]:
        """Continue one prompt (returns a result) or a batch (returns a list, left-padded together).

        logprobs: each result carries its tokens' logprobs (log-softmax of the raw logits, before
        temperature, top-k, top-p and the penalty); prompt_logprobs: its prompt's as well (each
        token given those before it; the first, with nothing before it, 0.0 as in Meta's echo)."""
        single = isinstance(prompts, str)
        ids = [self.encode_prompt(p) for p in ([prompts] if single else prompts)]
        params = SamplingParams(temperature, top_p, top_k, repetition_penalty)
        results = self.generate_ids(ids, max_new_tokens, params, seed, stop, logprobs, prompt_logprobs)
        return results[0] if single else results

    def stream(self, prompt: str, **kwargs) -> TextStream:
        """Like generate for one prompt, but yields text as it is produced."""
        return self.stream_ids(self.encode_prompt(prompt), **kwargs)

    def stream_ids(self, prompt_ids: Sequence[int], **kwargs) -> TextStream:
        """stream() for a prompt already encoded (BOS or chat format applied)."""
        return self._stream([list(prompt_ids)], **kwargs)

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

    # ---- the loop --------------------------------------------------------------------
    def _stream(self, ids: list[list[int]], max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0,
                top_k: int = 0, repetition_penalty: float = 1.0, seed: int | None = None, stop: str | Sequence[str] = (),
                logprobs: bool = False, prompt_logprobs: bool = False) -> TextStream:
        params = SamplingParams(temperature, top_p, top_k, repetition_penalty)
        results: list[GenerationResult] = []
        cancelled = threading.Event()
        pieces = (text for _, text in self._steps(ids, max_new_tokens, params, seed, stop_strings(stop), results,
                                                  cancelled, logprobs, prompt_logprobs))
        return TextStream(pieces, results, cancelled)

    def generate_ids(self, prompts: list[list[int]], max_new_tokens: int | Sequence[int], params: SamplingParams,
                     seed: int | None = None, stop: str | Sequence[str] = (), logprobs: bool = False,
                     prompt_logprobs: bool = False) -> list[GenerationResult]:
        """Generate from token-id prompts (a left-padded batch); one result per prompt.

        max_new_tokens: one limit for all rows, or one per row (0 allowed: that row's prompt is
        only scored); each row is also capped by the context its own prompt leaves."""
        results: list[GenerationResult] = []
        for _ in self._steps(prompts, max_new_tokens, params, seed, stop_strings(stop), results,
                             None, logprobs, prompt_logprobs):
            pass
        return results

    def _budgets(self, prompts: list[list[int]], max_new_tokens: int | Sequence[int], scoring: bool) -> list[int]:
        """Each row's token limit: its max_new_tokens, capped by the context its prompt leaves."""
        ctx = self.args.max_seq_len
        if isinstance(max_new_tokens, (int, np.integer)):
            least = 0 if scoring else 1  # 0 new tokens only makes sense when the prompt is scored
            if max_new_tokens < least:
                raise UserError(f"max_new_tokens must be at least {least}, got {max_new_tokens}")
            max_new_tokens = [int(max_new_tokens)] * len(prompts)
        limits = list(max_new_tokens)
        if len(limits) != len(prompts) or min(limits, default=0) < 0:
            raise ValueError(f"max_new_tokens needs one limit >= 0 per prompt, got {limits}")
        for p, m in zip(prompts, limits):
            if len(p) > ctx or (len(p) == ctx and m > 0):
                raise UserError(f"the prompt is {len(p)} tokens, the model's context is {ctx}; shorten the prompt")
        return [min(m, ctx - len(p)) for p, m in zip(prompts, limits)]

    def _steps(self, prompts, max_new_tokens, params, seed, stop, results: list,
               cancelled: threading.Event | None = None, logprobs: bool = False,
               prompt_logprobs: bool = False) -> Iterator[tuple[int, str]]:
        """Yield (row, text) as each row's text is produced; append the results at the end.
        A set `cancelled` stops the loop before its next model step."""
        if not prompts or any(not p for p in prompts):
            raise UserError("the prompt is empty; give some text to continue")
        budgets = self._budgets(prompts, max_new_tokens, prompt_logprobs)  # per row
        longest = max(len(p) for p in prompts)
        rng = make_rng(seed)
        stop_ids = self.stop_ids()
        rows = [_Row(prompt=list(p), decoder=StreamDecoder(self.tokenizer)) for p in prompts]

        # left padding: every row ends at the same column
        ids = np.full((len(rows), longest), self.pad_id, np.int64)
        mask = np.zeros((len(rows), longest), np.int64)
        for i, p in enumerate(prompts):
            ids[i, longest - len(p):], mask[i, longest - len(p):] = p, 1

        timings = Timings()
        start = time.perf_counter()
        budget = max(budgets)  # steps at most; row i stops after budgets[i] tokens
        cache = self.model.new_cache(mask, capacity=max(len(p) + b for p, b in zip(prompts, budgets)))
        with self._lock:
            logits = self.model.step(ids, mask, cache, all_logits=prompt_logprobs)  # (B, V), or (B, S, V)
        if prompt_logprobs:
            for i, row in enumerate(rows):
                row.prompt_logprobs = score_prompt(logits[i, longest - len(row.prompt):], row.prompt)
            logits = logits[:, -1]  # (B, V): every row ends at the last column
        for row, b in zip(rows, budgets):
            if b == 0:  # a prompt that fills the context (or only scored): nothing to generate
                row.finish = FINISH_LENGTH
        for n in range(budget):
            history = [r.prompt + r.tokens for r in rows] if params.repetition_penalty != 1.0 else None
            chosen = sample(logits, params, rng, prev_tokens=history)  # (B,)
            chosen_logprobs = token_logprobs(logits, chosen).tolist() if logprobs else [None] * len(rows)
            now = time.perf_counter()
            if n == 0:
                timings.prompt_ms = (now - start) * 1000
            else:
                timings.token_ms.append((now - start) * 1000)
            start = now
            for i, (row, tok) in enumerate(zip(rows, chosen.tolist())):
                if row.finish is None and (text := self._advance(row, tok, stop_ids, stop, chosen_logprobs[i])):
                    yield i, text
                if row.finish is None and n + 1 == budgets[i] and (text := self._finish(row, FINISH_LENGTH)):
                    yield i, text  # this row's own limit: every row ends by the last step
            if all(r.finish for r in rows) or (cancelled is not None and cancelled.is_set()):
                break
            feed = np.array([[t.tokens[-1] if t.finish is None else self.pad_id] for t in rows], np.int64)
            with self._lock:
                logits = self.model.step(feed, np.ones_like(feed), cache)
        for i, row in enumerate(rows):
            if row.finish is None and (text := self._finish(row, FINISH_CANCELLED)):  # left early: cancelled
                yield i, text
            results.append(GenerationResult(row.text, row.tokens, row.finish, len(row.prompt), timings,
                                            row.logprobs if logprobs else None, row.prompt_logprobs))

    def _advance(self, row: _Row, tok: int, stop_ids: set[int], stop: list[str], logprob: float | None = None) -> str:
        """Take one sampled token (and its logprob, if kept) into the row; return the text it releases."""
        if tok in stop_ids:
            return self._finish(row, FINISH_EOS)
        row.tokens.append(tok)
        if logprob is not None:
            row.logprobs.append(logprob)
        text, keep, hit = split_at_stop(row.pending + row.decoder.push(tok), stop)
        if hit:
            row.finish = FINISH_STOP
        return self._emit(row, text, keep=keep)

    def _finish(self, row: _Row, reason: str) -> str:
        """End the row for reason; return the text it still held back (and an unfinished character)."""
        row.finish = reason
        return self._emit(row, row.pending + row.decoder.flush())

    @staticmethod
    def _emit(row: _Row, text: str, keep: str = "") -> str:
        row.text += text
        row.pending = keep
        return text

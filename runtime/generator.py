"""Generator: tokenizer + chat format + sampler + stop rules over a Model, batched and streaming."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from llama2_onnx.errors import UserError

from .chat_format import CHAT_FORMATS, Dialog, format_dialog
from .sampler import SamplingParams, make_rng, sample
from .session import Model
from .tokenizer import StreamDecoder, Tokenizer, load_tokenizer

FINISH_EOS, FINISH_LENGTH, FINISH_STOP = "eos", "length", "stop"


def stop_strings(stop: str | Sequence[str] | None) -> list[str]:
    """The stop strings as a list: one string is one stop string (not its characters); each non-empty."""
    stops = [stop] if isinstance(stop, str) else list(stop or ())
    for s in stops:
        if not isinstance(s, str) or not s:
            raise UserError(f"stop strings must be non-empty strings, got {s!r}")
    return stops


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

    def to_dict(self) -> dict:
        return {"text": self.text, "tokens": self.tokens, "finish_reason": self.finish_reason,
                "prompt_tokens": self.prompt_tokens, "timings": self.timings.to_dict()}


@dataclass
class _Row:
    prompt: list[int]
    decoder: StreamDecoder
    tokens: list[int] = field(default_factory=list)
    text: str = ""  # emitted so far
    pending: str = ""  # decoded but held back: it may be the start of a stop string
    finish: str | None = None


class TextStream:
    """Iterate for text pieces as they are produced; `result` holds the GenerationResult after."""

    def __init__(self, pieces: Iterator[str], results: list):
        self._pieces, self._results = pieces, results

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
        self.pad_id = self.args.pad_id if self.args.pad_id is not None else self.args.eos_id

    @classmethod
    def from_dir(cls, path: str | Path, **model_kwargs) -> "Generator":
        """Open a model folder: Model.from_dir(path, **model_kwargs) plus its tokenizer."""
        model = Model.from_dir(path, **model_kwargs)
        if not model.config.tokenizer:
            raise UserError(f"{path} has no tokenizer; export it again with --tokenizer PATH")
        tok = load_tokenizer(model.folder, bos_id=model.config.model.bos_id, eos_id=model.config.model.eos_id)
        return cls(model, tok)

    # ---- public API --------------------------------------------------------------
    def encode_prompt(self, prompt: str) -> list[int]:
        if not prompt.strip():
            raise UserError("the prompt is empty; give some text to continue")
        return self.tokenizer.encode(prompt, bos=self.model.config.add_bos, eos=False)

    def generate(self, prompts: str | Sequence[str], max_new_tokens: int = 256, temperature: float = 0.0,
                 top_p: float = 1.0, top_k: int = 0, repetition_penalty: float = 1.0, seed: int | None = None,
                 stop: str | Sequence[str] = ()) -> GenerationResult | list[GenerationResult]:
        """Continue one prompt (returns a result) or a batch (returns a list, left-padded together)."""
        single = isinstance(prompts, str)
        ids = [self.encode_prompt(p) for p in ([prompts] if single else prompts)]
        params = SamplingParams(temperature, top_p, top_k, repetition_penalty)
        results = self.generate_ids(ids, max_new_tokens, params, seed, stop)
        return results[0] if single else results

    def stream(self, prompt: str, **kwargs) -> TextStream:
        """Like generate for one prompt, but yields text as it is produced."""
        return self._stream([self.encode_prompt(prompt)], **kwargs)

    def chat(self, dialog: Dialog, **kwargs) -> GenerationResult:
        """Answer the dialog's last user message (kwargs as generate)."""
        stream = self.stream_chat(dialog, **kwargs)
        for _ in stream:
            pass
        return stream.result

    def stream_chat(self, dialog: Dialog, **kwargs) -> TextStream:
        return self._stream([self.chat_ids(dialog)], **kwargs)

    def chat_ids(self, dialog: Dialog) -> list[int]:
        if not self.chat_style:
            raise UserError("this model folder names no chat format; export it again with --chat-format llama2 or chatml")
        return format_dialog(dialog, self.tokenizer, self.chat_style)

    # ---- the loop --------------------------------------------------------------------
    def _stream(self, ids: list[list[int]], max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0,
                top_k: int = 0, repetition_penalty: float = 1.0, seed: int | None = None, stop: str | Sequence[str] = ()) -> TextStream:
        params = SamplingParams(temperature, top_p, top_k, repetition_penalty)
        results: list[GenerationResult] = []
        pieces = (text for _, text in self._steps(ids, max_new_tokens, params, seed, stop_strings(stop), results))
        return TextStream(pieces, results)

    def generate_ids(self, prompts: list[list[int]], max_new_tokens: int, params: SamplingParams,
                     seed: int | None = None, stop: str | Sequence[str] = ()) -> list[GenerationResult]:
        """Generate from token-id prompts (a left-padded batch); one result per prompt."""
        results: list[GenerationResult] = []
        for _ in self._steps(prompts, max_new_tokens, params, seed, stop_strings(stop), results):
            pass
        return results

    def _steps(self, prompts, max_new_tokens, params, seed, stop, results: list) -> Iterator[tuple[int, str]]:
        """Yield (row, text) as each row's text is produced; append the results at the end."""
        if max_new_tokens < 1:
            raise UserError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        if not prompts or any(not p for p in prompts):
            raise UserError("the prompt is empty; give some text to continue")
        longest = max(len(p) for p in prompts)
        ctx = self.args.max_seq_len
        if longest >= ctx:
            raise UserError(f"the prompt is {longest} tokens, the model's context is {ctx}; shorten the prompt")
        rng = make_rng(seed)
        stop_ids = set(self.args.eos_ids)
        if self.chat_style in CHAT_FORMATS:
            stop_ids |= set(CHAT_FORMATS[self.chat_style].stop_ids(self.tokenizer))
        rows = [_Row(prompt=list(p), decoder=StreamDecoder(self.tokenizer)) for p in prompts]

        # left padding: every row ends at the same column
        ids = np.full((len(rows), longest), self.pad_id, np.int64)
        mask = np.zeros((len(rows), longest), np.int64)
        for i, p in enumerate(prompts):
            ids[i, longest - len(p):], mask[i, longest - len(p):] = p, 1

        timings = Timings()
        start = time.perf_counter()
        budget = min(max_new_tokens, ctx - longest)
        cache = self.model.new_cache(mask, capacity=longest + budget)
        logits = self.model.step(ids, mask, cache)  # (B, V)
        for n in range(budget):
            history = [r.prompt + r.tokens for r in rows] if params.repetition_penalty != 1.0 else None
            chosen = sample(logits, params, rng, prev_tokens=history)  # (B,)
            now = time.perf_counter()
            if n == 0:
                timings.prompt_ms = (now - start) * 1000
            else:
                timings.token_ms.append((now - start) * 1000)
            start = now
            for i, (row, tok) in enumerate(zip(rows, chosen.tolist())):
                if row.finish is None and (text := self._advance(row, tok, stop_ids, stop)):
                    yield i, text
            if all(r.finish for r in rows) or n == budget - 1:
                break
            feed = np.array([[t.tokens[-1] if t.finish is None else self.pad_id] for t in rows], np.int64)
            logits = self.model.step(feed, np.ones_like(feed), cache)
        for i, row in enumerate(rows):
            if row.finish is None:
                row.finish = FINISH_LENGTH
                if text := self._emit(row, row.pending + row.decoder.flush()):
                    yield i, text
            results.append(GenerationResult(row.text, row.tokens, row.finish, len(row.prompt), timings))

    def _advance(self, row: _Row, tok: int, stop_ids: set[int], stop: list[str]) -> str:
        """Take one sampled token into the row; return the text it releases."""
        if tok in stop_ids:
            row.finish = FINISH_EOS
            return self._emit(row, row.pending + row.decoder.flush())
        row.tokens.append(tok)
        row.pending += row.decoder.push(tok)
        if not stop:
            return self._emit(row, row.pending)
        hits = [h for h in (row.pending.find(s) for s in stop) if h >= 0]
        if hits:
            row.finish = FINISH_STOP
            return self._emit(row, row.pending[:min(hits)])
        # hold back a tail that may yet become a stop string
        keep = max((k for s in stop for k in range(1, len(s)) if row.pending.endswith(s[:k])), default=0)
        cut = len(row.pending) - keep
        return self._emit(row, row.pending[:cut], keep=row.pending[cut:])

    @staticmethod
    def _emit(row: _Row, text: str, keep: str = "") -> str:
        row.text += text
        row.pending = keep
        return text

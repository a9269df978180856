"""Constrained decoding: every generated token keeps the text inside a grammar (a JSON Schema, any
JSON object, a regular expression, a Lark or a GBNF grammar), with llguidance, the library
onnxruntime-genai and llama.cpp use.

    spec = Grammar.json_schema({"type": "object", ...})    # .json_object(), .regex(...), .lark(...), .gbnf(...)
    compiled = Grammars(tokenizer, stop_ids).compile(spec)  # checked once: GrammarError names the problem
    c = compiled.matcher()                                  # one per sequence
    logits = c.masked(logits)                               # tokens the grammar forbids get -inf (a copy)
    done = c.advance(token)                                 # True: the grammar is complete

Each step the sequence's matcher gives a bitmask of the tokens that keep the output a prefix of
some text the grammar accepts; the logits outside it become -inf before sampling (greedy, sampled,
penalised alike), and the sampled token advances the matcher. The stop tokens are allowed exactly
when the text so far is complete, so a JSON answer cannot end half-written on its own: only what
the caller asked for can cut it (its token limit, finish reason "length"; a stop string it gave;
its time limit; a cancel). When nothing may follow (a closed JSON object, a matched
regex), the sequence ends at once with "stop".

Why llguidance rather than xgrammar: it needs no torch (its NumPy helpers fill and apply the
bitmask), reads both our tokenizers (a tokenizer.json as it is; SentencePiece through its
TokenizerWrapper over the vocabulary's bytes), and compiles JSON Schema, regex, Lark and GBNF (the
formats OpenAI, llama.cpp and vLLM clients send) from one grammar format. A mask of SmolLM2's 49152
tokens takes about 1 ms for a JSON schema's first step and less after (BENCHMARKS.md).

SentencePiece's first generated piece carries the word-start space ("▁{"), which the decoded text
drops; the grammar accepts that one optional space before its start.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass

import numpy as np

from llama2_onnx.errors import UserError

from .token_bytes import spm_piece_bytes
from .tokenizer import Tokenizer

KINDS = ("json_schema", "json_object", "regex", "lark", "gbnf")
# JSON's whitespace as llama.cpp's schema grammars allow it: around a separator, nothing, one space, or a
# newline and up to 20 spaces or tabs of indent (llguidance's default, any run of whitespace, lets a small
# model pad forever); keywords llguidance does not implement (format, ...) are ignored rather than refused
JSON_OPTIONS = {"whitespace_flexible": True, "whitespace_pattern": r"(?:\x20|\n[\x20\t]{0,20})?", "lenient": True}


class GrammarError(UserError):
    """The grammar cannot be used: malformed, unsupported, or llguidance is not installed."""


@dataclass(frozen=True)
class Grammar:
    """What the output must match: kind (KINDS) and its text (a JSON Schema as canonical JSON)."""

    kind: str
    text: str = ""

    @classmethod
    def json_schema(cls, schema: dict | str, strict: bool = False) -> "Grammar":
        """strict (OpenAI's strict mode): every object without additionalProperties gets false, so the
        output has exactly the properties the schema names."""
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as e:
                raise GrammarError(f"the JSON schema is not JSON ({e.msg} at line {e.lineno})") from None
        if not isinstance(schema, dict):
            raise GrammarError(f"a JSON schema is a JSON object, got {type(schema).__name__}")
        return cls("json_schema", json.dumps(_closed(schema) if strict else schema, sort_keys=True))

    @classmethod
    def json_object(cls) -> "Grammar":
        return cls("json_object")

    @classmethod
    def regex(cls, pattern: str) -> "Grammar":
        return cls("regex", pattern)

    @classmethod
    def lark(cls, text: str) -> "Grammar":
        return cls("lark", text)

    @classmethod
    def gbnf(cls, text: str) -> "Grammar":
        return cls("gbnf", text)


def _closed(schema):
    """The schema with additionalProperties false on every object that does not say (strict mode)."""
    if isinstance(schema, list):
        return [_closed(x) for x in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _closed(v) for k, v in schema.items()}
    if (out.get("type") == "object" or "properties" in out) and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


def grammar_of(response_format) -> Grammar | None:
    """The Python API's response_format: a Grammar, or OpenAI's dict ({"type": "json_object"},
    {"type": "json_schema", "json_schema": {"schema": {...}}}, {"type": "text"}), or None."""
    if response_format is None or isinstance(response_format, Grammar):
        return response_format
    if not isinstance(response_format, dict) or response_format.get("type") not in ("text", "json_object", "json_schema"):
        raise GrammarError('response_format must be a Grammar or a dict with "type" text, json_object or json_schema, '
                           f"got {str(response_format)[:80]}")
    kind = response_format["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return Grammar.json_object()
    spec = response_format.get("json_schema")
    schema = spec.get("schema") if isinstance(spec, dict) else None
    if schema is None:
        raise GrammarError('response_format {"type": "json_schema"} needs "json_schema": {"schema": {...}}')
    return Grammar.json_schema(schema, strict=bool(spec.get("strict")))


def _llguidance():
    try:
        import llguidance
    except ImportError:
        raise GrammarError("structured output needs llguidance: pip install 'llama2-onnx[grammar]' "
                           "(the serve extra includes it)") from None
    return llguidance


class Grammars:
    """Compiles grammars for one tokenizer (its llguidance tokenizer is made on first use, ~0.2-0.3 s)."""

    def __init__(self, tokenizer: Tokenizer, stop_ids: set[int] | frozenset[int]):
        self.tokenizer, self.stop_ids = tokenizer, sorted(stop_ids)
        self.spm = hasattr(tokenizer, "sp")
        self._ll = None
        self._lock = threading.Lock()
        self._cache: dict[Grammar, str] = {}

    def ll_tokenizer(self):
        with self._lock:
            if self._ll is None:
                lg = _llguidance()
                source = lg.TokenizerWrapper(_SpmVocabulary(self.tokenizer)) if self.spm else self.tokenizer.tok.to_str()
                self._ll = lg.LLTokenizer(source, n_vocab=self.tokenizer.vocab_size, eos_token=self.stop_ids)
            return self._ll

    def compile(self, spec: Grammar) -> "Compiled":
        """The grammar, checked against the tokenizer; GrammarError (one line) when it cannot be used."""
        if spec.kind not in KINDS:
            raise GrammarError(f"grammar kind must be one of {', '.join(KINDS)}, got {spec.kind!r}")
        text = self._cache.get(spec)
        if text is None:
            lg, tok = _llguidance(), self.ll_tokenizer()
            text = self._to_llguidance(lg, spec)
            error = lg.LLMatcher.validate_grammar(text, tok)
            if error:
                raise GrammarError(f"the {spec.kind.replace('_', ' ')} cannot be used: {_first_line(error)}")
            self._cache[spec] = text
        return Compiled(self, text)

    def _to_llguidance(self, lg, spec: Grammar) -> str:
        M = lg.LLMatcher
        try:
            if spec.kind == "json_schema":
                text = M.grammar_from_json_schema(spec.text, defaults=JSON_OPTIONS)
            elif spec.kind == "json_object":
                text = M.grammar_from_json_schema({"type": "object"}, defaults=JSON_OPTIONS)
            elif spec.kind == "regex":
                text = M.grammar_from_regex(spec.text)
            elif spec.kind == "lark":
                text = M.grammar_from_lark(spec.text)
            else:
                from llguidance.gbnf_to_lark import any_to_lark

                text = M.grammar_from_lark(any_to_lark(spec.text))
        except Exception as e:  # llguidance's ValueError, the GBNF converter's own errors
            raise GrammarError(f"the {spec.kind.replace('_', ' ')} cannot be used: {_first_line(str(e))}") from None
        return _optional_space(text) if self.spm else text


class Compiled:
    def __init__(self, grammars: Grammars, text: str):
        self.grammars, self.text = grammars, text

    def matcher(self) -> "Constraint":
        tok = self.grammars.ll_tokenizer()
        return Constraint(_llguidance().LLMatcher(tok, self.text, log_level=0), tok.vocab_size)


class Constraint:
    """One sequence's grammar state."""

    def __init__(self, matcher, n_vocab: int):
        self.matcher, self.n_vocab = matcher, n_vocab
        self.bitmask = np.full((n_vocab + 31) // 32, -1, np.int32)  # one bit per token

    def allowed(self, vocab_size: int) -> np.ndarray:
        """A boolean mask over the model's vocabulary (vocab_size ids): the tokens the grammar allows next."""
        self.matcher.unsafe_compute_mask_ptr(self.bitmask.ctypes.data, self.bitmask.nbytes)
        bits = np.unpackbits(self.bitmask.view(np.uint8), bitorder="little")[:self.n_vocab].astype(bool)
        if vocab_size > self.n_vocab:  # ids past the tokenizer's (a padded embedding) are never allowed
            return np.concatenate([bits, np.zeros(vocab_size - self.n_vocab, bool)])
        return bits[:vocab_size]

    def masked(self, logits: np.ndarray) -> np.ndarray:
        """A copy of one row of logits (V,) with the forbidden tokens at -inf."""
        return np.where(self.allowed(logits.shape[-1]), logits, np.float32(-np.inf)).astype(np.float32)

    def error(self) -> str | None:
        """What went wrong, once the matcher is in its error state (else None)."""
        return f"the grammar failed: {_first_line(self.matcher.get_error())}" if self.matcher.is_error() else None

    def advance(self, token: int) -> bool:
        """Take the sampled token; True when the grammar is complete and nothing more may follow."""
        if not self.matcher.consume_token(int(token)):
            raise GrammarError(f"the grammar refused token {token}: {_first_line(self.matcher.get_error())}")
        return self.matcher.is_stopped()


class _SpmVocabulary:
    """What llguidance's TokenizerWrapper reads from a SentencePiece tokenizer: each token's bytes
    (control pieces as llguidance's special tokens, 0xFF + name) and an encode function."""

    def __init__(self, tokenizer):
        sp = tokenizer.sp
        self.eos_token_id, self.bos_token_id = tokenizer.eos_id, tokenizer.bos_id
        self.special_token_ids = [i for i in range(tokenizer.vocab_size) if sp.is_control(i) or sp.is_unknown(i)]
        special = set(self.special_token_ids)
        self.tokens = [b"\xff" + sp.id_to_piece(i).encode() if i in special else spm_piece_bytes(sp.id_to_piece(i))
                       for i in range(tokenizer.vocab_size)]
        self._tokenizer = tokenizer

    def __call__(self, text: str | bytes) -> list[int]:
        """text's tokens as a piece in the middle of a text: without the word-start space SentencePiece
        puts before a text's first piece (encoded after a newline, whose own tokens are dropped)."""
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        lead = self._tokenizer.encode("\n", bos=False, eos=False)
        ids = self._tokenizer.encode("\n" + text, bos=False, eos=False)
        return ids[len(lead):] if ids[:len(lead)] == lead else self._tokenizer.encode(text, bos=False, eos=False)


def _optional_space(text: str) -> str:
    """The grammar behind an optional leading space (SentencePiece's word-start on the first piece)."""
    d = json.loads(text) if text.lstrip().startswith("{") else {"grammars": [{"lark_grammar": text}]}  # JSON or Lark
    body = d["grammars"][0]
    body["name"] = "body"
    d["grammars"] = [{"name": "start_space", "lark_grammar": 'start: " "? @body'}] + d["grammars"]
    return json.dumps(d)


def _first_line(text: str) -> str:
    return (text.strip().splitlines() or ["invalid grammar"])[0][:300]

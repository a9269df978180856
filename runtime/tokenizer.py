"""One tokenizer interface over SentencePiece (tokenizer.model) and Hugging Face tokenizers
(tokenizer.json), and a streaming decoder that only ever emits complete UTF-8 text.

    tok = load_tokenizer("out/llama-2-7b-chat")             # tokenizer.model, else tokenizer.json
    ids = tok.encode("Hello world", bos=True, eos=False)    # [1, 15043, 3186]
    tok.decode(ids)                                         # "Hello world"

BOS and EOS are always token ids added around the encoded text, never text to tokenize
(Meta's tokenizer.py does the same).
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Iterable, Protocol, runtime_checkable

from llama2_onnx.errors import UserError

SPM_FILE = "tokenizer.model"
HF_FILE = "tokenizer.json"
HF_CONFIG_FILE = "tokenizer_config.json"
# Above this many characters HF tokenizers encode through encode_batch, which lets other threads
# (the server's event loop) run meanwhile; below it encode's lower overhead wins. Not lower: a
# process that has used the batch path warns in every child it forks.
RELEASE_GIL_CHARS = 1 << 15
REPLACEMENT = "\ufffd"  # what a decoder writes for bytes that are not (yet) valid UTF-8


class TokenizerError(UserError):
    """No tokenizer file, or one we cannot use."""


@runtime_checkable
class Tokenizer(Protocol):
    bos_id: int
    eos_id: int
    vocab_size: int

    def encode(self, text: str, bos: bool, eos: bool, *, parse_special: bool = True) -> list[int]:
        """parse_special=False: text is only text, a special token's spelling in it is encoded as
        ordinary pieces (chat messages); True: the tokenizer's own rule (SentencePiece never
        parses control tokens from text; tokenizer.json matches its added tokens)."""
        ...

    def decode(self, ids: Iterable[int]) -> str: ...

    def id_to_piece(self, i: int) -> str: ...

    def special_id(self, text: str) -> int | None:
        """The id of the special (control or added) token spelled exactly `text`, or None."""
        ...


def well_formed(text: str) -> str:
    """text with every lone surrogate replaced by U+FFFD. Python turns bytes that are not UTF-8
    into lone surrogates (sys.argv, surrogateescape streams); no tokenizer can encode those."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:  # utf-16 joins the surrogate pairs that are pairs, replaces the rest
        return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")


def _wrap(ids: list[int], bos_id: int, eos_id: int, bos: bool, eos: bool) -> list[int]:
    return ([bos_id] if bos else []) + ids + ([eos_id] if eos else [])


class SentencePieceTokenizer:
    """Meta's Llama 2 tokenizer.model. Decoding drops control tokens (BOS/EOS), as SentencePiece does."""

    def __init__(self, path: str | Path, bos_id: int | None = None, eos_id: int | None = None):
        import sentencepiece as spm

        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(path))
        except (OSError, RuntimeError) as e:
            raise TokenizerError(f"{path} is not a SentencePiece model ({e})") from None
        self.path = Path(path)
        # ids given by the model folder's config win; else the model's own
        self.bos_id = int(self.sp.bos_id() if bos_id is None else bos_id)
        self.eos_id = int(self.sp.eos_id() if eos_id is None else eos_id)
        self.vocab_size = int(self.sp.vocab_size())

    def encode(self, text: str, bos: bool, eos: bool, *, parse_special: bool = True) -> list[int]:
        # SentencePiece never reads control pieces (<s>, </s>, <unk>) from text, so parse_special changes nothing
        return _wrap(self.sp.encode(well_formed(text)), self.bos_id, self.eos_id, bos, eos)

    def decode(self, ids: Iterable[int]) -> str:
        return self.sp.decode([int(i) for i in ids])

    def id_to_piece(self, i: int) -> str:
        return self.sp.id_to_piece(int(i))

    def special_id(self, text: str) -> int | None:
        i = self.sp.piece_to_id(text)  # the unk id when there is no such piece
        if self.sp.id_to_piece(i) != text:
            return None
        # SentencePiece's Python API cannot tell user-defined pieces from normal ones: only
        # control pieces (<s>, </s>) and <unk> count as special here.
        return i if self.sp.is_control(i) or self.sp.is_unknown(i) else None


class HFTokenizer:
    """A Hugging Face tokenizer.json (byte-level BPE such as SmolLM2's).

    tokenizer.json has no reliable notion of BOS/EOS, so their ids are passed in; encode adds
    them itself (no post-processor), decode skips special tokens."""

    def __init__(self, path: str | Path, bos_id: int, eos_id: int):
        from tokenizers import Tokenizer as _HF

        try:
            self.tok = _HF.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            raise TokenizerError(f"{path} is not a Hugging Face tokenizer.json ({e})") from None
        self.path = Path(path)
        self.vocab_size = int(self.tok.get_vocab_size(with_added_tokens=True))
        for name, i in (("bos_id", bos_id), ("eos_id", eos_id)):
            if not isinstance(i, int) or not 0 <= i < self.vocab_size:
                raise TokenizerError(f"{name} {i!r} is not a token id of {path} (vocab {self.vocab_size})")
        self.bos_id, self.eos_id = bos_id, eos_id
        self._special = {t.content: i for i, t in self.tok.get_added_tokens_decoder().items()}
        self._text_only = None  # made on first use (0.17 s for SmolLM2's: a third of loading the tokenizer)
        self._text_only_lock = threading.Lock()

    def _text_only_tok(self):
        """The same vocabulary with special tokens' spellings read as plain text: a second object,
        not a flag toggled on the first, so that threads may share the tokenizer."""
        with self._text_only_lock:
            if self._text_only is None:
                from tokenizers import Tokenizer as _HF

                twin = _HF.from_str(self.tok.to_str())
                twin.encode_special_tokens = True
                self._text_only = twin
            return self._text_only

    def encode(self, text: str, bos: bool, eos: bool, *, parse_special: bool = True) -> list[int]:
        tok, text = self.tok if parse_special else self._text_only_tok(), well_formed(text)
        if len(text) > RELEASE_GIL_CHARS:  # encode_batch releases the GIL (encode holds it: 0.7 s per MiB)
            return _wrap(tok.encode_batch([text], add_special_tokens=False)[0].ids, self.bos_id, self.eos_id, bos, eos)
        return _wrap(tok.encode(text, add_special_tokens=False).ids, self.bos_id, self.eos_id, bos, eos)

    def decode(self, ids: Iterable[int]) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def id_to_piece(self, i: int) -> str:
        piece = self.tok.id_to_token(int(i))
        if piece is None:
            raise TokenizerError(f"token id {i} is outside the vocabulary ({self.vocab_size})")
        return piece

    def special_id(self, text: str) -> int | None:
        return self._special.get(text)


def _hf_config_ids(folder: Path) -> tuple[int | None, int | None]:
    """bos/eos ids named by a tokenizer_config.json next to tokenizer.json, if there is one."""
    cfg_path = folder / HF_CONFIG_FILE
    if not cfg_path.is_file():
        return None, None
    from tokenizers import Tokenizer as _HF

    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    tok = _HF.from_file(str(folder / HF_FILE))

    def lookup(key: str) -> int | None:
        tokn = cfg.get(key)
        text = tokn.get("content") if isinstance(tokn, dict) else tokn
        return tok.token_to_id(text) if isinstance(text, str) else None

    return lookup("bos_token"), lookup("eos_token")


def load_tokenizer(model_dir: str | Path, bos_id: int | None = None, eos_id: int | None = None) -> Tokenizer:
    """The tokenizer of a model folder: tokenizer.model if present, else tokenizer.json.

    model_dir may also name the tokenizer file itself. For tokenizer.json, bos_id/eos_id
    default to those named in tokenizer_config.json."""
    path = Path(model_dir)
    if path.is_file():
        folder, spm_path, hf_path = path.parent, path if path.suffix == ".model" else None, path
    else:
        folder, spm_path, hf_path = path, path / SPM_FILE, path / HF_FILE
    if spm_path is not None and spm_path.is_file():
        return SentencePieceTokenizer(spm_path, bos_id, eos_id)
    if hf_path.is_file() and hf_path.suffix == ".json":
        if bos_id is None or eos_id is None:
            cfg_bos, cfg_eos = _hf_config_ids(folder)
            bos_id = cfg_bos if bos_id is None else bos_id
            eos_id = cfg_eos if eos_id is None else eos_id
        if bos_id is None or eos_id is None:
            raise TokenizerError(f"{hf_path} does not say which tokens are BOS/EOS: pass bos_id and eos_id")
        return HFTokenizer(hf_path, bos_id, eos_id)
    raise TokenizerError(f"no tokenizer in {path}: expected {SPM_FILE} (SentencePiece) or {HF_FILE} (Hugging Face)")


class StreamDecoder:
    """Turn a stream of token ids into text pieces, emitting only complete UTF-8 text.

    "".join(push(i) for i in ids) + flush() == tokenizer.decode(ids), exactly.
    Each push re-decodes a short window, ids[prefix:], and emits what it adds to the window's
    earlier text, decode(ids[prefix:read]), once that addition does not end in U+FFFD (an
    unfinished multi-byte character). The window starts a chunk back, so per-window effects
    (SentencePiece dropping the first piece's leading space) cancel out; O(1) per token.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self._prefix = 0  # window start
        self._read = 0  # ids[:_read] have been emitted
        self._prefix_text = ""  # decode(ids[_prefix:_read])

    def push(self, token_id: int) -> str:
        """Add one token; return the text it completes (often "", sometimes several tokens' worth)."""
        self.ids.append(int(token_id))
        text = self.tokenizer.decode(self.ids[self._prefix:])
        if len(text) <= len(self._prefix_text) or text.endswith(REPLACEMENT) or not text.startswith(self._prefix_text):
            return ""
        return self._advance(text)

    def flush(self) -> str:
        """Emit whatever is left, even an unfinished character (as the full decode would show it)."""
        if self._read == len(self.ids):
            return ""
        return self._advance(self.tokenizer.decode(self.ids[self._prefix:]))

    def _advance(self, text: str) -> str:
        new = text[len(self._prefix_text):]
        self._prefix, self._read = self._read, len(self.ids)
        self._prefix_text = self.tokenizer.decode(self.ids[self._prefix:self._read])
        return new

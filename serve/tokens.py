"""Token ids -> the text and bytes the OpenAI logprobs shapes show for them.

    texts = TokenTexts(tokenizer)
    texts.bytes(15043)      # b" Hello"  (SentencePiece "▁Hello")
    texts.text(15043)       # " Hello"
    texts.offsets(ids)      # where each token starts in tokenizer.decode(ids)

A token's bytes come from its vocabulary piece, not from decoding it alone: decoding one
SentencePiece token drops its leading space, and a token that holds part of a UTF-8 character
decodes to U+FFFD. Special tokens (BOS, EOS, <|im_end|>) have no bytes: decode skips them.
"""

from __future__ import annotations

from llama2_onnx.runtime.token_bytes import byte_level_table, spm_piece_bytes
from llama2_onnx.runtime.tokenizer import StreamDecoder, Tokenizer


def _is_byte_level(tokenizer: Tokenizer) -> bool:
    decoder = getattr(getattr(tokenizer, "tok", None), "decoder", None)
    return type(decoder).__name__ == "ByteLevel"


class TokenTexts:
    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self._byte_level = _is_byte_level(tokenizer)
        self._spm = hasattr(tokenizer, "sp")
        self._cache: dict[int, bytes] = {}

    def bytes(self, token: int) -> bytes:
        b = self._cache.get(token)
        if b is None:
            b = self._cache[token] = self._bytes(token)
        return b

    def _bytes(self, token: int) -> bytes:
        tok = self.tokenizer
        piece = tok.id_to_piece(token)
        if tok.special_id(piece) == token or token in (tok.bos_id, tok.eos_id):
            return b""
        if self._spm:
            return spm_piece_bytes(piece)
        if self._byte_level:
            table = byte_level_table()
            if all(c in table for c in piece):
                return bytes(table[c] for c in piece)
        return tok.decode([token]).encode("utf-8")

    def text(self, token: int) -> str:
        return self.bytes(token).decode("utf-8", errors="replace")

    def offsets(self, ids: list[int], start: int = 0, after: int | None = None) -> list[int]:
        """Each token's start in start + decode(ids), counted the way the decoded text counts; with
        after (the prompt's last token) as ids decode continuing it: SentencePiece then keeps the
        first token's leading space, as a completion returned after its prompt does."""
        decoder, at, out = StreamDecoder(self.tokenizer), start, []
        if after is not None:
            decoder.push(after)
        for n, i in enumerate(ids):
            out.append(at)
            if n + 1 < len(ids):  # the last token's length moves nothing
                at += len(decoder.push(i))
        return out

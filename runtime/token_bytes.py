"""The bytes a vocabulary piece stands for, for both tokenizer kinds (no model needed): SentencePiece
pieces ("▁Hello", "<0x0A>") and GPT-2 byte-level BPE pieces ("ĠHello")."""

from __future__ import annotations

import re
from functools import lru_cache

_SPM_BYTE = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_SPM_SPACE = "\u2581"


def spm_piece_bytes(piece: str) -> bytes:
    """A SentencePiece piece's bytes: a byte-fallback piece <0xNN> is that byte; ▁ is a space."""
    if m := _SPM_BYTE.fullmatch(piece):
        return bytes([int(m.group(1), 16)])
    return piece.replace(_SPM_SPACE, " ").encode("utf-8")


@lru_cache(maxsize=1)
def byte_level_table() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet: the printable character that stands for each byte."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, n = {}, 0
    for b in range(256):
        if b in keep:
            chars[chr(b)] = b
        else:
            chars[chr(256 + n)] = b
            n += 1
    return chars

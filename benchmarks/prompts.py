"""The benchmark prompt: English text cut to exactly the asked number of tokens.

Every system gets these token ids (not the text), so tokenizers play no part in the timing
and all peers see the same prompt. A folder without a tokenizer gets seeded random ids.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from llama2_onnx.errors import UserError

# From Mary Shelley's "Frankenstein" (1818), Letter 1: public domain.
TEXT = (
    "You will rejoice to hear that no disaster has accompanied the commencement of an enterprise which you have "
    "regarded with such evil forebodings. I arrived here yesterday, and my first task is to assure my dear sister "
    "of my welfare and increasing confidence in the success of my undertaking. I am already far north of London, "
    "and as I walk in the streets of Petersburgh, I feel a cold northern breeze play upon my cheeks, which braces "
    "my nerves and fills me with delight. Do you understand this feeling? This breeze, which has travelled from "
    "the regions towards which I am advancing, gives me a foretaste of those icy climes. Inspirited by this wind "
    "of promise, my daydreams become more fervent and vivid. I try in vain to be persuaded that the pole is the "
    "seat of frost and desolation; it ever presents itself to my imagination as the region of beauty and delight. "
    "There, Margaret, the sun is forever visible, its broad disk just skirting the horizon and diffusing a "
    "perpetual splendour. There, for with your leave, my sister, I will put some trust in preceding navigators, "
    "there snow and frost are banished; and, sailing over a calm sea, we may be wafted to a land surpassing in "
    "wonders and in beauty every region hitherto discovered on the habitable globe. Its productions and features "
    "may be without example, as the phenomena of the heavenly bodies undoubtedly are in those undiscovered "
    "solitudes. What may not be expected in a country of eternal light? I may there discover the wondrous power "
    "which attracts the needle and may regulate a thousand celestial observations that require only this voyage "
    "to render their seeming eccentricities consistent forever. I shall satiate my ardent curiosity with the "
    "sight of a part of the world never before visited, and may tread a land never before imprinted by the foot "
    "of man. These are my enticements, and they are sufficient to conquer all fear of danger or death and to "
    "induce me to commence this laborious voyage with the joy a child feels when he embarks in a little boat, "
    "with his holiday mates, on an expedition of discovery up his native river. "
)


def prompt_ids(folder: str | Path, *, length: int, add_bos: bool, bos_id: int, eos_id: int, vocab_size: int,
               tokenizer: str | None) -> list[int]:
    """`length` token ids: BOS (when the model adds one) and the text, repeated as needed."""
    if length < 1:
        raise UserError(f"--prompt-len must be at least 1, got {length}")
    head = [bos_id] if add_bos else []
    body = _text_ids(folder, bos_id, eos_id) if tokenizer else None
    if not body:
        rng = np.random.default_rng(0)
        body = rng.integers(min(3, vocab_size - 1), vocab_size, size=length).tolist()
    reps = -(-max(length - len(head), 0) // len(body)) + 1
    return (head + body * reps)[:length]


def _text_ids(folder: str | Path, bos_id: int, eos_id: int) -> list[int] | None:
    from llama2_onnx.runtime.tokenizer import load_tokenizer

    try:
        tok = load_tokenizer(folder, bos_id=bos_id, eos_id=eos_id)
    except UserError:
        return None
    return tok.encode(TEXT, bos=False, eos=False)

"""Check an exported sequence classifier against our PyTorch decoder (float32).

The verification passage (export/quality_text.py) cut into its sentences, each tokenised with the
folder's tokenizer (seeded random id rows of varied lengths when it has none), run as one
right-padded batch through the bare graph and through models/llama.Transformer.classify.
Figures (config.json "verify"):
  max_abs_logit_diff   over every sentence's num_labels logits
  label_agreement      share of sentences whose best label agrees
  sentences            how many
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from llama2_onnx.models.llama import Transformer
from llama2_onnx.runtime import contract
from llama2_onnx.runtime.classifier import pad_batch
from llama2_onnx.runtime.folder import FolderConfig
from llama2_onnx.runtime.tokenizer import load_tokenizer

from .quality_text import PERPLEXITY_TEXT
from .verify import check_fp32, cpu_session


def sentences() -> list[str]:
    return [s for s in re.split(r"(?<=[.!?])\s+", PERPLEXITY_TEXT) if s]


def sentence_tokens(folder: Path, cfg: FolderConfig) -> list[list[int]]:
    """The passage's sentences through the folder's tokenizer, else seeded random rows (3 to 40 ids)."""
    a = cfg.model
    if cfg.tokenizer:
        tok = load_tokenizer(folder, bos_id=a.bos_id, eos_id=a.eos_id)
        rows = [tok.encode(s, bos=cfg.add_bos, eos=False)[: a.max_seq_len] for s in sentences()]
        if all(rows) and max(max(r) for r in rows) < a.vocab_size:
            return rows
    rng = np.random.default_rng(0)
    return [rng.integers(3, a.vocab_size, int(n)).tolist() for n in rng.integers(3, min(40, a.max_seq_len) + 1, len(sentences()))]


def verify_classifier(folder: Path, reference: Transformer) -> dict:
    """Compare folder/model.onnx with the float32 PyTorch classifier; raise for a bad fp32 export."""
    cfg = FolderConfig.read(folder)
    rows = sentence_tokens(folder, cfg)
    ids, mask = pad_batch(rows, cfg.model.pad_id)
    got = cpu_session(folder / contract.MODEL_FILE).run([contract.LOGITS], {contract.INPUT_IDS: ids, contract.ATTENTION_MASK: mask})[0]
    with torch.no_grad():
        ref = reference.classify(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
    diff = float(np.abs(got - ref).max())
    result = {
        "task": contract.TASK_CLASSIFICATION,
        "sentences": len(rows),
        "max_abs_logit_diff": diff,
        "label_agreement": float((got.argmax(-1) == ref.argmax(-1)).mean()),
        "reference": "pytorch float32",
    }
    check_fp32(cfg.precision, diff)
    return result

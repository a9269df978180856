"""Check an exported graph against our PyTorch decoder (float32) on a fixed token sequence.

The text is a fixed English passage of about 300 tokens (export/quality_text.py), tokenised
with the folder's own tokenizer (seeded random ids when the folder has none).
Figures (stored in config.json under "verify"):
  max_abs_logit_diff   teacher-forced pass over the passage, all positions
  top1_agreement       share of positions whose argmax agrees (teacher-forced)
  perplexity           of the passage under the ONNX graph, beside `reference_perplexity` (PyTorch)
  greedy_agreement     leading greedy tokens that agree, of `greedy_tokens`, after the first
                       GREEDY_PROMPT tokens of the passage, with the KV cache
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from llama2_onnx.errors import UserError
from llama2_onnx.models.llama import Transformer, greedy
from llama2_onnx.runtime import contract
from llama2_onnx.runtime.folder import FolderConfig
from llama2_onnx.runtime.tokenizer import load_tokenizer

from .quality_text import PERPLEXITY_TEXT

FP32_TOLERANCE = 1e-3
GREEDY_PROMPT = 48


class VerificationError(UserError):
    pass


def verify_tokens(folder: Path, vocab_size: int, n: int = 320) -> list[int]:
    """The verification text through the folder's tokenizer (at most n tokens), else seeded ids."""
    cfg = FolderConfig.read(folder)
    if cfg.tokenizer:
        tok = load_tokenizer(folder, bos_id=cfg.model.bos_id, eos_id=cfg.model.eos_id)
        ids = tok.encode(PERPLEXITY_TEXT, bos=True, eos=False)
        if max(ids) < vocab_size:  # a tokenizer larger than the model's vocabulary: use ids
            return ids[:n]
    return np.random.default_rng(0).integers(3, vocab_size, 256).tolist()


def perplexity(logits: np.ndarray, tokens: list[int]) -> float:
    """exp of the mean negative log-likelihood of tokens[1:] given logits [T, V] of tokens."""
    x = logits[:-1].astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    logp = x - np.log(np.exp(x).sum(-1, keepdims=True))
    nll = -logp[np.arange(len(tokens) - 1), tokens[1:]]
    return float(np.exp(nll.mean()))


def cpu_session(path: Path) -> ort.InferenceSession:
    """The bare graph on ONNX Runtime's CPU provider, quietly: the reference side of a check."""
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def check_fp32(precision: str, diff: float) -> None:
    """Raise VerificationError when an fp32 export's logits stray past FP32_TOLERANCE from PyTorch's."""
    if precision == "fp32" and not diff <= FP32_TOLERANCE:
        raise VerificationError(
            f"verification failed: max |logit diff| {diff:.3g} exceeds {FP32_TOLERANCE:g} for an fp32 export; "
            "the ONNX graph does not match PyTorch (please report this with the checkpoint's config)"
        )


class OnnxDecoder:
    """The bare graph with NumPy feeds: an independent path from runtime.Model."""

    def __init__(self, path: Path, n_layers: int, n_kv_heads: int, head_dim: int, kv_dtype,
                 graph: str = contract.GRAPH_PORTABLE):
        self.session = cpu_session(path)
        self.n_layers, self.kv_shape, self.kv_dtype = n_layers, (n_kv_heads, head_dim), kv_dtype
        self.positions = graph == contract.GRAPH_PORTABLE  # the fused graph derives them from the mask

    def __call__(self, ids: np.ndarray, past: list[np.ndarray] | None):
        b, s = ids.shape
        if past is None:
            past = [np.zeros((b, self.kv_shape[0], 0, self.kv_shape[1]), self.kv_dtype)] * (2 * self.n_layers)
        p = past[0].shape[2]
        feeds = {contract.INPUT_IDS: ids.astype(np.int64), contract.ATTENTION_MASK: np.ones((b, p + s), np.int64)}
        if self.positions:
            feeds[contract.POSITION_IDS] = np.broadcast_to(np.arange(p, p + s, dtype=np.int64), (b, s)).copy()
        feeds.update(zip(contract.past_names(self.n_layers), past))
        logits, *present = self.session.run(None, feeds)
        return logits, present

    def greedy(self, prompt: list[int], n: int) -> list[int]:
        ids, past, out = np.array([prompt]), None, []
        for _ in range(n):
            logits, past = self(ids, past)
            out.append(int(logits[0, -1].argmax()))
            ids = np.array([[out[-1]]])
        return out


def verify(folder: Path, reference: Transformer, *, greedy_tokens: int = 32) -> dict:
    """Compare folder/model.onnx with the float32 PyTorch reference; raise for a bad fp32 export."""
    a = reference.args
    cfg = FolderConfig.read(folder)
    precision = cfg.precision
    tokens = verify_tokens(folder, a.vocab_size)[: a.max_seq_len]  # not beyond the context (the fused graph's rotary table ends there)
    onnx_model = OnnxDecoder(folder / contract.MODEL_FILE, a.n_layers, a.n_kv_heads, a.head_dim, cfg.kv_dtype, cfg.graph)

    ids = torch.tensor([tokens])
    with torch.no_grad():
        ref_logits, _ = reference(ids, torch.ones_like(ids), torch.arange(len(tokens))[None], reference.empty_cache(1, torch.float32))
    ref = ref_logits[0].numpy()
    got = onnx_model(ids.numpy(), None)[0][0]
    diff = float(np.abs(got - ref).max())
    top1 = float((got.argmax(-1) == ref.argmax(-1)).mean())

    prompt = tokens[:GREEDY_PROMPT]
    ref_greedy = greedy(reference, prompt, greedy_tokens)
    onnx_greedy = onnx_model.greedy(prompt, greedy_tokens)
    agree = next((i for i, (x, y) in enumerate(zip(ref_greedy, onnx_greedy)) if x != y), greedy_tokens)
    result = {
        "prompt_tokens": len(tokens),
        "max_abs_logit_diff": diff,
        "top1_agreement": top1,
        "perplexity": perplexity(got, tokens),
        "reference_perplexity": perplexity(ref, tokens),
        "greedy_agreement": agree,
        "greedy_tokens": greedy_tokens,
        "reference": "pytorch float32",
    }
    check_fp32(precision, diff)
    return result

"""Classifier: an exported sequence classifier (Hugging Face's LlamaForSequenceClassification) on ONNX Runtime.

    from llama2_onnx.runtime import Classifier
    clf = Classifier.from_dir("out/llama-2-sentiment")
    clf.classify(["I loved it.", "Dull."])
    # [{"label": "POSITIVE", "score": 0.97, "scores": {"NEGATIVE": 0.03, "POSITIVE": 0.97}}, ...]

Texts are encoded with the folder's tokenizer (BOS as config.json's add_bos says, as transformers'
Llama tokenizer adds it), grouped by length into batches and right-padded (pad_batch), which both
graph kinds take; the graph returns each row's logits at its last real token (runtime/contract.py).
Scores follow transformers' text-classification pipeline (`activation`): softmax over the labels; a
sigmoid per label for a single label or problem_type multi_label_classification; the raw logits for
regression.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from llama2_onnx.errors import UserError

from . import contract
from .folder import FolderConfig
from .logprobs import log_softmax
from .session import Model
from .tokenizer import Tokenizer, load_tokenizer

FUNCTIONS = ("softmax", "sigmoid", "none")


def pad_batch(rows: Sequence[Sequence[int]], pad_id: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Token rows -> input_ids and attention_mask, both int64 [B, longest], right-padded with pad_id
    (0 without one: the mask alone marks padding then)."""
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), 0 if pad_id is None else pad_id, np.int64)
    mask = np.zeros((len(rows), width), np.int64)
    for b, row in enumerate(rows):
        ids[b, : len(row)] = row
        mask[b, : len(row)] = 1
    return ids, mask


def activation(config: FolderConfig) -> str:
    """transformers' TextClassificationPipeline default function_to_apply for this model."""
    if config.problem_type == "regression":
        return "none"
    if config.problem_type == "multi_label_classification" or config.model.num_labels == 1:
        return "sigmoid"
    return "softmax"


def apply(logits: np.ndarray, function: str) -> np.ndarray:
    """logits [N, num_labels] -> scores [N, num_labels] (float64) by softmax, sigmoid or none."""
    x = logits.astype(np.float64)
    if function == "softmax":
        return np.exp(log_softmax(x))
    if function == "sigmoid":
        return 1.0 / (1.0 + np.exp(-x))
    if function == "none":
        return x
    raise UserError(f"function_to_apply must be one of {', '.join(FUNCTIONS)}, got {function!r}")


@dataclass
class Classifier:
    model: Model
    tokenizer: Tokenizer | None
    batch_size: int = 8

    @classmethod
    def from_dir(cls, path: str | Path, *, batch_size: int = 8, **model_kwargs) -> "Classifier":
        """Open a classifier's model folder; model_kwargs as Model.from_dir's (provider, threads, ...).
        A text generator's folder is refused in one line."""
        if not isinstance(batch_size, int) or batch_size < 1:
            raise UserError(f"batch size must be at least 1, got {batch_size!r}")
        model = Model.from_dir(path, task=contract.TASK_CLASSIFICATION, **model_kwargs)
        cfg = model.config
        tok = load_tokenizer(model.folder, bos_id=cfg.model.bos_id, eos_id=cfg.model.eos_id) if cfg.tokenizer else None
        return cls(model, tok, batch_size)

    @property
    def config(self) -> FolderConfig:
        return self.model.config

    @property
    def labels(self) -> list[str]:
        return self.config.labels

    def encode(self, text: str, truncation: bool = False) -> list[int]:
        """text -> token ids (BOS as the folder says); longer than the context: cut (truncation) or refused."""
        if self.tokenizer is None:
            raise UserError(f"{self.model.folder} has no tokenizer: export it again with --tokenizer PATH, "
                            "or pass token ids to logits_ids")
        if not isinstance(text, str):
            raise UserError(f"text-classification takes strings, got {type(text).__name__}")
        ids = self.tokenizer.encode(text, bos=self.config.add_bos, eos=False)  # encode makes it well formed
        limit = self.config.model.max_seq_len
        if truncation:
            ids = ids[:limit]
        elif len(ids) > limit:
            raise UserError(f"a text of {len(ids)} tokens is longer than the model's context of {limit}: "
                            "shorten it or pass truncation=True (--truncate)")
        if not ids:
            raise UserError("a text is empty and the model adds no BOS: give some text to classify")
        return ids

    def logits_ids(self, rows: Sequence[Sequence[int]]) -> np.ndarray:
        """Token rows -> float32 logits [N, num_labels], batch_size rows of similar length at a time."""
        a = self.config.model
        for row in rows:
            if not 1 <= len(row) <= a.max_seq_len or min(row) < 0 or max(row) >= a.vocab_size:
                raise UserError(f"each row needs 1 to {a.max_seq_len} token ids from 0 to {a.vocab_size - 1}")
        out = np.zeros((len(rows), a.num_labels), np.float32)
        order = sorted(range(len(rows)), key=lambda i: len(rows[i]))  # similar lengths pad little
        for start in range(0, len(order), self.batch_size):
            chunk = order[start:start + self.batch_size]
            ids, mask = pad_batch([rows[i] for i in chunk], a.pad_id)
            out[chunk] = self.model.session.run([contract.LOGITS], {contract.INPUT_IDS: ids, contract.ATTENTION_MASK: mask})[0]
        return out

    def logits(self, texts: Sequence[str], truncation: bool = False) -> np.ndarray:
        """Texts -> float32 logits [N, num_labels] (the raw head: reward models' scores)."""
        return self.logits_ids([self.encode(t, truncation) for t in texts]) if texts else np.zeros((0, len(self.labels)), np.float32)

    def classify(self, texts: str | Sequence[str], *, function_to_apply: str | None = None,
                 truncation: bool = False) -> dict | list[dict]:
        """Per text {"label", "score", "scores": {label: score}}: the best label, its score, every label's.
        One string gives one dict, a list a list. function_to_apply: softmax, sigmoid or none
        (default: transformers' choice for the model, `activation`)."""
        single = isinstance(texts, str)
        scores = apply(self.logits([texts] if single else list(texts), truncation),
                       function_to_apply or activation(self.config))
        out = [{"label": self.labels[int(s.argmax())], "score": float(s.max()),
                "scores": dict(zip(self.labels, map(float, s)))} for s in scores]
        return out[0] if single else out


UNSET = object()  # top_k not given: transformers' legacy output (the best label only, a dict per text)


class TextClassificationPipeline:
    """transformers' TextClassificationPipeline over a Classifier (runtime/pipeline.py registers it):
    a string gives [{"label", "score"}], a list one such dict per text; with top_k (None: every label)
    a string gives its top_k {"label", "score"} best first, a list a list of those."""

    task = contract.TASK_CLASSIFICATION

    def __init__(self, classifier: Classifier, *, top_k=UNSET, function_to_apply: str | None = None):
        self.classifier, self.top_k, self.function_to_apply = classifier, top_k, function_to_apply

    def __call__(self, inputs: str | Sequence[str], *, top_k=UNSET, function_to_apply: str | None = None,
                 truncation: bool = False):
        top_k = self.top_k if top_k is UNSET else top_k
        if top_k is not UNSET and top_k is not None and (not isinstance(top_k, int) or top_k < 1):
            raise UserError(f"top_k must be a positive integer or None (every label), got {top_k!r}")
        function = function_to_apply or self.function_to_apply
        single = isinstance(inputs, str)
        texts = [inputs] if single else list(inputs)
        clf = self.classifier
        scores = apply(clf.logits(texts, truncation), (function or activation(clf.config)).lower())
        if top_k is UNSET:
            return [{"label": clf.labels[int(s.argmax())], "score": float(s.max())} for s in scores]
        ranked = [sorted(({"label": x, "score": float(v)} for x, v in zip(clf.labels, s)), key=lambda d: -d["score"])[:top_k]
                  for s in scores]
        return ranked[0] if single else ranked

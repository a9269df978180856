"""transformers' Auto classes over a model folder, without torch: the Hugging Face Llama 2 page's snippet
runs with only its import line and its model path changed.

    from llama2_onnx import AutoTokenizer, AutoModelForCausalLM
    tokenizer = AutoTokenizer.from_pretrained("out/llama-2-7b-chat")
    model = AutoModelForCausalLM.from_pretrained("out/llama-2-7b-chat", dtype="auto")  # HF-only options ignored
    inputs = tokenizer("Hello, my llama is", return_tensors="pt")      # "np" (or None: lists) without torch
    outputs = model.generate(**inputs, max_length=50)                  # prompt + new ids, as the input's type
    print(tokenizer.decode(outputs[0]))

The semantics are transformers': `generate` reads the folder's generation_config.json
(runtime/generation_config.py) and takes its fields as keyword arguments (explicit ones win);
do_sample false is greedy (the repetition penalty still applies); max_new_tokens wins over max_length,
which counts the input's (padded) length; rows stop at eos_token_id, which is kept, and rows that
end early are filled with pad_token_id up to the longest; num_return_sequences repeats each input
that many times, one after another (sampling only, as transformers). A left-padded batch is read
through its attention_mask (without one, pad_token_id marks the padding when it is not EOS).
Generation runs on the one engine (runtime/engine.py): greedy output is the Generator's, token
for token. Sampling draws from our sampler, so sampled ids differ from torch's; `seed=` (an
extension) makes them reproducible, row i with seed + i. `model(**inputs).logits` is a plain forward
(B, S, V); `AutoModelForSequenceClassification` gives a classifier folder's logits (B, num_labels).

Options of transformers that do not apply here (dtype, device_map, trust_remote_code, ...) are
accepted and ignored by from_pretrained; generate refuses, in one line, options it does not
implement (beams, streamers, ...) rather than ignore them. The tokenizer (runtime/hf_tokenizer.py) pads
with the folder's pad id (Llama 2 has none: EOS), on the left unless padding_side="right" is given.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from llama2_onnx.errors import UserError

from .generation_config import GenerationConfig
from .hf_tokenizer import AutoTokenizer, BatchEncoding, as_type_of, to_numpy
from .request import sampling

OURS = ("provider", "threads", "max_batch", "context", "prefix_cache", "prefix_cache_gb", "device_id")
GENERATE_KEYS = ("max_length", "max_new_tokens", "do_sample", "temperature", "top_p", "top_k", "repetition_penalty",
                 "num_return_sequences", "eos_token_id", "pad_token_id", "bos_token_id")
IGNORED = ("use_cache", "token_type_ids", "return_dict")  # change nothing here
OFF_ONLY = ("return_dict_in_generate", "output_scores", "output_logits", "output_attentions",
            "output_hidden_states")  # accepted when false (what they would return is not built)


class ModelOutput(dict):
    """A forward pass's result: .logits (and ["logits"])."""

    __getattr__ = BatchEncoding.__getattr__


# ---- the causal language model ----------------------------------------------------------------------


class AutoModelForCausalLM:
    @staticmethod
    def from_pretrained(path: str | Path, *args, **kwargs) -> "CausalLM":
        """Open a text-generation model folder; provider, threads, max_batch, context and prefix_cache
        are ours (Generator.from_dir's), every other keyword (dtype, device_map, ...) is ignored."""
        return CausalLM(Path(path), **{k: v for k, v in kwargs.items() if k in OURS})


class CausalLM:
    def __init__(self, folder: Path, **kwargs):
        from .generator import Generator

        self.name_or_path = str(folder)
        self.generator = Generator.from_dir(folder, **kwargs)
        self.config = self.generator.model.config.model
        self.generation_config = self.generator.generation
        self.device = "cpu" if self.generator.model.provider.device == "cpu" else self.generator.model.provider.device

    def eval(self) -> "CausalLM":
        return self

    def to(self, *args, **kwargs) -> "CausalLM":
        return self

    def close(self) -> None:
        self.generator.close()

    def __call__(self, input_ids=None, attention_mask=None, **ignored) -> ModelOutput:
        """A plain forward: logits (B, S, V) for every position (padding positions hold zeros)."""
        ids = to_numpy(input_ids, "input_ids")
        mask = np.ones_like(ids) if attention_mask is None else to_numpy(attention_mask, "attention_mask")
        model = self.generator.model
        out = np.zeros((*ids.shape, self.config.vocab_size), np.float32)
        for b in range(ids.shape[0]):
            keep = mask[b] != 0
            row = ids[b][keep][None]
            if row.shape[1]:
                cache = model.new_cache(np.ones_like(row), capacity=row.shape[1])  # not a full context per row
                out[b, keep] = model.step(row, np.ones_like(row), cache, all_logits=True)[0]
        return ModelOutput(logits=as_type_of(input_ids, out))

    forward = __call__

    def generate(self, inputs=None, generation_config: GenerationConfig | dict | None = None, *, input_ids=None,
                 attention_mask=None, seed: int | None = None, **kwargs):
        """transformers' generate (see the module docstring): prompt + new ids, in the input's array type."""
        given = inputs if inputs is not None else input_ids
        if given is None:
            raise UserError("generate needs input_ids (the tokenizer's output: model.generate(**inputs))")
        for key in list(kwargs):
            if key in IGNORED or (key in OFF_ONLY and not kwargs[key]):
                kwargs.pop(key)
        unknown = sorted(set(kwargs) - set(GENERATE_KEYS))
        if unknown:
            raise UserError(f"generate does not support {', '.join(unknown)} here; it takes {', '.join(GENERATE_KEYS)} and seed")
        base = generation_config.given if isinstance(generation_config, GenerationConfig) else \
            (generation_config or self.generation_config.given)
        cfg = GenerationConfig.parse({**base, **{k: v for k, v in kwargs.items() if v is not None}}, "generate()")
        ids = to_numpy(given, "input_ids")
        prompts = self._prompts(ids, attention_mask, cfg)
        params, n, limit, eos, pad = self._settings(cfg, ids.shape[1])
        rows = [p for p in prompts for _ in range(n)]
        results = self.generator.generate_ids(rows, limit, params, seed=seed, stop_ids=eos)
        new = [r.tokens + ([r.stop_token] if r.stop_token is not None else []) for r in results]
        width = max(map(len, new))
        out = np.full((len(rows), ids.shape[1] + width), pad, np.int64)
        for i, tokens in enumerate(new):
            out[i, :ids.shape[1]] = ids[i // n]
            out[i, ids.shape[1]:ids.shape[1] + len(tokens)] = tokens
        return as_type_of(given, out)

    def _prompts(self, ids: np.ndarray, attention_mask, cfg: GenerationConfig) -> list[list[int]]:
        eos = cfg.eos_token_id if cfg.eos_token_id is not None else self.config.eos_ids
        eos = set(eos if isinstance(eos, list) else [eos])
        if attention_mask is not None:
            mask = to_numpy(attention_mask, "attention_mask")
            if mask.shape != ids.shape:
                raise UserError(f"attention_mask has shape {mask.shape}, input_ids {ids.shape}; they must match")
        elif cfg.pad_token_id is not None and cfg.pad_token_id not in eos and (ids == cfg.pad_token_id).any():
            mask = (ids != cfg.pad_token_id).astype(np.int64)  # transformers' inference of the padding
        else:
            mask = np.ones_like(ids)
        prompts = [[int(t) for t in row[m != 0]] for row, m in zip(ids, mask)]
        if any(not p for p in prompts):
            raise UserError("a row of input_ids is all padding: give each row at least one token")
        return prompts

    def _settings(self, cfg: GenerationConfig, input_len: int):
        n = cfg.num_return_sequences
        if not cfg.do_sample and n > 1:
            raise UserError("num_return_sequences > 1 needs do_sample=True (greedy rows would all be the same)")
        if cfg.do_sample and cfg.temperature == 0:
            raise UserError("temperature must be > 0 when do_sample is true (do_sample=False is greedy)")
        if cfg.given.get("max_new_tokens") is not None:
            limit = cfg.max_new_tokens
        else:
            limit = cfg.max_length - input_len
            if limit < 1:
                raise UserError(f"max_length {cfg.max_length} leaves no room after the input's {input_len} tokens; "
                                "raise it or pass max_new_tokens")
        params = sampling("hf", folder=cfg)  # the merged config: its do_sample and values over transformers' defaults
        eos = cfg.eos_token_id if cfg.eos_token_id is not None else self.config.eos_ids
        eos = tuple(eos if isinstance(eos, list) else [eos])
        pad = cfg.pad_token_id if cfg.pad_token_id is not None else eos[0]
        return params, n, limit, eos, pad


# ---- the classifier ------------------------------------------------------------------------------


class AutoModelForSequenceClassification:
    @staticmethod
    def from_pretrained(path: str | Path, *args, **kwargs) -> "SequenceClassifier":
        return SequenceClassifier(Path(path), **{k: v for k, v in kwargs.items() if k in ("provider", "threads")})


class SequenceClassifier:
    def __init__(self, folder: Path, **kwargs):
        from .classifier import Classifier

        self.name_or_path = str(folder)
        self.classifier = Classifier.from_dir(folder, **kwargs)
        self.config = self.classifier.config.model
        self.id2label = dict(enumerate(self.classifier.labels))
        self.label2id = {v: k for k, v in self.id2label.items()}

    def eval(self) -> "SequenceClassifier":
        return self

    def to(self, *args, **kwargs) -> "SequenceClassifier":
        return self

    def __call__(self, input_ids=None, attention_mask=None, **ignored) -> ModelOutput:
        """logits (B, num_labels): the head at each row's last real token."""
        ids = to_numpy(input_ids, "input_ids")
        mask = np.ones_like(ids) if attention_mask is None else to_numpy(attention_mask, "attention_mask")
        rows = [[int(t) for t in row[m != 0]] for row, m in zip(ids, mask)]
        return ModelOutput(logits=as_type_of(input_ids, self.classifier.logits_ids(rows)))

    forward = __call__


__all__ = ["AutoTokenizer", "AutoModelForCausalLM", "AutoModelForSequenceClassification", "BatchEncoding"]

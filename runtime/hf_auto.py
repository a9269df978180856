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
implement (beams, streamers, ...) rather than ignore them. The tokenizer pads with the folder's
pad id (Llama 2 has none: EOS), on the left unless the folder's tokenizer_config.json says otherwise.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from llama2_onnx.errors import UserError

from .generation_config import GenerationConfig
from .request import sampling

OURS = ("provider", "threads", "max_batch", "context", "prefix_cache", "prefix_cache_gb", "device_id")
GENERATE_KEYS = ("max_length", "max_new_tokens", "do_sample", "temperature", "top_p", "top_k", "repetition_penalty",
                 "num_return_sequences", "eos_token_id", "pad_token_id", "bos_token_id")
IGNORED = ("use_cache", "token_type_ids", "return_dict")  # change nothing here
OFF_ONLY = ("return_dict_in_generate", "output_scores", "output_logits", "output_attentions",
            "output_hidden_states")  # accepted when false (what they would return is not built)


# ---- arrays: numpy in and out, torch only when the caller's are torch ----------------------------------


def _is_torch(x: Any) -> bool:
    return type(x).__module__.split(".")[0] == "torch"


def _to_numpy(x: Any, name: str) -> np.ndarray:
    if _is_torch(x):
        x = x.detach().cpu().numpy()
    try:
        a = np.asarray(x)
    except (TypeError, ValueError):
        raise UserError(f"{name} must be token ids (a list, numpy array or torch tensor)") from None
    if a.dtype.kind not in "iub" or a.ndim not in (1, 2) or a.size == 0:
        raise UserError(f"{name} must be a non-empty 1-D or 2-D array of integer token ids, got shape {a.shape} of {a.dtype}")
    return (a[None] if a.ndim == 1 else a).astype(np.int64)


def _as(like: Any, a: np.ndarray):
    """a in the caller's array type: a torch tensor where like is one, else numpy."""
    if _is_torch(like):
        import torch

        return torch.from_numpy(np.ascontiguousarray(a)).to(like.device)
    return a


def _tensors(rows: list[list[int]], kind: str | None):
    if kind is None:
        return rows
    a = np.array(rows, np.int64)
    if kind == "np":
        return a
    if kind == "pt":
        try:
            import torch
        except ImportError:
            raise UserError('return_tensors="pt" needs torch installed; use return_tensors="np" without it') from None
        return torch.from_numpy(a)
    raise UserError(f'return_tensors must be "np" or "pt" (or None for lists), got {kind!r}')


class BatchEncoding(dict):
    """transformers' BatchEncoding: a dict (input_ids, attention_mask) whose keys read as attributes."""

    def __getattr__(self, name: str):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def to(self, device: Any) -> "BatchEncoding":
        """transformers' .to(model.device): torch tensors move; numpy arrays and lists stay as they are."""
        return BatchEncoding({k: v.to(device) if _is_torch(v) else v for k, v in self.items()})


class ModelOutput(dict):
    """A forward pass's result: .logits (and ["logits"])."""

    __getattr__ = BatchEncoding.__getattr__


# ---- the tokenizer ---------------------------------------------------------------------------------


class AutoTokenizer:
    @staticmethod
    def from_pretrained(path: str | Path, *args, padding_side: str | None = None, **ignored) -> "FolderTokenizer":
        return FolderTokenizer(Path(path), padding_side)


class FolderTokenizer:
    """The model folder's tokenizer with transformers' calling conventions."""

    def __init__(self, folder: Path, padding_side: str | None = None):
        from .folder import FolderConfig
        from .tokenizer import load_tokenizer

        self.name_or_path = str(folder)
        self.config = FolderConfig.read(folder)
        a = self.config.model
        if not self.config.tokenizer:
            raise UserError(f"{folder} has no tokenizer; export it again with --tokenizer PATH")
        self.tok = load_tokenizer(folder, bos_id=a.bos_id, eos_id=a.eos_id)
        extra = {}
        if (folder / "tokenizer_config.json").is_file():
            try:
                extra = json.loads((folder / "tokenizer_config.json").read_text())
            except (OSError, ValueError):
                extra = {}
        self.padding_side = padding_side or extra.get("padding_side") or "left"
        if self.padding_side not in ("left", "right"):
            raise UserError(f'padding_side must be "left" or "right", got {self.padding_side!r}')
        self.bos_token_id, self.eos_token_id, self.pad_token_id = a.bos_id, a.eos_id, a.fill_id
        self.model_max_length = a.max_seq_len
        self.chat_format = self.config.chat_format
        self.add_bos = self.config.add_bos

    # names as tokens
    @property
    def bos_token(self) -> str:
        return self.tok.id_to_piece(self.bos_token_id)

    @property
    def eos_token(self) -> str:
        return self.tok.id_to_piece(self.eos_token_id)

    @property
    def pad_token(self) -> str:
        return self.tok.id_to_piece(self.pad_token_id)

    @property
    def vocab_size(self) -> int:
        return self.tok.vocab_size

    def __len__(self) -> int:
        return self.tok.vocab_size

    def convert_ids_to_tokens(self, ids):
        return self.tok.id_to_piece(ids) if isinstance(ids, (int, np.integer)) else [self.tok.id_to_piece(i) for i in ids]

    # text -> ids
    def encode(self, text: str, add_special_tokens: bool = True, return_tensors: str | None = None, **kw):
        ids = self(text, add_special_tokens=add_special_tokens, **kw)["input_ids"]
        return ids if return_tensors is None else _tensors([ids], return_tensors)

    def __call__(self, text: str | Sequence[str], add_special_tokens: bool = True, padding: bool | str = False,
                 truncation: bool | str = False, max_length: int | None = None, return_tensors: str | None = None,
                 return_attention_mask: bool = True, **ignored) -> BatchEncoding:
        single = isinstance(text, str)
        texts = [text] if single else list(text)
        if not texts or not all(isinstance(t, str) for t in texts):
            raise UserError("the tokenizer takes a string or a list of strings")
        rows = [self.tok.encode(t, bos=add_special_tokens and self.add_bos, eos=False) for t in texts]
        if truncation and truncation != "do_not_truncate":
            limit = max_length or self.model_max_length
            rows = [r[:limit] for r in rows]
        masks = [[1] * len(r) for r in rows]
        if padding in (True, "longest", "max_length"):
            width = max(map(len, rows))
            if padding == "max_length":
                if not max_length:
                    raise UserError('padding="max_length" needs max_length')
                width = max(width, max_length)
            rows = [self._pad(r, width, self.pad_token_id) for r in rows]
            masks = [self._pad(m, width, 0) for m in masks]
        elif padding not in (False, None, "do_not_pad"):
            raise UserError(f'padding must be True, False, "longest" or "max_length", got {padding!r}')
        if return_tensors is not None and len(set(map(len, rows))) > 1:
            raise UserError("these texts have different lengths: pass padding=True to make one array of them")
        if single and return_tensors is None:
            out = {"input_ids": rows[0], "attention_mask": masks[0]}
        else:
            out = {"input_ids": _tensors(rows, return_tensors), "attention_mask": _tensors(masks, return_tensors)}
        if not return_attention_mask:
            out.pop("attention_mask")
        return BatchEncoding(out)

    def _pad(self, row: list[int], width: int, value: int) -> list[int]:
        fill = [value] * (width - len(row))
        return fill + row if self.padding_side == "left" else row + fill

    # ids -> text
    def decode(self, ids, skip_special_tokens: bool = False, **ignored) -> str:
        row = _to_numpy(ids, "ids")
        if row.shape[0] != 1:
            raise UserError("decode takes one sequence of ids; use batch_decode for several")
        row = [int(t) for t in row[0]]
        special = self._special_ids()
        out, run = [], []
        for t in row:
            if t in special:
                out.append(self._text(run, after=any(out)))
                run = []
                if not skip_special_tokens:
                    out.append(self.tok.id_to_piece(t))
            else:
                run.append(t)
        out.append(self._text(run, after=any(out)))
        return "".join(out)

    def batch_decode(self, sequences, skip_special_tokens: bool = False, **kw) -> list[str]:
        rows = _to_numpy(sequences, "sequences") if not isinstance(sequences, list) or sequences and \
            not isinstance(sequences[0], list) else sequences
        return [self.decode(list(r), skip_special_tokens=skip_special_tokens, **kw) for r in rows]

    def _special_ids(self) -> set[int]:
        a = self.config.model
        ids = {a.bos_id, *a.eos_ids, a.fill_id}
        return {i for i in ids if i is not None and i >= 0}

    def _text(self, run: list[int], after: bool) -> str:
        """A run of ordinary tokens; after a special token SentencePiece's word-start space is kept, as
        transformers' Llama tokenizer keeps it ("<s> Hello")."""
        if not run:
            return ""
        text = self.tok.decode(run)
        if after and self.tok.id_to_piece(run[0]).startswith("\u2581") and not text.startswith(" "):
            text = " " + text
        return text

    # chat
    def apply_chat_template(self, conversation: list[dict], tokenize: bool = True, add_generation_prompt: bool = True,
                            return_tensors: str | None = None, return_dict: bool = False, **ignored):
        """The folder's chat format (runtime/chat_format.py) applied to the messages; the prompt always
        ends ready for the assistant's answer (or continues a final assistant message)."""
        from .chat_format import format_dialog

        if not self.chat_format:
            raise UserError("this model folder names no chat format; export it again with --chat-format llama2 or chatml")
        ids = format_dialog(list(conversation), self.tok, self.chat_format)
        if not tokenize:
            return self.decode(ids)
        if return_dict:
            return BatchEncoding({"input_ids": _tensors([ids], return_tensors) if return_tensors else ids,
                                  "attention_mask": _tensors([[1] * len(ids)], return_tensors) if return_tensors
                                  else [1] * len(ids)})
        return _tensors([ids], return_tensors) if return_tensors else ids


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
        ids = _to_numpy(input_ids, "input_ids")
        mask = np.ones_like(ids) if attention_mask is None else _to_numpy(attention_mask, "attention_mask")
        model = self.generator.model
        out = np.zeros((*ids.shape, self.config.vocab_size), np.float32)
        for b in range(ids.shape[0]):
            keep = mask[b] != 0
            row = ids[b][keep][None]
            if row.shape[1]:
                cache = model.new_cache(np.ones_like(row), capacity=row.shape[1])  # not a full context per row
                out[b, keep] = model.step(row, np.ones_like(row), cache, all_logits=True)[0]
        return ModelOutput(logits=_as(input_ids, out))

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
        ids = _to_numpy(given, "input_ids")
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
        return _as(given, out)

    def _prompts(self, ids: np.ndarray, attention_mask, cfg: GenerationConfig) -> list[list[int]]:
        eos = cfg.eos_token_id if cfg.eos_token_id is not None else self.config.eos_ids
        eos = set(eos if isinstance(eos, list) else [eos])
        if attention_mask is not None:
            mask = _to_numpy(attention_mask, "attention_mask")
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
        ids = _to_numpy(input_ids, "input_ids")
        mask = np.ones_like(ids) if attention_mask is None else _to_numpy(attention_mask, "attention_mask")
        rows = [[int(t) for t in row[m != 0]] for row, m in zip(ids, mask)]
        return ModelOutput(logits=_as(input_ids, self.classifier.logits_ids(rows)))

    forward = __call__


__all__ = ["AutoTokenizer", "AutoModelForCausalLM", "AutoModelForSequenceClassification", "BatchEncoding"]

"""ModelArgs: the one typed description of a Llama model. Torch-free.

Built from Meta's ``params.json``, a Hugging Face ``config.json`` or GGUF
metadata; written to and read from our model folder's ``config.json``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llama2_onnx.errors import UserError


class ConfigError(UserError, ValueError):
    """A model configuration is missing a field or holds an impossible value.

    fields: the ModelArgs fields the message names, so that a reader of another format can
    name them as its file does (``renamed``)."""

    def __init__(self, message: str, fields: tuple[str, ...] = ()):
        super().__init__(message)
        self.fields = fields

    def renamed(self, keys: dict[str, str], fix: str) -> "ConfigError":
        """The same error in a source file's key names, with what to do."""
        text = str(self)
        for f in self.fields:
            text = re.sub(rf"\b{f}\b", keys.get(f, f), text)
        return ConfigError(f"{text}: {fix}")


# Upper bounds, far above every published Llama-architecture model (405B: dim 16384, 126 layers,
# 128 heads, ffn 53248; the longest context, Gradient's Llama-3 1048k, is 2**20 positions), and
# low enough that what is sized from the config before any weight is read stays small: the ort
# graph's rotary tables (max_seq_len x head_dim/2, twice), the KV cache, the table of expected tensors.
INT_LIMITS = {"dim": 2**16, "n_layers": 2**10, "n_heads": 2**10, "n_kv_heads": 2**10, "vocab_size": 2**22,
              "multiple_of": 2**16, "ffn_hidden_dim": 2**18, "max_seq_len": 2**20, "num_labels": 2**16}
MAX_SEQ_LEN = INT_LIMITS["max_seq_len"]
OPTIONAL = ("n_kv_heads", "ffn_hidden_dim", "ffn_dim_multiplier", "pad_id", "num_labels")  # None allowed: derived or absent
TOKEN_IDS = ("bos_id", "eos_id", "pad_id")


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


def check_value(name: str, value: Any) -> None:
    """One field's type and range, before anything is derived from it."""
    if value is None and name in OPTIONAL:
        return
    if name in INT_LIMITS:
        if not _is_int(value) or not 1 <= value <= INT_LIMITS[name]:
            raise ConfigError(f"{name} must be an integer from 1 to {INT_LIMITS[name]}, got {_show(value)}", (name,))
    elif name in TOKEN_IDS:
        if not _is_int(value) or value < 0:
            raise ConfigError(f"{name} must be a token id (an integer from 0), got {_show(value)}", (name,))
    elif name == "extra_eos_ids":
        if not isinstance(value, list) or not all(_is_int(i) and i >= 0 for i in value):
            raise ConfigError(f"{name} must be a list of token ids, got {_show(value)}", (name,))
    elif name == "tie_embeddings":
        if not isinstance(value, bool):
            raise ConfigError(f"{name} must be true or false, got {_show(value)}", (name,))
    elif name == "norm_eps":
        if not _is_number(value) or not 0 < value < 1:
            raise ConfigError(f"{name} must be a number between 0 and 1 (Llama: 1e-5 or 1e-6), got {_show(value)}", (name,))
    elif name == "rope_theta":
        if not _is_number(value) or value <= 0:
            raise ConfigError(f"{name} must be a positive number (Llama 2: 10000), got {_show(value)}", (name,))
    elif name == "ffn_dim_multiplier":
        # bounded so that Meta's width rule stays finite; Llama 3 and 70B use 1.3
        if not _is_number(value) or not 0 < value <= 16:
            raise ConfigError(f"{name} must be a number above 0 and at most 16, got {_show(value)}", (name,))


@dataclass
class ModelArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None  # None: same as n_heads (multi-head attention)
    vocab_size: int = 32000
    multiple_of: int = 256  # Meta's rule for the feed-forward width
    ffn_dim_multiplier: float | None = None
    ffn_hidden_dim: int | None = None  # explicit width (HF intermediate_size, GGUF); else Meta's rule
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 4096
    tie_embeddings: bool = False
    bos_id: int = 1
    eos_id: int = 2
    pad_id: int | None = None
    extra_eos_ids: list[int] = field(default_factory=list)  # e.g. ChatML's <|im_end|>
    # A sequence classifier (HF LlamaForSequenceClassification): the `score` head's rows, in place of
    # the vocabulary head. None: a causal language model.
    num_labels: int | None = None

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            check_value(f.name, getattr(self, f.name))  # types first: the derived sizes below trust them
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.ffn_hidden_dim is None:
            self.ffn_hidden_dim = meta_ffn_hidden_dim(self.dim, self.multiple_of, self.ffn_dim_multiplier)
        self.validate()

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def n_rep(self) -> int:
        """How many query heads share one key/value head."""
        return self.n_heads // self.n_kv_heads

    @property
    def is_classifier(self) -> bool:
        return self.num_labels is not None

    @property
    def fill_id(self) -> int:
        """The token that pads a row: pad_id, else EOS."""
        return self.pad_id if self.pad_id is not None else self.eos_id

    @property
    def eos_ids(self) -> list[int]:
        return [self.eos_id, *[i for i in self.extra_eos_ids if i != self.eos_id]]

    def validate(self) -> None:
        """Every field's type and range, and the sizes against each other."""
        for f in dataclasses.fields(self):
            check_value(f.name, getattr(self, f.name))
        if self.dim % self.n_heads:
            raise ConfigError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}", ("dim", "n_heads"))
        if self.head_dim % 2:
            raise ConfigError(f"head_dim {self.head_dim} (dim / n_heads) must be even for rotary embeddings",
                              ("dim", "n_heads"))
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}",
                              ("n_heads", "n_kv_heads"))
        for name in TOKEN_IDS:
            token = getattr(self, name)
            if token is not None and token >= self.vocab_size:
                raise ConfigError(f"{name} {token} is outside the vocabulary (vocab_size {self.vocab_size})",
                                  (name, "vocab_size"))
        bad = [i for i in self.extra_eos_ids if i >= self.vocab_size]
        if bad:
            raise ConfigError(f"eos_id {bad[0]} is outside the vocabulary (vocab_size {self.vocab_size})",
                              ("eos_id", "vocab_size"))

    # ---- JSON ------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelArgs":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ConfigError(f"unknown ModelArgs fields: {', '.join(sorted(unknown))}")
        try:
            return cls(**d)
        except TypeError as e:
            raise ConfigError(str(e)) from None

    # ---- presets -----------------------------------------------------------
    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> "ModelArgs":
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    # ---- sources -----------------------------------------------------------
    @classmethod
    def _from_source(cls, kw: dict[str, Any], keys: dict[str, str], fix: str) -> "ModelArgs":
        """ModelArgs(**kw), its errors in the source file's key names (keys: field -> key)."""
        try:
            return cls(**kw)
        except ConfigError as e:
            raise e.renamed(keys, fix) from None

    @classmethod
    def from_params_json(cls, params: dict[str, Any], vocab_size: int | None = None) -> "ModelArgs":
        """Meta's params.json. Its vocab_size is -1 in the Llama 2 release: pass the real one."""
        try:
            kw = dict(
                dim=params["dim"], n_layers=params["n_layers"], n_heads=params["n_heads"],
                n_kv_heads=params.get("n_kv_heads"), multiple_of=params.get("multiple_of", 256),
                ffn_dim_multiplier=params.get("ffn_dim_multiplier"), norm_eps=params.get("norm_eps", 1e-5),
                rope_theta=params.get("rope_theta", 10000.0),
            )
        except KeyError as e:
            raise ConfigError(f"params.json has no {e.args[0]!r}") from None
        vocab = params.get("vocab_size", -1)
        kw["vocab_size"] = vocab_size if vocab in (-1, None) else vocab
        if kw["vocab_size"] in (-1, None):
            raise ConfigError("params.json has vocab_size -1 and no tokenizer or embedding to take it from")
        if "max_seq_len" in params:
            kw["max_seq_len"] = params["max_seq_len"]
        return cls._from_source(kw, {}, "fix it in params.json (the one from the same download as the weights)")

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> "ModelArgs":
        """A Hugging Face LlamaForCausalLM or LlamaForSequenceClassification config.json."""
        fix = "fix it in config.json (the one that came with the weights)"
        arch = cfg.get("model_type")
        if arch not in (None, "llama"):
            raise ConfigError(f"config.json is for model_type {_show(arch)}; only 'llama' is supported")
        heads = cfg.get("architectures") or []
        if not isinstance(heads, list):
            raise ConfigError(f"architectures must be a list, got {_show(heads)}: {fix}")
        other = [h for h in heads if h not in HF_ARCHITECTURES]
        if other and any(str(h).startswith("LlamaFor") for h in other):
            raise ConfigError(f"architecture {_show(other[0])} is not supported; only "
                              f"{' and '.join(HF_ARCHITECTURES)}")
        rope = cfg.get("rope_scaling") or {}
        params = cfg.get("rope_parameters") or {}  # transformers 5 folds rope_theta in here
        for key, value in (("rope_scaling", rope), ("rope_parameters", params)):
            if not isinstance(value, dict):
                raise ConfigError(f"{key} must be an object or null, got {_show(value)}: {fix}")
        rope_type = rope.get("rope_type", rope.get("type")) or params.get("rope_type", "default")
        if rope_type not in ("default", None):
            raise ConfigError(f"rope scaling {_show(rope_type)} is not supported (Llama 2 uses none)")
        try:
            eos = cfg.get("eos_token_id", 2)
            eos_list = (eos if isinstance(eos, list) else [eos]) or [None]
            bos, tie = cfg.get("bos_token_id"), cfg.get("tie_word_embeddings")
            kw = dict(
                dim=cfg["hidden_size"], n_layers=cfg["num_hidden_layers"], n_heads=cfg["num_attention_heads"],
                n_kv_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
                vocab_size=cfg["vocab_size"], ffn_hidden_dim=cfg["intermediate_size"],
                # Llama-2-7b-chat's config.json says 1e-6 where params.json says 1e-5:
                # we take the file we are given at its word.
                norm_eps=cfg.get("rms_norm_eps", 1e-5),
                rope_theta=params.get("rope_theta", cfg.get("rope_theta", 10000.0)),
                max_seq_len=cfg.get("max_position_embeddings", 4096),
                tie_embeddings=False if tie is None else tie,
                bos_id=1 if bos is None else bos,
                eos_id=eos_list[0] if eos_list[0] is not None else 2,
                extra_eos_ids=[e for e in eos_list[1:] if e is not None],
                pad_id=cfg.get("pad_token_id"),
                num_labels=len(hf_labels(cfg)) if HF_CLASSIFIER in heads else None,
            )
        except KeyError as e:
            raise ConfigError(f"config.json has no {e.args[0]!r}") from None
        args = cls._from_source(kw, HF_KEYS, fix)
        if cfg.get("head_dim") not in (None, args.head_dim):
            raise ConfigError(f"head_dim {_show(cfg['head_dim'])} != hidden_size / num_attention_heads "
                              f"({args.head_dim}): {fix}")
        return args

    @classmethod
    def from_gguf_metadata(cls, meta: dict[str, Any], vocab_size: int | None, tie_embeddings: bool,
                           num_labels: int | None = None) -> "ModelArgs":
        """GGUF key/values (plain Python values) of architecture 'llama'; num_labels: the rows of
        its classifier head (cls.output), None when it has none."""
        arch = meta.get("general.architecture")
        if arch != "llama":
            raise ConfigError(f"GGUF architecture {_show(arch)} is not supported; only 'llama'")
        p = "llama."
        try:
            n_heads = meta[p + "attention.head_count"]
            kw = dict(
                dim=meta[p + "embedding_length"], n_layers=meta[p + "block_count"], n_heads=n_heads,
                n_kv_heads=meta.get(p + "attention.head_count_kv", n_heads),
                vocab_size=vocab_size, ffn_hidden_dim=meta[p + "feed_forward_length"],
                norm_eps=meta.get(p + "attention.layer_norm_rms_epsilon", 1e-5),
                rope_theta=meta.get(p + "rope.freq_base", 10000.0),
                max_seq_len=meta.get(p + "context_length", 4096),
                tie_embeddings=tie_embeddings,
                bos_id=meta.get("tokenizer.ggml.bos_token_id", 1),
                eos_id=meta.get("tokenizer.ggml.eos_token_id", 2),
                pad_id=meta.get("tokenizer.ggml.padding_token_id"), num_labels=num_labels,
            )
        except KeyError as e:
            raise ConfigError(f"GGUF metadata has no {e.args[0]!r}") from None
        return cls._from_source(kw, GGUF_KEYS, "the file's metadata is wrong: convert the model again with llama.cpp")


# How each source names the ModelArgs fields (Meta's params.json uses ours).
HF_KEYS = {"dim": "hidden_size", "n_layers": "num_hidden_layers", "n_heads": "num_attention_heads",
           "n_kv_heads": "num_key_value_heads", "ffn_hidden_dim": "intermediate_size", "norm_eps": "rms_norm_eps",
           "max_seq_len": "max_position_embeddings", "tie_embeddings": "tie_word_embeddings",
           "bos_id": "bos_token_id", "eos_id": "eos_token_id", "extra_eos_ids": "eos_token_id", "pad_id": "pad_token_id",
           "num_labels": "id2label"}
GGUF_KEYS = {"dim": "llama.embedding_length", "n_layers": "llama.block_count", "n_heads": "llama.attention.head_count",
             "n_kv_heads": "llama.attention.head_count_kv", "ffn_hidden_dim": "llama.feed_forward_length",
             "norm_eps": "llama.attention.layer_norm_rms_epsilon",
             "rope_theta": "llama.rope.freq_base", "max_seq_len": "llama.context_length",
             "bos_id": "tokenizer.ggml.bos_token_id", "eos_id": "tokenizer.ggml.eos_token_id",
             "pad_id": "tokenizer.ggml.padding_token_id"}


HF_CLASSIFIER = "LlamaForSequenceClassification"
GGUF_LABELS = "llama.classifier.output_labels"  # a GGUF classifier's labels by id
HF_ARCHITECTURES = ("LlamaForCausalLM", HF_CLASSIFIER)
PROBLEM_TYPES = ("regression", "single_label_classification", "multi_label_classification")


def default_labels(n: int) -> list[str]:
    """transformers' names for labels a config does not name: LABEL_0 ... LABEL_{n-1}."""
    return [f"LABEL_{i}" for i in range(n)]


def hf_labels(cfg: dict[str, Any]) -> list[str]:
    """A classifier config's labels in id order, as transformers reads them: id2label; an explicit
    num_labels that disagrees with it wins with LABEL_i names; neither gives transformers' default two."""
    id2label, n = cfg.get("id2label"), cfg.get("num_labels")
    fix = "fix id2label in config.json (the one that came with the weights)"
    limit = INT_LIMITS["num_labels"]  # checked before any label list is built from it
    if n is not None and not (isinstance(n, int) and not isinstance(n, bool) and 1 <= n <= limit):
        raise ConfigError(f"num_labels must be an integer from 1 to {limit}, got {_show(n)}: {fix}")
    if isinstance(id2label, dict) and len(id2label) > limit:
        raise ConfigError(f"id2label names {len(id2label)} labels; at most {limit}: {fix}")
    if id2label is None or (n is not None and isinstance(id2label, dict) and n != len(id2label)):
        return default_labels(2 if n is None else n)
    if not isinstance(id2label, dict) or not id2label:
        raise ConfigError(f"id2label must be an object of label names by id, got {_show(id2label)}: {fix}")
    want = {str(i) for i in range(len(id2label))}
    if set(map(str, id2label)) != want or not all(isinstance(v, str) for v in id2label.values()):
        raise ConfigError(f"id2label must name ids 0 to {len(id2label) - 1} with strings, got {_show(id2label)}: {fix}")
    by_id = {str(k): v for k, v in id2label.items()}
    return [by_id[str(i)] for i in range(len(by_id))]


def meta_ffn_hidden_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """Meta's FeedForward width: 2/3 of 4*dim, scaled, rounded up to multiple_of."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


PRESETS: dict[str, dict[str, Any]] = {
    "7B": dict(dim=4096, n_layers=32, n_heads=32, multiple_of=256),
    "13B": dict(dim=5120, n_layers=40, n_heads=40, multiple_of=256),
    "70B": dict(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, multiple_of=4096, ffn_dim_multiplier=1.3),
}


def load_json(path: str | Path) -> dict[str, Any]:
    """Read a JSON object, turning every failure into one ConfigError line."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path} not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} does not hold a JSON object")
    return data

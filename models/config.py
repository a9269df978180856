"""ModelArgs: the one typed description of a Llama model. Torch-free.

Built from Meta's ``params.json``, a Hugging Face ``config.json`` or GGUF
metadata; written to and read from our model folder's ``config.json``.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llama2_onnx.errors import UserError


class ConfigError(UserError, ValueError):
    """A model configuration is missing a field or holds an impossible value."""


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

    def __post_init__(self) -> None:
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
    def eos_ids(self) -> list[int]:
        return [self.eos_id, *[i for i in self.extra_eos_ids if i != self.eos_id]]

    def validate(self) -> None:
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "max_seq_len", "ffn_hidden_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.dim % self.n_heads:
            raise ConfigError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim {self.head_dim} must be even for rotary embeddings")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")
        if not self.norm_eps > 0 or not self.rope_theta > 0:
            raise ConfigError("norm_eps and rope_theta must be positive")

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
        return cls(**kw)

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> "ModelArgs":
        """A Hugging Face LlamaForCausalLM config.json."""
        arch = cfg.get("model_type")
        if arch not in (None, "llama"):
            raise ConfigError(f"config.json is for model_type {arch!r}; only 'llama' is supported")
        rope = cfg.get("rope_scaling") or {}
        params = cfg.get("rope_parameters") or {}  # transformers 5 folds rope_theta in here
        rope_type = rope.get("rope_type", rope.get("type")) or params.get("rope_type", "default")
        if rope_type not in ("default", None):
            raise ConfigError(f"rope scaling {rope_type!r} is not supported (Llama 2 uses none)")
        try:
            dim, n_heads = cfg["hidden_size"], cfg["num_attention_heads"]
            if cfg.get("head_dim") not in (None, dim // n_heads):
                raise ConfigError(f"head_dim {cfg['head_dim']} != hidden_size / num_attention_heads")
            eos = cfg.get("eos_token_id", 2)
            eos_list = eos if isinstance(eos, list) else [eos]
            return cls(
                dim=dim, n_layers=cfg["num_hidden_layers"], n_heads=n_heads,
                n_kv_heads=cfg.get("num_key_value_heads") or n_heads,
                vocab_size=cfg["vocab_size"], ffn_hidden_dim=cfg["intermediate_size"],
                # Llama-2-7b-chat's config.json says 1e-6 where params.json says 1e-5:
                # we take the file we are given at its word.
                norm_eps=cfg.get("rms_norm_eps", 1e-5),
                rope_theta=params.get("rope_theta", cfg.get("rope_theta", 10000.0)),
                max_seq_len=cfg.get("max_position_embeddings", 4096),
                tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                bos_id=cfg.get("bos_token_id", 1) if cfg.get("bos_token_id") is not None else 1,
                eos_id=eos_list[0] if eos_list[0] is not None else 2,
                extra_eos_ids=[e for e in eos_list[1:] if e is not None],
                pad_id=cfg.get("pad_token_id"),
            )
        except KeyError as e:
            raise ConfigError(f"config.json has no {e.args[0]!r}") from None

    @classmethod
    def from_gguf_metadata(cls, meta: dict[str, Any], vocab_size: int, tie_embeddings: bool) -> "ModelArgs":
        """GGUF key/values (plain Python values) of architecture 'llama'."""
        arch = meta.get("general.architecture")
        if arch != "llama":
            raise ConfigError(f"GGUF architecture {arch!r} is not supported; only 'llama'")
        p = "llama."
        try:
            n_heads = int(meta[p + "attention.head_count"])
            return cls(
                dim=int(meta[p + "embedding_length"]), n_layers=int(meta[p + "block_count"]), n_heads=n_heads,
                n_kv_heads=int(meta.get(p + "attention.head_count_kv", n_heads)),
                vocab_size=vocab_size, ffn_hidden_dim=int(meta[p + "feed_forward_length"]),
                norm_eps=float(meta.get(p + "attention.layer_norm_rms_epsilon", 1e-5)),
                rope_theta=float(meta.get(p + "rope.freq_base", 10000.0)),
                max_seq_len=int(meta.get(p + "context_length", 4096)),
                tie_embeddings=tie_embeddings,
                bos_id=int(meta.get("tokenizer.ggml.bos_token_id", 1)),
                eos_id=int(meta.get("tokenizer.ggml.eos_token_id", 2)),
                pad_id=int(meta["tokenizer.ggml.padding_token_id"]) if "tokenizer.ggml.padding_token_id" in meta else None,
            )
        except KeyError as e:
            raise ConfigError(f"GGUF metadata has no {e.args[0]!r}") from None


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

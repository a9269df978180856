"""The checkpoint's sampling defaults: its generation_config.json (transformers' GenerationConfig), which
the exporter carries into the model folder, read here for every API that generates.

    gc = GenerationConfig.read(folder)     # an empty one when the folder has no generation_config.json
    gc.do_sample, gc.temperature           # the file's value, else transformers' default
    gc.given                               # only what the file sets

Llama-2-7b-chat ships {"do_sample": true, "temperature": 0.6, "top_p": 0.9}, as most fine-tunes ship
theirs. How each API uses it is runtime/request.py's (`sampling`): explicit arguments always win.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llama2_onnx.errors import UserError

FILE = "generation_config.json"
# transformers' GenerationConfig defaults for the fields we use
HF_DEFAULTS: dict[str, Any] = dict(do_sample=False, temperature=1.0, top_p=1.0, top_k=50, repetition_penalty=1.0,
                                   max_length=20, max_new_tokens=None, num_return_sequences=1,
                                   bos_token_id=None, eos_token_id=None, pad_token_id=None)
SAMPLING_KEYS = ("temperature", "top_p", "top_k", "repetition_penalty")


def _number(lo: float, hi: float, lo_open: bool = False):
    def check(v):
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and \
            (v > lo if lo_open else v >= lo) and v <= hi
        return float(v) if ok else None
    return check


def _int(lo: int):
    def check(v):
        return v if isinstance(v, int) and not isinstance(v, bool) and v >= lo else None
    return check


def _ids(v):
    if isinstance(v, int) and not isinstance(v, bool) and v >= 0:
        return v
    if isinstance(v, list) and v and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in v):
        return list(v)
    return None


CHECKS = {
    "do_sample": lambda v: v if isinstance(v, bool) else None,
    "temperature": _number(0.0, 100.0),
    "top_p": _number(0.0, 1.0, lo_open=True),
    "top_k": _int(0),
    "repetition_penalty": _number(0.0, 100.0, lo_open=True),
    "max_length": _int(1),
    "max_new_tokens": _int(1),
    "num_return_sequences": _int(1),
    "bos_token_id": _ids,
    "eos_token_id": _ids,
    "pad_token_id": _ids,
}


@dataclass(frozen=True)
class GenerationConfig:
    given: dict[str, Any] = field(default_factory=dict)  # the fields the file sets, checked

    def __getattr__(self, name: str):
        if name in HF_DEFAULTS:
            return self.given.get(name, HF_DEFAULTS[name])
        raise AttributeError(name)

    @property
    def sampling(self) -> dict[str, float | int]:
        """The sampling fields the file sets (temperature, top_p, top_k, repetition_penalty)."""
        return {k: self.given[k] for k in SAMPLING_KEYS if k in self.given}

    @classmethod
    def parse(cls, data: Any, where: str) -> "GenerationConfig":
        """The fields we use from a parsed generation_config.json; UserError naming a bad one. Fields we do
        not use (transformers_version, beam settings, ...) are left out; null counts as not given."""
        if not isinstance(data, dict):
            raise UserError(f"{where} must hold a JSON object; fix or remove it")
        given = {}
        for key, check in CHECKS.items():
            if data.get(key) is None:
                continue
            value = check(data[key])
            if value is None:
                raise UserError(f"{where}: {key} = {data[key]!r} is not valid; fix or remove it")
            given[key] = value
        return cls(given)

    @classmethod
    def load(cls, path: Path) -> "GenerationConfig":
        """A generation_config.json file (an empty config when there is none)."""
        if not path.is_file():
            return cls()
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise UserError(f"{path} is not readable JSON ({str(e).splitlines()[0]}); fix or remove it") from None
        return cls.parse(data, str(path))

    @classmethod
    def read(cls, folder: str | Path) -> "GenerationConfig":
        """The model folder's (or a checkpoint folder's) generation_config.json."""
        return cls.load(Path(folder) / FILE)

    def to_json(self) -> str:
        return json.dumps(self.given, indent=2)

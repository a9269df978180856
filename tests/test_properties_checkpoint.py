"""Property-based tests of everything that parses a checkpoint's outside input: config.json,
params.json and GGUF metadata into ModelArgs, and the safetensors and GGUF headers.

Any input gives a valid result or one line of the project's UserError, never another exception.
Inputs are random values and bytes, and mutations of valid files (values swapped for others of
any JSON type, bytes flipped, integers planted in the header). Bounded: a few seconds in all.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llama2_onnx.errors import UserError
from llama2_onnx.models import checkpoint, tensor_files, writers
from llama2_onnx.models.config import ModelArgs, load_json

ARGS = ModelArgs(dim=8, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=16, ffn_hidden_dim=16, max_seq_len=32)
FAST = settings(max_examples=60, deadline=2000, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# JSON values of every type, the awkward ones included (huge, negative, nan/inf, nested)
numbers = st.one_of(st.integers(-2**70, 2**70), st.sampled_from([0, 1, -1, 2**31, 10**9, 10**12, 2**64]),
                    st.floats(allow_nan=True, allow_infinity=True))
json_values = st.recursive(st.none() | st.booleans() | numbers | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
                           max_leaves=6)


def _accepted_or_one_line(make):
    """make() returns a value or raises one line of UserError."""
    try:
        return make()
    except UserError as e:
        text = str(e)
        assert text and "\n" not in text and len(text) < 600, text
        return None


def _mutated(valid: dict) -> st.SearchStrategy[dict]:
    """valid with some keys given other values, some removed, and a few strangers added."""
    keys = sorted(valid)
    return st.builds(
        lambda changes, removed, extra: {**{k: v for k, v in valid.items() if k not in removed}, **changes, **extra},
        st.dictionaries(st.sampled_from(keys), json_values, max_size=4),
        st.sets(st.sampled_from(keys), max_size=2),
        st.dictionaries(st.text(max_size=6), json_values, max_size=2),
    )


def _check_args(args: ModelArgs | None) -> None:
    """An accepted config is one the exporter can size things from."""
    if args is not None:
        assert args.dim % args.n_heads == 0 and args.n_heads % args.n_kv_heads == 0
        assert 0 <= args.bos_id < args.vocab_size and 0 <= args.eos_id < args.vocab_size
        assert math.isfinite(args.norm_eps) and math.isfinite(args.rope_theta)
        assert args.max_seq_len <= 2**20 and args.n_layers <= 2**10


# ---- config readers ---------------------------------------------------------------------

HF_VALID = writers.hf_config(ARGS, torch.float32)
META_VALID = writers.meta_params(ARGS)
GGUF_VALID = {
    "general.architecture": "llama", "llama.block_count": 1, "llama.embedding_length": 8,
    "llama.attention.head_count": 2, "llama.attention.head_count_kv": 1, "llama.feed_forward_length": 16,
    "llama.attention.layer_norm_rms_epsilon": 1e-5, "llama.rope.freq_base": 10000.0, "llama.context_length": 32,
    "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.padding_token_id": 0,
}


@FAST
@given(_mutated(HF_VALID))
def test_hf_config_gives_args_or_one_line(cfg):
    _check_args(_accepted_or_one_line(lambda: ModelArgs.from_hf_config(cfg)))


@FAST
@given(_mutated(META_VALID), st.one_of(st.none(), numbers))
def test_params_json_gives_args_or_one_line(params, vocab_size):
    _check_args(_accepted_or_one_line(lambda: ModelArgs.from_params_json(params, vocab_size)))


@FAST
@given(_mutated(GGUF_VALID), st.one_of(st.none(), numbers), st.booleans())
def test_gguf_metadata_gives_args_or_one_line(meta, vocab_size, tied):
    _check_args(_accepted_or_one_line(lambda: ModelArgs.from_gguf_metadata(meta, vocab_size, tied)))


@FAST
@given(st.dictionaries(st.text(max_size=30), json_values, max_size=6))
def test_any_json_object_as_hf_config(cfg):
    _check_args(_accepted_or_one_line(lambda: ModelArgs.from_hf_config(cfg)))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A valid tiny checkpoint of each format, and a scratch folder the examples write into."""
    root = tmp_path_factory.mktemp("properties")
    sd = writers.random_state_dict(ARGS, seed=0)
    hf = writers.write_hf(sd, ARGS, root / "hf")
    gguf = writers.write_gguf(sd, ARGS, root / "m.gguf")
    scratch = root / "scratch"
    scratch.mkdir()
    return {"hf": hf, "gguf": gguf, "scratch": scratch}


@FAST
@given(data=st.one_of(st.binary(max_size=200), json_values.map(lambda v: json.dumps(v).encode())))
def test_load_json_gives_an_object_or_one_line(files, data):
    path = files["scratch"] / "config.json"
    path.write_bytes(data)
    result = _accepted_or_one_line(lambda: load_json(path))
    assert result is None or isinstance(result, dict)


# ---- header readers ---------------------------------------------------------------------

def _mutate(data: bytes, head: int) -> st.SearchStrategy[bytes]:
    """data with bytes of its first `head` flipped, or an integer (any width) planted there, or cut short."""
    flips = st.lists(st.tuples(st.integers(0, head - 1), st.integers(0, 255)), min_size=1, max_size=4)
    plant = st.tuples(st.integers(0, head - 8), st.sampled_from([1, 2, 4, 8]), st.integers(0, 2**64 - 1))

    def flip(changes):
        b = bytearray(data)
        for at, value in changes:
            b[at] = value
        return bytes(b)

    def planted(p):
        at, width, value = p
        return data[:at] + (value % 256**width).to_bytes(width, "little") + data[at + width:]

    return st.one_of(flips.map(flip), plant.map(planted), st.integers(0, len(data)).map(lambda n: data[:n]))


def _safetensors_head(path) -> int:
    return 8 + int.from_bytes(path.read_bytes()[:8], "little")


@FAST
@given(data=st.data())
def test_safetensors_header_gives_tensors_or_one_line(files, data):
    valid = (files["hf"] / "model.safetensors").read_bytes()
    raw = data.draw(st.one_of(st.binary(max_size=300), _mutate(valid, _safetensors_head(files["hf"] / "model.safetensors"))))
    path = files["scratch"] / "model.safetensors"
    path.write_bytes(raw)
    try:
        refs = tensor_files.open_safetensors(path)
    except tensor_files.TensorFileError as e:
        assert "\n" not in str(e)
        return
    for ref in refs.values():  # what it accepted lies inside the file
        assert 0 <= ref.offset and ref.offset + ref.nbytes <= len(raw)


@FAST
@given(data=st.data())
def test_hf_checkpoint_with_any_safetensors_opens_or_one_line(files, data):
    valid = (files["hf"] / "model.safetensors").read_bytes()
    raw = data.draw(_mutate(valid, _safetensors_head(files["hf"] / "model.safetensors")))
    folder = files["scratch"] / "hf"
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_bytes((files["hf"] / "config.json").read_bytes())
    (folder / "model.safetensors").write_bytes(raw)
    _accepted_or_one_line(lambda: checkpoint.open_checkpoint(folder))


def _gguf_head(path) -> int:
    from gguf import GGUFReader

    return GGUFReader(str(path)).data_offset


@FAST
@given(data=st.data())
def test_gguf_gives_a_checkpoint_or_one_line(files, data):
    valid = files["gguf"].read_bytes()
    raw = data.draw(st.one_of(st.binary(max_size=300).map(lambda b: b"GGUF" + b), _mutate(valid, _gguf_head(files["gguf"]))))
    path = files["scratch"] / "m.gguf"
    path.write_bytes(raw)
    _accepted_or_one_line(lambda: checkpoint.open_checkpoint(path))


def test_gguf_with_a_token_that_is_not_utf8(files, tmp_path):
    """Found by the test above (the reader decodes strings only when asked: read_vocab asked)."""
    data = files["gguf"].read_bytes()
    at = data.index(b"tok5")
    path = tmp_path / "m.gguf"
    path.write_bytes(data[:at] + b"\x80" + data[at + 1:])
    with pytest.raises(checkpoint.CheckpointError, match="corrupt"):
        checkpoint.open_checkpoint(path)

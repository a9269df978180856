"""models/checkpoint.py: every bad input gives one helpful line (table-driven)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from gguf import GGMLQuantizationType, GGUFWriter

from llama2_onnx.errors import UserError
from llama2_onnx.models import writers
from llama2_onnx.models.checkpoint import CheckpointError, load
from llama2_onnx.models.config import ConfigError, ModelArgs

from test_checkpoint import FORMATS, TINY, _rewrite_gguf

# ---- bad input ----------------------------------------------------------------------

LFS_POINTER = "version https://git-lfs.github.com/spec/v1\noid sha256:4d7a2146\nsize 13476839424\n"


def _tiny(tmp, fmt, **kw):
    args = ModelArgs(**{**TINY, "n_kv_heads": 2, **kw})
    return FORMATS[fmt][0](writers.random_state_dict(args, 0), args, tmp)


def _edit_json(path, **changes):
    d = json.loads(path.read_text())
    d.update(changes)
    path.write_text(json.dumps(d))


def _truncate(path, keep=0.5):
    path.write_bytes(path.read_bytes()[: int(path.stat().st_size * keep)])


def _resave_without(folder, name):
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / "model.safetensors")
    del tensors[name]
    save_file(tensors, folder / "model.safetensors")


def _resave_with_extra(folder, name):
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / "model.safetensors")
    tensors[name] = torch.zeros(64)
    save_file(tensors, folder / "model.safetensors")


def _raw_gguf(path, arch="llama", tensors=()):
    """A GGUF file with llama-ish metadata and the given (name, array, raw type) tensors."""

    w = GGUFWriter(str(path), arch)
    w.add_uint32(f"{arch}.block_count", 1)
    for name, arr, raw in tensors:
        w.add_tensor(name, arr, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _case_gguf_iq_type(tmp):
    block = np.zeros((4, 66), dtype=np.uint8)  # 4 rows of one 256-wide IQ2_XXS block
    return _raw_gguf(tmp / "iq.gguf", tensors=[("token_embd.weight", block, GGMLQuantizationType.IQ2_XXS)])


def _case_gguf_missing_tensor(tmp):
    return _rewrite_gguf(_tiny(tmp, "gguf-f32"), tmp / "cut.gguf", drop={"blk.1.ffn_up.weight"})


def _case_missing_path(tmp):
    return tmp / "nowhere"


def _case_empty_folder(tmp):
    (tmp / "notes.txt").write_text("hi")
    return tmp


def _case_meta_no_params(tmp):
    folder = _tiny(tmp, "meta-mp1")
    (folder / "params.json").unlink()
    return folder


def _case_meta_bad_params(tmp):
    folder = _tiny(tmp, "meta-mp1")
    (folder / "params.json").write_text("{'dim': 64,")
    return folder


def _case_meta_params_without_dim(tmp):
    folder = _tiny(tmp, "meta-mp1")
    d = json.loads((folder / "params.json").read_text())
    del d["dim"]
    (folder / "params.json").write_text(json.dumps(d))
    return folder


def _case_meta_shard_missing(tmp):
    folder = _tiny(tmp, "meta-mp2")
    (folder / "consolidated.01.pth").unlink()
    return folder


def _case_meta_first_shard_missing(tmp):
    folder = _tiny(tmp, "meta-mp2")
    (folder / "consolidated.00.pth").unlink()
    return folder


def _case_meta_shape_disagrees(tmp):
    folder = _tiny(tmp, "meta-mp2")
    _edit_json(folder / "params.json", n_kv_heads=4)
    return folder


def _case_meta_truncated(tmp):
    folder = _tiny(tmp, "meta-mp1")
    _truncate(folder / "consolidated.00.pth")
    return folder


def _case_meta_lfs(tmp):
    folder = _tiny(tmp, "meta-mp1")
    (folder / "consolidated.00.pth").write_text(LFS_POINTER)
    return folder


def _case_hf_no_weights(tmp):
    folder = _tiny(tmp, "hf-safetensors")
    (folder / "model.safetensors").unlink()
    return folder


def _case_hf_bad_config(tmp):
    folder = _tiny(tmp, "hf-safetensors")
    (folder / "config.json").write_text("not json")
    return folder


def _case_hf_model_type(tmp):
    folder = _tiny(tmp, "hf-safetensors")
    _edit_json(folder / "config.json", model_type="gpt2")
    return folder


def _case_hf_shape_disagrees(tmp):
    folder = _tiny(tmp, "hf-safetensors")
    _edit_json(folder / "config.json", intermediate_size=128)
    return folder


def _case_hf_fewer_layers(tmp):
    folder = _tiny(tmp, "hf-safetensors")
    _edit_json(folder / "config.json", num_hidden_layers=1)
    return folder


def _case_hf_missing_tensor(tmp):
    folder = _tiny(tmp, "hf-safetensors")
    _resave_without(folder, "model.layers.1.mlp.up_proj.weight")
    return folder


def _case_hf_untied_without_lm_head(tmp):
    folder = _tiny(tmp, "hf-safetensors")
    _resave_without(folder, "lm_head.weight")
    return folder


def _case_hf_stranger_tensor(tmp):
    folder = _tiny(tmp, "hf-safetensors")
    _resave_with_extra(folder, "model.layers.0.self_attn.q_proj.bias")
    return folder


def _case_hf_truncated(tmp):
    folder = _tiny(tmp, "hf-safetensors")
    _truncate(folder / "model.safetensors", 0.9)
    return folder


def _case_hf_garbage(tmp):
    folder = _tiny(tmp, "hf-safetensors")
    (folder / "model.safetensors").write_bytes(os.urandom(4096))
    return folder


def _case_hf_lfs(tmp):
    folder = _tiny(tmp, "hf-safetensors")
    (folder / "model.safetensors").write_text(LFS_POINTER)
    return folder


def _case_hf_shard_missing(tmp):
    folder = _tiny(tmp, "hf-sharded")
    next(folder.glob("model-00002-of-*.safetensors")).unlink()
    return folder


def _case_hf_bin_truncated(tmp):
    folder = _tiny(tmp, "hf-bin")
    _truncate(folder / "pytorch_model.bin")
    return folder


def _case_gguf_lfs(tmp):
    (tmp / "m.gguf").write_text(LFS_POINTER)
    return tmp / "m.gguf"


def _case_gguf_not_gguf(tmp):
    (tmp / "m.gguf").write_bytes(os.urandom(4096))
    return tmp / "m.gguf"


def _case_gguf_truncated(tmp):
    path = _tiny(tmp, "gguf-f32")
    _truncate(path, 0.8)
    return path


def _case_gguf_architecture(tmp):
    return _raw_gguf(tmp / "m.gguf", arch="gpt2", tensors=[("token_embd.weight", np.zeros((4, 8), np.float32), None)])


def _case_gguf_vocab_only(tmp):
    return _raw_gguf(tmp / "m.gguf")


def _case_several_ggufs(tmp):
    _tiny(tmp, "gguf-f32")
    (tmp / "other.gguf").write_bytes((tmp / "m.gguf").read_bytes())
    return tmp


def _case_hf_weight_map_leaves_the_folder(tmp):
    folder = _tiny(tmp, "hf-sharded")
    index = folder / "model.safetensors.index.json"
    d = json.loads(index.read_text())
    first = next(iter(d["weight_map"]))
    d["weight_map"][first] = "../../elsewhere/model.safetensors"
    index.write_text(json.dumps(d))
    return folder


def _case_hf_layers_1e9(tmp):
    folder = _tiny(tmp, "hf-safetensors")
    _edit_json(folder / "config.json", num_hidden_layers=10**9)
    return folder


def _case_hf_layers_more_than_the_weights(tmp):
    folder = _tiny(tmp, "hf-safetensors")
    _edit_json(folder / "config.json", num_hidden_layers=3)
    return folder


def _case_hf_bos_past_vocab(tmp):
    folder = _tiny(tmp, "hf-safetensors")
    _edit_json(folder / "config.json", bos_token_id=128)
    return folder


def _case_meta_zip_bomb(tmp):
    from test_cli_export_errors import _zip_bomb

    folder = _tiny(tmp, "meta-mp1")
    _zip_bomb(folder / "consolidated.00.pth")
    return folder


BAD = [  # (make bad input, error type, helpful substring)
    (_case_missing_path, CheckpointError, "does not exist"),
    (_case_empty_folder, CheckpointError, "params.json + consolidated.NN.pth (Meta)"),
    (_case_meta_no_params, CheckpointError, "has no params.json"),
    (_case_meta_bad_params, ConfigError, "not valid JSON"),
    (_case_meta_params_without_dim, ConfigError, "meta: params.json has no 'dim'"),
    (_case_meta_shard_missing, CheckpointError, "dim 64 needs 2 shards"),
    (_case_meta_first_shard_missing, CheckpointError, "a shard is missing"),
    (_case_meta_shape_disagrees, CheckpointError, "layers.0.attention.wk.weight has shape [32, 64], expected [64, 64]"),
    (_case_meta_truncated, CheckpointError, "truncated or corrupt"),
    (_case_meta_lfs, CheckpointError, "run `git lfs pull`"),
    (_case_hf_no_weights, CheckpointError, "no weights: expected model.safetensors"),
    (_case_hf_bad_config, ConfigError, "config.json is not valid JSON"),
    (_case_hf_model_type, ConfigError, "model_type 'gpt2'"),
    (_case_hf_shape_disagrees, CheckpointError,
     "model.layers.0.mlp.gate_proj.weight (layers.0.feed_forward.w1.weight) has shape [96, 64], expected [128, 64]"),
    (_case_hf_fewer_layers, CheckpointError, "config and weights disagree"),
    (_case_hf_missing_tensor, CheckpointError, "missing tensor(s) model.layers.1.mlp.up_proj.weight"),
    (_case_hf_untied_without_lm_head, CheckpointError, "missing tensor(s) lm_head.weight"),
    (_case_hf_stranger_tensor, CheckpointError, "'model.layers.0.self_attn.q_proj.bias', which is no Llama weight"),
    (_case_hf_truncated, CheckpointError, "truncated or corrupt"),
    (_case_hf_garbage, CheckpointError, "truncated or corrupt"),
    (_case_hf_lfs, CheckpointError, "run `git lfs pull`"),
    (_case_hf_shard_missing, CheckpointError, "model-00002-of-"),
    (_case_hf_bin_truncated, CheckpointError, "truncated or corrupt"),
    (_case_gguf_lfs, CheckpointError, "run `git lfs pull`"),
    (_case_gguf_not_gguf, CheckpointError, "not a GGUF file"),
    (_case_gguf_truncated, CheckpointError, "truncated or corrupt"),
    (_case_gguf_architecture, CheckpointError, "architecture 'gpt2'"),
    (_case_gguf_vocab_only, CheckpointError, "holds no tensors"),
    (_case_gguf_missing_tensor, CheckpointError, "missing tensor(s) blk.1.ffn_up.weight (layers.1.feed_forward.w3.weight)"),
    (_case_gguf_iq_type, CheckpointError, "IQ2_XXS; supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1"),
    (_case_several_ggufs, CheckpointError, "2 .gguf files"),
    (_case_hf_weight_map_leaves_the_folder, CheckpointError, "not a file name in the checkpoint folder"),
    (_case_hf_layers_1e9, ConfigError, "num_hidden_layers must be an integer from 1 to 1024, got 1000000000"),
    (_case_hf_layers_more_than_the_weights, CheckpointError, "num_hidden_layers 3 but the weights hold 2 layers"),
    (_case_hf_bos_past_vocab, ConfigError, "bos_token_id 128 is outside the vocabulary (vocab_size 128)"),
    (_case_meta_zip_bomb, CheckpointError, "archive/data.pkl declares 134217728 bytes uncompressed"),
]


@pytest.mark.parametrize("make, error, text", BAD, ids=[m.__name__.removeprefix("_case_") for m, _, _ in BAD])
def test_bad_input_gives_one_helpful_line(make, error, text, tmp_path):
    path = make(tmp_path)
    with pytest.raises(error) as info:
        load(path)
    message = str(info.value)
    assert isinstance(info.value, UserError)
    assert "\n" not in message and len(message) < 400, message
    assert text in message, message


def test_zip_bomb_is_refused_before_it_inflates(tmp_path):
    """data.pkl declaring 128 MiB: refused on the zip header's size, with a few MB of memory."""
    import tracemalloc

    folder = _case_meta_zip_bomb(tmp_path)
    tracemalloc.start()
    try:
        with pytest.raises(CheckpointError, match="zip bomb"):
            load(folder)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 * 2**20, f"peak {peak / 2**20:.0f} MiB"

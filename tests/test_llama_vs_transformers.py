"""Our decoder (models/llama.py) loaded by models/checkpoint.py against Hugging Face transformers.

Tiny random checkpoints written by models/writers.write_hf, and the real SmolLM2 GGUF.
"""

from __future__ import annotations

import pytest
import torch

from llama2_onnx.models import writers
from llama2_onnx.models.checkpoint import load
from llama2_onnx.models.config import ModelArgs
from llama2_onnx.models.llama import Transformer

transformers = pytest.importorskip("transformers")

TINY = dict(dim=64, n_layers=2, n_heads=4, vocab_size=128, ffn_hidden_dim=96, rope_theta=50000.0, norm_eps=1e-6,
            max_seq_len=256)
CASES = {  # name: ModelArgs
    "mha": ModelArgs(**TINY, n_kv_heads=4),
    "gqa": ModelArgs(**TINY, n_kv_heads=2),
    "mha-tied": ModelArgs(**TINY, n_kv_heads=4, tie_embeddings=True),
    "gqa-tied": ModelArgs(**TINY, n_kv_heads=2, tie_embeddings=True),
}


def ours_from(path) -> Transformer:
    ckpt = load(path)
    model = Transformer(ckpt.args)
    missing, unexpected = model.load_state_dict(ckpt.state_dict, strict=False)
    assert not unexpected and set(missing) <= ({"output.weight"} if ckpt.args.tie_embeddings else set())
    return model.eval()


def hf_from(path, **kw):
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(path), dtype=torch.float32, attn_implementation="eager", **kw).eval()


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids for a left-padded batch: 0 at each row's first real token."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


@pytest.fixture(scope="module", params=list(CASES))
def pair(request, tmp_path_factory):
    args = CASES[request.param]
    folder = writers.write_hf(writers.random_state_dict(args, seed=3), args, tmp_path_factory.mktemp(request.param))
    return ours_from(folder), hf_from(folder)


@torch.no_grad()
def test_prompt_logits_match(pair):
    ours, hf = pair
    ids = torch.tensor([[1, 17, 99, 3, 64, 127, 5, 42, 8]])
    mask = torch.ones_like(ids)
    got, _ = ours(ids, mask, positions(mask), ours.empty_cache(1))
    ref = hf(input_ids=ids).logits
    assert ref.std() > 0.5
    assert (got - ref).abs().max() <= 1e-5


@torch.no_grad()
def test_decode_step_with_past_matches(pair):
    ours, hf = pair
    ids = torch.tensor([[1, 17, 99, 3, 64, 127]])
    mask = torch.ones_like(ids)
    _, past = ours(ids, mask, positions(mask), ours.empty_cache(1))
    ref_prompt = hf(input_ids=ids, use_cache=True)
    nxt = torch.tensor([[42]])
    mask = torch.ones(1, 7, dtype=torch.long)
    got, presents = ours(nxt, mask, torch.tensor([[6]]), past)
    ref = hf(input_ids=nxt, past_key_values=ref_prompt.past_key_values, use_cache=True)
    assert (got - ref.logits).abs().max() <= 1e-5
    assert presents[0][0].shape == (1, ours.args.n_kv_heads, 7, ours.args.head_dim)


@torch.no_grad()
def test_left_padded_batch_matches(pair):
    ours, hf = pair
    ids = torch.tensor([[1, 17, 99, 3, 64, 127], [0, 0, 0, 1, 5, 42]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1]])
    got, _ = ours(ids, mask, positions(mask), ours.empty_cache(2))
    ref = hf(input_ids=ids, attention_mask=mask, position_ids=positions(mask)).logits
    real = mask.bool()
    assert (got[real] - ref[real]).abs().max() <= 1e-5


@pytest.mark.slow
@torch.no_grad()
def test_smollm2_gguf_matches_transformers(smollm2_gguf, tmp_path):
    # transformers would pick up a stray tokenizer.model beside the GGUF (DESIGN.md): load from a clean folder.
    folder = tmp_path / "smollm2"
    folder.mkdir()
    (folder / smollm2_gguf.name).symlink_to(smollm2_gguf)
    ckpt = load(folder / smollm2_gguf.name)
    assert ckpt.args.n_kv_heads == 3 and ckpt.args.tie_embeddings and ckpt.args.rope_theta == 100000.0
    assert ckpt.chat_format == "chatml" and ckpt.gguf_vocab["tokenizer.ggml.model"] == "gpt2"
    ours = Transformer(ckpt.args)
    ours.load_state_dict(ckpt.state_dict, strict=False)
    ours.eval()
    hf = hf_from(folder, gguf_file=smollm2_gguf.name)

    ids = torch.tensor([[1, 504, 3458, 282, 4049, 314, 216, 30, 1326, 28, 253, 5]])
    mask = torch.ones_like(ids)
    got, _ = ours(ids, mask, positions(mask), ours.empty_cache(1))
    ref = hf(input_ids=ids).logits
    assert (got - ref).abs().max() <= 1e-4
    assert torch.equal(got.argmax(-1), ref.argmax(-1))

"""The assembled (streaming) export against the traced one, the fused graph against the portable
one, layer-by-layer verification, and the exporter's memory against the number of layers."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

from llama2_onnx.export import api
from llama2_onnx.models import writers
from llama2_onnx.models.config import ModelArgs
from llama2_onnx.models.llama import greedy
from llama2_onnx.runtime import contract
from llama2_onnx.runtime.session import Model


def _weights(folder: Path) -> list[bytes]:
    """Every weight of a folder's graph as bytes, transposed 2-D ones in both orientations' canonical form."""
    proto = onnx.load(str(folder / contract.MODEL_FILE), load_external_data=False)
    onnx.external_data_helper.load_external_data_for_model(proto, str(folder))
    out = []
    for t in proto.graph.initializer:
        a = numpy_helper.to_array(t)
        if a.size >= 64 * 64 // 4:  # weights, not shape constants or rotary frequencies
            out.append(min(a.tobytes(), np.ascontiguousarray(a.T).tobytes()))
    return sorted(out)


def _session(folder: Path) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(folder / contract.MODEL_FILE), opts, providers=["CPUExecutionProvider"])


def _run(session, args: ModelArgs, ids, mask, pos, past):
    feeds = {contract.INPUT_IDS: ids, contract.ATTENTION_MASK: mask, contract.POSITION_IDS: pos}
    feeds.update(zip(contract.past_names(args.n_layers), past))
    logits, *present = session.run(None, feeds)
    return logits, present


def _agree(a: Path, b: Path, args: ModelArgs, dtype=np.float32) -> float:
    """Max |logit diff| of two portable folders over a prompt, 5 cached steps and a left-padded batch."""
    sa, sb = _session(a), _session(b)
    rng = np.random.default_rng(1)
    worst = 0.0
    ids = rng.integers(0, args.vocab_size, (2, 9))
    mask = np.ones_like(ids)
    mask[1, :3] = 0  # row 1 is left-padded
    pos = np.maximum(np.cumsum(mask, 1) - 1, 0)
    past = [np.zeros((2, args.n_kv_heads, 0, args.head_dim), dtype)] * (2 * args.n_layers)
    pa = pb = past
    for step in range(6):
        la, pa = _run(sa, args, ids, mask, pos, pa)
        lb, pb = _run(sb, args, ids, mask, pos, pb)
        worst = max(worst, float(np.abs(la - lb).max()))
        ids = la[:, -1].argmax(-1)[:, None]
        pos = pos[:, -1:] + 1
        mask = np.concatenate([mask, np.ones((2, 1), np.int64)], 1)
    return worst


# ---- assembled == traced --------------------------------------------------------------------

def test_assembled_weights_identical_and_logits_agree(tiny_onnx, tiny_traced, tiny_args):
    assert json.loads((tiny_traced / "config.json").read_text())["graph"] == "portable"
    assert _weights(tiny_onnx) == _weights(tiny_traced)
    assert _agree(tiny_onnx, tiny_traced, tiny_args) < 1e-5


@pytest.fixture(scope="module")
def every_format(tiny_args, tmp_path_factory):
    """The same float32 state dict in every checkpoint format we read losslessly."""
    sd = writers.random_state_dict(tiny_args, seed=0)
    root = tmp_path_factory.mktemp("formats")
    paths = {"meta-1": writers.write_meta(sd, tiny_args, root / "meta1", n_shards=1),
             "meta-2": writers.write_meta(sd, tiny_args, root / "meta2", n_shards=2),
             "hf-sharded": writers.write_hf(sd, tiny_args, root / "hfs", max_shard_bytes=3 << 20),
             "gguf-f32": writers.write_gguf(sd, tiny_args, root / "m.gguf", qtype="F32")}
    return paths


@pytest.mark.parametrize("fmt", ["meta-1", "meta-2", "hf-sharded", "gguf-f32"])
def test_every_format_streams_the_traced_weights(fmt, every_format, tiny_traced, tiny_args, tmp_path):
    out = tmp_path / fmt
    api.export_model(checkpoint=every_format[fmt], out=out, verify_export=False, progress=False)
    assert _weights(out) == _weights(tiny_traced)  # tiny_traced: the same state dict, from HF safetensors
    assert _agree(out, tiny_traced, tiny_args) < 1e-5


def test_fp16_assembled_matches_traced(tiny_hf_checkpoint, tiny_args, tmp_path):
    outs = {}
    for trace in (False, True):
        outs[trace] = tmp_path / f"trace-{trace}"
        api.export_model(checkpoint=tiny_hf_checkpoint, out=outs[trace], precision="fp16", trace_graph=trace,
                         verify_export=False, progress=False)
    assert _weights(outs[False]) == _weights(outs[True])
    assert _agree(outs[False], outs[True], tiny_args, np.float16) < 2e-3  # fp16 op order may differ


def test_trace_refuses_the_fused_graph(tiny_hf_checkpoint, tmp_path, capsys):
    from llama2_onnx.cli import main

    code = main(["export", str(tiny_hf_checkpoint), str(tmp_path / "o"), "--trace", "--graph", "ort", "--quiet"])
    assert code == 2 and "--trace" in capsys.readouterr().err and not (tmp_path / "o").exists()


# ---- the fused graph ------------------------------------------------------------------------

def test_fused_graph_uses_the_fused_kernels(tiny_onnx_ort, tiny_args):
    proto = onnx.load(str(tiny_onnx_ort / contract.MODEL_FILE), load_external_data=False)
    ops = [n.op_type for n in proto.graph.node]
    n = tiny_args.n_layers
    assert ops.count("GroupQueryAttention") == n and ops.count("SkipSimplifiedLayerNormalization") == 2 * n
    assert ops.count("MatMul") == 5 * n + 1  # packed QKV, wo, w1, w3, w2; the head
    assert contract.POSITION_IDS not in {i.name for i in proto.graph.input}
    cfg = json.loads((tiny_onnx_ort / "config.json").read_text())
    assert cfg["graph"] == "ort" and cfg["verify"]["max_abs_logit_diff"] < 1e-4
    genai = json.loads((tiny_onnx_ort / "genai_config.json").read_text())
    assert genai["search"]["past_present_share_buffer"] is True


def test_fused_greedy_equals_portable_and_pytorch(tiny_onnx, tiny_onnx_ort, tiny_torch_model):
    prompt = list(range(5, 40))
    want = greedy(tiny_torch_model, prompt, 32)
    for folder in (tiny_onnx, tiny_onnx_ort):
        model = Model.from_dir(folder)
        ids = np.array([prompt])
        cache = model.new_cache(np.ones_like(ids), capacity=len(prompt) + 32)
        logits, got = model.step(ids, np.ones_like(ids), cache), []
        for _ in range(32):
            got.append(int(logits[0].argmax()))
            logits = model.step(np.array([[got[-1]]]), np.ones((1, 1), np.int64), cache)
        assert got == want


@pytest.mark.slow
def test_smollm2_fused_greedy_equals_portable(smollm2_gguf, smollm2_onnx, tmp_path):
    from llama2_onnx.runtime import Generator

    out = tmp_path / "ort"
    result = api.export_model(checkpoint=smollm2_gguf, out=out, graph="ort", progress=False)
    assert result.config.verify["greedy_agreement"] == 32
    dialog = [{"role": "user", "content": "Write a short poem about the sea."}]
    fused = Generator.from_dir(out).chat(dialog, max_new_tokens=32)
    portable = Generator.from_dir(smollm2_onnx).chat(dialog, max_new_tokens=32)
    assert fused.tokens == portable.tokens and len(fused.tokens) == 32


# ---- int4 -----------------------------------------------------------------------------------

def test_int4_recipe_and_quality(tiny_args, tmp_path):
    import dataclasses

    args = dataclasses.replace(tiny_args, n_layers=4)
    ckpt = writers.write_hf(writers.random_state_dict(args, seed=3), args, tmp_path / "ckpt")
    out = tmp_path / "int4"
    result = api.export_model(checkpoint=ckpt, out=out, precision="int4", graph="ort", progress=False)
    q = result.config.quantization
    assert q["wide_layers"] == [0, 3] and q["wide_weights"] == ["feed_forward.w2"]
    proto = onnx.load(str(out / contract.MODEL_FILE), load_external_data=False)
    bits = {}
    for node in proto.graph.node:
        if node.op_type == "MatMulNBits":
            b = next(a.i for a in node.attribute if a.name == "bits")
            bits[node.input[1]] = b
    assert len(bits) == 4 * 5 + 1
    for name, b in bits.items():
        layer = name.split(".")[1] if name.startswith("layers.") else None
        wide = name.startswith("output") or layer in ("0", "3") or ".w2." in name
        assert b == (8 if wide else 4), name
    v = json.loads((out / "config.json").read_text())["verify"]
    assert v["perplexity"] < 1.1 * v["reference_perplexity"] and v["top1_agreement"] > 0.3


# ---- layer-by-layer verification ------------------------------------------------------------

@pytest.mark.parametrize("graph, precision", [("portable", "fp32"), ("ort", "fp32"), ("ort", "fp16"), ("ort", "int4")])
def test_layer_by_layer_verification(graph, precision, tiny_hf_checkpoint, tmp_path, monkeypatch):
    from llama2_onnx.export import verify_layers

    monkeypatch.setattr(api, "fits_in_memory", lambda *a: False)
    result = api.export_model(checkpoint=tiny_hf_checkpoint, out=tmp_path / "o", graph=graph, precision=precision,
                              progress=False)
    v = result.config.verify
    assert v["mode"] == "layers" and v["layers"] == 2
    assert v["max_abs_diff"] < {"fp32": 1e-4, "fp16": 2e-2, "int4": 0.5}[precision]
    assert verify_layers.TOKENS == v["tokens"]


def test_layer_by_layer_verification_catches_a_wrong_layer(tiny_hf_checkpoint, tmp_path, monkeypatch):
    from llama2_onnx.export import graph as graph_module
    from llama2_onnx.export.verify import VerificationError

    monkeypatch.setattr(api, "fits_in_memory", lambda *a: False)
    export_ffn = graph_module.DecoderGraph.ffn
    calls = []

    def ffn_wrong_in_checks(self, x, i):  # right in the export, wrong in the one-layer check graphs
        calls.append(i)
        return export_ffn(self, x, i) if len(calls) <= 2 else x

    monkeypatch.setattr(graph_module.DecoderGraph, "ffn", ffn_wrong_in_checks)
    with pytest.raises(VerificationError, match="layer 0"):
        api.export_model(checkpoint=tiny_hf_checkpoint, out=tmp_path / "o", progress=False)
    assert not (tmp_path / "o").exists()


# ---- memory against depth ---------------------------------------------------------------------

PEAK = textwrap.dedent("""
    import sys
    from llama2_onnx.export.api import export_model
    export_model(checkpoint=sys.argv[1], out=sys.argv[2], precision=sys.argv[3], verify_export=False, progress=False)
    print([l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1])
""")


@pytest.mark.parametrize("precision", ["fp16", "int4"])
def test_export_memory_does_not_grow_with_layers(precision, tmp_path):
    width = dict(dim=512, n_heads=8, n_kv_heads=8, vocab_size=1000, ffn_hidden_dim=1408, max_seq_len=256)
    peaks, layer_bytes = {}, 0
    for n in (2, 12):
        args = ModelArgs(n_layers=n, **width)
        sd = writers.random_state_dict(args, seed=0, dtype=torch.float16)
        layer_bytes = sum(t.numel() * 4 for k, t in sd.items() if k.startswith("layers.0."))  # float32 in memory
        ckpt = writers.write_hf(sd, args, tmp_path / f"ckpt{n}")
        del sd
        run = subprocess.run([sys.executable, "-c", PEAK, str(ckpt), str(tmp_path / f"out{n}"), precision],
                             capture_output=True, text=True, check=True)
        peaks[n] = int(run.stdout.split()[-1]) * 1024
    assert (tmp_path / "out12" / contract.DATA_FILE).stat().st_size > 5 * layer_bytes / 4 * (1 if precision == "fp16" else 0.25)
    assert peaks[12] - peaks[2] < 2 * layer_bytes, peaks


def test_int4_speed_recipe_is_4_bits_everywhere(tiny_hf_checkpoint, tmp_path):
    from llama2_onnx.export.precision import Int4Options

    out = tmp_path / "int4-speed"
    result = api.export_model(checkpoint=tiny_hf_checkpoint, out=out, precision="int4", graph="ort",
                              int4=Int4Options(recipe="speed"), verify_export=False, progress=False)
    assert result.config.quantization["recipe"] == "speed" and result.config.quantization["head"] == "4-bit MatMulNBits"
    proto = onnx.load(str(out / contract.MODEL_FILE), load_external_data=False)
    bits = [next(a.i for a in n.attribute if a.name == "bits") for n in proto.graph.node if n.op_type == "MatMulNBits"]
    assert bits == [4] * (2 * 5 + 1)


def test_fused_graph_without_grouped_query_attention(tmp_path):
    """Llama 2 7B/13B have as many KV heads as query heads: GroupQueryAttention with kv_num_heads == num_heads."""
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=4, vocab_size=1000, ffn_hidden_dim=96, max_seq_len=128)
    ckpt = writers.write_hf(writers.random_state_dict(args, seed=1), args, tmp_path / "mha")
    result = api.export_model(checkpoint=ckpt, out=tmp_path / "o", graph="ort", progress=False)
    assert result.config.verify["max_abs_logit_diff"] < 1e-4 and result.config.verify["greedy_agreement"] == 32


def test_hqq_rewrites_the_assembled_graph_and_the_manifest_holds(tiny_hf_checkpoint, tmp_path):
    from llama2_onnx.export.precision import Int4Options
    from llama2_onnx.runtime.folder import check_manifest

    out = tmp_path / "hqq"
    api.export_model(checkpoint=tiny_hf_checkpoint, out=out, precision="int4", graph="ort",
                     int4=Int4Options(algorithm="hqq"), verify_export=False, progress=False)
    check_manifest(out, hashes=True)  # the data file was rewritten after assembly: hashed afresh
    proto = onnx.load(str(out / contract.MODEL_FILE), load_external_data=False)
    assert sum(n.op_type == "MatMulNBits" for n in proto.graph.node) == 2 * 5  # the head stays float32 with hqq

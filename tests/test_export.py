"""The exporter: the ONNX graph against our PyTorch decoder, the folder, and bad input."""

import json

import numpy as np
import onnxruntime as ort
import torch

from llama2_onnx.cli import main
from llama2_onnx.export import api
from llama2_onnx.runtime import contract
from llama2_onnx.runtime.folder import check_manifest


def _onnx_run(session, n_layers, ids, mask, pos, past):
    feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": pos}
    feeds.update(zip(contract.past_names(n_layers), past))
    logits, *present = session.run(None, feeds)
    return logits, present


def _torch_run(model, ids, mask, pos, past):
    pairs = [(torch.from_numpy(past[2 * i]), torch.from_numpy(past[2 * i + 1])) for i in range(len(past) // 2)]
    with torch.no_grad():
        logits, present = model(torch.from_numpy(ids), torch.from_numpy(mask), torch.from_numpy(pos), pairs)
    return logits.numpy(), [t.numpy() for kv in present for t in kv]


def test_folder_is_complete(tiny_onnx):
    names = {p.name for p in tiny_onnx.iterdir()}
    assert {"model.onnx", "model.onnx.data", "config.json", "genai_config.json", "tokenizer.model", "manifest.json"} <= names
    check_manifest(tiny_onnx, hashes=True)
    cfg = json.loads((tiny_onnx / "config.json").read_text())
    assert cfg["precision"] == "fp32" and cfg["graph"] == "portable" and cfg["chat_format"] == "llama2"
    assert cfg["verify"]["max_abs_logit_diff"] < 1e-4 and cfg["verify"]["greedy_agreement"] == 32
    assert not list(tiny_onnx.parent.glob(".*partial*"))


def test_io_contract(tiny_onnx, tiny_args):
    s = ort.InferenceSession(str(tiny_onnx / "model.onnx"))
    ins = {i.name: i.shape for i in s.get_inputs()}
    outs = {o.name: o.shape for o in s.get_outputs()}
    assert list(ins) == contract.input_names(tiny_args.n_layers)
    assert list(outs) == contract.output_names(tiny_args.n_layers)
    assert ins["past_key_values.0.key"] == ["batch_size", 2, "past_sequence_length", 16]
    assert outs["present.1.value"] == ["batch_size", 2, "total_sequence_length", 16]
    assert outs["logits"] == ["batch_size", "logits_sequence_length", 32000]
    assert [i.name for i in s.get_overridable_initializers()] == [contract.LOGITS_TO_KEEP]  # optional, default all


def test_prompt_pass_and_ten_cached_steps_match_pytorch(tiny_onnx, tiny_torch_model, tiny_args):
    s = ort.InferenceSession(str(tiny_onnx / "model.onnx"))
    rng = np.random.default_rng(1)
    ids = rng.integers(3, 32000, (1, 12))
    empty = [np.zeros((1, 2, 0, 16), np.float32)] * (2 * tiny_args.n_layers)
    onnx_past, torch_past = empty, empty
    total = 0
    for step in range(11):  # the prompt pass, then 10 cached decode steps
        s_len = ids.shape[1]
        mask = np.ones((1, total + s_len), np.int64)
        pos = np.arange(total, total + s_len)[None]
        got, onnx_past = _onnx_run(s, tiny_args.n_layers, ids, mask, pos, onnx_past)
        want, torch_past = _torch_run(tiny_torch_model, ids, mask, pos, torch_past)
        assert np.abs(got - want).max() < 1e-4, f"step {step}"
        assert max(np.abs(a - b).max() for a, b in zip(onnx_past, torch_past)) < 1e-4
        total += s_len
        ids = got[:, -1:].argmax(-1)


def test_left_padded_batch_matches_pytorch_and_single_rows(tiny_onnx, tiny_torch_model, tiny_args):
    s = ort.InferenceSession(str(tiny_onnx / "model.onnx"))
    long, short = list(range(100, 110)), list(range(200, 206))
    ids = np.array([long, [0] * 4 + short])
    mask = np.array([[1] * 10, [0] * 4 + [1] * 6])
    pos = np.array([list(range(10)), [0] * 4 + list(range(6))])
    empty = [np.zeros((2, 2, 0, 16), np.float32)] * (2 * tiny_args.n_layers)
    got, _ = _onnx_run(s, tiny_args.n_layers, ids, mask, pos, empty)
    want, _ = _torch_run(tiny_torch_model, ids, mask, pos, empty)
    assert np.abs(got - want).max() < 1e-4
    alone, _ = _onnx_run(s, tiny_args.n_layers, np.array([short]), np.ones((1, 6), np.int64),
                         np.arange(6)[None], [e[:1] for e in empty])
    assert np.abs(got[1, 4:] - alone[0]).max() < 1e-4  # padding changes nothing for the real tokens


def test_fp16_loads_on_cpu_and_reports_agreement(tiny_hf_checkpoint, tmp_path, tiny_args):
    out = tmp_path / "fp16"
    result = api.export_model(checkpoint=tiny_hf_checkpoint, out=out, precision="fp16", progress=False)
    v = result.config.verify
    assert 0.9 <= v["top1_agreement"] <= 1.0 and v["max_abs_logit_diff"] < 0.05
    s = ort.InferenceSession(str(out / "model.onnx"))
    kv = {i.name: i.type for i in s.get_inputs()}
    assert kv["past_key_values.0.key"] == "tensor(float16)"
    assert {o.name: o.type for o in s.get_outputs()}["logits"] == "tensor(float)"
    assert json.loads((out / "config.json").read_text())["verify"]["top1_agreement"] == v["top1_agreement"]


# ---- bad input: one line, exit 2, no OUT left behind ------------------------------------------

def _cli(argv, capsys):
    code = main(["export", "--quiet", *argv])
    err = capsys.readouterr().err.strip()
    return code, err


def test_missing_checkpoint(tmp_path, capsys):
    code, err = _cli([str(tmp_path / "nope"), str(tmp_path / "out")], capsys)
    assert code == 2 and len(err.splitlines()) == 1 and "does not exist" in err
    assert not (tmp_path / "out").exists()


def test_out_not_empty_without_overwrite(tiny_hf_checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, err = _cli([str(tiny_hf_checkpoint), str(out)], capsys)
    assert code == 2 and "--overwrite" in err and len(err.splitlines()) == 1
    assert (out / "keep.txt").read_text() == "mine"


def test_failure_halfway_leaves_nothing(tiny_hf_checkpoint, tmp_path, monkeypatch, capsys):
    from llama2_onnx.errors import UserError

    def broken(folder, reference, **kw):
        assert (folder / "model.onnx").exists()  # halfway: the graph is written
        raise UserError("simulated failure while verifying")

    monkeypatch.setattr(api, "verify", broken)
    out = tmp_path / "out"
    code, err = _cli([str(tiny_hf_checkpoint), str(out)], capsys)
    assert code == 2 and "simulated failure" in err
    assert list(tmp_path.iterdir()) == []  # no OUT, no partial folder


def test_overwrite_replaces_a_model_folder(tiny_hf_checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    assert _cli([str(tiny_hf_checkpoint), str(out), "--no-verify"], capsys)[0] == 0
    (out / "old.txt").write_text("old")
    code, _ = _cli([str(tiny_hf_checkpoint), str(out), "--overwrite", "--no-verify"], capsys)
    assert code == 0 and not (out / "old.txt").exists() and (out / "manifest.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no .old, .partial or lock left


def test_int4_runs_and_stores_its_quality(tiny_hf_checkpoint, tmp_path):
    out = tmp_path / "int4"
    result = api.export_model(checkpoint=tiny_hf_checkpoint, out=out, precision="int4", progress=False)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["precision"] == "int4" and cfg["quantization"]["block_size"] == 32
    v = cfg["verify"]
    assert v == result.config.verify and v["perplexity"] > 0 and v["reference_perplexity"] > 0
    import onnx

    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("MatMulNBits") == 7 * 2 + 1  # every projection and the head (8-bit)
    # a random tiny model has near-flat logits and no redundancy to spare, yet int4 keeps
    # its top token far above chance (1/32000) and its perplexity close to fp32
    assert v["top1_agreement"] > 0.3
    assert v["perplexity"] < 1.1 * v["reference_perplexity"]
    fp32 = (tiny_hf_checkpoint / "model.safetensors").stat().st_size
    embedding = 32000 * 64 * 4  # the embedding stays float32 (a Gather reads one row per token)
    # two layers: both are the first or the last, kept at 8 bits (tests/test_streaming.py has the 4-bit recipe)
    assert (out / "model.onnx.data").stat().st_size < embedding + 0.35 * (fp32 - embedding)


def test_int4_bad_options(tiny_hf_checkpoint, tmp_path, capsys):
    code, err = _cli([str(tiny_hf_checkpoint), str(tmp_path / "o"), "--precision", "int4", "--block-size", "7"], capsys)
    assert code == 2 and "--block-size" in err and not (tmp_path / "o").exists()


def test_opset_18_for_older_runtimes(tiny_hf_checkpoint, tmp_path):
    import onnx

    out = tmp_path / "op18"
    result = api.export_model(checkpoint=tiny_hf_checkpoint, out=out, opset=18, progress=False)
    proto = onnx.load(str(out / "model.onnx"), load_external_data=False)
    assert {o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")} == {18}
    assert "RMSNormalization" not in {n.op_type for n in proto.graph.node}  # an opset-23 op
    assert result.config.verify["max_abs_logit_diff"] < 1e-4

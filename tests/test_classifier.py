"""Sequence classification: exported LlamaForSequenceClassification against transformers, the
Classifier API, the fp16/int4 exports' figures, and the `classify` CLI's errors."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import onnxruntime as ort
import pytest
import torch

from llama2_onnx.cli import main
from llama2_onnx.export.api import export_model
from llama2_onnx.models import writers
from llama2_onnx.models.config import ModelArgs
from llama2_onnx.runtime import Classifier, contract
from llama2_onnx.runtime.classifier import activation, apply, pad_batch
from llama2_onnx.runtime.folder import FolderConfig

LABELS = ["negative", "neutral", "positive"]
SMALL = dict(dim=64, n_layers=2, n_heads=4, vocab_size=256, ffn_hidden_dim=96, max_seq_len=64, num_labels=3)
ARCHS = {"mha": 4, "gqa": 2}  # n_kv_heads
PADS = {"pad0": 0, "nopad": None}
PAD = 0
# rows of different lengths; in the pad0 models the third ends in the pad token itself, which
# transformers skips when it pools (the rightmost token that is not the pad token)
ROWS = [[1, 5, 9, 200, 7, 31, 8], [1, 3], [1, 4, 4, 4, 100, 4, 4, 6, 0], [1, 17, 250, 99]]


def _checkpoint(tmp_path_factory, arch: str, pad: str):
    args = ModelArgs(**SMALL, n_kv_heads=ARCHS[arch], pad_id=PADS[pad])
    folder = tmp_path_factory.mktemp(f"cls-{arch}-{pad}")
    writers.write_hf(writers.random_state_dict(args, seed=3), args, folder, labels=LABELS)
    return folder


@pytest.fixture(scope="module", params=[(a, p, g) for a in ARCHS for p in PADS for g in contract.GRAPHS],
                ids=lambda x: "-".join(x))
def exported(request, tmp_path_factory):
    """(HF checkpoint folder, exported fp32 folder) for each architecture x pad_token_id x graph kind."""
    arch, pad, graph = request.param
    ckpt = _checkpoint(tmp_path_factory, arch, pad)
    out = tmp_path_factory.mktemp("cls-onnx") / graph
    export_model(checkpoint=ckpt, out=out, graph=graph, progress=False)
    return ckpt, out


def _transformers(ckpt):
    from transformers import LlamaForSequenceClassification

    return LlamaForSequenceClassification.from_pretrained(ckpt, dtype=torch.float32).eval()


def _hf_logits(model, ids, mask=None) -> np.ndarray:
    with torch.no_grad():
        kw = {} if mask is None else {"attention_mask": torch.from_numpy(mask)}
        return model(torch.from_numpy(np.asarray(ids, np.int64)), **kw).logits.numpy()


def _run(folder, ids, mask) -> np.ndarray:
    s = ort.InferenceSession(str(folder / contract.MODEL_FILE), providers=["CPUExecutionProvider"])
    return s.run([contract.LOGITS], {contract.INPUT_IDS: ids, contract.ATTENTION_MASK: mask})[0]


def _left_pad(rows, pad_id):
    width = max(map(len, rows))
    ids = np.array([[pad_id] * (width - len(r)) + r for r in rows], np.int64)
    mask = np.array([[0] * (width - len(r)) + [1] * len(r) for r in rows], np.int64)
    return ids, mask


def test_logits_match_transformers(exported):
    """Each row's logits, from a batch of different lengths, equal transformers' on that row alone;
    with a pad_token_id also transformers' own padded batch (right padding; left too for the
    portable graph, which takes either)."""
    ckpt, folder = exported
    hf = _transformers(ckpt)
    cfg = FolderConfig.read(folder)
    assert cfg.task == "text-classification" and cfg.labels == LABELS and cfg.model.num_labels == 3
    alone = np.concatenate([_hf_logits(hf, [r]) for r in ROWS])
    got = Classifier.from_dir(folder, batch_size=3, huge_pages=False).logits_ids(ROWS)  # two batches, sorted by length
    assert got.shape == (len(ROWS), 3)
    assert np.abs(got - alone).max() < 1e-4
    pad_id = cfg.model.pad_id
    if pad_id is None:  # transformers refuses batches without a pad token; ours take them (the mask marks padding)
        with pytest.raises(ValueError, match="no padding token"):
            _hf_logits(hf, pad_batch(ROWS[:2], 0)[0])
        return
    ids, mask = pad_batch(ROWS, pad_id)
    assert np.abs(_run(folder, ids, mask) - _hf_logits(hf, ids, mask)).max() < 1e-4
    assert np.abs(_hf_logits(hf, [ROWS[2]]) - _hf_logits(hf, [ROWS[2][:-1]])).max() < 1e-6  # the trailing pad skipped
    if cfg.graph == contract.GRAPH_PORTABLE:
        ids, mask = _left_pad(ROWS, pad_id)
        assert np.abs(_run(folder, ids, mask) - _hf_logits(hf, ids, mask)).max() < 1e-4


def test_io_contract_and_verify_figures(exported):
    _, folder = exported
    s = ort.InferenceSession(str(folder / contract.MODEL_FILE), providers=["CPUExecutionProvider"])
    assert [(i.name, i.shape) for i in s.get_inputs()] == [("input_ids", ["batch_size", "sequence_length"]),
                                                           ("attention_mask", ["batch_size", "sequence_length"])]
    assert [(o.name, o.shape) for o in s.get_outputs()] == [("logits", ["batch_size", 3])]
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["io"] == {"inputs": ["input_ids", "attention_mask"], "outputs": ["logits"]}
    v = cfg["verify"]
    assert v["task"] == "text-classification" and v["max_abs_logit_diff"] < 1e-4 and v["label_agreement"] == 1.0
    assert v["sentences"] > 5
    assert not (folder / "genai_config.json").exists()  # onnxruntime-genai runs decoders only


@pytest.mark.parametrize("graph", contract.GRAPHS)
@pytest.mark.parametrize("precision", ["fp16", "int4"])
def test_fp16_and_int4_exports(tmp_path_factory, precision, graph):
    ckpt = _checkpoint(tmp_path_factory, "gqa", "pad0")
    out = tmp_path_factory.mktemp("cls-q") / f"{precision}-{graph}"
    result = export_model(checkpoint=ckpt, out=out, precision=precision, graph=graph, progress=False)
    v = result.config.verify
    assert v["max_abs_logit_diff"] < (0.05 if precision == "fp16" else 0.5) and v["label_agreement"] >= 0.75
    if precision == "int4":
        assert result.config.quantization["head"] == "float32 score"
    hf = _transformers(ckpt)
    got = Classifier.from_dir(out, huge_pages=False).logits_ids(ROWS)
    alone = np.concatenate([_hf_logits(hf, [r]) for r in ROWS])
    assert np.abs(got - alone).max() < (0.05 if precision == "fp16" else 0.5)


def test_activation_follows_transformers_pipeline():
    cfg = lambda n, problem=None: FolderConfig(model=ModelArgs(**{**SMALL, "num_labels": n}), task="text-classification",
                                               labels=[f"L{i}" for i in range(n)], problem_type=problem)
    assert activation(cfg(3)) == "softmax" and activation(cfg(1)) == "sigmoid"
    assert activation(cfg(3, "multi_label_classification")) == "sigmoid" and activation(cfg(1, "regression")) == "none"
    x = np.array([[1.0, 2.0, 3.0]])
    assert np.allclose(apply(x, "softmax").sum(), 1) and np.allclose(apply(x, "none"), x)


# ---- a classifier with Llama 2's vocabulary: texts in, labels out ------------------------

def test_classify_texts(text_classifier):
    ckpt, folder = text_classifier
    clf = Classifier.from_dir(folder, huge_pages=False)
    texts = ["I loved every minute of it.", "Dull.", ""]
    results = clf.classify(texts)
    assert [set(r) for r in results] == [{"label", "score", "scores"}] * 3
    for r in results:
        assert set(r["scores"]) == {"NEGATIVE", "POSITIVE"} and abs(sum(r["scores"].values()) - 1) < 1e-6
        assert r["score"] == max(r["scores"].values()) and r["scores"][r["label"]] == r["score"]
    assert clf.classify("Dull.") == results[1]
    hf = _transformers(ckpt)
    ids = [clf.encode(t) for t in texts]
    assert ids[2] == [1]  # an empty text is BOS alone, as transformers' Llama tokenizer gives it
    want = np.concatenate([_hf_logits(hf, [r]) for r in ids])
    assert np.abs(clf.logits(texts) - want).max() < 1e-4
    assert clf.classify([]) == []


def _same(ours, theirs):
    """Equal structure and labels, scores within 1e-5."""
    if isinstance(ours, list):
        return isinstance(theirs, list) and len(ours) == len(theirs) and all(map(_same, ours, theirs))
    return ours["label"] == theirs["label"] and abs(ours["score"] - theirs["score"]) < 1e-5


def test_pipeline_matches_transformers(text_classifier):
    import transformers

    from llama2_onnx import pipeline

    ckpt, folder = text_classifier
    ours = pipeline("text-classification", model=folder, huge_pages=False)
    theirs = transformers.pipeline("text-classification", model=str(ckpt))
    texts = ["I loved every minute of it.", "Dull.", "The river has changed its course three times."]
    for args, kwargs in [((texts[0],), {}), ((texts,), {}), ((texts[1],), {"top_k": None}), ((texts,), {"top_k": 1}),
                         ((texts,), {"top_k": None, "function_to_apply": "sigmoid"})]:
        got, want = ours(*args, **kwargs), theirs(*args, **kwargs)
        assert _same(got, want), (kwargs, got, want)
    all_labels = pipeline("text-classification", model=folder, top_k=None, huge_pages=False)
    assert _same(all_labels(texts[0]), theirs(texts[0], top_k=None))
    from llama2_onnx.errors import UserError

    with pytest.raises(UserError, match="needs model=FOLDER"):
        pipeline("text-classification")


def test_classify_cli(text_classifier, capsys):
    _, folder = text_classifier
    assert main(["classify", str(folder), "--text", "Great film.", "--text", "Awful.", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [r["text"] for r in out] == ["Great film.", "Awful."] and all(r["label"] in ("NEGATIVE", "POSITIVE") for r in out)
    assert main(["classify", str(folder), "--text", "Great film.", "--top-k", "0"]) == 0
    line = capsys.readouterr().out.strip()
    assert "NEGATIVE" in line and "POSITIVE" in line and "'Great film.'" in line


def _bad_cases(classifier, generator, tmp):
    long = "word " * 200
    return [
        (["classify", str(generator), "--text", "hi"], "is a text generator, not a text classifier"),
        (["generate", str(classifier), "--prompt", "hi"], "is a text classifier (labels NEGATIVE, POSITIVE)"),
        (["chat", str(classifier)], "is a text classifier"),
        (["classify", str(tmp / "nowhere"), "--text", "hi"], "does not exist"),
        (["classify", str(classifier), "--text", "hi", "--threads", "0"], "--threads must be at least 1"),
        (["classify", str(classifier), "--text", "hi", "--batch-size", "0"], "--batch-size must be at least 1"),
        (["classify", str(classifier), "--text", "hi", "--top-k", "-1"], "--top-k must be 0"),
        (["classify", str(classifier), "--text", long], "longer than the model's context of 64"),
    ]


def test_cli_errors(text_classifier, tiny_onnx, tmp_path, capsys):
    _, folder = text_classifier
    for argv, message in _bad_cases(folder, tiny_onnx, tmp_path):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, (argv, err)
    with pytest.raises(SystemExit) as e:  # argparse: --text is required
        main(["classify", str(folder)])
    assert e.value.code == 2
    assert main(["classify", str(folder), "--text", "word " * 200, "--truncate"]) == 0


def test_folder_without_tokenizer_takes_ids_only(exported):
    _, folder = exported
    clf = Classifier.from_dir(folder, huge_pages=False)
    with pytest.raises(Exception, match="has no tokenizer"):
        clf.classify(["hi"])
    with pytest.raises(Exception, match="token ids from 0 to 255"):
        clf.logits_ids([[1, 256]])


# ---- checkpoints: the score head in every format that has one ------------------------------

def test_checkpoint_formats_and_config(tmp_path):
    from llama2_onnx.models import checkpoint

    args = ModelArgs(**SMALL, n_kv_heads=2, pad_id=0)
    sd = writers.random_state_dict(args, seed=1)
    assert sd["score.weight"].shape == (3, 64) and "output.weight" not in sd
    writers.write_hf(sd, args, tmp_path / "hf", labels=LABELS)
    writers.write_gguf(sd, args, tmp_path / "m.gguf", labels=LABELS)
    for path in (tmp_path / "hf", tmp_path / "m.gguf"):
        ck = checkpoint.load(path)
        assert ck.args.num_labels == 3 and ck.labels == LABELS and torch.equal(ck.state_dict["score.weight"], sd["score.weight"])
    with pytest.raises(ValueError, match="no classifiers"):
        writers.write_meta(sd, args, tmp_path / "meta")


@pytest.mark.parametrize("edit, labels", [
    ({}, LABELS),
    ({"id2label": None, "label2id": None}, ["LABEL_0", "LABEL_1"]),  # transformers' default two labels
    ({"id2label": None, "label2id": None, "num_labels": 3}, ["LABEL_0", "LABEL_1", "LABEL_2"]),
])
def test_hf_labels(edit, labels):
    from llama2_onnx.models.config import hf_labels

    cfg = {**writers.hf_config(ModelArgs(**SMALL), torch.float32, LABELS), **edit}
    assert hf_labels(cfg) == labels


@pytest.mark.parametrize("edit, message", [
    ({"architectures": ["LlamaForCausalLM"]}, "holds a classification head (score.weight) but its config does not name a classifier"),
    ({"id2label": {"0": "a", "2": "b", "1": "c", "5": "d"}}, "id2label must name ids 0 to 3"),
    ({"problem_type": "ranking"}, "problem_type 'ranking' is not one of"),
    ({"architectures": ["LlamaForTokenClassification"]}, "architecture 'LlamaForTokenClassification' is not supported"),
    ({"id2label": {"0": "a", "1": "b"}, "label2id": None}, "score.weight has shape [3, 64], expected [2, 64]"),
    ({"id2label": None, "num_labels": 10**9}, "num_labels must be an integer from 1 to 65536"),  # refused before a list is built
])
def test_bad_classifier_checkpoints(tmp_path, edit, message):
    from llama2_onnx.models import checkpoint
    from llama2_onnx.errors import UserError

    args = ModelArgs(**SMALL, n_kv_heads=2)
    writers.write_hf(writers.random_state_dict(args, seed=1), args, tmp_path, labels=LABELS)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, **edit}))
    with pytest.raises(UserError, match=re.escape(message)):
        checkpoint.open_checkpoint(tmp_path)


def test_lm_weights_under_a_classifier_config(tmp_path):
    from llama2_onnx.errors import UserError
    from llama2_onnx.models import checkpoint

    lm = ModelArgs(**{**SMALL, "num_labels": None}, n_kv_heads=2)
    writers.write_hf(writers.random_state_dict(lm, seed=1), lm, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "architectures": ["LlamaForSequenceClassification"]}))
    with pytest.raises(UserError, match="names a sequence classifier but the weights hold a language-model head"):
        checkpoint.open_checkpoint(tmp_path)


def test_trace_refused_and_export_cli_line(tmp_path_factory, capsys):
    ckpt = _checkpoint(tmp_path_factory, "gqa", "pad0")
    out = tmp_path_factory.mktemp("cls-cli")
    assert main(["export", str(ckpt), str(out / "t"), "--trace", "--quiet"]) == 2
    assert "--trace writes causal language models only" in capsys.readouterr().err
    assert main(["export", str(ckpt), str(out / "m"), "--quiet"]) == 0
    assert "label agreement 100.0% over" in capsys.readouterr().out


def test_config_task_must_match_the_model(exported, tmp_path):
    from llama2_onnx.runtime.folder import ModelFolderError

    _, folder = exported
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    cfg = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**cfg, "labels": ["just one"]}))
    with pytest.raises(ModelFolderError, match="do not agree"):
        FolderConfig.read(copy)


def test_layer_by_layer_verify_and_hqq(tmp_path_factory, monkeypatch):
    """A classifier too large to verify whole is checked layer by layer; hqq int4 keeps the score head float."""
    from llama2_onnx.export import api

    ckpt = _checkpoint(tmp_path_factory, "gqa", "pad0")
    monkeypatch.setattr(api, "fits_in_memory", lambda *a: False)
    out = tmp_path_factory.mktemp("cls-layers")
    v = export_model(checkpoint=ckpt, out=out / "fp32", progress=False).config.verify
    assert v["mode"] == "layers" and v["max_abs_diff"] < 1e-4
    monkeypatch.undo()
    from llama2_onnx.export.precision import Int4Options

    import onnx

    result = export_model(checkpoint=ckpt, out=out / "hqq", precision="int4", int4=Int4Options(algorithm="hqq"), progress=False)
    v = result.config.verify  # every layer 4-bit on a random 64-wide model: figures, not a bound
    assert 0 < v["max_abs_logit_diff"] < 2 and 0 <= v["label_agreement"] <= 1
    graph = onnx.load(str(out / "hqq" / "model.onnx"), load_external_data=False).graph
    assert sum(n.op_type == "MatMulNBits" for n in graph.node) == 2 * 7  # wq wk wv wo w1 w2 w3 in each layer
    assert any(n.op_type == "MatMul" and "score" in n.input for n in graph.node)  # the head stays float32

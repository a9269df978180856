"""The model folder's configuration files: our config.json, onnxruntime-genai's genai_config.json,
tokenizer_config.json, and the manifest, written last (``finish``). The folder itself is built
atomically by ``staging``."""

from __future__ import annotations

import json
import os
from pathlib import Path

from llama2_onnx.runtime import contract
from llama2_onnx.runtime.folder import FolderConfig, write_manifest


def genai_config(cfg: FolderConfig) -> dict:
    """onnxruntime-genai's genai_config.json (the fused graph: no position_ids, one shared KV buffer)."""
    a = cfg.model
    fused = cfg.graph == contract.GRAPH_ORT
    inputs = {
        "input_ids": contract.INPUT_IDS,
        "attention_mask": contract.ATTENTION_MASK,
        **({} if fused else {"position_ids": contract.POSITION_IDS}),
        "past_key_names": contract.PAST_KEY,
        "past_value_names": contract.PAST_VALUE,
    }
    return {
        "model": {
            "bos_token_id": a.bos_id,
            "context_length": a.max_seq_len,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": contract.MODEL_FILE,
                "head_size": a.head_dim,
                "hidden_size": a.dim,
                "inputs": inputs,
                "outputs": {
                    "logits": contract.LOGITS,
                    "present_key_names": contract.PRESENT_KEY,
                    "present_value_names": contract.PRESENT_VALUE,
                },
                "num_attention_heads": a.n_heads,
                "num_hidden_layers": a.n_layers,
                "num_key_value_heads": a.n_kv_heads,
            },
            "eos_token_id": a.eos_ids,
            "pad_token_id": a.fill_id,
            "type": "llama",
            "vocab_size": a.vocab_size,
        },
        "search": {
            "diversity_penalty": 0.0, "do_sample": False, "early_stopping": True, "length_penalty": 1.0,
            "max_length": a.max_seq_len, "min_length": 0, "no_repeat_ngram_size": 0, "num_beams": 1,
            "num_return_sequences": 1, "past_present_share_buffer": fused, "repetition_penalty": 1.0,
            "temperature": 1.0, "top_k": 1, "top_p": 1.0,
        },
    }


def tokenizer_config(cfg: FolderConfig, special: dict[str, str]) -> dict:
    """tokenizer_config.json, read by onnxruntime-genai's tokenizer (and by transformers)."""
    hf = cfg.tokenizer == "tokenizer.json"
    return {
        "tokenizer_class": "GPT2Tokenizer" if hf else "LlamaTokenizer",
        "add_bos_token": not hf,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": cfg.model.max_seq_len,
        **special,
    }


def write_configs(folder: Path, cfg: FolderConfig, special: dict[str, str]) -> None:
    (folder / contract.CONFIG_FILE).write_text(cfg.to_json())
    if cfg.task == contract.TASK_GENERATION:  # onnxruntime-genai runs decoders, not classifiers
        (folder / contract.GENAI_CONFIG_FILE).write_text(json.dumps(genai_config(cfg), indent=2))
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(cfg, special), indent=2))


def finish(folder: Path, known: dict[str, str] | None = None) -> None:
    """Give the files the usual permissions (mkdtemp and some writers use 0600), then the
    manifest, last: a folder with a manifest is complete."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.iterdir():
        path.chmod(0o666 & ~umask)
    write_manifest(folder, known)
    (folder / contract.MANIFEST_FILE).chmod(0o666 & ~umask)

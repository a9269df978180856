"""The ONNX I/O contract: tensor names, symbolic dims and model-folder file names, in one place.

Portable graph (format version 1), the names Hugging Face Optimum and onnxruntime-genai use:

    in  input_ids                    int64 [batch_size, sequence_length]
    in  attention_mask               int64 [batch_size, total_sequence_length]  1 = token, 0 = left padding
    in  position_ids                 int64 [batch_size, sequence_length]
    in  past_key_values.{i}.key/.value   model dtype [batch_size, n_kv_heads, past_sequence_length, head_dim]
    out logits                       float32 [batch_size, sequence_length, vocab_size]
    out present.{i}.key/.value       model dtype [batch_size, n_kv_heads, total_sequence_length, head_dim]
"""

from __future__ import annotations

FORMAT_VERSION = 1
GRAPH_PORTABLE = "portable"

BATCH, SEQ, PAST, TOTAL = "batch_size", "sequence_length", "past_sequence_length", "total_sequence_length"

INPUT_IDS, ATTENTION_MASK, POSITION_IDS, LOGITS = "input_ids", "attention_mask", "position_ids", "logits"
PAST_KEY, PAST_VALUE = "past_key_values.%d.key", "past_key_values.%d.value"
PRESENT_KEY, PRESENT_VALUE = "present.%d.key", "present.%d.value"

MODEL_FILE, DATA_FILE = "model.onnx", "model.onnx.data"
CONFIG_FILE, GENAI_CONFIG_FILE, MANIFEST_FILE = "config.json", "genai_config.json", "manifest.json"


def past_names(n_layers: int) -> list[str]:
    return [name % i for i in range(n_layers) for name in (PAST_KEY, PAST_VALUE)]


def present_names(n_layers: int) -> list[str]:
    return [name % i for i in range(n_layers) for name in (PRESENT_KEY, PRESENT_VALUE)]


def input_names(n_layers: int) -> list[str]:
    return [INPUT_IDS, ATTENTION_MASK, POSITION_IDS, *past_names(n_layers)]


def output_names(n_layers: int) -> list[str]:
    return [LOGITS, *present_names(n_layers)]

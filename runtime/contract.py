"""The ONNX I/O contract: tensor names, symbolic dims and model-folder file names, in one place.

Portable graph (format version 1), the names Hugging Face Optimum and onnxruntime-genai use:

    in  input_ids                    int64 [batch_size, sequence_length]
    in  attention_mask               int64 [batch_size, total_sequence_length]  1 = token, 0 = left padding
    in  position_ids                 int64 [batch_size, sequence_length]
    in  past_key_values.{i}.key/.value   model dtype [batch_size, n_kv_heads, past_sequence_length, head_dim]
    in  logits_to_keep               int64 scalar, optional (default 0)  see below
    out logits                       float32 [batch_size, logits_sequence_length, vocab_size]
    out present.{i}.key/.value       model dtype [batch_size, n_kv_heads, total_sequence_length, head_dim]

Fused graph for ONNX Runtime ("ort"), onnxruntime-genai's GroupQueryAttention contract:

    in  input_ids                    int64 [batch_size, sequence_length]  each row's tokens first (right padding)
    in  attention_mask               int64 [batch_size, total_sequence_length]  row b: ones for its tokens so far
                                     (cache + this step), then zeros; its width is the longest row, and equals
                                     sequence_length exactly on the first step (how the graph knows the cache is empty)
    in  past_key_values.{i}.key/.value   model dtype [batch_size, n_kv_heads, past_sequence_length, head_dim]
    in  logits_to_keep               int64 scalar, optional (default 0)  see below
    out logits                       float32 [batch_size, logits_sequence_length, vocab_size]
    out present.{i}.key/.value       model dtype [batch_size, n_kv_heads, total_sequence_length, head_dim]

logits_to_keep (both kinds; graph revision 2, the input is an initializer of the same name, so a caller
that does not feed it, onnxruntime-genai among them, gets the default): 0 = logits at every position,
logits_sequence_length = sequence_length (the only behaviour of folders exported before it); n > 0 = each
row's last n positions only, the head computed for those alone, logits_sequence_length = min(n, S).
Portable graph (left padding): the last n columns. Fused graph (right padding): row b's tokens end at
min(sum(mask_b), S), the sum on a first step and S after it; its last n end there (a row shorter than n
repeats its first position). A prompt pass that needs only the next token feeds 1: the head is about a
fifth of SmolLM2's prompt compute. Callers detect the input with get_overridable_initializers().

No position_ids: row b's positions continue from its length (sum of its mask - this step's tokens).
The past may be a buffer of any capacity >= total_sequence_length, bound as the present output too
(onnxruntime-genai's past_present_share_buffer): the step writes its keys and values in place at each
row's length. With separate buffers the present is max(past capacity, total_sequence_length) long,
the past copied into it (a growing cache, as in the portable graph).

Sequence classifier (config task "text-classification", Hugging Face's LlamaForSequenceClassification;
Optimum's text-classification names), either graph kind, no KV cache:

    in  input_ids                    int64 [batch_size, sequence_length]
    in  attention_mask               int64 [batch_size, sequence_length]  1 = token, 0 = padding;
                                     portable: left or right padding (positions count real tokens);
                                     ort: right padding only (each row's tokens first)
    out logits                       float32 [batch_size, num_labels]  at each row's last real token: the
                                     rightmost position with mask 1 and, when config.json's model has a
                                     pad_id, a token other than it (transformers' pooling)
"""

from __future__ import annotations

FORMAT_VERSION = 1  # bumped when old folders cannot work with this runtime
# bumped when exports gain something older folders lack but still run without (the default model is
# exported again, llama2_onnx/assets.py): 2 = the optional logits_to_keep input
GRAPH_REVISION = 2
GRAPH_PORTABLE = "portable"
GRAPH_ORT = "ort"
GRAPHS = (GRAPH_PORTABLE, GRAPH_ORT)
TASK_GENERATION, TASK_CLASSIFICATION = "text-generation", "text-classification"
TASKS = (TASK_GENERATION, TASK_CLASSIFICATION)

BATCH, SEQ, PAST, TOTAL = "batch_size", "sequence_length", "past_sequence_length", "total_sequence_length"
KEPT = "logits_sequence_length"  # the logits' positions: sequence_length, or logits_to_keep

# An optional scalar input (an initializer of the same name is its default, ONNX IR >= 4): how many of each
# row's last positions get logits. KEEP_ALL (the default) keeps every one, as callers that do not know it expect.
LOGITS_TO_KEEP, KEEP_ALL = "logits_to_keep", 0

INPUT_IDS, ATTENTION_MASK, POSITION_IDS, LOGITS = "input_ids", "attention_mask", "position_ids", "logits"
PAST_KEY, PAST_VALUE = "past_key_values.%d.key", "past_key_values.%d.value"
PRESENT_KEY, PRESENT_VALUE = "present.%d.key", "present.%d.value"

MODEL_FILE, DATA_FILE = "model.onnx", "model.onnx.data"
CONFIG_FILE, GENAI_CONFIG_FILE, MANIFEST_FILE = "config.json", "genai_config.json", "manifest.json"


def past_names(n_layers: int) -> list[str]:
    return [name % i for i in range(n_layers) for name in (PAST_KEY, PAST_VALUE)]


def present_names(n_layers: int) -> list[str]:
    return [name % i for i in range(n_layers) for name in (PRESENT_KEY, PRESENT_VALUE)]


def input_names(n_layers: int, graph: str = GRAPH_PORTABLE, task: str = TASK_GENERATION) -> list[str]:
    if task == TASK_CLASSIFICATION:
        return [INPUT_IDS, ATTENTION_MASK]
    ids = [INPUT_IDS, ATTENTION_MASK] + ([POSITION_IDS] if graph == GRAPH_PORTABLE else [])
    return [*ids, *past_names(n_layers)]


def output_names(n_layers: int, task: str = TASK_GENERATION) -> list[str]:
    return [LOGITS] if task == TASK_CLASSIFICATION else [LOGITS, *present_names(n_layers)]

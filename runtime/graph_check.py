"""config.json against the graph it describes: the session's input and output names, the KV
tensors' heads, head size and dtype, and the logits' vocabulary, compared when a model is loaded.

Cheap (names and shapes only) and it turns a config that no longer fits its model.onnx (edited,
or copied from another export) into one line at load, not an ONNX Runtime traceback at the
first step.
"""

from __future__ import annotations

from pathlib import Path

from . import contract
from .folder import FolderConfig, ModelFolderError

ORT_TYPES = {"float32": "tensor(float)", "float16": "tensor(float16)"}


def _names(want: list[str], have: list[str]) -> str:
    missing = [n for n in want if n not in have]
    extra = [n for n in have if n not in want]
    parts = ([f"lacks {', '.join(missing[:3])}" + (" ..." if len(missing) > 3 else "")] if missing else []) + \
            ([f"has unexpected {', '.join(extra[:3])}" + (" ..." if len(extra) > 3 else "")] if extra else [])
    return " and ".join(parts)


def check_graph_io(folder: Path, config: FolderConfig, inputs: list, outputs: list) -> None:
    """inputs/outputs: the session's NodeArgs (name, shape, type). Raise ModelFolderError when they
    are not what config.json says: names for its n_layers and graph kind, KV tensors
    [batch, n_kv_heads, length, head_dim] of the precision's dtype, logits [batch, seq, vocab_size]
    (a classifier's: logits [batch, num_labels] and no KV tensors)."""
    a = config.model
    says = (f"{folder / contract.CONFIG_FILE} does not match {contract.MODEL_FILE} (config: n_layers {a.n_layers}, "
            f"graph {config.graph!r}, n_kv_heads {a.n_kv_heads}, head_dim {a.head_dim}, vocab_size {a.vocab_size}, "
            f"precision {config.precision})")
    fix = "restore the folder's config.json or export the model again"
    task = config.task
    for kind, want, have in (("inputs", contract.input_names(a.n_layers, config.graph, task), [i.name for i in inputs]),
                             ("outputs", contract.output_names(a.n_layers, task), [o.name for o in outputs])):
        if sorted(want) != sorted(have):
            raise ModelFolderError(f"{says}: the graph's {kind} {_names(want, have)}; {fix}")
    kv_type = ORT_TYPES[config.kv_dtype]
    for arg in [*inputs, *outputs]:
        if arg.name in (contract.INPUT_IDS, contract.ATTENTION_MASK, contract.POSITION_IDS):
            continue
        logits = arg.name == contract.LOGITS
        # None for a symbolic dim: only fixed sizes are compared
        if logits and a.is_classifier:
            want = [None, a.num_labels]
        else:
            want = [None, None, a.vocab_size] if logits else [None, a.n_kv_heads, None, a.head_dim]
        have = [d if isinstance(d, int) else None for d in (arg.shape or [])]
        shape_ok = len(have) == len(want) and all(w is None or h is None or h == w for w, h in zip(want, have))
        if not shape_ok or arg.type != ("tensor(float)" if logits else kv_type):
            raise ModelFolderError(f"{says}: the graph's {arg.name} is {arg.type} {list(arg.shape or [])}; {fix}")

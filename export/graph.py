"""Build the decoder's ONNX graph directly from the weights, one layer at a time.

No tracing: the graph is written node by node (export/onnx_writer.py) and each weight is
read from `read(name)` (Meta names and layout, one tensor at a time), converted to the
target precision and appended to model.onnx.data (on the writer's thread, while the next is
read). Memory is that of a few tensors, whatever the number of layers.

Two graph kinds, the I/O contracts in runtime/contract.py:

    portable  the same contract and the same math as the traced graph (models/llama.py):
              plain ONNX ops, growing past/present, position_ids
    ort       ONNX Runtime's fused kernels: packed QKV MatMul, com.microsoft
              GroupQueryAttention (rotary inside, past and present may share one buffer),
              SkipSimplifiedLayerNormalization (residual add + RMSNorm), MatMulNBits for int4

Weights: fp32 or fp16 MatMul weights stored transposed ([in, out]); a tied head is the
embedding's table itself behind a Transpose (ONNX Runtime folds it at load). int4 is
MatMulNBits (export/blockquant.py) with the recipe in `Quant`: 4 bits, and 8 for the head and
the groups where 4 cost SmolLM2 the most perplexity (BENCHMARKS.md has the table).

The head runs only on the positions asked for: the scalar input `logits_to_keep` (runtime/contract.py)
defaults to 0, every position (an initializer of the same name: callers that do not know it, such as
onnxruntime-genai, get the full logits), and n keeps each row's last n (`_keep`). A prompt pass that
needs only the next token asks for 1 and skips the head on the other positions: a fifth of
SmolLM2's prompt compute.

A sequence classifier (args.num_labels: LlamaForSequenceClassification) is the same decoder without a
KV cache: positions come from the attention mask (portable), each row's last real token is picked
(`_pool`, models/llama.last_token_index) and its final hidden state goes through the `score` head,
kept in float32 whatever the precision (num_labels x dim weights: nothing to gain by shrinking them).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import onnx
import torch

from llama2_onnx.models.config import ModelArgs
from llama2_onnx.runtime import contract

from . import blockquant
from .onnx_writer import GraphWriter, value

Read = Callable[[str], torch.Tensor]
NP_DTYPES = {"fp32": np.float32, "fp16": np.float16, "int4": np.float32}
F32 = onnx.TensorProto.FLOAT
HIDDEN, HIDDEN_OUT = "hidden", "hidden_out"  # the layers-only graph's input and output


@dataclass(frozen=True)
class Quant:
    """Weight-only block quantization of MatMul weights (MatMulNBits)."""

    bits: int = 4
    block_size: int = 32
    accuracy_level: int = 4
    head_bits: int = 8  # the output head
    search: bool = False  # search each block's scale for the least error (export/blockquant.py)
    # 8 bits where 4 cost the most quality (llama.cpp's Q4_K_M keeps w2 and wv wider for the same reason)
    wide_bits: int = 8
    wide_block_size: int = 64  # blocks of the 8-bit weights: fewer scales to apply than 32, as precise (BENCHMARKS.md)
    wide_weights: tuple[str, ...] = ("feed_forward.w2",)
    wide_layers: tuple[int, ...] = ()  # every weight of these layers (export: the first and the last)

    def for_layer(self, i: int) -> "Quant":
        """The recipe of layer i as the only layer (layer 0) of a one-layer graph."""
        return dataclasses.replace(self, wide_layers=(0,) if i in self.wide_layers else ())

    def bits_for(self, label: str) -> int:
        layer = int(label.split(".")[1]) if label.startswith("layers.") else None
        if layer in self.wide_layers or any(label.startswith(f"layers.{layer}.{w}") for w in self.wide_weights):
            return self.wide_bits
        return self.bits


class DecoderGraph:
    """Emit one decoder graph. With whole=False the graph is the layers alone (no embedding, no
    head): input `hidden` [B, S, dim], output `hidden_out`, for checking one layer at a time."""

    def __init__(self, args: ModelArgs, read: Read, writer: GraphWriter, *, graph: str = contract.GRAPH_PORTABLE,
                 precision: str = "fp32", quant: Quant | None = None, opset: int = 23, whole: bool = True):
        if graph not in contract.GRAPHS:
            raise ValueError(f"graph must be one of {contract.GRAPHS}, got {graph!r}")
        self.a, self.read, self.w = args, read, writer
        self.graph, self.precision, self.opset, self.whole = graph, precision, opset, whole
        self.classifier = whole and args.is_classifier  # the layers-only graph keeps the decoder's I/O
        self._embedding_table: str | None = None  # initializer name, once written
        self.quant = quant if precision == "int4" else None
        self.dtype = np.dtype(NP_DTYPES[precision])
        self.onnx_dtype = onnx.helper.np_dtype_to_tensor_dtype(self.dtype)

    # ---- weights -------------------------------------------------------------------
    def _array(self, name: str) -> np.ndarray:
        return self.read(name).to(torch.float16 if self.dtype == np.float16 else torch.float32).numpy()

    def _stacked(self, names: Iterable[str]) -> torch.Tensor:
        """Linear weights [out, in] of names, stacked along out, in the dtype the graph stores or quantizes."""
        parts = [self.read(n) for n in names]
        w = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
        del parts
        return w.to(torch.float16 if self.dtype == np.float16 and not self.quant else torch.float32)

    def linear(self, x: str, names: list[str], label: str, *, bits: int | None = None) -> str:
        """x @ W.T for the (stacked) weights of names: MatMul, or MatMulNBits when quantizing."""
        w = self._stacked(names)
        n, k = w.shape
        if self.quant is None:  # MatMul's B is [in, out], transposed on the writer's thread
            b = self.w.weight(label, lambda w=w: w.t().contiguous().numpy(), self.dtype, (k, n))
            return self.w.node("MatMul", [x, b])
        bits = bits or self.quant.bits_for(label)
        block = self.quant.wide_block_size if bits == 8 else self.quant.block_size
        packed, scales, zp = blockquant.quantize(w.numpy(), bits, block, search=self.quant.search)
        del w
        inputs = [x, self.w.weight(f"{label}.q{bits}", packed), self.w.weight(f"{label}.scales", scales.astype(self.dtype)),
                  self.w.weight(f"{label}.zero_points", zp)]
        return self.w.node("MatMulNBits", inputs, domain="com.microsoft", K=k, N=n, bits=bits,
                           block_size=block, accuracy_level=self.quant.accuracy_level)

    # ---- shared pieces ---------------------------------------------------------------
    def rms_norm(self, x: str, weight: str) -> str:
        """Meta's RMSNorm: float32 statistics, the result cast back and scaled by the weight."""
        w = self.w.weight(weight, self._array(weight))
        if self.opset >= 23:
            return self.w.node("RMSNormalization", [x, w], axis=-1, epsilon=self.a.norm_eps, stash_type=1)
        xf = self._cast(x, F32)
        mean = self.w.node("ReduceMean", [self.w.node("Mul", [xf, xf]), self.w.const([-1])], keepdims=1)
        inv = self.w.node("Reciprocal", [self.w.node("Sqrt", [self.w.node("Add", [mean, self.w.const(self.a.norm_eps, np.float32)])])])
        return self.w.node("Mul", [self._cast(self.w.node("Mul", [xf, inv]), self.onnx_dtype), w])

    def _cast(self, x: str, to: int) -> str:
        """Cast between the model dtype and float32 (nothing to do in a float32 graph)."""
        return x if self.onnx_dtype == F32 else self.w.node("Cast", [x], to=to)

    def ffn(self, x: str, i: int) -> str:
        p = f"layers.{i}.feed_forward"
        gate = self.linear(x, [f"{p}.w1.weight"], f"{p}.w1")
        up = self.linear(x, [f"{p}.w3.weight"], f"{p}.w3")
        act = self.w.node("Mul", [self.w.node("Mul", [gate, self.w.node("Sigmoid", [gate])]), up])
        return self.linear(act, [f"{p}.w2.weight"], f"{p}.w2")

    def head(self, x: str) -> str:
        if self.a.tie_embeddings and self.quant is None:  # the embedding's table once; ONNX Runtime folds the Transpose at load
            logits = self.w.node("MatMul", [x, self.w.node("Transpose", [self._embedding_table], perm=[1, 0])])
        else:
            name = "tok_embeddings.weight" if self.a.tie_embeddings else "output.weight"
            logits = self.linear(x, [name], "output", bits=self.quant.head_bits if self.quant else None)
        return self._cast(logits, F32) if self.onnx_dtype != F32 else logits

    def embedding(self, ids: str) -> str:
        self._embedding_table = self.w.weight("tok_embeddings", self._array("tok_embeddings.weight"))
        return self.w.node("Gather", [self._embedding_table, ids])

    # ---- portable: the traced graph's ops ---------------------------------------------
    def _rotary_tables(self, position_ids: str) -> tuple[str, str]:
        hd = self.a.head_dim
        inv_freq = 1.0 / (self.a.rope_theta ** (np.arange(0, hd, 2, dtype=np.float32) / hd))
        pos = self.w.node("Unsqueeze", [self.w.node("Cast", [position_ids], to=F32), self.w.const([-1])])
        angles = self.w.node("Mul", [pos, self.w.const(inv_freq.astype(np.float32), np.float32)])  # [B, S, hd/2]
        axis2 = self.w.const([2])
        return (self.w.node("Unsqueeze", [self.w.node("Cos", [angles]), axis2]),
                self.w.node("Unsqueeze", [self.w.node("Sin", [angles]), axis2]))  # [B, S, 1, hd/2]

    def _rotate(self, x: str, heads: int, cos: str, sin: str) -> str:
        """Rotate pairs (2i, 2i+1) of x [B, S, heads, hd] in float32 (models/llama.apply_rotary)."""
        hd = self.a.head_dim
        pairs = self.w.node("Reshape", [self._cast(x, F32), self.w.const([0, 0, heads, hd // 2, 2])])
        x0 = self.w.node("Gather", [pairs, self.w.const(0)], axis=-1)
        x1 = self.w.node("Gather", [pairs, self.w.const(1)], axis=-1)
        r0 = self.w.node("Sub", [self.w.node("Mul", [x0, cos]), self.w.node("Mul", [x1, sin])])
        r1 = self.w.node("Add", [self.w.node("Mul", [x0, sin]), self.w.node("Mul", [x1, cos])])
        axis = self.w.const([-1])
        stacked = self.w.node("Concat", [self.w.node("Unsqueeze", [r0, axis]), self.w.node("Unsqueeze", [r1, axis])], axis=-1)
        return self._cast(self.w.node("Reshape", [stacked, self.w.const([0, 0, heads, hd])]), self.onnx_dtype)

    def _width(self, t: str) -> str:
        """t's axis-1 size as an int64 scalar (S of [B, S, ...], T of the mask)."""
        return self.w.node("Gather", [self.w.node("Shape", [t]), self.w.const(1)], axis=0)

    def _attention_bias(self, input_ids: str, attention_mask: str) -> str:
        """Additive float32 mask [B, 1, S, T] (models/llama.attention_bias)."""
        zero, one = self.w.const(0), self.w.const(1)
        s, t = self._width(input_ids), self._width(attention_mask)
        q_idx = self.w.node("Add", [self.w.node("Range", [zero, s, one]), self.w.node("Sub", [t, s])])
        q_idx = self.w.node("Unsqueeze", [q_idx, self.w.const([1])])  # [S, 1]
        k_idx = self.w.node("Unsqueeze", [self.w.node("Range", [zero, t, one]), self.w.const([0])])  # [1, T]
        causal = self.w.node("LessOrEqual", [k_idx, q_idx])  # [S, T]
        real = self.w.node("Unsqueeze", [self.w.node("Cast", [attention_mask], to=onnx.TensorProto.BOOL), self.w.const([1, 2])])
        allowed = self.w.node("And", [causal, real])  # [B, 1, S, T]
        return self.w.node("Where", [allowed, self.w.const(0.0, np.float32), self.w.const(np.finfo(np.float32).min, np.float32)])

    def _mask_positions(self) -> str:
        """Position ids [B, S] counting each row's real tokens (runtime/session.py's rule): cumsum(mask) - 1, from 0."""
        w = self.w
        counted = w.node("CumSum", [contract.ATTENTION_MASK, w.const(1)])
        return w.node("Max", [w.node("Sub", [counted, w.const(1)]), w.const(0)])

    def _portable_attention(self, x: str, i: int, cos: str, sin: str, bias: str) -> str:
        a, p = self.a, f"layers.{i}.attention"
        h, kvh, hd = a.n_heads, a.n_kv_heads, a.head_dim
        q = self.w.node("Reshape", [self.linear(x, [f"{p}.wq.weight"], f"{p}.wq"), self.w.const([0, 0, h, hd])])
        k = self.w.node("Reshape", [self.linear(x, [f"{p}.wk.weight"], f"{p}.wk"), self.w.const([0, 0, kvh, hd])])
        v = self.w.node("Reshape", [self.linear(x, [f"{p}.wv.weight"], f"{p}.wv"), self.w.const([0, 0, kvh, hd])])
        q, k = self._rotate(q, h, cos, sin), self._rotate(k, kvh, cos, sin)
        q, k, v = (self.w.node("Transpose", [t], perm=[0, 2, 1, 3]) for t in (q, k, v))  # [B, heads, S, hd]
        if self.classifier:  # one pass, no cache
            keys, values = k, v
        else:
            keys = self.w.node("Concat", [contract.PAST_KEY % i, k], [contract.PRESENT_KEY % i], axis=2)
            values = self.w.node("Concat", [contract.PAST_VALUE % i, v], [contract.PRESENT_VALUE % i], axis=2)
        if h != kvh:  # grouped-query: each KV head serves h / kvh query heads
            rep = self.w.const([1, 1, h // kvh, 1, 1])
            expand = lambda t: self.w.node("Reshape", [self.w.node("Expand", [self.w.node("Unsqueeze", [t, self.w.const([2])]), rep]),
                                                      self.w.const([0, h, -1, hd])])
            keys, values = expand(keys), expand(values)
        scores = self.w.node("MatMul", [q, self.w.node("Transpose", [keys], perm=[0, 1, 3, 2])])
        scores = self.w.node("Mul", [self._cast(scores, F32), self.w.const(hd ** -0.5, np.float32)])
        probs = self._cast(self.w.node("Softmax", [self.w.node("Add", [scores, bias])], axis=-1), self.onnx_dtype)
        out = self.w.node("Transpose", [self.w.node("MatMul", [probs, values])], perm=[0, 2, 1, 3])
        out = self.w.node("Reshape", [out, self.w.const([0, 0, h * hd])])
        return self.linear(out, [f"{p}.wo.weight"], f"{p}.wo")

    def _io(self) -> tuple[list, list]:
        """The graph's inputs and outputs (runtime/contract.py), or the layers-only variant's."""
        a, dt, seq = self.a, self.dtype, [contract.BATCH, contract.SEQ]
        if self.classifier:
            return ([value(contract.INPUT_IDS, np.int64, seq), value(contract.ATTENTION_MASK, np.int64, seq)],
                    [value(contract.LOGITS, np.float32, [contract.BATCH, a.num_labels])])
        kv = [contract.BATCH, a.n_kv_heads, None, a.head_dim]
        first = value(contract.INPUT_IDS, np.int64, seq) if self.whole else value(HIDDEN, dt, [*seq, a.dim])
        inputs = [first, value(contract.ATTENTION_MASK, np.int64, [contract.BATCH, contract.TOTAL])]
        if self.graph == contract.GRAPH_PORTABLE:
            inputs.append(value(contract.POSITION_IDS, np.int64, seq))
        inputs += [value(n, dt, _dims(kv, contract.PAST)) for n in contract.past_names(a.n_layers)]
        if self.whole:
            inputs.append(value(contract.LOGITS_TO_KEEP, np.int64, []))  # optional: its initializer is the default
            self.w.initializers.append(onnx.numpy_helper.from_array(np.array(contract.KEEP_ALL, np.int64), contract.LOGITS_TO_KEEP))
        last = (value(contract.LOGITS, np.float32, [contract.BATCH, contract.KEPT, a.vocab_size]) if self.whole
                else value(HIDDEN_OUT, dt, [*seq, a.dim]))
        outputs = [last] + [value(n, dt, _dims(kv, contract.TOTAL)) for n in contract.present_names(a.n_layers)]
        return inputs, outputs

    def _portable(self) -> None:
        a = self.a
        first = contract.INPUT_IDS if self.whole else HIDDEN
        h = self.embedding(first) if self.whole else HIDDEN
        cos, sin = self._rotary_tables(self._mask_positions() if self.classifier else contract.POSITION_IDS)
        bias = self._attention_bias(first, contract.ATTENTION_MASK)
        for i in range(a.n_layers):
            h = self.w.node("Add", [h, self._portable_attention(self.rms_norm(h, f"layers.{i}.attention_norm.weight"), i, cos, sin, bias)])
            h = self.w.node("Add", [h, self.ffn(self.rms_norm(h, f"layers.{i}.ffn_norm.weight"), i)])
            self.on_layer(i)
        if self.whole:
            self._final(self.rms_norm(h, "norm.weight"), None)
        else:
            self.w.node("Identity", [h], [HIDDEN_OUT])

    # ---- ort: fused kernels ----------------------------------------------------------------
    def _ort(self) -> None:
        a, dt, w = self.a, self.dtype, self.w

        # GroupQueryAttention's lengths: seqlens_k = real tokens - 1 per row, total = mask width
        lengths = w.node("ReduceSum", [contract.ATTENTION_MASK, w.const([1])], keepdims=0)
        seqlens_k = w.node("Cast", [w.node("Sub", [lengths, w.const(1)])], to=onnx.TensorProto.INT32)
        total = w.node("Cast", [self._width(contract.ATTENTION_MASK)], to=onnx.TensorProto.INT32)
        hd = a.head_dim
        angles = np.outer(np.arange(a.max_seq_len, dtype=np.float32),
                          1.0 / (a.rope_theta ** (np.arange(0, hd, 2, dtype=np.float32) / hd)))
        cos = w.weight("cos_cache", np.cos(angles).astype(dt))
        sin = w.weight("sin_cache", np.sin(angles).astype(dt))

        h = self.embedding(contract.INPUT_IDS) if self.whole else HIDDEN
        norm_w = lambda name: w.weight(name, self._array(name))
        x = w.node("SimplifiedLayerNormalization", [h, norm_w("layers.0.attention_norm.weight")],
                   axis=-1, epsilon=a.norm_eps, stash_type=1)
        for i in range(a.n_layers):
            p = f"layers.{i}.attention"
            qkv = self.linear(x, [f"{p}.wq.weight", f"{p}.wk.weight", f"{p}.wv.weight"], f"{p}.wqkv")
            past = ["", ""] if self.classifier else [contract.PAST_KEY % i, contract.PAST_VALUE % i]
            present = [] if self.classifier else [contract.PRESENT_KEY % i, contract.PRESENT_VALUE % i]
            attn = w.node("GroupQueryAttention", [qkv, "", "", *past, seqlens_k, total, cos, sin],
                          ["attn_%d" % i, *present], domain="com.microsoft",
                          num_heads=a.n_heads, kv_num_heads=a.n_kv_heads, scale=hd ** -0.5, do_rotary=1,
                          rotary_interleaved=1, local_window_size=-1)
            attn = attn if self.classifier else attn[0]  # node() gives a name for one output, a list for three
            o = self.linear(attn, [f"{p}.wo.weight"], f"{p}.wo")
            x, _, _, h = w.node("SkipSimplifiedLayerNormalization", [h, o, norm_w(f"layers.{i}.ffn_norm.weight")], 4,
                                domain="com.microsoft", epsilon=a.norm_eps)
            down = self.ffn(x, i)
            if i + 1 == a.n_layers and not self.whole:
                w.node("Add", [h, down], [HIDDEN_OUT])
            else:
                nxt = f"layers.{i + 1}.attention_norm.weight" if i + 1 < a.n_layers else "norm.weight"
                x, _, _, h = w.node("SkipSimplifiedLayerNormalization", [h, down, norm_w(nxt)], 4,
                                    domain="com.microsoft", epsilon=a.norm_eps)
            self.on_layer(i)
        if self.whole:
            # each row's tokens end at min(its mask's sum, S): the sum on a first (right-padded) step, S after
            self._final(x, None if self.classifier else w.node("Min", [lengths, self._width(contract.INPUT_IDS)]))

    def _final(self, x: str, ends: str | None) -> None:
        """x: the final norm's output [B, S, dim]; ends: each row's end in x [B] (right-aligned rows), or
        None where every row ends at S (left padding)."""
        if self.classifier:
            self.w.node("Identity", [self._score(self._pool(x))], [contract.LOGITS])
        else:
            self.w.node("Identity", [self.head(self._keep(x, ends))], [contract.LOGITS])

    def _keep(self, x: str, ends: str | None) -> str:
        """x [B, S, dim] -> [B, K, dim]: the positions whose logits the caller asked for (logits_to_keep):
        all S for 0, else each row's last n (n clamped to S)."""
        w, n = self.w, contract.LOGITS_TO_KEEP
        everything = w.node("Equal", [n, w.const(contract.KEEP_ALL)])
        if ends is None:  # left padding: the last n columns
            start = w.node("Where", [everything, w.const(0), w.node("Neg", [n])])
            return w.node("Slice", [x, w.node("Unsqueeze", [start, w.const([0])]), w.const([np.iinfo(np.int64).max]),
                                    w.const([1])])
        s = self._width(x)
        count = w.node("Min", [w.node("Where", [everything, s, n]), s])  # K
        start = w.node("Where", [everything, w.const(0), w.node("Sub", [ends, count])])  # [B]
        index = w.node("Add", [w.node("Unsqueeze", [start, w.const([1])]), w.node("Range", [w.const(0), count, w.const(1)])])
        index = w.node("Max", [index, w.const(0)])  # [B, K]; a row shorter than n repeats its first position
        return w.node("GatherND", [x, w.node("Unsqueeze", [index, w.const([2])])], batch_dims=1)  # [B, K, dim]

    def _pool(self, x: str) -> str:
        """x [B, S, dim] at each row's last real token -> [B, dim] (models/llama.last_token_index): the largest
        index whose mask is 1 and, with a pad_id, whose token is not the pad token (transformers' pooling)."""
        w, ids, mask = self.w, contract.INPUT_IDS, contract.ATTENTION_MASK
        keep = mask
        if self.a.pad_id is not None:
            real = w.node("Cast", [w.node("Not", [w.node("Equal", [ids, w.const(self.a.pad_id)])])], to=onnx.TensorProto.INT64)
            keep = w.node("Mul", [keep, real])
        index = w.node("Mul", [w.node("Range", [w.const(0), self._width(ids), w.const(1)]), keep])  # [B, S]: position or 0
        last = w.node("ArgMax", [index], axis=1, keepdims=1)  # [B, 1]; the first of ties: 0 for a row of padding
        return w.node("GatherND", [x, last], batch_dims=1)  # [B, dim]

    def _score(self, pooled: str) -> str:
        """The classifier head in float32: [B, dim] -> logits [B, num_labels]."""
        score = self.read("score.weight").float()  # [num_labels, dim]
        weight = self.w.weight("score", lambda: score.t().contiguous().numpy(), np.float32, (self.a.dim, self.a.num_labels))
        return self.w.node("MatMul", [self._cast(pooled, F32), weight])

    def on_layer(self, i: int) -> None:
        """Called after each layer's weights are written (progress)."""

    def build(self) -> onnx.ModelProto:
        inputs, outputs = self._io()
        self._portable() if self.graph == contract.GRAPH_PORTABLE else self._ort()
        contrib = self.graph == contract.GRAPH_ORT or self.quant is not None
        return self.w.model(inputs, outputs, self.opset, contrib=contrib)


def _dims(kv: list, length: str) -> list:
    return [length if d is None else d for d in kv]


def write_graph(args: ModelArgs, read: Read, out_dir: Path, *, graph: str = contract.GRAPH_PORTABLE,
                precision: str = "fp32", quant: Quant | None = None, opset: int = 23,
                on_layer: Callable[[int], None] | None = None, whole: bool = True) -> str:
    """Write out_dir/model.onnx and model.onnx.data for the checkpoint behind read; returns the
    data file's sha256 (hashed while written)."""
    with GraphWriter(out_dir / contract.DATA_FILE) as writer:
        builder = DecoderGraph(args, read, writer, graph=graph, precision=precision, quant=quant, opset=opset, whole=whole)
        if on_layer is not None:
            builder.on_layer = on_layer
        model = builder.build()
    onnx.save_model(model, str(out_dir / contract.MODEL_FILE))
    return writer.data_sha256

"""Our PyTorch Llama 2 decoder, written so that tracing it gives the ONNX I/O contract.

Meta's parameter names and rotary pairing (dimensions 2i and 2i+1 rotate together);
RMSNorm, rotary and softmax computed in float32 whatever the weight dtype; grouped-query
attention; tied or separate output head. The KV cache is explicit: past keys and values
come in as arguments and the present ones (past + new) go out.

    forward(input_ids, attention_mask, position_ids, past_key_values)
        input_ids       int64 [B, S]
        attention_mask  int64 [B, P + S]   1 = real token, 0 = left padding
        position_ids    int64 [B, S]
        past_key_values [(k, v)] * n_layers, each [B, n_kv_heads, P, head_dim]
    -> logits float32 [B, S, vocab], presents [(k, v)] * n_layers, each [B, n_kv_heads, P + S, head_dim]

A sequence classifier (args.num_labels set: Hugging Face's LlamaForSequenceClassification) has a
`score` head [num_labels, dim] in place of `output`: forward gives each position's label logits
[B, S, num_labels] and classify() pools them at each row's last real token as transformers does
(last_token_index).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelArgs

KV = tuple[torch.Tensor, torch.Tensor]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # float32 island: fp16 sums of squares overflow for real activations
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight


def rotary_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape [B, S, 1, head_dim / 2] in float32."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=position_ids.device) / head_dim))
    angles = position_ids.float()[..., None] * inv_freq  # (B, S, hd/2)
    return angles.cos()[:, :, None, :], angles.sin()[:, :, None, :]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (2i, 2i+1) of x [B, S, H, hd] by the angles; float32 math."""
    xf = x.float().unflatten(-1, (-1, 2))  # (B, S, H, hd/2, 2)
    x0, x1 = xf[..., 0], xf[..., 1]
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return out.flatten(-2).type_as(x)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * self.head_dim, args.dim, bias=False)

    def forward(self, x, cos, sin, mask, past: KV) -> tuple[torch.Tensor, KV]:
        B, S, _ = x.shape
        q = self.wq(x).view(B, S, self.n_heads, self.head_dim)
        k = self.wk(x).view(B, S, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(B, S, self.n_kv_heads, self.head_dim)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, S, hd)
        keys = torch.cat((past[0], k), dim=2)  # (B, kvH, P+S, hd)
        values = torch.cat((past[1], v), dim=2)
        rep = self.n_heads // self.n_kv_heads
        k_all = keys.repeat_interleave(rep, dim=1) if rep > 1 else keys  # (B, H, P+S, hd)
        v_all = values.repeat_interleave(rep, dim=1) if rep > 1 else values
        scores = torch.matmul(q, k_all.transpose(2, 3)).float() * self.head_dim**-0.5  # (B, H, S, P+S)
        probs = F.softmax(scores + mask, dim=-1).type_as(q)  # float32 softmax, as Meta's reference
        out = torch.matmul(probs, v_all)  # (B, H, S, hd)
        out = out.transpose(1, 2).reshape(B, S, -1)
        return self.wo(out), (keys, values)


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args.dim, args.ffn_hidden_dim)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x, cos, sin, mask, past: KV) -> tuple[torch.Tensor, KV]:
        h, present = self.attention(self.attention_norm(x), cos, sin, mask, past)
        h = x + h
        return h + self.feed_forward(self.ffn_norm(h)), present


def attention_bias(attention_mask: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Additive float32 mask [B, 1, S, P+S]: 0 where a query may look, a large negative elsewhere.

    Query i (absolute slot P+i) sees key j when j <= P+i (causal) and the key is not padding.
    A finite minimum (not -inf) keeps fully masked padding rows free of NaN.
    """
    total = attention_mask.shape[1]
    past = total - seq_len
    q_idx = torch.arange(seq_len, device=attention_mask.device)[:, None] + past  # (S, 1)
    k_idx = torch.arange(total, device=attention_mask.device)[None, :]  # (1, P+S)
    allowed = (k_idx <= q_idx)[None, None] & attention_mask.bool()[:, None, None, :]  # (B, 1, S, P+S)
    zero = torch.zeros((), dtype=torch.float32)
    return torch.where(allowed, zero, torch.finfo(torch.float32).min)


def last_token_index(input_ids: torch.Tensor, attention_mask: torch.Tensor, pad_id: int | None) -> torch.Tensor:
    """Each row's last real token [B]: the rightmost position whose mask is 1 and, when the model has a
    pad_token_id, whose token is not it.

    transformers (GenericForSequenceClassification) pools at argmax(arange(S) * (input_ids != pad_token_id))
    -- the rightmost non-pad token, left or right padding alike, 0 for a row of pad tokens only -- and without
    a pad_token_id takes position -1 and refuses batches larger than one. The mask term agrees with both
    wherever transformers answers, and lets a model without a pad token take padded batches.
    """
    keep = attention_mask.bool()
    if pad_id is not None:
        keep = keep & (input_ids != pad_id)
    idx = torch.arange(input_ids.shape[1], device=input_ids.device)
    return (idx * keep).argmax(-1)


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        if args.is_classifier:  # LlamaForSequenceClassification's head: no vocabulary head at all
            self.score = nn.Linear(args.dim, args.num_labels, bias=False)
        else:
            self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
            if args.tie_embeddings:
                self.output.weight = self.tok_embeddings.weight

    @property
    def head(self) -> nn.Linear:
        return self.score if self.args.is_classifier else self.output

    def forward(self, input_ids, attention_mask, position_ids, past_key_values: list[KV]):
        h = self.tok_embeddings(input_ids)  # (B, S, dim)
        cos, sin = rotary_cos_sin(position_ids, self.args.head_dim, self.args.rope_theta)
        mask = attention_bias(attention_mask, input_ids.shape[1])
        presents = []
        for layer, past in zip(self.layers, past_key_values):
            h, present = layer(h, cos, sin, mask, past)
            presents.append(present)
        logits = self.head(self.norm(h)).float()  # (B, S, vocab or num_labels), always float32
        return logits, presents

    def classify(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """A classifier's logits [B, num_labels] for a padded batch (left or right padding) without cache:
        positions count each row's real tokens, the logits are taken at last_token_index."""
        pos = (attention_mask.long().cumsum(1) - 1).clamp(min=0)  # (B, S)
        logits, _ = self(input_ids, attention_mask, pos, self.empty_cache(input_ids.shape[0]))  # (B, S, num_labels)
        last = last_token_index(input_ids, attention_mask, self.args.pad_id)
        return logits[torch.arange(input_ids.shape[0]), last]

    def empty_cache(self, batch: int, dtype: torch.dtype | None = None) -> list[KV]:
        """Past key/values of length 0, for the prompt pass."""
        dtype = dtype or self.tok_embeddings.weight.dtype
        shape = (batch, self.args.n_kv_heads, 0, self.args.head_dim)
        return [(torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype)) for _ in self.layers]


@torch.no_grad()
def greedy(model: Transformer, prompt: list[int], max_new_tokens: int) -> list[int]:
    """Greedy decoding with the KV cache: the reference the ONNX runtime is checked against."""
    ids = torch.tensor([prompt])
    past = model.empty_cache(1)
    out: list[int] = []
    total = len(prompt)
    pos = torch.arange(total)[None]
    for _ in range(max_new_tokens):
        logits, past = model(ids, torch.ones(1, total, dtype=torch.long), pos, past)
        nxt = int(logits[0, -1].argmax())
        out.append(nxt)
        ids, pos = torch.tensor([[nxt]]), torch.tensor([[total]])
        total += 1
    return out

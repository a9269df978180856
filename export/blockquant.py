"""Block quantization of MatMul weights in MatMulNBits' layout (com.microsoft, bits 4 or 8).

Each block of `block_size` weights along the input dimension K gets a scale s and an integer
zero point z; a weight w is stored as q = clip(round(w / s) + z, 0, 2^bits - 1) and read back as
s * (q - z). Plain round-to-nearest takes s = (max - min) / (2^bits - 1). For 4 bits we search
the scale instead (SCALE_STEPS candidates around the min/max one, the zero point following
each), keep the one with the least squared error per block, then refit s by least squares for
the chosen q. On SmolLM2 (whose GGUF is itself Q4_1, so the grid it must re-quantize is coarse)
this search moves int4 perplexity from 35.1 (ONNX Runtime's RTN) to the figure in BENCHMARKS.md.

Layout (what MatMulNBits reads): packed uint8 [N, K/bs, bs*bits/8], two 4-bit values per byte,
the even element in the low nibble; scales [N, K/bs]; zero points uint8 [N, ceil(K/bs * bits/8)],
two per byte for 4 bits, the even block in the low nibble.
"""

from __future__ import annotations

import numpy as np

SCALE_STEPS = np.linspace(0.75, 1.05, 16, dtype=np.float32)  # candidate ranges, as fractions of max - min


def _pack4(q: np.ndarray) -> np.ndarray:
    """uint8 values < 16 along the last axis (even length) -> half as many bytes, even element low."""
    return (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)


def quantize(w_nk: np.ndarray, bits: int, block_size: int, search: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A Linear weight [N (out), K (in)] -> (packed, scales float32 [N, K/bs], zero points) for MatMulNBits."""
    n, k = w_nk.shape
    pad = -k % block_size
    w = np.asarray(w_nk, np.float32)
    if pad:
        w = np.pad(w, ((0, 0), (0, pad)))
    blocks = w.reshape(n, -1, block_size)  # [N, B, bs]
    levels = (1 << bits) - 1
    lo = np.minimum(blocks.min(-1), 0.0)
    hi = np.maximum(blocks.max(-1), 0.0)
    span = hi - lo
    best_s = np.where(span > 0, span / levels, 1.0).astype(np.float32)
    best_err = np.full(best_s.shape, np.inf, np.float32)
    for f in SCALE_STEPS if search and bits == 4 else (np.float32(1.0),):
        s = np.where(span > 0, span * f / levels, 1.0).astype(np.float32)
        err = _error(blocks, s, lo, levels)
        better = err < best_err
        best_s, best_err = np.where(better, s, best_s), np.where(better, err, best_err)
    z = _zero_point(best_s, lo, levels)
    q = _levels(blocks, best_s, z, levels)
    if search and bits == 4:  # least-squares scale for the chosen levels
        c = q.astype(np.float32) - z[..., None]
        den = (c * c).sum(-1)
        refit = np.where(den > 0, (blocks * c).sum(-1) / np.maximum(den, 1e-30), best_s).astype(np.float32)
        keep = _sq(blocks, refit[..., None] * c) < _sq(blocks, best_s[..., None] * c)
        best_s = np.where(keep, refit, best_s)
    zq = z.astype(np.uint8)
    if bits == 4:
        if zq.shape[1] % 2:
            zq = np.pad(zq, ((0, 0), (0, 1)))
        return _pack4(q), best_s, _pack4(zq)
    return q, best_s, zq


def _zero_point(s: np.ndarray, lo: np.ndarray, levels: int) -> np.ndarray:
    return np.clip(np.round(-lo / s), 0, levels).astype(np.float32)


def _levels(blocks: np.ndarray, s: np.ndarray, z: np.ndarray, levels: int) -> np.ndarray:
    return np.clip(np.round(blocks / s[..., None]) + z[..., None], 0, levels).astype(np.uint8)


def _sq(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    d = a - b
    return (d * d).sum(-1)


def _error(blocks: np.ndarray, s: np.ndarray, lo: np.ndarray, levels: int) -> np.ndarray:
    z = _zero_point(s, lo, levels)
    q = _levels(blocks, s, z, levels).astype(np.float32)
    return _sq(blocks, s[..., None] * (q - z[..., None]))


def dequantize(packed: np.ndarray, scales: np.ndarray, zero_points: np.ndarray, bits: int, k: int) -> np.ndarray:
    """The [K, N] float32 weights MatMulNBits computes with (for tests and error figures)."""
    n, nb = scales.shape
    if bits == 4:
        q = np.stack([packed & 15, packed >> 4], -1).reshape(n, nb, -1)
        z = np.stack([zero_points & 15, zero_points >> 4], -1).reshape(n, -1)[:, :nb]
    else:
        q, z = packed, zero_points[:, :nb]
    w = scales[..., None] * (q.astype(np.float32) - z[..., None].astype(np.float32))
    return w.reshape(n, -1)[:, :k].T

"""MatMulNBits weights: our packing against ONNX Runtime's own quantizer and its kernel."""

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from llama2_onnx.export import blockquant


def _ort_quantize(w_nk: np.ndarray, bits: int, block_size: int):
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits, quantize_matmul_8bits

    n, k = w_nk.shape
    blocks, per_byte = k // block_size, 8 // bits
    packed = np.zeros((n, blocks, block_size // per_byte), np.uint8)
    zp = np.zeros((n, (blocks + per_byte - 1) // per_byte), np.uint8)
    scales = np.zeros((n, blocks), np.float32)
    fn = quantize_matmul_4bits if bits == 4 else quantize_matmul_8bits
    fn(packed, np.ascontiguousarray(w_nk.T), scales, zp, block_size, n, k, False)
    return packed, scales, zp


@pytest.mark.parametrize("bits, block_size", [(4, 32), (4, 16), (8, 32), (4, 128)])
def test_round_to_nearest_is_onnxruntimes(bits, block_size):
    w = np.random.default_rng(0).standard_normal((96, 256)).astype(np.float32) * 0.02
    ours = blockquant.quantize(w, bits, block_size)
    theirs = _ort_quantize(w, bits, block_size)
    assert [a.shape for a in ours] == [b.shape for b in theirs]
    assert np.array_equal(ours[1], theirs[1]) and np.array_equal(ours[2], theirs[2])  # scales, zero points
    # the levels agree but for a rare rounding of an exact half (x / s vs x * (1 / s)): one step at most
    a, b = (blockquant.dequantize(*q, bits=bits, k=256) for q in (ours, theirs))
    step = np.repeat(ours[1], block_size, axis=1).T
    assert np.all(np.abs(a - b) <= step * 1.001) and np.count_nonzero(a != b) <= a.size // 1000


def test_search_lowers_the_error_and_the_kernel_computes_our_weights():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((64, 128)).astype(np.float32) * 0.02
    plain = blockquant.dequantize(*blockquant.quantize(w, 4, 32), bits=4, k=128)
    searched = blockquant.quantize(w, 4, 32, search=True)
    best = blockquant.dequantize(*searched, bits=4, k=128)
    assert np.square(best - w.T).sum() < np.square(plain - w.T).sum()

    packed, scales, zp = searched  # ONNX Runtime's MatMulNBits on our bytes = x @ our dequantized weights
    node = helper.make_node("MatMulNBits", ["x", "b", "s", "z"], ["y"], domain="com.microsoft", K=128, N=64,
                            bits=4, block_size=32, accuracy_level=0)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 128])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 64])],
                              [numpy_helper.from_array(a, n) for a, n in ((packed, "b"), (scales, "s"), (zp, "z"))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    x = rng.standard_normal((3, 128)).astype(np.float32)
    y = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(y, x @ best, rtol=1e-4, atol=1e-5)

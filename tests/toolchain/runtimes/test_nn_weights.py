"""Weights of NeuralNetwork layers (``nn_weights``): float16 storage and 1-8 bit linear / LUT
quantization decoded as coremltools decodes them, per output channel.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.toolchain.runtimes.nn_helpers import (
    N,
    close,
    network,
    quantize,
    random,
    run,
    tf_conv,
)


@pytest.mark.parametrize("nbits, mode", [(8, "linear"), (4, "linear"), (8, "linear_lut"),
                                         (3, "linear_lut"), (16, "linear")])
def test_quantized_weights_are_decoded_as_coremltools_decodes_them(nbits, mode):
    cin, cout = 4, 6
    x, w, b = random(N, cin, 6, 6), random(3, 3, cin, cout), random(cout)
    spec = network({"x": (1, cin, 6, 6)}, lambda nn: nn.add_convolution(
        "conv", cin, cout, 3, 3, 1, 1, "same", 1, w, b, True, input_name="x", output_name="y"))
    quantized = quantize(spec, nbits, mode)
    stored = quantized.neuralNetwork.layers[0].convolution.weights
    if nbits == 16:
        assert stored.float16Value and not stored.floatValue
    else:
        assert stored.rawValue and not stored.floatValue
        assert stored.quantization.numberOfBits == nbits
    if nbits == 16:  # float16 storage: the half floats themselves (coremltools cannot dequantize)
        layer = quantized.neuralNetwork.layers[0].convolution
        w_deq, b_deq = (np.frombuffer(p.float16Value, np.float16).astype(np.float32)
                        for p in (layer.weights, layer.bias))
    else:  # coremltools' own dequantization: the float weights the quantized model stands for
        layer = quantize(quantized, None, "dequantization").neuralNetwork.layers[0].convolution
        w_deq, b_deq = np.float32(layer.weights.floatValue), np.float32(layer.bias.floatValue)
    w_deq = w_deq.reshape(cout, cin, 3, 3).transpose(2, 3, 1, 0)
    got = run(quantized, {"x": x})
    close(got, tf_conv(x, w_deq, 1, 1, "SAME") + b_deq.reshape(-1, 1, 1))
    # ... and the quantized model still computes roughly what the float one did.
    full = tf_conv(x, w, 1, 1, "SAME") + b.reshape(-1, 1, 1)
    assert np.abs(got - full).max() < {16: 0.02, 8: 0.2, 4: 3.0, 3: 6.0}[nbits]


def test_int8_inner_product_and_batched_matmul_weights_per_output_channel():
    x, w, b = random(N, 7), random(5, 7) * np.float32([[1], [10], [0.1], [3], [30]]), random(5)

    def build(nn):
        nn.add_inner_product("ip", w, b, 7, 5, True, input_name="x", output_name="h")
        nn.add_batched_mat_mul("mm", ["x"], "y", weight_matrix_rows=7, weight_matrix_columns=5,
                               W=w.T.copy(), bias=b)
        nn.add_elementwise("out", ["h", "y"], "z", "ADD")
    spec = network({"x": (1, 7)}, build, outputs=("z",))
    quantized = quantize(spec, 8, "linear")
    assert len(quantized.neuralNetwork.layers[0].innerProduct.weights.quantization
               .linearQuantization.scale) == 5
    got = run(quantized, {"x": x}, output="z")
    # Per-channel scales keep every row within half a step of its own range.
    close(got, 2 * (x @ w.T + b), atol=0.05 * np.abs(w).max(axis=1).sum(), rtol=0.02)

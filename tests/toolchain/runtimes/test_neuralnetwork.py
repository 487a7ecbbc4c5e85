"""The NumPy executor of Core ML NeuralNetwork models (``toolchain.runtimes.neuralnetwork``).

Core ML itself does not run on Linux, so the reference is TensorFlow (or NumPy where TF has no
such op) on the same random data:

- layer by layer: small specs built with coremltools' NeuralNetworkBuilder, one layer each,
  covering padding modes, same/valid, groups, strides, dilation, quantized and float16 weights,
  the image preprocessing and the UnsupportedLayer error;
- whole models: each backbone family exported by the Core ML target as the toolchain ships it,
  classified by the executor and by the Keras model it came from.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np
import pytest

from tests.targets.conftest import FAMILY_ARCHS, make_source
from toolchain import runtimes
from toolchain.errors import ModelError, UnsupportedLayer, UsageError
from toolchain.runtimes import plan
from toolchain.runtimes.neuralnetwork import Executor

RNG = np.random.default_rng(1)
N = 3  # examples per batch in layer tests: the batch axis must never mix them
ATOL, RTOL = 2e-5, 1e-5


def _random(*shape, low=None):
    x = RNG.standard_normal(shape).astype(np.float32)
    return np.abs(x) + low if low is not None else x


def _network(inputs: dict, build, outputs=("y",)):
    """A NeuralNetwork spec (ND shape mapping) with the given inputs and layers."""
    from coremltools.models import datatypes
    from coremltools.models.neural_network import NeuralNetworkBuilder

    builder = NeuralNetworkBuilder([(name, datatypes.Array(*shape)) for name, shape in
                                    inputs.items()], [(name, None) for name in outputs],
                                   disable_rank5_shape_mapping=True)
    build(builder)
    return builder.spec


def _run(spec, feeds, precision="float32", output="y"):
    return Executor(spec, Path("layer.mlmodel"), precision).run(feeds)[output]


def _nhwc(x):
    return np.transpose(x, (0, 2, 3, 1))


def _nchw(y):
    return np.transpose(np.asarray(y), (0, 3, 1, 2))


def _close(actual, expected, atol=ATOL, rtol=RTOL):
    actual = np.asarray(actual)
    assert actual.dtype == np.float32
    assert actual.shape == np.shape(expected)
    np.testing.assert_allclose(actual, expected, atol=atol, rtol=rtol)


# -- convolution -------------------------------------------------------------------------------

def _tf_conv(x, w_hwio, groups, stride, padding, dilation=1):
    """TF reference; groups as one conv per group (TF's CPU kernels lack grouped conv)."""
    import tensorflow as tf

    cin, cout = x.shape[1] // groups, w_hwio.shape[-1] // groups
    parts = [tf.nn.conv2d(_nhwc(x[:, g * cin:(g + 1) * cin]), w_hwio[..., g * cout:(g + 1) * cout],
                          stride, padding, dilations=dilation) for g in range(groups)]
    return _nchw(tf.concat(parts, axis=-1))


@pytest.mark.parametrize("border", ["same", "valid"])
@pytest.mark.parametrize("stride, dilation", [(1, 1), (2, 1), (1, 2)])
@pytest.mark.parametrize("cin, cout, groups", [(4, 6, 1), (4, 6, 2), (4, 4, 4), (4, 8, 4)])
def test_convolution_matches_tf(border, stride, dilation, cin, cout, groups):
    x, w, b = _random(N, cin, 9, 10), _random(3, 3, cin // groups, cout), _random(cout)
    spec = _network({"x": (1, cin, 9, 10)}, lambda nn: nn.add_convolution(
        "conv", cin // groups, cout, 3, 3, stride, stride, border, groups, w, b, True,
        input_name="x", output_name="y", dilation_factors=[dilation, dilation]))
    expected = _tf_conv(x, w, groups, stride, border.upper(), dilation) + b.reshape(-1, 1, 1)
    _close(_run(spec, {"x": x}), expected)


def test_convolution_same_padding_top_left_heavy():
    import tensorflow as tf

    x, w = _random(N, 3, 8, 8), _random(3, 3, 3, 5)
    spec = _network({"x": (1, 3, 8, 8)}, lambda nn: nn.add_convolution(
        "conv", 3, 5, 3, 3, 2, 2, "same", 1, w, None, False, input_name="x", output_name="y",
        same_padding_asymmetry_mode="TOP_LEFT_HEAVY"))
    # 8 px, stride 2, kernel 3: one cell of padding in total, put first (top / left).
    padded = tf.pad(_nhwc(x), [[0, 0], [1, 0], [1, 0], [0, 0]])
    _close(_run(spec, {"x": x}), _nchw(tf.nn.conv2d(padded, w, 2, "VALID")))


def test_convolution_valid_with_explicit_padding():
    import tensorflow as tf

    x, w = _random(N, 2, 7, 6), _random(1, 5, 2, 3)
    spec = _network({"x": (1, 2, 7, 6)}, lambda nn: nn.add_convolution(
        "conv", 2, 3, 1, 5, 1, 2, "valid", 1, w, None, False, input_name="x", output_name="y",
        padding_top=1, padding_bottom=2, padding_left=3, padding_right=0))
    expected = tf.nn.conv2d(_nhwc(x), w, (1, 2), [[0, 0], [1, 2], [3, 0], [0, 0]])
    _close(_run(spec, {"x": x}), _nchw(expected))


# -- quantized and float16 weights ----------------------------------------------------------------

def _quantized(spec, nbits, mode):
    import coremltools as ct
    from coremltools.models.neural_network import quantization_utils

    with contextlib.redirect_stdout(io.StringIO()):  # quantize_weights prints every layer
        return quantization_utils.quantize_weights(ct.models.MLModel(spec), nbits=nbits,
                                                   quantization_mode=mode).get_spec()


@pytest.mark.parametrize("nbits, mode", [(8, "linear"), (4, "linear"), (8, "linear_lut"),
                                         (3, "linear_lut"), (16, "linear")])
def test_quantized_weights_are_decoded_as_coremltools_decodes_them(nbits, mode):
    cin, cout = 4, 6
    x, w, b = _random(N, cin, 6, 6), _random(3, 3, cin, cout), _random(cout)
    spec = _network({"x": (1, cin, 6, 6)}, lambda nn: nn.add_convolution(
        "conv", cin, cout, 3, 3, 1, 1, "same", 1, w, b, True, input_name="x", output_name="y"))
    quantized = _quantized(spec, nbits, mode)
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
        layer = _quantized(quantized, None, "dequantization").neuralNetwork.layers[0].convolution
        w_deq, b_deq = np.float32(layer.weights.floatValue), np.float32(layer.bias.floatValue)
    w_deq = w_deq.reshape(cout, cin, 3, 3).transpose(2, 3, 1, 0)
    got = _run(quantized, {"x": x})
    _close(got, _tf_conv(x, w_deq, 1, 1, "SAME") + b_deq.reshape(-1, 1, 1))
    # ... and the quantized model still computes roughly what the float one did.
    full = _tf_conv(x, w, 1, 1, "SAME") + b.reshape(-1, 1, 1)
    assert np.abs(got - full).max() < {16: 0.02, 8: 0.2, 4: 3.0, 3: 6.0}[nbits]


def test_int8_inner_product_and_batched_matmul_weights_per_output_channel():
    x, w, b = _random(N, 7), _random(5, 7) * np.float32([[1], [10], [0.1], [3], [30]]), _random(5)

    def build(nn):
        nn.add_inner_product("ip", w, b, 7, 5, True, input_name="x", output_name="h")
        nn.add_batched_mat_mul("mm", ["x"], "y", weight_matrix_rows=7, weight_matrix_columns=5,
                               W=w.T.copy(), bias=b)
        nn.add_elementwise("out", ["h", "y"], "z", "ADD")
    spec = _network({"x": (1, 7)}, build, outputs=("z",))
    quantized = _quantized(spec, 8, "linear")
    assert len(quantized.neuralNetwork.layers[0].innerProduct.weights.quantization
               .linearQuantization.scale) == 5
    got = _run(quantized, {"x": x}, output="z")
    # Per-channel scales keep every row within half a step of its own range.
    _close(got, 2 * (x @ w.T + b), atol=0.05 * np.abs(w).max(axis=1).sum(), rtol=0.02)


# -- pooling ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["MAX", "AVERAGE"])
@pytest.mark.parametrize("padding", ["SAME", "VALID"])
@pytest.mark.parametrize("kernel, stride", [(3, 2), (2, 2), (3, 1)])
def test_pooling_matches_tf(kind, padding, kernel, stride):
    import tensorflow as tf

    x = _random(N, 3, 9, 8)
    spec = _network({"x": (1, 3, 9, 8)}, lambda nn: nn.add_pooling(
        "pool", kernel, kernel, stride, stride, kind, padding, "x", "y", exclude_pad_area=True))
    op = tf.nn.max_pool2d if kind == "MAX" else tf.nn.avg_pool2d
    _close(_run(spec, {"x": x}), _nchw(op(_nhwc(x), kernel, stride, padding)))


def test_average_pooling_including_padding():
    import tensorflow as tf

    x = _random(N, 2, 7, 7)
    spec = _network({"x": (1, 2, 7, 7)}, lambda nn: nn.add_pooling(
        "pool", 3, 3, 2, 2, "AVERAGE", "SAME", "x", "y", exclude_pad_area=False))
    padded = tf.pad(_nhwc(x), [[0, 0], [1, 1], [1, 1], [0, 0]])  # zeros that count
    _close(_run(spec, {"x": x}), _nchw(tf.nn.avg_pool2d(padded, 3, 2, "VALID")))


@pytest.mark.parametrize("kind", ["MAX", "AVERAGE"])
def test_global_pooling(kind):
    x = _random(N, 4, 5, 6)
    spec = _network({"x": (1, 4, 5, 6)}, lambda nn: nn.add_pooling(
        "pool", 1, 1, 1, 1, kind, "VALID", "x", "y", is_global=True))
    reduce = np.max if kind == "MAX" else np.mean
    _close(_run(spec, {"x": x}), reduce(x, axis=(2, 3), keepdims=True))


def _caffe_pool(x, kind, k, s, p, exclude):
    """Brute-force reference of ValidCompletePadding, from the formulas in NeuralNetwork.proto."""
    def windows(size):
        out = -(-(size + 2 * p - k) // s) + 1
        if p > 0 and (out - 1) * s >= size + p:
            out -= 1
        return [(i * s - p, min(i * s - p + k, size + p)) for i in range(out)]

    rows, cols = windows(x.shape[2]), windows(x.shape[3])
    y = np.zeros((*x.shape[:2], len(rows), len(cols)), np.float32)
    for i, (top, bottom) in enumerate(rows):
        for j, (left, right) in enumerate(cols):
            cell = x[:, :, max(top, 0):bottom, max(left, 0):right]
            if kind == "MAX":
                y[:, :, i, j] = cell.max(axis=(2, 3))
            else:
                count = cell[0, 0].size if exclude else (bottom - top) * (right - left)
                y[:, :, i, j] = cell.sum(axis=(2, 3)) / count
    return y


@pytest.mark.parametrize("kind", ["MAX", "AVERAGE"])
@pytest.mark.parametrize("exclude", [True, False])
@pytest.mark.parametrize("size, pad, kernel, stride", [
    (8, 1, 3, 2), (7, 1, 3, 2), (6, 0, 3, 2),
    (5, 1, 2, 3), (4, 2, 3, 2),  # a last window inside the padding: dropped (H_out - 1)
])
def test_pooling_include_last_pixel(kind, exclude, size, pad, kernel, stride):
    x = _random(N, 2, size, size)

    def build(nn):
        layer = nn.add_pooling("pool", kernel, kernel, stride, stride, kind,
                               "INCLUDE_LAST_PIXEL", "x", "y", exclude_pad_area=exclude)
        layer.pooling.includeLastPixel.paddingAmounts[:] = [pad, pad]
    spec = _network({"x": (1, 2, size, size)}, build)
    _close(_run(spec, {"x": x}), _caffe_pool(x, kind, kernel, stride, pad, exclude))


# -- padding ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["constant", "reflection", "replication"])
def test_padding_layer(mode):
    import tensorflow as tf

    x = _random(N, 3, 6, 7)
    spec = _network({"x": (1, 3, 6, 7)}, lambda nn: nn.add_padding(
        "pad", left=2, right=1, top=0, bottom=3, value=1.5, input_name="x", output_name="y",
        padding_type=mode))
    pads = [[0, 0], [0, 0], [0, 3], [2, 1]]
    expected = {"constant": lambda: tf.pad(x, pads, "CONSTANT", constant_values=1.5),
                "reflection": lambda: tf.pad(x, pads, "REFLECT"),
                "replication": lambda: np.pad(x, pads, mode="edge")}[mode]()
    _close(_run(spec, {"x": x}), np.asarray(expected))


# -- activations, unary, elementwise -----------------------------------------------------------

ACTIVATIONS = {
    "RELU": (None, lambda x, tf: tf.nn.relu(x)),
    "LEAKYRELU": ([0.2], lambda x, tf: tf.nn.leaky_relu(x, 0.2)),
    "TANH": (None, lambda x, tf: tf.tanh(x)),
    "SCALED_TANH": ([1.7, 0.6], lambda x, tf: 1.7 * tf.tanh(0.6 * x)),
    "SIGMOID": (None, lambda x, tf: tf.sigmoid(x)),
    "SIGMOID_HARD": ([0.2, 0.5], lambda x, tf: tf.clip_by_value(0.2 * x + 0.5, 0, 1)),
    "LINEAR": ([-1.5, 0.25], lambda x, tf: -1.5 * x + 0.25),
    "ELU": (0.7, lambda x, tf: tf.where(x >= 0, x, 0.7 * tf.math.expm1(x))),
    "SOFTPLUS": (None, lambda x, tf: tf.nn.softplus(x)),
    "SOFTSIGN": (None, lambda x, tf: tf.nn.softsign(x)),
    "THRESHOLDEDRELU": (0.3, lambda x, tf: tf.where(x >= 0.3, x, 0.0)),
    "PRELU": (np.float32([0.1, -0.5, 2.0]),
              lambda x, tf: tf.where(x >= 0, x, np.float32([0.1, -0.5, 2.0])[:, None, None] * x)),
    "PARAMETRICSOFTPLUS": ([np.float32([1.0, 2.0, 0.5]), np.float32([0.5, 1.0, 3.0])],
                           lambda x, tf: np.float32([1.0, 2.0, 0.5])[:, None, None]
                           * tf.nn.softplus(np.float32([0.5, 1.0, 3.0])[:, None, None] * x)),
}


@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_activation_matches_tf(name):
    import tensorflow as tf

    params, reference = ACTIVATIONS[name]
    x = _random(N, 3, 4, 5) * 4
    spec = _network({"x": (1, 3, 4, 5)},
                    lambda nn: nn.add_activation("act", name, "x", "y", params=params))
    _close(_run(spec, {"x": x}), np.asarray(reference(x, tf), np.float32))


UNARY = {  # mode → reference of the shifted and scaled input z = scale * x + shift
    "sqrt": lambda z, a, e: np.sqrt(z),
    "rsqrt": lambda z, a, e: 1 / np.sqrt(z + e),
    "inverse": lambda z, a, e: 1 / (z + e),
    "power": lambda z, a, e: z ** a,
    "exp": lambda z, a, e: np.exp(z),
    "log": lambda z, a, e: np.log(z),
    "abs": lambda z, a, e: np.abs(z),
    "threshold": lambda z, a, e: np.maximum(z, a),
}


@pytest.mark.parametrize("mode", list(UNARY))
@pytest.mark.parametrize("scale, shift", [(1.0, 0.0), (0.5, 0.25)])
def test_unary(mode, scale, shift):
    x = _random(N, 2, 3, 4, low=0.1)
    alpha, epsilon = 1.7, 0.01
    spec = _network({"x": (1, 2, 3, 4)}, lambda nn: nn.add_unary(
        "u", "x", "y", mode, alpha=alpha, shift=shift, scale=scale, epsilon=epsilon))
    expected = UNARY[mode](np.float64(x) * scale + shift, alpha, epsilon).astype(np.float32)
    _close(_run(spec, {"x": x}), expected)


def test_relu6_as_coremltools_writes_it():
    """ReLU, linear(-1), threshold(-6), linear(-1): how the converter spells min(max(x,0),6)."""
    import tensorflow as tf

    x = _random(N, 3, 4, 4) * 8

    def build(nn):
        nn.add_activation("relu", "RELU", "x", "a")
        nn.add_activation("neg", "LINEAR", "a", "b", params=[-1.0, 0.0])
        nn.add_unary("thr", "b", "c", "threshold", alpha=-6.0)
        nn.add_activation("neg2", "LINEAR", "c", "y", params=[-1.0, 0.0])
    _close(_run(_network({"x": (1, 3, 4, 4)}, build), {"x": x}), np.asarray(tf.nn.relu6(x)))


def test_elementwise_broadcast_and_alpha():
    x, s, t = _random(N, 4, 3, 5), _random(N, 4, 1, 1), _random(N, 4, 3, 5)

    def build(nn):
        nn.add_elementwise("mul", ["x", "s"], "m", "MULTIPLY")  # squeeze-excite style
        nn.add_elementwise("add", ["m", "t", "x"], "a", "ADD")
        nn.add_elementwise("plus", ["a"], "p", "ADD", alpha=0.5)
        nn.add_elementwise("times", ["p"], "q", "MULTIPLY", alpha=-2.0)
        nn.add_elementwise("max", ["q", "x"], "mx", "MAX")
        nn.add_elementwise("min", ["q", "x"], "mn", "MIN")
        nn.add_elementwise("avg", ["mx", "mn", "t"], "y", "AVE")
    spec = _network({"x": (1, 4, 3, 5), "s": (1, 4, 1, 1), "t": (1, 4, 3, 5)}, build)
    q = ((x * s + t + x) + 0.5) * -2.0
    expected = (np.maximum(q, x) + np.minimum(q, x) + t) / 3
    got = _run(spec, {"x": x, "s": s, "t": t})
    _close(got, expected)


def test_in_place_work_never_corrupts_a_blob_read_later():
    """x feeds a ReLU (the executor may reuse a dying blob's memory) and, later, an add."""
    x = _random(N, 2, 3, 3)

    def build(nn):
        nn.add_activation("relu", "RELU", "x", "r")
        nn.add_expand_dims("view", "r", "v", axes=[0])
        nn.add_squeeze("back", "v", "w", axes=[0])
        nn.add_activation("neg", "LINEAR", "w", "n", params=[-1.0, 0.0])
        nn.add_elementwise("add", ["n", "r", "x"], "y", "ADD")
    _close(_run(_network({"x": (1, 2, 3, 3)}, build), {"x": x}), x)


def test_clip():
    x = _random(N, 5) * 3
    spec = _network({"x": (1, 5)}, lambda nn: nn.add_clip("clip", "x", "y", -1.0, 0.5))
    _close(_run(spec, {"x": x}), np.clip(x, -1.0, 0.5))


# -- shapes, reductions, matmuls, softmax -----------------------------------------------------

def test_concat_channel_and_nd():
    a, b = _random(N, 2, 3, 4), _random(N, 3, 3, 4)

    def build(nn):
        nn.add_elementwise("cat", ["a", "b"], "c", "CONCAT")
        nn.add_concat_nd("catnd", ["c", "c"], "y", axis=-1)
    spec = _network({"a": (1, 2, 3, 4), "b": (1, 3, 3, 4)}, build)
    c = np.concatenate([a, b], axis=1)
    _close(_run(spec, {"a": a, "b": b}), np.concatenate([c, c], axis=-1))


def test_transpose_then_reduce_mean_as_the_converters_write_global_pooling():
    import tensorflow as tf

    x = _random(N, 6, 4, 5)

    def build(nn):
        nn.add_transpose("nhwc", [0, 2, 3, 1], "x", "t")
        nn.add_reduce_mean("mean", "t", "y", axes=[1, 2], keepdims=False)
    spec = _network({"x": (1, 6, 4, 5)}, build)
    expected = tf.reduce_mean(tf.transpose(x, (0, 2, 3, 1)), axis=(1, 2))
    _close(_run(spec, {"x": x}), np.asarray(expected))


@pytest.mark.parametrize("axes, keepdims, reduce_all", [([1], True, False),
                                                        ([-1, -3], False, False),
                                                       (None, True, True), (None, False, True)])
def test_reduce_mean_axes(axes, keepdims, reduce_all):
    x = _random(N, 2, 3, 4)
    spec = _network({"x": (1, 2, 3, 4)}, lambda nn: nn.add_reduce_mean(
        "mean", "x", "y", axes=axes, keepdims=keepdims, reduce_all=reduce_all))
    per_example = x[:, None]  # Core ML's (1, 2, 3, 4) for each example
    reduced = (per_example.mean(axis=(1, 2, 3, 4), keepdims=keepdims) if reduce_all else
               per_example.mean(axis=tuple(a + 1 if a >= 0 else a for a in axes),
                                keepdims=keepdims))
    got = _run(spec, {"x": x})
    expected = reduced.reshape(N, -1) if reduce_all and not keepdims else reduced
    if expected.ndim > 1 and expected.shape[1] == 1:
        expected = expected.reshape(N, *expected.shape[2:])
    _close(got, expected)


def test_inner_product_on_a_feature_map_flattens_channel_first():
    import tensorflow as tf

    x, w, b = _random(N, 3, 2, 2), _random(4, 12), _random(4)
    spec = _network({"x": (1, 3, 2, 2)}, lambda nn: nn.add_inner_product(
        "ip", w, b, 12, 4, True, input_name="x", output_name="y"))
    expected = tf.linalg.matmul(x.reshape(N, 12), w, transpose_b=True) + b
    _close(_run(spec, {"x": x}), np.asarray(expected).reshape(N, 4, 1, 1))


def test_batched_matmul_with_weights_and_with_two_inputs():
    import tensorflow as tf

    a, b, w, bias = _random(N, 4, 6), _random(N, 5, 6), _random(6, 3), _random(3)

    def build(nn):
        nn.add_batched_mat_mul("w", ["a"], "aw", weight_matrix_rows=6, weight_matrix_columns=3,
                               W=w, bias=bias)
        nn.add_batched_mat_mul("ab", ["a", "b"], "y", transpose_b=True)
    spec = _network({"a": (1, 4, 6), "b": (1, 5, 6)}, build, outputs=("aw", "y"))
    outputs = Executor(spec, Path("m.mlmodel")).run({"a": a, "b": b})
    _close(outputs["aw"], np.asarray(tf.linalg.matmul(a, w) + bias))
    _close(outputs["y"], np.asarray(tf.linalg.matmul(a, b, transpose_b=True)))


@pytest.mark.parametrize("axis", [-1, 1, 2])
def test_softmax_nd(axis):
    import tensorflow as tf

    x = _random(N, 3, 4) * 5
    spec = _network({"x": (1, 3, 4)}, lambda nn: nn.add_softmax_nd("sm", "x", "y", axis))
    # Axis 1 of each example's (1, 3, 4) is axis 1 of the returned (N, 3, 4): the example's
    # leading 1 (Core ML's batch of one) is where the N examples are stacked.
    _close(_run(spec, {"x": x}), np.asarray(tf.nn.softmax(x, axis=axis)), atol=1e-6)


def test_legacy_softmax_is_over_channels():
    import tensorflow as tf

    x = _random(N, 5, 2, 3)
    spec = _network({"x": (1, 5, 2, 3)}, lambda nn: nn.add_softmax("sm", "x", "y"))
    _close(_run(spec, {"x": x}), np.asarray(tf.nn.softmax(x, axis=1)), atol=1e-6)


def test_reshapes_keep_examples_apart():
    x = _random(N, 2, 3, 4)

    def build(nn):
        nn.add_flatten_to_2d("flat", "x", "f", axis=1)  # (1, 24)
        nn.add_expand_dims("expand", "f", "e", axes=[-1, -2])  # (1, 24, 1, 1)
        nn.add_squeeze("squeeze", "e", "s", axes=[2, 3])  # (1, 24)
        nn.add_reshape_static("reshape", "s", "y", [1, 4, 6])
    spec = _network({"x": (1, 2, 3, 4)}, build)
    _close(_run(spec, {"x": x}), x.reshape(N, 4, 6))


def test_batchnorm_scale_bias_constant_slice_and_legacy_flatten():
    import tensorflow as tf

    x = _random(N, 3, 4, 5)
    gamma, beta, mean = _random(3), _random(3), _random(3)
    variance, scale, bias = _random(3, low=0.5), _random(3), _random(1, 4, 5)
    constant = _random(3, 4, 5)

    def build(nn):
        nn.add_batchnorm("bn", 3, gamma, beta, mean, variance, "x", "bn", epsilon=1e-3)
        nn.add_scale("scale", scale, None, False, "bn", "sc", shape_scale=[3])
        nn.add_bias("bias", bias, "sc", "bi", shape_bias=[1, 4, 5])
        nn.add_load_constant_nd("const", "k", constant, [1, 3, 4, 5])
        nn.add_elementwise("plus", ["bi", "k"], "sum", "ADD")
        nn.add_slice_static("slice", "sum", "sl", begin_ids=[0, 1, 0, 1], end_ids=[1, 3, 4, 5],
                            strides=[1, 1, 2, 2], begin_masks=[True, False, True, False],
                            end_masks=[True, False, True, True])
        nn.add_flatten("flat", 1, "sl", "y")  # CHANNEL_LAST: H, W, C order
    spec = _network({"x": (1, 3, 4, 5)}, build)
    normal = tf.nn.batch_normalization(_nhwc(x), mean, variance, beta, gamma, 1e-3)
    total = (_nchw(normal) * scale.reshape(3, 1, 1) + bias + constant)[:, 1:3, ::2, 1::2]
    expected = np.transpose(total, (0, 2, 3, 1)).reshape(N, -1, 1, 1)
    _close(_run(spec, {"x": x}), expected)


def test_slice_static_with_squeeze_masks():
    x = _random(N, 4, 6)
    spec = _network({"x": (1, 4, 6)}, lambda nn: nn.add_slice_static(
        "slice", "x", "y", begin_ids=[0, 2, 1], end_ids=[1, 3, 6], strides=[1, 1, 2],
        begin_masks=[False] * 3, end_masks=[False] * 3, squeeze_masks=[False, True, False]))
    _close(_run(spec, {"x": x}), x[:, 2, 1:6:2])


# -- image preprocessing, classifier outputs ------------------------------------------------

def _image_classifier(color, scale, bias, labels=("cat", "dog", "emu")):
    """A classifier: image (scaler preprocessing) → inner product → softmax; also exposes the
    preprocessed image itself as output "pre" (a linear layer with alpha 1)."""
    from coremltools.models import datatypes
    from coremltools.models.neural_network import NeuralNetworkBuilder
    from coremltools.proto import FeatureTypes_pb2

    w = np.linspace(-0.02, 0.02, len(labels) * 3 * 4 * 4, dtype=np.float32).reshape(len(labels),
                                                                                     -1)
    builder = NeuralNetworkBuilder([("image", datatypes.Array(3, 4, 4))], [("probs", None)],
                                   mode="classifier", disable_rank5_shape_mapping=True)
    builder.add_activation("pre", "LINEAR", "image", "pre", params=[1.0, 0.0])
    builder.add_inner_product("ip", w, None, 48, len(labels), False, input_name="image",
                              output_name="logits")
    builder.add_flatten_to_2d("flat", "logits", "flat", axis=1)
    builder.add_softmax_nd("softmax", "flat", "probs", axis=-1)
    builder.set_class_labels(list(labels), predicted_feature_name="label",
                             prediction_blob="probs")
    spec = builder.spec
    spec.description.output.add(name="pre").type.multiArrayType.shape[:] = [1, 3, 4, 4]
    image = spec.description.input[0].type.imageType
    image.width, image.height = 4, 4
    image.colorSpace = getattr(FeatureTypes_pb2.ImageFeatureType, color)
    spec.neuralNetworkClassifier.imageInputShapeMapping = 1  # RANK4_IMAGE_MAPPING
    red, green, blue = bias
    entry = spec.neuralNetworkClassifier.preprocessing.add()
    entry.featureName = "image"
    entry.scaler.channelScale, entry.scaler.redBias = scale, red
    entry.scaler.greenBias, entry.scaler.blueBias = green, blue
    return spec, w


@pytest.mark.parametrize("color", ["RGB", "BGR"])
def test_image_preprocessing_scale_bias_and_colour_order(color):
    spec, _ = _image_classifier(color, 1 / 127.5, (-1.0, -0.5, 0.25))
    pixels = RNG.integers(0, 256, (N, 4, 4, 3), dtype=np.uint8)
    executor = Executor(spec, Path("c.mlmodel"))
    assert (executor.input_name, executor.input_size, executor.color) == ("image", 4, color)
    got = executor.run({"image": pixels})["pre"]
    rgb = pixels.astype(np.float32).transpose(0, 3, 1, 2)
    # The image arrives in the model's colour order; each bias belongs to its named colour.
    channels = rgb[:, ::-1] if color == "BGR" else rgb
    bias = np.float32([0.25, -0.5, -1.0] if color == "BGR" else [-1.0, -0.5, 0.25])
    _close(got, channels / np.float32(127.5) + bias.reshape(1, 3, 1, 1), atol=1e-6)


def _plain_image_network(channels, color):
    """image (N, 4, 4) or (N, 4, 4, 3) → an identity layer → "y", for preprocessing tests."""
    from coremltools.proto import FeatureTypes_pb2

    spec = _network({"image": (channels, 4, 4)}, lambda nn: nn.add_activation(
        "same", "LINEAR", "image", "y", params=[1.0, 0.0]))
    image = spec.description.input[0].type.imageType
    image.width, image.height = 4, 4
    image.colorSpace = getattr(FeatureTypes_pb2.ImageFeatureType, color)
    spec.neuralNetwork.imageInputShapeMapping = 1  # RANK4_IMAGE_MAPPING
    return spec, spec.neuralNetwork.preprocessing.add(featureName="image")


def test_grayscale_image_with_gray_bias():
    spec, entry = _plain_image_network(1, "GRAYSCALE")
    entry.scaler.channelScale, entry.scaler.grayBias, entry.scaler.redBias = 0.5, -3.0, 100.0
    gray = RNG.integers(0, 256, (N, 4, 4), dtype=np.uint8)
    executor = Executor(spec, Path("g.mlmodel"))
    assert executor.color == "GRAY"
    _close(executor.run({"image": gray})["y"], gray[:, None] * np.float32(0.5) - 3)
    # RGB pixels are converted to luma first, as PIL's convert("L") does for coremltools.
    rgb = RNG.integers(0, 256, (N, 4, 4, 3), dtype=np.uint8)
    luma = rgb.astype(np.float32) @ np.float32([0.299, 0.587, 0.114])
    _close(executor.run({"image": rgb})["y"], luma[:, None] * np.float32(0.5) - 3, atol=1e-4)


def test_mean_image_preprocessing():
    spec, entry = _plain_image_network(3, "BGR")
    mean = np.arange(48, dtype=np.float32).reshape(3, 4, 4)
    entry.meanImage.meanImage.extend(mean.ravel())
    pixels = RNG.integers(0, 256, (N, 4, 4, 3), dtype=np.uint8)
    bgr = pixels[..., ::-1].astype(np.float32).transpose(0, 3, 1, 2)
    _close(Executor(spec, Path("m.mlmodel")).run({"image": pixels})["y"], bgr - mean)


def test_classifier_predict_and_outputs_follow_the_labels():
    spec, w = _image_classifier("RGB", 0.5, (0.0, 0.0, 0.0))
    pixels = RNG.integers(0, 256, (5, 4, 4, 3), dtype=np.uint8)
    executor = Executor(spec, Path("c.mlmodel"))
    assert executor.labels == ("cat", "dog", "emu")
    probs = executor.predict(pixels)
    logits = (pixels.astype(np.float32).transpose(0, 3, 1, 2).reshape(5, -1) * 0.5) @ w.T
    expected = np.exp(logits - logits.max(1, keepdims=True))
    expected /= expected.sum(1, keepdims=True)
    _close(probs, expected, atol=1e-6)
    outputs = executor.run({"image": pixels})
    _close(outputs[spec.description.predictedProbabilitiesName], expected, atol=1e-6)
    assert list(outputs["label"]) == [executor.labels[i] for i in expected.argmax(1)]
    with pytest.raises(ModelError, match="shape"):
        executor.predict(pixels[:, :3])


def test_batches_equal_one_image_at_a_time(monkeypatch):
    # Values of at most 48 floats an image: blocks of 4 images, after the measuring first one.
    monkeypatch.setattr(plan, "BLOCK_BYTES", 4 * 48 * 4)
    spec, _ = _image_classifier("BGR", 0.01, (0.1, 0.2, 0.3))
    pixels = RNG.integers(0, 256, (19, 4, 4, 3), dtype=np.uint8)
    executor = Executor(spec, Path("c.mlmodel"))
    batched = executor.predict(pixels)
    assert executor.plan.block == 4
    one_by_one = np.concatenate([executor.predict(pixels[i:i + 1]) for i in range(len(pixels))])
    np.testing.assert_array_equal(batched, one_by_one)


# -- float16 compute, errors ------------------------------------------------------------------

def test_float16_compute_rounds_every_layer():
    x, w = _random(N, 8, 6, 6), _random(3, 3, 8, 8) / 4
    spec = _network({"x": (1, 8, 6, 6)}, lambda nn: (
        nn.add_convolution("conv", 8, 8, 3, 3, 1, 1, "same", 1, w, None, False,
                           input_name="x", output_name="c"),
        nn.add_activation("act", "SIGMOID", "c", "y")))
    full = _run(spec, {"x": x})
    half = _run(spec, {"x": x}, precision="float16")
    np.testing.assert_array_equal(half, half.astype(np.float16).astype(np.float32))
    difference = np.abs(half - full).max()
    assert 1e-5 < difference < 5e-3


def test_compute_precision_is_validated():
    spec = _network({"x": (1, 2)}, lambda nn: nn.add_activation("a", "RELU", "x", "y"))
    with pytest.raises(UsageError, match="float64"):
        Executor(spec, Path("m.mlmodel"), "float64")


@pytest.mark.parametrize("build, kind", [
    (lambda nn: nn.add_lrn("norm1", "x", "y", alpha=1e-4, beta=0.75, local_size=3), "'lrn'"),
    (lambda nn: nn.add_pooling("l2pool", 2, 2, 2, 2, "L2", "VALID", "x", "y"), "'pooling'"),
    (lambda nn: nn.add_convolution("deconv", 3, 3, 2, 2, 2, 2, "valid", 1, _random(2, 2, 3, 3),
                                   None, False, is_deconv=True, output_shape=[8, 8],
                                   input_name="x", output_name="y"), "'convolution'"),
])
def test_unimplemented_layers_are_named_at_load(build, kind):
    spec = _network({"x": (1, 3, 4, 4)}, build)
    name = spec.neuralNetwork.layers[0].name
    with pytest.raises(UnsupportedLayer) as error:
        Executor(spec, Path("m.mlmodel"))
    message = str(error.value)
    assert kind in message and f"(layer '{name}')" in message and "\n" not in message


def test_load_dispatches_and_rejects_other_models(tmp_path):
    import coremltools as ct
    from coremltools.proto import Model_pb2

    spec, _ = _image_classifier("RGB", 1.0, (0, 0, 0))
    path = tmp_path / "c.mlmodel"
    ct.utils.save_spec(spec, str(path))
    executor = runtimes.load(path, compute_precision="float16")
    assert isinstance(executor, Executor) and executor.compute_precision == "float16"
    other = Model_pb2.Model(specificationVersion=1)
    other.description.input.add().name = "x"
    other.identity.MergeFromString(b"")
    ct.utils.save_spec(other, str(tmp_path / "i.mlmodel"))
    with pytest.raises(ModelError, match="identity"):
        runtimes.load(tmp_path / "i.mlmodel")
    with pytest.raises(ModelError, match="no Core ML model"):
        runtimes.load(tmp_path / "missing.mlmodel")
    with pytest.raises(UsageError):
        runtimes.load(path, compute_precision="int8")


# -- whole models, as the Core ML target exports them -----------------------------------------

SMALL = "mobilenet_v3_small_96"
WHOLE = [arch for arch in FAMILY_ARCHS if arch != "inception_v3_75"]  # its .mlmodel takes 7 min


@pytest.fixture(scope="module")
def exported(coreml_export):
    """``exported(arch, precision)`` → (Source, .mlmodel path): the session's shared export."""

    def get(arch, precision="float32"):
        return make_source(arch), coreml_export(arch, "neuralnetwork", precision)[0]

    return get


def _keras_and_pixels(source, count=6):
    """Mid-contrast noise images and Keras' probabilities for them. Full-range noise drives
    the random-weight MobileNet V3s to one-hot outputs, which would hide any error."""
    pixels = np.random.default_rng(7).integers(
        64, 192, (count, source.input_size, source.input_size, 3), dtype=np.uint8)
    expected = np.asarray(source.keras_model(source.preprocessing.apply(pixels)))
    assert (expected.max(axis=1) < 0.999).all(), "saturated outputs would make this check blind"
    return pixels, expected


@pytest.mark.slow
@pytest.mark.parametrize("arch", WHOLE)
def test_whole_float32_model_matches_keras(exported, arch):
    source, path = exported(arch)
    pixels, expected = _keras_and_pixels(source)
    executor = runtimes.load(path)
    assert executor.labels == tuple(source.labels)
    got = executor.predict(pixels)
    assert got.shape == expected.shape and got.dtype == np.float32
    assert np.abs(got - expected).max() <= 1e-4
    np.testing.assert_allclose(got.sum(axis=1), 1.0, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("precision, tolerance", [("float16", 2e-2), ("int8", 0.2)])
def test_whole_quantized_model_stays_close_to_keras(exported, precision, tolerance):
    source, path = exported(SMALL, precision)
    pixels, expected = _keras_and_pixels(source)
    got = runtimes.load(path).predict(pixels)
    difference = np.abs(got - expected).max()
    # Close to Keras, but not equal: the stored weights really are of lower precision.
    assert 1e-5 < difference <= tolerance
    if precision == "int8":  # coremltools' own decoding of the same bytes agrees
        import coremltools as ct

        plain = _quantized(ct.utils.load_spec(str(path)), None, "dequantization")
        reference = Executor(plain, path).predict(pixels)
        np.testing.assert_allclose(got, reference, atol=2e-5)


@pytest.mark.slow
def test_whole_model_float16_compute_differs_but_stays_close(exported):
    source, path = exported(SMALL)
    pixels, expected = _keras_and_pixels(source)
    full = runtimes.load(path).predict(pixels)
    half = runtimes.load(path, compute_precision="float16").predict(pixels)
    assert 1e-5 < np.abs(half - full).max() <= 2e-2
    assert np.abs(half - expected).max() <= 2e-2
    assert (half.argmax(1) == expected.argmax(1)).mean() >= 5 / 6

"""NeuralNetwork layers over images (``nn_layers_spatial``) against TensorFlow: convolution
(same / valid, groups, strides, dilation, explicit padding), pooling (global, include-padding,
includeLastPixel against a brute-force reference of NeuralNetwork.proto's formulas), padding
modes, and batchnorm / scale / bias.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.toolchain.runtimes.nn_helpers import (
    N,
    close,
    nchw,
    network,
    nhwc,
    random,
    run,
    tf_conv,
)

# -- convolution -------------------------------------------------------------------------------

@pytest.mark.parametrize("border", ["same", "valid"])
@pytest.mark.parametrize("stride, dilation", [(1, 1), (2, 1), (1, 2)])
@pytest.mark.parametrize("cin, cout, groups", [(4, 6, 1), (4, 6, 2), (4, 4, 4), (4, 8, 4)])
def test_convolution_matches_tf(border, stride, dilation, cin, cout, groups):
    x, w, b = random(N, cin, 9, 10), random(3, 3, cin // groups, cout), random(cout)
    spec = network({"x": (1, cin, 9, 10)}, lambda nn: nn.add_convolution(
        "conv", cin // groups, cout, 3, 3, stride, stride, border, groups, w, b, True,
        input_name="x", output_name="y", dilation_factors=[dilation, dilation]))
    expected = tf_conv(x, w, groups, stride, border.upper(), dilation) + b.reshape(-1, 1, 1)
    close(run(spec, {"x": x}), expected)


def test_convolution_same_padding_top_left_heavy():
    import tensorflow as tf

    x, w = random(N, 3, 8, 8), random(3, 3, 3, 5)
    spec = network({"x": (1, 3, 8, 8)}, lambda nn: nn.add_convolution(
        "conv", 3, 5, 3, 3, 2, 2, "same", 1, w, None, False, input_name="x", output_name="y",
        same_padding_asymmetry_mode="TOP_LEFT_HEAVY"))
    # 8 px, stride 2, kernel 3: one cell of padding in total, put first (top / left).
    padded = tf.pad(nhwc(x), [[0, 0], [1, 0], [1, 0], [0, 0]])
    close(run(spec, {"x": x}), nchw(tf.nn.conv2d(padded, w, 2, "VALID")))


def test_convolution_valid_with_explicit_padding():
    import tensorflow as tf

    x, w = random(N, 2, 7, 6), random(1, 5, 2, 3)
    spec = network({"x": (1, 2, 7, 6)}, lambda nn: nn.add_convolution(
        "conv", 2, 3, 1, 5, 1, 2, "valid", 1, w, None, False, input_name="x", output_name="y",
        padding_top=1, padding_bottom=2, padding_left=3, padding_right=0))
    expected = tf.nn.conv2d(nhwc(x), w, (1, 2), [[0, 0], [1, 2], [3, 0], [0, 0]])
    close(run(spec, {"x": x}), nchw(expected))


# -- pooling -----------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["MAX", "AVERAGE"])
@pytest.mark.parametrize("padding", ["SAME", "VALID"])
@pytest.mark.parametrize("kernel, stride", [(3, 2), (2, 2), (3, 1)])
def test_pooling_matches_tf(kind, padding, kernel, stride):
    import tensorflow as tf

    x = random(N, 3, 9, 8)
    spec = network({"x": (1, 3, 9, 8)}, lambda nn: nn.add_pooling(
        "pool", kernel, kernel, stride, stride, kind, padding, "x", "y", exclude_pad_area=True))
    op = tf.nn.max_pool2d if kind == "MAX" else tf.nn.avg_pool2d
    close(run(spec, {"x": x}), nchw(op(nhwc(x), kernel, stride, padding)))


def test_average_pooling_including_padding():
    import tensorflow as tf

    x = random(N, 2, 7, 7)
    spec = network({"x": (1, 2, 7, 7)}, lambda nn: nn.add_pooling(
        "pool", 3, 3, 2, 2, "AVERAGE", "SAME", "x", "y", exclude_pad_area=False))
    padded = tf.pad(nhwc(x), [[0, 0], [1, 1], [1, 1], [0, 0]])  # zeros that count
    close(run(spec, {"x": x}), nchw(tf.nn.avg_pool2d(padded, 3, 2, "VALID")))


@pytest.mark.parametrize("kind", ["MAX", "AVERAGE"])
def test_global_pooling(kind):
    x = random(N, 4, 5, 6)
    spec = network({"x": (1, 4, 5, 6)}, lambda nn: nn.add_pooling(
        "pool", 1, 1, 1, 1, kind, "VALID", "x", "y", is_global=True))
    reduce = np.max if kind == "MAX" else np.mean
    close(run(spec, {"x": x}), reduce(x, axis=(2, 3), keepdims=True))


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
    x = random(N, 2, size, size)

    def build(nn):
        layer = nn.add_pooling("pool", kernel, kernel, stride, stride, kind,
                               "INCLUDE_LAST_PIXEL", "x", "y", exclude_pad_area=exclude)
        layer.pooling.includeLastPixel.paddingAmounts[:] = [pad, pad]
    spec = network({"x": (1, 2, size, size)}, build)
    close(run(spec, {"x": x}), _caffe_pool(x, kind, kernel, stride, pad, exclude))


# -- padding -----------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["constant", "reflection", "replication"])
def test_padding_layer(mode):
    import tensorflow as tf

    x = random(N, 3, 6, 7)
    spec = network({"x": (1, 3, 6, 7)}, lambda nn: nn.add_padding(
        "pad", left=2, right=1, top=0, bottom=3, value=1.5, input_name="x", output_name="y",
        padding_type=mode))
    pads = [[0, 0], [0, 0], [0, 3], [2, 1]]
    expected = {"constant": lambda: tf.pad(x, pads, "CONSTANT", constant_values=1.5),
                "reflection": lambda: tf.pad(x, pads, "REFLECT"),
                "replication": lambda: np.pad(x, pads, mode="edge")}[mode]()
    close(run(spec, {"x": x}), np.asarray(expected))


# -- batchnorm, scale, bias --------------------------------------------------------------------

def test_batchnorm_scale_bias_constant_slice_and_legacy_flatten():
    import tensorflow as tf

    x = random(N, 3, 4, 5)
    gamma, beta, mean = random(3), random(3), random(3)
    variance, scale, bias = random(3, low=0.5), random(3), random(1, 4, 5)
    constant = random(3, 4, 5)

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
    spec = network({"x": (1, 3, 4, 5)}, build)
    normal = tf.nn.batch_normalization(nhwc(x), mean, variance, beta, gamma, 1e-3)
    total = (nchw(normal) * scale.reshape(3, 1, 1) + bias + constant)[:, 1:3, ::2, 1::2]
    expected = np.transpose(total, (0, 2, 3, 1)).reshape(N, -1, 1, 1)
    close(run(spec, {"x": x}), expected)

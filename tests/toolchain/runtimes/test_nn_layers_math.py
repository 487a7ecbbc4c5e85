"""NeuralNetwork layers of arithmetic (``nn_layers_math``) against TensorFlow / NumPy:
activations, unary functions, elementwise and broadcastable layers (in place where the
scheduler allows, never corrupting a blob read later), clip, reductions, inner products,
matmuls and softmax.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.toolchain.runtimes.nn_helpers import (
    N,
    close,
    network,
    random,
    run,
)
from toolchain.errors import UnsupportedLayer
from toolchain.runtimes.neuralnetwork import Executor

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
    x = random(N, 3, 4, 5) * 4
    spec = network({"x": (1, 3, 4, 5)},
                    lambda nn: nn.add_activation("act", name, "x", "y", params=params))
    close(run(spec, {"x": x}), np.asarray(reference(x, tf), np.float32))


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
    x = random(N, 2, 3, 4, low=0.1)
    alpha, epsilon = 1.7, 0.01
    spec = network({"x": (1, 2, 3, 4)}, lambda nn: nn.add_unary(
        "u", "x", "y", mode, alpha=alpha, shift=shift, scale=scale, epsilon=epsilon))
    expected = UNARY[mode](np.float64(x) * scale + shift, alpha, epsilon).astype(np.float32)
    close(run(spec, {"x": x}), expected)


def test_relu6_as_coremltools_writes_it():
    """ReLU, linear(-1), threshold(-6), linear(-1): how the converter spells min(max(x,0),6)."""
    import tensorflow as tf

    x = random(N, 3, 4, 4) * 8

    def build(nn):
        nn.add_activation("relu", "RELU", "x", "a")
        nn.add_activation("neg", "LINEAR", "a", "b", params=[-1.0, 0.0])
        nn.add_unary("thr", "b", "c", "threshold", alpha=-6.0)
        nn.add_activation("neg2", "LINEAR", "c", "y", params=[-1.0, 0.0])
    close(run(network({"x": (1, 3, 4, 4)}, build), {"x": x}), np.asarray(tf.nn.relu6(x)))


def test_elementwise_broadcast_and_alpha():
    x, s, t = random(N, 4, 3, 5), random(N, 4, 1, 1), random(N, 4, 3, 5)

    def build(nn):
        nn.add_elementwise("mul", ["x", "s"], "m", "MULTIPLY")  # squeeze-excite style
        nn.add_elementwise("add", ["m", "t", "x"], "a", "ADD")
        nn.add_elementwise("plus", ["a"], "p", "ADD", alpha=0.5)
        nn.add_elementwise("times", ["p"], "q", "MULTIPLY", alpha=-2.0)
        nn.add_elementwise("max", ["q", "x"], "mx", "MAX")
        nn.add_elementwise("min", ["q", "x"], "mn", "MIN")
        nn.add_elementwise("avg", ["mx", "mn", "t"], "y", "AVE")
    spec = network({"x": (1, 4, 3, 5), "s": (1, 4, 1, 1), "t": (1, 4, 3, 5)}, build)
    q = ((x * s + t + x) + 0.5) * -2.0
    expected = (np.maximum(q, x) + np.minimum(q, x) + t) / 3
    got = run(spec, {"x": x, "s": s, "t": t})
    close(got, expected)


def test_in_place_work_never_corrupts_a_blob_read_later():
    """x feeds a ReLU (the executor may reuse a dying blob's memory) and, later, an add."""
    x = random(N, 2, 3, 3)

    def build(nn):
        nn.add_activation("relu", "RELU", "x", "r")
        nn.add_expand_dims("view", "r", "v", axes=[0])
        nn.add_squeeze("back", "v", "w", axes=[0])
        nn.add_activation("neg", "LINEAR", "w", "n", params=[-1.0, 0.0])
        nn.add_elementwise("add", ["n", "r", "x"], "y", "ADD")
    close(run(network({"x": (1, 2, 3, 3)}, build), {"x": x}), x)


BROADCASTABLE = {"add": np.add, "subtract": np.subtract, "multiply": np.multiply,
                 "divide": np.divide, "max": np.maximum, "min": np.minimum, "pow": np.power}


@pytest.mark.parametrize("name", list(BROADCASTABLE))
def test_broadcastable_layers_align_shapes_on_the_right(name):
    """x (2, 3, 4) with y (3, 1) per example, in both orders: y broadcasts as (1, 3, 1)."""
    x, y = random(N, 2, 3, 4, low=0.5), random(N, 3, 1, low=0.5)  # positive: pow

    def build(nn):
        layer = getattr(nn, f"add_{name}_broadcastable")
        layer("xy", ["x", "y"], "xy")
        layer("yx", ["y", "x"], "yx")
    spec = network({"x": (2, 3, 4), "y": (3, 1)}, build, outputs=("xy", "yx"))
    outputs = Executor(spec, Path("b.mlmodel")).run({"x": x, "y": y})
    reference = BROADCASTABLE[name]
    x64, y64 = np.float64(x), np.float64(y)[:, None]  # example i only meets example i
    close(outputs["xy"], reference(x64, y64).astype(np.float32))
    close(outputs["yx"], reference(y64, x64).astype(np.float32))


def test_clip():
    x = random(N, 5) * 3
    spec = network({"x": (1, 5)}, lambda nn: nn.add_clip("clip", "x", "y", -1.0, 0.5))
    close(run(spec, {"x": x}), np.clip(x, -1.0, 0.5))


# -- reductions, matmuls, softmax --------------------------------------------------------------

def test_transpose_then_reduce_mean_as_the_converters_write_global_pooling():
    import tensorflow as tf

    x = random(N, 6, 4, 5)

    def build(nn):
        nn.add_transpose("nhwc", [0, 2, 3, 1], "x", "t")
        nn.add_reduce_mean("mean", "t", "y", axes=[1, 2], keepdims=False)
    spec = network({"x": (1, 6, 4, 5)}, build)
    expected = tf.reduce_mean(tf.transpose(x, (0, 2, 3, 1)), axis=(1, 2))
    close(run(spec, {"x": x}), np.asarray(expected))


REDUCTIONS = {  # ND reduce layer → float64 reference over the blob's axes
    "sum": lambda x, axes: x.sum(axis=axes, keepdims=True),
    "prod": lambda x, axes: x.prod(axis=axes, keepdims=True),
    "max": lambda x, axes: x.max(axis=axes, keepdims=True),
    "min": lambda x, axes: x.min(axis=axes, keepdims=True),
    "l1": lambda x, axes: np.abs(x).sum(axis=axes, keepdims=True),
    "l2": lambda x, axes: np.sqrt(np.square(x).sum(axis=axes, keepdims=True)),
    "logsum": lambda x, axes: np.log(x.sum(axis=axes, keepdims=True)),
    "sumsquare": lambda x, axes: np.square(x).sum(axis=axes, keepdims=True),
    "logsumexp": lambda x, axes: np.log(np.exp(x).sum(axis=axes, keepdims=True)),
}


@pytest.mark.parametrize("name", list(REDUCTIONS))
@pytest.mark.parametrize("axes, keepdims, reduce_all", [([-1, 0], False, False),
                                                        ([1], True, False),
                                                        (None, False, True)])
def test_reduce_nd_layers(name, axes, keepdims, reduce_all):
    x = random(N, 2, 3, 4, low=0.1)  # positive: logsum
    spec = network({"x": (2, 3, 4)}, lambda nn: getattr(nn, f"add_reduce_{name}")(
        "r", "x", "y", axes=axes, keepdims=keepdims, reduce_all=reduce_all))
    blob_axes = (1, 2, 3) if reduce_all else tuple(a % 3 + 1 for a in axes)
    expected = REDUCTIONS[name](np.float64(x), blob_axes)
    if not keepdims:
        expected = expected.squeeze(axis=blob_axes)
    close(run(spec, {"x": x}), expected.astype(np.float32))


LEGACY_REDUCE = {  # mode of the rank-5 reduce layer → float64 reference (keeps the axes)
    "sum": lambda x, axes: x.sum(axis=axes, keepdims=True),
    "avg": lambda x, axes: x.mean(axis=axes, keepdims=True),
    "prod": lambda x, axes: x.prod(axis=axes, keepdims=True),
    "logsum": lambda x, axes: np.log(x + 0.01).sum(axis=axes, keepdims=True),  # epsilon 0.01
    "sumsquare": lambda x, axes: np.square(x).sum(axis=axes, keepdims=True),
    "L1": lambda x, axes: np.abs(x).sum(axis=axes, keepdims=True),
    "L2": lambda x, axes: np.sqrt(np.square(x).sum(axis=axes, keepdims=True)),
    "max": lambda x, axes: x.max(axis=axes, keepdims=True),
    "min": lambda x, axes: x.min(axis=axes, keepdims=True),
    "argmax": lambda x, axes: np.argmax(x, axis=axes[0], keepdims=True),
}
LEGACY_AXES = {"CHW": (-3, -2, -1), "HW": (-2, -1), "C": (-3,), "H": (-2,), "W": (-1,)}


@pytest.mark.parametrize("mode, axis", [(mode, axis) for mode in LEGACY_REDUCE
                                         for axis in LEGACY_AXES
                                         if mode != "argmax" or len(LEGACY_AXES[axis]) == 1])
def test_legacy_reduce_over_rank5_blobs(mode, axis):
    x = random(N, 3, 4, 5, low=0.1)
    spec = network({"x": (3, 4, 5)}, lambda nn: nn.add_reduce(
        "r", "x", "y", axis, mode, epsilon=0.01), rank5=True)
    # Each example is a (Seq 1, Batch 1, C, H, W) blob; run() folds its leading 1 away.
    expected = LEGACY_REDUCE[mode](np.float64(x)[:, None, None], LEGACY_AXES[axis])
    close(run(spec, {"x": x}), expected.reshape(N, *expected.shape[2:]).astype(np.float32))


def test_legacy_argmax_over_several_axes_is_unsupported():
    spec = network({"x": (3, 4, 5)}, lambda nn: nn.add_reduce("r", "x", "y", "C", "argmax"),
                   rank5=True)
    spec.neuralNetwork.layers[0].reduce.axis = 1  # HW: the builder refuses to write it
    with pytest.raises(UnsupportedLayer, match=r"'reduce' \(ARGMAX over several axes\)"):
        run(spec, {"x": random(N, 3, 4, 5)})


@pytest.mark.parametrize("axes, keepdims, reduce_all", [([1], True, False),
                                                        ([-1, -3], False, False),
                                                       (None, True, True), (None, False, True)])
def test_reduce_mean_axes(axes, keepdims, reduce_all):
    x = random(N, 2, 3, 4)
    spec = network({"x": (1, 2, 3, 4)}, lambda nn: nn.add_reduce_mean(
        "mean", "x", "y", axes=axes, keepdims=keepdims, reduce_all=reduce_all))
    per_example = x[:, None]  # Core ML's (1, 2, 3, 4) for each example
    reduced = (per_example.mean(axis=(1, 2, 3, 4), keepdims=keepdims) if reduce_all else
               per_example.mean(axis=tuple(a + 1 if a >= 0 else a for a in axes),
                                keepdims=keepdims))
    got = run(spec, {"x": x})
    expected = reduced.reshape(N, -1) if reduce_all and not keepdims else reduced
    if expected.ndim > 1 and expected.shape[1] == 1:
        expected = expected.reshape(N, *expected.shape[2:])
    close(got, expected)


def test_inner_product_on_a_feature_map_flattens_channel_first():
    import tensorflow as tf

    x, w, b = random(N, 3, 2, 2), random(4, 12), random(4)
    spec = network({"x": (1, 3, 2, 2)}, lambda nn: nn.add_inner_product(
        "ip", w, b, 12, 4, True, input_name="x", output_name="y"))
    expected = tf.linalg.matmul(x.reshape(N, 12), w, transpose_b=True) + b
    close(run(spec, {"x": x}), np.asarray(expected).reshape(N, 4, 1, 1))


def test_batched_matmul_with_weights_and_with_two_inputs():
    import tensorflow as tf

    a, b, w, bias = random(N, 4, 6), random(N, 5, 6), random(6, 3), random(3)

    def build(nn):
        nn.add_batched_mat_mul("w", ["a"], "aw", weight_matrix_rows=6, weight_matrix_columns=3,
                               W=w, bias=bias)
        nn.add_batched_mat_mul("ab", ["a", "b"], "y", transpose_b=True)
    spec = network({"a": (1, 4, 6), "b": (1, 5, 6)}, build, outputs=("aw", "y"))
    outputs = Executor(spec, Path("m.mlmodel")).run({"a": a, "b": b})
    close(outputs["aw"], np.asarray(tf.linalg.matmul(a, w) + bias))
    close(outputs["y"], np.asarray(tf.linalg.matmul(a, b, transpose_b=True)))


@pytest.mark.parametrize("axis", [-1, 1, 2])
def test_softmax_nd(axis):
    import tensorflow as tf

    x = random(N, 3, 4) * 5
    spec = network({"x": (1, 3, 4)}, lambda nn: nn.add_softmax_nd("sm", "x", "y", axis))
    # Axis 1 of each example's (1, 3, 4) is axis 1 of the returned (N, 3, 4): the example's
    # leading 1 (Core ML's batch of one) is where the N examples are stacked.
    close(run(spec, {"x": x}), np.asarray(tf.nn.softmax(x, axis=axis)), atol=1e-6)


def test_legacy_softmax_is_over_channels():
    import tensorflow as tf

    x = random(N, 5, 2, 3)
    spec = network({"x": (1, 5, 2, 3)}, lambda nn: nn.add_softmax("sm", "x", "y"))
    close(run(spec, {"x": x}), np.asarray(tf.nn.softmax(x, axis=1)), atol=1e-6)

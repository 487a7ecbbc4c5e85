"""ML Program elementwise ops and reductions (``mil_ops_elementwise``) against TensorFlow:
activations, broadcasting binary ops (constants on either side), in-place work that never
overwrites a shared value, reductions.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.toolchain.runtimes.mil_helpers import (
    BATCH,
    TOL,
    build,
    images,
    seeded,
)


def _activation_cases():
    import tensorflow as tf

    return {
        "relu": (lambda mb, x: mb.relu(x=x, name="y"), tf.nn.relu),
        "relu6": (lambda mb, x: mb.relu6(x=x, name="y"), tf.nn.relu6),
        "sigmoid": (lambda mb, x: mb.sigmoid(x=x, name="y"), tf.sigmoid),
        "tanh": (lambda mb, x: mb.tanh(x=x, name="y"), tf.tanh),
        "silu": (lambda mb, x: mb.silu(x=x, name="y"), tf.nn.silu),
        "clip": (lambda mb, x: mb.clip(x=x, alpha=-0.5, beta=0.75, name="y"),
                 lambda x: tf.clip_by_value(x, -0.5, 0.75)),
        "sigmoid_hard": (lambda mb, x: mb.sigmoid_hard(x=x, alpha=0.3, beta=0.4, name="y"),
                         lambda x: tf.clip_by_value(0.3 * x + 0.4, 0.0, 1.0)),
        "leaky_relu": (lambda mb, x: mb.leaky_relu(x=x, alpha=0.2, name="y"),
                       lambda x: tf.nn.leaky_relu(x, 0.2)),
        # MobileNet v3's hard-swish, as coremltools emits it: x * relu6(x + 3) * (1/6)
        "hard_swish": (lambda mb, x: mb.mul(x=mb.mul(x=x, y=mb.relu6(x=mb.add(x=x, y=3.0))),
                                            y=np.float32(1 / 6), name="y"),
                       lambda x: x * tf.nn.relu6(x + 3) / 6),
    }


@pytest.mark.parametrize("name", ["relu", "relu6", "sigmoid", "tanh", "silu", "clip",
                                  "sigmoid_hard", "leaky_relu", "hard_swish"])
def test_activations_match_tensorflow(tmp_path, name):
    from coremltools.converters.mil import Builder as mb

    ours, theirs = _activation_cases()[name]
    x = images(scale=5.0)  # beyond every bound (6, 1, ...) on both sides
    got = build(tmp_path, lambda x: ours(mb, x)).run({"x": x})["y"]
    np.testing.assert_allclose(got, theirs(x), **TOL)


@pytest.mark.parametrize("name", ["add", "sub", "mul", "real_div", "maximum", "minimum"])
def test_binary_ops_broadcast_like_tensorflow(tmp_path, name):
    import tensorflow as tf
    from coremltools.converters.mil import Builder as mb

    c = seeded(2).uniform(0.5, 2.0, (1, 4, 1, 1)).astype(np.float32)
    theirs = {"add": tf.add, "sub": tf.subtract, "mul": tf.multiply, "real_div": tf.divide,
              "maximum": tf.maximum, "minimum": tf.minimum}[name]

    def program(x, z):
        op = getattr(mb, name)
        return op(x=op(x=x, y=c), y=z, name="y"), op(x=c, y=x, name="swapped")

    x, z = images(), images(seed=3) + 3.0
    out = build(tmp_path, program, shapes=((1, 4, 9, 9), (1, 4, 9, 9))).run({"x": x, "z": z})
    np.testing.assert_allclose(out["y"], theirs(theirs(x, c), z), **TOL)
    np.testing.assert_allclose(out["swapped"], theirs(c, x), **TOL)


def test_shared_intermediate_is_not_overwritten(tmp_path):
    """A value read by several ops (and one returned) survives the in-place activations."""
    from coremltools.converters.mil import Builder as mb

    w = seeded(4).standard_normal((4, 4, 1, 1)).astype(np.float32)

    def program(x):
        y = mb.conv(x=x, weight=w, name="conv")
        flat = mb.reshape(x=y, shape=[1, 4, 81], name="flat")
        return (mb.add(x=mb.relu(x=y), y=mb.mul(x=y, y=2.0), name="sum"),
                mb.relu6(x=flat, name="flat6"), y)

    x = images(scale=4.0)
    out = build(tmp_path, program).run({"x": x})
    conv = np.einsum("oc,nchw->nohw", w[:, :, 0, 0], x)
    np.testing.assert_allclose(out["conv"], conv, **TOL)
    np.testing.assert_allclose(out["sum"], np.maximum(conv, 0) + 2 * conv, **TOL)
    np.testing.assert_allclose(out["flat6"], np.clip(conv, 0, 6).reshape(BATCH, 4, 81), **TOL)


@pytest.mark.parametrize("op, axes, keep", [
    ("reduce_mean", [2, 3], False), ("reduce_mean", [1], True), ("reduce_mean", [-1], False),
    ("reduce_sum", [1, 3], True), ("reduce_max", [2], False)])
def test_reductions_match_tensorflow(tmp_path, op, axes, keep):
    import tensorflow as tf
    from coremltools.converters.mil import Builder as mb

    def program(x):
        return getattr(mb, op)(x=x, axes=axes, keep_dims=keep, name="y")

    x = images()
    theirs = {"reduce_mean": tf.reduce_mean, "reduce_sum": tf.reduce_sum,
              "reduce_max": tf.reduce_max}[op]
    got = build(tmp_path, program).run({"x": x})["y"]
    np.testing.assert_allclose(got, theirs(x, axis=axes, keepdims=keep), **TOL)

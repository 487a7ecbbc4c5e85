"""Tests for the ML Program NumPy executor (``toolchain.runtimes.mlprogram``).

Op level: small programs built with coremltools' MIL builder, saved as real ``.mlpackage``s
(weights in the blob file like any converted model), run through the executor with a batch of
images and compared with the same computation in TensorFlow. Whole models: every backbone family
exported with the Core ML target and compared with Keras on the same images. The heads of those
models are tempered (weights scaled) so that the probabilities are not saturated: with random
backbone weights some families give logits hundreds apart, and a comparison of one-hot
probabilities would prove nothing.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from tests.targets.conftest import FAMILY_ARCHS, LABELS, make_source
from toolchain.errors import ModelError, UnsupportedLayer, UsageError

SMALL = "mobilenet_v3_small_96"
BATCH = 3  # op-level programs declare batch 1 and run 3 images at once
TOL = {"rtol": 1e-5, "atol": 1e-5}


def _rng(seed: int = 0):
    return np.random.default_rng(seed)


def build(tmp_path, function, shapes=((1, 4, 9, 9),), target=None, name="model",
          compute_precision="float32"):
    """An Executor for the MIL function ``function`` saved as an .mlpackage (no graph passes,
    so the ops under test reach the file as written)."""
    import coremltools as ct
    from coremltools.converters.mil import Builder as mb

    from toolchain.runtimes.mlprogram import Executor

    target = target or ct.target.iOS16
    program = mb.program(input_specs=[mb.TensorSpec(shape=s) for s in shapes],
                         opset_version=target)(function)
    model = ct.convert(program, convert_to="mlprogram", pass_pipeline=ct.PassPipeline.EMPTY,
                       compute_precision=ct.precision.FLOAT32, minimum_deployment_target=target,
                       skip_model_load=True)
    path = tmp_path / f"{name}.mlpackage"
    model.save(str(path))
    return Executor(ct.utils.load_spec(str(path)), path, compute_precision)


def images(shape=(BATCH, 4, 9, 9), seed=0, scale=1.0) -> np.ndarray:
    return (_rng(seed).standard_normal(shape) * scale).astype(np.float32)


def nhwc(x):
    return np.transpose(x, (0, 2, 3, 1))


def nchw(x):
    return np.transpose(np.asarray(x), (0, 3, 1, 2))


# --- convolution --------------------------------------------------------------------------------

def _tf_conv(x, w, bias, strides, dilations, pads, groups):
    """TensorFlow's conv2d / depthwise_conv2d with explicit (top, bottom), (left, right) pads."""
    import tensorflow as tf

    cout, cin_g, kh, kw = w.shape
    cin = x.shape[1]
    padding = [[0, 0], list(pads[0]), list(pads[1]), [0, 0]]
    if groups == cin and cin_g == 1:
        filters = w.reshape(cin, cout // cin, kh, kw).transpose(2, 3, 0, 1)
        y = tf.nn.depthwise_conv2d(tf.pad(nhwc(x), padding), filters, (1, *strides, 1), "VALID",
                                   dilations=dilations)
    else:
        step_in, step_out = cin // groups, cout // groups
        parts = [tf.nn.conv2d(nhwc(x)[..., g * step_in:(g + 1) * step_in],
                              w[g * step_out:(g + 1) * step_out].transpose(2, 3, 1, 0),
                              strides, padding, dilations=dilations) for g in range(groups)]
        y = tf.concat(parts, axis=-1)
    y = nchw(y)
    return y if bias is None else y + bias.reshape(1, -1, 1, 1)


def _same(size, kernel, stride, dilation, lower):
    """coremltools' aggregated_pad for "same", split with the odd cell at the end (or start)."""
    effective = (kernel - 1) * dilation + 1
    total = max(0, stride * -(-size // stride) - size + effective - stride)
    small, big = total // 2, total - total // 2
    return (big, small) if lower else (small, big)


def _pads(pad_type, custom, kernel, strides, dilations):
    """The ((top, bottom), (left, right)) padding MIL's pad_type means on a 9x9 input."""
    if pad_type == "custom":
        return (custom[0], custom[1]), (custom[2], custom[3])
    if pad_type == "valid":
        return (0, 0), (0, 0)
    return tuple(_same(9, k, s, d, pad_type == "same_lower")
                 for k, s, d in zip(kernel, strides, dilations))


CONV_CASES = {
    # name: (pad_type, custom pad, strides, dilations, groups, cout, kernel, bias)
    "valid": ("valid", None, (1, 1), (1, 1), 1, 6, (3, 3), True),
    "same-stride2-odd": ("same", None, (2, 2), (1, 1), 1, 6, (3, 3), True),
    "same_lower-stride2": ("same_lower", None, (2, 2), (1, 1), 1, 6, (4, 3), False),
    "custom-asymmetric": ("custom", (1, 0, 2, 1), (1, 2), (1, 1), 1, 5, (3, 3), True),
    "same-dilated": ("same", None, (1, 1), (2, 2), 1, 6, (3, 3), False),
    "groups2": ("valid", None, (1, 1), (1, 1), 2, 6, (3, 3), True),
    "depthwise-multiplier2": ("same", None, (2, 2), (1, 1), 4, 8, (3, 3), True),
    "depthwise-custom": ("custom", (0, 1, 0, 1), (2, 2), (1, 1), 4, 4, (3, 3), False),
    "pointwise": ("valid", None, (1, 1), (1, 1), 1, 7, (1, 1), True),
}


@pytest.mark.parametrize("case", CONV_CASES.values(), ids=CONV_CASES.keys())
def test_conv_matches_tensorflow(tmp_path, case):
    from coremltools.converters.mil import Builder as mb

    pad_type, custom, strides, dilations, groups, cout, kernel, with_bias = case
    rng = _rng(1)
    w = rng.standard_normal((cout, 4 // groups, *kernel)).astype(np.float32)
    bias = rng.standard_normal(cout).astype(np.float32) if with_bias else None
    extra = {"pad": list(custom)} if custom else {}
    if bias is not None:
        extra["bias"] = bias

    def program(x):
        return mb.conv(x=x, weight=w, pad_type=pad_type, strides=list(strides),
                       dilations=list(dilations), groups=groups, name="y", **extra)

    x = images()
    got = build(tmp_path, program).run({"x": x})["y"]
    pads = _pads(pad_type, custom, kernel, strides, dilations)
    want = _tf_conv(x, w, bias, strides, dilations, pads, groups)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, **TOL)


# --- pooling ------------------------------------------------------------------------------------

def _tf_pool(x, kind, kernel, strides, pads, exclude):
    """TF pooling over explicitly padded input; ``pads`` are ((t, b), (l, r)) per kind of cell:
    declared padding, then ``overhang`` cells (ceil mode) that never count."""
    import tensorflow as tf

    declared, overhang = pads
    full = [[0, 0], [declared[0][0], declared[0][1] + overhang[0]],
            [declared[1][0], declared[1][1] + overhang[1]], [0, 0]]
    if kind == "max":
        padded = tf.pad(nhwc(x), full, constant_values=-np.inf)
        return nchw(tf.nn.max_pool2d(padded, kernel, strides, "VALID"))
    window = kernel[0] * kernel[1]
    sums = tf.nn.avg_pool2d(tf.pad(nhwc(x), full), kernel, strides, "VALID") * window
    ones = np.ones((1, *x.shape[2:], 1), np.float32)
    # Cells that count: real ones, plus declared padding when padding is not excluded.
    counted = tf.pad(ones, full) if exclude else tf.pad(
        tf.pad(ones, [[0, 0], *declared, [0, 0]], constant_values=1.0),
        [[0, 0], [0, overhang[0]], [0, overhang[1]], [0, 0]])
    counts = tf.nn.avg_pool2d(counted, kernel, strides, "VALID") * window
    return nchw(sums / counts)


POOL_CASES = {
    # name: (kind, pad_type, pad, kernel, strides, exclude, ceil_mode, output hw, overhang)
    "max-same": ("max", "same", None, (3, 3), (2, 2), True, False, (5, 5), (0, 0)),
    "max-valid": ("max", "valid", None, (3, 2), (2, 1), True, False, (4, 8), (0, 0)),
    "avg-same-exclude": ("avg", "same", None, (3, 3), (1, 1), True, False, (9, 9), (0, 0)),
    "avg-same-include": ("avg", "same", None, (3, 3), (2, 2), False, False, (5, 5), (0, 0)),
    "avg-custom-include": ("avg", "custom", (1, 1, 0, 2), (2, 3), (2, 2), False, False,
                           (5, 5), (0, 0)),
    "max-ceil": ("max", "valid", None, (2, 2), (2, 2), True, True, (5, 5), (1, 1)),
    "avg-ceil-exclude": ("avg", "custom", (1, 1, 1, 1), (3, 3), (2, 2), True, True,
                         (5, 5), (1, 1)),
    "avg-ceil-include": ("avg", "custom", (1, 1, 1, 1), (3, 3), (2, 2), False, True,
                         (5, 5), (1, 1)),
}


@pytest.mark.parametrize("case", POOL_CASES.values(), ids=POOL_CASES.keys())
def test_pool_matches_tensorflow(tmp_path, case):
    from coremltools.converters.mil import Builder as mb

    kind, pad_type, custom, kernel, strides, exclude, ceil, out_hw, overhang = case
    extra = {"pad": list(custom)} if custom else {}
    if kind == "avg":
        extra["exclude_padding_from_average"] = exclude

    def program(x):
        op = mb.max_pool if kind == "max" else mb.avg_pool
        return op(x=x, kernel_sizes=list(kernel), strides=list(strides), pad_type=pad_type,
                  ceil_mode=ceil, name="y", **extra)

    x = images()
    got = build(tmp_path, program).run({"x": x})["y"]
    pads = _pads(pad_type, custom, kernel, strides, (1, 1))
    assert got.shape == (BATCH, 4, *out_hw)
    np.testing.assert_allclose(got, _tf_pool(x, kind, kernel, strides, (pads, overhang),
                                             exclude), **TOL)


# --- padding ------------------------------------------------------------------------------------

def _tf_pad(x, widths, mode, value):
    import tensorflow as tf

    if mode != "replicate":
        return tf.pad(x, widths, mode.upper(), constant_values=value).numpy()
    for axis, (before, after) in enumerate(widths):  # TF has no "edge" mode: clamped gathers
        index = np.clip(np.arange(-before, x.shape[axis] + after), 0, x.shape[axis] - 1)
        x = tf.gather(x, index, axis=axis)
    return np.asarray(x)


@pytest.mark.parametrize("mode", ["constant", "reflect", "replicate"])
@pytest.mark.parametrize("pad", [(1, 2, 0, 3), (0, 0, 0, 0, 2, 1, 1, 0)], ids=["hw", "all-axes"])
def test_pad_modes_match_tensorflow(tmp_path, mode, pad):
    from coremltools.converters.mil import Builder as mb

    extra = {"constant_val": np.float32(2.5)} if mode == "constant" else {}

    def program(x):
        return mb.pad(x=x, pad=np.int32(pad), mode=mode, name="y", **extra)

    x = images()
    got = build(tmp_path, program).run({"x": x})["y"]
    widths = [(0, 0)] * (4 - len(pad) // 2) + [pad[i:i + 2] for i in range(0, len(pad), 2)]
    np.testing.assert_array_equal(got, _tf_pad(x, widths, mode, 2.5))


# --- activations and elementwise ops ------------------------------------------------------------

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

    c = _rng(2).uniform(0.5, 2.0, (1, 4, 1, 1)).astype(np.float32)
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

    w = _rng(4).standard_normal((4, 4, 1, 1)).astype(np.float32)

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


# --- reductions, matmul, softmax, shapes --------------------------------------------------------

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


@pytest.mark.parametrize("transpose_x, transpose_y", [(False, False), (True, False),
                                                      (False, True), (True, True)])
def test_matmul_transposes_match_tensorflow(tmp_path, transpose_x, transpose_y):
    import tensorflow as tf
    from coremltools.converters.mil import Builder as mb

    rng = _rng(5)
    const = rng.standard_normal((4, 6) if transpose_y else (6, 4)).astype(np.float32)
    x_shape = (1, 6, 5) if transpose_x else (1, 5, 6)
    z_shape = (1, 3, 6) if transpose_y else (1, 6, 3)

    def program(x, z):
        return (mb.matmul(x=x, y=const, transpose_x=transpose_x, transpose_y=transpose_y,
                          name="const_y"),
                mb.matmul(x=x, y=z, transpose_x=transpose_x, transpose_y=transpose_y,
                          name="both"))

    x, z = images((BATCH, *x_shape[1:])), images((BATCH, *z_shape[1:]), seed=6)
    out = build(tmp_path, program, shapes=(x_shape, z_shape)).run({"x": x, "z": z})
    mm = tf.linalg.matmul
    np.testing.assert_allclose(out["const_y"], mm(x, np.broadcast_to(const, (BATCH, *const.shape)),
                                                  transpose_a=transpose_x,
                                                  transpose_b=transpose_y), **TOL)
    np.testing.assert_allclose(out["both"], mm(x, z, transpose_a=transpose_x,
                                               transpose_b=transpose_y), **TOL)


def test_linear_matches_tensorflow(tmp_path):
    import tensorflow as tf
    from coremltools.converters.mil import Builder as mb

    rng = _rng(7)
    weight = rng.standard_normal((5, 6)).astype(np.float32)
    bias = rng.standard_normal(5).astype(np.float32)
    x = images((BATCH, 6))
    got = build(tmp_path, lambda x: mb.linear(x=x, weight=weight, bias=bias, name="y"),
                shapes=((1, 6),)).run({"x": x})["y"]
    np.testing.assert_allclose(got, tf.matmul(x, weight, transpose_b=True) + bias, **TOL)


@pytest.mark.parametrize("axis", [1, -1, 2])
def test_softmax_axis_matches_tensorflow(tmp_path, axis):
    import tensorflow as tf
    from coremltools.converters.mil import Builder as mb

    x = images(scale=30.0)  # large logits: the stable form is needed
    got = build(tmp_path, lambda x: mb.softmax(x=x, axis=axis, name="y")).run({"x": x})["y"]
    np.testing.assert_allclose(got, tf.nn.softmax(x, axis=axis), **TOL)


def test_shape_ops_match_numpy(tmp_path):
    import tensorflow as tf
    from coremltools.converters.mil import Builder as mb

    def program(x, z):
        return (mb.concat(values=[x, z, x], axis=1, name="concat"),
                mb.concat(values=[x, z], axis=1, interleave=True, name="interleave"),
                mb.transpose(x=x, perm=[0, 2, 3, 1], name="transpose"),
                mb.reshape(x=x, shape=[1, -1], name="flatten"),
                mb.reshape(x=x, shape=[0, 0, 1, 81], name="inherit"),
                mb.squeeze(x=mb.reduce_mean(x=x, axes=[2, 3], keep_dims=True), axes=[2, 3],
                           name="squeeze"),
                mb.expand_dims(x=mb.reduce_mean(x=x, axes=[3]), axes=[-1, 2], name="expand"))

    x, z = images((BATCH, 4, 9, 9)), images((BATCH, 4, 9, 9), seed=8)
    out = build(tmp_path, program, shapes=((1, 4, 9, 9),) * 2).run({"x": x, "z": z})
    np.testing.assert_array_equal(out["concat"], tf.concat([x, z, x], axis=1))
    interleaved = np.stack([x, z], axis=2).reshape(BATCH, 8, 9, 9)  # x0 z0 x1 z1 ...
    np.testing.assert_array_equal(out["interleave"], interleaved)
    np.testing.assert_array_equal(out["transpose"], tf.transpose(x, [0, 2, 3, 1]))
    np.testing.assert_array_equal(out["flatten"], tf.reshape(x, [BATCH, -1]))
    np.testing.assert_array_equal(out["inherit"], tf.reshape(x, [BATCH, 4, 1, 81]))
    np.testing.assert_allclose(out["squeeze"], tf.reduce_mean(x, axis=[2, 3]), **TOL)
    np.testing.assert_allclose(out["expand"], x.mean(axis=3)[:, :, None, :, None], **TOL)


def test_ops_that_mix_the_batch_axis_run_image_by_image(tmp_path):
    """A program built for batch 1 that reduces or moves axis 0 still answers per image."""
    from coremltools.converters.mil import Builder as mb

    def program(x):
        return (mb.reduce_sum(x=x, axes=[0, 1], name="y"),
                mb.transpose(x=x, perm=[2, 0, 1, 3], name="t"),
                mb.relu(x=x, name="r"))

    x = images()
    out = build(tmp_path, program).run({"x": x})
    np.testing.assert_allclose(out["y"], x.sum(axis=1), **TOL)  # (N, 9, 9): one per image
    np.testing.assert_array_equal(out["t"], x[:, None].transpose(0, 3, 1, 2, 4))  # (N, 9, 1, 4, 9)
    np.testing.assert_array_equal(out["r"], np.maximum(x, 0))  # (N, 4, 9, 9): batch axis kept


def test_large_batches_run_in_blocks_with_the_same_result(tmp_path):
    """64 channels of 128x128 (4 MiB an image): 5 images go through in blocks."""
    import tensorflow as tf
    from coremltools.converters.mil import Builder as mb

    w = _rng(9).standard_normal((64, 3, 3, 3)).astype(np.float32)
    executor = build(tmp_path, lambda x: mb.reduce_mean(
        x=mb.relu(x=mb.conv(x=x, weight=w, pad_type="same")), axes=[2, 3], name="y"),
        shapes=((1, 3, 128, 128),))
    x = images((5, 3, 128, 128))
    assert executor.plan.block < 5
    want = tf.reduce_mean(tf.nn.relu(tf.nn.conv2d(nhwc(x), w.transpose(2, 3, 1, 0), 1, "SAME")),
                          axis=[1, 2])
    np.testing.assert_allclose(executor.run({"x": x})["y"], want, rtol=1e-5, atol=1e-5)


# --- stored precisions: float16 and 8-bit weights ----------------------------------------------

@pytest.mark.parametrize("size", [4, 600], ids=["immediate", "blob-file"])
def test_float16_constants_decode_exactly(tmp_path, size):
    from coremltools.converters.mil import Builder as mb

    values = (_rng(10).standard_normal((1, size)) * 100).astype(np.float16)

    def program(x):
        return mb.cast(x=mb.add(x=mb.cast(x=x, dtype="fp16"), y=values), dtype="fp32", name="y")

    got = build(tmp_path, program, shapes=((1, size),)).run({"x": np.zeros((2, size))})["y"]
    np.testing.assert_array_equal(got, np.broadcast_to(values.astype(np.float32), (2, size)))


def test_float16_ops_round_like_float16(tmp_path):
    """A float16 program's conv rounds its input, weights and output to float16."""
    from coremltools.converters.mil import Builder as mb

    w = _rng(11).standard_normal((6, 4, 3, 3)).astype(np.float16)

    def program(x):
        return mb.cast(x=mb.relu(x=mb.conv(x=mb.cast(x=x, dtype="fp16"), weight=w)),
                       dtype="fp32", name="y")

    x = images(scale=3.0)
    got = build(tmp_path, program).run({"x": x})["y"]
    x16 = x.astype(np.float16).astype(np.float32)
    want = np.maximum(_tf_conv(x16, w.astype(np.float32), None, (1, 1), (1, 1),
                               ((0, 0), (0, 0)), 1), 0)
    np.testing.assert_array_equal(got, got.astype(np.float16).astype(np.float32))
    np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-3)
    assert np.abs(got - want).max() > 0  # rounded, not float32


def test_int8_affine_dequantize_iOS16(tmp_path):
    from coremltools.converters.mil import Builder as mb

    rng = _rng(12)
    q = rng.integers(-128, 128, (6, 4, 3, 3), dtype=np.int8)
    zero = rng.integers(-5, 5, 6, dtype=np.int8)
    scale = rng.uniform(0.001, 0.02, 6).astype(np.float32)

    def program(x):
        weight = mb.constexpr_affine_dequantize(quantized_data=q, zero_point=zero, scale=scale,
                                                axis=0)
        return mb.conv(x=x, weight=weight, name="y")

    x = images()
    got = build(tmp_path, program).run({"x": x})["y"]
    w = (q.astype(np.float32) - zero.reshape(6, 1, 1, 1)) * scale.reshape(6, 1, 1, 1)
    np.testing.assert_allclose(got, _tf_conv(x, w, None, (1, 1), (1, 1), ((0, 0), (0, 0)), 1),
                               **TOL)


def test_int8_dequantize_iOS17(tmp_path):
    import coremltools as ct
    from coremltools.converters.mil import Builder as mb

    rng = _rng(13)
    q = rng.integers(-128, 128, (5, 6), dtype=np.int8)
    scale = rng.uniform(0.01, 0.1, 6).astype(np.float32)

    def program(x):
        y = mb.dequantize(input=q, scale=scale, zero_point=zero, axis=1)
        return mb.matmul(x=x, y=y, name="y")

    zero = rng.integers(-3, 3, 6, dtype=np.int8)
    x = images((BATCH, 5))
    got = build(tmp_path, program, shapes=((1, 5),), target=ct.target.iOS17).run({"x": x})["y"]
    np.testing.assert_allclose(got, x @ ((q.astype(np.float32) - zero) * scale), **TOL)


def test_blockwise_shift_scale_iOS18(tmp_path):
    import coremltools as ct
    from coremltools.converters.mil import Builder as mb

    rng = _rng(14)
    data = rng.integers(-128, 128, (6, 4, 3, 3), dtype=np.int8)
    scale = rng.uniform(0.001, 0.02, (3, 2, 1, 1)).astype(np.float32)  # blocks of 2 x 2
    offset = rng.integers(-4, 4, (3, 2, 1, 1), dtype=np.int8)

    def program(x):
        weight = mb.constexpr_blockwise_shift_scale(data=data, scale=scale, offset=offset)
        return mb.conv(x=x, weight=weight, name="y")

    x = images()
    got = build(tmp_path, program, target=ct.target.iOS18).run({"x": x})["y"]
    def full(v):  # each scale / offset covers 2 output x 2 input channels
        return np.repeat(np.repeat(v, 2, axis=0), 2, axis=1).astype(np.float32)
    w = (data.astype(np.float32) - full(offset)) * full(scale)
    np.testing.assert_allclose(got, _tf_conv(x, w, None, (1, 1), (1, 1), ((0, 0), (0, 0)), 1),
                               **TOL)


# --- errors -------------------------------------------------------------------------------------

def test_unimplemented_op_is_named(tmp_path):
    from coremltools.converters.mil import Builder as mb

    with pytest.raises(UnsupportedLayer, match=r"op type 'erf' \(op 'my_erf'\)"):
        build(tmp_path, lambda x: mb.relu(x=mb.erf(x=x, name="my_erf")))


def test_runtime_pad_amounts_are_unsupported_not_guessed(tmp_path):
    from coremltools.converters.mil import Builder as mb

    def program(x):
        amounts = mb.reshape(x=mb.cast(x=x, dtype="int32"), shape=[8])
        return mb.pad(x=mb.reshape(x=x, shape=[1, 1, 2, 4]), pad=amounts, name="y")

    with pytest.raises(UnsupportedLayer, match=r"'pad' \(a runtime 'pad'\) \(op 'y'\)"):
        build(tmp_path, program, shapes=((1, 8),))


def test_results_must_have_the_declared_shapes(tmp_path):
    """Semantics that disagree with coremltools' shape inference fail loudly, never silently."""
    import coremltools as ct
    from coremltools.converters.mil import Builder as mb

    from toolchain.runtimes.mlprogram import Executor

    w = _rng(15).standard_normal((2, 4, 3, 3)).astype(np.float32)
    build(tmp_path, lambda x: mb.conv(x=x, weight=w, pad_type="same", name="y"))
    path = tmp_path / "model.mlpackage"
    spec = ct.utils.load_spec(str(path))
    function = spec.mlProgram.functions["main"]
    (conv,) = [op for op in function.block_specializations[function.opset].operations
               if op.type == "conv"]
    conv.outputs[0].type.tensorType.dimensions[2].constant.size = 7  # as if "same" were "valid"
    with pytest.raises(ModelError, match=r"op 'y' \(conv\) computed shape \(3, 2, 9, 9\), "
                                         r"the program declares \(1, 2, 7, 9\)"):
        Executor(spec, path).run({"x": images()})


def test_compute_precision_is_validated(tmp_path):
    from coremltools.converters.mil import Builder as mb

    with pytest.raises(UsageError, match="compute precision 'float64'"):
        build(tmp_path, lambda x: mb.relu(x=x, name="y"), compute_precision="float64")


# --- whole models -------------------------------------------------------------------------------

def _pixels(size: int, count: int = 6) -> np.ndarray:
    return _rng(20).integers(0, 256, (count, size, size, 3), dtype=np.uint8)


def _tempered(source):
    """The Source with its head's weights scaled so logits spread over about 4 (not 1000)."""
    import tensorflow as tf

    model = source.keras_model
    backbone, head = model.layers[-2], model.layers[-1]
    features = backbone(source.preprocessing.apply(_pixels(source.input_size)),
                        training=False).numpy()
    kernel, bias = head.get_weights()
    spread = float(np.median(np.ptp(features @ kernel, axis=1)))
    inputs = tf.keras.Input(shape=model.input_shape[1:], name="image")
    new_head = tf.keras.layers.Dense(len(source.labels), activation="softmax",
                                     name="final_result")
    tempered = tf.keras.Model(inputs, new_head(backbone(inputs, training=False)),
                              name=model.name)
    new_head.set_weights([kernel * (4.0 / spread), bias])
    return dataclasses.replace(source, keras_model=tempered)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """``exported(arch, precision)`` → (path, tempered Source), each exported once."""
    from targets import ArtifactMetadata
    from targets.coreml import CoreMLOptions, CoreMLTarget

    done = {}

    def get(arch: str, precision: str = "float32"):
        if (arch, precision) not in done:
            source = done.get(arch) or _tempered(make_source(arch))
            done[arch] = source
            options = CoreMLOptions("mlprogram", precision)
            path = tmp_path_factory.mktemp(f"{arch}-{precision}") / "model.mlpackage"
            CoreMLTarget().export(source, options, ArtifactMetadata(), path)
            done[arch, precision] = path
        return done[arch, precision], done[arch]

    return get


def _keras(source, pixels):
    return source.keras_model.predict(source.preprocessing.apply(pixels), verbose=0)


@pytest.mark.slow
@pytest.mark.parametrize("arch", FAMILY_ARCHS)
def test_whole_model_float32_matches_keras(exported, arch):
    from toolchain import runtimes

    path, source = exported(arch)
    executor = runtimes.load(path)
    assert (executor.labels, executor.input_size, executor.color, executor.input_name) == (
        LABELS, source.input_size, "RGB", "image")
    pixels = _pixels(source.input_size)
    want = _keras(source, pixels)
    assert want.max() < 0.99  # not saturated: the comparison means something
    got = executor.predict(pixels)
    assert got.dtype == np.float32 and got.shape == (6, len(LABELS))
    assert np.abs(got - want).max() <= 1e-4
    outputs = executor.run({"image": pixels.transpose(0, 3, 1, 2).astype(np.float32)})
    assert list(outputs["classLabel"]) == [LABELS[i] for i in want.argmax(axis=1)]


@pytest.mark.slow
@pytest.mark.parametrize("precision, tolerance", [("float16", 1e-2), ("int8", 4e-2)])
def test_quantized_models_stay_close_to_keras(exported, precision, tolerance):
    """Measured here: float16 2.5e-3, int8 2.5e-2 (random weights quantize coarsely)."""
    from toolchain import runtimes

    path, source = exported(SMALL, precision)
    pixels = _pixels(source.input_size)
    got, want = runtimes.load(path).predict(pixels), _keras(source, pixels)
    assert 1e-4 < np.abs(got - want).max() <= tolerance  # quantized (not float32), yet close
    assert (got.argmax(axis=1) == want.argmax(axis=1)).all()


@pytest.mark.slow
def test_float16_compute_emulation(exported):
    from toolchain import runtimes

    path, source = exported(SMALL)
    pixels = _pixels(source.input_size)
    want = _keras(source, pixels)
    exact = runtimes.load(path).predict(pixels)
    half = runtimes.load(path, compute_precision="float16").predict(pixels)
    assert np.abs(half - exact).max() > 1e-5  # rounding happened
    assert np.abs(half - want).max() <= 1e-2


@pytest.mark.slow
def test_bgr_models_get_their_channels_swapped(exported):
    import coremltools as ct

    from toolchain.runtimes.mlprogram import Executor

    path, source = exported(SMALL)
    spec = ct.utils.load_spec(str(path))
    image = spec.description.input[0].type.imageType
    rgb = Executor(spec, path)
    image.colorSpace = image.BGR
    bgr = Executor(spec, path)
    assert bgr.color == "BGR"
    pixels = _pixels(source.input_size, 2)
    np.testing.assert_array_equal(bgr.predict(pixels), rgb.predict(pixels[..., ::-1]))
    assert np.abs(bgr.predict(pixels) - rgb.predict(pixels)).max() > 1e-4
    with pytest.raises(ModelError, match=r"\(N, 96, 96, 3\)"):
        rgb.predict(pixels[:, :64])

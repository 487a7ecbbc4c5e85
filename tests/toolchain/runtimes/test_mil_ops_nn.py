"""ML Program ops of neural-network layers (``mil_ops_nn``) against TensorFlow: conv (every
pad_type, groups, depthwise, dilation), max / avg pooling (ceil_mode, padding in or out of the
average), pad modes, matmul transposes, linear, softmax.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.toolchain.runtimes.mil_helpers import (
    BATCH,
    TOL,
    build,
    images,
    nchw,
    nhwc,
    seeded,
    tf_conv,
)

# --- convolution ------------------------------------------------------------------------------

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
    rng = seeded(1)
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
    want = tf_conv(x, w, bias, strides, dilations, pads, groups)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, **TOL)


# --- pooling ----------------------------------------------------------------------------------

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


# --- padding ----------------------------------------------------------------------------------

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


# --- matmul, linear, softmax ------------------------------------------------------------------

@pytest.mark.parametrize("transpose_x, transpose_y", [(False, False), (True, False),
                                                      (False, True), (True, True)])
def test_matmul_transposes_match_tensorflow(tmp_path, transpose_x, transpose_y):
    import tensorflow as tf
    from coremltools.converters.mil import Builder as mb

    rng = seeded(5)
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

    rng = seeded(7)
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

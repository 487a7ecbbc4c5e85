"""The shared NumPy kernels (``toolchain.runtimes.kernels``) against TensorFlow's own ops.

Every kernel runs on random NCHW input and is compared with the equivalent TensorFlow op on the
same data (TF works in NHWC: inputs and outputs are transposed around it). Padding is where
implementations usually disagree, so SAME and VALID, odd and even sizes, strides 1 and 2 and
dilation are all covered.
"""

from __future__ import annotations

import numpy as np
import pytest

from toolchain.errors import ModelError
from toolchain.runtimes import kernels

RNG = np.random.default_rng(0)
RTOL, ATOL = 1e-5, 1e-5


def _random(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


def _nhwc(x):
    return np.transpose(x, (0, 2, 3, 1))


def _nchw(y):
    return np.transpose(np.asarray(y), (0, 3, 1, 2))


def _close(actual, expected, rtol=RTOL, atol=ATOL):
    assert actual.dtype == np.float32
    assert actual.shape == expected.shape
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol)


def _pads(padding, size_hw, kernel_hw, strides, dilations=(1, 1)):
    if padding == "VALID":
        return ((0, 0), (0, 0))
    return kernels.same_pads(size_hw, kernel_hw, strides, dilations)


@pytest.mark.parametrize("padding", ["SAME", "VALID"])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("size, kernel", [(9, 3), (10, 3), (8, 1), (11, (1, 7)), (7, 5)])
def test_dense_conv2d_matches_tf(padding, stride, size, kernel):
    import tensorflow as tf

    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    x, w, b = _random(3, 5, size, size + 1), _random(6, 5, kh, kw), _random(6)
    pads = _pads(padding, (size, size + 1), (kh, kw), (stride, stride))
    got = kernels.conv2d(x, w, b, strides=(stride, stride), pads=pads)
    want = tf.nn.conv2d(_nhwc(x), np.transpose(w, (2, 3, 1, 0)), stride, padding) + b
    _close(got, _nchw(want))


@pytest.mark.parametrize("padding", ["SAME", "VALID"])
@pytest.mark.parametrize("dilation", [2, 3])
def test_dilated_conv2d_matches_tf(padding, dilation):
    import tensorflow as tf

    x, w = _random(2, 4, 13, 12), _random(3, 4, 3, 3)
    pads = _pads(padding, (13, 12), (3, 3), (1, 1), (dilation, dilation))
    got = kernels.conv2d(x, w, dilations=(dilation, dilation), pads=pads)
    want = tf.nn.conv2d(_nhwc(x), np.transpose(w, (2, 3, 1, 0)), 1, padding,
                        dilations=dilation)
    _close(got, _nchw(want))


@pytest.mark.parametrize("padding", ["SAME", "VALID"])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("multiplier", [1, 2])
def test_depthwise_conv2d_matches_tf(padding, stride, multiplier):
    import tensorflow as tf

    cin, size = 6, 10
    x, b = _random(3, cin, size, size - 1), _random(cin * multiplier)
    # Core ML layout (Cout, 1, kh, kw), output channel c*m + j reads input channel c.
    w = _random(cin * multiplier, 1, 3, 3)
    pads = _pads(padding, (size, size - 1), (3, 3), (stride, stride))
    got = kernels.conv2d(x, w, b, strides=(stride, stride), pads=pads, groups=cin)
    tf_w = np.transpose(w.reshape(cin, multiplier, 3, 3), (2, 3, 0, 1))  # kh, kw, Cin, m
    want = tf.nn.depthwise_conv2d(_nhwc(x), tf_w, (1, stride, stride, 1), padding) + b
    _close(got, _nchw(want))


@pytest.mark.parametrize("stride", [1, 2])
def test_depthwise_conv2d_in_many_cache_blocks_matches_tf(monkeypatch, stride):
    import tensorflow as tf

    # About 2 planes per block, with a shorter last block: 2 images x 5 channels = 10 planes.
    monkeypatch.setattr(kernels, "BLOCK_FLOATS", 3 * 11 * 11)
    x, w = _random(2, 5, 11, 11), _random(5, 1, 3, 3)
    pads = kernels.same_pads((11, 11), (3, 3), (stride, stride))
    got = kernels.conv2d(x, w, strides=(stride, stride), pads=pads, groups=5)
    want = tf.nn.depthwise_conv2d(_nhwc(x), np.transpose(w, (2, 3, 0, 1)),
                                  (1, stride, stride, 1), "SAME")
    _close(got, _nchw(want))


def test_dilated_depthwise_conv2d_matches_tf():
    import tensorflow as tf

    x, w = _random(2, 4, 12, 12), _random(4, 1, 3, 3)
    pads = kernels.same_pads((12, 12), (3, 3), (1, 1), (2, 2))
    got = kernels.conv2d(x, w, dilations=(2, 2), pads=pads, groups=4)
    want = tf.nn.depthwise_conv2d(_nhwc(x), np.transpose(w, (2, 3, 0, 1)), (1, 1, 1, 1),
                                  "SAME", dilations=(2, 2))
    _close(got, _nchw(want))


@pytest.mark.parametrize("stride", [1, 2])
def test_grouped_conv2d_matches_tf_per_group(stride):
    import tensorflow as tf

    groups, x, w = 3, _random(2, 6, 9, 9), _random(9, 2, 3, 3)
    pads = kernels.same_pads((9, 9), (3, 3), (stride, stride))
    got = kernels.conv2d(x, w, strides=(stride, stride), pads=pads, groups=groups)
    parts = [tf.nn.conv2d(_nhwc(x[:, 2 * g:2 * g + 2]),
                          np.transpose(w[3 * g:3 * g + 3], (2, 3, 1, 0)), stride, "SAME")
             for g in range(groups)]
    _close(got, _nchw(tf.concat(parts, axis=-1)))


def test_asymmetric_explicit_padding_matches_tf():
    import tensorflow as tf

    x, w = _random(2, 3, 8, 8), _random(4, 3, 3, 3)
    pads = ((2, 0), (1, 3))
    got = kernels.conv2d(x, w, strides=(2, 1), pads=pads)
    want = tf.nn.conv2d(_nhwc(x), np.transpose(w, (2, 3, 1, 0)), (2, 1),
                        [[0, 0], [2, 0], [1, 3], [0, 0]])
    _close(got, _nchw(want))


def test_conv2d_rejects_weights_that_do_not_fit():
    with pytest.raises(ModelError, match="groups"):
        kernels.conv2d(_random(1, 4, 5, 5), _random(4, 3, 3, 3), groups=2)


@pytest.mark.parametrize("size, kernel, stride, dilation, lower, expected", [
    ((224, 224), (3, 3), (2, 2), (1, 1), False, ((0, 1), (0, 1))),
    ((224, 224), (3, 3), (2, 2), (1, 1), True, ((1, 0), (1, 0))),
    ((7, 8), (3, 3), (1, 1), (1, 1), False, ((1, 1), (1, 1))),
    ((7, 7), (1, 1), (2, 2), (1, 1), False, ((0, 0), (0, 0))),
    ((10, 10), (3, 3), (1, 1), (2, 2), False, ((2, 2), (2, 2))),
    ((5, 6), (5, 2), (1, 1), (1, 1), False, ((2, 2), (0, 1))),
])
def test_same_pads(size, kernel, stride, dilation, lower, expected):
    assert kernels.same_pads(size, kernel, stride, dilation, lower) == expected


@pytest.mark.parametrize("padding", ["SAME", "VALID"])
@pytest.mark.parametrize("kind", ["max", "avg"])
@pytest.mark.parametrize("size, kernel, stride", [(9, 3, 2), (10, 3, 2), (8, 2, 2), (7, 3, 1),
                                                  (6, 5, 1)])
def test_pool2d_matches_tf(padding, kind, size, kernel, stride):
    import tensorflow as tf

    x = _random(3, 4, size, size + 1)
    pads = _pads(padding, (size, size + 1), (kernel, kernel), (stride, stride))
    got = kernels.pool2d(x, kind, (kernel, kernel), (stride, stride), pads)
    op = tf.nn.max_pool2d if kind == "max" else tf.nn.avg_pool2d
    _close(got, _nchw(op(_nhwc(x), kernel, stride, padding)))


def test_avg_pool_including_padding_divides_by_window_size():
    x = np.ones((1, 1, 3, 3), np.float32)
    got = kernels.pool2d(x, "avg", (3, 3), (1, 1), ((1, 1), (1, 1)), exclude_padding=False)
    # The corner window sees 4 real ones out of 9 cells, an edge 6, the centre 9.
    np.testing.assert_allclose(got[0, 0], np.float32([[4, 6, 4], [6, 9, 6], [4, 6, 4]]) / 9)
    excluded = kernels.pool2d(x, "avg", (3, 3), (1, 1), ((1, 1), (1, 1)))
    np.testing.assert_allclose(excluded, np.ones_like(x))


def test_max_pool_ignores_padding_of_negative_inputs():
    x = -np.abs(_random(1, 2, 4, 4)) - 1
    got = kernels.pool2d(x, "max", (3, 3), (1, 1), ((1, 1), (1, 1)))
    assert (got < 0).all()  # zero padding would have won every window


@pytest.mark.parametrize("mode, tf_mode", [("constant", "CONSTANT"), ("reflect", "REFLECT")])
def test_pad_matches_tf(mode, tf_mode):
    import tensorflow as tf

    x = _random(2, 3, 5, 6)
    pads = ((0, 0), (1, 2), (3, 1), (0, 4))
    _close(kernels.pad(x, pads, mode), np.asarray(tf.pad(x, pads, tf_mode)))


def test_constant_pad_value():
    got = kernels.pad(np.zeros((1, 2), np.float32), ((1, 0), (0, 1)), value=7.5)
    np.testing.assert_array_equal(got, np.float32([[7.5, 7.5, 7.5], [0, 0, 7.5]]))


def test_replicate_pad_repeats_the_edge():
    import tensorflow as tf

    x = _random(2, 3, 5, 6)
    pads = ((0, 0), (0, 0), (2, 1), (3, 0))
    got = kernels.pad(x, pads, "replicate")
    _close(got, np.pad(x, pads, mode="edge"))
    # TF has no edge mode; SYMMETRIC padding by one repeats the edge cell once, the same thing.
    one = ((0, 0), (0, 0), (1, 1), (1, 1))
    _close(kernels.pad(x, one, "replicate"), np.asarray(tf.pad(x, one, "SYMMETRIC")))
    assert got[0, 0, 0, 0] == x[0, 0, 0, 0] and got[0, 0, -1, -1] == x[0, 0, -1, -1]


def test_pad_rejects_bad_arguments():
    with pytest.raises(ModelError, match="mode"):
        kernels.pad(_random(2, 2), ((1, 1), (1, 1)), "wrap")
    with pytest.raises(ModelError, match="pairs"):
        kernels.pad(_random(2, 2), ((1, 1),))
    with pytest.raises(ModelError, match="reflection"):
        kernels.pad(_random(2, 2), ((0, 0), (2, 0)), "reflect")


@pytest.mark.parametrize("axis", [0, 1, -1])
def test_softmax_matches_tf(axis):
    import tensorflow as tf

    x = _random(4, 7, 5) * 30  # large logits: the naive exp would overflow
    x[0, 0, 0] = 500
    got = kernels.softmax(x, axis)
    _close(got, np.asarray(tf.nn.softmax(x, axis=axis)), atol=1e-6)
    np.testing.assert_allclose(got.sum(axis=axis), 1.0, rtol=1e-6)


def test_to_float32():
    got = kernels.to_float32([[1, 2], [3, 4]])
    assert got.dtype == np.float32 and got.flags.c_contiguous
    x = _random(3, 3)
    assert kernels.to_float32(x) is x

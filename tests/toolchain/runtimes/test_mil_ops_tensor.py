"""ML Program ops that shape or supply tensors (``mil_ops_tensor``): shape ops against NumPy
and TensorFlow, and the stored precisions of constants: float16 values decoded exactly, int8
weights dequantized as iOS 16 (constexpr_affine_dequantize), iOS 17 (dequantize) and iOS 18
(constexpr_blockwise_shift_scale) define them.
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
    tf_conv,
)


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


@pytest.mark.parametrize("labels", [("cat", "dog", "emu", "yak"), (7, 3, 5, 1)],
                         ids=["strings", "integers"])
def test_classify_labels_and_probabilities(tmp_path, labels):
    import tensorflow as tf
    from coremltools.converters.mil import Builder as mb

    executor = build(tmp_path, lambda x: mb.softmax(x=x, axis=-1, name="probs"),
                     shapes=((1, 4),), labels=labels)
    assert executor.labels == tuple(str(label) for label in labels)
    x = images((5, 4), scale=3.0)
    out = executor.run({"x": x})
    want = np.asarray(tf.nn.softmax(x, axis=-1))
    np.testing.assert_allclose(out[executor.probabilities_name], want, **TOL)
    assert list(out["classLabel"]) == [str(labels[i]) for i in want.argmax(axis=1)]


# --- stored precisions: float16 and 8-bit weights ---------------------------------------------

@pytest.mark.parametrize("size", [4, 600], ids=["immediate", "blob-file"])
def test_float16_constants_decode_exactly(tmp_path, size):
    from coremltools.converters.mil import Builder as mb

    values = (seeded(10).standard_normal((1, size)) * 100).astype(np.float16)

    def program(x):
        return mb.cast(x=mb.add(x=mb.cast(x=x, dtype="fp16"), y=values), dtype="fp32", name="y")

    got = build(tmp_path, program, shapes=((1, size),)).run({"x": np.zeros((2, size))})["y"]
    np.testing.assert_array_equal(got, np.broadcast_to(values.astype(np.float32), (2, size)))


def test_constexpr_cast_float16_weights_iOS16(tmp_path):
    from coremltools.converters.mil import Builder as mb

    values = (seeded(16).standard_normal((1, 4, 1, 1)) * 10).astype(np.float16)

    def program(x):
        return mb.mul(x=x, y=mb.constexpr_cast(source_val=values, output_dtype="fp32"),
                      name="y")

    x = images()
    got = build(tmp_path, program).run({"x": x})["y"]
    np.testing.assert_array_equal(got, x * values.astype(np.float32))


def test_int8_affine_dequantize_iOS16(tmp_path):
    from coremltools.converters.mil import Builder as mb

    rng = seeded(12)
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
    np.testing.assert_allclose(got, tf_conv(x, w, None, (1, 1), (1, 1), ((0, 0), (0, 0)), 1),
                               **TOL)


def test_int8_dequantize_iOS17(tmp_path):
    import coremltools as ct
    from coremltools.converters.mil import Builder as mb

    rng = seeded(13)
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

    rng = seeded(14)
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
    np.testing.assert_allclose(got, tf_conv(x, w, None, (1, 1), (1, 1), ((0, 0), (0, 0)), 1),
                               **TOL)

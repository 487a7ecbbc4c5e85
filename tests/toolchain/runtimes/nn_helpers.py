"""Helpers of the NeuralNetwork executor tests: one-layer specs and their comparison.

Core ML itself does not run on Linux, so the reference is TensorFlow (or NumPy where TF has no
such op) on the same random data. Each layer test builds a small spec with coremltools'
NeuralNetworkBuilder (ND shape mapping), runs N examples at once through the executor (the
batch axis must never mix them) and compares every output with the reference.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np

from toolchain.runtimes.neuralnetwork import Executor

RNG = np.random.default_rng(1)
N = 3  # examples per batch in layer tests: the batch axis must never mix them
ATOL, RTOL = 2e-5, 1e-5


def random(*shape, low=None):
    x = RNG.standard_normal(shape).astype(np.float32)
    return np.abs(x) + low if low is not None else x


def network(inputs: dict, build, outputs=("y",), rank5=False):
    """A NeuralNetwork spec with the given inputs and layers: ND shape mapping, or (``rank5``)
    the legacy mapping of (C, H, W) inputs to rank-5 blobs (Seq, Batch, C, H, W)."""
    from coremltools.models import datatypes
    from coremltools.models.neural_network import NeuralNetworkBuilder

    builder = NeuralNetworkBuilder([(name, datatypes.Array(*shape)) for name, shape in
                                    inputs.items()], [(name, None) for name in outputs],
                                   disable_rank5_shape_mapping=not rank5)
    build(builder)
    return builder.spec


def run(spec, feeds, precision="float32", output="y"):
    return Executor(spec, Path("layer.mlmodel"), precision).run(feeds)[output]


def nhwc(x):
    return np.transpose(x, (0, 2, 3, 1))


def nchw(y):
    return np.transpose(np.asarray(y), (0, 3, 1, 2))


def close(actual, expected, atol=ATOL, rtol=RTOL):
    actual = np.asarray(actual)
    assert actual.dtype == np.float32
    assert actual.shape == np.shape(expected)
    np.testing.assert_allclose(actual, expected, atol=atol, rtol=rtol)


def tf_conv(x, w_hwio, groups, stride, padding, dilation=1):
    """TF reference; groups as one conv per group (TF's CPU kernels lack grouped conv)."""
    import tensorflow as tf

    cin, cout = x.shape[1] // groups, w_hwio.shape[-1] // groups
    parts = [tf.nn.conv2d(nhwc(x[:, g * cin:(g + 1) * cin]), w_hwio[..., g * cout:(g + 1) * cout],
                          stride, padding, dilations=dilation) for g in range(groups)]
    return nchw(tf.concat(parts, axis=-1))


def quantize(spec, nbits, mode):
    import coremltools as ct
    from coremltools.models.neural_network import quantization_utils

    with contextlib.redirect_stdout(io.StringIO()):  # quantize_weights prints every layer
        return quantization_utils.quantize_weights(ct.models.MLModel(spec), nbits=nbits,
                                                   quantization_mode=mode).get_spec()

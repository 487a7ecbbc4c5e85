"""Helpers of the ML Program executor tests: one-op programs and their references.

Op level: small programs built with coremltools' MIL builder, saved as real ``.mlpackage``s
(weights in the blob file like any converted model), run through the executor with a batch of
images and compared with the same computation in TensorFlow.
"""

from __future__ import annotations

import numpy as np

SMALL = "mobilenet_v3_small_96"
BATCH = 3  # op-level programs declare batch 1 and run 3 images at once
TOL = {"rtol": 1e-5, "atol": 1e-5}


def seeded(seed: int = 0):
    return np.random.default_rng(seed)


def build(tmp_path, function, shapes=((1, 4, 9, 9),), target=None, name="model",
          compute_precision="float32", labels=None):
    """An Executor for the MIL function ``function`` saved as an .mlpackage (no graph passes,
    so the ops under test reach the file as written); with ``labels``, a classifier of them
    (coremltools adds the classify op to the program's output)."""
    import coremltools as ct
    from coremltools.converters.mil import Builder as mb

    from toolchain.runtimes.mlprogram import Executor

    target = target or ct.target.iOS16
    program = mb.program(input_specs=[mb.TensorSpec(shape=s) for s in shapes],
                         opset_version=target)(function)
    model = ct.convert(program, convert_to="mlprogram", pass_pipeline=ct.PassPipeline.EMPTY,
                       compute_precision=ct.precision.FLOAT32, minimum_deployment_target=target,
                       skip_model_load=True,
                       classifier_config=ct.ClassifierConfig(list(labels)) if labels else None)
    path = tmp_path / f"{name}.mlpackage"
    model.save(str(path))
    return Executor(ct.utils.load_spec(str(path)), path, compute_precision)


def images(shape=(BATCH, 4, 9, 9), seed=0, scale=1.0) -> np.ndarray:
    return (seeded(seed).standard_normal(shape) * scale).astype(np.float32)


def nhwc(x):
    return np.transpose(x, (0, 2, 3, 1))


def nchw(x):
    return np.transpose(np.asarray(x), (0, 3, 1, 2))


def tf_conv(x, w, bias, strides, dilations, pads, groups):
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

"""The ML Program executor (``toolchain.runtimes.mlprogram``) as a whole.

Batching (programs that mix the batch axis, blocks of a large batch), float16 programs, errors;
and whole models: every backbone family exported with the Core ML target and compared with
Keras on the same images. The heads of those models are tempered (weights scaled) so that the
probabilities are not saturated: with random backbone weights some families give logits
hundreds apart, and a comparison of one-hot probabilities would prove nothing. The ops have
their own tests (``test_mil_ops_*``).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from tests.helpers import FAMILY_ARCHS, LABELS, make_source
from tests.toolchain.runtimes.mil_helpers import (
    SMALL,
    TOL,
    build,
    images,
    nhwc,
    seeded,
    tf_conv,
)
from toolchain.errors import ModelError, UnsupportedLayer, UsageError

# --- batching ---------------------------------------------------------------------------------

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

    w = seeded(9).standard_normal((64, 3, 3, 3)).astype(np.float32)
    executor = build(tmp_path, lambda x: mb.reduce_mean(
        x=mb.relu(x=mb.conv(x=x, weight=w, pad_type="same")), axes=[2, 3], name="y"),
        shapes=((1, 3, 128, 128),))
    x = images((5, 3, 128, 128))
    assert executor.plan.block < 5
    want = tf.reduce_mean(tf.nn.relu(tf.nn.conv2d(nhwc(x), w.transpose(2, 3, 1, 0), 1, "SAME")),
                          axis=[1, 2])
    np.testing.assert_allclose(executor.run({"x": x})["y"], want, rtol=1e-5, atol=1e-5)


# --- float16 programs -------------------------------------------------------------------------

def test_float16_ops_round_like_float16(tmp_path):
    """A float16 program's conv rounds its input, weights and output to float16."""
    from coremltools.converters.mil import Builder as mb

    w = seeded(11).standard_normal((6, 4, 3, 3)).astype(np.float16)

    def program(x):
        return mb.cast(x=mb.relu(x=mb.conv(x=mb.cast(x=x, dtype="fp16"), weight=w)),
                       dtype="fp32", name="y")

    x = images(scale=3.0)
    got = build(tmp_path, program).run({"x": x})["y"]
    x16 = x.astype(np.float16).astype(np.float32)
    want = np.maximum(tf_conv(x16, w.astype(np.float32), None, (1, 1), (1, 1),
                               ((0, 0), (0, 0)), 1), 0)
    np.testing.assert_array_equal(got, got.astype(np.float16).astype(np.float32))
    np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-3)
    assert np.abs(got - want).max() > 0  # rounded, not float32


# --- errors -----------------------------------------------------------------------------------

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

    w = seeded(15).standard_normal((2, 4, 3, 3)).astype(np.float32)
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


# --- whole models -----------------------------------------------------------------------------

def _pixels(size: int, count: int = 6) -> np.ndarray:
    return seeded(20).integers(0, 256, (count, size, size, 3), dtype=np.uint8)


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
            options = CoreMLOptions(format="mlprogram", precision=precision)
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

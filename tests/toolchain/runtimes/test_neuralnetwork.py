"""The NeuralNetwork executor (``toolchain.runtimes.neuralnetwork``) as a whole.

Image preprocessing (colour order, scale and bias, grayscale, mean image), classifier outputs
and labels, batches, float16 compute, errors, ``runtimes.load``; and whole models: each
backbone family exported by the Core ML target as the toolchain ships it, classified by the
executor and by the Keras model it came from. The layers have their own tests
(``test_nn_layers_*``, ``test_nn_weights``).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import FAMILY_ARCHS, make_source
from tests.toolchain.runtimes.nn_helpers import (
    RNG,
    N,
    close,
    network,
    quantize,
    random,
    run,
)
from toolchain import runtimes
from toolchain.errors import ModelError, UnsupportedLayer, UsageError
from toolchain.runtimes import plan
from toolchain.runtimes.neuralnetwork import Executor

# -- image preprocessing, classifier outputs ---------------------------------------------------

def _image_classifier(color, scale, bias, labels=("cat", "dog", "emu")):
    """A classifier: image (scaler preprocessing) → inner product → softmax; also exposes the
    preprocessed image itself as output "pre" (a linear layer with alpha 1)."""
    from coremltools.models import datatypes
    from coremltools.models.neural_network import NeuralNetworkBuilder
    from coremltools.proto import FeatureTypes_pb2

    w = np.linspace(-0.02, 0.02, len(labels) * 3 * 4 * 4, dtype=np.float32).reshape(len(labels),
                                                                                     -1)
    builder = NeuralNetworkBuilder([("image", datatypes.Array(3, 4, 4))], [("probs", None)],
                                   mode="classifier", disable_rank5_shape_mapping=True)
    builder.add_activation("pre", "LINEAR", "image", "pre", params=[1.0, 0.0])
    builder.add_inner_product("ip", w, None, 48, len(labels), False, input_name="image",
                              output_name="logits")
    builder.add_flatten_to_2d("flat", "logits", "flat", axis=1)
    builder.add_softmax_nd("softmax", "flat", "probs", axis=-1)
    builder.set_class_labels(list(labels), predicted_feature_name="label",
                             prediction_blob="probs")
    spec = builder.spec
    spec.description.output.add(name="pre").type.multiArrayType.shape[:] = [1, 3, 4, 4]
    image = spec.description.input[0].type.imageType
    image.width, image.height = 4, 4
    image.colorSpace = getattr(FeatureTypes_pb2.ImageFeatureType, color)
    spec.neuralNetworkClassifier.imageInputShapeMapping = 1  # RANK4_IMAGE_MAPPING
    red, green, blue = bias
    entry = spec.neuralNetworkClassifier.preprocessing.add()
    entry.featureName = "image"
    entry.scaler.channelScale, entry.scaler.redBias = scale, red
    entry.scaler.greenBias, entry.scaler.blueBias = green, blue
    return spec, w


@pytest.mark.parametrize("color", ["RGB", "BGR"])
def test_image_preprocessing_scale_bias_and_colour_order(color):
    spec, _ = _image_classifier(color, 1 / 127.5, (-1.0, -0.5, 0.25))
    pixels = RNG.integers(0, 256, (N, 4, 4, 3), dtype=np.uint8)
    executor = Executor(spec, Path("c.mlmodel"))
    assert (executor.input_name, executor.input_size, executor.color) == ("image", 4, color)
    got = executor.run({"image": pixels})["pre"]
    rgb = pixels.astype(np.float32).transpose(0, 3, 1, 2)
    # The image arrives in the model's colour order; each bias belongs to its named colour.
    channels = rgb[:, ::-1] if color == "BGR" else rgb
    bias = np.float32([0.25, -0.5, -1.0] if color == "BGR" else [-1.0, -0.5, 0.25])
    close(got, channels / np.float32(127.5) + bias.reshape(1, 3, 1, 1), atol=1e-6)


def _plain_image_network(channels, color):
    """image (N, 4, 4) or (N, 4, 4, 3) → an identity layer → "y", for preprocessing tests."""
    from coremltools.proto import FeatureTypes_pb2

    spec = network({"image": (channels, 4, 4)}, lambda nn: nn.add_activation(
        "same", "LINEAR", "image", "y", params=[1.0, 0.0]))
    image = spec.description.input[0].type.imageType
    image.width, image.height = 4, 4
    image.colorSpace = getattr(FeatureTypes_pb2.ImageFeatureType, color)
    spec.neuralNetwork.imageInputShapeMapping = 1  # RANK4_IMAGE_MAPPING
    return spec, spec.neuralNetwork.preprocessing.add(featureName="image")


def test_grayscale_image_with_gray_bias():
    spec, entry = _plain_image_network(1, "GRAYSCALE")
    entry.scaler.channelScale, entry.scaler.grayBias, entry.scaler.redBias = 0.5, -3.0, 100.0
    gray = RNG.integers(0, 256, (N, 4, 4), dtype=np.uint8)
    executor = Executor(spec, Path("g.mlmodel"))
    assert executor.color == "GRAY"
    close(executor.run({"image": gray})["y"], gray[:, None] * np.float32(0.5) - 3)
    # RGB pixels are converted to luma first, as PIL's convert("L") does for coremltools.
    rgb = RNG.integers(0, 256, (N, 4, 4, 3), dtype=np.uint8)
    luma = rgb.astype(np.float32) @ np.float32([0.299, 0.587, 0.114])
    close(executor.run({"image": rgb})["y"], luma[:, None] * np.float32(0.5) - 3, atol=1e-4)


def test_mean_image_preprocessing():
    spec, entry = _plain_image_network(3, "BGR")
    mean = np.arange(48, dtype=np.float32).reshape(3, 4, 4)
    entry.meanImage.meanImage.extend(mean.ravel())
    pixels = RNG.integers(0, 256, (N, 4, 4, 3), dtype=np.uint8)
    bgr = pixels[..., ::-1].astype(np.float32).transpose(0, 3, 1, 2)
    close(Executor(spec, Path("m.mlmodel")).run({"image": pixels})["y"], bgr - mean)


def test_classifier_predict_and_outputs_follow_the_labels():
    spec, w = _image_classifier("RGB", 0.5, (0.0, 0.0, 0.0))
    pixels = RNG.integers(0, 256, (5, 4, 4, 3), dtype=np.uint8)
    executor = Executor(spec, Path("c.mlmodel"))
    assert executor.labels == ("cat", "dog", "emu")
    probs = executor.predict(pixels)
    logits = (pixels.astype(np.float32).transpose(0, 3, 1, 2).reshape(5, -1) * 0.5) @ w.T
    expected = np.exp(logits - logits.max(1, keepdims=True))
    expected /= expected.sum(1, keepdims=True)
    close(probs, expected, atol=1e-6)
    outputs = executor.run({"image": pixels})
    close(outputs[spec.description.predictedProbabilitiesName], expected, atol=1e-6)
    assert list(outputs["label"]) == [executor.labels[i] for i in expected.argmax(1)]
    with pytest.raises(ModelError, match="shape"):
        executor.predict(pixels[:, :3])


def test_batches_equal_one_image_at_a_time(monkeypatch):
    # Values of at most 48 floats an image: blocks of 4 images, after the measuring first one.
    monkeypatch.setattr(plan, "BLOCK_BYTES", 4 * 48 * 4)
    spec, _ = _image_classifier("BGR", 0.01, (0.1, 0.2, 0.3))
    pixels = RNG.integers(0, 256, (19, 4, 4, 3), dtype=np.uint8)
    executor = Executor(spec, Path("c.mlmodel"))
    batched = executor.predict(pixels)
    assert executor.plan.block == 4
    one_by_one = np.concatenate([executor.predict(pixels[i:i + 1]) for i in range(len(pixels))])
    np.testing.assert_array_equal(batched, one_by_one)


# -- float16 compute, errors -------------------------------------------------------------------

def test_float16_compute_rounds_every_layer():
    x, w = random(N, 8, 6, 6), random(3, 3, 8, 8) / 4
    spec = network({"x": (1, 8, 6, 6)}, lambda nn: (
        nn.add_convolution("conv", 8, 8, 3, 3, 1, 1, "same", 1, w, None, False,
                           input_name="x", output_name="c"),
        nn.add_activation("act", "SIGMOID", "c", "y")))
    full = run(spec, {"x": x})
    half = run(spec, {"x": x}, precision="float16")
    np.testing.assert_array_equal(half, half.astype(np.float16).astype(np.float32))
    difference = np.abs(half - full).max()
    assert 1e-5 < difference < 5e-3


def test_compute_precision_is_validated():
    spec = network({"x": (1, 2)}, lambda nn: nn.add_activation("a", "RELU", "x", "y"))
    with pytest.raises(UsageError, match="float64"):
        Executor(spec, Path("m.mlmodel"), "float64")


@pytest.mark.parametrize("build, kind", [
    (lambda nn: nn.add_lrn("norm1", "x", "y", alpha=1e-4, beta=0.75, local_size=3), "'lrn'"),
    (lambda nn: nn.add_pooling("l2pool", 2, 2, 2, 2, "L2", "VALID", "x", "y"), "'pooling'"),
    (lambda nn: nn.add_convolution("deconv", 3, 3, 2, 2, 2, 2, "valid", 1, random(2, 2, 3, 3),
                                   None, False, is_deconv=True, output_shape=[8, 8],
                                   input_name="x", output_name="y"), "'convolution'"),
])
def test_unimplemented_layers_are_named_at_load(build, kind):
    spec = network({"x": (1, 3, 4, 4)}, build)
    name = spec.neuralNetwork.layers[0].name
    with pytest.raises(UnsupportedLayer) as error:
        Executor(spec, Path("m.mlmodel"))
    message = str(error.value)
    assert kind in message and f"(layer '{name}')" in message and "\n" not in message


def test_malformed_layers_are_model_errors_at_load():
    spec = network({"x": (1, 3, 4, 4)}, lambda nn: nn.add_reduce("r", "x", "y", "C", "sum"))
    spec.neuralNetwork.layers[0].reduce.axis = 9  # no such axis
    with pytest.raises(ModelError, match=r"layer 'r' \(reduce\) cannot be read: KeyError: 9"):
        Executor(spec, Path("m.mlmodel"))


def test_load_dispatches_and_rejects_other_models(tmp_path):
    import coremltools as ct
    from coremltools.proto import Model_pb2

    spec, _ = _image_classifier("RGB", 1.0, (0, 0, 0))
    path = tmp_path / "c.mlmodel"
    ct.utils.save_spec(spec, str(path))
    executor = runtimes.load(path, compute_precision="float16")
    assert isinstance(executor, Executor) and executor.compute_precision == "float16"
    other = Model_pb2.Model(specificationVersion=1)
    other.description.input.add().name = "x"
    other.identity.MergeFromString(b"")
    ct.utils.save_spec(other, str(tmp_path / "i.mlmodel"))
    with pytest.raises(ModelError, match="identity"):
        runtimes.load(tmp_path / "i.mlmodel")
    with pytest.raises(ModelError, match="no Core ML model"):
        runtimes.load(tmp_path / "missing.mlmodel")
    with pytest.raises(UsageError):
        runtimes.load(path, compute_precision="int8")


# -- whole models, as the Core ML target exports them ------------------------------------------

SMALL = "mobilenet_v3_small_96"
#: Inception V3 to .mlmodel: 64.5 s for the conversion alone, then a pure-Python parse; opt-in
#: (TOOLCHAIN_SLOW_TESTS=1), skipped visibly otherwise. Its .mlpackage always runs.
WHOLE = [pytest.param(arch, marks=pytest.mark.skipif(
    arch == "inception_v3_75" and not os.environ.get("TOOLCHAIN_SLOW_TESTS"),
    reason="Inception V3 .mlmodel conversion takes 64.5 s; set TOOLCHAIN_SLOW_TESTS=1 to run it"))
    for arch in FAMILY_ARCHS]


@pytest.fixture(scope="module")
def exported(coreml_export):
    """``exported(arch, precision)`` → (Source, .mlmodel path): the session's shared export."""

    def get(arch, precision="float32"):
        return make_source(arch), coreml_export(arch, "neuralnetwork", precision)[0]

    return get


def _keras_and_pixels(source, count=6):
    """Mid-contrast noise images and Keras' probabilities for them. Full-range noise drives
    the random-weight MobileNet V3s to one-hot outputs, which would hide any error."""
    pixels = np.random.default_rng(7).integers(
        64, 192, (count, source.input_size, source.input_size, 3), dtype=np.uint8)
    expected = np.asarray(source.keras_model(source.preprocessing.apply(pixels)))
    assert (expected.max(axis=1) < 0.999).all(), "saturated outputs would make this check blind"
    return pixels, expected


@pytest.mark.slow
@pytest.mark.parametrize("arch", WHOLE)
def test_whole_float32_model_matches_keras(exported, arch):
    source, path = exported(arch)
    pixels, expected = _keras_and_pixels(source)
    executor = runtimes.load(path)
    assert executor.labels == tuple(source.labels)
    got = executor.predict(pixels)
    assert got.shape == expected.shape and got.dtype == np.float32
    assert np.abs(got - expected).max() <= 1e-4
    np.testing.assert_allclose(got.sum(axis=1), 1.0, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("precision, tolerance", [("float16", 2e-2), ("int8", 0.2)])
def test_whole_quantized_model_stays_close_to_keras(exported, precision, tolerance):
    source, path = exported(SMALL, precision)
    pixels, expected = _keras_and_pixels(source)
    got = runtimes.load(path).predict(pixels)
    difference = np.abs(got - expected).max()
    # Close to Keras, but not equal: the stored weights really are of lower precision.
    assert 1e-5 < difference <= tolerance
    if precision == "int8":  # coremltools' own decoding of the same bytes agrees
        import coremltools as ct

        plain = quantize(ct.utils.load_spec(str(path)), None, "dequantization")
        reference = Executor(plain, path).predict(pixels)
        np.testing.assert_allclose(got, reference, atol=2e-5)


@pytest.mark.slow
def test_whole_model_float16_compute_differs_but_stays_close(exported):
    source, path = exported(SMALL)
    pixels, expected = _keras_and_pixels(source)
    full = runtimes.load(path).predict(pixels)
    half = runtimes.load(path, compute_precision="float16").predict(pixels)
    assert 1e-5 < np.abs(half - full).max() <= 2e-2
    assert np.abs(half - expected).max() <= 2e-2
    assert (half.argmax(1) == expected.argmax(1)).mean() >= 5 / 6

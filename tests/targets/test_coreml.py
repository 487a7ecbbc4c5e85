"""Tests for the Core ML target (``targets.coreml``).

Every artifact is the session's shared export (``coreml_export`` in tests/conftest.py; the
conversions take 4-25 s each here, shared with the NumPy executor's, label's and the sample
apps' tests) and is read back with coremltools' own loaders, independently of the target's
read-back check: labels, image input and preprocessing, output names, metadata and the weight
storage actually written. The models run in the Core ML runtime on macOS and in the NumPy
executor (toolchain.runtimes) elsewhere, and must agree with Keras within the measured
COREML_TOLERANCE; ``CoreMLRunner``, the macOS runtime's wrapper, is also checked on Linux with a
stand-in ``MLModel``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

from targets.coreml import CoreMLOptions, CoreMLRunner, CoreMLTarget
from tests.helpers import (
    COREML_TOLERANCE,
    FAMILY_ARCHS,
    HELD_OUT,
    LABELS,
    METADATA,
    TINY_ARCH,
    held_out_paths,
    keras_probabilities,
    make_source,
    pixels_of,
    within,
)
from toolchain.errors import ModelError, ToolchainError, UsageError

SMALL = TINY_ARCH
FORMATS = ("neuralnetwork", "mlprogram")
#: Inception V3 to .mlmodel: 64.5 s for the conversion alone (measured after the spec
#: round-trip fix, README Performance), and these tests parse the file again in pure-Python
#: protobuf; outside the CI budget, so opt-in. Its .mlpackage (about 24 s) always runs.
SLOW_CASE = ("inception_v3_75", "neuralnetwork", "float32")
RUN_SLOW = bool(os.environ.get("TOOLCHAIN_SLOW_TESTS"))
CASES = ([(arch, fmt, "float32") for arch in FAMILY_ARCHS for fmt in FORMATS]
         + [(SMALL, fmt, precision) for fmt in FORMATS for precision in ("float16", "int8")])
PARAMS = [pytest.param(case, id="-".join(case), marks=pytest.mark.skipif(
    case == SLOW_CASE and not RUN_SLOW,
    reason="Inception V3 .mlmodel conversion takes 64.5 s; set TOOLCHAIN_SLOW_TESTS=1 to run it"))
    for case in CASES]
PREVIEW = "com.apple.coreml.model.preview.type"
TARGET = CoreMLTarget()


class Artifact:
    """One exported model and its spec, read back once (parsing is slow: pure-Python protobuf)."""

    def __init__(self, path: Path, seconds: float) -> None:
        self.path, self.seconds, self._spec = path, seconds, None

    @property
    def spec(self):
        import coremltools as ct

        if self._spec is None:
            self._spec = ct.utils.load_spec(str(self.path))
        return self._spec


@pytest.fixture(scope="module")
def exported(coreml_export):
    """``exported(arch, format, precision)`` → Artifact (the session's shared export)."""
    done: dict[tuple, Artifact] = {}

    def get(arch: str, fmt: str, precision: str) -> Artifact:
        key = (arch, fmt, precision)
        if key not in done:
            done[key] = Artifact(*coreml_export(arch, fmt, precision))
        return done[key]

    return get


def _spec(path: Path):
    import coremltools as ct

    return ct.utils.load_spec(str(path))


def _mil_ops(spec) -> list:
    function = spec.mlProgram.functions["main"]
    return list(function.block_specializations[function.opset].operations)


def _floats(op) -> list[float]:
    return list(op.attributes["val"].immediateValue.tensor.floats.values)


def _scale_bias(spec) -> tuple[float, list[float]]:
    """The image preprocessing as stored: NeuralNetwork scaler, or the ML Program's mul/add ops."""
    if spec.WhichOneof("Type") == "neuralNetworkClassifier":
        (entry,) = spec.neuralNetworkClassifier.preprocessing
        assert entry.featureName == "image"
        scaler = entry.scaler
        return scaler.channelScale, [scaler.redBias, scaler.greenBias, scaler.blueBias]
    ops = _mil_ops(spec)
    consts = {op.outputs[0].name: op for op in ops if op.type == "const"}
    first = {op.type: op for op in ops
             if op.type in ("mul", "add")
             and op.outputs[0].name.endswith(("__scaled__", "__biased__"))}
    mul, add = first["mul"], first["add"]
    assert mul.inputs["x"].arguments[0].name == "image"
    assert add.inputs["x"].arguments[0].name == mul.outputs[0].name
    return (_floats(consts[mul.inputs["y"].arguments[0].name])[0],
            _floats(consts[add.inputs["y"].arguments[0].name]))


def _weight_size(path: Path) -> int:
    if path.is_dir():
        return (path / "Data" / "com.apple.CoreML" / "weights" / "weight.bin").stat().st_size
    return path.stat().st_size


def _stored_weights(spec) -> dict[str, int]:
    """How many weight tensors use each storage (NeuralNetwork fields, ML Program blob dtypes)."""
    from coremltools.proto import MIL_pb2

    counts: dict[str, int] = {}
    if spec.WhichOneof("Type") == "neuralNetworkClassifier":
        for layer in spec.neuralNetworkClassifier.layers:
            if layer.WhichOneof("layer") in ("convolution", "batchedMatmul", "innerProduct"):
                w = getattr(layer, layer.WhichOneof("layer")).weights
                kind = ("floatValue" if w.floatValue else "float16Value" if w.float16Value
                        else f"rawValue/{w.quantization.numberOfBits}bit" if w.rawValue else None)
                if kind:
                    counts[kind] = counts.get(kind, 0) + 1
        return counts
    for op in _mil_ops(spec):
        for key, value in op.attributes.items():
            if value.HasField("blobFileValue"):
                kind = f"{op.type}.{key}:{MIL_pb2.DataType.Name(value.type.tensorType.dataType)}"
                counts[kind] = counts.get(kind, 0) + 1
    return counts


# --- the artifacts --------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("case", PARAMS)
def test_artifact_appears_under_its_final_name_only(exported, case):
    artifact = exported(*case)
    path = artifact.path
    suffix = ".mlmodel" if case[1] == "neuralnetwork" else ".mlpackage"
    assert path.name == f"model_{case[2]}{suffix}"
    assert path.is_file() if case[1] == "neuralnetwork" else path.is_dir()
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary leftovers
    assert TARGET.opens(path)


@pytest.mark.slow
@pytest.mark.parametrize("case", PARAMS)
def test_labels_input_and_outputs(exported, case):
    from toolchain import backbones

    artifact = exported(*case)
    spec, backbone = artifact.spec, backbones.get(case[0])
    if case[0] == SMALL:  # inspect parses the file again: only for a small model
        assert TARGET.inspect(artifact.path).labels == LABELS
    description = spec.description
    (image,) = description.input
    assert image.name == "image"
    assert image.type.WhichOneof("Type") == "imageType"
    assert (image.type.imageType.width, image.type.imageType.height) == (backbone.input_size,) * 2
    assert image.type.imageType.colorSpace == image.type.imageType.RGB
    scale, bias = _scale_bias(spec)
    assert scale == pytest.approx(backbone.preprocessing.scale, rel=1e-6)
    assert bias == pytest.approx(list(backbone.preprocessing.offset), rel=1e-6)
    assert sorted(o.name for o in description.output) == ["classLabel", "classLabelProbs"]
    assert description.predictedFeatureName == "classLabel"
    assert description.predictedProbabilitiesName == "classLabelProbs"
    if case[1] == "neuralnetwork":
        labels = spec.neuralNetworkClassifier.stringClassLabels.vector
        assert spec.neuralNetworkClassifier.labelProbabilityLayerName == "classLabelProbs"
    else:
        (classify,) = [op for op in _mil_ops(spec) if op.type == "classify"]
        assert [o.name for o in classify.outputs] == ["classLabel", "classLabelProbs"]
        labels = [v.immediateValue.tensor.strings.values[0] for v in
                  classify.inputs["classes"].arguments[0].value.immediateValue.list.values]
    assert tuple(labels) == LABELS


@pytest.mark.slow
@pytest.mark.parametrize("case", PARAMS)
def test_metadata(exported, case):
    description = exported(*case).spec.description
    meta = description.metadata
    assert (meta.shortDescription, meta.author, meta.license, meta.versionString) == (
        METADATA.description, METADATA.author, METADATA.license, METADATA.version)
    user = dict(meta.userDefined)
    assert user[PREVIEW] == "imageClassifier"
    assert (user["architecture"], user["toolchain_version"], user["classes"],
            user["test_accuracy"]) == (case[0], "test", "5", "0.5000")
    size = make_source(case[0]).input_size
    texts = {f.name: f.shortDescription for f in [*description.input, *description.output]}
    assert texts == {"image": f"Image to classify, {size}x{size} RGB",
                     "classLabel": "Most likely label",
                     "classLabelProbs": "Probability of each label"}


@pytest.mark.slow
def test_metadata_as_coremltools_shows_it(exported):
    import coremltools as ct

    model = ct.models.MLModel(str(exported(SMALL, "mlprogram", "int8").path), skip_model_load=True)
    assert (model.short_description, model.author, model.license, model.version) == (
        "Classe des fleurs, été 2026", "Ünit Tests", "MIT", "2.3.1")
    assert model.user_defined_metadata[PREVIEW] == "imageClassifier"
    assert model.input_description["image"] == "Image to classify, 96x96 RGB"


@pytest.mark.slow
@pytest.mark.parametrize("case", [p for p in PARAMS if p.values[0][0] == SMALL])
def test_weight_precision_is_stored(exported, case):
    arch, fmt, precision = case
    artifact = exported(*case)
    counts = _stored_weights(artifact.spec)
    ratio = _weight_size(artifact.path) / _weight_size(exported(arch, fmt, "float32").path)
    if fmt == "neuralnetwork":
        expected = {"float32": "floatValue", "float16": "float16Value",
                    "int8": "rawValue/8bit"}[precision]
        assert counts == {expected: 53}  # 52 convolutions and the head's inner product
    elif precision == "int8":
        # Measured: 44 of the 94 weight tensors have more than INT8_WEIGHT_THRESHOLD elements.
        assert counts["constexpr_affine_dequantize.quantized_data:INT8"] == 44
        assert not any("FLOAT16" in kind for kind in counts)
    else:
        assert counts == {f"const.val:{precision.upper()}": 94}
    # Weight bytes against float32's, measured: float16 0.510 (.mlmodel) and 0.501 (.mlpackage),
    # int8 0.284 and 0.273 (the per-channel scales and the small float32 tensors on top).
    bounds = {"float32": (1.0, 1.0), "float16": (0.49, 0.53), "int8": (0.26, 0.30)}[precision]
    assert bounds[0] <= ratio <= bounds[1], f"{precision} weights are {ratio:.3f} of float32's"


@pytest.mark.slow
@pytest.mark.parametrize("case", PARAMS)
def test_core_ml_agrees_with_keras(exported, case, sample_dir):
    """The runtime here (Core ML on macOS, the NumPy executor elsewhere) against Keras on the
    held-out sample images: probabilities within COREML_TOLERANCE (a distance that holds on
    every CPU: tests/helpers.py)."""
    source = make_source(case[0])
    paths = held_out_paths(sample_dir)
    assert len(paths) == HELD_OUT, "the tolerances were measured on 18 images"
    pixels = pixels_of(paths, source.input_size)
    expected = keras_probabilities(source, pixels)
    with TARGET.runners(exported(*case).path) as runners:
        assert [runner.runtime for runner in runners] == [
            "coreml" if sys.platform == "darwin" else "coreml-numpy", "coreml-numpy-float16"]
        assert [runner.compute for runner in runners] == [None, "float16"]
        for runner in runners:
            assert runner.labels == LABELS and runner.input_size == source.input_size
            got = runner(pixels)
            assert got.shape == (HELD_OUT, len(LABELS)) and got.dtype == np.float32
            within(got, expected, COREML_TOLERANCE[case][runner.runtime], runner.runtime)


# --- CoreMLRunner, the macOS runtime's wrapper ---------------------------------------------------


class _FakeMLModel:
    """Stands in for ``coremltools.models.MLModel`` off macOS: the real spec, and ``predict``
    returning ``scores(image)`` as Core ML's classLabelProbs dictionary."""

    def __init__(self, path: Path, scores) -> None:
        import coremltools as ct

        self._spec, self._scores, self.calls = ct.utils.load_spec(str(path)), scores, []

    def get_spec(self):
        return self._spec

    def predict(self, inputs: dict) -> dict:
        from PIL import Image

        (image,) = inputs.values()
        assert list(inputs) == ["image"] and isinstance(image, Image.Image)
        assert image.mode == "RGB"
        self.calls.append(np.asarray(image))
        scores = self._scores(np.asarray(image))
        return {"classLabel": max(scores, key=scores.get), "classLabelProbs": scores}


def _fake_core_ml(monkeypatch, scores) -> list:
    """Make ``ct.models.MLModel`` a _FakeMLModel scoring with ``scores``; returns the models."""
    import coremltools as ct

    made = []

    def fake(path, *args, **kwargs):
        made.append(_FakeMLModel(Path(path), scores))
        return made[-1]

    monkeypatch.setattr(ct.models, "MLModel", fake)
    return made


@pytest.mark.slow
def test_core_ml_runner_maps_scores_to_columns_by_label_name(exported, monkeypatch):
    """Core ML returns a label → score dictionary, in no particular order: each score must land
    in its label's column, whatever order the dictionary has."""
    path = exported(SMALL, "neuralnetwork", "float32").path

    def scores(image):  # a score per label from the image, keys in reversed label order
        level = float(image.mean()) / 255
        return {label: (index + 1) * 0.1 + level for index, label in reversed(
            list(enumerate(LABELS)))}

    made = _fake_core_ml(monkeypatch, scores)
    runner = CoreMLRunner(path)
    assert (runner.runtime, runner.labels, runner.input_size) == ("coreml", LABELS, 96)
    pixels = np.stack([np.full((96, 96, 3), value, np.uint8) for value in (0, 51, 255)])
    got = runner(pixels)
    expected = np.array([[(index + 1) * 0.1 + value / 255 for index in range(len(LABELS))]
                         for value in (0, 51, 255)], np.float32)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    (model,) = made
    assert len(model.calls) == 3  # one predict per image, fed the image itself
    np.testing.assert_array_equal(model.calls[1], pixels[1])


@pytest.mark.slow
def test_core_ml_runner_refuses_scores_for_other_labels(exported, monkeypatch):
    path = exported(SMALL, "neuralnetwork", "float32").path
    _fake_core_ml(monkeypatch, lambda image: {"cat": 0.7, "dog": 0.3})
    runner = CoreMLRunner(path)
    with pytest.raises(ModelError) as caught:
        runner(np.zeros((1, 96, 96, 3), np.uint8))
    assert str(caught.value) == "model_float32.mlmodel scored ['cat', 'dog'], not its labels"
    missing = dict.fromkeys(LABELS[:-1], 0.25)  # one label short
    _fake_core_ml(monkeypatch, lambda image: missing)
    with pytest.raises(ModelError, match="not its labels"):
        CoreMLRunner(path)(np.zeros((1, 96, 96, 3), np.uint8))


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "darwin",
                    reason="Apple's Core ML runtime runs only on macOS (MLModel.predict raises "
                           "'Model prediction is only supported on macOS' elsewhere)")
def test_core_ml_runner_in_the_real_runtime(exported, sample_dir):
    source = make_source(SMALL)
    runner = CoreMLRunner(exported(SMALL, "mlprogram", "float32").path)
    pixels = pixels_of(held_out_paths(sample_dir), source.input_size)
    within(runner(pixels), keras_probabilities(source, pixels),
           COREML_TOLERANCE[SMALL, "mlprogram", "float32"]["coreml"], "coreml")


# --- failures -------------------------------------------------------------------------------------

def test_conversion_crash_is_one_line(monkeypatch, tmp_path):
    import coremltools as ct

    def crash(*args, **kwargs):
        raise RuntimeError("unsupported op FancyOp\n  at layer 3\n  traceback...")

    monkeypatch.setattr(ct, "convert", crash)
    with pytest.raises(ToolchainError) as caught:
        TARGET.export(make_source(SMALL), CoreMLOptions(), METADATA,
                      tmp_path / "model_float32.mlmodel")
    message = caught.value.message
    assert "\n" not in message
    assert message.startswith("coreml") and "RuntimeError: unsupported op FancyOp" in message
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("fmt, mismatch", [
    ("neuralnetwork", "labels"), ("mlprogram", "labels"), ("neuralnetwork", "preprocessing"),
    ("mlprogram", "preprocessing"),
    # NeuralNetwork quantization runs after ct.convert, so only an ML Program can come back
    # from (patched) ct.convert in the wrong precision.
    ("mlprogram", "precision")])
@pytest.mark.slow
def test_read_back_check_catches_mismatch(exported, monkeypatch, tmp_path, fmt, mismatch):
    """ct.convert returns a good float32 model; the Source (or the options) expect otherwise."""
    import coremltools as ct

    from toolchain.backbones import Preprocessing

    good = ct.models.MLModel(str(exported(SMALL, fmt, "float32").path), skip_model_load=True)
    monkeypatch.setattr(ct, "convert", lambda *args, **kwargs: good)
    source, precision = make_source(SMALL), "float32"
    if mismatch == "labels":
        source.labels = tuple(reversed(LABELS))
    elif mismatch == "preprocessing":
        source.preprocessing = Preprocessing(1 / 255, (0.0, 0.0, 0.0))
    else:
        precision = "float16"  # an ML Program's compute precision is ct.convert's job
    options = CoreMLOptions(format=fmt, precision=precision)
    path = tmp_path / TARGET.filename(options)
    with pytest.raises(ToolchainError) as caught:
        TARGET.export(source, options, METADATA, path)
    expected = {"labels": "labels reads back as ['crème brûlée', 'daisy', 'roses, red', "
                          "'sun flower', 'tulips'], expected ['tulips', ",
                "preprocessing": "preprocessing reads back as scale 0.00784314",
                "precision": "precision reads back as 'float32', expected 'float16'"}[mismatch]
    assert expected in str(caught.value)
    assert list(tmp_path.iterdir()) == []  # the wrong model never takes its final name


# --- options, names, registry ---------------------------------------------------------------------

def test_options_from_command_line(capsys):
    from toolchain.cli import options_for

    base = ["convert", "--model", "m", "--target", "coreml"]
    assert options_for(base).target_options.coreml == CoreMLOptions(format="neuralnetwork",
                                                                     precision="float32")
    options = options_for([*base, "--coreml-format", "mlprogram", "--coreml-precision", "int8"])
    assert options.target_options.coreml == CoreMLOptions(format="mlprogram", precision="int8")
    assert TARGET.filename(options.target_options.coreml) == "model_int8.mlpackage"
    assert TARGET.filename(CoreMLOptions(precision="float16")) == "model_float16.mlmodel"
    with pytest.raises(SystemExit):
        options_for([*base, "--coreml-precision", "int4"])
    assert "invalid choice: 'int4'" in capsys.readouterr().err


@pytest.mark.parametrize("kwargs", [{"format": "mlpackage"}, {"precision": "int4"},
                                    {"precision": "FLOAT16"}])
def test_unknown_options_are_usage_errors(kwargs):
    with pytest.raises(UsageError):
        CoreMLOptions(**kwargs)


def test_opens(tmp_path):
    (tmp_path / "a.mlmodel").write_bytes(b"")
    (tmp_path / "b.MLPackage").mkdir()
    (tmp_path / "c.tflite").write_bytes(b"")
    (tmp_path / "d.mlmodel").mkdir()
    assert TARGET.opens(tmp_path / "a.mlmodel")
    assert TARGET.opens(tmp_path / "b.MLPackage")
    assert not TARGET.opens(tmp_path / "c.tflite")
    assert not TARGET.opens(tmp_path / "d.mlmodel")  # a folder is not an .mlmodel file


def test_registered():
    import targets

    assert isinstance(targets.get("coreml"), CoreMLTarget)


# --- TensorFlow for Poets frozen graphs ----------------------------------------------------------

@pytest.mark.slow
def test_frozen_graph_converts(tmp_path):
    from toolchain.conversion import source_from_graph
    from toolchain.model import frozen_graph_bytes

    keras_model = make_source(SMALL).keras_model
    (tmp_path / "retrained_graph.pb").write_bytes(frozen_graph_bytes(keras_model))
    (tmp_path / "retrained_labels.txt").write_text("\n".join(LABELS) + "\n", encoding="utf-8")
    source = source_from_graph(tmp_path / "retrained_graph.pb")  # labels found beside it
    out = tmp_path / "out"
    path = TARGET.export(source, CoreMLOptions(), METADATA, out / "model_float32.mlmodel")
    spec = _spec(path)
    assert TARGET.inspect(path).labels == LABELS
    assert [i.name for i in spec.description.input] == ["image"]  # TF's "input", renamed
    scale, bias = _scale_bias(spec)
    assert scale == pytest.approx(1 / 127.5, rel=1e-6) and bias == [-1.0, -1.0, -1.0]
    assert spec.description.predictedProbabilitiesName == "classLabelProbs"
    assert spec.description.metadata.userDefined[PREVIEW] == "imageClassifier"
    assert [p.name for p in out.iterdir()] == [path.name]

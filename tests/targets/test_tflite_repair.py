"""int8 repair (``targets._tflite_repair`` through the TFLite target and the converter): int8 is
measured on a tuning set of training images, its layers are diagnosed, the most harmful go back
to float until it agrees, and the result is its own artifact whose float layers are really float.

The model is the random-weight MobileNet v3 small of tests/helpers.py (int8 loses much of its
agreement: the case the repair exists for). Every image the converter reads is recorded, so the
held-out images are proven untouched.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

import targets
from targets import _repair, _tflite_repair, _tuning
from targets.tflite import MIXED, QUANTIZATION_REPORT, TFLiteOptions
from tests.helpers import (
    METADATA,
    TINY_ARCH,
    keras_probabilities,
    make_source,
    pixels_of,
)
from toolchain import images
from toolchain.conversion import convert

pytestmark = pytest.mark.slow

CALIBRATION = 16
TFLITE = targets.get("tflite")


def _subset(sample_dir, name: str):
    from toolchain.dataset import scan

    return [entry.path for entry in scan(sample_dir).subset(name)]


def _training(sample_dir):
    return _subset(sample_dir, "training")


def _source(sample_dir):
    """The tiny model with the sample data's training split to calibrate and its validation
    split to tune on, as ``toolchain convert`` gives a retrained model."""
    return make_source(TINY_ARCH, _training(sample_dir), _subset(sample_dir, "validation"))


def _export(sample_dir, folder, **options):
    """convert() of the tiny model to int8 TFLite, recording every image path it decodes."""
    read = []
    real = images.load_rgb

    def spy(path, size):
        read.append(path)
        return real(path, size)

    source = _source(sample_dir)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(images, "load_rgb", spy)
        patch.setattr(_tuning, "load_rgb", spy)
        done = convert(source, [(TFLITE, TFLiteOptions(calibration_images=CALIBRATION,
                                                       **options))], METADATA, folder)
    report = folder / QUANTIZATION_REPORT
    return done, (json.loads(report.read_text()) if report.exists() else None), read


@pytest.fixture(scope="module")
def repaired(sample_dir, tmp_path_factory):
    """Repaired for a target of 0.35 with the whole float32 size allowed: on the 20 tuning
    images that is an aim of 0.6 (the least agreement whose 95% lower bound clears 0.35; plain
    int8: 0.50), which this random-weight model reaches (measured: the first 10 layers in float
    gave 0.60; single layers chosen by harm stalled there too, 13 kept of ~110 tried)."""
    folder = tmp_path_factory.mktemp("repaired")
    return folder, *_export(sample_dir, folder, repair_agreement=0.35, max_size_ratio=1.0)


def test_the_repaired_model_is_an_artifact_of_its_own(repaired):
    folder, done, report, _ = repaired
    assert [(item.target, item.path.name) for item in done] == [
        ("tflite", "model_int8.tflite"), ("tflite", MIXED)]
    assert all(item.ok for item in done)
    assert report["needed"] and report["repaired"] and report["reason"] == ""
    found = TFLITE.inspect(folder / MIXED)
    assert found.precision == "int8" and found.labels == TFLITE.inspect(
        folder / "model_int8.tflite").labels
    assert json.loads(found.user_defined["float_layers"]) == report["float_layers"]
    assert found.user_defined["quantization"].startswith(
        f"int8, {len(report['float_layers'])} layer(s) kept in float32")


def _interpreter(model):
    import tensorflow as tf

    if isinstance(model, bytes):
        interpreter = tf.lite.Interpreter(model_content=model)
    else:
        interpreter = tf.lite.Interpreter(model_path=str(model))
    interpreter.allocate_tensors()
    return interpreter


def _produced(model) -> dict:
    """The element type of each tensor an op writes, by name (a name can be on several tensors,
    e.g. a layer's output and its bias: only op outputs count here)."""
    interpreter = _interpreter(model)
    tensors = {detail["index"]: detail for detail in interpreter.get_tensor_details()}
    return {tensors[index]["name"]: np.dtype(tensors[index]["dtype"])
            for op in interpreter._get_ops_details() for index in op["outputs"]}


def _of_layer(produced: dict, name: str) -> list:
    """The types of the op output that a layer name (the debugger's, which ``denylisted_nodes``
    takes) names: the file may give that tensor a numeric suffix to keep its names unique."""
    return [kind for tensor, kind in produced.items()
            if tensor == name or (tensor.startswith(name) and tensor[len(name):].isdigit())]


def _agreement(model, pixels, expected, pre) -> float:
    """Top-1 agreement of a uint8-out model with ``expected`` (TensorFlow's own interpreter, not
    the toolchain's runners): raw pixels into a uint8 input, ``pre`` applied for a float one."""
    interpreter = _interpreter(model)
    (given,), (output,) = interpreter.get_input_details(), interpreter.get_output_details()
    top = []
    for image in pixels:
        fed = image[None] if given["dtype"] == np.uint8 else pre.apply(image[None])
        interpreter.set_tensor(given["index"], fed.astype(given["dtype"]))
        interpreter.invoke()
        top.append(int(interpreter.get_tensor(output["index"])[0].argmax()))
    return float(np.mean(np.array(top) == expected.argmax(1)))


def test_every_layer_it_lists_as_float_is_float_in_the_file(repaired, sample_dir):
    """Float in the repaired file; int8 in the same calibration quantized without repair."""
    from targets.tflite import _representative

    folder, _, report, _ = repaired
    source = _source(sample_dir)
    plain = _tflite_repair._Quantizer(
        source.concrete_function(), lambda: _representative(source, CALIBRATION)).quantize(())
    mixed, pure = _produced(folder / MIXED), _produced(plain)
    assert report["float_layers"]
    for name in report["float_layers"]:
        if name == _tflite_repair.FLOAT_INPUT:  # the input, not a layer: its type says it
            assert [_interpreter(model).get_input_details()[0]["dtype"]
                    for model in (folder / MIXED, plain)] == [np.float32, np.uint8]
            continue
        # Float in the repaired file (the softmax's name is also on the requantized output
        # after it), never float without repair.
        assert np.float32 in _of_layer(mixed, name), name
        assert _of_layer(pure, name) and np.float32 not in _of_layer(pure, name), name
    assert list(mixed.values()).count(np.int8) > len(mixed) / 2, "the rest stays int8"


def test_its_agreement_on_the_tuning_images_is_what_the_report_says(repaired):
    """Recomputed here against the Keras original, for the repaired file and the plain int8
    artifact written beside it."""
    folder, _, report, _ = repaired
    source = make_source(TINY_ARCH)
    pixels = pixels_of(report["tuning"], source.input_size)
    expected = keras_probabilities(source, pixels)
    agreement = _agreement(folder / MIXED, pixels, expected, source.preprocessing)
    chosen = _repair.chosen(report["steps"])
    assert chosen["float_layers"] == len(report["float_layers"])
    assert agreement == pytest.approx(chosen["top1_agreement"], abs=1e-5)  # 5 decimals
    plain = _agreement(folder / "model_int8.tflite", pixels, expected, source.preprocessing)
    assert plain == pytest.approx(report["int8"]["top1_agreement"], abs=1e-5)
    assert report["aim_top1_agreement"] == 0.6
    assert agreement >= report["aim_top1_agreement"] > plain
    assert chosen["bytes"] <= report["budget_bytes"]
    target, run = report["aim_top1_agreement"], report["float_run"]
    # Runs of float layers from the input came first: lengths growing by half until one met the
    # target, then lengths in the gap before it, up to the first that met it (measured here: the
    # float input and the first 20 of ~110 layers, no size to speak of; with a uint8 input the
    # first 10 layers had met it).
    runs = [step for step in report["steps"] if step["trial"] == "run"]
    lengths = [step["float_layers"] for step in runs]
    grown = _repair.run_lengths(len(report["layers"]))
    met = next(index for index, step in enumerate(runs) if step["top1_agreement"] >= target)
    assert lengths[:met + 1] == grown[:met + 1]
    gap = lengths[met + 1:]
    tried = list(_repair.gap_lengths(grown[met - 1] if met else 0, grown[met]))
    assert gap == tried[:len(gap)]  # shortest first, up to the first that met the target
    assert all(step["top1_agreement"] < target for step in runs[met + 1:-1])
    assert chosen["trial"] == "run" and run == chosen["float_layers"] == 21
    # A run is the model's first layers: each run no longer than the kept one ends at the layer
    # the kept one has at that place.
    for step in runs:
        if step["float_layers"] <= run:
            assert step["layer"] == report["float_layers"][step["float_layers"] - 1]
    assert [step["kept"] for step in report["steps"]] == [step is chosen
                                                          for step in report["steps"]]


def test_the_diagnosis_ranks_every_quantized_layer_by_measured_harm(repaired):
    _, _, report, _ = repaired
    layers = report["layers"]
    assert len(layers) > 20  # MobileNet v3 small has ~110 quantized layers
    harms = [layer["harm"] for layer in layers]
    assert harms == sorted(harms, reverse=True) and harms[0] > 0
    assert {layer["op"] for layer in layers} >= {"CONV_2D", "DEPTHWISE_CONV_2D",
                                                  "FULLY_CONNECTED"}
    assert all(layer["rmse_per_step"] >= 0 for layer in layers)


def test_no_testing_image_is_ever_read(repaired, sample_dir):
    """The verifier judges on the testing split: the converter never decodes one. Tuning is the
    validation split, topped up with training images after the calibrating ones (the sample
    data's validation split is smaller than MIN_TUNING)."""
    _, _, report, read = repaired
    training, validation = _training(sample_dir), _subset(sample_dir, "validation")
    testing = {str(path) for path in _subset(sample_dir, "testing")}
    read = {str(path) for path in read}
    assert read and read <= {str(path) for path in training + validation}
    assert testing and not read & testing
    assert len(validation) < _tflite_repair.MIN_TUNING
    top_up = _tflite_repair.MIN_TUNING - len(validation)
    assert report["tuning"] == [str(path) for path in
                                validation + training[CALIBRATION:CALIBRATION + top_up]]
    assert report["tuning_from"] == {"validation": len(validation), "training": top_up,
                                     "calibration": 0}
    assert report["tuning_images"] == _tflite_repair.MIN_TUNING


def test_a_budget_too_small_for_any_float_layer_says_why(repaired, sample_dir, tmp_path,
                                                          toolchain_log):
    _, _, first, _ = repaired
    # Below int8's own size: a float input alone (the first run) costs no bytes.
    ratio = (first["int8"]["bytes"] - 1) / first["float32_bytes"]
    (tmp_path / MIXED).write_bytes(b"a previous run's repaired model")
    done, report, _ = _export(sample_dir, tmp_path, repair_agreement=1.0, max_size_ratio=ratio)
    assert [item.path.name for item in done] == ["model_int8.tflite"]
    assert not (tmp_path / MIXED).exists()  # it belonged to another model
    assert report["needed"] and not report["repaired"] and report["steps"] == []
    layers = len(report["layers"])
    assert report["reason"].startswith(
        f"no run of float layers from the input fits the budget; then {layers} layer(s) tried "
        f"in float one at a time, 0 kept (each made it agree better), {layers} passed over: "
        f"each would have taken the model over the budget of ")
    # Whether a larger budget could help: the longest run from the input, measured over budget.
    longest = re.search(r"; (?:every|even every) layer but the last in float (?:agrees "
                        r"\((?P<agreement>[\d.]+)\) at |\()(?P<ratio>[\d.]+) of float32's size",
                        report["reason"])
    assert longest, report["reason"]
    assert ratio < float(longest["ratio"]) <= 1.01
    warned = [r.getMessage() for r in toolchain_log.records if r.levelname == "WARNING"]
    assert any("not repaired: no run of float layers" in line for line in warned), warned


def test_int8_that_already_agrees_is_not_repaired(sample_dir, tmp_path, toolchain_log):
    done, report, _ = _export(sample_dir, tmp_path, repair_agreement=0.01)
    assert [item.path.name for item in done] == ["model_int8.tflite"]
    assert not report["needed"] and not report["repaired"] and report["layers"] == []
    assert any(line.getMessage().endswith("no repair needed") for line in toolchain_log.records)


def test_no_repair_writes_neither_the_report_nor_a_repaired_model(sample_dir, tmp_path):
    done, report, _ = _export(sample_dir, tmp_path, no_repair=True)
    assert [item.path.name for item in done] == ["model_int8.tflite"] and report is None


def test_a_failed_repair_is_a_warning_and_keeps_the_int8_artifact(sample_dir, tmp_path,
                                                                   monkeypatch, toolchain_log):
    from toolchain.errors import ConversionError

    def broken(*args, **kwargs):
        raise ConversionError("int8 repair failed: RuntimeError: the quantizer broke")

    monkeypatch.setattr(_tflite_repair, "repair", broken)
    done, report, _ = _export(sample_dir, tmp_path)
    assert [(item.path.name, item.ok) for item in done] == [("model_int8.tflite", True)]
    assert report is None and not (tmp_path / MIXED).exists()
    assert ("tflite: int8 repair failed: RuntimeError: the quantizer broke; model_int8.tflite "
            "is written and will be verified as it is") in [
        record.getMessage() for record in toolchain_log.records if record.levelname == "WARNING"]


def test_explain_without_repair_diagnoses_and_tries_nothing(sample_dir, tmp_path,
                                                             toolchain_log):
    done, report, _ = _export(sample_dir, tmp_path, no_repair=True, explain=True)
    assert [item.path.name for item in done] == ["model_int8.tflite"]
    assert report["needed"] and report["layers"] and report["steps"] == []
    assert not report["repaired"] and report["reason"] == ""
    warned = [r.getMessage() for r in toolchain_log.records if r.levelname == "WARNING"]
    assert any(line.endswith("not repaired: --tflite-no-repair") for line in warned), warned


def test_the_tuning_set_is_the_validation_split_when_it_is_large_enough(sample_dir):
    training, validation = _training(sample_dir), _subset(sample_dir, "validation")
    source = make_source(TINY_ARCH, training[:20], training[20:] + validation)
    paths, pixels, origin = _tflite_repair.tuning_set(source, 16, 25)
    assert paths == (training[20:] + validation)[:25] and len(pixels) == 25
    assert origin == {"validation": 25, "training": 0, "calibration": 0}
    # No validation split, few training images: the calibrating ones top it up, last.
    source = make_source(TINY_ARCH, training[:24])
    paths, _, origin = _tflite_repair.tuning_set(source, 16, 100)
    assert paths == training[16:24] + training[:12]
    assert origin == {"validation": 0, "training": 8, "calibration": 12}


def test_the_input_clause_counts_decisions_the_uint8_input_alone_changes():
    """A stand-in original whose decision hangs on 0.004 of brightness: raw pixel 128 reaches a
    uint8 input with zero point 128 as 0.0, not the preprocessing's 0.0039, and flips; 200 does
    not. Nothing flips with a zero point that reproduces the preprocessing exactly."""
    import tensorflow as tf

    from toolchain.backbones import Preprocessing

    pre = Preprocessing(scale=1 / 127.5, offset=(-1.0, -1.0, -1.0))

    @tf.function
    def function(x):
        total = tf.reduce_sum(x, axis=[1, 2, 3])
        return tf.nn.softmax(tf.stack([total * 1000.0, tf.ones_like(total)], axis=1))

    def source(pre: Preprocessing) -> targets.Source:
        return targets.Source(labels=("bright", "dark"), input_size=1, preprocessing=pre,
                              architecture="stand-in", user_defined={}, calibration=())

    pixels = np.array([np.full((1, 1, 3), 128), np.full((1, 1, 3), 200)], np.uint8)
    reference = _tuning.original(source(pre), pixels, function)
    clause = _tflite_repair.input_clause(source(pre), function, pixels, reference, 1 / 127.5, 128)
    assert clause == ("; the uint8 input alone (zero point 128, scale 0.00784314: each pixel "
                      "reaches the model up to 0.0039 off its preprocessing) already changes the "
                      "original's decision on 1 of 2 tuning images, which only a float input "
                      "removes")
    exact = Preprocessing(scale=1 / 128, offset=(-1.0, -1.0, -1.0))
    reference = _tuning.original(source(exact), pixels, function)
    assert _tflite_repair.input_clause(source(exact), function, pixels, reference, 1 / 128,
                                       128) == ""


def test_an_inexact_uint8_input_is_the_first_layer_a_repair_may_keep_in_float():
    """A mean of 127.5 has no whole zero point: every raw pixel lands half a step off, so the
    input leads the layers (every run from the input then takes a float input); an exact one
    (a mean of 128) is no layer at all."""
    from toolchain.backbones import Preprocessing

    class Quantizer:
        def layer_errors(self):
            return [("conv", "CONV_2D", 0.3)]

    half = Preprocessing(scale=1 / 127.5, offset=(-1.0, -1.0, -1.0))
    steps = _tflite_repair.input_steps(half, 1 / 127.5, 127)
    assert steps == pytest.approx(0.5, abs=1e-4)
    exact = Preprocessing(scale=1 / 128, offset=(-1.0, -1.0, -1.0))
    assert _tflite_repair.input_steps(exact, 1 / 128, 128) == pytest.approx(0.0, abs=1e-6)
    found = _tflite_repair._Candidates(Quantizer(), half, steps).layer_errors()
    assert found == [(_tflite_repair.FLOAT_INPUT, "QUANTIZE", steps), ("conv", "CONV_2D", 0.3)]
    assert _tflite_repair._Candidates(Quantizer(), exact, 0.0).layer_errors() == [
        ("conv", "CONV_2D", 0.3)]


def test_a_repaired_model_with_a_float_input_is_still_full_integer_int8(repaired, sample_dir):
    """The repaired file takes a float input normalized as its metadata says (what an app and
    the verifier's runners feed it), stays uint8 out, and is inspected as int8, not dynamic."""
    folder, _, report, _ = repaired
    assert report["float_layers"][0] == _tflite_repair.FLOAT_INPUT
    target = targets.get("tflite")
    found = target.inspect(folder / MIXED)
    assert target.precision(folder / MIXED) == found.precision == "int8"
    assert found.input.dtype == "float32"
    assert found.preprocessing == _source(sample_dir).preprocessing
    assert _interpreter(folder / MIXED).get_output_details()[0]["dtype"] == np.uint8

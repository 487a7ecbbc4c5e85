"""int8 repair (``targets._tflite_repair`` through the TFLite target and the converter): int8 is
measured on a tuning set of training images, its layers are diagnosed, the most harmful go back
to float until it agrees, and the result is its own artifact whose float layers are really float.

The model is the random-weight MobileNet v3 small of tests/helpers.py (int8 loses much of its
agreement: the case the repair exists for). Every image the converter reads is recorded, so the
held-out images are proven untouched.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

import targets
from targets import _tflite_repair
from targets.tflite import MIXED, QUANTIZATION_REPORT, TFLiteOptions
from tests.helpers import (
    METADATA,
    TINY_ARCH,
    held_out_paths,
    keras_probabilities,
    make_source,
    pixels_of,
)
from toolchain import images
from toolchain.conversion import convert

pytestmark = pytest.mark.slow

CALIBRATION = 16
TFLITE = targets.get("tflite")


def _training(sample_dir):
    from toolchain.dataset import scan

    return [entry.path for entry in scan(sample_dir).subset("training")]


def _export(sample_dir, folder, **options):
    """convert() of the tiny model to int8 TFLite, recording every image path it decodes."""
    read = []
    real = images.load_rgb

    def spy(path, size):
        read.append(path)
        return real(path, size)

    source = make_source(TINY_ARCH, _training(sample_dir))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(images, "load_rgb", spy)
        patch.setattr(_tflite_repair, "load_rgb", spy)
        done = convert(source, [(TFLITE, TFLiteOptions(calibration_images=CALIBRATION,
                                                       **options))], METADATA, folder)
    report = folder / QUANTIZATION_REPORT
    return done, (json.loads(report.read_text()) if report.exists() else None), read


@pytest.fixture(scope="module")
def repaired(sample_dir, tmp_path_factory):
    """Repaired to 0.65 agreement on the tuning set (plain int8: 0.58), with the whole float32
    size allowed: a target this random-weight model reaches with a few of its ~110 layers in
    float (measured: 16 give 0.68; 0.9 took 99 of them, 0.99 of float32's size)."""
    folder = tmp_path_factory.mktemp("repaired")
    return folder, *_export(sample_dir, folder, repair_agreement=0.65, max_size_ratio=1.0)


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


def _agreement(model, pixels, expected) -> float:
    """Top-1 agreement of a uint8-in, uint8-out model with ``expected`` (TensorFlow's own
    interpreter, not the toolchain's runners)."""
    interpreter = _interpreter(model)
    (given,), (output,) = interpreter.get_input_details(), interpreter.get_output_details()
    top = []
    for image in pixels:
        interpreter.set_tensor(given["index"], image[None])
        interpreter.invoke()
        top.append(int(interpreter.get_tensor(output["index"])[0].argmax()))
    return float(np.mean(np.array(top) == expected.argmax(1)))


def test_every_layer_it_lists_as_float_is_float_in_the_file(repaired, sample_dir):
    """Float in the repaired file; int8 in the same calibration quantized without repair."""
    from targets.tflite import _representative

    folder, _, report, _ = repaired
    source = make_source(TINY_ARCH, _training(sample_dir))
    plain = _tflite_repair._Quantizer(
        source, lambda: _representative(source, CALIBRATION)).quantize(())
    mixed, pure = _produced(folder / MIXED), _produced(plain)
    assert report["float_layers"]
    for name in report["float_layers"]:
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
    agreement = _agreement(folder / MIXED, pixels, expected)
    kept = len(report["float_layers"])
    chosen = next(step for step in report["steps"] if step["float_layers"] == kept)
    assert agreement == pytest.approx(chosen["top1_agreement"], abs=1e-5)  # 5 decimals
    plain = _agreement(folder / "model_int8.tflite", pixels, expected)
    assert plain == pytest.approx(report["int8"]["top1_agreement"], abs=1e-5)
    assert agreement >= report["target_top1_agreement"] > plain
    assert chosen["bytes"] <= report["budget_bytes"]
    # The layers kept in float are the most harmful of the diagnosis; each step tried more or
    # fewer of them, and the one kept is the fewest measured that met the target.
    assert report["float_layers"] == [layer["name"] for layer in report["layers"]][:kept]
    assert all(step["top1_agreement"] < report["target_top1_agreement"]
               for step in report["steps"] if step["float_layers"] < kept)


def test_the_diagnosis_ranks_every_quantized_layer_by_measured_harm(repaired):
    _, _, report, _ = repaired
    layers = report["layers"]
    assert len(layers) > 20  # MobileNet v3 small has ~110 quantized layers
    harms = [layer["harm"] for layer in layers]
    assert harms == sorted(harms, reverse=True) and harms[0] > 0
    assert {layer["op"] for layer in layers} >= {"CONV_2D", "DEPTHWISE_CONV_2D",
                                                  "FULLY_CONNECTED"}
    assert all(layer["rmse_per_step"] >= 0 for layer in layers)


def test_no_held_out_image_is_ever_read(repaired, sample_dir):
    _, _, report, read = repaired
    training = {str(path) for path in _training(sample_dir)}
    held_out = {str(path) for path in held_out_paths(sample_dir)}
    assert read and {str(path) for path in read} <= training
    assert not {str(path) for path in read} & held_out
    tuning = report["tuning"]
    assert set(tuning) <= training and not report["tuning_overlaps_calibration"]
    calibrating = [str(path) for path in _training(sample_dir)[:CALIBRATION]]
    assert not set(tuning) & set(calibrating)
    assert report["tuning_images"] == len(tuning) == len(training) - CALIBRATION


def test_a_budget_too_small_for_any_float_layer_says_why(repaired, sample_dir, tmp_path,
                                                          toolchain_log):
    _, _, first, _ = repaired
    ratio = (first["int8"]["bytes"] + 1) / first["float32_bytes"]
    (tmp_path / MIXED).write_bytes(b"a previous run's repaired model")
    done, report, _ = _export(sample_dir, tmp_path, repair_agreement=1.0, max_size_ratio=ratio)
    assert [item.path.name for item in done] == ["model_int8.tflite"]
    assert not (tmp_path / MIXED).exists()  # it belonged to another model
    assert report["needed"] and not report["repaired"] and report["steps"] == []
    assert "over the budget of" in report["reason"] and "0 layer(s) in float" in report["reason"]
    warned = [r.getMessage() for r in toolchain_log.records if r.levelname == "WARNING"]
    assert any("not repaired: keeping 1 layer(s) in float" in line for line in warned), warned


def test_int8_that_already_agrees_is_not_repaired(sample_dir, tmp_path, toolchain_log):
    done, report, _ = _export(sample_dir, tmp_path, repair_agreement=0.01)
    assert [item.path.name for item in done] == ["model_int8.tflite"]
    assert not report["needed"] and not report["repaired"] and report["layers"] == []
    assert any(line.getMessage().endswith("no repair needed") for line in toolchain_log.records)


def test_no_repair_writes_neither_the_report_nor_a_repaired_model(sample_dir, tmp_path):
    done, report, _ = _export(sample_dir, tmp_path, no_repair=True)
    assert [item.path.name for item in done] == ["model_int8.tflite"] and report is None


@pytest.mark.parametrize("flag, value, message", [
    ("repair_agreement", 0.0, "--tflite-repair-agreement 0.0 is not in (0, 1]"),
    ("max_size_ratio", 1.5, "--tflite-max-size-ratio 1.5 is not in (0, 1]"),
    ("tuning_images", 0, "--tflite-tuning-images must be at least 1"),
])
def test_bad_repair_options_are_one_line_errors(flag, value, message):
    from toolchain.errors import UsageError

    with pytest.raises(UsageError, match=f"^{message.replace('(', '[(]').replace(')', '[)]')}$"):
        TFLiteOptions(**{flag: value}).validate()


def test_the_tuning_set_falls_back_to_the_calibration_images_when_few_are_left(sample_dir):
    training = _training(sample_dir)
    source = make_source(TINY_ARCH, training)
    paths, pixels, overlaps = _tflite_repair.tuning_set(source, len(training) - 5, 100)
    assert overlaps and paths == training and len(pixels) == len(training)
    paths, _, overlaps = _tflite_repair.tuning_set(source, 10, 20)
    assert not overlaps and paths == training[10:30]

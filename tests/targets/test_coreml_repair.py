"""Core ML weight repair (``targets._coreml_repair`` through the Core ML target and the
converter): int8 or float16 weights are measured on a tuning set, each quantized layer is
diagnosed, the most harmful keep float weights until the model agrees, and the result is its own
artifact whose float layers really are float in the file.

Core ML's weight-only int8 barely moves the tests' random-weight model (it agrees on every
tuning image), so the model that needs repair has a head whose weights quantize badly without
changing what the float model predicts (``tests.helpers.badly_quantizing_model``). Every image
the converter reads is recorded, so the testing split is proven untouched.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

import targets
from targets import _coreml_repair, _tuning
from targets._coreml_spec import INT8_WEIGHT_THRESHOLD, mil_block, weight_precisions
from targets.coreml import CoreMLOptions, NumpyRunner, mixed_name
from tests.helpers import (
    HEAD,
    METADATA,
    TINY_ARCH,
    badly_quantizing_model,
    keras_probabilities,
    make_source,
    pixels_of,
)
from toolchain import images
from toolchain.conversion import convert
from toolchain.runtimes import load_spec

pytestmark = pytest.mark.slow

COREML = targets.get("coreml")


def _subset(sample_dir, name: str):
    from toolchain.dataset import scan

    return [entry.path for entry in scan(sample_dir).subset(name)]


def _source(sample_dir, kind: str | None):
    """The model with the sample data's training and validation splits, as ``toolchain
    convert`` gives a retrained model."""
    source = make_source(TINY_ARCH, _subset(sample_dir, "training"),
                         _subset(sample_dir, "validation"))
    if kind is not None:
        source.keras_model = badly_quantizing_model(kind)
    return source


def _export(sample_dir, folder, kind: str | None, **options):
    """convert() to Core ML, recording every image path it decodes; (done, record, read)."""
    read = []
    real = images.load_rgb

    def spy(path, size):
        read.append(path)
        return real(path, size)

    source = _source(sample_dir, kind)
    chosen = CoreMLOptions(**options)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(images, "load_rgb", spy)
        patch.setattr(_tuning, "load_rgb", spy)
        done = convert(source, [(COREML, chosen)], METADATA, folder)
    name = COREML.filename(chosen)
    record = folder / f"{name}.quantization.json"
    return done, (json.loads(record.read_text()) if record.exists() else None), read


@pytest.fixture(scope="module")
def repaired(sample_dir, tmp_path_factory):
    """The outlier head in an int8 NeuralNetwork: (folder, done, record, read)."""
    folder = tmp_path_factory.mktemp("coreml-repaired")
    return folder, *_export(sample_dir, folder, "outlier", precision="int8")


def _layers(spec) -> dict:
    kind = spec.WhichOneof("Type")
    return {layer.name: layer for layer in getattr(spec, kind).layers}


def _storage(layer) -> set[str]:
    """How a NeuralNetwork layer stores its weights."""
    found = set()
    for params in (value for field, value in getattr(layer, layer.WhichOneof("layer")).ListFields()
                   if field.message_type is not None
                   and field.message_type.name == "WeightParams"):
        found.add("float32" if len(params.floatValue) else "float16"
                  if len(params.float16Value) else "quantized" if len(params.rawValue) else "")
    return found - {""}


def _tuning_agreement(path, record, source) -> float:
    """Top-1 agreement with the Keras original on the record's tuning images, run by the
    NumPy executor from the written file."""
    pixels = pixels_of(record["tuning"], source.input_size)
    got = NumpyRunner(path)(pixels)
    return float(np.mean(got.argmax(1) == keras_probabilities(source, pixels).argmax(1)))


def test_the_harmful_head_is_found_first_and_kept_in_float(repaired):
    folder, done, record, _ = repaired
    assert [(item.target, item.path.name) for item in done] == [
        ("coreml", "model_int8.mlmodel"), ("coreml", "model_int8_mixed.mlmodel")]
    assert all(item.ok for item in done)
    assert record["precision"] == "int8" and record["needed"] and record["repaired"]
    assert record["int8"]["top1_agreement"] < 0.98
    head = record["layers"][0]
    assert head["name"].endswith(f"{HEAD}/MatMul")
    assert head["harm"] > 10 * record["layers"][1]["harm"]
    # The head alone in float agrees on every tuning image. 20 images cannot show 0.98, so
    # the repair then spends its budget: as many more layers as fit go float in one candidate.
    first = next(step for step in record["steps"] if step["kept"])
    assert (first["trial"], first["layer"], first["top1_agreement"]) == ("layer", head["name"],
                                                                         1.0)
    assert record["aim_top1_agreement"] == 1.0
    assert record["tuning_shows"].startswith("20 tuning images cannot show 0.98")
    assert record["float_layers"][0] == head["name"]
    spent = record["steps"][-1]
    assert spent["trial"] == "budget" and spent["kept"] and spent["top1_agreement"] == 1.0
    assert spent["float_layers"] == len(record["float_layers"]) > 1
    assert spent["bytes"] <= record["budget_bytes"]
    found = COREML.inspect(folder / "model_int8_mixed.mlmodel")
    assert found.precision == "int8" and found.details["weights"] == ["float32", "int8"]
    assert json.loads(found.user_defined["float_layers"]) == record["float_layers"]
    assert found.user_defined["quantization"] == (
        f"int8, {len(record['float_layers'])} layer(s) kept in float32 (toolchain's repair)")


def test_every_layer_it_lists_as_float_is_float_in_the_file(repaired):
    """Float weights in the repaired file exactly where the record says; every other layer
    stored as in the plain int8 file."""
    folder, _, record, _ = repaired
    plain = _layers(load_spec(folder / "model_int8.mlmodel"))
    mixed = _layers(load_spec(folder / "model_int8_mixed.mlmodel"))
    assert list(plain) == list(mixed)
    floated = set(record["float_layers"])
    for name, layer in mixed.items():
        if name in floated:
            assert _storage(plain[name]) == {"quantized"} and _storage(layer) == {"float32"}
        else:
            assert _storage(layer) == _storage(plain[name]), name


def test_its_agreement_on_the_tuning_images_is_what_the_record_says(repaired, sample_dir):
    folder, _, record, _ = repaired
    source = _source(sample_dir, "outlier")
    assert _tuning_agreement(folder / "model_int8_mixed.mlmodel", record, source) == \
        pytest.approx(record["steps"][-1]["top1_agreement"])
    assert _tuning_agreement(folder / "model_int8.mlmodel", record, source) == \
        pytest.approx(record["int8"]["top1_agreement"])


def test_no_testing_image_is_ever_read(repaired, sample_dir):
    _, _, record, read = repaired
    testing = {str(path) for path in _subset(sample_dir, "testing")}
    read = {str(path) for path in read}
    assert read and testing and not read & testing
    validation, training = _subset(sample_dir, "validation"), _subset(sample_dir, "training")
    # Weight-only quantization calibrates nothing: the top-up starts at the first training image.
    top_up = _tuning.MIN_TUNING - len(validation)
    assert record["tuning"] == [str(path) for path in validation + training[:top_up]]
    assert record["tuning_from"] == {"validation": len(validation), "training": top_up,
                                     "calibration": 0}


def test_float16_weights_keep_the_harmful_head_in_float32(sample_dir, tmp_path):
    done, record, _ = _export(sample_dir, tmp_path, "offset", precision="float16")
    assert [item.path.name for item in done] == ["model_float16.mlmodel",
                                                 "model_float16_mixed.mlmodel"]
    assert record["precision"] == "float16" and record["target_top1_agreement"] == 0.995
    assert record["int8"]["top1_agreement"] < 0.995 <= record["steps"][-1]["top1_agreement"]
    assert record["layers"][0]["name"].endswith(f"{HEAD}/MatMul")
    mixed = _layers(load_spec(tmp_path / "model_float16_mixed.mlmodel"))
    assert record["float_layers"][0] == record["layers"][0]["name"]
    assert {name for name, layer in mixed.items() if _storage(layer) == {"float32"}} == \
        set(record["float_layers"])
    assert COREML.inspect(tmp_path / "model_float16_mixed.mlmodel").precision == "float16"
    assert record["budget_bytes"] == int(0.75 * record["float32_bytes"])


def test_an_ml_program_keeps_the_harmful_head_float_in_its_package(sample_dir, tmp_path):
    done, record, _ = _export(sample_dir, tmp_path, "outlier", format="mlprogram",
                              precision="int8")
    mixed = tmp_path / "model_int8_mixed.mlpackage"
    assert [item.path.name for item in done] == ["model_int8.mlpackage", mixed.name]
    assert record["repaired"] and record["int8"]["top1_agreement"] < 0.98
    head = record["float_layers"][0]
    assert head.endswith(f"{HEAD}_MatMul") and record["layers"][0]["name"] == head
    spec = load_spec(mixed)
    assert weight_precisions(spec) == {"float32", "int8"}
    # The op named in the record reads a float const; every other large weight is int8.
    block = mil_block(spec)
    producers = {op.outputs[0].name: op for op in block.operations}
    (reader,) = [op for op in block.operations if op.outputs[0].name == head]
    weights = [producers[arg.name] for value in reader.inputs.values()
               for arg in value.arguments if arg.name in producers]
    large = [op.type for op in weights if np.prod([dim.constant.size for dim in
                                                   op.outputs[0].type.tensorType.dimensions])
             > INT8_WEIGHT_THRESHOLD]
    assert large == ["const"]
    source = _source(sample_dir, "outlier")
    assert _tuning_agreement(mixed, record, source) == \
        pytest.approx(record["steps"][-1]["top1_agreement"])


def test_weights_that_already_agree_are_measured_and_not_repaired(sample_dir, tmp_path,
                                                                   toolchain_log):
    done, record, _ = _export(sample_dir, tmp_path, None, precision="int8")
    assert [item.path.name for item in done] == ["model_int8.mlmodel"]
    assert not record["needed"] and not record["repaired"] and record["layers"] == []
    assert record["int8"]["top1_agreement"] >= 0.98
    assert any(line.getMessage().endswith("no repair needed") for line in toolchain_log.records)


def test_explain_diagnoses_every_quantized_layer(sample_dir, tmp_path):
    _, record, _ = _export(sample_dir, tmp_path, None, precision="int8", explain=True)
    plain = _layers(load_spec(tmp_path / "model_int8.mlmodel"))
    quantized = {name for name, layer in plain.items() if _storage(layer) & {"quantized"}}
    assert {layer["name"] for layer in record["layers"]} == quantized
    assert all(0 < layer["rmse_per_step"] <= 0.5 for layer in record["layers"])
    harms = [layer["harm"] for layer in record["layers"]]
    assert harms == sorted(harms, reverse=True) and record["steps"] == []


def test_a_budget_too_small_for_any_float_layer_says_why(repaired, sample_dir, tmp_path,
                                                          toolchain_log):
    _, _, first, _ = repaired
    ratio = (first["int8"]["bytes"] + 1) / first["float32_bytes"]
    (tmp_path / "model_int8_mixed.mlmodel").write_bytes(b"a previous run's repaired model")
    done, record, _ = _export(sample_dir, tmp_path, "outlier", precision="int8",
                              max_size_ratio=ratio)
    assert [item.path.name for item in done] == ["model_int8.mlmodel"]
    assert not (tmp_path / "model_int8_mixed.mlmodel").exists()  # it belonged to another model
    assert record["needed"] and not record["repaired"] and record["steps"] == []
    layers = len(record["layers"])
    assert record["reason"].startswith(
        f"{layers} layer(s) tried in float one at a time, 0 kept (each made it agree better), "
        f"{layers} passed over: each would have taken the model over the budget of ")
    warned = [r.getMessage() for r in toolchain_log.records if r.levelname == "WARNING"]
    assert any(f"not repaired: {layers} layer(s) tried" in line for line in warned), warned


def test_no_repair_and_float16_compute_write_no_record(sample_dir, tmp_path, toolchain_log):
    done, record, _ = _export(sample_dir, tmp_path, None, precision="int8", no_repair=True)
    assert [item.path.name for item in done] == ["model_int8.mlmodel"] and record is None
    done, record, _ = _export(sample_dir, tmp_path, None, format="mlprogram",
                              precision="float16", explain=True)
    assert [item.path.name for item in done] == ["model_float16.mlpackage"] and record is None
    assert any("float16 compute, not weights" in line.getMessage()
               for line in toolchain_log.records)


def test_a_failed_repair_is_a_warning_and_keeps_the_quantized_artifact(sample_dir, tmp_path,
                                                                        monkeypatch,
                                                                        toolchain_log):
    from toolchain.errors import ConversionError

    def broken(*args, **kwargs):
        raise ConversionError("int8 repair failed: RuntimeError: the executor broke")

    monkeypatch.setattr(_coreml_repair, "repair", broken)
    done, record, _ = _export(sample_dir, tmp_path, "outlier", precision="int8")
    assert [(item.path.name, item.ok) for item in done] == [("model_int8.mlmodel", True)]
    assert record is None and not (tmp_path / "model_int8_mixed.mlmodel").exists()
    assert ("coreml: int8 repair failed: RuntimeError: the executor broke; model_int8.mlmodel "
            "is written and will be verified as it is") in [
        r.getMessage() for r in toolchain_log.records if r.levelname == "WARNING"]


def test_the_mixed_name_and_the_record_follow_the_artifact():
    assert mixed_name("out/model_int8.mlmodel") == "model_int8_mixed.mlmodel"
    assert mixed_name("model_int8.mlpackage") == "model_int8_mixed.mlpackage"

"""Diagnosis of TFLite's weight-only variants (``targets._tflite_weights`` through the TFLite
target): ``dynamic`` and ``float16`` are measured on the tuning set as written, their layers are
diagnosed on the float32 model with one layer's weights as the variant stores them, and the
record says that no repair exists for them.

The model whose weights quantize badly is ``tests.helpers.badly_quantizing_model`` (its float
probabilities are the tiny model's; its head's weights are not storable in int8 / float16).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from targets import _tflite_weights
from targets.tflite import MIXED, TFLiteOptions, TFLiteTarget, quantization_report
from tests.helpers import (
    HEAD,
    METADATA,
    TINY_ARCH,
    badly_quantizing_model,
    keras_probabilities,
    make_source,
    pixels_of,
)

pytestmark = pytest.mark.slow

TFLITE = TFLiteTarget()


def _subset(sample_dir, name: str):
    from toolchain.dataset import scan

    return [entry.path for entry in scan(sample_dir).subset(name)]


def _source(sample_dir, kind: str | None):
    source = make_source(TINY_ARCH, _subset(sample_dir, "training"),
                         _subset(sample_dir, "validation"))
    if kind is not None:
        source.keras_model = badly_quantizing_model(kind)
    return source


def _export(sample_dir, folder, kind, **options):
    chosen = TFLiteOptions(**options)
    path = TFLITE.export(_source(sample_dir, kind), chosen, METADATA,
                         folder / TFLITE.filename(chosen))
    report = quantization_report(path)
    return path, (json.loads(report.read_text()) if report.exists() else None)


def _agreement(path, record, source) -> float:
    """Top-1 agreement of the written model (TensorFlow's interpreter, float input) with the
    Keras original on the record's tuning images."""
    import tensorflow as tf

    pixels = pixels_of(record["tuning"], source.input_size)
    interpreter = tf.lite.Interpreter(model_path=str(path))
    interpreter.allocate_tensors()
    (given,), (output,) = interpreter.get_input_details(), interpreter.get_output_details()
    top = []
    for image in pixels:
        interpreter.set_tensor(given["index"],
                               source.preprocessing.apply(image[None]).astype(np.float32))
        interpreter.invoke()
        top.append(int(interpreter.get_tensor(output["index"])[0].argmax()))
    return float(np.mean(np.array(top) == keras_probabilities(source, pixels).argmax(1)))


@pytest.mark.parametrize("variant, kind, target", [("dynamic", "outlier", 0.98),
                                                   ("float16", "offset", 0.995)])
def test_a_weight_variant_that_disagrees_is_diagnosed_and_says_why_not_repaired(
        sample_dir, tmp_path, toolchain_log, variant, kind, target):
    path, record = _export(sample_dir, tmp_path, kind, variant=variant)
    assert record["artifact"] == path.name and record["precision"] == variant
    assert record["target_top1_agreement"] == target
    assert record["needed"] and not record["repaired"] and record["steps"] == []
    assert record["reason"] == _tflite_weights.NO_REPAIR.format(variant=variant)
    assert record["int8"]["top1_agreement"] < target
    assert record["int8"]["top1_agreement"] == pytest.approx(
        _agreement(path, record, _source(sample_dir, kind)))
    head, second = record["layers"][:2]
    assert HEAD in head["name"] and head["op"] == "FULLY_CONNECTED"
    assert head["harm"] > 10 * second["harm"]
    assert not (tmp_path / MIXED).exists()
    warned = [r.getMessage() for r in toolchain_log.records if r.levelname == "WARNING"]
    assert any(f"{len(record['layers'])} layer(s) diagnosed in {quantization_report(path).name}"
               in line for line in warned), warned
    assert TFLITE.diagnosis(path) == record


def test_dynamic_diagnoses_exactly_the_layers_the_converter_quantized(sample_dir, tmp_path):
    """The int8 weights of each diagnosed layer are read from the dynamic model itself: the
    layers it left float (small weights) are not in the table."""
    import tensorflow as tf

    path, record = _export(sample_dir, tmp_path, None, variant="dynamic", explain=True)
    # --tflite-explain diagnoses every layer whether or not dynamic met its aim, which depends
    # on the CPU's kernels (19 or 20 of the 20 tuning images).
    assert record["layers"] and record["reason"] == (
        _tflite_weights.NO_REPAIR.format(variant="dynamic") if record["needed"] else "")
    interpreter = tf.lite.Interpreter(model_path=str(path))
    tensors = {d["index"]: d for d in interpreter.get_tensor_details()}
    quantized = {tensors[op["outputs"][0]]["name"] for op in interpreter._get_ops_details()
                 if op["op_name"] in _tflite_weights.WEIGHT_OPS
                 and tensors[op["inputs"][1]]["dtype"] == np.int8}
    assert {layer["name"] for layer in record["layers"]} == quantized
    assert all(0 < layer["rmse_per_step"] <= 0.5 for layer in record["layers"])


def test_without_images_a_weight_variant_is_written_and_not_measured(tmp_path, toolchain_log):
    chosen = TFLiteOptions(variant="float16")
    path = TFLITE.export(make_source(TINY_ARCH), chosen, METADATA,
                         tmp_path / TFLITE.filename(chosen))
    assert path.is_file() and not quantization_report(path).exists()
    assert any("is not measured (pass --image-dir)" in r.getMessage()
               for r in toolchain_log.records)


def test_the_record_of_each_variant_is_named_after_it():
    assert quantization_report("out/model_int8.tflite").name == "model_int8.quantization.json"
    assert quantization_report(f"out/{MIXED}").name == "model_int8.quantization.json"
    assert quantization_report("model_dynamic.tflite").name == \
        "model_dynamic.quantization.json"

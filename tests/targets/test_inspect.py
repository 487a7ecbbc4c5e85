"""The artifact inspector: what each target writes, read back from the file alone.

Golden files in ``tests/targets/golden/`` hold the inspected record of one tiny model per target
and variant, so any change in what the toolchain writes (labels, input, preprocessing,
precision, metadata, outputs, format details) shows up as a diff in review. After an intended
change, regenerate them with ``UPDATE_GOLDEN=1`` (the run then fails, saying so, so a
regeneration is never silent) and review the diff.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest

import targets
from targets import ArtifactRecord, ImageInput, differences
from tests.helpers import TINY_ARCH
from toolchain.backbones import Preprocessing
from toolchain.errors import ConversionError

GOLDEN = Path(__file__).parent / "golden"
#: What coremltools writes that changes from run to run.
VOLATILE = {"com.github.apple.coremltools.conversion_date": "<date of conversion>"}
CASES = [("coreml", fmt, precision) for fmt in ("neuralnetwork", "mlprogram")
         for precision in ("float32", "float16", "int8")] + [
    ("tflite", "tflite", variant) for variant in ("float32", "float16", "dynamic", "int8")]


def _record(target: str, fmt: str, precision: str, coreml_export, tflite_export) -> dict:
    if target == "coreml":
        path, _ = coreml_export(TINY_ARCH, fmt, precision)
    else:
        path = tflite_export(TINY_ARCH, precision)
    record = targets.get(target).inspect(path).record()
    for key, placeholder in VOLATILE.items():
        if key in record["user_defined"]:
            record["user_defined"][key] = placeholder
    return record


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=["-".join(case) for case in CASES])
def test_inspected_record_matches_the_golden_file(case, coreml_export, tflite_export):
    record = _record(*case, coreml_export, tflite_export)
    golden = GOLDEN / f"{'-'.join(case)}.json"
    text = json.dumps(record, indent=2, ensure_ascii=False, sort_keys=True) + "\n"
    if os.environ.get("UPDATE_GOLDEN") == "1":
        golden.write_text(text, encoding="utf-8")
        pytest.fail(f"rewrote {golden.name}: review the diff, then run without UPDATE_GOLDEN")
    assert golden.is_file(), f"no golden file {golden.name}: run once with UPDATE_GOLDEN=1"
    assert text == golden.read_text(encoding="utf-8")


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=["-".join(case) for case in CASES])
def test_precision_is_the_inspected_one(case, coreml_export, tflite_export):
    target, fmt, precision = case
    path = (coreml_export(TINY_ARCH, fmt, precision)[0] if target == "coreml"
            else tflite_export(TINY_ARCH, precision))
    assert targets.get(target).precision(path) == precision
    found = targets.get(target).inspect(path)
    assert (found.format, found.precision, found.input_size) == (fmt, precision, 96)


def _record_like(**changes) -> ArtifactRecord:
    base = ArtifactRecord(
        target="tflite", format="tflite", precision="int8", labels=("a", "b"),
        input=ImageInput("image", 96, 96, "RGB", "uint8"),
        preprocessing=Preprocessing(1 / 127.5, (-1.0, -1.0, -1.0)), outputs=("probability",),
        metadata={"name": "n", "author": "x"}, user_defined={"architecture": "m"},
        details={"packed_files": ["labels.txt"]})
    return dataclasses.replace(base, **changes)


@pytest.mark.parametrize("changes, message", [
    ({"labels": ("b", "a")}, "labels reads back as ['b', 'a'], expected ['a', 'b']"),
    ({"precision": "float32"}, "precision reads back as 'float32', expected 'int8'"),
    ({"input": ImageInput("image", 96, 64, "RGB", "uint8")}, "input reads back as"),
    ({"preprocessing": Preprocessing(1 / 255, (0.0, 0.0, 0.0))}, "preprocessing reads back as"),
    ({"preprocessing": None}, "preprocessing reads back as none"),
    ({"metadata": {"name": "n", "author": "y"}}, "metadata author reads back as 'y', expected 'x'"),
    ({"metadata": {"name": "n"}}, "metadata author reads back as None, expected 'x'"),
    ({"user_defined": {}}, "user_defined architecture reads back as None, expected 'm'"),
    ({"details": {}}, "packed_files reads back as None, expected ['labels.txt']"),
    ({"outputs": ("other",)}, "outputs reads back as ['other']"),
])
def test_differences_name_each_field(changes, message):
    assert any(message in problem for problem in differences(_record_like(),
                                                             _record_like(**changes)))
    assert differences(_record_like(), _record_like()) == []


def test_preprocessing_is_compared_as_numbers_not_bits():
    import numpy as np

    float32 = Preprocessing(float(np.float32(1 / 127.5)), (-1.0, -1.0, -1.0))
    assert differences(_record_like(), _record_like(preprocessing=float32)) == []


def test_extra_user_defined_keys_from_libraries_are_not_differences():
    found = _record_like(user_defined={"architecture": "m", "com.github.apple.x": "9.0"})
    assert differences(_record_like(), found) == []


def test_check_written_raises_one_line_naming_every_field(tmp_path, monkeypatch):
    target = targets.get("tflite")
    monkeypatch.setattr(target, "inspect", lambda path: _record_like(labels=("z",),
                                                                     precision="float16"))
    with pytest.raises(ConversionError) as raised:
        target.check_written(tmp_path / "x.tflite", "model_int8.tflite", _record_like())
    text = str(raised.value)
    assert text.startswith("tflite: model_int8.tflite read back wrong: ")
    assert "labels reads back as ['z']" in text and "precision reads back as 'float16'" in text
    assert "\n" not in text

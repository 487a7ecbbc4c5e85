"""Tests for the TFLite target (``targets.tflite``): variants, metadata, runners, failures.

Every family converts to every variant once per session (``tflite_export`` in tests/conftest.py:
the artifacts are shared with the sample-app, install and label tests). Agreement is measured
against the Keras model on the sample data's held-out images, with the tempered test models of
tests/helpers.py (outputs like a trained model's, so probability differences mean something).
"""

from __future__ import annotations

import builtins
import dataclasses
import json

import numpy as np
import pytest

import targets
from targets import _tflite_runners, tflite
from targets.tflite import LABEL_FILE, PROVENANCE_FILE, VARIANTS, TFLiteOptions, TFLiteTarget
from tests.helpers import (
    FAMILY_ARCHS,
    HEAD_SCALE,
    HELD_OUT,
    LABELS,
    METADATA,
    TFLITE_RUNTIMES,
    TFLITE_TOLERANCE,
    held_out_paths,
    keras_probabilities,
    make_source,
    pixels_of,
    within,
)
from toolchain.errors import MissingSystemLibrary, ModelError, ToolchainError, UsageError

FAST_ARCH = "mobilenet_0.25_128"
#: A uint8 output's probabilities sum to 1 within a few steps of 1/256: measured at most 0.0078
#: (2 steps) over every family.
INT8_SUM = 0.012


@pytest.fixture(scope="module")
def target() -> TFLiteTarget:
    return targets.get("tflite")


@pytest.fixture(scope="module")
def exported(tflite_export):
    """``exported(arch, variant)``: the session's shared export, alone in its folder with its
    ``labels.txt``."""
    return tflite_export


@pytest.fixture(scope="module")
def held_out(sample_dir):
    """Held-out sample images (validation and testing: never used for calibration)."""
    paths = held_out_paths(sample_dir)
    assert len(paths) == HELD_OUT, "the tolerances were measured on 18 images"
    return paths


def _displayed(path):
    from tflite_support import metadata

    displayer = metadata.MetadataDisplayer.with_model_file(str(path))
    return displayer, json.loads(displayer.get_metadata_json())


def _tensor_types(path) -> tuple[set[str], str, str]:
    import tensorflow as tf

    interpreter = tf.lite.Interpreter(model_path=str(path))
    types = {detail["dtype"].__name__ for detail in interpreter.get_tensor_details()}
    return (types, interpreter.get_input_details()[0]["dtype"].__name__,
            interpreter.get_output_details()[0]["dtype"].__name__)


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("architecture", FAMILY_ARCHS)
def test_every_family_converts_to_every_variant(exported, architecture, variant):
    from toolchain import backbones

    path = exported(architecture, variant)
    assert path.name == f"model_{variant}.tflite" and path.is_file()
    assert sorted(p.name for p in path.parent.iterdir()) == [LABEL_FILE, path.name]  # no debris
    assert (path.parent / LABEL_FILE).read_text(encoding="utf-8").splitlines() == list(LABELS)

    displayer, document = _displayed(path)
    for key in ("name", "description", "version", "author", "license"):
        assert document[key] == getattr(METADATA, key)
    assert sorted(displayer.get_packed_associated_file_list()) == [LABEL_FILE, PROVENANCE_FILE]
    assert displayer.get_associated_file_buffer(LABEL_FILE).decode("utf-8").split("\n")[:-1] \
        == list(LABELS)
    # the Source's provenance, as Core ML keeps it in userDefined
    assert json.loads(displayer.get_associated_file_buffer(PROVENANCE_FILE)) == \
        make_source(architecture).user_defined
    assert [(f["name"], f["type"]) for f in document["associated_files"]] == \
        [(PROVENANCE_FILE, "DESCRIPTIONS")]
    subgraph = document["subgraph_metadata"][0]
    [output] = subgraph["output_tensor_metadata"]
    assert [(f["name"], f["type"]) for f in output["associated_files"]] == \
        [(LABEL_FILE, "TENSOR_AXIS_LABELS")]
    [unit] = subgraph["input_tensor_metadata"][0]["process_units"]
    assert unit["options_type"] == "NormalizationOptions"
    pre = backbones.get(architecture).preprocessing
    np.testing.assert_allclose(unit["options"]["mean"], pre.mean, rtol=1e-6)
    np.testing.assert_allclose(unit["options"]["std"], pre.std, rtol=1e-6)
    assert TFLiteTarget().inspect(path).labels == LABELS

    types, input_type, output_type = _tensor_types(path)
    if variant == "int8":  # full-integer: no float tensor anywhere, so every op is integer
        assert (input_type, output_type) == ("uint8", "uint8")
        assert types <= {"uint8", "int8", "int32"}, types
    else:
        assert (input_type, output_type) == ("float32", "float32")
        assert {"dynamic": "int8", "float16": "float16", "float32": "float32"}[variant] in types
        others = {"dynamic": {"float16", "uint8"}, "float16": {"int8", "uint8"},
                  "float32": {"int8", "uint8", "float16"}}[variant]
        assert not types & others, types


@pytest.mark.slow
@pytest.mark.parametrize("architecture", FAMILY_ARCHS)
def test_sizes_order_by_precision(exported, architecture):
    size = {variant: exported(architecture, variant).stat().st_size for variant in VARIANTS}
    assert max(size["int8"], size["dynamic"]) < size["float16"] < size["float32"], size


@pytest.mark.slow
def test_the_shared_test_models_are_tempered(sample_dir):
    """The premise of every tolerance here: on the sample images the shared test models'
    top probability is well above the others (median 0.60, runner-up about 0.2: see
    tests.helpers.HEAD_SCALE), neither near uniform nor saturated."""
    from toolchain.dataset import scan

    paths = [entry.path for entry in scan(sample_dir).entries]
    assert len(paths) == 72
    for architecture in HEAD_SCALE:
        source = make_source(architecture)
        ranked = np.sort(keras_probabilities(source, pixels_of(paths, source.input_size)), 1)
        top, second = np.median(ranked[:, -1]), np.median(ranked[:, -2])
        assert 0.58 <= top <= 0.62 and 0.15 <= second <= 0.25, (architecture, top, second)


RUNTIMES = list(TFLITE_RUNTIMES)


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("architecture", FAMILY_ARCHS)
def test_runners_agree_with_keras(exported, target, held_out, architecture, variant):
    """Every runner, every family and variant, within the measured TFLITE_TOLERANCE: a distance
    in probability, which holds on every CPU, not a count of changed labels, which does not
    (tests/helpers.py). The full-size runners, fed pixels already at the input size, are their
    runtimes."""
    source = make_source(architecture)
    pixels = pixels_of(held_out, source.input_size)
    expected = keras_probabilities(source, pixels)
    results = {}
    with target.runners(exported(architecture, variant)) as runners:
        assert [r.runtime for r in runners] == RUNTIMES
        for runner in runners:
            assert runner.labels == LABELS and runner.input_size == source.input_size
            results[runner.runtime] = probabilities = runner(pixels)
            assert probabilities.dtype == np.float32
            within(probabilities, expected, TFLITE_TOLERANCE[architecture, variant],
                   runner.runtime)
    if variant == "int8":  # the same integer kernels: identical (measured: equal bit for bit)
        np.testing.assert_allclose(results["tflite-interpreter"],
                                   results["tflite-task-library"], atol=1e-6)
        np.testing.assert_allclose(results["tflite-interpreter"].sum(1), 1.0, atol=INT8_SUM)


@pytest.mark.slow
def test_runners_read_labels_from_the_model_not_the_side_file(exported, target, tmp_path):
    lone = tmp_path / "model.TFLITE"
    lone.write_bytes(exported(FAST_ARCH, "float32").read_bytes())
    (tmp_path / LABEL_FILE).write_text("wrong\nlabels\n", encoding="utf-8")
    with target.runners(lone) as runners:
        assert [runner.labels for runner in runners] == [LABELS] * len(RUNTIMES)


@pytest.mark.slow
def test_calibration_uses_only_the_sources_images(target, tmp_path):
    source = make_source(FAST_ARCH, calibration=())
    with pytest.raises(UsageError) as info:
        target.export(source, TFLiteOptions(variant="int8"), METADATA,
                      tmp_path / "model_int8.tflite")
    assert "calibration images" in info.value.message and "\n" not in str(info.value)
    assert list(tmp_path.iterdir()) == []
    path = target.export(source, TFLiteOptions(variant="float32"), METADATA, tmp_path / "m.tflite")
    assert path.is_file()


@pytest.mark.slow
def test_unreadable_calibration_images_fail_in_one_line(target, tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(UsageError, match="none of the 1 calibration images can be read"):
        target.export(make_source(FAST_ARCH, [broken]), TFLiteOptions(variant="int8"), METADATA,
                      out / "model_int8.tflite")
    assert list(out.iterdir()) == []


@pytest.mark.slow
def test_dim_calibration_images_still_give_a_raw_pixel_input(target, calibration_images,
                                                             tmp_path):
    """The uint8 input must take raw 0..255 pixels even when no training image spans 0..255."""
    import tensorflow as tf
    from PIL import Image

    from toolchain.images import load_rgb

    dim = []
    for index, path in enumerate(calibration_images[:8]):
        pixels = load_rgb(path, 128).astype(np.float32) * 0.4 + 40  # 40..142
        dim.append(tmp_path / f"dim{index}.png")
        Image.fromarray(pixels.astype(np.uint8)).save(dim[-1])
    out = tmp_path / "out"
    out.mkdir()
    path = target.export(make_source(FAST_ARCH, dim), TFLiteOptions(variant="int8"), METADATA,
                         out / "model_int8.tflite")
    scale, zero = tf.lite.Interpreter(model_path=str(path)).get_input_details()[0]["quantization"]
    assert scale == pytest.approx(1 / 127.5, rel=1e-3) and zero in (127, 128)


@pytest.mark.slow
def test_int8_refuses_preprocessing_a_uint8_input_cannot_express(target, calibration_images,
                                                                tmp_path):
    from toolchain.backbones import Preprocessing

    source = dataclasses.replace(make_source(FAST_ARCH, calibration_images[:8]),
                                 preprocessing=Preprocessing(1 / 127.5, (-0.97, -0.92, -0.81)))
    with pytest.raises(ToolchainError, match="does not reproduce the preprocessing"):
        target.export(source, TFLiteOptions(variant="int8"), METADATA,
                      tmp_path / "model_int8.tflite")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
@pytest.mark.parametrize("change, message", [
    (lambda source, metadata: (dataclasses.replace(source, labels=LABELS[::-1]), metadata),
     "labels reads back as"),
    (lambda source, metadata: (source, dataclasses.replace(metadata, author="someone else")),
     "author reads back as 'someone else'"),
    (lambda source, metadata: (dataclasses.replace(source, preprocessing=dataclasses.replace(
        source.preprocessing, scale=1 / 255)), metadata), "preprocessing reads back as"),
], ids=["labels", "author", "normalization"])
def test_metadata_read_back_catches_a_mismatch(target, monkeypatch, tmp_path, change, message):
    """The writer is made to embed something else than what the check expects."""
    real = tflite.with_metadata
    monkeypatch.setattr(tflite, "with_metadata",
                        lambda model, source, metadata: real(model, *change(source, metadata)))
    with pytest.raises(ToolchainError, match=message) as info:
        target.export(make_source(FAST_ARCH), TFLiteOptions(variant="float32"), METADATA,
                      tmp_path / "model_float32.tflite")
    assert "\n" not in str(info.value)
    assert list(tmp_path.iterdir()) == []  # no artifact under its final name, no temporary file


def test_options_validate_and_parse(target):
    from toolchain.cli import options_for

    assert TFLiteOptions() == TFLiteOptions(variant="int8", calibration_images=100)
    with pytest.raises(UsageError, match="--tflite-variant takes int8, dynamic, float16 or "
                                         "float32, not 'int4'"):
        TFLiteOptions(variant="int4")
    with pytest.raises(UsageError, match="at least 1"):
        TFLiteOptions(variant="int8", calibration_images=0)
    base = ["convert", "--model", "m", "--target", "tflite"]
    assert options_for(base).target_options.tflite == TFLiteOptions()
    args = [*base, "--tflite-variant", "float16", "--tflite-calibration-images", "7"]
    assert options_for(args).target_options.tflite == TFLiteOptions(variant="float16",
                                                                    calibration_images=7)
    with pytest.raises(UsageError):
        options_for([*base, "--tflite-calibration-images", "0"])
    assert [target.filename(TFLiteOptions(variant=v)) for v in VARIANTS] == [
        "model_int8.tflite", "model_dynamic.tflite", "model_float16.tflite",
        "model_float32.tflite"]


def test_opens_only_tflite_files(target, tmp_path):
    for name in ("a.tflite", "b.TFLITE", "c.TfLite", "d.mlmodel", "e.tflite.bak", "f.pb"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "folder.tflite").mkdir()
    found = sorted(p.name for p in tmp_path.iterdir() if target.opens(p))
    assert found == ["a.tflite", "b.TFLITE", "c.TfLite"]
    assert not target.opens(tmp_path / "missing.tflite")
    assert targets.for_artifact(tmp_path / "b.TFLITE") is target


def test_a_model_without_metadata_is_a_model_error(target, tmp_path):
    import tensorflow as tf

    function = tf.function(lambda x: x * 2.0).get_concrete_function(
        tf.TensorSpec([1, 8, 8, 3], tf.float32))
    bare = tmp_path / "bare.tflite"
    bare.write_bytes(tf.lite.TFLiteConverter.from_concrete_functions([function]).convert())
    found = target.inspect(bare)  # what the file says: no labels, no normalisation
    assert (found.labels, found.preprocessing, found.metadata) == ((), None, {})
    with pytest.raises(ModelError, match="no readable TFLite metadata with labels.txt"):
        target.runners(bare)


def _fail_import(monkeypatch, text: str, package: str = "tflite_support") -> None:
    """Make every import of ``package`` raise ImportError(text)."""
    real = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name.split(".")[0] == package:
            raise ImportError(text)
        return real(name, *args, **kwargs)
    monkeypatch.setattr(builtins, "__import__", fake_import)


@pytest.mark.slow
def test_missing_libusb_only_keeps_the_task_library_from_running(target, exported, tmp_path,
                                                                 monkeypatch):
    """tflite-support is needed by nothing but the Task Library runtime: without libusb the
    export, the inspector and the interpreter work, and the Task Library's absence is named
    with the fix, in one line."""
    _fail_import(monkeypatch, "libusb-1.0.so.0: cannot open shared object file: "
                              "No such file or directory")
    with pytest.raises(MissingSystemLibrary) as info:
        _tflite_runners.support()
    assert str(info.value) == ("tflite-support needs the system library libusb-1.0-0, "
                               "which is not installed")
    assert info.value.hint == "on Debian/Ubuntu: apt-get install libusb-1.0-0"
    written = target.export(make_source(FAST_ARCH), TFLiteOptions(variant="float32"), METADATA,
                            tmp_path / "model_float32.tflite")
    assert target.inspect(written).labels == tuple(make_source(FAST_ARCH).labels)
    with target.runners(written) as made:
        assert [runner.runtime for runner in made] == [
            runtime for runtime in RUNTIMES if not runtime.startswith("tflite-task-library")]
    assert {k: v for k, v in target.runtimes_not_here().items() if "task-library" in k} == {
        runtime: "tflite-support needs the system library libusb-1.0-0, which is not installed "
                 "(on Debian/Ubuntu: apt-get install libusb-1.0-0)"
        for runtime in ("tflite-task-library", "tflite-task-library-full-size")}


def test_other_import_errors_are_not_disguised(monkeypatch):
    _fail_import(monkeypatch, "No module named 'tflite_support'")
    with pytest.raises(ImportError, match="No module named"):
        _tflite_runners.support()
    assert {k: v for k, v in tflite.TFLiteTarget().runtimes_not_here().items()
            if "task-library" in k} == {
        runtime: "tflite-support is not installed (No module named 'tflite_support'); it has "
                 "wheels only for x86-64 with Python 3.11: pip install 'toolchain[tasklib]'"
        for runtime in ("tflite-task-library", "tflite-task-library-full-size")}


@pytest.mark.slow
def test_without_mediapipe_its_runtimes_are_named_not_run(target, exported, monkeypatch):
    _fail_import(monkeypatch, "No module named 'mediapipe'", package="mediapipe")
    with target.runners(exported(FAST_ARCH, "float32")) as made:
        assert [runner.runtime for runner in made] == [
            runtime for runtime in RUNTIMES if not runtime.startswith("mediapipe")]
    assert {k: v for k, v in target.runtimes_not_here().items() if "mediapipe" in k} == {
        runtime: "mediapipe is not installed (No module named 'mediapipe'); it has wheels for "
                 "Linux, Windows and Apple Silicon Macs, not Intel Macs: pip install "
                 "'toolchain[mediapipe]'"
        for runtime in ("mediapipe-tasks", "mediapipe-tasks-full-size")}

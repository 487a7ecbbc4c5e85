"""The contract between the toolchain and the sample apps, checked where apps cannot be built.

These machines build neither iOS nor Android apps, so these tests check what the apps rely on:
the paths and names the app sources read are the ones ``toolchain install`` writes; the Core ML
model is a classifier with one square image input, which is what Vision's VNCoreMLRequest
needs to return VNClassificationObservations; the TFLite model runs in MediaPipe Tasks'
``ImageClassifier`` (the Python API over the same C++ the Android app's tasks-vision runs), with
labels and normalisation from its metadata, and in the Task Library's where tflite-support is
installed; the app code names no label and no normalisation constant; the Android build pins a
16 KB page-aligned MediaPipe Tasks and targets a current SDK.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

import targets
from tests.helpers import LABELS, TINY_ARCH
from toolchain.apps import ANDROID_MODEL, IOS_MODEL_DIR, IOS_MODEL_NAME

APPS = Path(__file__).resolve().parents[2] / "sample_apps"
IOS = APPS / "ios"
ANDROID = APPS / "android"
SWIFT = sorted((IOS / "ImageClassifier").glob("*.swift"))
KOTLIN = sorted((ANDROID / "app/src/main/java").rglob("*.kt"))


def _text(paths) -> str:
    return "\n".join(path.read_text(encoding="utf-8") for path in paths)


def test_the_app_sources_exist():
    assert {p.name for p in SWIFT} >= {"ImageClassifierApp.swift", "ContentView.swift",
                                       "Classifier.swift"}
    assert {p.name for p in KOTLIN} >= {"MainActivity.kt", "Classifier.kt"}
    for readme in (APPS / "README.md", IOS / "README.md", ANDROID / "README.md"):
        assert "toolchain install --app" in readme.read_text(encoding="utf-8"), readme


# --- iOS ----------------------------------------------------------------------------------------


def test_ios_loads_the_model_install_writes():
    swift = _text(SWIFT)
    assert (APPS / IOS_MODEL_DIR).is_dir()
    # Xcode compiles Model/ImageClassifier.mlmodel or .mlpackage to ImageClassifier.mlmodelc.
    assert f'Bundle.main.url(forResource: "{IOS_MODEL_NAME}", withExtension: "mlmodelc")' in swift
    assert "VNCoreMLRequest" in swift and "VNClassificationObservation" in swift
    assert ".scaleFill" in swift  # the whole photo, resized to a square, as in training
    # The compute units are stated, not left to the default, beside what the verifier checked
    # for them (the float32 CPU row and the float16 device row, coreml-numpy-float16).
    assert "configuration.computeUnits = .all" in swift and "coreml-numpy-float16" in swift
    assert "MLModelConfiguration())" not in swift
    ignored = (APPS / IOS_MODEL_DIR / ".gitignore").read_text().split()
    assert {f"{IOS_MODEL_NAME}.mlmodel", f"{IOS_MODEL_NAME}.mlpackage"} <= set(ignored)


def _pbxproj_objects(text: str) -> tuple[set[str], set[str]]:
    """Object ids defined in a project.pbxproj and every 24-hex id it references."""
    defined = set(re.findall(r"^\s*([0-9A-F]{24}) (?:/\*.*?\*/ )?= \{", text, re.M))
    referenced = set(re.findall(r"\b([0-9A-F]{24})\b", text))
    return defined, referenced


def test_the_xcode_project_builds_the_model_folder_without_listing_files():
    text = (IOS / "ImageClassifier.xcodeproj/project.pbxproj").read_text(encoding="utf-8")
    assert text.count("{") == text.count("}") and text.count("(") == text.count(")")
    defined, referenced = _pbxproj_objects(text)
    assert defined and referenced <= defined, sorted(referenced - defined)
    # A synchronized folder (Xcode 16): an installed model is built without editing the project.
    assert re.search(r"isa = PBXFileSystemSynchronizedRootGroup;[^}]*path = ImageClassifier;",
                     text, re.S)
    assert "IPHONEOS_DEPLOYMENT_TARGET = 17.0;" in text
    scheme = IOS / "ImageClassifier.xcodeproj/xcshareddata/xcschemes/ImageClassifier.xcscheme"
    assert scheme.is_file()


@pytest.mark.slow
@pytest.mark.parametrize("fmt, precision", [("neuralnetwork", "float32"),
                                            ("mlprogram", "float16")])
def test_the_core_ml_model_is_what_vision_needs(coreml_export, fmt, precision):
    from toolchain import backbones
    from toolchain.runtimes import load_spec

    path, _ = coreml_export(TINY_ARCH, fmt, precision)
    spec = load_spec(path)
    (image,) = spec.description.input
    size = backbones.get(TINY_ARCH).input_size
    assert image.type.WhichOneof("Type") == "imageType"
    assert (image.type.imageType.width, image.type.imageType.height) == (size, size)
    assert image.type.imageType.colorSpace == image.type.imageType.RGB
    # VNCoreMLRequest returns VNClassificationObservations only for a classifier: a predicted
    # label and a label → probability dictionary, the labels inside the model.
    outputs = {output.name: output.type.WhichOneof("Type") for output in spec.description.output}
    assert outputs[spec.description.predictedFeatureName] == "stringType"
    assert outputs[spec.description.predictedProbabilitiesName] == "dictionaryType"
    assert targets.get("coreml").inspect(path).labels == LABELS


# --- Android ------------------------------------------------------------------------------------


def test_android_loads_the_model_install_writes():
    kotlin = _text(KOTLIN)
    assert ANDROID_MODEL.as_posix() == "android/app/src/main/assets/model.tflite"
    assert 'setModelAssetPath("model.tflite")' in kotlin
    assert "setMaxResults(3)" in kotlin and "RunningMode.IMAGE" in kotlin
    assert "com.google.mediapipe.tasks.vision.imageclassifier.ImageClassifier" in kotlin
    assert "org.tensorflow.lite" not in kotlin  # the Task Library is gone from the app
    ignored = (APPS / ANDROID_MODEL.parent / ".gitignore").read_text().split()
    assert "model.tflite" in ignored


def test_android_pins_a_16_kb_aligned_mediapipe_and_targets_a_current_sdk():
    gradle = (ANDROID / "app/build.gradle.kts").read_text(encoding="utf-8")
    pinned = re.findall(r"com\.google\.mediapipe:tasks-vision:([\d.]+)", gradle)
    assert len(pinned) == 1
    # 0.10.26 is the first tasks-vision whose native library is 16 KB page-aligned.
    assert tuple(map(int, pinned[0].split("."))) >= (0, 10, 26)
    assert "tensorflow-lite-task-vision" not in gradle
    assert re.search(r"\btargetSdk = (\d+)", gradle)[1] == "35"
    assert re.search(r"\bcompileSdk = (\d+)", gradle)[1] == "35"
    assert re.search(r'noCompress\s*\+=\s*(listOf\()?"tflite"', gradle)  # memory-mapped
    plugins = (ANDROID / "build.gradle.kts").read_text(encoding="utf-8")
    agp = re.search(r'id\("com\.android\.application"\) version "([\d.]+)"', plugins)[1]
    assert tuple(map(int, agp.split("."))) >= (8, 5, 1)  # aligns native libraries to 16 KB


def _photo(sample_dir):
    """A full-size photo: the app runtimes resize it, as the app's bitmap is resized."""
    from toolchain.images import load_rgb

    return np.ascontiguousarray(load_rgb(next(sample_dir.glob("ocean/*.jpg")), 300))


def _top3(scores: list[float], names: set[str]) -> None:
    assert names <= set(LABELS) and len(scores) == 3
    # The best 3 of 5 probabilities: their sum is at most 1, plus the uint8 output's rounding
    # (int8 sums to 1 within 0.0078 over the held-out images, tests/targets/test_tflite.py).
    assert scores == sorted(scores, reverse=True) and 0 < sum(scores) <= 1.0 + 0.012


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["float32", "float16", "dynamic", "int8"])
def test_the_tflite_model_runs_in_mediapipe_tasks(tflite_export, sample_dir, variant):
    """What the Android app does: max 3 results, labels and normalisation from the metadata."""
    mp = pytest.importorskip("mediapipe", reason="the mediapipe extra is not installed here")
    from mediapipe.tasks.python import vision
    from mediapipe.tasks.python.core import base_options

    path = tflite_export(TINY_ARCH, variant)
    with vision.ImageClassifier.create_from_options(vision.ImageClassifierOptions(
            base_options=base_options.BaseOptions(model_asset_path=str(path)),
            max_results=3)) as classifier:
        result = classifier.classify(mp.Image(image_format=mp.ImageFormat.SRGB,
                                              data=_photo(sample_dir)))
    categories = result.classifications[0].categories
    _top3([c.score for c in categories], {c.category_name for c in categories})


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["float32", "int8"])
def test_the_tflite_model_runs_in_the_task_library(tflite_export, sample_dir, variant):
    pytest.importorskip("tflite_support", reason="the tasklib extra is not installed here")
    from tflite_support.task import core, processor, vision

    path = tflite_export(TINY_ARCH, variant)
    classifier = vision.ImageClassifier.create_from_options(vision.ImageClassifierOptions(
        base_options=core.BaseOptions(file_name=str(path)),
        classification_options=processor.ClassificationOptions(max_results=3)))
    result = classifier.classify(vision.TensorImage.create_from_array(_photo(sample_dir)))
    categories = result.classifications[0].categories
    _top3([c.score for c in categories], {c.category_name for c in categories})


# --- both ---------------------------------------------------------------------------------------


def test_no_label_or_normalisation_is_written_in_app_code():
    from toolchain.sample_photos import CLASSES

    code = _text(SWIFT) + _text(KOTLIN)
    for label in (*LABELS, *CLASSES):
        assert f'"{label}"' not in code, label
    assert not re.search(r"127\.5|\b255(\.0)?f?\b|NormalizeOp|\bMEAN\b|\bSTD\b|\bstd\b", code)


@pytest.mark.parametrize("app, sources", [("ios", SWIFT), ("android", KOTLIN)])
def test_the_no_model_message_is_a_command_that_works(app, sources):
    from toolchain.cli import build_parser

    message = re.search(r"No model installed\. Run: (toolchain install [^\"]+)", _text(sources))
    assert message, f"the {app} app has no message for a missing model"
    words = message[1].replace("<build output folder>", "out").split()[1:]
    args = build_parser().parse_args(words)
    assert (args.command, args.app) == ("install", app)

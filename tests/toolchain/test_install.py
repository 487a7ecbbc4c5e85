"""``toolchain install``: the right model, checked, copied atomically to the app's one place."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.helpers import LABELS, TINY_ARCH
from toolchain.apps import ANDROID_MODEL, IOS_MODEL_DIR
from toolchain.cli import main

pytestmark = pytest.mark.slow


#: The checkout's own apps, which tests copy and never write into.
CHECKOUT_APPS = Path(__file__).resolve().parents[2] / "sample_apps"


@pytest.fixture
def apps(tmp_path) -> Path:
    """A copy of the sample apps: tests never write into the checkout's own."""
    copy = tmp_path / "sample_apps"
    shutil.copytree(CHECKOUT_APPS, copy)
    return copy


def _build_dir(tmp_path: Path, *artifacts: Path, verified: bool = True) -> Path:
    """A folder laid out like a passing build's output, holding ``artifacts`` and (unless
    ``verified`` is false) a report.json whose ``files`` pass exactly their bytes, as the
    verifier writes it (tests/toolchain/test_gate.py checks the verifier writes that shape)."""
    import json

    from targets import artifact_bytes, artifact_digest

    out = tmp_path / "build"
    out.mkdir(exist_ok=True)
    for artifact in artifacts:
        copy = shutil.copytree if artifact.is_dir() else shutil.copyfile
        copy(artifact, out / artifact.name)
    (out / "model").mkdir(exist_ok=True)
    (out / "labels.txt").write_text("".join(f"{label}\n" for label in LABELS))
    if verified:
        files = [{"name": path.name, "path": str(path), "sha256": artifact_digest(path),
                  "bytes": artifact_bytes(path), "verdict": "passed", "reason": "",
                  "images": 18}
                 for path in sorted(out.iterdir()) if path.suffix in (".mlmodel", ".mlpackage",
                                                                       ".tflite")]
        (out / "report.json").write_text(json.dumps({"passed": True, "files": files}))
    return out


def _install(apps: Path, app: str, source: Path, capsys) -> tuple[int, str, str]:
    code = main(["install", "--app", app, "--from", str(source), "--apps-dir", str(apps)])
    printed = capsys.readouterr()
    return code, printed.out, printed.err


def _tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*"))
            if p.is_file()}


def test_ios_installs_the_mlmodel_and_names_its_labels(tmp_path, apps, coreml_export, capsys):
    mlmodel, _ = coreml_export(TINY_ARCH, "neuralnetwork", "float32")
    code, out, err = _install(apps, "ios", _build_dir(tmp_path, mlmodel), capsys)
    assert code == 0, err
    installed = apps / IOS_MODEL_DIR / "ImageClassifier.mlmodel"
    assert installed.read_bytes() == mlmodel.read_bytes()
    assert f"as {installed}" in out and "input 96x96 px" in out
    assert "crème brûlée, daisy, roses, red, sun flower, tulips" in out
    assert "ImageClassifier.xcodeproj" in out


def test_ios_mlpackage_replaces_the_mlmodel(tmp_path, apps, coreml_export, capsys):
    mlmodel, _ = coreml_export(TINY_ARCH, "neuralnetwork", "float32")
    package, _ = coreml_export(TINY_ARCH, "mlprogram", "float16")
    out = _build_dir(tmp_path, mlmodel, package)
    mlmodel, package = out / mlmodel.name, out / package.name
    assert _install(apps, "ios", mlmodel, capsys)[0] == 0
    code, _, err = _install(apps, "ios", package, capsys)
    assert code == 0, err
    folder = apps / IOS_MODEL_DIR
    # Both would compile to ImageClassifier.mlmodelc: exactly one may be there, beside the
    # record of what the verifier said of it.
    assert sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) == [
        "ImageClassifier.mlpackage", "ImageClassifier.verification.json"]
    assert _tree(folder / "ImageClassifier.mlpackage") == _tree(package)
    assert _install(apps, "ios", mlmodel, capsys)[0] == 0
    assert sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) == [
        "ImageClassifier.mlmodel", "ImageClassifier.verification.json"]


def test_android_installs_the_tflite(tmp_path, apps, tflite_export, capsys):
    model = tflite_export(TINY_ARCH, "float32")
    code, out, err = _install(apps, "android", _build_dir(tmp_path, model), capsys)
    assert code == 0, err
    assert (apps / ANDROID_MODEL).read_bytes() == model.read_bytes()
    assert "input 96x96 px" in out and "Android Studio" in out


def test_a_folder_without_a_model_of_the_format_is_one_line(tmp_path, apps, coreml_export,
                                                            capsys):
    mlmodel, _ = coreml_export(TINY_ARCH, "neuralnetwork", "float32")
    out = _build_dir(tmp_path, mlmodel)
    code, _, err = _install(apps, "android", out, capsys)
    assert code == 2
    assert err.splitlines()[0] == f"toolchain: error: {out} holds no TFLite model (.tflite)"
    assert "--target tflite" in err
    assert not (apps / ANDROID_MODEL).exists()


def test_two_candidates_are_refused_naming_both(tmp_path, apps, tflite_export, capsys):
    out = _build_dir(tmp_path, tflite_export(TINY_ARCH, "float32"),
                     tflite_export(TINY_ARCH, "dynamic"))
    code, _, err = _install(apps, "android", out, capsys)
    assert code == 2
    assert ("holds 2 models for android (model_dynamic.tflite: passed, model_float32.tflite: "
            "passed)") in err
    assert f"--from {out / 'model_dynamic.tflite'}" in err
    code, _, err = _install(apps, "android", out / "model_dynamic.tflite", capsys)
    assert code == 0, err


def test_a_model_without_labels_is_refused_and_the_old_one_kept(tmp_path, apps, tflite_export,
                                                                capsys):
    from tests.helpers import keras_model
    from toolchain.cache import float_tflite_bytes

    good = _build_dir(tmp_path, tflite_export(TINY_ARCH, "float32")) / "model_float32.tflite"
    assert _install(apps, "android", good, capsys)[0] == 0
    bare = tmp_path / "bare" / "model.tflite"
    bare.parent.mkdir()
    bare.write_bytes(float_tflite_bytes(keras_model(TINY_ARCH)))  # no metadata at all
    code, _, err = _install(apps, "android", bare, capsys)
    assert code == 2 and len(err.splitlines()) == 2  # the error and its hint
    assert f"{bare} has no embedded labels" in err
    assert (apps / ANDROID_MODEL).read_bytes() == good.read_bytes()


def _edited_mlmodel(coreml_export, path: Path, edit) -> Path:
    """The shared tiny .mlmodel with ``edit(spec)`` applied, saved at ``path``."""
    import coremltools as ct

    mlmodel, _ = coreml_export(TINY_ARCH, "neuralnetwork", "float32")
    spec = ct.utils.load_spec(str(mlmodel))
    edit(spec)
    ct.utils.save_spec(spec, str(path))
    return path


def test_a_core_ml_model_without_labels_is_refused(tmp_path, apps, coreml_export, capsys):
    def no_labels(spec):
        del spec.neuralNetworkClassifier.stringClassLabels.vector[:]

    bare = _edited_mlmodel(coreml_export, tmp_path / "bare.mlmodel", no_labels)
    code, _, err = _install(apps, "ios", bare, capsys)
    assert code == 2
    assert f"{bare} has no embedded class labels" in err
    assert not (apps / IOS_MODEL_DIR / "ImageClassifier.mlmodel").exists()


def test_missing_source_and_apps_are_one_line(tmp_path, apps, capsys):
    code, _, err = _install(apps, "ios", tmp_path / "nowhere", capsys)
    assert code == 2 and f"{tmp_path / 'nowhere'} does not exist" in err
    code, _, err = _install(tmp_path / "no apps", "ios", tmp_path, capsys)
    assert code == 2 and "no ios sample app in" in err


def test_the_default_apps_folder_is_the_one_here(tmp_path, apps, tflite_export, monkeypatch,
                                                 capsys):
    """``./sample_apps`` when there is one (a checkout's root); else one line saying what to
    pass: after ``pip install`` the package has no apps of its own."""
    model = _build_dir(tmp_path, tflite_export(TINY_ARCH, "float32")) / "model_float32.tflite"
    monkeypatch.chdir(tmp_path)  # holds the ``sample_apps`` copy
    assert main(["install", "--app", "android", "--from", str(model)]) == 0
    assert (apps / ANDROID_MODEL).read_bytes() == model.read_bytes()
    assert f"as {Path('sample_apps') / ANDROID_MODEL}" in capsys.readouterr().out
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["install", "--app", "android", "--from", str(model)]) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[0] == "toolchain: error: no sample_apps folder here"
    assert "--apps-dir" in err


def test_a_core_ml_model_with_a_non_square_input_is_refused(tmp_path, apps, coreml_export,
                                                            capsys):
    def wider(spec):
        spec.description.input[0].type.imageType.height = 64

    wide = _edited_mlmodel(coreml_export, tmp_path / "wide.mlmodel", wider)
    code, _, err = _install(apps, "ios", wide, capsys)
    assert code == 2
    assert f"{wide} takes a 96x64 image; the app expects a square input" in err
    assert not (apps / IOS_MODEL_DIR / "ImageClassifier.mlmodel").exists()


def test_a_core_ml_model_that_takes_no_image_is_refused(tmp_path, apps, coreml_export, capsys):
    def arrays_in(spec):  # setting the multi-array type replaces the image type
        spec.description.input[0].type.multiArrayType.shape.extend([1, 3, 96, 96])

    arrays = _edited_mlmodel(coreml_export, tmp_path / "arrays.mlmodel", arrays_in)
    code, _, err = _install(apps, "ios", arrays, capsys)
    assert code == 2 and "does not take one image as input, so Vision cannot feed it" in err


@pytest.mark.parametrize("name", ["notes.txt", "model.tflite"])
def test_a_file_of_another_format_is_refused(tmp_path, apps, name, capsys):
    other = tmp_path / name
    other.write_bytes(b"not a Core ML model")
    code, _, err = _install(apps, "ios", other, capsys)
    assert code == 2
    assert f"{other} is not a Core ML model (.mlmodel or .mlpackage)" in err


def test_a_corrupt_core_ml_file_is_one_line(tmp_path, apps, capsys):
    broken = tmp_path / "broken.mlmodel"
    broken.write_bytes(b"\x00\x01 not a protobuf")
    code, _, err = _install(apps, "ios", broken, capsys)
    assert code == 2 and "cannot read Core ML model" in err and "Traceback" not in err

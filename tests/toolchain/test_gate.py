"""Only a verified model reaches an app (``toolchain.gate``, ``toolchain install``): the
verifier records each artifact's bytes and verdict, and install copies only bytes a passing
verdict covers; failed, stale and never-verified models are refused in one line, the passing
one of a folder is picked, and ``--allow-unverified`` is loud and recorded in the app."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import toolchain
from targets import artifact_bytes, artifact_digest
from toolchain.apps import ANDROID_MODEL, ANDROID_RECORD
from toolchain.cli import main
from toolchain.errors import UnverifiedModel

pytestmark = pytest.mark.slow
CHECKOUT_APPS = Path(__file__).resolve().parents[2] / "sample_apps"


@pytest.fixture(scope="module")
def verified(retrained, retrained_tflite, sample_dir, tmp_path_factory):
    """A folder holding the retrained model's float32 and dynamic .tflite, verified on its
    held-out split (7 images, accepted as enough) with the dynamic one made to fail (int8's
    max diff at 1e-9): the folder."""
    folder = tmp_path_factory.mktemp("gate") / "out"
    folder.mkdir()
    for variant in ("float32", "dynamic"):
        shutil.copyfile(retrained_tflite(variant), folder / f"model_{variant}.tflite")
    result = toolchain.verify(retrained.output_dir, [folder / "model_float32.tflite",
                                                     folder / "model_dynamic.tflite"],
                              image_dir=sample_dir, int8_max_diff=1e-9, accept_small_set=True)
    assert not result.passed
    return folder


@pytest.fixture(scope="module")
def unsure(retrained, retrained_tflite, sample_dir, tmp_path_factory):
    """A folder holding the float32 .tflite verified on the held-out images (7) without
    accepting so small a set: inconclusive."""
    folder = tmp_path_factory.mktemp("gate") / "out"
    folder.mkdir()
    shutil.copyfile(retrained_tflite("float32"), folder / "model_float32.tflite")
    result = toolchain.verify(retrained.output_dir, [folder / "model_float32.tflite"],
                              image_dir=sample_dir)
    assert result.verdict == "inconclusive" and result.exit_code == 3
    return folder


@pytest.fixture
def apps(tmp_path) -> Path:
    copy = tmp_path / "sample_apps"
    shutil.copytree(CHECKOUT_APPS, copy)
    return copy


def _install(capsys, *argv) -> tuple[int, str, str]:
    code = main(["install", *map(str, argv)])
    printed = capsys.readouterr()
    return code, printed.out, printed.err


def test_the_report_records_each_artifacts_bytes_and_verdict(verified):
    files = {entry["name"]: entry for entry in
             json.loads((verified / "report.json").read_text())["files"]}
    assert sorted(files) == ["model_dynamic.tflite", "model_float32.tflite"]
    for name, entry in files.items():
        assert entry["sha256"] == artifact_digest(verified / name)
        assert entry["bytes"] == artifact_bytes(verified / name)
        assert entry["images"] > 0
    assert (files["model_float32.tflite"]["verdict"], files["model_float32.tflite"]["reason"]) \
        == ("passed", "")
    assert files["model_dynamic.tflite"]["verdict"] == "failed"
    assert files["model_dynamic.tflite"]["reason"].startswith(
        "model_dynamic.tflite [tflite-interpreter]: max abs diff ")
    assert files["model_dynamic.tflite"]["reason"].endswith(" > 1e-09")


def test_the_passing_model_of_a_folder_is_picked_and_its_record_ships(verified, apps, capsys):
    code, out, err = _install(capsys, "--app", "android", "--from", verified, "--apps-dir", apps)
    assert code == 0, err
    assert out.splitlines()[0] == ("picked model_float32.tflite, the one that passed "
                                   "verification (model_dynamic.tflite failed)")
    assert (apps / ANDROID_MODEL).read_bytes() == (verified / "model_float32.tflite").read_bytes()
    record = json.loads((apps / ANDROID_RECORD).read_text())
    assert record["verdict"] == "passed" and record["installed_unverified"] is False
    assert record["sha256"] == artifact_digest(apps / ANDROID_MODEL)
    assert record["report"] == str(verified / "report.json")
    assert f"verified: passed on {record['held_out_images']} held-out images" in out


def test_a_failed_model_is_refused_in_one_line(verified, apps, capsys):
    code, out, err = _install(capsys, "--app", "android", "--from",
                              verified / "model_dynamic.tflite", "--apps-dir", apps)
    assert code == 2 and out == ""
    first, hint = err.splitlines()
    assert first.startswith("toolchain: error: model_dynamic.tflite failed verification "
                            "(model_dynamic.tflite [tflite-interpreter]: max abs diff ")
    assert first.endswith("> 1e-09); it is not installed")
    assert "--allow-unverified" in hint and "report.md" in hint
    assert not (apps / ANDROID_MODEL).exists() and not (apps / ANDROID_RECORD).exists()


def test_a_model_changed_since_it_was_verified_is_stale(verified, apps, tmp_path, capsys):
    folder = tmp_path / "out"
    shutil.copytree(verified, folder)
    # rebuilt since: other bytes under the verified name
    shutil.copyfile(folder / "model_dynamic.tflite", folder / "model_float32.tflite")
    with pytest.raises(UnverifiedModel) as caught:
        toolchain.install("android", folder / "model_float32.tflite", apps)
    assert caught.value.message.startswith("model_float32.tflite is not the model that was "
                                           "verified: report.json verified other bytes")
    assert "toolchain verify" in caught.value.hint


def test_an_unverified_model_needs_allow_unverified_and_the_app_is_told(verified, apps,
                                                                       tmp_path, capsys):
    alone = tmp_path / "alone" / "model.tflite"
    alone.parent.mkdir()
    shutil.copyfile(verified / "model_float32.tflite", alone)
    code, _, err = _install(capsys, "--app", "android", "--from", alone, "--apps-dir", apps)
    assert code == 2
    assert err.splitlines()[0] == ("toolchain: error: model.tflite was never verified: no "
                                   "report.json beside it; it is not installed")
    assert not (apps / ANDROID_MODEL).exists()
    code, out, err = _install(capsys, "--app", "android", "--from", alone, "--apps-dir", apps,
                              "--allow-unverified")
    assert code == 0, err
    assert err.splitlines() == ["toolchain: warning: installing it anyway (--allow-unverified): "
                                "model.tflite was never verified: no report.json beside it; the "
                                "app's verification record says so"]
    assert "NOT VERIFIED (unverified)" in out
    record = json.loads((apps / ANDROID_RECORD).read_text())
    assert record["installed_unverified"] is True and record["verdict"] == "unverified"
    assert (apps / ANDROID_MODEL).read_bytes() == alone.read_bytes()


@pytest.mark.parametrize("content", [b"not json", b"[" * 100 + b"]" * 100, b'{"files": 3}',
                                     b'{"files": [{"name": "model.tflite", "sha256": "0"}]}'])
def test_a_report_that_cannot_vouch_leaves_the_model_unverified(verified, apps, tmp_path,
                                                                content):
    folder = tmp_path / "out"
    folder.mkdir()
    shutil.copyfile(verified / "model_float32.tflite", folder / "model.tflite")
    (folder / "report.json").write_bytes(content)
    with pytest.raises(UnverifiedModel, match="it is not installed"):
        toolchain.install("android", folder / "model.tflite", apps)


def test_an_inconclusive_model_is_refused_with_what_settles_it(unsure, apps, capsys):
    (entry,) = json.loads((unsure / "report.json").read_text())["files"]
    assert entry["verdict"] == "inconclusive"
    assert entry["reason"] == (f"model_float32.tflite [tflite-interpreter]: met 0.999 on "
                               f"{entry['images']} images, too few to show it (2000 would allow "
                               "two disagreements)")
    code, out, err = _install(capsys, "--app", "android", "--from", unsure, "--apps-dir", apps)
    assert code == 2 and out == ""
    first, hint = err.splitlines()
    assert first == ("toolchain: error: model_float32.tflite's verification was inconclusive ("
                     f"{entry['reason']}); it is not installed")
    assert "more photos" in hint and "--images PHOTOS" in hint and "--allow-unverified" in hint
    assert not (apps / ANDROID_MODEL).exists() and not (apps / ANDROID_RECORD).exists()

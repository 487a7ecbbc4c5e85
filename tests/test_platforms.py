"""Where the toolchain installs and runs (docs/ARCHITECTURE.md, "Platforms").

Two kinds of check:

- The dependency set resolves to wheels for macOS arm64 and x86-64 and Linux x86-64, with the
  markers evaluated for the target platform (uv's ``--python-platform``; pip's ``--platform``
  evaluates them for this machine), from the package index. tflite-support comes only with the
  ``tasklib`` extra and only on x86-64.
- Without tflite-support (the default install, and the only one on Apple Silicon), the whole
  chain works: ``make test`` runs this file a second time in ``.venv-lite``, an environment
  installed without the ``tasklib`` extra (with the ``mediapipe`` one, as on Apple Silicon),
  where the chain test below runs build, verify, label and install and checks that the TFLite
  metadata is the bytes tflite-support writes.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import METADATA, TINY_ARCH, parse_label_lines, run

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "targets" / "golden"
TASKLIB = importlib.util.find_spec("tflite_support") is not None
#: uv's names for the platforms users build on.
PLATFORMS = {"macOS arm64": "aarch64-apple-darwin", "macOS x86-64": "x86_64-apple-darwin",
             "Linux x86-64": "x86_64-manylinux_2_28"}


def _resolve(platform: str, *extras: str, python: str = "3.11") -> subprocess.CompletedProcess:
    """``uv pip install --dry-run`` of pyproject.toml's dependencies (and ``extras``) for
    ``platform``: binary wheels only, markers evaluated for that platform."""
    uv = shutil.which("uv", path=str(Path(sys.executable).parent))
    assert uv, "uv is a test dependency (pyproject.toml's test extra)"
    command = [uv, "pip", "install", "--dry-run", "--no-config", "--python-platform", platform,
               "--python-version", python, "--only-binary", ":all:", "--target",
               str(ROOT / "build" / "uv-target"), "-r", str(ROOT / "pyproject.toml")]
    for extra in extras:
        command += ["--extra", extra]
    return subprocess.run(command, capture_output=True, text=True, timeout=300,
                          stdin=subprocess.DEVNULL)


def _packages(result: subprocess.CompletedProcess) -> dict[str, str]:
    """What a dry run would install: name → version."""
    assert result.returncode == 0, result.stderr
    return dict(re.findall(r"^ \+ ([A-Za-z0-9_.-]+)==(\S+)$", result.stderr, re.MULTILINE))


@pytest.mark.parametrize("platform", PLATFORMS)
def test_the_default_install_resolves_to_wheels(platform):
    found = _packages(_resolve(PLATFORMS[platform], "test"))
    tensorflow = "tensorflow" if platform.startswith("macOS") else "tensorflow-cpu"
    assert found[tensorflow] == "2.13.1" and found["coremltools"] == "9.0"
    assert "tflite-support" not in found
    # Without tflite-support's pin, protobuf is 4.x: the compiled one Core ML serialises with.
    assert int(found["protobuf"].split(".")[0]) >= 4


@pytest.mark.parametrize("platform", PLATFORMS)
def test_the_tasklib_extra_adds_tflite_support_only_where_it_has_wheels(platform):
    found = _packages(_resolve(PLATFORMS[platform], "test", "tasklib"))
    if "x86-64" in platform:
        assert found["tflite-support"] == "0.4.4"
        assert found["protobuf"].startswith("3.")  # tflite-support pins protobuf<4
    else:
        assert "tflite-support" not in found
        assert int(found["protobuf"].split(".")[0]) >= 4


@pytest.mark.parametrize("platform", PLATFORMS)
def test_the_mediapipe_extra_installs_everywhere_but_on_intel_macs(platform):
    """Every platform has an app runtime for TFLite: MediaPipe Tasks, or on Intel Macs (no
    mediapipe wheel) the Task Library."""
    found = _packages(_resolve(PLATFORMS[platform], "test", "tasklib", "mediapipe"))
    if platform == "macOS x86-64":
        assert "mediapipe" not in found and found["tflite-support"] == "0.4.4"
    else:
        assert found["mediapipe"] == "1.2.2"
    assert found["numpy"].startswith("1.24.")  # mediapipe alone would pull numpy 2


def test_python_3_12_is_blocked_by_tensorflow_2_13():
    """What README's platform table says blocks Python 3.12: TensorFlow 2.13.1 has no wheel
    for it (and tflite-support needs TensorFlow 2.13)."""
    result = _resolve(PLATFORMS["Linux x86-64"], python="3.12")
    assert result.returncode != 0
    said = " ".join(result.stderr.split())  # uv wraps its message to a width
    assert re.search(r"tensorflow-cpu(\{[^}]*\})?==2\.13\.1 has no wheels with a matching "
                     r"Python ABI tag \(e\.g\., `cp312`\)", said), said


@pytest.mark.skipif(TASKLIB, reason="tflite-support is installed here; make test runs this "
                                    "file again in .venv-lite, the install without it")
def test_the_chain_runs_without_tflite_support(tmp_path):
    """Build (retrain, convert to Core ML and TFLite, verify), label and install with
    tflite-support absent: every stage works, the reports name the Task Library as not run
    here, and the TFLite metadata is the bytes tflite-support's writer gives."""
    from google.protobuf.internal import api_implementation

    from targets._tflite_metadata import metadata_buffer, packed_files

    assert importlib.util.find_spec("tflite_support") is None
    # The default install's protobuf is compiled (what makes .mlmodel serialisation fast).
    assert api_implementation.Type() in ("upb", "cpp")
    home, photos, out = tmp_path / "home", tmp_path / "photos", tmp_path / "out"
    made = run(home, "sample-data", photos, "--per-class", 12)
    assert made.returncode == 0, made.stderr
    built = run(home, "build", "--image-dir", photos, "--weights", "none", "--architecture",
                TINY_ARCH, "--bottleneck-dir", tmp_path / "cache", "--output-dir", out,
                "--how-many-training-steps", 100, "--target", "tflite", "--tflite-variant",
                "dynamic", "--target", "coreml", "--name", METADATA.name, "--description",
                METADATA.description, "--author", METADATA.author, "--license",
                METADATA.license, "--model-version", METADATA.version, "--accept-small-set")
    assert built.returncode == 0, built.stderr
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert report["passed"] is True
    ran = sorted({(Path(check["path"]).name, check["runtime"]) for check in report["artifacts"]})
    app_runtimes = ([("model_dynamic.tflite", "mediapipe-tasks"),
                     ("model_dynamic.tflite", "mediapipe-tasks-full-size")]
                    if importlib.util.find_spec("mediapipe") else [])
    assert ran == sorted([("model_dynamic.tflite", "tflite-interpreter"),
                          ("model_float32.mlmodel", "coreml-numpy"),
                          ("model_float32.mlmodel", "coreml-numpy-float16"), *app_runtimes])
    assert any(warning.startswith("not run on this machine: tflite-task-library, "
                                  "tflite-task-library-full-size: tflite-support is not "
                                  "installed") for warning in report["warnings"])
    assert "not run on this machine: tflite-task-library" in (out / "report.md").read_text(
        encoding="utf-8")
    model = (out / "model_dynamic.tflite").read_bytes()
    assert metadata_buffer(model) == (GOLDEN / "tflite-metadata-mobilenet-float32.bin"
                                      ).read_bytes()
    labels = sorted(folder.name for folder in photos.iterdir() if folder.is_dir())
    assert packed_files(model)["labels.txt"].decode("utf-8").splitlines() == labels
    photo = sorted((photos / labels[0]).iterdir())[0]
    for artifact in ("model_dynamic.tflite", "model_float32.mlmodel"):
        labelled = run(home, "label", "--model", out / artifact, "--image", photo)
        assert labelled.returncode == 0, labelled.stderr
        assert {label for label, _ in parse_label_lines(labelled.stdout)} <= set(labels)
    apps = tmp_path / "sample_apps"
    shutil.copytree(ROOT / "sample_apps", apps)
    for app, artifact in (("android", "model_dynamic.tflite"), ("ios", "model_float32.mlmodel")):
        installed = run(home, "install", "--app", app, "--from", out / artifact, "--apps-dir",
                        apps)
        assert installed.returncode == 0, installed.stderr

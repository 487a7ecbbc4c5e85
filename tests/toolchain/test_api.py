"""The Python API (``toolchain.retrain``, ``convert``, ``verify``, ``bottlenecks``,
``install``): the commands' run functions, with the flags' names as keywords, returning result
objects. The README's own example (build, label) runs in tests/test_readme.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import toolchain
from tests.helpers import TINY_ARCH


def test_bottlenecks_and_retrain_return_their_results(tmp_path, sample_dir, session_cache):
    def fill():
        return toolchain.bottlenecks(sample_dir, architecture=TINY_ARCH, weights="none",
                                     bottleneck_dir=session_cache, progress=False)

    fill()  # the session's cache may or may not hold them yet
    cached = fill()
    assert (cached.architecture, cached.computed, cached.skipped) == (TINY_ARCH, 0, 0)
    assert cached.cached == len(list(sample_dir.glob("*/*.*")))
    result = toolchain.retrain(sample_dir, tmp_path / "model", architecture=TINY_ARCH,
                               weights="none", bottleneck_dir=session_cache,
                               how_many_training_steps=20, seed=3, progress=False)
    assert result.output_dir == tmp_path / "model" and result.bottlenecks_computed == 0
    assert result.info.architecture == TINY_ARCH and result.info.training_steps == 20
    split = json.loads((tmp_path / "model" / "split.json").read_text())
    assert split["training_options"]["seed"] == 3
    assert (tmp_path / "model" / "summaries" / "train").is_dir()  # retrain.py's default


@pytest.mark.slow
def test_convert_then_verify(retrained, sample_dir, tmp_path):
    converted = toolchain.convert(retrained.output_dir, targets=["tflite"],
                                  tflite_variant="float32", name="From Python",
                                  output_dir=tmp_path / "artifacts")
    assert converted.ok and converted.exit_code == 0
    (artifact,) = converted.artifacts
    assert artifact == tmp_path / "artifacts" / "model_float32.tflite"
    assert toolchain.label(artifact, next(sample_dir.glob("forest/*.jpg")), top_k=2)[0].label \
        in retrained.info.labels
    import targets

    assert targets.get("tflite").inspect(artifact).metadata["name"] == "From Python"
    checked = toolchain.verify(retrained.output_dir, [artifact], sample_dir,
                               report_dir=tmp_path / "reports", float32_agreement=0.9,
                               min_images=5)  # 0.9 needs 20 images; the held-out 7 accepted
    assert checked.verdict == "passed" and checked.passed and checked.exit_code == 0
    assert {path.name for path in checked.files.values()} >= {"report.json", "report.md",
                                                             "junit.xml"}
    assert all(check.threshold.top1_agreement == 0.9 for check in checked.report.checks)
    on_disk = json.loads((tmp_path / "reports" / "report.json").read_text())
    assert on_disk == json.loads(json.dumps(on_disk)) and on_disk["passed"] is True


def test_convert_from_a_frozen_graph_takes_the_graph_keywords(retrained, tmp_path):
    graph = retrained.output_dir.parent / "retrained_graph.pb"
    result = toolchain.convert(graph=graph, targets="tflite", tflite_variant="float32",
                               labels=retrained.output_dir.parent / "retrained_labels.txt",
                               output_dir=tmp_path)
    assert result.ok and result.artifacts == [tmp_path / "model_float32.tflite"]


def test_install_from_python(tmp_path, tflite_export):
    apps = tmp_path / "apps"
    shutil.copytree(Path(__file__).resolve().parents[2] / "sample_apps", apps)
    model = tflite_export(TINY_ARCH, "float32")  # never verified: refused unless allowed
    with pytest.raises(toolchain.UnverifiedModel, match="was never verified"):
        toolchain.install("android", model, apps_dir=apps)
    done = toolchain.install("android", model, apps_dir=apps, allow_unverified=True)
    assert done.destination == apps / "android/app/src/main/assets/model.tflite"
    assert done.input_size == 96 and done.labels and done.verdict.status == "unverified"


def test_errors_are_the_typed_ones(tmp_path, retrained):
    with pytest.raises(toolchain.ModelError, match="holds no retrained model"):
        toolchain.convert(tmp_path, targets=["tflite"])
    with pytest.raises(toolchain.UsageError, match="exactly one of --model and --graph"):
        toolchain.convert(targets=["tflite"])
    with pytest.raises(toolchain.UnknownOption, match="has no option 'variant'"):
        toolchain.convert(retrained.output_dir, targets=["tflite"], variant="int8")
    with pytest.raises(toolchain.UsageError, match="--top-k must be at least 1"):
        toolchain.label(retrained.output_dir, "x.jpg", top_k=0)

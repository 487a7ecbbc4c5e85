"""The converter stage: sources, the target registry, partial failures, build and label."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

import targets
from tests.helpers import TFLITE_RUNTIMES, TINY_ARCH
from toolchain import model as model_io
from toolchain.cli import main
from toolchain.conversion import (
    Conversion,
    GraphOptions,
    convert,
    source_from_graph,
    source_from_model,
)
from toolchain.errors import ModelError, ToolchainError, UsageError
from toolchain.images import load_rgb


def test_registry_lists_targets_and_refuses_duplicates():
    assert {"coreml", "tflite"} <= set(targets.names())
    with pytest.raises(ValueError, match="already registered"):
        targets.register(targets.get("tflite"))
    with pytest.raises(UsageError) as raised:
        targets.get("onnx")
    assert "coreml" in raised.value.hint and "tflite" in raised.value.hint
    assert [t.name for t in targets.resolve(["tflite", "all", "tflite"])][0] == "tflite"
    assert sorted(t.name for t in targets.resolve(["all"])) == targets.names()


def test_source_from_model_calibrates_on_training_images_only(retrained):
    source = source_from_model(retrained.output_dir)
    split = json.loads((retrained.output_dir / "split.json").read_text())
    root = Path(split["image_dir"])
    assert source.calibration == tuple(root / rel for rel in split["sets"]["training"])
    held_out = {root / rel for rel in split["sets"]["testing"] + split["sets"]["validation"]}
    assert held_out and not held_out & set(source.calibration)
    assert source.labels == retrained.info.labels and source.input_size == 96
    assert source.user_defined["architecture"] == TINY_ARCH
    assert source.user_defined["classes"] == str(len(source.labels))


def test_source_from_graph_computes_what_the_model_computes(retrained, sample_dir):
    graph = retrained.output_dir.parent / "retrained_graph.pb"
    labels = retrained.output_dir.parent / "retrained_labels.txt"
    source = source_from_graph(graph, GraphOptions(labels=labels))
    assert source.labels == retrained.info.labels and source.input_size == 96
    assert source.preprocessing.mean == (127.5,) * 3
    # the toolchain's own --output_graph: the backbone is known, the normalisation no guess
    assert source.user_defined["architecture"] == TINY_ARCH
    assert source.normalization_source == (f"the toolchain's {TINY_ARCH} backbone "
                                           "preprocessing")
    image = next(sample_dir.glob("desert/*.jpg"))
    batch = source.preprocessing.apply(load_rgb(image, 96))[None]
    expected = model_io.load_keras(retrained.output_dir)(batch, training=False).numpy()
    import tensorflow as tf

    got = np.asarray(source.concrete_function()(tf.constant(batch)))
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_bad_graphs_are_one_line_errors(retrained, tmp_path):
    graph = retrained.output_dir.parent / "retrained_graph.pb"
    labels = retrained.output_dir.parent / "retrained_labels.txt"
    with pytest.raises(ModelError, match="no tensor named 'softmax'"):
        source_from_graph(graph, GraphOptions(labels=labels, output_name="softmax"))
    junk = tmp_path / "junk.pb"
    junk.write_bytes(b"\x00\x01 definitely not a graph")
    with pytest.raises(ModelError, match="cannot read frozen graph"):
        source_from_graph(junk, GraphOptions(labels=labels))
    with pytest.raises(UsageError):
        GraphOptions(input_std=0)


class _Failing(targets.Target):
    name = "failing"

    def filename(self, options):
        return "never.bin"

    def export(self, source, options, metadata, path):
        raise RuntimeError("converter crashed\nsecond line")

    def expected(self, source, options, metadata):
        raise AssertionError("not reached")

    def inspect(self, path):
        raise AssertionError("not reached")

    def runners(self, path):
        return targets.Runners()

    def opens(self, path):
        return False


def test_one_failing_target_does_not_stop_the_others(retrained, tmp_path):
    from targets.tflite import TFLiteOptions

    source = source_from_model(retrained.output_dir)
    results = convert(source, [(_Failing(), None),
                               (targets.get("tflite"), TFLiteOptions(variant="float32"))],
                      targets.ArtifactMetadata(), tmp_path)
    assert results[0] == Conversion("failing", None, results[0].seconds,
                                    "RuntimeError: converter crashed")
    assert results[1].ok and results[1].path.is_file()
    assert not (tmp_path / "never.bin").exists()


@pytest.mark.slow
def test_build_writes_and_verifies_every_artifact(tmp_path, sample_dir, session_cache, capsys):
    out = tmp_path / "build"
    # dynamic: int8 weights. Full-integer int8 of a random-weight MobileNet v3 fails the
    # verifier (README: Verification); that failure is tested in test_verify.py.
    code = main(["build", "--image-dir", str(sample_dir), "--architecture", TINY_ARCH,
                 "--weights", "none", "--bottleneck-dir", str(session_cache),
                 "--output-dir", str(out), "--how-many-training-steps", "60",
                 "--target", "all", "--tflite-variant", "dynamic", "--author", "Test Author",
                 "--quiet", "--accept-small-set"])
    printed = capsys.readouterr()
    assert code == 0, printed.out + printed.err
    assert (out / "model" / "model.json").is_file() and (out / "labels.txt").is_file()
    assert (out / "model_dynamic.tflite").is_file() and (out / "model_float32.mlmodel").is_file()
    report = json.loads((out / "report.json").read_text())
    assert report["passed"] is True and "verification passed" in printed.out
    assert "Running MIL" not in printed.err  # coremltools' progress bars stay off our output
    runtimes = {(Path(a["path"]).name, a["runtime"]) for a in report["artifacts"]}
    coreml_runtime = "coreml" if sys.platform == "darwin" else "coreml-numpy"
    assert runtimes == {*(("model_dynamic.tflite", runtime) for runtime in TFLITE_RUNTIMES),
                        ("model_float32.mlmodel", coreml_runtime),
                        ("model_float32.mlmodel", "coreml-numpy-float16")}
    assert (out / "report.md").is_file() and (out / "junit.xml").is_file()
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "temporary files left"
    labels = tuple((out / "labels.txt").read_text().splitlines())
    assert targets.get("tflite").inspect(out / "model_dynamic.tflite").labels == labels
    # label reads every format, with labels from the file itself
    image = next(sample_dir.glob("ocean/*.jpg"))
    for model in (out / "model", out / "model_dynamic.tflite", out / "model_float32.mlmodel"):
        assert main(["label", "--model", str(model), "--image", str(image), "--top-k", "2"]) == 0
        lines = capsys.readouterr().out.splitlines()
        assert len(lines) == 2 and lines[0].split(" (score")[0] in labels


def test_build_exits_with_the_verifiers_code(tmp_path, sample_dir, session_cache, capsys):
    out = tmp_path / "build"
    code = main(["build", "--image-dir", str(sample_dir), "--architecture", TINY_ARCH,
                 "--weights", "none", "--bottleneck-dir", str(session_cache),
                 "--output-dir", str(out), "--how-many-training-steps", "20",
                 "--target", "tflite", "--tflite-variant", "float32",
                 "--float32-max-diff", "0", "--quiet"])
    printed = capsys.readouterr()
    assert code == 1 and "verification FAILED" in printed.out  # nothing matches to 0.0
    assert json.loads((out / "report.json").read_text())["passed"] is False
    assert (out / "model_float32.tflite").is_file()  # a failed check keeps the artifacts


def test_build_reports_a_failed_target_and_keeps_the_others(tmp_path, sample_dir, session_cache,
                                                            capsys, monkeypatch):
    coreml = targets.get("coreml")

    def crash(*args, **kwargs):
        raise ToolchainError("simulated converter failure")

    monkeypatch.setattr(coreml, "export", crash)
    out = tmp_path / "build"
    code = main(["build", "--image-dir", str(sample_dir), "--architecture", TINY_ARCH,
                 "--weights", "none", "--bottleneck-dir", str(session_cache),
                 "--output-dir", str(out), "--how-many-training-steps", "20",
                 "--target", "coreml", "--target", "tflite", "--tflite-variant", "float32",
                 "--quiet"])
    err = capsys.readouterr().err
    assert code == 2
    assert "toolchain: error: target coreml failed: simulated converter failure" in err
    assert (out / "model_float32.tflite").is_file()
    assert not list(out.glob("*.mlmodel"))


def test_unknown_target_fails_before_any_work(tmp_path, sample_dir, capsys):
    out = tmp_path / "build"
    assert main(["build", "--image-dir", str(sample_dir), "--output-dir", str(out),
                 "--target", "onnx"]) == 2
    err = capsys.readouterr().err
    assert "unknown target 'onnx'" in err and "coreml" in err
    assert not out.exists()


def test_label_on_a_frozen_graph(retrained, sample_dir, capsys):
    graph = retrained.output_dir.parent / "retrained_graph.pb"
    image = next(sample_dir.glob("snowfield/*.jpg"))
    assert main(["label", "--model", str(graph), "--image", str(image), "--top-k", "1"]) == 0
    graph_line = capsys.readouterr().out.strip()
    assert main(["label", "--model", str(retrained.output_dir), "--image", str(image),
                 "--top-k", "1"]) == 0
    model_line = capsys.readouterr().out.strip()
    assert graph_line.split(" (score")[0] == model_line.split(" (score")[0]


def test_convert_from_a_frozen_graph(retrained, tmp_path, capsys):
    graph = retrained.output_dir.parent / "retrained_graph.pb"
    assert main(["convert", "--graph", str(graph), "--target", "tflite", "--tflite-variant",
                 "float32", "--output-dir", str(tmp_path)]) == 0
    assert "tflite: wrote" in capsys.readouterr().out
    found = targets.get("tflite").inspect(tmp_path / "model_float32.tflite")
    assert found.labels == retrained.info.labels


def test_convert_needs_exactly_one_model(capsys):
    assert main(["convert", "--target", "tflite"]) == 2
    assert "exactly one of --model and --graph" in capsys.readouterr().err


def test_convert_into_a_folder_another_run_writes_is_refused(retrained, tmp_path, capsys):
    from toolchain import atomic

    out = tmp_path / "artifacts"
    with atomic.exclusive(out, "build"):  # as another process would hold it
        code = main(["convert", "--model", str(retrained.output_dir), "--target", "coreml",
                     "--output-dir", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "toolchain: error: another toolchain build (pid " in err, err
    assert f"is writing {out.absolute()}" in err and not list(out.glob("*.mlmodel"))

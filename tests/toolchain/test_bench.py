"""``toolchain bench`` runs and reports every figure (timings are printed, never asserted)."""

from __future__ import annotations

import json
import sys

import pytest

from tests.helpers import TINY_ARCH
from toolchain.cli import main

CHAIN_ARCH = "mobilenet_0.25_128"


def test_bench_prints_and_writes_every_figure(tmp_path, sample_dir, capsys):
    out = tmp_path / "bench.json"
    code = main(["bench", "--only", "extraction", "--architecture", TINY_ARCH,
                 "--image-dir", str(sample_dir), "--images", "12", "--repeats", "1",
                 "--json", str(out), "--quiet"])
    assert code == 0
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    (result,) = report["results"]
    assert result["architecture"] == TINY_ARCH and result["images"] == 12
    rates = result["images_per_second"]
    assert set(rates) == {"toolchain", "warm cache", "xnnpack 2T", "tf batched", "predict loop"}
    assert all(value > 0 for value in rates.values())
    assert result["ratios"]["toolchain / xnnpack 2T"] == rates["toolchain"] / rates["xnnpack 2T"]
    for name in rates:
        assert name in printed
    assert "toolchain / predict loop" in printed and ">= 10x" in printed
    assert report["machine"]["cores"] >= 1


def test_bench_mlmodel_times_conversion_and_parse_against_the_goals(tmp_path, capsys):
    from google.protobuf.internal import api_implementation

    out = tmp_path / "bench.json"
    code = main(["bench", "--only", "mlmodel", "--mlmodel-architecture", TINY_ARCH,
                 "--json", str(out), "--quiet"])
    assert code == 0
    printed = capsys.readouterr().out
    found = json.loads(out.read_text())["mlmodel"]
    assert found["ok"] and found["architecture"] == TINY_ARCH
    assert found["convert_seconds"] > 0 and found["parse_seconds"] > 0 and found["bytes"] > 0
    assert found["protobuf_backend"] == api_implementation.Type()
    assert found["goals"] == {"convert_seconds": 60.0, "parse_seconds": 5.0}
    assert f"protobuf {found['protobuf']} ({found['protobuf_backend']})" in printed
    assert "goal <= 60 s" in printed and "goal <= 5 s" in printed


def test_bench_rejects_unknown_architectures_before_working(capsys):
    assert main(["bench", "--architecture", "resnet50"]) == 2
    assert "unknown architecture" in capsys.readouterr().err


def test_bench_chain_measures_every_artifact(tmp_path, sample_dir, capsys):
    out = tmp_path / "bench.json"
    # MobileNet v1 0.25: its ten conversions take 33 s here, MobileNet v3 small's 83 s.
    code = main(["bench", "--only", "chain", "--chain-architecture", CHAIN_ARCH,
                 "--image-dir", str(sample_dir), "--repeats", "1", "--steps", "50",
                 "--latency-runs", "3", "--json", str(out), "--quiet"])
    captured = capsys.readouterr()
    printed = captured.out
    assert code == 0
    # Every Core ML format and precision was converted, and no coremltools progress bar showed.
    assert "Running MIL" not in captured.err and "compression pass" not in captured.err
    chain = json.loads(out.read_text())["chain"]
    assert "results" not in json.loads(out.read_text())  # --only chain
    assert chain["architecture"] == CHAIN_ARCH and chain["steps"] == 50
    assert chain["retrain_seconds"] > 0 and chain["held_out"] > 0
    files = [row["file"] for row in chain["artifacts"]]
    assert files[:10] == ["model_float32.mlmodel", "model_float16.mlmodel", "model_int8.mlmodel",
                          "model_float32.mlpackage", "model_float16.mlpackage",
                          "model_int8.mlpackage", "model_float32.tflite", "model_float16.tflite",
                          "model_dynamic.tflite", "model_int8.tflite"]
    # int8's repaired model is a row of its own when the repair wrote one (whether it does on
    # random weights depends on the machine's float kernels), its time inside int8's.
    assert files[10:] in ([], ["model_int8_mixed.tflite"])
    for row in chain["artifacts"]:
        companion = row["file"] == "model_int8_mixed.tflite"
        assert row["ok"] and row["bytes"] > 0, row
        assert row["convert_seconds"] is None if companion else row["convert_seconds"] > 0
        runtimes = set(row["latency"])
        if row["file"].endswith(".tflite"):
            assert runtimes == {"tflite 1T", "tflite 2T"}
        else:
            assert runtimes == {"coreml" if sys.platform == "darwin" else "coreml-numpy"}
        for figure in row["latency"].values():
            assert 0 < figure["median_ms"] <= figure["p90_ms"]
        assert row["checks"] and all(0 <= c["agreement"] <= 1 for c in row["checks"])
        assert row["file"] in printed
    sizes = {row["file"]: row["bytes"] for row in chain["artifacts"]}
    by_file = {row["file"]: row for row in chain["artifacts"]}
    assert by_file["model_float32.tflite"]["size_vs_float32_tflite"] == 1.0
    assert sizes["model_dynamic.tflite"] < sizes["model_float16.tflite"] < sizes[
        "model_float32.tflite"]  # weights of 1, 2 and 4 bytes
    assert chain["keras_latency"]["median_ms"] > 0
    assert "retrain, 50 steps on cached bottlenecks" in printed and "keras" in printed


def test_bench_scale_measures_every_stage_at_every_size(tmp_path, capsys):
    out = tmp_path / "scale.json"
    code = main(["bench", "--scale", "--scale-size", "40", "--scale-size", "20",
                 "--chain-architecture", TINY_ARCH, "--steps", "20", "--json", str(out),
                 "--quiet"])
    assert code == 0
    printed = capsys.readouterr().out
    rows = json.loads(out.read_text())["scale"]
    assert [row["images"] for row in rows] == [20, 40]  # smallest first, every image scanned
    for row in rows:
        assert row["extract_images_per_second"] > 0 and row["warm_seconds"] > 0
        assert row["retrain_seconds"] > 0 and row["step_ms"] > 0
        assert row["retrain_peak_mb"] > row["retrain_growth_mb"] > 0
        size = row["bottleneck_size"]
        assert row["bottleneck_matrix_mb"] == pytest.approx(row["images"] * size * 4 / 1e6)
        # on disk: one float32 vector per image, each with its 12-byte header
        assert row["cache_mb"] == pytest.approx(row["images"] * (12 + 4 * size) / 1e6)
    for title in ("scan s", "extract img/s", "retrain +MB", "matrix MB", "cache MB"):
        assert title in printed
    assert "extraction at 40 / at 20:" in printed and "(goal >= 0.9x)" in printed


def test_scale_options_are_checked_before_any_work(capsys):
    assert main(["bench", "--scale-size", "100"]) == 2
    assert "--scale-size applies to --scale only" in capsys.readouterr().err
    assert main(["bench", "--scale", "--scale-size", "5"]) == 2


def test_the_chain_table_shows_a_companion_without_its_own_conversion_time():
    from toolchain.bench_chain import format_chain

    latency = {"tflite 1T": {"median_ms": 1.5, "p90_ms": 2.0}}
    row = {"ok": True, "bytes": 600_000, "size_vs_float32_tflite": 0.4, "latency": latency,
           "checks": [{"runtime": "tflite-interpreter", "agreement": 0.96, "accuracy": 0.9}]}
    result = {"architecture": "mobilenet_v2_0.35_96", "weights": "none", "images": 72,
              "held_out": 9, "repeats": 1, "extraction_seconds_cold": 1.0, "steps": 50,
              "retrain_seconds": 0.5, "original_accuracy": 0.9,
              "keras_latency": {"median_ms": 3.0, "p90_ms": 4.0},
              "artifacts": [{**row, "file": "model_int8.tflite", "convert_seconds": 14.2},
                            {**row, "file": "model_int8_mixed.tflite", "convert_seconds": None}]}
    lines = format_chain(result).splitlines()
    int8 = next(line for line in lines if line.startswith("model_int8.tflite "))
    mixed = next(line for line in lines if line.startswith("model_int8_mixed.tflite"))
    assert int8.split()[1] == "14.2" and mixed.split()[1] == "-"
    assert mixed.split()[2:4] == ["0.60", "0.40x"]

"""``toolchain bench`` runs and reports every figure (timings are printed, never asserted)."""

from __future__ import annotations

import json

from toolchain.cli import main
from tests.conftest import TINY_ARCH


def test_bench_prints_and_writes_every_figure(tmp_path, sample_dir, capsys):
    out = tmp_path / "bench.json"
    code = main(["bench", "--architecture", TINY_ARCH, "--image-dir", str(sample_dir),
                 "--images", "12", "--repeats", "1", "--json", str(out), "--quiet"])
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


def test_bench_rejects_unknown_architectures_before_working(capsys):
    assert main(["bench", "--architecture", "resnet50"]) == 2
    assert "unknown architecture" in capsys.readouterr().err

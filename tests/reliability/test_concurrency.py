"""Two ``toolchain build`` runs sharing one bottleneck cache at the same time.

Both must finish with correct, verified results, and the shared cache must hold exactly one
complete entry per image: entries and the TFLite engine are written under temporary names and
renamed, so the runs may race to write the same entry without either reading half of it.
"""

from __future__ import annotations

import json
import re

import pytest

from tests.helpers import (
    TINY_ARCH,
    check_entries,
    leftovers,
    no_traceback,
    start,
)

pytestmark = pytest.mark.slow


def test_two_builds_share_one_cache(tmp_path, many_photos):
    cache = tmp_path / "shared cache"
    runs = []
    for name in ("first", "second"):
        args = ["build", "--image-dir", many_photos, "--weights", "none", "--architecture",
                TINY_ARCH, "--bottleneck-dir", cache, "--output-dir", tmp_path / name,
                "--how-many-training-steps", 200, "--target", "tflite",
                "--tflite-variant", "float32"]
        runs.append(start(tmp_path / "home", *args, log=tmp_path / f"{name}.log"))
    codes = [process.wait(900) for process in runs]
    logs = [(tmp_path / f"{name}.log").read_text(encoding="utf-8") for name in ("first", "second")]
    for code, text in zip(codes, logs):
        no_traceback(text)
        assert code == 0, text
        assert "verification passed" in text
        assert not re.search(r"corrupt|recomputing", text), text

    assert check_entries(cache) == 300
    manifests = [json.loads((tmp_path / name / "model" / "model.json").read_text())
                 for name in ("first", "second")]
    assert manifests[0]["labels"] == manifests[1]["labels"]
    # The same bottlenecks and the same seed: the same model, whoever computed each entry.
    assert manifests[0]["test_accuracy"] == manifests[1]["test_accuracy"]
    assert list(cache.rglob("engines/*.tflite")) and leftovers(cache) == []

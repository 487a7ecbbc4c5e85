"""Read-only and full cache and output folders: one line naming the path, nothing half-written.

Read-only folders are ``chmod 555`` folders, real because the child runs without root's power
to ignore file modes (tests/privileges.py). Full folders are small tmpfs mounts, so the writes
really fail with ENOSPC; mounting needs root, and the tests skip with that reason without it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.helpers import TINY_ARCH, check_entries, leftovers, no_traceback, run

pytestmark = pytest.mark.slow


def _retrain(photos: Path, cache: Path, out: Path, *extra) -> list:
    return ["retrain", "--image-dir", photos, "--weights", "none", "--architecture", TINY_ARCH,
            "--bottleneck-dir", cache, "--output-dir", out, "--how-many-training-steps", 50,
            *extra]


def _one_error(result, *fragments: str) -> str:
    """The run failed with exactly one error line holding every fragment; that line."""
    no_traceback(result)
    assert result.returncode == 2, result.stdout + result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("toolchain: error:")]
    assert len(errors) == 1, result.stderr
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])
    return errors[0]


@pytest.fixture
def read_only(tmp_path):
    """``read_only(folder)`` makes an existing folder read-only until the test ends."""
    locked = []

    def lock(folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        folder.chmod(0o555)
        locked.append(folder)
        return folder

    yield lock
    for folder in locked:
        folder.chmod(0o755)


@pytest.fixture
def small_disk(tmp_path):
    """``small_disk(name, kib)``: a tmpfs of ``kib`` KiB mounted at ``tmp_path/name``."""
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("a full disk is simulated with a small tmpfs, which needs root to mount")
    mounted = []

    def make(name: str, kib: int) -> Path:
        point = tmp_path / name
        point.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={kib}k", "tmpfs", str(point)],
                              capture_output=True, text=True)
        if done.returncode:
            pytest.skip(f"cannot mount a tmpfs to simulate a full disk: {done.stderr.strip()}")
        mounted.append(point)
        return point

    yield make
    for point in mounted:
        subprocess.run(["umount", str(point)], check=False)


def test_read_only_cache_is_one_line_naming_it(tmp_path, sample_dir, read_only):
    cache = read_only(tmp_path / "cache")
    result = run(tmp_path / "home", *_retrain(sample_dir, cache, tmp_path / "out"))
    _one_error(result, f"cannot create bottleneck cache {cache}/", "Permission denied")
    assert "hint: pass a writable --bottleneck-dir" in result.stderr
    assert not (tmp_path / "out" / "model.json").exists()


def test_a_read_only_cache_that_holds_every_bottleneck_is_used(tmp_path, sample_dir, read_only):
    cache = tmp_path / "cache"
    first = run(tmp_path / "home", *_retrain(sample_dir, cache, tmp_path / "one"))
    assert first.returncode == 0, first.stderr
    for folder in sorted((p for p in cache.rglob("*") if p.is_dir()), reverse=True):
        read_only(folder)
    read_only(cache)
    again = run(tmp_path / "home", *_retrain(sample_dir, cache, tmp_path / "two"))
    no_traceback(again)
    assert again.returncode == 0, again.stderr
    assert "computed)" in again.stdout and " 0 computed" in again.stdout
    assert (tmp_path / "two" / "model.json").is_file()


def test_read_only_output_is_one_line_naming_it(tmp_path, sample_dir, read_only):
    out = read_only(tmp_path / "out")
    result = run(tmp_path / "home", "build", "--image-dir", sample_dir, "--weights", "none",
                 "--architecture", TINY_ARCH, "--bottleneck-dir", tmp_path / "cache",
                 "--output-dir", out, "--how-many-training-steps", 50, "--target", "tflite")
    _one_error(result, f"cannot write to {out}: Permission denied")
    assert list(out.iterdir()) == []
    # Checked before any work: no bottleneck was computed for a run that could not finish.
    assert check_entries(tmp_path / "cache") == 0


def test_full_cache_is_one_line_and_leaves_no_partial_engine(tmp_path, sample_dir,
                                                             small_disk):
    cache = small_disk("cache", 64)  # the TFLite engine alone is about 4 MB
    result = run(tmp_path / "home", *_retrain(sample_dir, cache, tmp_path / "out"))
    _one_error(result, str(cache / "engines"), "No space left on device")
    assert list((cache / "engines").iterdir()) == []
    assert not (tmp_path / "out" / "model.json").exists()


def test_cache_filling_up_mid_extraction_keeps_only_complete_entries(tmp_path, sample_dir,
                                                                     small_disk, tiny_backbone):
    from toolchain.cache import BottleneckCache, load_engine

    warm = tmp_path / "warm"
    load_engine(BottleneckCache(warm, tiny_backbone))  # a cache that already has its engine
    engine_kib = sum(p.stat().st_size for p in (warm / "engines").iterdir()) // 1024
    cache = small_disk("cache", engine_kib + 160)  # then room for about 30 of the 72 entries
    shutil.copytree(warm / "engines", cache / "engines")
    result = run(tmp_path / "home", *_retrain(sample_dir, cache, tmp_path / "out"))
    _one_error(result, f"cannot write {cache}/", ".bn: No space left on device")
    assert 0 < check_entries(cache) < 72
    assert leftovers(cache) == []
    assert not (tmp_path / "out" / "model.json").exists()


def test_full_output_is_one_line_and_leaves_no_partial_model(tmp_path, sample_dir, small_disk):
    out = small_disk("out", 512)  # the model file alone is about 4 MB
    result = run(tmp_path / "home", *_retrain(sample_dir, tmp_path / "cache", out))
    _one_error(result, str(out), "No space left on device")
    assert [p.name for p in out.iterdir()] in ([], ["summaries"])
    assert leftovers(out) == []

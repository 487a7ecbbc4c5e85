"""Sharded extraction, as a job array runs it: N ``toolchain bottlenecks --shard I/N`` processes
at once on one shared cache, one of them killed and rerun, then ``--status`` and a retrain
that must compute nothing (``--require-cached``).

Every claim is checked against the files themselves: the cache's entries are named by the
SHA-256 of their image, so the union of the shards is compared with the folder's digests, and
each process's "computed" count with the number of images its shard owns.
"""

from __future__ import annotations

import re
import signal
from pathlib import Path

import pytest

from tests.helpers import (
    TINY_ARCH,
    cache_entries,
    check_entries,
    interrupt,
    leftovers,
    no_traceback,
    run,
    start,
    wait_for,
)
from toolchain.cache import shard_of
from toolchain.images import file_digest

pytestmark = pytest.mark.slow


def _images(photos: Path) -> dict[str, Path]:
    return {file_digest(path): path for path in photos.rglob("*")
            if path.suffix in (".jpg", ".png")}


def _entries(cache: Path) -> set[str]:
    return {path.name.split(".")[0] for path in cache_entries(cache)}


def _bottlenecks(tmp_path: Path, photos: Path, *extra) -> list:
    return ["bottlenecks", "--image-dir", photos, "--weights", "none", "--architecture",
            TINY_ARCH, "--bottleneck-dir", tmp_path / "cache", *extra]


def _counts(output: str) -> tuple[int, int, int]:
    found = re.search(r"left to the other shards\): (\d+) cached, (\d+) computed", output)
    assert found, output
    elsewhere = re.search(r"; (\d+) left to the other shards", output)
    return int(found[1]), int(found[2]), int(elsewhere[1])


def test_three_shards_at_once_fill_the_cache_with_the_folder_exactly_once(tmp_path,
                                                                         many_photos):
    images = _images(many_photos)
    logs = [tmp_path / f"shard{index}.log" for index in range(3)]
    processes = [start(tmp_path / f"home{index}", *_bottlenecks(
        tmp_path, many_photos, "--shard", f"{index}/3"), log=logs[index]) for index in range(3)]
    for process in processes:
        assert process.wait(600) == 0
    for index, log in enumerate(logs):
        text = log.read_text(encoding="utf-8")
        no_traceback(text)
        owned = sum(1 for digest in images if shard_of(digest, 3) == index)
        assert 0 < owned < len(images)
        assert _counts(text) == (0, owned, len(images) - owned), text
    assert _entries(tmp_path / "cache") == set(images)  # the union is the folder
    assert check_entries(tmp_path / "cache") == len(images)  # and nothing twice
    assert leftovers(tmp_path / "cache") == []


def test_a_killed_shard_reruns_and_a_following_retrain_computes_nothing(tmp_path, many_photos):
    images = _images(many_photos)
    home = tmp_path / "home"
    mine = {digest for digest in images if shard_of(digest, 2) == 0}

    process = start(home, *_bottlenecks(tmp_path, many_photos, "--shard", "0/2"),
                    log=tmp_path / "killed.log")
    wait_for(lambda: cache_entries(tmp_path / "cache"), process, "the first bottleneck")
    assert interrupt(process, signal.SIGKILL) == -signal.SIGKILL
    kept = check_entries(tmp_path / "cache")
    assert 0 < kept < len(mine), "the kill did not land mid-extraction"
    assert _entries(tmp_path / "cache") <= mine  # a shard writes only its own images

    status = run(home, *_bottlenecks(tmp_path, many_photos, "--status", "--shards", "2"))
    assert status.returncode == 1, status.stdout + status.stderr
    assert (f"{kept} of {len(images)} cached, {len(images) - kept} missing"
            in status.stdout), status.stdout
    assert (f"shards of 2: 0/2 missing {len(mine) - kept}, 1/2 missing "
            f"{len(images) - len(mine)}") in status.stdout

    retrain = ["retrain", "--image-dir", many_photos, "--weights", "none", "--architecture",
               TINY_ARCH, "--bottleneck-dir", tmp_path / "cache", "--output-dir",
               tmp_path / "out", "--how-many-training-steps", 20, "--require-cached"]
    refused = run(home, *retrain)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    no_traceback(refused)
    assert (f"toolchain: error: {len(images) - kept} of {len(images)} bottlenecks are not in"
            in refused.stderr), refused.stderr
    assert not (tmp_path / "out" / "model.json").exists()
    assert check_entries(tmp_path / "cache") == kept  # --require-cached computed nothing

    rerun = run(home, *_bottlenecks(tmp_path, many_photos, "--shard", "0/2"))
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert _counts(rerun.stdout) == (kept, len(mine) - kept, len(images) - len(mine))
    other = run(home, *_bottlenecks(tmp_path, many_photos, "--shard", "1/2"))
    assert other.returncode == 0, other.stdout + other.stderr
    assert _entries(tmp_path / "cache") == set(images)

    status = run(home, *_bottlenecks(tmp_path, many_photos, "--status", "--shards", "2"))
    assert status.returncode == 0, status.stdout + status.stderr
    assert f"{len(images)} of {len(images)} cached, 0 missing" in status.stdout
    assert "shards of 2: all complete" in status.stdout

    trained = run(home, *retrain)
    assert trained.returncode == 0, trained.stdout + trained.stderr
    assert f"bottlenecks: {len(images)} cached, 0 computed" in trained.stdout + trained.stderr
    assert leftovers(tmp_path / "cache", tmp_path / "out") == []

"""The bottleneck cache and its TFLite engine."""

from __future__ import annotations

import json
import shutil
import struct

import numpy as np
import pytest

from toolchain import backbones
from toolchain import engine as engine_module
from toolchain.cache import (
    ENGINE_TOLERANCE,
    BottleneckCache,
    Job,
    Shard,
    Vectors,
    default_workers,
    engine_difference,
    extract,
    load_engine,
    status,
)
from toolchain.distortions import Distortions
from toolchain.engine import TENSORFLOW, XNNPACK, choice_path, choose_runtime
from toolchain.errors import UsageError
from toolchain.images import file_digest, load_rgb
from toolchain.training import bottleneck_jobs


@pytest.fixture
def photos(tmp_path, sample_dir):
    """A private copy of six sample images (tests here modify files)."""
    out = tmp_path / "photos"
    for source in sorted(sample_dir.glob("*/*_00[0-1].*"))[:6]:
        target = out / source.parent.name / source.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, target)
    return sorted(out.glob("*/*"))


@pytest.fixture
def cache_root(tmp_path, tiny_backbone, session_cache):
    """An empty cache holding only the (once-built) engine, so tests don't rebuild it."""
    shared = BottleneckCache(session_cache, tiny_backbone)
    if not shared.engine_path.is_file():
        load_engine(shared)
    choose_runtime(shared, default_workers())  # measured once per session, recorded
    root = tmp_path / "cache"
    shutil.copytree(session_cache / "engines", root / "engines")
    return root


RUNTIMES = pytest.mark.parametrize("runtime", [XNNPACK, TENSORFLOW])


@RUNTIMES
def test_first_run_computes_second_run_reads(cache_root, photos, tiny_backbone, runtime):
    cache = BottleneckCache(cache_root, tiny_backbone)
    jobs = [Job(p) for p in photos]
    first = extract(jobs, cache, progress=False, runtime=runtime)
    assert (first.cached, first.computed, first.failures) == (0, len(photos), {})
    assert first.runtime == runtime
    second = extract(jobs, cache, progress=False)
    assert (second.cached, second.computed) == (len(photos), 0)
    for key, vector in first.vectors.items():
        np.testing.assert_array_equal(second.vectors[key], vector)
        assert vector.shape == (tiny_backbone.bottleneck_size,)


@RUNTIMES
def test_engine_matches_tensorflow_on_real_images(tmp_path, photos, tiny_backbone, runtime):
    cache = BottleneckCache(tmp_path / "fresh", tiny_backbone)
    result = extract([Job(p) for p in photos], cache, progress=False, runtime=runtime)
    spec = tiny_backbone.spec
    batch = np.stack([spec.preprocessing.apply(load_rgb(p, spec.input_size)) for p in photos])
    expected = tiny_backbone.model(batch, training=False).numpy()
    got = np.stack([result.vectors[(p, "")] for p in photos])
    assert engine_difference(got, expected) <= ENGINE_TOLERANCE
    assert cache.engine_path.is_file()


def test_changed_image_is_a_miss_and_only_it_is_recomputed(cache_root, photos, tiny_backbone):
    cache = BottleneckCache(cache_root, tiny_backbone)
    jobs = [Job(p) for p in photos]
    before = extract(jobs, cache, progress=False)
    from PIL import Image

    Image.new("RGB", (50, 40), (200, 10, 10)).save(photos[0], format="JPEG")
    after = extract(jobs, cache, progress=False)
    assert (after.cached, after.computed) == (len(photos) - 1, 1)
    assert not np.array_equal(after.vectors[(photos[0], "")], before.vectors[(photos[0], "")])


def test_other_weights_or_architecture_never_hit(tmp_path, photos, tiny_backbone):
    root = tmp_path / "cache"
    extract([Job(p) for p in photos], BottleneckCache(root, tiny_backbone), progress=False)
    reseeded = backbones.Backbone(tiny_backbone.spec, tiny_backbone.spec.build(seed=5), "",
                                  tiny_backbone.weights, "test")
    reseeded.fingerprint = backbones.fingerprint(reseeded.spec.name, reseeded.model)
    other = BottleneckCache(root, reseeded)
    assert other.dir != BottleneckCache(root, tiny_backbone).dir
    assert extract([Job(photos[0])], other, progress=False).computed == 1
    arch = backbones.load(backbones.get("mobilenet_0.25_128"), backbones.WeightsChoice("none"))
    assert extract([Job(photos[0])], BottleneckCache(root, arch), progress=False).computed == 1


@pytest.mark.parametrize("damage", ["truncate", "flip", "empty", "garbage"])
def test_corrupt_entries_are_detected_and_recomputed(cache_root, photos, tiny_backbone, damage,
                                                     toolchain_log):
    cache = BottleneckCache(cache_root, tiny_backbone)
    good = extract([Job(photos[0])], cache, progress=False).vectors[(photos[0], "")]
    entry = cache.path(file_digest(photos[0]))
    data = bytearray(entry.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "flip":
        data[-3] ^= 0x40
    elif damage == "empty":
        data = bytearray()
    else:
        data = bytearray(b"\x80\x04\x95 pickle-like garbage")
    entry.write_bytes(bytes(data))
    again = extract([Job(photos[0])], cache, progress=False)
    assert again.computed == 1
    np.testing.assert_allclose(again.vectors[(photos[0], "")], good, atol=1e-6)
    assert "corrupt or truncated" in toolchain_log.text
    magic, count, _ = struct.unpack_from("<4sII", entry.read_bytes())
    assert (magic, count) == (b"TCBN", tiny_backbone.bottleneck_size)


@RUNTIMES
def test_undecodable_image_is_a_failure_not_a_crash(cache_root, photos, tiny_backbone, runtime):
    photos[1].write_bytes(photos[1].read_bytes()[:200])  # truncated
    result = extract([Job(p) for p in photos], BottleneckCache(cache_root, tiny_backbone),
                     progress=False, runtime=runtime)
    assert list(result.failures) == [photos[1]]
    assert "truncated" in result.failures[photos[1]] or "corrupt" in result.failures[photos[1]]
    assert result.computed == len(photos) - 1


def test_corrupt_engine_is_rebuilt(tmp_path, photos, tiny_backbone):
    cache = BottleneckCache(tmp_path / "fresh", tiny_backbone)
    load_engine(cache)
    cache.engine_path.write_bytes(b"broken")
    engine = load_engine(cache)
    assert cache.engine_path.stat().st_size > 1000
    spec = tiny_backbone.spec
    batch = spec.preprocessing.apply(load_rgb(photos[0], spec.input_size))[None]
    expected = tiny_backbone.model(batch, training=False).numpy()[0]
    assert engine_difference(engine(batch), expected) <= ENGINE_TOLERANCE


def test_distortion_variants_are_cached_deterministic_and_distinct(cache_root, photos,
                                                                  tiny_backbone):
    distortions = Distortions(flip_left_right=True, random_crop=20, random_brightness=20,
                              variants=3)
    cache = BottleneckCache(cache_root, tiny_backbone)
    jobs = [Job(photos[0])] + [Job(photos[0], distortions, i) for i in range(3)]
    first = extract(jobs, cache, progress=False)
    assert first.computed == 4
    vectors = [first.vectors[(photos[0], job.variant)] for job in jobs]
    for i in range(1, 4):
        assert not np.allclose(vectors[0], vectors[i])
    shutil.rmtree(cache.dir)  # recomputing gives the same variants: they are seeded
    cache = BottleneckCache(cache_root, tiny_backbone)
    second = extract(jobs, cache, progress=False)
    for job, vector in zip(jobs, vectors):
        np.testing.assert_allclose(second.vectors[(photos[0], job.variant)], vector, atol=1e-6)
    assert extract(jobs, cache, progress=False).computed == 0


def test_unwritable_cache_is_a_one_line_error(tmp_path, tiny_backbone):
    import os

    from toolchain.errors import CacheError

    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache folder should be")
    with pytest.raises(CacheError) as raised:
        BottleneckCache(blocker / "cache", tiny_backbone)
    assert str(blocker) in raised.value.message and "\n" not in raised.value.message
    assert os.path.isfile(blocker)


def test_more_images_than_a_batch_on_tensorflow(cache_root, sample_dir, tiny_backbone):
    """Several TensorFlow batches (the last one partial) give what one XNNPACK pass gives."""
    paths = sorted(sample_dir.glob("*/*.jpg"))[: engine_module.BATCH * 2 + 3]
    jobs = [Job(p) for p in paths]
    batched = extract(jobs, BottleneckCache(cache_root / "a", tiny_backbone), progress=False,
                      runtime=TENSORFLOW)
    single = extract(jobs, BottleneckCache(cache_root / "b", tiny_backbone), progress=False,
                     runtime=XNNPACK)
    assert batched.computed == single.computed == len(paths)
    for key, vector in single.vectors.items():
        assert engine_difference(batched.vectors[key], vector) <= ENGINE_TOLERANCE


def test_runtime_choice_is_measured_once_and_recorded(tmp_path, tiny_backbone, monkeypatch,
                                                      photos):
    cache = BottleneckCache(tmp_path / "fresh", tiny_backbone)
    load_engine(cache)
    choice = choose_runtime(cache, 2)
    assert choice.runtime in (XNNPACK, TENSORFLOW) and choice.xnnpack > 0 and choice.tensorflow > 0
    assert choice.runtime == (TENSORFLOW if choice.tensorflow > engine_module.TENSORFLOW_MARGIN
                              * choice.xnnpack else XNNPACK)

    def no_measuring(*args):
        raise AssertionError("measured again")

    monkeypatch.setattr(engine_module, "_measure", no_measuring)
    assert choose_runtime(cache, 2) == choice
    # A recorded choice is what extraction uses.
    forced = {**choice.__dict__, "runtime": TENSORFLOW if choice.runtime == XNNPACK else XNNPACK}
    choice_path(cache).write_text(json.dumps(forced))
    result = extract([Job(p) for p in photos], cache, progress=False, workers=2)
    assert result.runtime == forced["runtime"]
    # Unreadable, or recorded for another worker count: measured again.
    monkeypatch.undo()
    choice_path(cache).write_text("{broken")
    assert choose_runtime(cache, 2).runtime in (XNNPACK, TENSORFLOW)
    assert json.loads(choice_path(cache).read_text())["workers"] == 2
    assert choose_runtime(cache, 1).workers == 1


def test_shards_split_every_image_into_exactly_one_stable_shard():
    import hashlib

    digests = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(400)]
    for count in (1, 2, 3, 7):
        owners = [[index for index in range(count) if Shard(index, count).owns(d)]
                  for d in digests]
        assert all(len(found) == 1 for found in owners)
        sizes = [sum(found == [index] for found in owners) for index in range(count)]
        assert min(sizes) > 400 / count * 0.6  # spread, not all in one
    # An image's shard depends on its own digest only: adding images moves none.
    before = {d: Shard.parse("1/3").owns(d) for d in digests[:100]}
    assert {d: Shard(1, 3).owns(d) for d in digests[:100]} == before


@pytest.mark.parametrize("text", ["3/3", "-1/2", "1", "a/b", "1/0", "0/2/3"])
def test_a_bad_shard_is_a_usage_error(text):
    with pytest.raises(UsageError, match="--shard"):
        Shard.parse(text)


def test_a_shard_reads_and_computes_only_its_images(cache_root, photos, tiny_backbone):
    cache = BottleneckCache(cache_root, tiny_backbone)
    jobs = [Job(p) for p in photos]
    mine = [p for p in photos if Shard(0, 2).owns(file_digest(p))]
    first = extract(jobs, cache, progress=False, shard=Shard(0, 2))
    assert (first.cached, first.computed, first.elsewhere) == (0, len(mine),
                                                               len(photos) - len(mine))
    assert sorted(path for path, _ in first.vectors) == sorted(mine)
    found = status(jobs, cache, shards=2)
    assert (found.cached, found.missing_by_shard) == (len(mine), (0, len(photos) - len(mine)))
    assert found.incomplete_shards() == ([1] if len(mine) < len(photos) else [])
    counted = extract(jobs, cache, progress=False, shard=Shard(0, 2), keep=False)
    assert (counted.cached, counted.computed, counted.vectors) == (len(mine), 0, {})
    nothing = extract(jobs, cache, progress=False, compute=False)
    assert nothing.computed == 0 and len(nothing.missing) == len(photos) - len(mine)
    assert status(jobs, cache).missing_by_shard == (len(photos) - len(mine),)


@pytest.mark.parametrize(("flags", "message"), [
    (["--shard", "0/2", "--status"], "--status reports on every shard"),
    (["--shards", "3"], "--shards applies to --status only"),
    (["--status", "--shards", "0"], "--shards must be at least 1"),
    (["--shard", "2/2"], "I must be from 0 to N-1"),
])
def test_shard_and_status_flags_are_checked_before_any_work(tmp_path, flags, message):
    from toolchain import cli

    with pytest.raises(UsageError, match=message):
        cli.options_for(["bottlenecks", "--image-dir", str(tmp_path), *flags])


@RUNTIMES
def test_an_error_in_a_worker_reaches_the_caller(cache_root, photos, tiny_backbone, runtime,
                                                  monkeypatch):
    """Workers hand their results over a queue (cache._on_xnnpack): an error other than an
    unreadable image must still stop extraction with that error, not hang or be dropped."""
    from toolchain import cache as cache_module

    def broken(job, cache, digest):
        raise RuntimeError(f"decoder crashed on {job.path.name}")

    monkeypatch.setattr(cache_module, "_pixels", broken)
    with pytest.raises(RuntimeError, match="decoder crashed on"):
        extract([Job(p) for p in photos], BottleneckCache(cache_root, tiny_backbone),
                progress=False, runtime=runtime)


def test_vectors_are_rows_of_one_matrix_and_a_consecutive_run_is_a_view(tmp_path):
    jobs = [Job(tmp_path / f"{i}.jpg") for i in range(5)]
    vectors = Vectors(jobs)
    for i in (4, 0, 2, 1):  # in any order, as workers finish; job 3's image failed
        vectors.put(jobs[i], np.full(3, i, np.float32))
    assert len(vectors) == 4 and (jobs[3].path, "") not in vectors
    assert sorted(path.name for path, _ in vectors) == ["0.jpg", "1.jpg", "2.jpg", "4.jpg"]
    assert vectors.matrix.shape == (5, 3)
    run = vectors.rows_of([(job.path, "") for job in jobs[:3]])
    assert run[:, 0].tolist() == [0, 1, 2] and np.shares_memory(run, vectors.matrix)
    gap = vectors.rows_of([(jobs[2].path, ""), (jobs[4].path, "")])
    assert gap[:, 0].tolist() == [2, 4] and not np.shares_memory(gap, vectors.matrix)
    with pytest.raises(KeyError):
        vectors.rows_of([(jobs[3].path, "")])
    assert Vectors() == {}
    twice = Vectors([jobs[0], jobs[1], jobs[0]])
    twice.put(jobs[0], np.ones(3, np.float32))
    assert len(twice) == 1 and twice[(jobs[0].path, "")].tolist() == [1, 1, 1]


def test_training_jobs_run_subset_by_subset_then_the_variants(sample_dir):
    """So that training's matrices are views of extraction's one matrix, not copies."""
    from toolchain.dataset import scan

    dataset = scan(sample_dir)
    distortions = Distortions(flip_left_right=True, variants=2)
    jobs = bottleneck_jobs(dataset, distortions)
    plain = [job.path for job in jobs if not job.variant]
    assert plain == [entry.path for subset in ("training", "validation", "testing")
                     for entry in dataset.subset(subset)]
    assert len(plain) == len(dataset.entries)
    assert jobs[:len(plain)] == [Job(path) for path in plain]
    assert [(job.path, job.index) for job in jobs[len(plain):]] == [
        (entry.path, i) for entry in dataset.subset("training") for i in range(2)]

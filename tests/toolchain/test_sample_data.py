"""Tests for the built-in demo dataset (``toolchain sample-data``)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from toolchain import sample_photos as sample_data
from toolchain.errors import ToolchainError, UsageError
from toolchain.sample_photos import CLASSES, SampleDataSummary, write_sample_data

PER_CLASS = 12  # small, so the file runs in seconds; even indices train, odd ones test


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, SampleDataSummary]:
    """One small dataset shared by the read-only tests."""
    out = tmp_path_factory.mktemp("shared") / "photos"
    return out, write_sample_data(out, per_class=PER_CLASS, seed=3)


def _images(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name != sample_data.MARKER)


def _digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under ``root`` (and ``root`` itself) with its mtime and size."""
    paths = [root, *root.rglob("*")]
    return {str(p): (p.stat().st_mtime_ns, p.stat().st_size) for p in paths}


def _forbid_drawing(monkeypatch) -> None:
    """Fail the test if any image is drawn: refusals must happen before any work."""

    def draw(*args, **kwargs):
        raise AssertionError("an image was drawn")

    monkeypatch.setattr(sample_data, "_write_image", draw)


@pytest.fixture
def no_drawing(monkeypatch):
    _forbid_drawing(monkeypatch)


def test_classes_and_counts(dataset):
    out, summary = dataset
    assert len(CLASSES) >= 6
    assert list(CLASSES) == sorted(CLASSES)
    assert summary == SampleDataSummary(out, CLASSES, PER_CLASS * len(CLASSES), created=True)
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == list(CLASSES)
    for name in CLASSES:
        files = sorted(p.name for p in (out / name).iterdir())
        assert len(files) == PER_CLASS
        assert [f.rsplit(".", 1)[0] for f in files] == [f"{name}_{i:03d}" for i in range(PER_CLASS)]
    marker = json.loads((out / sample_data.MARKER).read_text())
    assert marker == {
        "per_class": PER_CLASS,
        "seed": 3,
        "classes": list(CLASSES),
        "version": sample_data.VERSION,
    }
    # Nothing but the dataset is left next to it (the temporary build folder is gone).
    assert [p.name for p in out.parent.iterdir()] == ["photos"]


def test_same_arguments_give_byte_identical_files(dataset, tmp_path):
    out, _ = dataset
    again = tmp_path / "again"
    write_sample_data(again, per_class=PER_CLASS, seed=3)
    first, second = _digests(out), _digests(again)
    assert len(first) == PER_CLASS * len(CLASSES) + 1
    assert first == second


def test_another_seed_gives_other_images(dataset, tmp_path):
    out, _ = dataset
    other = _digests(write_sample_data(tmp_path / "other", per_class=2, seed=4).out_dir)
    same = _digests(out)
    images = [k for k in other if k != sample_data.MARKER]
    assert images and all(other[k] != same[k] for k in images)


def test_images_decode_as_jpeg_and_png_with_pngs_in_every_class(dataset):
    out, _ = dataset
    formats: dict[str, set[str]] = {name: set() for name in CLASSES}
    for path in _images(out):
        with Image.open(path) as im:
            fmt = im.format
            im.load()  # decodes the whole file, not just the header
            assert im.mode == "RGB"
        assert fmt == {".jpg": "JPEG", ".png": "PNG"}[path.suffix]
        formats[path.parent.name].add(fmt)
    assert all(found == {"JPEG", "PNG"} for found in formats.values()), formats
    pngs = sum(p.suffix == ".png" for p in _images(out))
    assert 0 < pngs <= 0.2 * len(_images(out))


def test_sizes_and_aspect_ratios_vary(dataset):
    out, _ = dataset
    sizes = []
    for path in _images(out):
        with Image.open(path) as im:
            sizes.append(im.size)
    assert len(set(sizes)) > 5
    assert all(160 <= side <= 640 for size in sizes for side in size)
    assert any(w > h for w, h in sizes) and any(w < h for w, h in sizes)


def test_images_within_a_class_differ(dataset):
    out, _ = dataset
    for name in CLASSES:
        thumbs = []
        for path in sorted((out / name).iterdir())[:4]:
            with Image.open(path) as im:
                thumbs.append(np.asarray(im.convert("RGB").resize((32, 32)), np.float32))
        for a in range(len(thumbs)):
            for b in range(a + 1, len(thumbs)):
                assert np.abs(thumbs[a] - thumbs[b]).mean() > 2.0, (name, a, b)


def test_rerun_with_same_parameters_writes_nothing(tmp_path):
    out = tmp_path / "data"
    assert write_sample_data(out, per_class=2, seed=1).created
    before = _snapshot(out)
    siblings = sorted(tmp_path.iterdir())
    summary = write_sample_data(out, per_class=2, seed=1)
    assert summary == SampleDataSummary(out, CLASSES, 2 * len(CLASSES), created=False)
    assert _snapshot(out) == before
    assert sorted(tmp_path.iterdir()) == siblings


def test_other_parameters_on_an_earlier_folder_raise_and_touch_nothing(tmp_path, monkeypatch):
    out = tmp_path / "data"
    write_sample_data(out, per_class=2, seed=1)
    before = _snapshot(out)
    _forbid_drawing(monkeypatch)
    with pytest.raises(UsageError):
        write_sample_data(out, per_class=3, seed=1)
    assert _snapshot(out) == before


def test_foreign_folder_raises_and_is_left_untouched(tmp_path, no_drawing):
    out = tmp_path / "photos"
    (out / "cats").mkdir(parents=True)
    (out / "cats" / "tom.jpg").write_bytes(b"not really a jpeg")
    (out / "notes.txt").write_text("mine")
    before = _snapshot(out)
    with pytest.raises(UsageError) as err:
        write_sample_data(out, per_class=2)
    assert "already exists and is not an earlier sample-data folder" in err.value.message
    assert err.value.hint
    assert _snapshot(out) == before
    assert (out / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photos"]  # no temporary folder left


def test_existing_file_raises(tmp_path, no_drawing):
    out = tmp_path / "photos"
    out.write_text("a file")
    with pytest.raises(UsageError):
        write_sample_data(out, per_class=2)
    assert out.read_text() == "a file"


def test_empty_folder_is_filled(tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    summary = write_sample_data(out, per_class=2)
    assert summary.created
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == list(CLASSES)
    assert len(_images(out)) == 2 * len(CLASSES)


def test_missing_parent_folders_are_created(tmp_path):
    out = tmp_path / "a" / "b" / "data"
    assert write_sample_data(out, per_class=2).created
    assert len(_images(out)) == 2 * len(CLASSES)


def test_corrupt_marker_counts_as_foreign(tmp_path, no_drawing):
    out = tmp_path / "data"
    out.mkdir()
    (out / sample_data.MARKER).write_text("{not json")
    with pytest.raises(UsageError, match="not an earlier sample-data folder"):
        write_sample_data(out, per_class=2)
    assert [p.name for p in out.iterdir()] == [sample_data.MARKER]


@pytest.mark.parametrize("per_class", [1, 0, -5])
def test_too_few_images_per_class_raise(tmp_path, per_class, no_drawing):
    with pytest.raises(UsageError):
        write_sample_data(tmp_path / "data", per_class=per_class)
    assert not (tmp_path / "data").exists()


def test_images_are_drawn_in_a_hidden_sibling_then_moved_into_place(tmp_path, monkeypatch):
    out, drawn_in = tmp_path / "data", set()
    real = sample_data._write_image

    def spy(folder, *args):
        assert not out.exists(), "out_dir must appear only when complete"
        drawn_in.add(folder.parent)
        real(folder, *args)

    monkeypatch.setattr(sample_data, "_write_image", spy)
    write_sample_data(out, per_class=2)
    (build,) = drawn_in
    assert build.parent == tmp_path and build.name.startswith(".") and not build.exists()
    assert len(_images(out)) == 2 * len(CLASSES)


def test_failure_midway_leaves_nothing_behind(tmp_path, monkeypatch):
    calls = []
    real_save = Image.Image.save

    def flaky_save(self, fp, *args, **kwargs):
        calls.append(fp)
        if len(calls) == 5:
            raise OSError("disk full")
        return real_save(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", flaky_save)
    with pytest.raises(ToolchainError, match="disk full") as err:
        write_sample_data(tmp_path / "data", per_class=3)
    assert str(tmp_path / "data") in err.value.message and err.value.hint
    assert list(tmp_path.iterdir()) == []  # neither the dataset nor its temporary folder


def test_interruption_leaves_nothing_behind(tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(sample_data, "_write_image", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_sample_data(tmp_path / "data", per_class=3)
    assert list(tmp_path.iterdir()) == []


def test_folder_permissions_follow_the_umask(tmp_path):
    out = tmp_path / "data"
    write_sample_data(out, per_class=2)
    assert out.stat().st_mode & 0o777 == (out / CLASSES[0]).stat().st_mode & 0o777
    assert os.access(out, os.R_OK | os.X_OK)


def _features(path: Path) -> np.ndarray:
    """Per-channel mean and std of a 64x64 copy, plus a 4x4 grid of mean colours."""
    with Image.open(path) as im:
        a = np.asarray(im.convert("RGB").resize((64, 64), Image.Resampling.BILINEAR), np.float32)
    a /= 255
    grid = a.reshape(4, 16, 4, 16, 3).mean(axis=(1, 3)).ravel()
    return np.concatenate([a.mean(axis=(0, 1)), a.std(axis=(0, 1)), grid])


def test_classes_are_learnable_from_simple_colour_statistics(dataset):
    out, _ = dataset
    x, y, index = [], [], []
    for label, name in enumerate(CLASSES):
        for path in sorted((out / name).iterdir()):
            x.append(_features(path))
            y.append(label)
            index.append(int(path.stem.rsplit("_", 1)[1]))
    x, y, index = np.array(x), np.array(y), np.array(index)
    train, test = index % 2 == 0, index % 2 == 1
    mean, std = x[train].mean(axis=0), x[train].std(axis=0) + 1e-6
    x = (x - mean) / std
    centroids = np.array([x[train & (y == k)].mean(axis=0) for k in range(len(CLASSES))])
    predicted = ((x[test][:, None, :] - centroids[None]) ** 2).sum(axis=-1).argmin(axis=1)
    accuracy = (predicted == y[test]).mean()
    assert accuracy >= 0.9, accuracy

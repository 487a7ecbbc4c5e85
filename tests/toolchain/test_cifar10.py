"""Tests for CIFAR-10 as class folders (``toolchain sample-data OUT --cifar10 ARCHIVE``).

The archives are written here in the binary release's exact layout (``cifar-10-batches-bin/``,
``batches.meta.txt``, 3073-byte records of a label byte and the red, green and blue planes), so
every pixel written can be checked against the record it came from.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.helpers import cli_env, command
from toolchain import cifar10
from toolchain.cli import main
from toolchain.dataset import scan
from toolchain.errors import DatasetError, UsageError

NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def _batch(rng, labels) -> tuple[bytes, np.ndarray]:
    images = rng.integers(0, 256, (len(labels), 32, 32, 3), dtype=np.uint8)
    planes = images.transpose(0, 3, 1, 2).reshape(len(labels), -1)
    rows = np.concatenate([np.asarray(labels, np.uint8)[:, None], planes], axis=1)
    return rows.tobytes(), images


def _archive(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """A small binary release: 6 training batches' worth of records and its expected images."""
    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp("cifar")
    members = {"cifar-10-batches-bin/batches.meta.txt": ("\n".join(NAMES) + "\n\n").encode(),
               "cifar-10-batches-bin/readme.html": b"<html></html>"}
    expected = {}
    for number, batch in enumerate(cifar10.BATCHES):
        labels = [(number + i) % 10 for i in range(12)]
        data, images = _batch(rng, labels)
        members[f"cifar-10-batches-bin/{batch}.bin"] = data
        expected[batch] = (labels, images)
    return _archive(root / cifar10.ARCHIVE_NAME, members), expected


def test_every_image_is_written_to_its_class_folder_pixel_for_pixel(release, tmp_path):
    archive, expected = release
    summary = cifar10.write_cifar10(archive, tmp_path / "cifar", progress=False)
    assert summary.created and summary.images == 72 and summary.classes == NAMES
    for batch, (labels, images) in expected.items():
        for index, label in enumerate(labels):
            path = tmp_path / "cifar" / NAMES[label] / f"{batch}_{index:05d}.png"
            np.testing.assert_array_equal(np.asarray(Image.open(path).convert("RGB")),
                                          images[index])
    dataset = scan(tmp_path / "cifar")
    assert dataset.labels == tuple(sorted(NAMES))
    assert sum(len(dataset.subset(name)) for name in ("training", "validation", "testing")) == 72


def test_per_class_keeps_the_first_images_of_each_class_and_a_rerun_is_a_no_op(release,
                                                                              tmp_path):
    archive, _ = release
    out = tmp_path / "cifar"
    summary = cifar10.write_cifar10(archive, out, per_class=3, progress=False)
    assert summary.images == 30
    assert sorted(p.name for p in (out / "airplane").iterdir()) == [
        "data_batch_1_00000.png", "data_batch_1_00010.png", "data_batch_2_00009.png"]
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    again = cifar10.write_cifar10(archive, out, per_class=3, progress=False)
    assert not again.created and again.images == 30
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before
    with pytest.raises(UsageError, match="not an earlier CIFAR-10 folder"):
        cifar10.write_cifar10(archive, out, per_class=4, progress=False)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before


def test_a_users_folder_is_never_touched(release, tmp_path):
    archive, _ = release
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(UsageError, match="already exists"):
        cifar10.write_cifar10(archive, out, progress=False)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


@pytest.mark.parametrize(("members", "message"), [
    ({"cifar-10-batches-py/batches.meta": b"x", "cifar-10-batches-py/data_batch_1": b"x"},
     "Python \\(pickle\\) release"),
    ({"photos/cat.jpg": b"x"}, "not the CIFAR-10 binary archive"),
    ({"cifar-10-batches-bin/batches.meta.txt": b"a\nb\n",
      "cifar-10-batches-bin/data_batch_1.bin": b"\x00" * 3000}, "not a whole number of 3073"),
    ({"cifar-10-batches-bin/batches.meta.txt": b"a\nb\n",
      "cifar-10-batches-bin/data_batch_1.bin": b"\x07" + b"\x00" * 3072}, "has label 7"),
    ({"cifar-10-batches-bin/batches.meta.txt": b"a\na\n",
      "cifar-10-batches-bin/data_batch_1.bin": b"\x00" * 3073}, "distinct class names"),
    # A stranger's archive: class names that cannot be folders or labels.
    ({"cifar-10-batches-bin/batches.meta.txt": b"cat\nd\x00g\n",
      "cifar-10-batches-bin/data_batch_1.bin": b"\x00" * 3073},
     r"names a class 'd\\x00g', which cannot be a folder and a label"),
    ({"cifar-10-batches-bin/batches.meta.txt": b"cat\n\x1b[2Jdog\n",
      "cifar-10-batches-bin/data_batch_1.bin": b"\x00" * 3073}, r"names a class '\\x1b\[2Jdog'"),
    ({"cifar-10-batches-bin/batches.meta.txt": b"cat\n" + b"d" * 300 + b"\n",
      "cifar-10-batches-bin/data_batch_1.bin": b"\x00" * 3073},
     "names a class of 300 bytes .* a folder name holds at most 200"),
    ({"cifar-10-batches-bin/batches.meta.txt": b"cat\n.dog\n",
      "cifar-10-batches-bin/data_batch_1.bin": b"\x00" * 3073}, "names a class '.dog'"),
])
def test_bad_archives_are_one_line_errors_and_write_nothing(tmp_path, members, message):
    archive = _archive(tmp_path / "bad.tar.gz", members)
    with pytest.raises(DatasetError, match=message):
        cifar10.write_cifar10(archive, tmp_path / "out", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.tar.gz"]


def test_a_truncated_archive_is_one_line(release, tmp_path, capsys):
    archive, _ = release
    truncated = tmp_path / "truncated.tar.gz"
    truncated.write_bytes(archive.read_bytes()[:5000])
    assert main(["sample-data", str(tmp_path / "out"), "--cifar10", str(truncated)]) == 2
    error, hint = capsys.readouterr().err.strip().splitlines()
    assert error.startswith("toolchain: error: cannot read CIFAR-10 archive")
    assert hint == "hint: the file may be truncated; fetch cifar-10-binary.tar.gz again"
    assert not (tmp_path / "out").exists()


def test_download_fetches_checks_and_keeps_the_archive(release, tmp_path, monkeypatch):
    archive, _ = release
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv(cifar10.URL_VARIABLE, archive.as_uri())
    monkeypatch.setenv(cifar10.MD5_VARIABLE, hashlib.md5(archive.read_bytes()).hexdigest())
    summary = cifar10.write_cifar10("download", tmp_path / "cifar", per_class=2, progress=False)
    kept = tmp_path / "cache" / "toolchain" / "datasets" / cifar10.ARCHIVE_NAME
    assert summary.archive == kept and kept.read_bytes() == archive.read_bytes()
    assert summary.images == 20
    monkeypatch.setenv(cifar10.URL_VARIABLE, (tmp_path / "gone.tar.gz").as_uri())
    assert cifar10.download() == kept  # kept: not fetched again


def test_a_download_that_does_not_match_the_md5_is_refused_and_not_kept(release, tmp_path,
                                                                        monkeypatch):
    archive, _ = release
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv(cifar10.URL_VARIABLE, archive.as_uri())
    monkeypatch.delenv(cifar10.MD5_VARIABLE, raising=False)  # the published MD5
    with pytest.raises(DatasetError, match=f"does not match the published MD5 {cifar10.MD5}"):
        cifar10.download()
    assert not any((tmp_path / "cache").rglob("*.tar.gz"))


def test_no_network_is_one_line_naming_the_url(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv(cifar10.URL_VARIABLE, (tmp_path / "absent.tar.gz").as_uri())
    with pytest.raises(DatasetError, match="cannot download CIFAR-10 from file://"):
        cifar10.download()


def test_the_command_line_writes_cifar10_and_refuses_a_seed(release, tmp_path):
    import subprocess

    archive, _ = release
    out = tmp_path / "cifar"
    done = subprocess.run(command("sample-data", out, "--cifar10", archive, "--per-class", "2"),
                          env=cli_env(tmp_path / "home"), capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"wrote 20 images in 10 classes ({', '.join(NAMES)}) to {out}" in done.stdout
    assert json.loads((out / cifar10.MARKER).read_text())["per_class"] == 2
    assert main(["sample-data", str(tmp_path / "other"), "--cifar10", str(archive),
                 "--seed", "3"]) == 2


def test_the_drawn_scenes_keep_their_default_of_40_per_class(tmp_path, monkeypatch):
    from toolchain import commands

    seen = {}
    monkeypatch.setattr("toolchain.sample_photos.write_sample_data",
                        lambda out, per_class, seed: seen.update(per_class=per_class, seed=seed))
    commands.run_sample_data(commands.SampleDataCommand(out_dir=tmp_path / "x"))
    assert seen == {"per_class": 40, "seed": 0}

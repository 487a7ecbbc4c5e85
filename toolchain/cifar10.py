"""CIFAR-10 as class folders: ``toolchain sample-data OUT_DIR --cifar10 ARCHIVE``.

Why: CIFAR-10 is the data set the TensorFlow for Poets seed was written against, and the one
real, labelled photo set a user can fetch in one file. The chain reads class folders, so this
writes one folder per class, one lossless PNG per image, and lets the usual hash split decide
training, validation and testing.

What it reads: only the *binary* release, ``cifar-10-binary.tar.gz``: ``batches.meta.txt`` (the
ten class names, one per line) and ``data_batch_1..5.bin`` and ``test_batch.bin``, each a run of
3073-byte records (one label byte, then the 32x32 red, green and blue planes, row by row). The
Python release is pickles, and pickles are never loaded here (docs/ARCHITECTURE.md, untrusted
input): it is refused with a pointer to the binary one.

``--cifar10 download`` fetches the archive once into ``$XDG_CACHE_HOME/toolchain/datasets``,
checks the MD5 the data set's page publishes, and keeps it. ``TOOLCHAIN_CIFAR10_URL`` (and
``TOOLCHAIN_CIFAR10_MD5``) point it at a mirror, or in the tests at a local ``file://`` archive:
the download path is the one tested.

Writes are atomic: the folder is built in a temporary sibling and renamed into place; a marker
records the archive's digest, so a re-run is a no-op and a user's folder is never touched.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import tarfile
import urllib.error
import urllib.request
import zlib
from pathlib import Path

import numpy as np

from toolchain import atomic
from toolchain.errors import DatasetError, UsageError
from toolchain.images import file_digest
from toolchain.untrusted import files, hidden, shown

URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
MD5 = "c32a1d4ab5d03f1284b67883e8d87530"
ARCHIVE_NAME = "cifar-10-binary.tar.gz"
#: The environment variables that replace :data:`URL` and :data:`MD5` (a mirror, or a local
#: ``file://`` archive in the tests).
URL_VARIABLE, MD5_VARIABLE = "TOOLCHAIN_CIFAR10_URL", "TOOLCHAIN_CIFAR10_MD5"
MARKER = ".toolchain-cifar10.json"
BATCHES = ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5",
           "test_batch")
SIDE = 32
RECORD = 1 + 3 * SIDE * SIDE
#: Upper bounds on the archive's members, checked before they are read: batches.meta.txt is 61
#: bytes and each batch 30,730,000 in the real archive.
META_BYTES, BATCH_BYTES = 1 << 20, 64 << 20
#: A class name's bytes: file systems allow 255 in a folder name.
NAME_BYTES = 200
_HINT = "choose a new folder or remove it"


@dataclasses.dataclass(frozen=True)
class Cifar10Summary:
    """What :func:`write_cifar10` produced (or found already in place)."""

    out_dir: Path
    classes: tuple[str, ...]
    images: int
    created: bool
    archive: Path


def datasets_dir() -> Path:
    """Where ``--cifar10 download`` keeps the archive."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "toolchain" / "datasets"


def download(folder: Path | None = None) -> Path:
    """The archive in ``folder`` (default :func:`datasets_dir`), fetched and MD5-checked if absent.

    A partial download never takes the final name: the bytes go to a temporary file beside it
    and are renamed only after the digest matched."""

    folder = Path(folder) if folder else datasets_dir()
    url = os.environ.get(URL_VARIABLE) or URL
    md5 = os.environ.get(MD5_VARIABLE) or MD5
    local = folder / ARCHIVE_NAME
    if local.is_file():
        if file_digest(local, "md5") == md5:
            return local
        raise DatasetError(f"{local} does not match the published MD5 {md5}",
                           hint=f"remove it and download again from {url}")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        atomic.check_writable(folder)
        with urllib.request.urlopen(url, timeout=60) as response:  # noqa: S310 (https or a mirror)
            data = response.read()
    except (OSError, ValueError, urllib.error.URLError) as error:
        reason = getattr(error, "reason", None) or getattr(error, "strerror", None) or error
        raise DatasetError(f"cannot download CIFAR-10 from {url}: {reason}",
                           hint=f"download {ARCHIVE_NAME} yourself and pass "
                                "--cifar10 PATH") from error
    if hashlib.md5(data).hexdigest() != md5:
        raise DatasetError(f"the file downloaded from {url} does not match the published MD5 "
                           f"{md5}", hint="try again, or download it yourself")
    atomic.write_bytes(local, data)
    return local


def read_archive(archive: Path) -> tuple[tuple[str, ...], dict[str, tuple[np.ndarray, np.ndarray]]]:
    """The class names, and per batch (labels uint8 [n], images uint8 [n, 32, 32, 3])."""
    archive = Path(archive)
    if not archive.is_file():
        raise UsageError(f"CIFAR-10 archive {archive} does not exist",
                         hint=f"pass the path of {ARCHIVE_NAME}, or 'download'")
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = {Path(member.name).name: member
                       for member in files.tar_members(tar, archive)}
            if "batches.meta" in members or "data_batch_1" in members:
                raise DatasetError(f"{archive} is the Python (pickle) release of CIFAR-10",
                                   hint=f"pass the binary release, {ARCHIVE_NAME}; pickles "
                                        "are never loaded")
            missing = [name for name in ("batches.meta.txt", *(b + ".bin" for b in BATCHES))
                       if name not in members]
            if "batches.meta.txt" in missing or len(missing) == len(BATCHES) + 1:
                raise DatasetError(f"{archive} is not the CIFAR-10 binary archive: it has no "
                                   f"{missing[0]}", hint=f"pass {ARCHIVE_NAME}")
            files.check_member(archive, members["batches.meta.txt"], META_BYTES)
            names = _class_names(tar.extractfile(members["batches.meta.txt"]).read(), archive)
            batches = {}
            for batch in BATCHES:
                member = members.get(batch + ".bin")
                if member is not None:
                    files.check_member(archive, member, BATCH_BYTES)
                    batches[batch] = _records(tar.extractfile(member).read(), batch, archive,
                                              len(names))
    except (tarfile.TarError, EOFError, OSError, zlib.error) as error:
        raise DatasetError(f"cannot read CIFAR-10 archive {archive}: {error}",
                           hint=f"the file may be truncated; fetch {ARCHIVE_NAME} again") from error
    return names, batches


def _class_names(data: bytes, archive: Path) -> tuple[str, ...]:
    """The class names, each usable as a folder name and a label: distinct, no ``/``, no
    control character (a NUL ends a path in C; an escape sequence repaints a terminal), not
    hidden (a leading dot), at most :data:`NAME_BYTES` bytes (file systems allow 255)."""
    names = tuple(line.strip() for line in data.decode("utf-8", "replace").splitlines()
                  if line.strip())
    if not 2 <= len(names) <= 256 or len(set(names)) != len(names):
        raise DatasetError(f"{archive}: batches.meta.txt does not hold distinct class names")
    for name in names:
        if "/" in name or name.startswith(".") or any(hidden(char) for char in name):
            raise DatasetError(f"{archive}: batches.meta.txt names a class '{shown(name)}', "
                               "which cannot be a folder and a label (a slash, a leading dot or "
                               "a control character)")
        if len(name.encode("utf-8")) > NAME_BYTES:
            raise DatasetError(f"{archive}: batches.meta.txt names a class of "
                               f"{len(name.encode('utf-8'))} bytes ('{shown(name[:40])}...'); a "
                               f"folder name holds at most {NAME_BYTES}")
    return names


def _records(data: bytes, batch: str, archive: Path, classes: int):
    if not data or len(data) % RECORD:
        raise DatasetError(f"{archive}: {batch}.bin is {len(data)} bytes, not a whole number of "
                           f"{RECORD}-byte records", hint="the archive may be truncated")
    rows = np.frombuffer(data, np.uint8).reshape(-1, RECORD)
    labels = rows[:, 0]
    if labels.max() >= classes:
        raise DatasetError(f"{archive}: {batch}.bin has label {int(labels.max())}, but "
                           f"batches.meta.txt names {classes} classes")
    images = rows[:, 1:].reshape(-1, 3, SIDE, SIDE).transpose(0, 2, 3, 1)
    return labels, images


def write_cifar10(archive: Path | str, out_dir: Path, per_class: int | None = None,
                  progress: bool = True) -> Cifar10Summary:
    """CIFAR-10 from ``archive`` (or ``"download"``) as ``out_dir/<class>/<batch>_<n>.png``.

    ``per_class`` keeps the first N images of each class in archive order (all when None)."""
    from PIL import Image
    from tqdm import tqdm

    out_dir = Path(out_dir)
    if per_class is not None and per_class < 2:
        raise UsageError(f"per_class must be at least 2, got {per_class}",
                         hint="each class needs an image to train on and one to validate with")
    archive = download() if str(archive) == "download" else Path(archive)
    names, batches = read_archive(archive)
    params = {"archive_sha256": file_digest(archive), "per_class": per_class,
              "classes": list(names)}
    foreign = f"{out_dir} already exists and is not an earlier CIFAR-10 folder"
    chosen = _choose(batches, len(names), per_class)
    summary = Cifar10Summary(out_dir, names, len(chosen), True, archive)

    def write(folder: Path) -> None:
        for name in names:
            (folder / name).mkdir()
        for batch, index in tqdm(chosen, unit="img", desc="cifar-10", leave=False,
                                 disable=None if progress else True):
            labels, images = batches[batch]
            Image.fromarray(images[index]).save(
                folder / names[labels[index]] / f"{batch}_{index:05d}.png", compress_level=1)

    created = atomic.new_folder(out_dir, MARKER, params, write, foreign=foreign, hint=_HINT)
    return dataclasses.replace(summary, created=created)


def _choose(batches, classes: int, per_class: int | None) -> list[tuple[str, int]]:
    """(batch, index) of every image kept: the first ``per_class`` of each class in file order."""
    kept, counts = [], [0] * classes
    for batch in BATCHES:
        if batch not in batches:
            continue
        for index, label in enumerate(batches[batch][0]):
            if per_class is None or counts[label] < per_class:
                counts[label] += 1
                kept.append((batch, index))
    return kept

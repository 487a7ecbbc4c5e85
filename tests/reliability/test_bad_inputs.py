"""A messy photo folder through ``toolchain build``: every file is used or skipped by name.

One folder holds every kind of bad or odd input a user's photo collection has. The build must
finish, verify its artifact, warn once per skipped file naming the file and the reason, list
every skipped file in the split record, and use every odd-but-valid image. How each odd image
decodes is tested pixel by pixel in tests/toolchain/test_images.py; here the whole chain meets
them together.
"""

from __future__ import annotations

import json
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.helpers import TINY_ARCH, no_traceback, run

pytestmark = pytest.mark.slow


def _png_declaring(path: Path, width: int, height: int) -> None:
    """A 4x4 PNG whose header declares ``width``x``height`` (a decompression bomb)."""
    Image.new("RGB", (4, 4), (200, 0, 0)).save(path, "PNG")
    data = bytearray(path.read_bytes())
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))


def _messy(sample_dir: Path, root: Path) -> tuple[dict[str, str], set[str]]:
    """Write the folder; returns (skipped relpath → reason fragment, used relpaths)."""
    skipped: dict[str, str] = {}
    for label in ("desert", "forest", "ocean"):
        shutil.copytree(sample_dir / label, root / label)
    for index, photo in enumerate(sorted((sample_dir / "sunset").glob("*.jpg"))):
        (root / "café crème").mkdir(exist_ok=True)
        shutil.copy(photo, root / "café crème" / f"photo d’été {index}.jpg")
    shutil.copytree(sample_dir / "night_sky", root / "sky, clouds")
    (root / "lonely").mkdir()
    shutil.copy(next((sample_dir / "snowfield").glob("*.jpg")), root / "lonely" / "only one.jpg")
    (root / "empty class").mkdir()
    (root / "stray.txt").write_text("not a class")
    skipped["stray.txt"] = "not inside a class folder"

    bad = root / "desert"
    source = (bad / "desert_000.jpg").read_bytes()
    (bad / "empty.jpg").write_bytes(b"")
    skipped["desert/empty.jpg"] = "empty file (0 bytes)"
    (bad / "truncated.jpg").write_bytes(source[: len(source) // 2])
    skipped["desert/truncated.jpg"] = "corrupt or truncated image"
    (bad / "notes.jpg").write_text("shopping list")
    skipped["desert/notes.jpg"] = "not an image"
    (bad / "README.md").write_text("# my photos")
    skipped["desert/README.md"] = "not an image"
    _png_declaring(bad / "bomb.png", 100_000, 100_000)
    skipped["desert/bomb.png"] = "decompression bomb"
    (bad / "secret.jpg").write_bytes(source)
    (bad / "secret.jpg").chmod(0)
    skipped["desert/secret.jpg"] = "permission denied"
    (bad / "loop").symlink_to(".", target_is_directory=True)
    skipped["desert/loop"] = "symbolic link to a folder (not followed)"
    (bad / "self.jpg").symlink_to("self.jpg")
    skipped["desert/self.jpg"] = "cannot read (Too many levels of symbolic links)"
    (bad / "gone.jpg").symlink_to("nowhere.jpg")
    skipped["desert/gone.jpg"] = "cannot read (No such file or directory)"

    odd = root / "forest"
    photo = Image.open(odd / "forest_000.jpg").convert("RGB")
    photo.save(odd / "webp inside.jpeg", "WEBP")
    photo.save(odd / "png inside.jpeg", "PNG")
    photo.save(odd / "UPPER.JPG", "JPEG")
    photo.save(odd / "UPPER.PNG", "PNG")
    photo.convert("CMYK").save(odd / "cmyk.jpg", "JPEG")
    photo.convert("L").save(odd / "grey.png")
    photo.convert("RGBA").save(odd / "alpha.png")
    Image.fromarray(np.asarray(photo.convert("L"), np.uint16) * 257).save(odd / "deep.png")
    assert Image.open(odd / "deep.png").mode.startswith("I")
    exif = photo.getexif()
    exif[0x0112] = 6
    photo.save(odd / "rotated.jpg", "JPEG", exif=exif)
    used = {p.relative_to(root).as_posix() for p in root.rglob("*")
            if p.is_file() and not p.is_symlink() and p.relative_to(root).as_posix() not in skipped}
    return skipped, used


def test_a_messy_folder_builds_and_every_skipped_file_is_named(tmp_path, sample_dir):
    photos = tmp_path / "my photos"
    skipped, used = _messy(sample_dir, photos)
    out = tmp_path / "out"
    try:
        result = run(tmp_path / "home", "build", "--image-dir", photos, "--weights", "none",
                     "--architecture", TINY_ARCH, "--bottleneck-dir", tmp_path / "cache",
                     "--output-dir", out, "--how-many-training-steps", "100",
                     "--target", "tflite", "--tflite-variant", "float32", "--accept-small-set")
    finally:
        (photos / "desert" / "secret.jpg").chmod(0o644)
    no_traceback(result)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "verification passed" in result.stdout

    for relpath, reason in skipped.items():
        lines = [line for line in result.stderr.splitlines()
                 if f"skipping {photos / relpath}: " in line]
        assert len(lines) == 1 and reason in lines[0], (relpath, lines, result.stderr)
    assert f"class folder {photos / 'empty class'} has no usable images" in result.stderr
    assert f"skipped {len(skipped)} file(s)" in result.stdout

    record = json.loads((out / "model" / "split.json").read_text(encoding="utf-8"))
    listed = {Path(item["path"]).relative_to(photos).as_posix(): item["reason"]
              for item in record["skipped"]}
    assert set(listed) == set(skipped)
    for relpath, reason in skipped.items():
        assert reason in listed[relpath], (relpath, listed[relpath])
    placed = [relpath for names in record["sets"].values() for relpath in names]
    assert sorted(placed) == sorted(used)

    labels = ("café crème", "desert", "forest", "lonely", "ocean", "sky, clouds")
    assert (out / "labels.txt").read_text(encoding="utf-8") == "".join(f"{x}\n" for x in labels)
    import targets

    assert targets.get("tflite").inspect(out / "model_float32.tflite").labels == labels

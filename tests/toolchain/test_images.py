"""Tests for the one image loader (``toolchain.images``): formats, orientation, modes, refusals.

Every fixture image is drawn here with PIL/numpy in ``tmp_path``; nothing imports TensorFlow.
"""

from __future__ import annotations

import hashlib
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from tests.privileges import as_user
from toolchain import images
from toolchain.errors import ToolchainError, UnreadableImage
from toolchain.images import MAX_PIXELS, file_digest, load_rgb, open_image

RED = (255, 0, 0)
BLUE = (0, 0, 255)
GREEN = (0, 255, 0)
W, H = 40, 30


def _solid(colour, size=(W, H), mode="RGB") -> Image.Image:
    return Image.new(mode, size, colour)


def _halves(size=(W, H)) -> Image.Image:
    """Left half red, right half blue: asymmetric, so every rotation is distinguishable."""
    array = np.zeros((size[1], size[0], 3), np.uint8)
    array[:, : size[0] // 2] = RED
    array[:, size[0] // 2:] = BLUE
    return Image.fromarray(array, "RGB")


def _close(pixel, colour, tolerance=40) -> bool:
    return bool(np.all(np.abs(np.asarray(pixel, int) - np.asarray(colour, int)) <= tolerance))


def _reason(path: Path) -> str:
    with pytest.raises(UnreadableImage) as caught:
        load_rgb(path, 16)
    error = caught.value
    assert isinstance(error, ToolchainError)
    assert error.path == str(path)
    assert str(path) in str(error) and error.reason in str(error)
    return error.reason


# --- formats ------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt, suffix, tolerance", [
    ("JPEG", ".jpg", 30),
    ("PNG", ".png", 0),
    ("BMP", ".bmp", 0),
    ("GIF", ".gif", 0),
    ("WEBP", ".webp", 30),
])
def test_formats_decode_to_shape_and_colour(tmp_path, fmt, suffix, tolerance):
    path = tmp_path / f"red{suffix}"
    _solid(RED).save(path, fmt)
    out = load_rgb(path, 24)
    assert out.shape == (24, 24, 3) and out.dtype == np.uint8
    assert _close(out.reshape(-1, 3).mean(axis=0), RED, tolerance), out[12, 12]
    full = open_image(path)
    assert full.mode == "RGB" and full.size == (W, H)


def test_multi_picture_jpeg_is_accepted(tmp_path):
    path = tmp_path / "camera.jpg"
    _solid(GREEN).save(path, "MPO", save_all=True, append_images=[_solid(BLUE)])
    assert Image.open(path).format == "MPO"
    assert _close(load_rgb(path, 8)[4, 4], GREEN, 30)


@pytest.mark.parametrize("fmt", ["PNG", "WEBP", "BMP", "GIF"])
def test_format_recognised_by_content_not_extension(tmp_path, fmt):
    path = tmp_path / "photo.jpeg"
    _solid(BLUE).save(path, fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    assert _close(load_rgb(path, 8)[4, 4], BLUE, 0)


@pytest.mark.parametrize("name, fmt", [("PHOTO.JPG", "JPEG"), ("IMG.PNG", "PNG"),
                                       ("Pic.WebP", "WEBP"), ("SCAN.BMP", "BMP")])
def test_upper_case_extensions(tmp_path, name, fmt):
    path = tmp_path / name
    _solid(GREEN).save(path, fmt)
    assert _close(load_rgb(path, 8)[4, 4], GREEN, 30)


# --- EXIF orientation ---------------------------------------------------------------------------


def _oriented_jpeg(path: Path, orientation: int) -> Path:
    image = _halves()
    exif = image.getexif()
    exif[0x0112] = orientation
    image.save(path, "JPEG", exif=exif, quality=95)
    assert Image.open(path).getexif()[0x0112] == orientation
    return path


@pytest.mark.parametrize("orientation, size, where", [
    # (stored left=red, right=blue) -> which colour ends up top/bottom/left/right when upright
    (1, (W, H), {"left": RED, "right": BLUE}),
    (6, (H, W), {"top": RED, "bottom": BLUE}),     # rotate 90° clockwise: left edge -> top
    (8, (H, W), {"top": BLUE, "bottom": RED}),     # rotate 90° anticlockwise: left -> bottom
    (3, (W, H), {"left": BLUE, "right": RED}),     # rotate 180°
])
def test_exif_orientation_applied(tmp_path, orientation, size, where):
    path = _oriented_jpeg(tmp_path / f"o{orientation}.jpg", orientation)
    assert open_image(path).size == size
    out = load_rgb(path, 20)
    probes = {"top": out[2, 10], "bottom": out[17, 10], "left": out[10, 2], "right": out[10, 17]}
    for side, colour in where.items():
        assert _close(probes[side], colour), (side, probes[side])


def test_exif_orientation_applied_with_draft(tmp_path):
    """A large oriented JPEG goes through the DCT draft path; orientation still applies."""
    image = _halves((800, 600))
    exif = image.getexif()
    exif[0x0112] = 6
    path = tmp_path / "big.jpg"
    image.save(path, "JPEG", exif=exif, quality=90)
    out = load_rgb(path, 20)
    assert _close(out[2, 10], RED) and _close(out[17, 10], BLUE)


# --- modes --------------------------------------------------------------------------------------


def test_greyscale_L(tmp_path):
    path = tmp_path / "grey.png"
    _solid(100, mode="L").save(path)
    out = load_rgb(path, 8)
    assert out.shape == (8, 8, 3)
    assert (out == 100).all()


def test_greyscale_with_alpha_LA(tmp_path):
    path = tmp_path / "la.png"
    _solid((100, 30), mode="LA").save(path)
    assert Image.open(path).mode == "LA"
    assert (load_rgb(path, 8) == 100).all()


def test_rgba_alpha_dropped(tmp_path):
    path = tmp_path / "rgba.png"
    _solid((200, 50, 10, 0), mode="RGBA").save(path)  # fully transparent: colour is still kept
    assert Image.open(path).mode == "RGBA"
    out = load_rgb(path, 8)
    assert out.shape == (8, 8, 3)
    assert tuple(out[3, 3]) == (200, 50, 10)


@pytest.mark.parametrize("fmt", ["PNG", "GIF"])
def test_palette_with_transparency(tmp_path, fmt):
    image = Image.new("P", (W, H), 0)
    image.putpalette([*GREEN, *RED] + [0] * (256 * 3 - 6))
    image.paste(1, (W // 2, 0, W, H))  # right half: palette index 1 (red)
    path = tmp_path / f"palette.{fmt.lower()}"
    image.save(path, fmt, transparency=0)
    reopened = Image.open(path)
    assert reopened.mode == "P" and "transparency" in reopened.info
    out = load_rgb(path, 20)
    assert tuple(out[10, 2]) == GREEN and tuple(out[10, 17]) == RED


def test_palette_with_per_entry_alpha_gives_no_warning(tmp_path):
    """PNG tRNS with several alpha entries: converted via RGBA, without PIL's UserWarning."""
    image = Image.new("P", (W, H), 0)
    image.putpalette([*GREEN, *RED, *BLUE] + [0] * (256 * 3 - 9))
    image.paste(1, (W // 2, 0, W, H))
    path = tmp_path / "alpha.png"
    image.save(path, transparency=bytes([0, 128, 255]))
    assert isinstance(Image.open(path).info["transparency"], bytes)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = load_rgb(path, 20)
    assert tuple(out[10, 2]) == GREEN and tuple(out[10, 17]) == RED


def test_cmyk_jpeg(tmp_path):
    path = tmp_path / "cmyk.jpg"
    _solid((0, 255, 255, 0), mode="CMYK").save(path, "JPEG", quality=95)  # cyan 0: red
    assert Image.open(path).mode == "CMYK"
    out = load_rgb(path, 8)
    assert _close(out[4, 4], RED, 30), out[4, 4]


def _png16(path: Path, array: np.ndarray) -> Path:
    Image.fromarray(array.astype(np.uint16)).save(path)
    assert Image.open(path).mode.startswith("I;16")
    return path


def test_16_bit_png_is_scaled_not_clipped(tmp_path):
    array = np.zeros((H, W), np.uint16)
    array[:, :10], array[:, 10:20], array[:, 20:30], array[:, 30:] = 0, 16384, 32768, 65535
    image = open_image(_png16(tmp_path / "deep.png", array))
    out = np.asarray(image)
    assert image.mode == "RGB" and out.shape == (H, W, 3)
    assert set(out[5, 5]) == {0}
    assert abs(int(out[5, 15, 0]) - 64) <= 1
    assert abs(int(out[5, 25, 0]) - 128) <= 1  # mid-grey stays mid-grey (PIL alone gives 255)
    assert set(out[5, 35]) == {255}


def test_16_bit_mid_grey_via_load_rgb(tmp_path):
    out = load_rgb(_png16(tmp_path / "mid.png", np.full((H, W), 32768)), 8)
    assert (np.abs(out.astype(int) - 128) <= 1).all()


def test_dark_16_bit_png_stays_dark(tmp_path):
    """A 16-bit value is a fraction of 65535 whatever the image's brightest pixel is.

    200/65535 is black. Guessing the bit depth from the maximum would map it to 200/255.
    """
    dark = load_rgb(_png16(tmp_path / "dark.png", np.full((H, W), 200)), 8)
    assert (dark <= 1).all(), dark[0, 0]
    # Two images sharing a pixel value must agree on it, whatever else they contain.
    plain = np.asarray(open_image(_png16(tmp_path / "plain.png", np.full((H, W), 255))))
    array = np.full((H, W), 255, np.uint16)
    array[:, W // 2:] = 65535
    mixed = np.asarray(open_image(_png16(tmp_path / "mixed.png", array)))
    assert (mixed[:, W // 2:] == 255).all()
    assert np.array_equal(plain[:, : W // 2], mixed[:, : W // 2])
    assert (plain <= 1).all()


# --- refusals -----------------------------------------------------------------------------------


def test_zero_byte_file(tmp_path):
    path = tmp_path / "empty.jpg"
    path.touch()
    assert _reason(path) == "empty file (0 bytes)"


def test_missing_file(tmp_path):
    reason = _reason(tmp_path / "gone.jpg")
    assert reason.startswith("cannot read") and "No such file" in reason


def test_truncated_jpeg(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "half.jpg"
    Image.fromarray(rng.integers(0, 256, (H, W, 3), np.uint8)).save(path, quality=90)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert Image.open(path).size == (W, H)  # the header is intact: only decoding can tell
    reason = _reason(path)
    assert reason.startswith("corrupt or truncated image") and "truncated" in reason


def test_text_file_named_jpg(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("this is not a photo\n")
    assert _reason(path) == "not an image (unrecognised content)"


def test_tiff_is_unsupported(tmp_path):
    path = tmp_path / "scan.tif"
    _solid(RED).save(path, "TIFF")
    assert _reason(path) == "unsupported image format TIFF"


def test_tiff_named_jpg_is_unsupported(tmp_path):
    path = tmp_path / "scan.jpg"
    _solid(RED).save(path, "TIFF")
    assert _reason(path) == "unsupported image format TIFF"


def _png_declaring(path: Path, width: int, height: int) -> Path:
    """A real 4x4 PNG whose IHDR is patched to declare ``width``x``height`` (CRC fixed)."""
    _solid(RED, (4, 4)).save(path, "PNG")
    data = bytearray(path.read_bytes())
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))
    return path


@pytest.fixture
def no_png_decoding(monkeypatch):
    def load(self, *args, **kwargs):
        raise AssertionError("the bomb was decoded")

    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", load)


def test_decompression_bomb_refused_without_decoding(tmp_path, no_png_decoding):
    path = _png_declaring(tmp_path / "bomb.png", 20000, 20000)
    assert _reason(path) == "image too large (possible decompression bomb)"


def test_image_over_own_limit_refused_without_decoding(tmp_path, no_png_decoding):
    # 72 Mpx: under PIL's warning threshold (89 Mpx) but over the toolchain's limit.
    path = _png_declaring(tmp_path / "huge.png", 9000, 8000)
    assert 9000 * 8000 > MAX_PIXELS
    assert _reason(path) == ("declares 9000x8000 pixels, over the 64,000,000 limit "
                             "(possible decompression bomb)")


def test_between_pil_warning_and_error_refused(tmp_path, no_png_decoding):
    # 100 Mpx: PIL only warns here; the loader must still refuse.
    path = _png_declaring(tmp_path / "warn.png", 10000, 10000)
    assert "decompression bomb" in _reason(path)


def test_patched_png_is_otherwise_valid(tmp_path):
    """The bomb fixture is honest: patching to the real size gives a loadable image."""
    path = _png_declaring(tmp_path / "same.png", 4, 4)
    assert tuple(load_rgb(path, 4)[0, 0]) == RED


def test_unreadable_file(tmp_path):
    path = tmp_path / "secret.png"
    _solid(RED).save(path)
    path.chmod(0)
    try:
        with as_user():  # as root too: without the power to ignore file modes
            assert _reason(path) == "permission denied"
    finally:
        path.chmod(0o644)


# --- determinism, draft, transform, digest ------------------------------------------------------


def _blocks(size) -> Image.Image:
    """A 4x4 grid of flat colours: survives any sane resize to 32 px."""
    rng = np.random.default_rng(1)
    palette = rng.integers(0, 256, (4, 4, 3), np.uint8)
    small = Image.fromarray(palette, "RGB")
    return small.resize(size, Image.NEAREST)


def test_load_rgb_is_deterministic(tmp_path):
    path = tmp_path / "blocks.jpg"
    _blocks((640, 480)).save(path, quality=90)
    first, second = load_rgb(path, 32), load_rgb(path, 32)
    assert first.shape == (32, 32, 3)
    assert np.array_equal(first, second)


def test_jpeg_draft_matches_full_decode(tmp_path):
    """A JPEG large enough for DCT draft decoding gives (nearly) the full-decode result."""
    path = tmp_path / "big.jpg"
    _blocks((800, 600)).save(path, quality=95)
    drafted = load_rgb(path, 32)
    full = np.asarray(open_image(path).resize((32, 32), Image.BILINEAR))
    assert np.abs(drafted.astype(int) - full.astype(int)).mean() < 4


def test_large_and_small_jpeg_agree(tmp_path):
    big, small = tmp_path / "big.jpg", tmp_path / "small.jpg"
    _blocks((1600, 1200)).save(big, quality=95)
    _blocks((64, 48)).save(small, quality=95)
    a, b = load_rgb(big, 32).astype(int), load_rgb(small, 32).astype(int)
    assert np.abs(a - b).mean() < 8
    # ... and the comparison can tell different images apart.
    other = np.asarray(_blocks((64, 48)).transpose(Image.FLIP_LEFT_RIGHT).resize((32, 32)))
    assert np.abs(a - other.astype(int)).mean() > 20


def test_draft_is_used_for_large_jpegs(tmp_path, monkeypatch):
    path = tmp_path / "big.jpg"
    _blocks((800, 600)).save(path, quality=90)
    sizes = []
    original = images._to_rgb
    monkeypatch.setattr(images, "_to_rgb",
                        lambda image: sizes.append(image.size) or original(image))
    load_rgb(path, 32)
    open_image(path)
    # draft: the largest DCT scale leaving at least 32 px on both axes (1/8 -> 100x75)
    assert sizes == [(100, 75), (800, 600)]


def test_transform_applied_before_resize(tmp_path):
    path = tmp_path / "halves.png"
    _halves().save(path)
    seen = []

    def left_half(image):
        seen.append(image.size)
        return image.crop((0, 0, image.width // 2, image.height))

    out = load_rgb(path, 16, transform=left_half)
    assert seen == [(W, H)]  # the transform sees the full decoded image, not the 16x16 one
    assert out.shape == (16, 16, 3)
    assert (out == np.array(RED, np.uint8)).all()


def test_transform_sees_upright_image(tmp_path):
    path = _oriented_jpeg(tmp_path / "o6.jpg", 6)
    seen = []
    load_rgb(path, 8, transform=lambda image: seen.append(image.size) or image)
    assert seen == [(H, W)]


def test_file_digest(tmp_path):
    path = tmp_path / "a.png"
    _solid(RED).save(path)
    data = path.read_bytes()
    digest = file_digest(path)
    assert digest == hashlib.sha256(data).hexdigest()
    assert file_digest(path) == digest
    changed = bytearray(data)
    changed[len(changed) // 2] ^= 0x01
    path.write_bytes(bytes(changed))
    assert file_digest(path) != digest


def test_permission_error_reason(tmp_path, monkeypatch):
    """The same refusal as the chmod test, simulated so that it also runs as root."""
    path = tmp_path / "secret.png"
    _solid(RED).save(path)

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(Image, "open", refuse)
    assert _reason(path) == "permission denied"

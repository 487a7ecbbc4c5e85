"""The one image loader: every stage decodes and resizes pixels here, so they never disagree.

Training, bottleneck extraction, calibration, verification and ``label`` all call
:func:`load_rgb`. A preprocessing mismatch between training and inference is the most common
complaint about the older tools; having exactly one decode-and-resize path removes it.

What it does, and why:
- Formats are recognised by content (PIL's sniffing), never by extension: phones and file
  managers rename files freely.
- The EXIF orientation is applied, as phones and Apple's Vision framework do.
- Greyscale, palette, CMYK, RGBA and 16-bit images become 8-bit RGB (alpha is dropped, as
  Core ML and the TFLite Task Library drop it).
- The whole image is resized to the model's square input (no crop), which is what the
  Task Library and Vision with ``scaleFill`` do.
- Large JPEGs are decoded at a reduced DCT scale first (``Image.draft``), which makes decoding
  several times faster; the result still comes from the same function everywhere.
- A file declaring an absurd pixel count (a decompression bomb) is refused before decoding.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import warnings
from pathlib import Path

import numpy as np

from toolchain.errors import UnreadableImage

#: Formats accepted (PIL's names). MPO is the multi-picture JPEG many phone cameras write.
SUPPORTED_FORMATS = frozenset({"JPEG", "MPO", "PNG", "BMP", "GIF", "WEBP"})

#: Images declaring more pixels than this are refused (PIL warns at 89 Mpx and fails at 179 Mpx).
MAX_PIXELS = 64_000_000

#: Bumped whenever decoding or resizing changes, so cached bottlenecks are recomputed.
LOADER_VERSION = "rgb-draft-bilinear-2"


def file_digest(path: Path, algorithm: str = "sha256") -> str:
    """Hex digest of the file's bytes (SHA-256: the content part of every cache key)."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _to_rgb(image):
    """Convert any PIL mode to 8-bit RGB, scaling 16-bit integer images properly."""
    from PIL import Image

    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # PIL's convert("RGB") clips these to 255 instead of scaling: a 16-bit PNG would be white.
        # Of the supported formats only 16-bit greyscale PNGs decode to these modes ("I" before
        # Pillow opened them as "I;16"), so the depth is known: always scale by 1/256, never
        # guess it from the pixel values (a dark 16-bit image would come out bright).
        array = np.asarray(image, dtype=np.uint32)
        grey = (array >> 8).clip(0, 255).astype(np.uint8)
        return Image.fromarray(np.stack([grey] * 3, axis=-1), "RGB")
    if image.mode == "F":
        array = np.asarray(image, dtype=np.float32)
        if array.max(initial=0) <= 1.0:
            grey = (array.clip(0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
        else:
            grey = array.clip(0, 255).astype(np.uint8)
        return Image.fromarray(np.stack([grey] * 3, axis=-1), "RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    return image.convert("RGB")


def open_image(path: Path):
    """Open and fully decode ``path`` as an upright RGB PIL image, or raise UnreadableImage.

    ``draft_size`` decoding is not applied here; see :func:`load_rgb`.
    """
    return _decode(Path(path), None)


@contextlib.contextmanager
def _opened(path: Path):
    """Open ``path`` lazily, refusing what no stage may decode; map every failure to one reason.

    The header checks (empty file, format by content, declared pixel count) run before any
    pixel is decoded. Errors raised while the caller decodes inside the ``with`` block are
    mapped to reasons too, so the dataset scan and every decoder share one definition of a
    usable image.
    """
    from PIL import Image, UnidentifiedImageError

    name = str(path)
    if path.is_dir():
        raise UnreadableImage(name, "is a folder, not an image")
    try:
        size = os.path.getsize(path)
    except OSError as error:  # missing, a dangling symlink, a symlink loop, a broken disk
        raise UnreadableImage(name, f"cannot read ({error.strerror or error})") from error
    try:
        if size == 0:
            raise UnreadableImage(name, "empty file (0 bytes)")
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                if image.format not in SUPPORTED_FORMATS:
                    raise UnreadableImage(name, f"unsupported image format {image.format}")
                width, height = image.size
                if width * height > MAX_PIXELS:
                    raise UnreadableImage(
                        name, f"declares {width}x{height} pixels, over the {MAX_PIXELS:,} limit "
                        "(possible decompression bomb)")
                yield image
    except UnreadableImage:
        raise
    except UnidentifiedImageError as error:
        raise UnreadableImage(name, "not an image (unrecognised content)") from error
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise UnreadableImage(name, "image too large (possible decompression bomb)") from error
    except PermissionError as error:
        raise UnreadableImage(name, "permission denied") from error
    except (FileNotFoundError, IsADirectoryError) as error:
        raise UnreadableImage(name, f"cannot read ({error.strerror or error})") from error
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        # Truncated JPEGs raise OSError("image file is truncated"), broken PNGs SyntaxError.
        reason = str(error).strip() or type(error).__name__
        raise UnreadableImage(name, f"corrupt or truncated image ({reason})") from error


def probe(path: Path) -> None:
    """Check ``path``'s header only (cheap); raise UnreadableImage if no stage could use it."""
    with _opened(Path(path)):
        pass


def _decode(path: Path, draft_size: tuple[int, int] | None):
    from PIL import ImageOps

    with _opened(path) as image:
        if draft_size is not None and image.format in ("JPEG", "MPO"):
            # Orientation may swap axes; ask the DCT scaler for at least the size on both.
            side = max(draft_size)
            image.draft("RGB", (side, side))
        image.load()
        return _to_rgb(ImageOps.exif_transpose(image))


def load_rgb(path: Path, size: int, transform=None) -> np.ndarray:
    """Decode ``path`` and resize it to ``size``×``size``: a ``(size, size, 3)`` uint8 array.

    This is the pixel source for every stage and runtime; see the module docstring.
    ``transform`` (training distortions only) edits the upright image before the resize; the
    JPEG draft then keeps twice the resolution so that crops stay sharp.
    """
    from PIL import Image

    draft = (size, size) if transform is None else (2 * size, 2 * size)
    image = _decode(Path(path), draft)
    if transform is not None:
        image = transform(image)
    if image.size != (size, size):
        image = image.resize((size, size), Image.BILINEAR)
    return np.asarray(image, dtype=np.uint8)


def load_full_rgb(path: Path) -> np.ndarray:
    """Decode ``path`` at its own size, upright: an ``(height, width, 3)`` uint8 array.

    What an app hands its runtime before that runtime resizes (the verifier's Task Library
    full-size row): the same decoding, orientation and mode handling as :func:`load_rgb`, with
    neither the JPEG draft nor the resize."""
    return np.asarray(_decode(Path(path), None), dtype=np.uint8)

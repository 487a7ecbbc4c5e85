"""The built-in demo dataset behind ``toolchain sample-data OUT_DIR``.

Why: a first run (and CI) needs a labelled photo folder to try retrain and export end to end
without downloading anything. Six scene classes are drawn procedurally with numpy and PIL, each
image from its own generator seeded by ``(seed, class, index)``, so the same arguments always give
byte-identical files. Every class has its own palette and structure (sun disc, tree trunks, waves,
snow drifts, dunes, stars) and every image its own size, layout, exposure, hue, softness, noise
and extra shapes, so the set looks like varied photos while the classes stay far apart in global
colour and texture statistics: a linear head learns them even on a randomly initialised backbone.

The folder is built in a temporary sibling directory and moved into place with ``os.replace``.
A marker file records the parameters, so a re-run is a no-op and a user's folder is never touched.
"""

from __future__ import annotations

import dataclasses
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from toolchain import atomic
from toolchain.errors import UsageError

MARKER = ".toolchain-sample-data.json"
#: Bump whenever the drawing changes, so older folders are not mistaken for the current dataset.
VERSION = 1
_HINT = "choose a new folder or remove it"
_RATIOS = (1.0, 5 / 4, 4 / 3, 3 / 2, 16 / 9)
_YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_RGB = np.linalg.inv(_YIQ)
_CUBIC = Image.Resampling.BICUBIC


@dataclasses.dataclass(frozen=True)
class SampleDataSummary:
    """What ``write_sample_data`` produced (or found already in place)."""

    out_dir: Path
    classes: tuple[str, ...]
    images: int
    created: bool  # False when out_dir already held this exact dataset and nothing was written


def _c(r: float, g: float, b: float) -> np.ndarray:
    """An RGB colour with channels in [0, 1]."""
    return np.array([r, g, b], np.float32)


def _grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Row (Hx1) and column (W) coordinates in [0, 1]."""
    return np.linspace(0, 1, h, dtype=np.float32)[:, None], np.linspace(0, 1, w, dtype=np.float32)


def _mix(a, b, t) -> np.ndarray:
    """Blend colour or image ``a`` towards ``b`` by the weight map ``t``."""
    return a + (b - a) * np.asarray(t, np.float32)[..., None]


def _below(y: np.ndarray, line, h: float) -> np.ndarray:
    """Antialiased 0..1 mask of the pixels below ``line`` (both in image-height units)."""
    return np.clip((y - line) * h + 0.5, 0, 1)


def _noise(rng, h: int, w: int, cells: tuple[int, int], octaves: int = 3) -> np.ndarray:
    """Smooth fractal value noise in about [-1, 1]: random grids summed, then upscaled."""
    fine = (cells[1] << (octaves - 1), cells[0] << (octaves - 1))  # PIL size of the finest grid
    out = np.zeros(fine[::-1], np.float32)
    for o in range(octaves):
        grid = Image.fromarray(rng.random((cells[0] << o, cells[1] << o), dtype=np.float32))
        out += (np.asarray(grid.resize(fine, _CUBIC)) * 2 - 1) / 2**o
    return np.asarray(Image.fromarray(out).resize((w, h), _CUBIC)) * 1.5


def _ovals(xs, ys, rx, ry) -> list[tuple[str, list]]:
    """Ellipses for ``_paint`` from arrays of centres and radii."""
    return [("ellipse", [x - a, y - b, x + a, y + b]) for x, y, a, b in zip(xs, ys, rx, ry)]


def _paint(img: np.ndarray, colour, shapes, blur: float = 0.0, opacity: float = 1.0):
    """Blend ``colour`` (RGB or an image) into ``img`` in place through ImageDraw ``shapes``,
    given as ``(method, xy)`` pairs such as ``("polygon", points)``; ``blur`` softens edges."""
    mask = Image.new("L", (img.shape[1], img.shape[0]))
    draw = ImageDraw.Draw(mask)
    for method, xy in shapes:
        getattr(draw, method)(xy, fill=255)
    mask = mask.filter(ImageFilter.GaussianBlur(blur)) if blur else mask
    if box := mask.getbbox():  # blend only inside the shapes' bounding box
        win = np.s_[box[1] : box[3], box[0] : box[2]]
        m = np.asarray(mask.crop(box), np.float32) * (opacity / 255)
        img[win] = _mix(img[win], colour[win] if np.ndim(colour) == 3 else colour, m)
    return img


def _sunset(rng, h, w):
    """Purple-to-orange sky, a glowing sun disc near the horizon, dark hills or a mirroring sea."""
    y, x = _grid(h, w)
    hz, r, sea = rng.uniform(0.55, 0.75), rng.uniform(0.04, 0.09) * min(h, w), rng.random() < 0.4
    t = np.clip(y / hz, 0, 1)
    img = _mix(_c(0.22, 0.10, 0.36), _c(0.96, 0.42 + rng.uniform(-0.1, 0.1), 0.16), t**1.4)
    img = _mix(img, _c(1.0, 0.80, 0.45), np.clip((t - 0.8) * 5, 0, 1))
    img = _mix(img, _c(0.50, 0.16, 0.28), np.clip(_noise(rng, h, w, (8, 2)) - 0.3, 0, 0.7))
    d = np.hypot(y * h - hz * h + rng.uniform(0.4 if sea else -0.2, 1.5) * r,
                 x * w - rng.uniform(0.15, 0.85) * w)
    img = img + np.exp(-d / (4 * r))[..., None] * _c(0.6, 0.35, 0.1)
    img = _mix(img, _c(1.0, 0.95, 0.75), np.clip(r - d + 0.5, 0, 1))  # the sun
    if sea:  # mirror the sky, broken by ripples that crowd towards the horizon
        rows = np.clip((2 * hz - y[:, 0]) * (h - 1), 0, h - 1).astype(int)
        ripple = 0.42 + 0.18 * np.sin(15 / (y - hz + 0.1) + 1.5 * _noise(rng, h, w, (3, 6)))
        img = np.where((y > hz)[..., None], img[rows] * ripple[..., None], img)
    else:
        img = _mix(img, _c(0.08, 0.04, 0.07), _below(y, hz + 0.07 * _noise(rng, 1, w, (1, 4)), h))
    n = rng.integers(0, 7)
    pts = zip(rng.uniform(0.1, 0.9, n) * w, rng.uniform(0.1, 0.5, n) * h, rng.uniform(4, 10, n))
    birds = [("line", [(a - s, b - s / 2), (a, b), (a + s, b - s / 2)]) for a, b, s in pts]
    return _paint(img, _c(0.1, 0.05, 0.08), birds)


def _forest(rng, h, w):
    """Mottled green canopy, shafts of light, trunks with bark texture, a floor with bushes."""
    y, x = _grid(h, w)
    leaves = _noise(rng, h, w, (10, 10))
    shade = np.clip(0.55 + 0.5 * leaves - 0.3 * y, 0, 1)
    img = _mix(_c(0.04, 0.15, 0.05), _c(0.32, 0.52, 0.15), shade)
    shafts = np.clip(np.sin((x + 0.5 * y) * rng.uniform(8, 16) + rng.uniform(0, 6.3)), 0, 1) ** 6
    floor, leaves = rng.uniform(0.7, 0.85), 1 + 0.3 * leaves[..., None]
    img = _mix(img + 0.2 * shafts[..., None], _c(0.26, 0.20, 0.09) * leaves, _below(y, floor, 30))
    bark = _c(0.30, 0.20, 0.11) * (1 + 0.35 * _noise(rng, h, w, (2, 40), 2))[..., None]
    for near, (lo, hi, blur) in enumerate(((0.01, 0.03, 1.5), (0.03, 0.09, 0.4))):  # far, near
        n, bottom = rng.integers(3, 8), (floor + 0.05 * near) * h
        xs, ws = rng.uniform(-0.05, 1.0, n) * w, rng.uniform(lo, hi, n) * w
        trunks = [("rectangle", [a, -1, a + b, bottom]) for a, b in zip(xs, ws)]
        _paint(img, bark * (0.6 + 0.4 * near), trunks, blur)
    n = rng.integers(2, 9)
    s = rng.uniform(0.03, 0.1, n) * w
    bushes = _ovals(rng.uniform(0, w, n), rng.uniform(floor, 1, n) * h, s, s / 2)
    return _paint(img, _c(0.10, 0.30, 0.08) * leaves, bushes, 1.0)


def _ocean(rng, h, w):
    """Blue sky with clouds over a deep blue sea whose waves crowd towards the horizon."""
    y, x = _grid(h, w)
    hz, n = rng.uniform(0.3, 0.5), rng.integers(0, 6)
    sky = np.clip(y / hz, 0, 1) + 0 * x  # full size, as _paint draws into it
    img = _mix(_c(0.28, 0.52, 0.88), _c(0.78, 0.87, 0.96), sky)
    s = rng.uniform(0.05, 0.2, n) * w
    clouds = _ovals(rng.uniform(0, w, n), rng.uniform(0.05, 0.8, n) * hz * h, s, s / 3)
    _paint(img, _c(0.97, 0.97, 0.98), clouds, 0.03 * w, 0.85)
    s = np.clip((y - hz) / (1 - hz), 0, 1)
    wave = np.sin(rng.uniform(15, 25) / (s + 0.1) + 1.5 * _noise(rng, h, w, (3, 6)))
    sea = _mix(_c(0.14, 0.42, 0.62), _c(0.02, 0.15, 0.36), s) * (1 + 0.2 * wave[..., None])
    foam = np.clip((wave - 0.8) * 5, 0, 1) * np.clip(_noise(rng, h, w, (4, 8)) + 0.2, 0, 1) * s
    img = np.where((y > hz)[..., None], _mix(sea, _c(0.92, 0.95, 0.97), foam), img)
    bx, b = rng.uniform(0.1, 0.9) * w, rng.uniform(0.02, 0.06) * w
    by = (hz + rng.uniform(0.05, 0.3)) * h
    if rng.random() < 0.5:  # a sailing boat
        sail, lo = [(bx, by - 2 * b), (bx, by), (bx + b, by)], by + b / 3
        _paint(img, _c(0.95, 0.95, 0.92), [("polygon", sail)], 0.5)
        hull = [(bx - b / 2, by), (bx + 1.3 * b, by), (bx + b, lo), (bx - b / 3, lo)]
        return _paint(img, _c(0.35, 0.18, 0.12), [("polygon", hull)], 0.5)
    hy = hz * h + 1  # else a distant island on the horizon
    island = [(bx - 4 * b, hy), (bx - 2 * b, hy - b), (bx + 2 * b, hy - 0.8 * b), (bx + 4 * b, hy)]
    return _paint(img, _c(0.20, 0.30, 0.28), [("polygon", island)], 1.0)


def _snowfield(rng, h, w):
    """Pale sky, grey mountains with snow caps, bright bluish-white drifts, a few dark firs."""
    y, x = _grid(h, w)
    hz = rng.uniform(0.3, 0.55)
    top = _c(0.74, 0.76, 0.80) if rng.random() < 0.4 else _c(0.52, 0.68, 0.92)  # overcast or clear
    img = _mix(top, _c(0.90, 0.92, 0.95), np.clip(y / hz, 0, 1))
    ridge = hz - rng.uniform(0.08, 0.25) * (0.6 + 0.4 * _noise(rng, 1, w, (1, 5)))
    rock = np.clip((y - ridge) / (hz - ridge) * 2 + 0.3 * _noise(rng, h, w, (8, 8)), 0, 1)
    img = _mix(img, _mix(_c(0.95, 0.96, 0.98), _c(0.50, 0.55, 0.64), rock), _below(y, ridge, h))
    drifts = np.clip(0.45 + 0.5 * _noise(rng, h, w, (3, 4)) + 0.2 * np.sin(y * h / 9 + x * 6), 0, 1)
    img = _mix(img, _mix(_c(0.98, 0.98, 1.0), _c(0.74, 0.81, 0.93), drifts), _below(y, hz, h))
    n, firs = rng.integers(0, 9), []
    sizes = rng.uniform(0.01, 0.04, n) * h
    for a, b, s in zip(rng.uniform(0, w, n), rng.uniform(hz, hz + 0.3, n) * h, sizes):
        for k in range(3):  # three stacked tiers of branches
            base, half = b - k * s / 2, s * (1 - k / 4)
            firs.append(("polygon", [(a, b - s * (k + 1)), (a - half, base), (a + half, base)]))
    _paint(img, _c(0.08, 0.16, 0.10), firs, 0.6)
    if rng.random() < 0.5:  # ski tracks running into the distance
        x0, x1 = rng.uniform(0.2, 0.8, size=2) * w
        tracks = [("line", [(x0 + o, h), (x1 + o / 5, hz * h + 5)]) for o in (-6, 6)]
        _paint(img, _c(0.66, 0.72, 0.84), tracks, 0.7)
    return img


def _desert(rng, h, w):
    """Hazy sky over layered sand dunes with lit and shaded faces and fine wind ripples."""
    y, x = _grid(h, w)
    hz = rng.uniform(0.3, 0.5)
    sky = _mix(_c(0.34, 0.58, 0.88), _c(0.93, 0.86, 0.72), np.clip(y / hz, 0, 1) ** 0.8)
    lit, haze, cover = np.full((h, w), 0.5, np.float32), np.zeros((h, w), np.float32), 0
    for layer in range(3):  # far to near; each nearer dune hides the ones behind it
        f, ph, amp = 2 * np.pi * rng.uniform(0.6, 2.0), rng.uniform(0, 6.3), rng.uniform(0.02, 0.07)
        ridge = hz + layer * (1 - hz) / 3.5 + amp * np.sin(f * x + ph)
        ridge = ridge + 0.02 * _noise(rng, 1, w, (1, 6))
        front = _below(y, ridge, h)
        lit += (np.clip(0.5 + 0.9 * np.cos(f * x + ph) + 0.5 * (y - ridge), 0, 1) - lit) * front
        haze += (0.175 * (2 - layer) - haze) * front
        cover = np.maximum(cover, front)
    ripples = 1 + 0.05 * np.sin(x * w * 0.4 + y * h * 0.25 + 4 * _noise(rng, h, w, (4, 4)))
    sand = _mix(_c(0.60, 0.36, 0.18), _c(0.95, 0.72, 0.42), lit) * ripples[..., None]
    img = _mix(sky, _mix(sand, sky[-1], haze), cover)
    sx, sy, r = rng.uniform(0.1, 0.9) * w, rng.uniform(0.05, 0.6) * hz * h, 0.03 * w
    _paint(img, _c(1.0, 0.99, 0.92), _ovals([sx], [sy], [r], [r]), 2.0)
    n = rng.integers(0, 5)
    s = rng.uniform(0.01, 0.04, n) * w
    rocks = _ovals(rng.uniform(0, w, n), rng.uniform(hz + 0.1, 1, n) * h, s, s / 2)
    return _paint(img, _c(0.32, 0.20, 0.12), rocks, 0.8)


def _night_sky(rng, h, w):
    """Near-black blue sky with stars, a faint milky way, sometimes a moon, over a dark skyline."""
    y, x = _grid(h, w)
    img = _mix(_c(0.01, 0.01, 0.04), _c(0.06, 0.08, 0.20), y**1.5)
    a = rng.uniform(0, np.pi)
    band = np.exp(-((((x - 0.5) * np.sin(a) - (y - 0.4) * np.cos(a)) / 0.12) ** 2))  # milky way
    band = band * np.clip(0.5 + _noise(rng, h, w, (6, 6)), 0, 1)
    img = img + band[..., None] * _c(0.16, 0.15, 0.22)
    n = int(h * w * rng.uniform(0.002, 0.005))
    stars = np.zeros((h, w), np.uint8)
    stars[rng.integers(0, h, n), rng.integers(0, w, n)] = rng.random(n) ** 2 * 255
    glow = np.asarray(Image.fromarray(stars).filter(ImageFilter.GaussianBlur(1.2)), np.float32)
    img = img + ((stars + 3 * glow) / 255)[..., None] * _c(0.95, 0.95, 1.0)
    if rng.random() < 0.5:  # a moon with a halo
        mr = rng.uniform(0.02, 0.05) * min(h, w)
        d = np.hypot(y * h - rng.uniform(0.1, 0.4) * h, x * w - rng.uniform(0.1, 0.9) * w)
        img = img + np.exp(-d / (3 * mr))[..., None] * _c(0.12, 0.12, 0.14)
        img = _mix(img, _c(0.95, 0.93, 0.80), np.clip(mr - d + 0.5, 0, 1))
    trees = 0.05 * np.abs(_noise(rng, 1, w, (1, 50), 1))
    skyline = rng.uniform(0.75, 0.9) + 0.04 * _noise(rng, 1, w, (1, 5)) - trees
    img = _mix(img, _c(0.01, 0.01, 0.015), _below(y, skyline, h))
    n = rng.integers(0, 4)  # lit windows
    spots = zip(rng.uniform(0, w, n), rng.uniform(0.93, 0.99, n) * h)
    windows = [("rectangle", [a, b, a + 2, b + 2]) for a, b in spots]
    return _paint(img, _c(1.0, 0.75, 0.35), windows)


_SCENES = {"desert": _desert, "forest": _forest, "night_sky": _night_sky, "ocean": _ocean,
           "snowfield": _snowfield, "sunset": _sunset}
#: The class folder names, sorted.
CLASSES: tuple[str, ...] = tuple(sorted(_SCENES))


def _photo(rng, img: np.ndarray) -> Image.Image:
    """Camera-like variation: vignette, sensor noise, then hue, saturation and exposure jitter."""
    h, w = img.shape[:2]
    a, sat = rng.uniform(-0.2, 0.2), rng.uniform(0.8, 1.2)
    c, s = np.cos(a) * sat, np.sin(a) * sat
    turn = np.array([[1, 0, 0], [0, c, -s], [0, s, c]])  # rotates the chroma plane of YIQ
    matrix = np.einsum("ij,jk,kl->il", _RGB, turn, _YIQ) * rng.uniform(0.8, 1.15)  # no BLAS threads
    y, x = _grid(h, w)
    img = img * (1 - rng.uniform(0, 0.8) * ((x - 0.5) ** 2 + (y - 0.5) ** 2))[..., None]
    img = img + rng.standard_normal((h, w, 1), dtype=np.float32) * rng.uniform(0.004, 0.02)
    pil = Image.fromarray((np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8))
    return pil.convert("RGB", tuple(np.hstack([matrix, np.zeros((3, 1))]).ravel().tolist()))


def _write_image(folder: Path, name: str, index: int, seed: int) -> None:
    """Draw and save image ``index`` of class ``name``; index 1, 11, 21, ... are PNGs."""
    rng = np.random.default_rng([seed, zlib.crc32(name.encode()), index])
    long = int(rng.integers(200, 641))
    short = max(160, round(long / rng.choice(_RATIOS)))
    w, h = (long, short) if rng.random() < 0.75 else (short, long)
    scale = rng.uniform(0.4, 0.6)  # drawn small and scaled up: fast, and a varied camera softness
    pil = _photo(rng, _SCENES[name](rng, round(h * scale), round(w * scale))).resize((w, h), _CUBIC)
    path = folder / f"{name}_{index:03d}"
    if index % 10 == 1:
        pil.save(path.with_suffix(".png"), format="PNG", compress_level=1)
    else:
        pil.save(path.with_suffix(".jpg"), format="JPEG", quality=int(rng.integers(80, 96)))


def write_sample_data(out_dir: Path, per_class: int = 40, seed: int = 0) -> SampleDataSummary:
    """Draw ``per_class`` images per class into ``out_dir`` atomically; a no-op if already there."""
    out_dir = Path(out_dir)
    if per_class < 2:
        raise UsageError(f"per_class must be at least 2, got {per_class}",
                         hint="each class needs an image to train on and one to validate with")
    if seed < 0:
        raise UsageError(f"seed must be zero or positive, got {seed}")
    params = {"per_class": per_class, "seed": seed, "classes": list(CLASSES), "version": VERSION}
    summary = SampleDataSummary(out_dir, CLASSES, per_class * len(CLASSES), created=True)
    foreign = f"{out_dir} already exists and is not an earlier sample-data folder"

    def draw(folder: Path) -> None:
        for name in CLASSES:
            (folder / name).mkdir()
            for index in range(per_class):
                _write_image(folder / name, name, index, seed)

    created = atomic.new_folder(out_dir, MARKER, params, draw, foreign=foreign, hint=_HINT,
                                complete=lambda f: all((f / n).is_dir() for n in CLASSES))
    return dataclasses.replace(summary, created=created)

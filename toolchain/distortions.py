"""Training-time image distortions, cached as a fixed number of variants per image.

retrain.py ran every distorted image through the whole backbone at every training step, which
made training with distortions about 100 times slower. Here each training image gets
``variants`` distorted copies, each computed once and cached like any bottleneck; training
samples among them. A variant is a deterministic function of the image content, the
distortion settings and the variant index, so it is cached under exactly those.

The distortions are retrain.py's: left-right flip, random crop (a margin in percent), random
scale (percent) and random brightness (percent).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from toolchain.errors import UsageError
from toolchain.options import Options, option


@dataclass(frozen=True, kw_only=True)
class Distortions(Options):
    """Which distortions to apply, and how many cached variants each training image gets."""

    flip_left_right: bool = option(False, "train on randomly mirrored variants of the images")
    random_crop: float = option(0.0, "margin to crop at random from the training images",
                                metavar="PERCENT")
    random_scale: float = option(0.0, "enlarge training images at random by up to this much",
                                 metavar="PERCENT")
    random_brightness: float = option(0.0, "change training images' brightness at random by up "
                                           "to this much", metavar="PERCENT")
    variants: int = option(5, "distorted variants cached per training image",
                           name="distorted_variants")

    def validate(self) -> None:
        for name in ("random_crop", "random_scale", "random_brightness"):
            value = getattr(self, name)
            if not 0 <= value < 100:
                raise UsageError(f"--{name.replace('_', '-')} must be a percentage in [0, 100)")
        if self.variants < 1:
            raise UsageError("--distorted-variants must be at least 1")

    @property
    def enabled(self) -> bool:
        return bool(self.flip_left_right or self.random_crop or self.random_scale
                    or self.random_brightness)

    @property
    def tag(self) -> str:
        """A short stable name for these settings, part of each variant's cache key."""
        text = (f"f{int(self.flip_left_right)}c{self.random_crop:g}s{self.random_scale:g}"
                f"b{self.random_brightness:g}")
        return hashlib.sha1(text.encode()).hexdigest()[:10]

    def transform(self, content_digest: str, index: int):
        """A function distorting an upright PIL image, seeded by (content, settings, index)."""
        key = f"{content_digest}:{self.tag}:{index}".encode()
        seed = int(hashlib.sha256(key).hexdigest()[:16], 16)
        rng = np.random.default_rng(seed)
        flip = self.flip_left_right and rng.random() < 0.5
        margin = 1.0 + self.random_crop / 100.0
        scale = 1.0 + rng.uniform(0.0, self.random_scale / 100.0)
        zoom = margin * scale
        x_frac, y_frac = rng.random(), rng.random()
        brightness = 1.0 + rng.uniform(-self.random_brightness, self.random_brightness) / 100.0

        def apply(image):
            from PIL import Image, ImageEnhance

            if flip:
                image = image.transpose(Image.FLIP_LEFT_RIGHT)
            if zoom > 1.0:
                width, height = image.size
                crop_w, crop_h = max(1, round(width / zoom)), max(1, round(height / zoom))
                left = int(x_frac * (width - crop_w))
                top = int(y_frac * (height - crop_h))
                image = image.crop((left, top, left + crop_w, top + crop_h))
            if brightness != 1.0:
                image = ImageEnhance.Brightness(image).enhance(brightness)
            return image

        return apply

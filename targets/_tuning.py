"""The quantization repair's yardstick: which images tune it, the original's probabilities on
them, and what a tuning set of its size can show (docs/ARCHITECTURE.md, "Quantization:
diagnosis and repair").

A repair decided on a few tuning images picks the luckiest candidate: on a real TF for Poets
graph, a repaired int8 model that agreed on 75 of 76 tuning images (0.9868) agreed on 0.975 of
240 other photos; on a MobileNet v2 trained here, one that agreed on all 29 agreed on 0.9583 of
600 others. So the repair aims past its target by what its tuning set can show (:func:`aim`):
until the 95% lower confidence bound of the agreement clears the target, on a set large enough
for that (:func:`proves`: 189 images for 0.98); on a smaller one at no disagreement, after
which it spends its size budget on float layers, as such a set cannot tell a lucky candidate
from a good one.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from targets import Source
from toolchain.errors import ConversionError, UnreadableImage
from toolchain.images import load_rgb
from toolchain.statistics import wilson

#: Fewer tuning images than this cannot show much (one disagreement in 20 is 0.95): a smaller
#: validation split is topped up to it with training images.
MIN_TUNING = 20


def aim(target: float, tuning: int) -> float:
    """The agreement the repair needs on ``tuning`` images for ``target`` to hold on others: the
    least whose 95% lower confidence bound (Wilson) clears ``target``, when the set is large
    enough for one to (:func:`proves`), else 1.0: no tuning image disagreeing."""
    if not proves(target, tuning):
        return 1.0
    agreeing = tuning
    while agreeing > 0 and wilson(agreeing - 1, tuning)[0] >= target:
        agreeing -= 1
    return agreeing / tuning


def proves(target: float, tuning: int) -> bool:
    """Whether ``tuning`` images can show ``target``: with none of them disagreeing, the 95%
    lower confidence bound clears it (0.98 needs 189 images, 0.6 six). On a smaller set the
    repair aims at no disagreement and then spends its size budget on float layers, as such a
    set cannot tell a lucky candidate from a good one."""
    return tuning > 0 and wilson(tuning, tuning)[0] >= target


def shows(target: float, tuning: int) -> str:
    """What ``tuning`` images can show of ``target``, in a sentence of the repair's record."""
    if proves(target, tuning):
        return (f"{tuning} tuning images can show {target:g}: the repair aimed at "
                f"{aim(target, tuning):.4f} of them, whose 95% lower bound clears it")
    low = wilson(tuning, tuning)[0] if tuning else 0.0
    return (f"{tuning} tuning images cannot show {target:g} (all of them agreeing has a 95% "
            f"lower bound of {low:.3f}), so the repair aimed at none disagreeing, then spent "
            f"its size budget on float layers; the verifier's held-out images decide")


def _readable(paths, size: int, limit: int) -> list[tuple[Path, np.ndarray]]:
    found = []
    for path in paths:
        if len(found) == limit:
            break
        try:
            found.append((path, load_rgb(path, size)))
        except UnreadableImage:
            continue
    return found


def tuning_set(source: Source, calibration_images: int,
               count: int) -> tuple[list[Path], np.ndarray, dict[str, int]]:
    """Up to ``count`` readable tuning images, their uint8 pixels, and how many came from where.

    The validation split (``source.tuning``) first: images the retrained head was not fit on.
    Training images are the wrong yardstick for a head fit on them: it fits them with wide
    margins, so int8 rarely flips them (measured on a trained MobileNet v2: int8 agreed on 1.0 of
    186 training images, 0.931 of 29 validation and 0.92 of 25 testing images). When fewer than
    :data:`MIN_TUNING` validation images exist, training images after the first
    ``calibration_images`` (those that calibrated a full-integer model; 0 for weight-only
    quantization) top the set up to that, then the calibrating ones. An original whose head
    never saw the folder (``source.fit_on_images`` false: a frozen graph or a ``.keras`` file)
    has no training image: every image after the calibrating ones tops the set up to ``count``.
    Never a testing image of a retrained model: those are the verifier's."""
    size = source.input_size
    chosen = _readable(source.tuning, size, count)
    # A graph's "validation" holds the folder's testing split too: it never saw either.
    counts = {"validation" if source.fit_on_images else "validation and testing": len(chosen),
              "training": 0, "calibration": 0}
    least = min(count, MIN_TUNING) if source.fit_on_images else count
    if len(chosen) < least:
        training = _readable(source.calibration, size, calibration_images + least)
        after, calibrating = training[calibration_images:], training[:calibration_images]
        # The calibrating images shaped the int8 ranges: only to reach MIN_TUNING.
        for kind, extra, upto in (("training", after, least),
                                  ("calibration", calibrating, min(least, MIN_TUNING))):
            take = extra[:max(0, upto - len(chosen))]
            chosen += take
            counts[kind] = len(take)
    if not chosen:
        raise ConversionError("no readable validation or training image to tune quantization "
                              "on")
    return [path for path, _ in chosen], np.stack([pixels for _, pixels in chosen]), counts


def original(source: Source, pixels: np.ndarray, function=None) -> np.ndarray:
    """The original's probabilities for uint8 ``pixels``: its concrete function (``function``,
    when the caller already has one) on the preprocessed images, one at a time."""
    import tensorflow as tf

    function = function if function is not None else source.concrete_function()
    return np.concatenate([
        np.asarray(function(tf.constant(source.preprocessing.apply(image[None]),
                                        dtype=tf.float32)))
        for image in pixels])

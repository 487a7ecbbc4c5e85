"""How much a figure measured on n images can be trusted: Wilson intervals, and when a threshold
on a set this small means nothing.

The verifier measures agreement (and accuracy) on a finite set of held-out photos; the same
artifact on other photos would score a little differently. Two tools make that visible:

- :func:`wilson`: the Wilson score interval for a proportion (Wilson 1927; Newcombe 1998,
  method 3). Unlike the textbook ``p ± 1.96·sqrt(p(1-p)/n)`` it stays inside [0, 1] and is not
  zero-width at p = 1, which is the usual case here (24 of 25 images agreeing gives 0.96,
  interval 0.80–0.99; 25 of 25 gives 1.00, interval 0.87–1.00).
- :func:`images_needed`: the smallest set on which a threshold ``t`` allows at least two
  disagreements, ``ceil(2 / (1 - t))``. On a smaller set, one disagreement already fails (or
  none may happen at all), so the threshold is really "no disagreement", and a model at the
  threshold cannot be told from one two disagreements worse. 0.98 needs 100 images (on 25,
  one disagreement is 0.96), 0.995 needs 400 and 0.999 needs 2000. A threshold of 1 asks for no
  disagreement on any set: the rule does not apply (None).

The thresholds themselves live here too (:class:`Thresholds`, one :class:`Threshold` per
precision, defaults :data:`AGREEMENT`), beside the rule that says when a set can show them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from toolchain.errors import UsageError
from toolchain.options import Options, group, option

#: The two-sided 95% quantile of the standard normal distribution.
Z95 = 1.959963984540054
#: Disagreements a threshold must allow for the set to be large enough (see the docstring).
ALLOWED_DISAGREEMENTS = 2
#: The verifier's default least top-1 agreement per precision (``dynamic`` is int8's); the
#: quantization repair stages aim for the same by default.
AGREEMENT = {"float32": 0.999, "float16": 0.995, "int8": 0.98, "dynamic": 0.98}
#: Variants that store int8 weights are held to the int8 threshold.
_THRESHOLD_OF = {"float32": "float32", "float16": "float16", "int8": "int8", "dynamic": "int8"}


def wilson(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of ``successes`` out of ``n`` (95% by default), as (low, high).

    ``n == 0`` has no interval: ValueError (the verifier never measures on zero images)."""
    if n <= 0 or not 0 <= successes <= n:
        raise ValueError(f"no interval for {successes} of {n}")
    p, z2 = successes / n, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    low, high = max(0.0, centre - half), min(1.0, centre + half)
    # At p = 0 (or 1) the low (high) end is exactly 0 (1); rounding would leave it a hair off.
    return (0.0 if successes == 0 else low), (1.0 if successes == n else high)


def images_needed(threshold: float) -> int | None:
    """The fewest images on which ``threshold`` allows two disagreements; None for 1 (or more)."""
    if threshold >= 1.0:
        return None
    # A hair below the exact quotient: 2 / (1 - 0.98) is 100.00000000000009 in binary.
    return max(1, math.ceil(ALLOWED_DISAGREEMENTS / (1.0 - threshold) - 1e-9))


def interval_text(interval: tuple[float, float] | None, n: int) -> str:
    """``95% CI 0.80–0.99, n=25``, as the CLI and report.md show it beside a figure."""
    if interval is None:
        return f"n={n}"
    return f"95% CI {interval[0]:.2f}–{interval[1]:.2f}, n={n}"


@dataclass(frozen=True, kw_only=True)
class Threshold(Options):
    """The least top-1 agreement, and (when set) the largest absolute probability difference."""

    top1_agreement: float = option(1.0, "least top-1 agreement with the original",
                                   name="agreement", metavar="FRACTION")
    max_abs_diff: float | None = option(None, "largest absolute probability difference",
                                        name="max_diff", metavar="PROBABILITY",
                                        shown_default="none")

    def validate(self) -> None:
        if not 0.0 <= self.top1_agreement <= 1.0:
            raise UsageError(f"agreement threshold {self.top1_agreement} is not between 0 and 1")
        if self.max_abs_diff is not None and not 0.0 <= self.max_abs_diff <= 1.0:
            raise UsageError(f"max-diff threshold {self.max_abs_diff} is not between 0 and 1")

    def record(self) -> dict:
        return {"top1_agreement": self.top1_agreement, "max_abs_diff": self.max_abs_diff}


@dataclass(frozen=True, kw_only=True)
class Thresholds(Options):
    """One threshold per precision, read from each artifact; ``dynamic`` (int8 weights) uses
    ``int8``'s."""

    float32: Threshold = group(
        Threshold(top1_agreement=AGREEMENT["float32"], max_abs_diff=1e-3), prefix="float32_")
    float16: Threshold = group(Threshold(top1_agreement=AGREEMENT["float16"]), prefix="float16_")
    int8: Threshold = group(Threshold(top1_agreement=AGREEMENT["int8"]), prefix="int8_")

    def of(self, precision: str, compute: str | None = None) -> Threshold:
        """The threshold of weights stored at ``precision``; for a device row computing at
        ``compute`` (float16), the looser of that precision's and the weights' own: float16
        compute cannot be held to float32's bound, nor int8 weights to float16's."""
        if precision not in _THRESHOLD_OF:
            raise UsageError(f"no threshold for precision {precision!r}")
        own = getattr(self, _THRESHOLD_OF[precision])
        if compute is None:
            return own
        device = self.of(compute)
        return device if device.top1_agreement <= own.top1_agreement else own

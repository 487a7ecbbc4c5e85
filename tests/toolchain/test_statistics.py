"""Wilson intervals and the small-set rule (``toolchain.statistics``), and the warning and the
``--min-images`` failure they give a report (``toolchain.verification.Report``)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from toolchain.statistics import Z95, images_needed, interval_text, wilson
from toolchain.verification import PASSED, Check, Report, Threshold, VerifyOptions


def _by_formula(k: int, n: int) -> tuple[float, float]:
    """Wilson's score interval written out again, independently of the module."""
    p, z = k / n, 1.96
    centre = p + z * z / (2 * n)
    spread = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (centre - spread) / (1 + z * z / n), (centre + spread) / (1 + z * z / n)


def test_24_of_25_is_the_issues_example():
    low, high = wilson(24, 25)
    expected = _by_formula(24, 25)
    assert low == pytest.approx(expected[0], abs=1e-4) and high == pytest.approx(expected[1],
                                                                                 abs=1e-4)
    assert (round(low, 2), round(high, 2)) == (0.80, 0.99)
    assert interval_text((low, high), 25) == "95% CI 0.80–0.99, n=25"


@pytest.mark.parametrize("k, n, low, high", [
    # Newcombe (1998), "Two-sided confidence intervals for the single proportion", Table I,
    # method 3 (Wilson score, no continuity correction).
    (81, 263, 0.2553, 0.3662),
    (15, 148, 0.0624, 0.1605),
    (0, 20, 0.0, 0.1611),
    (1, 29, 0.0061, 0.1718),
])
def test_textbook_values(k, n, low, high):
    found = wilson(k, n)
    assert found == pytest.approx((low, high), abs=1e-4)


def test_the_interval_stays_in_0_1_and_is_not_empty_at_the_ends():
    assert wilson(25, 25)[1] == 1.0 and wilson(25, 25)[0] == pytest.approx(0.8668, abs=1e-4)
    assert wilson(0, 25)[0] == 0.0 and wilson(0, 25)[1] > 0.1
    assert Z95 == pytest.approx(1.96, abs=1e-4)
    with pytest.raises(ValueError):
        wilson(0, 0)


@pytest.mark.parametrize("threshold, needed", [(0.98, 100), (0.995, 400), (0.999, 2000),
                                               (0.9, 20), (0.5, 4), (1.0, None)])
def test_images_needed_allows_two_disagreements(threshold, needed):
    assert images_needed(threshold) == needed
    if needed is not None:  # on that many images two disagreements pass, on one fewer not
        assert (needed - 2) / needed >= threshold - 1e-12
        assert (needed - 3) / (needed - 1) < threshold


def _report(n: int, threshold: float, min_images: int = 0) -> Report:
    check = Check("tflite", Path("m.tflite"), "tflite-interpreter", "int8",
                  Threshold(top1_agreement=threshold), status=PASSED, top1_agreement=1.0,
                  images=n, top1_agreement_interval=wilson(n, n))
    probabilities = np.full((n, 2), 0.5, np.float32)
    return Report(Path("m"), "arch", ("a", "b"), Path("photos"),
                  tuple(f"{i}.jpg" for i in range(n)), None, probabilities, [check],
                  VerifyOptions(min_images=min_images))


def test_the_small_set_warning_appears_below_the_rule_and_not_at_it():
    assert _report(99, 0.98).warnings == [
        "99 images are too few for the agreement threshold 0.98 (int8): it allows 1 "
        "disagreement(s) (one in 99 is 0.9899); 100 images would allow two"]
    assert _report(100, 0.98).warnings == []
    assert _report(25, 0.98).record()["artifacts"][0]["too_few_images"] is True
    assert _report(100, 0.98).record()["artifacts"][0]["images_needed"] == 100
    assert _report(5, 1.0).warnings == []  # "no disagreement" needs no size to mean it


def test_min_images_fails_the_run_below_it():
    assert _report(29, 0.5, min_images=30).failures == [
        "29 held-out images, fewer than --min-images 30"]
    assert not _report(29, 0.5, min_images=30).passed
    assert _report(29, 0.5, min_images=30).exit_code == 1
    assert _report(30, 0.5, min_images=30).passed
    assert _report(3, 0.5).passed  # 0: off

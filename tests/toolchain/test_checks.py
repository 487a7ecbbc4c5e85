"""The three verdicts (toolchain/checks.py, toolchain/verification.py): a check that meets its
threshold on too few images to show it is inconclusive, never passed; a failure stays a failure;
the user may accept a small set (``accept_small_set``, ``min_images``); and every report file
says which verdict it is (docs/ARCHITECTURE.md, "The small-set rule")."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

from toolchain import report as report_io
from toolchain.checks import FAILED, INCONCLUSIVE, PASSED, Check
from toolchain.errors import EXIT_CHECK_FAILED, EXIT_INCONCLUSIVE
from toolchain.verification import Report, Threshold, VerifyOptions, _compare


def _judged(n: int, disagree: int = 0, threshold: float = 0.98, **options) -> Report:
    """A report of one int8 check compared on ``n`` images, ``disagree`` of them flipped."""
    original = np.tile(np.array([[0.9, 0.1]], np.float32), (n, 1))
    theirs = original.copy()
    theirs[:disagree] = [0.1, 0.9]
    report = Report(Path("m"), "arch", ("a", "b"), Path("photos"),
                    tuple(f"{i}.jpg" for i in range(n)), None, original, [],
                    VerifyOptions(**options))
    check = Check("tflite", Path("model_int8.tflite"), "tflite-interpreter", "int8",
                  Threshold(top1_agreement=threshold))
    _compare(check, theirs, report)
    report.checks.append(check)
    report.files[str(check.path)] = ("0" * 64, 10)
    return report


def test_meeting_a_threshold_on_too_few_images_is_inconclusive():
    report = _judged(25)
    (check,) = report.checks
    assert check.top1_agreement == 1.0 and check.status == INCONCLUSIVE
    assert check.reason == ("met 0.98 on 25 images, too few to show it (100 would allow two "
                            "disagreements)")
    assert report.verdict == INCONCLUSIVE and not report.passed
    assert report.exit_code == EXIT_INCONCLUSIVE == 3
    assert report.hint == ("25 images cannot show the thresholds; 100 photos of the kind the "
                           "app will see can, and parity needs no labels: `toolchain verify "
                           "--images DIR`; or accept this set with --accept-small-set or "
                           "--min-images N")


@pytest.mark.parametrize("n", [100, 400])
def test_a_set_that_can_show_the_threshold_passes(n):
    report = _judged(n, disagree=1)
    assert report.checks[0].status == PASSED and report.verdict == PASSED
    assert report.exit_code == 0 and report.hint == ""


def test_a_failure_on_a_small_set_is_still_a_failure():
    report = _judged(25, disagree=1)
    assert report.checks[0].status == FAILED and report.verdict == FAILED
    assert report.exit_code == EXIT_CHECK_FAILED and report.hint == ""


def test_one_failed_check_beside_an_inconclusive_one_fails_the_run():
    report = _judged(25)
    failed = _judged(25, disagree=1).checks[0]
    report.checks.append(failed)
    assert [check.status for check in report.checks] == [INCONCLUSIVE, FAILED]
    assert report.verdict == FAILED and report.exit_code == EXIT_CHECK_FAILED


@pytest.mark.parametrize("options, verdict", [
    ({"accept_small_set": True}, PASSED),
    ({"min_images": 20}, PASSED),        # the user's least set: 25 is enough for them
    ({"min_images": 25}, PASSED),
    ({"min_images": 26}, FAILED),        # below it the run fails, as before
    ({}, INCONCLUSIVE),
])
def test_the_user_may_accept_a_small_set(options, verdict):
    report = _judged(25, **options)
    assert report.verdict == verdict, report.checks[0].reason
    # The warning that the set is small stays: accepting it does not make it large.
    assert report.warnings and report.warnings[0].startswith("25 images are too few for the "
                                                             "agreement threshold 0.98")


def test_a_threshold_of_one_needs_no_size():
    report = _judged(3, threshold=1.0)
    assert report.verdict == PASSED and report.checks[0].images_needed is None


def test_every_report_file_says_inconclusive(tmp_path):
    report = _judged(25)
    files = report_io.write(report, tmp_path)
    record = json.loads(files["json"].read_text(encoding="utf-8"))
    assert record["schema_version"] == 3
    assert (record["verdict"], record["passed"]) == (INCONCLUSIVE, False)
    assert record["accept_small_set"] is False
    (row,) = record["artifacts"]
    assert (row["status"], row["passed"], row["too_few_images"]) == (INCONCLUSIVE, False, True)
    (entry,) = record["files"]
    assert entry["verdict"] == INCONCLUSIVE
    assert entry["reason"] == f"model_int8.tflite [tflite-interpreter]: {row['reason']}"
    markdown = files["markdown"].read_text(encoding="utf-8")
    assert markdown.startswith("# Verification: ❔ inconclusive\n")
    assert f"❔ {report.hint}." in markdown
    assert f"❔ inconclusive: {row['reason']} |" in markdown
    suite = ET.fromstring(files["junit"].read_bytes())
    assert (suite.get("failures"), suite.get("skipped")) == ("0", "1")
    (skipped,) = suite.iter("skipped")
    assert skipped.get("type") == "inconclusive" and skipped.get("message") == row["reason"]
    properties = {item.get("name"): item.get("value") for item in suite.iter("property")}
    assert properties["verdict"] == INCONCLUSIVE

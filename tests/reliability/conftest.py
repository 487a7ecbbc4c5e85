"""Fixtures for the reliability suite: real ``toolchain`` processes on messy data.

These tests run the command line in child processes, as users do, so that a crash, a
traceback, a signal or a file left behind is seen exactly as a user would see it. Each child
runs with its own HOME and XDG cache (nothing may be written outside the folders it is given)
and without root's power to ignore file modes (tests/privileges.py), so an unreadable photo or a
read-only folder is real on CI machines that run as root. The helpers that start and watch those
processes are in tests/helpers.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def many_photos(tmp_path_factory) -> Path:
    """The sample data with 50 images per class (300): extraction lasts long enough to be hit."""
    from toolchain.sample_photos import write_sample_data

    out = tmp_path_factory.mktemp("many") / "photos"
    write_sample_data(out, per_class=50, seed=3)
    return out

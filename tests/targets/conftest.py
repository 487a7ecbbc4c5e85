"""Fixtures for target tests.

The shared test models (a convertible Source per architecture family) are built by
``tests.helpers.make_source``.
"""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def calibration_images(sample_dir):
    """Training-split images of the sample data (the only images calibration may use)."""
    from toolchain.dataset import scan

    return tuple(entry.path for entry in scan(sample_dir).subset("training"))

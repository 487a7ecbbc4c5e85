"""Fixtures for target tests.

The shared test models (a convertible Source per architecture family) are built by
``tests.helpers.make_source``.
"""

from __future__ import annotations

import pytest

# Re-exported for tests/toolchain/runtimes, which still imports them from here (its owner moves
# those imports to tests.helpers); no test of this folder imports from this file.
from tests.helpers import FAMILY_ARCHS, LABELS, make_source  # noqa: F401


@pytest.fixture(scope="session")
def calibration_images(sample_dir):
    """Training-split images of the sample data (the only images calibration may use)."""
    from toolchain.dataset import scan

    return tuple(entry.path for entry in scan(sample_dir).subset("training"))

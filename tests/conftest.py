import os

import pytest

from tests.support.tree import COMPUTE_CTL


def pytest_collection_modifyitems(config, items):
    """End-to-end tests need the installed tree (scripts/install.sh; scripts/test does it)."""
    if os.access(COMPUTE_CTL, os.X_OK):
        return
    skip = pytest.mark.skip(reason=f"{COMPUTE_CTL} not installed: run ./scripts/test")
    for item in items:
        if "e2e" in item.keywords:
            item.add_marker(skip)

import sys
from pathlib import Path

import numpy as np
import pytest

# Test helpers live beside this file (tests/helpers.py); the repo root is never put on sys.path,
# so a bare ``passes`` package can never be imported by accident.
sys.path.insert(0, str(Path(__file__).resolve().parent))


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def pytest_collection_modifyitems(config, items):
    from helpers import cuda_in_use

    if cuda_in_use():
        return
    skip = pytest.mark.skip(reason="CUDAExecutionProvider is not really in use on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)

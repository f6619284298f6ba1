import os

import pytest

CIFAR_DIR = os.environ.get("IFC_DS_CIFAR10", os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data",
                                                          "cifar10"))


@pytest.fixture
def cifar10_dir():
    """../shared/data/cifar10 (or $IFC_DS_CIFAR10); tests that need it skip without it."""
    if not os.path.isfile(os.path.join(CIFAR_DIR, "test.parquet")):
        pytest.skip(f"CIFAR-10 parquet files not found in {CIFAR_DIR} (set IFC_DS_CIFAR10)")
    return CIFAR_DIR

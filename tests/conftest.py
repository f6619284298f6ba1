import os

import pytest

CIFAR_DIR = os.environ.get("IFC_DS_CIFAR10", os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data",
                                                          "cifar10"))


@pytest.fixture(scope="session", autouse=True)
def forkserver():
    """The session's forkserver, started before the first test with the ranks' preload (``_dist``). A
    fixture, not a session hook: the server, its ranks and workers inherit pytest's captured output."""
    from tests._dist import start_forkserver

    start_forkserver()


@pytest.fixture
def cifar10_dir():
    """../shared/data/cifar10 (or $IFC_DS_CIFAR10); tests that need it skip without it."""
    if not os.path.isfile(os.path.join(CIFAR_DIR, "test.parquet")):
        pytest.skip(f"CIFAR-10 parquet files not found in {CIFAR_DIR} (set IFC_DS_CIFAR10)")
    return CIFAR_DIR


@pytest.fixture(autouse=True)
def no_shared_memory_left_behind():
    """Every test leaves /dev/shm as it found it: a workspace of DeepSpeed's shared-memory all-reduce or
    a decoded dataset left there is RAM lost until reboot (DeepSpeed's own leak filled 21 GB of a
    24 GB machine over a few suite runs, and the next run thrashed until CI gave up). Files that another
    run on the machine holds are not the test's (``tests/_shm.py``)."""
    from tests._shm import leaked_since, shared_memory_files

    before = shared_memory_files()
    yield
    leaked = leaked_since(before)
    for path in leaked:
        os.unlink(path)
    assert not leaked, f"left in /dev/shm: {sorted(leaked)}"

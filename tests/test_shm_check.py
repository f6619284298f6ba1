"""The suite's /dev/shm leak check (``tests/_shm.py``) blames a test for the files it left, and not for
those another run on the machine holds (it used to unlink those, under a running job)."""

import os
import subprocess
import sys
import time
import uuid

from tests._shm import leaked_since, shared_memory_files

HOLDER = """
import mmap, os, sys, time
path, ready, detach = sys.argv[1], sys.argv[2], sys.argv[3] == "detach"
if detach and os.fork():  # the parent exits: the holder is re-parented, outside the suite's tree
    os._exit(0)
fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
os.ftruncate(fd, 4096)
mapped = mmap.mmap(fd, 4096)
os.close(fd)  # held by the mapping alone, as DeepSpeed's and ifc_ds's files are
with open(ready, "w") as f:
    f.write(str(os.getpid()))
time.sleep(60)
"""


def _hold(path: str, ready: str, detach: bool) -> tuple[subprocess.Popen, int]:
    child = subprocess.Popen([sys.executable, "-c", HOLDER, path, ready, "detach" if detach else "stay"])
    if detach:
        child.wait(timeout=30)  # its parent gone: the holder is re-parented, out of the suite's tree
    deadline = time.monotonic() + 30
    while not (os.path.exists(ready) and open(ready).read()):
        assert time.monotonic() < deadline, "the holder never mapped its file"
        time.sleep(0.05)
    return child, int(open(ready).read())


def test_only_files_that_nobody_else_holds_are_a_tests_leak(tmp_path):
    before = shared_memory_files()
    name = uuid.uuid4().hex
    foreign, ours_held, ours_unheld = (f"/dev/shm/ifc_ds-{what}-{name}.bin" for what in ("foreign", "child", "left"))
    holders = []
    try:
        holders.append(_hold(foreign, str(tmp_path / "foreign"), detach=True))
        holders.append(_hold(ours_held, str(tmp_path / "child"), detach=False))
        open(ours_unheld, "wb").close()
        assert holders[0][1] != holders[0][0].pid  # the foreign holder is the detached grandchild

        # (only this test's files: another run's may come and go meanwhile)
        assert leaked_since(before, grace_s=0.0) & {foreign, ours_held, ours_unheld} == {ours_held, ours_unheld}
    finally:
        for child, pid in holders:
            os.kill(pid, 9)
            child.wait(timeout=30)
        for path in (foreign, ours_held, ours_unheld):
            if os.path.exists(path):
                os.unlink(path)
    assert not leaked_since(before, grace_s=0.0) & {foreign, ours_held, ours_unheld}

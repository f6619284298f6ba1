"""What the suite's ``/dev/shm`` check (conftest's ``no_shared_memory_left_behind``) may call a test's
leak: a file of ours that a test created and nobody holds. Another run on the same machine (a training
job, a second suite) creates files of the same names, and those are neither unlinked nor blamed."""

from __future__ import annotations

import glob
import os
import time

PATTERNS = ("/dev/shm/deepspeed_allreduce_buffer_*", "/dev/shm/ifc_ds-*")


def shared_memory_files() -> set[str]:
    """The /dev/shm files that DeepSpeed's shared-memory all-reduce and ifc_ds create."""
    return {path for pattern in PATTERNS for path in glob.glob(pattern)}


def held_elsewhere(paths: set[str]) -> set[str]:
    """Those of ``paths`` that a live process outside this process's tree has open or mapped."""
    me, parent_of, holders = os.getpid(), {}, {}
    for pid in map(int, filter(str.isdigit, os.listdir("/proc"))):
        try:
            with open(f"/proc/{pid}/stat") as f:  # "pid (comm) state ppid ...": comm may hold spaces
                parent_of[pid] = int(f.read().rsplit(")", 1)[1].split()[1])
            names = {os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
            with open(f"/proc/{pid}/maps") as f:
                names |= {line.split(maxsplit=5)[-1].strip() for line in f if "/dev/shm/" in line}
        except OSError:  # it exited meanwhile
            continue
        if names & paths:
            holders[pid] = names & paths

    def in_my_tree(pid: int) -> bool:
        while pid > 1 and pid != me:
            pid = parent_of.get(pid, 1)
        return pid == me

    return set().union(*(names for pid, names in holders.items() if not in_my_tree(pid)))


def leaked_since(before: set[str], grace_s: float = 1.0) -> set[str]:
    """Files created since ``before`` that nobody outside this process's tree holds. Another run's file
    is unheld for a moment between its creation and its ranks' mapping (after a barrier), so a new file
    is looked at again after ``grace_s`` before it counts."""
    new = shared_memory_files() - before
    if not new:
        return new
    time.sleep(grace_s)
    new = {path for path in new if os.path.exists(path)}
    return new - held_elsewhere(new)

"""What the suite's ``/dev/shm`` check (conftest's ``no_shared_memory_left_behind``) may call a test's
leak: a file that the test created and that no live process outside this pytest's process tree holds
open or mapped. Another run on the same machine (a training job, a second suite) creates files that
match the same patterns; those are neither unlinked nor blamed."""

from __future__ import annotations

import glob
import os
import time

PATTERNS = ("/dev/shm/deepspeed_allreduce_buffer_*", "/dev/shm/ifc_ds-*")


def shared_memory_files() -> set[str]:
    """This user's /dev/shm files that DeepSpeed's shared-memory all-reduce and ifc_ds create (another
    user's are not ours to blame, nor to unlink: /dev/shm is sticky)."""
    mine = set()
    for path in (p for pattern in PATTERNS for p in glob.glob(pattern)):
        try:
            if os.stat(path).st_uid == os.getuid():
                mine.add(path)
        except FileNotFoundError:  # unlinked meanwhile
            pass
    return mine


def _holds(pid: int, files: dict[tuple[int, int], str], paths: set[str]) -> set[str]:
    """Those of ``files`` (keyed by (device, inode); ``paths``, their values) that process ``pid`` has open
    or mapped. Each fd is read on its own: a process that closes one meanwhile still counts for the others."""
    held = set()
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:  # gone, or another user's process (it cannot open this user's 0600 files)
        fds = []
    for fd in fds:
        try:
            st = os.stat(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if (st.st_dev, st.st_ino) in files:
            held.add(files[st.st_dev, st.st_ino])
    try:
        with open(f"/proc/{pid}/maps") as f:  # "address perms offset dev inode path", the path may hold spaces
            held |= {line.split(maxsplit=5)[-1].rstrip("\n") for line in f if "/dev/shm/" in line} & paths
    except OSError:
        pass
    return held


def held_elsewhere(paths: set[str]) -> set[str]:
    """Those of ``paths`` that a live process outside this process's tree has open or mapped."""
    files = {}
    for path in paths:
        try:
            st = os.stat(path)
            files[st.st_dev, st.st_ino] = path
        except FileNotFoundError:
            pass
    paths = set(files.values())
    me, parent_of, holders = os.getpid(), {}, {}
    for pid in map(int, filter(str.isdigit, os.listdir("/proc"))):
        try:
            with open(f"/proc/{pid}/stat") as f:  # "pid (comm) state ppid ...": comm may hold spaces
                parent_of[pid] = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):  # it exited meanwhile
            continue
        held = _holds(pid, files, paths)
        if held:
            holders[pid] = held

    def in_my_tree(pid: int) -> bool:
        while pid > 1 and pid != me:
            pid = parent_of.get(pid, 1)
        return pid == me

    return set().union(*(held for pid, held in holders.items() if not in_my_tree(pid)))


def leaked_since(before: set[str], grace_s: float = 1.0) -> set[str]:
    """Files created since ``before`` that nobody outside this process's tree holds. Another run's file
    is held by no one between its creation and its ranks' mapping: ifc_ds's node-shared files wait for
    a barrier there, usually milliseconds. So a new file is looked at again after ``grace_s``; a peer
    slower than that to reach its barrier could still be missed."""
    new = shared_memory_files() - before
    if not new:
        return new
    time.sleep(grace_s)
    new = {path for path in new if os.path.exists(path)}
    return new - held_elsewhere(new)

"""How DataLoader worker processes start: from a forkserver, never forked from the rank itself.

A rank is never single-threaded: gloo, pyarrow's I/O pool (which calls back into Python to read the
files of a HF ``datasets`` stream, and keeps reading ahead after an epoch stops early), tqdm's
monitor. CPython 3.8 to 3.11 can deadlock a forked child when, at the instant of ``fork``, another
thread holds the interpreter's thread-list lock (CPython gh-112275, fixed in 3.11 by a 2024
backport; 3.11.7 here has it): a native thread entering Python takes that lock without the GIL.
The worker then hangs in ``PyOS_AfterFork_Child`` before its first line, and the rank waits on it
forever (tests/test_streaming.py met it in 3 of 63 runs).

A forkserver is a clean single-threaded process, started once per rank, that has already imported
what workers need; each worker is forked from it in milliseconds. It is the default start method
from Python 3.14 for this reason. Datasets handed to workers must be picklable (ours are).
"""

from __future__ import annotations

import multiprocessing

# what a worker needs to unpickle and run our datasets; imported once, in the server (about 3 s)
# ("__main__": the launching script, imported once here rather than by every worker, as spawn would)
WORKER_MODULES = ("__main__", "torch", "numpy", "PIL.Image", "datasets", "ifc_ds.crops", "ifc_ds.data",
                  "ifc_ds.decoded", "ifc_ds.streaming")


def worker_context(num_workers: int):
    """The multiprocessing context for a DataLoader with ``num_workers`` workers (None for none)."""
    if num_workers <= 0:
        return None
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(list(WORKER_MODULES))  # takes effect when the server starts
    return context

"""Random numbers that are a function of ``(seed, epoch, instance id, stream)``, not of a generator's state.

Every random choice of a training view (crop box, flip, colour jitter, grayscale, blur) is drawn this
way, so a view depends only on which image it is and in which epoch, never on which rank, DataLoader
worker or batch position produced it, or on how many steps ran before a resume. Resume (same or
another world size) therefore needs no augmentation RNG state, and a DataLoader worker and the device
pipeline agree on the parameters of a sample without exchanging them.

Written by hand because neither numpy nor torch offers a vectorised counter-based generator keyed
per element: this is SplitMix64 (Steele et al., 2014) applied to a hash of the key, in numpy's
well-defined wrapping uint64 arithmetic.
"""

from __future__ import annotations

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MUL1 = np.uint64(0xBF58476D1CE4E5B9)
_MUL2 = np.uint64(0x94D049BB133111EB)

# one stream per kind of choice, so that adding a draw to one never shifts another
CROP, FLIP, JITTER, GRAYSCALE, BLUR = 1, 2, 3, 4, 5


def _mix(x: np.ndarray) -> np.ndarray:
    """SplitMix64's output function on uint64 arrays (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        x = x + _GOLDEN
        x = (x ^ (x >> np.uint64(30))) * _MUL1
        x = (x ^ (x >> np.uint64(27))) * _MUL2
        return x ^ (x >> np.uint64(31))


def keyed_uniform(seed: int, epoch: int, ids, stream: int, count: int) -> np.ndarray:
    """Uniform numbers in ``[0, 1)``, ``[B, count]`` float64, one row per instance id in ``ids [B]``."""
    ids = np.asarray(ids, dtype=np.int64).astype(np.uint64).reshape(-1)
    key = _mix(np.array([seed & (2**64 - 1)], dtype=np.uint64))
    key = _mix(key ^ np.array([epoch & (2**64 - 1)], dtype=np.uint64))
    key = _mix(key ^ np.array([stream], dtype=np.uint64))
    base = _mix(key ^ ids)[:, None]
    with np.errstate(over="ignore"):
        counters = base + np.arange(1, count + 1, dtype=np.uint64)[None, :] * _GOLDEN
    bits = _mix(counters) >> np.uint64(11)  # the top 53 bits: a double in [0, 1)
    return bits.astype(np.float64) * (1.0 / 2**53)

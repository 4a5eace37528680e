"""Where the demo data's randomness comes from: one seeded numpy stream per purpose, and the two draws on it.

Only ``numpy.random.default_rng([seed, stream])`` generators are used, one stream per purpose, so the same
arguments always give byte-identical files and changing one part's size never changes another part's content.
Every draw of the package goes through these generators; the order of draws is part of the output format.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

# Stream numbers are fixed forever: renumbering one would change that part's data.
STREAMS = {"pretrain": 1, "finetune": 2, "vqav2": 11, "pope": 12, "scienceqa": 13, "mme": 14,
           "gqa": 15}


def stream(seed: int, purpose: str) -> np.random.Generator:
    """The generator of one purpose (a key of ``STREAMS``) under the run's ``seed``."""
    return np.random.default_rng([seed, STREAMS[purpose]])


def pick(rng: np.random.Generator, items: Sequence):
    """One item, uniformly."""
    return items[int(rng.integers(len(items)))]


def sample(rng: np.random.Generator, items: Sequence, k: int) -> list:
    """``k`` distinct items in random order (all of them, shuffled, when ``k >= len(items)``)."""
    return [items[i] for i in rng.permutation(len(items))[:k]]

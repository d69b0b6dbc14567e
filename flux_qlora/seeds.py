"""Every random choice of a run, from one function of (seed, stream, indices).

Each purpose draws from a stream of its own, named for it ("train/noise", "train/order", "eval-noise", ...) and
indexed by what it is drawn for (a micro step, an epoch and bucket, an item): two streams never share numbers
however the indices line up (the hand-made `seed * 1_000_003 + i` formulas this replaced did: the held-out eval
noise of item e equalled the training noise of micro step e - 1), and a resumed run or another process draws the
same numbers for the same step.
"""

from __future__ import annotations

import hashlib

import torch


def seed_of(seed: int, stream: str, *index: int) -> int:
    """A 63-bit seed for (seed, stream, index): the first 8 bytes of their SHA-256."""
    key = hashlib.sha256(repr((int(seed), stream, tuple(int(i) for i in index))).encode()).digest()
    return int.from_bytes(key[:8], "little") >> 1


def generator(seed: int, stream: str, *index: int) -> torch.Generator:
    """A CPU generator of its own for one draw of `stream` at `index`."""
    return torch.Generator().manual_seed(seed_of(seed, stream, *index))

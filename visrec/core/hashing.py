"""Hashes that are the same in every process and on every machine, for decisions that must not
depend on where they run: sampling, train/val split, sharding, A/B arms.

Python's `hash()` is salted per process, so a Beam worker, a Dataflow worker and a test would
each decide differently with it.
"""

from __future__ import annotations

import hashlib
from typing import Any


def hash64(text: str) -> int:
    """The first 8 bytes of blake2b(`text` as UTF-8), as a big-endian unsigned 64-bit integer."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "big")


def stable_hash(*parts: Any) -> int:
    """`hash64` of `parts` as strings joined by the unit separator (`\\x1f`), which ids do not contain,
    so ("a", "bc") and ("ab", "c") hash apart."""
    return hash64("\x1f".join(str(p) for p in parts))

"""Which arm a user is in: a salted hash, so assignment is stable, needs no state and every
replica (and the analysis) computes the same answer."""

from __future__ import annotations

from visrec.core.hashing import stable_hash

CONTROL, TREATMENT = "control", "treatment"
ARMS = (CONTROL, TREATMENT)
_BUCKETS = 10_000


def arm_of(unit_id: str, salt: str, share: float) -> str:
    """`treatment` for a `share` of units (users, or sessions), `control` for the rest; the same
    unit always gets the same arm for one salt."""
    return TREATMENT if stable_hash("visrec-ab", salt, unit_id) % _BUCKETS < round(share * _BUCKETS) else CONTROL

"""Online A/B experiments inside the service: the treatment release beside the control, each user's
arm, the optional exploration slot, and the impression rows an answer is logged as.

Vertex AI endpoint traffic splits are per request, but an A/B test needs each user to see one
arm for its whole length. So the service itself holds both releases: the control (the registry's
`CURRENT`, the state it always serves) and, while `REGISTRY/EXPERIMENT` names one
(`visrec experiment start`), the treatment, loaded beside it (memory x 2). A request that names
a `user_id` (else a `session_id`) is served by the arm `arm_of(unit, salt, share)` gives it,
the same on every replica and in the analysis; a request that names neither is served by the
control and logged without an arm, so it never enters the comparison. The treatment follows the
control's writes through its hand-over (its predecessor's journal), as any newer release does.
"""

from __future__ import annotations

import functools
import logging
import math
import random
import time
import uuid
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from visrec.online.eventlog import Encoded, partition_of, to_json
from visrec.online.ranking import RankedList
from visrec.online.state import ServingState
from visrec.stages.experiment.assignment import TREATMENT, arm_of

if TYPE_CHECKING:
    from visrec.online.config import ServingConfig

log = logging.getLogger(__name__)

EXPERIMENT_CHECK_SECONDS = 10.0  # how often a replica re-reads REGISTRY/EXPERIMENT


@dataclass(frozen=True)
class Assignment:
    """Who serves one request: the state, the arm (None: not in the experiment) and the experiment."""

    state: ServingState
    arm: str | None = None
    experiment: dict[str, Any] | None = None


@dataclass(frozen=True)
class Shown:
    """One answer as it was shown: its id (the key taps refer to), release, arm, the ranked list,
    and per position the probability the policy showed that item there."""

    request_id: str
    release: str
    arm: str | None
    experiment: str | None
    ranked: RankedList
    propensities: tuple[float, ...]
    explored: bool


class ExperimentFollower:
    """The registry's running experiment and its treatment state, re-read every `EXPERIMENT_CHECK_SECONDS`."""

    def __init__(self, release_uri: str, config: ServingConfig):
        from visrec.stages.release.registry import CURRENT
        from visrec.core import io

        self.release_uri = release_uri
        self.config = config
        self.is_registry = io.exists(io.join(release_uri, CURRENT))
        self.experiment: dict[str, Any] | None = None
        self.treatment: ServingState | None = None
        self.checked_at = -math.inf

    def poll(self, now: float | None = None) -> bool:
        """Start, switch or end the experiment if the registry's changed; True if it did.

        A treatment that fails to load is logged and the experiment not served (every user
        stays on control, logged without an arm) until the next check.
        """
        from visrec.online.loading import load_state
        from visrec.stages.experiment.control import read_experiment

        now = time.monotonic() if now is None else now
        if not self.is_registry or now - self.checked_at < EXPERIMENT_CHECK_SECONDS:
            return False
        self.checked_at = now
        try:
            record = read_experiment(self.release_uri)
        except Exception as exc:  # noqa: BLE001 - an unreadable record never takes serving down
            log.error("cannot read the experiment of %s: %s", self.release_uri, exc)
            return False
        if (record or {}).get("id") == (self.experiment or {}).get("id"):
            return False
        old = self.treatment
        self.experiment, self.treatment = None, None
        if old is not None:
            old.close()
        if record is None:
            log.info("experiment ended: every user is on the control")
            return True
        try:
            self.treatment = load_state(self.release_uri, self.config, version=record["treatment"])
        except Exception as exc:  # noqa: BLE001 - keep serving the control
            log.error("cannot load the treatment %s of experiment %s: %s", record["treatment"], record["id"], exc)
            self.checked_at = now
            return False
        self.experiment = record
        log.info("experiment %s: serving %s to %.0f%% of users", record["id"], record["treatment"],
                 100 * float(record["share"]))
        return True

    def assign(self, control: ServingState, unit: str | None) -> Assignment:
        """The state and arm for a request of `unit` (a user or session id; None: not in any arm)."""
        experiment, treatment = self.experiment, self.treatment
        if experiment is None or treatment is None or not unit:
            return Assignment(control)
        arm = arm_of(unit, experiment["salt"], float(experiment["share"]))
        return Assignment(treatment if arm == TREATMENT else control, arm, experiment)

    def status(self) -> dict[str, Any] | None:
        """What `/healthz` says: the experiment served now (None: none)."""
        if self.experiment is None:
            return None
        return {key: self.experiment[key] for key in ("id", "control", "treatment", "share")}

    def close(self) -> None:
        if self.treatment is not None:
            self.treatment.close()
            self.treatment = None


def explore(ranked: RankedList, exploration: float, depth: int, rng: random.Random) -> tuple[RankedList, tuple[float, ...], bool]:
    """With probability `exploration`, swap two of the top `depth` positions chosen uniformly; the
    answer, each position's propensity, and whether it was explored.

    The propensity of an item at a position is the probability this policy shows the item the ranker
    put at position i at position j: for i != j (both within the depth) exploration / C(depth, 2), for
    an unmoved item 1 - 2 * exploration / depth, beyond the depth 1. Logged with every impression,
    it is what the inverse-propensity-weighted nDCG divides by.
    """
    items = list(ranked.items)
    depth = min(depth, len(items))
    stay = 1.0 - 2.0 * exploration / depth if depth >= 2 else 1.0
    propensities = [stay if p < depth else 1.0 for p in range(len(items))]
    if depth < 2 or exploration <= 0 or rng.random() >= exploration:
        return ranked, tuple(propensities), False
    i, j = rng.sample(range(depth), 2)
    items[i], items[j] = items[j], items[i]
    propensities[i] = propensities[j] = exploration / math.comb(depth, 2)
    return replace(ranked, items=items), tuple(propensities), True


def new_request_id() -> str:
    return uuid.uuid4().hex


@functools.lru_cache(maxsize=256)
def _propensity_json(propensity: float) -> str:
    # A policy has a handful of distinct propensities (1.0, the stay and the swap probability).
    return repr(round(propensity, 6))


def impression_lines(shown: Shown, query_item_id: str, user_id: str | None, session_id: str | None,
                     ts: datetime | None = None) -> Encoded:
    """One interactions-contract row per item shown (`tapped` is filled in by `visrec join-events`),
    as JSON Lines: `item_id`, `position`, `propensity`, then the fields every row of the answer
    shares (`request_id`, `query_item_id`, `session_id`, `user_id`, `ts`, `release`, `arm`,
    `experiment`, `explored`), serialised once per answer, which keeps logging to a few
    microseconds of the request's thread."""
    stamp = (ts or datetime.now(timezone.utc)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    shared = to_json({"request_id": shown.request_id, "query_item_id": query_item_id,
                       "session_id": session_id or user_id or shown.request_id, "user_id": user_id, "ts": stamp,
                       "release": shown.release, "arm": shown.arm, "experiment": shown.experiment,
                       "explored": shown.explored})[1:]  # '"request_id": ...}'
    text = "".join(f'{{"item_id": {to_json(item.item_id)}, "position": {position}, '
                   f'"propensity": {_propensity_json(propensity)}, {shared}\n'
                   for position, (item, propensity) in enumerate(zip(shown.ranked.items, shown.propensities)))
    return Encoded(partition_of(stamp), text, len(shown.ranked.items))

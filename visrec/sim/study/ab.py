"""The simulated A/B test's traffic: the ranking variants as `visrec serve` flags, the split of
users between arms, their sessions, the hidden user model's taps, and the replay of every
session against real serving processes."""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from visrec.core.errors import UserError
from visrec.core.servers import ServeProcess
from visrec.sim.study.config import ARMS, BASELINE, CANDIDATE, TAP_STREAM
from visrec.stages.experiment.assignment import TREATMENT
from visrec.stages.experiment.assignment import arm_of as assign

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RankingVariant:
    """One serving configuration of the A/B test, expressed as `visrec serve` flags."""

    name: str
    price_filter: bool
    category_rerank: bool

    def serve_flags(self) -> list[str]:
        flags = []
        if not self.price_filter:  # a band no positive price falls outside of
            flags += ["--price-low", "1e-12", "--price-high", "1e12"]
        if not self.category_rerank:
            flags += ["--category-weight", "0"]
        return flags


RANKING_VARIANTS = (RankingVariant("filter + re-rank", True, True),
                    RankingVariant("no price filter", False, True),
                    RankingVariant("no category re-rank", True, False),
                    RankingVariant("neither", False, False))


def arm_of(user_id: str, salt: str) -> str:
    """The A/B arm of a user, by the service's own assignment (`visrec.stages.experiment.assignment`,
    half the users in the candidate arm), so a user always sees one arm."""
    return CANDIDATE if assign(user_id, salt, 0.5) == TREATMENT else BASELINE


@dataclass(frozen=True)
class Session:
    """One simulated page view: a user looks at `query_item_id` and is shown recommendations."""

    index: int
    user_id: str
    arm: str
    query_item_id: str


def make_sessions(query_pool: Sequence[str], users: int, sessions_per_user: int, seed: int) -> list[Session]:
    """`users` x `sessions_per_user` sessions, query items drawn uniformly from `query_pool`."""
    if not query_pool:
        raise UserError("no on-sale item is indexed by both releases: nothing to simulate")
    rng = np.random.default_rng([seed, TAP_STREAM, 0])
    picks = rng.integers(len(query_pool), size=users * sessions_per_user)
    sessions = []
    for u in range(users):
        user_id = f"user-{u:06d}"
        arm = arm_of(user_id, f"study-{seed}")
        for s in range(sessions_per_user):
            i = u * sessions_per_user + s
            sessions.append(Session(i, user_id, arm, query_pool[int(picks[i])]))
    return sessions


def simulate_taps(hidden: dict[str, dict], session: Session, served: Sequence[str], seed: int,
                  k: int) -> tuple[np.ndarray, np.ndarray]:
    """(tap probabilities, drawn taps) of the hidden user model for one served list.

    The uniform draw behind position p of a session is the same whatever is shown, so
    two rankings of one session differ only where they show different items (common
    random numbers: the arm and variant comparisons are far less noisy).
    """
    from visrec.sim.demo_data import tap_probability

    query = hidden[session.query_item_id]
    probs = np.array([tap_probability(query, hidden[item], pos) for pos, item in enumerate(served)])
    uniforms = np.random.default_rng([seed, TAP_STREAM, 1 + session.index]).random(k)[:len(served)]
    return probs, (uniforms < probs).astype(np.int64)


def play_sessions(releases: dict[str, str], variant: RankingVariant, sessions: Sequence[Session],
                  hidden: dict[str, dict], k: int, seed: int, log_dir: Path) -> list[dict]:
    """Serve both arms with `variant`'s flags and replay every session against its arm's server."""
    import httpx

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request otherwise
    log_name = variant.name.replace(" ", "_").replace("+", "and")
    records = []
    with contextlib.ExitStack() as stack:
        servers = {arm: stack.enter_context(ServeProcess(releases[arm], variant.serve_flags(),
                                                         log_dir / f"{log_name}-{arm}.log",
                                                         env={"OMP_NUM_THREADS": "1"}))
                   for arm in ARMS}
        for server in servers.values():  # both load their release meanwhile
            server.wait_healthy()
        client = stack.enter_context(httpx.Client(timeout=30.0))
        started = time.monotonic()
        for s in sessions:
            t = time.perf_counter()
            response = client.get(f"{servers[s.arm].url}/v1/items/{s.query_item_id}/similar", params={"k": k})
            latency = (time.perf_counter() - t) * 1000
            if response.status_code != 200:
                raise RuntimeError(f"{variant.name}/{s.arm}: GET similar for {s.query_item_id} answered "
                                   f"{response.status_code}: {response.text[:200]}")
            served = [item["item_id"] for item in response.json()["items"]]
            probs, taps = simulate_taps(hidden, s, served, seed, k)
            records.append({"variant": variant.name, "user_id": s.user_id, "arm": s.arm,
                            "impressions": len(served), "taps": int(taps.sum()),
                            "expected_taps": float(probs.sum()), "latency_ms": latency})
        seconds = time.monotonic() - started
        log.info("A/B %s: %d sessions in %.1fs (%.0f req/s)", variant.name, len(sessions), seconds,
                 len(sessions) / max(seconds, 1e-9))
    return records

"""Simulated users on a real service: page views of similar items, taps drawn by the synthetic
marketplace's hidden user model (`visrec.sim.demo_data.tap_probability`) and reported back through
`POST /v1/events`, as a marketplace's app would. What the A/B tests and the closed-loop demo drive."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from visrec.sim.demo_data import tap_probability

PURCHASE_RATE = 0.2  # of taps that end in a purchase (the hidden model has no purchase part of its own)


@dataclass
class ArmTraffic:
    """What one arm served: impressions, taps and the taps the hidden model expected."""

    impressions: int = 0
    taps: int = 0
    expected_taps: float = 0.0

    @property
    def expected_ctr(self) -> float:
        return self.expected_taps / self.impressions if self.impressions else float("nan")


@dataclass
class Traffic:
    """Per arm (`None`: requests outside any experiment) what the simulated users saw and did."""

    arms: dict[str | None, ArmTraffic] = field(default_factory=dict)

    def implied_uplift(self, control: str = "control", treatment: str = "treatment") -> float:
        """The treatment's relative CTR change the hidden model implies for what each arm served."""
        return self.arms[treatment].expected_ctr / self.arms[control].expected_ctr - 1.0


def drive_users(url: str, hidden: dict[str, dict], queries: Sequence[str], users: int, sessions: int,
                token: str, seed: int = 0, k: int = 8) -> Traffic:
    """`users` x `sessions` page views of random `queries` as `user_id`s, taps drawn by the hidden
    model per shown position, reported with the answer's `request_id` (a tapped item is bought with
    `PURCHASE_RATE`)."""
    import httpx

    rng = np.random.default_rng(seed)
    traffic = Traffic()
    headers = {"Authorization": f"Bearer {token}"}
    with httpx.Client(base_url=url, timeout=30) as client:
        for u in range(users):
            user = f"user-{u:06d}"
            for _ in range(sessions):
                query = queries[int(rng.integers(len(queries)))]
                response = client.get(f"/v1/items/{query}/similar", params={"k": k, "user_id": user})
                if response.status_code != 200:
                    continue  # an item the release does not hold: a real user would see no list
                answer = response.json()
                served = [row["item_id"] for row in answer["items"]]
                probs = np.array([tap_probability(hidden[query], hidden[item], position)
                                  for position, item in enumerate(served)])
                taps = rng.random(len(served)) < probs
                arm = traffic.arms.setdefault(answer.get("arm"), ArmTraffic())
                arm.impressions += len(served)
                arm.expected_taps += float(probs.sum())
                arm.taps += int(taps.sum())
                events = [{"request_id": answer["request_id"], "item_id": item, "type": kind, "user_id": user}
                          for item, tapped in zip(served, taps) if tapped
                          for kind in ("tap", *(("purchase",) if rng.random() < PURCHASE_RATE else ()))]
                if events:
                    posted = client.post("/v1/events", json={"events": events}, headers=headers)
                    posted.raise_for_status()
    return traffic

"""`ExperimentConfig` and `ReportConfig`: the settings of `visrec experiment` and `visrec ab-report`,
the only place their defaults are written."""

from __future__ import annotations

from dataclasses import dataclass

from visrec.core.errors import UserError


@dataclass(frozen=True)
class ExperimentConfig:
    """An A/B experiment between the release in production (control) and `treatment`.

    share: the fraction of users (or sessions, when a request names no user) assigned to the
        treatment. An A/B test needs a user to see one arm for the whole test, which Vertex AI
        endpoint traffic splits (per request) cannot give; the service assigns arms itself.
    salt: mixed into the assignment hash; a new salt reshuffles users, so consecutive
        experiments do not keep the same users in treatment.
    exploration: the share of answers that get one randomised slot (`explore_depth` positions
        deep), with its propensity logged, so the logs carry unbiased signal for the
        inverse-propensity-weighted metric (`visrec.stages.evaluate.metrics.ips_ndcg_at_k`).
    """

    treatment: str
    share: float = 0.5
    salt: str = ""
    exploration: float = 0.0
    explore_depth: int = 10

    def __post_init__(self) -> None:
        if not 0.0 < self.share < 1.0:
            raise UserError(f"--share must be in (0, 1), got {self.share}")
        if not 0.0 <= self.exploration <= 1.0:
            raise UserError(f"--exploration must be in [0, 1], got {self.exploration}")
        if self.explore_depth < 2:
            raise UserError(f"--explore-depth must be >= 2, got {self.explore_depth}")


@dataclass(frozen=True)
class ReportConfig:
    """`visrec ab-report` settings.

    logs: the service's log root (its `impressions/` and `events/` partitions).
    resamples: bootstrap resamples of users (the unit of assignment, so the unit of resampling).
    srm_alpha: a sample-ratio mismatch below this p-value makes the result untrustworthy
        (assignment or logging is broken): the recommendation is `stop` whatever the metrics say.
    min_users: fewer users in an arm than this -> `keep` (keep collecting).
    """

    logs: str
    out: str | None = None
    resamples: int = 2000
    seed: int = 0
    srm_alpha: float = 0.001
    min_users: int = 100

    def __post_init__(self) -> None:
        if self.resamples < 100:
            raise UserError(f"--resamples must be >= 100, got {self.resamples}")

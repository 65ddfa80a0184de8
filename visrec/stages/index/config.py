"""How stage 4 builds, tunes and gates an index: `IndexConfig`, the only place its defaults are written.

Kept apart from the searcher (ScaNN) so the CLI and the pipeline read the defaults without it.
"""

from __future__ import annotations

from dataclasses import dataclass

REORDER_DTYPES = ("float32", "bfloat16", "int8")


@dataclass
class IndexConfig:
    """How the index is built, tuned and gated.

    k: neighbours per query the recall target is measured at.
    recall_target: recall@k (vs exact search) the tuned search setting must reach.
    num_leaves: tree partitions; None = about sqrt(N), ScaNN's rule of thumb.
    reorder_dtype: precision of the re-ordering copy ScaNN keeps (float32 | bfloat16 | int8): 4 / 2 / 1
        bytes per dimension, the largest part of an item's memory. float32 by default: on low-
        dimensional embeddings with many near-duplicates (the demo's 2,000 x 32) bfloat16 rounding
        caps recall@10 at 0.72. On 128-d catalogue embeddings bfloat16 reaches 0.99 at 1M items for
        half the memory (what 10M items per replica need, docs/index.md); int8 caps recall at 0.965.
    max_p99_ms: gate on single-query p99 latency (None: no latency gate). 25 ms leaves room
        for the HTTP, filtering and re-ranking work inside a ~100 ms serving budget.
    tuning_queries: sample queries for tuning; as many again, disjoint, validate the choice.
    training_sample_size: vectors sampled to train the partitions and AH codebooks, at least.
    training_points_per_leaf: and at least this many per partition (capped at N): k-means with
        fewer places partitions so poorly that queries must search many more of them
        (`searcher.training_sample`; 10M items need a 790k sample).
    seed: sample-query selection.
    dims_per_block: AH block size (2 dims per 4-bit code: ScaNN's recommended lut16 setup).
    anisotropic_threshold: AH anisotropic quantisation threshold for dot product (ScaNN's 0.2).
    brute_force_below: indexes smaller than this are exact brute force (no partitions).
    """

    k: int = 10
    recall_target: float = 0.95
    num_leaves: int | None = None
    reorder_dtype: str = "float32"
    max_p99_ms: float | None = 25.0
    tuning_queries: int = 1000
    training_sample_size: int = 250_000
    training_points_per_leaf: int = 250
    seed: int = 0
    dims_per_block: int = 2
    anisotropic_threshold: float = 0.2
    brute_force_below: int = 2000

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError("k must be >= 1")
        if not 0.0 < self.recall_target <= 1.0:
            raise ValueError("recall_target must be in (0, 1]")
        if self.num_leaves is not None and self.num_leaves < 1:
            raise ValueError("num_leaves must be >= 1 (or None for about sqrt(N))")
        if self.reorder_dtype not in REORDER_DTYPES:
            raise ValueError(f"reorder_dtype must be one of {REORDER_DTYPES}, got {self.reorder_dtype!r}")
        if self.max_p99_ms is not None and self.max_p99_ms <= 0:
            raise ValueError("max_p99_ms must be > 0 (or None for no latency gate)")
        if min(self.tuning_queries, self.training_sample_size, self.training_points_per_leaf,
               self.dims_per_block) < 1:
            raise ValueError("tuning_queries, training_sample_size, training_points_per_leaf and dims_per_block "
                             "must be >= 1")


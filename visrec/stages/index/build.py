"""Stage 4: read the embeddings, build the index, tune it to its recall target, measure it,
gate it on recall and p99 latency, and save it with its metrics."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any

from visrec.core import io
from visrec.core.errors import GateFailed
from visrec.data.embeddings import read_embeddings
from visrec.stages.index.config import IndexConfig
from visrec.stages.index.searcher import MANIFEST, SimilarityIndex
from visrec.stages.index.tuning import measure_latency, sample_queries, tune_search_params

log = logging.getLogger(__name__)

METRICS = "metrics.json"


@dataclass(frozen=True)
class IndexResult:
    """What stage 4 measured; `as_dict()` is its `metrics.json` (these fields, in this order).

    passed / failures: the quality gate's verdict and why it failed. recall_at_k: on the
    held-out validation queries of `tuning` (its report: the chosen setting and the
    frontier measured on the way). p50_ms / p99_ms / qps_single: one `search` call per
    query, as serving sends them; qps_batched: batched search. params: the searcher's
    build and search parameters; config: the `IndexConfig` it was built with.
    """

    passed: bool
    failures: list[str]
    num_items: int
    dims: int
    k: int
    recall_target: float
    recall_at_k: float
    max_p99_ms: float | None
    p50_ms: float
    p99_ms: float
    qps_single: float
    qps_batched: float
    build_seconds: float
    params: dict[str, Any]
    tuning: dict[str, Any]
    config: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def build_index(embeddings_uri: str, out_dir: str, config: IndexConfig = IndexConfig()) -> IndexResult:
    """Stage 4: read embeddings, build, tune, measure, gate, save; returns what was measured.

    The result (`passed`, recall, latency, the tuning frontier) is also written to
    `out_dir/metrics.json`. On a failed gate only that file is written (no index, so
    nothing downstream can pick up a failed build) and `GateFailed` is raised.
    """
    ids, vectors = read_embeddings(embeddings_uri)
    log.info("read %d embeddings of %d dims from %s", len(ids), vectors.shape[1], embeddings_uri)
    index = SimilarityIndex.build(ids, vectors, config)
    tuning = tune_search_params(index, config)
    index.set_search_params(tuning.params)
    queries = sample_queries(index, min(config.tuning_queries, len(index)), config.k, config.seed + 1).vectors
    latency = measure_latency(index, queries, config.k)
    failures = []
    if not tuning.met:
        failures.append(f"recall@{config.k} {tuning.recall_at_k:.4f} < target {config.recall_target} "
                        "at every search setting tried")
    if config.max_p99_ms is not None and latency["p99_ms"] > config.max_p99_ms:
        failures.append(f"p99 latency {latency['p99_ms']:.2f} ms > bound {config.max_p99_ms} ms")
    result = IndexResult(passed=not failures, failures=failures, num_items=len(index), dims=index.dims,
                         k=config.k, recall_target=config.recall_target, recall_at_k=tuning.recall_at_k,
                         max_p99_ms=config.max_p99_ms, **latency, build_seconds=index.info["build_seconds"],
                         params=index.params, tuning=tuning.report(), config=asdict(config))
    index.info.update(recall_at_k=tuning.recall_at_k, tuning=tuning.report(),
                      **{key: latency[key] for key in ("p50_ms", "p99_ms", "qps_batched")})
    if failures:
        io.remove(io.join(out_dir, MANIFEST))
        io.write_json(io.join(out_dir, METRICS), result.as_dict())
        raise GateFailed("index quality gate: " + "; ".join(failures))
    index.save(out_dir, extra_files={METRICS: result.as_dict()})
    log.info("index gate passed: recall@%d %.4f, p50 %.2f ms, p99 %.2f ms, %.0f QPS batched",
             config.k, tuning.recall_at_k, latency["p50_ms"], latency["p99_ms"], latency["qps_batched"])
    return result

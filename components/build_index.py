"""KFP component for stage 4: the ScaNN index, tuned to a recall target and gated."""

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Metrics, Output

from components.images import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def build_index(
    embeddings: Input[Dataset],
    recall_target: float,
    k: int,
    max_p99_ms: float,
    seed: int,
    index: Output[Artifact],
    metrics: Output[Metrics],
):
    """Build, tune and gate the index (`visrec.stages.index.build.build_index`); other settings are
    `IndexConfig`'s; max_p99_ms 0 = no latency gate. A failed gate logs its metrics and
    fails the task."""
    from components.artifacts import location, log_metrics
    from visrec.core import io
    from visrec.core.errors import GateFailed
    from visrec.stages.index.build import METRICS
    from visrec.stages.index.build import build_index as build
    from visrec.stages.index.config import IndexConfig
    from visrec.orchestration.pipeline_config import from_kfp

    config = IndexConfig(**from_kfp(IndexConfig, k=k, recall_target=recall_target, max_p99_ms=max_p99_ms, seed=seed))
    out = location(index)
    try:
        result = build(location(embeddings), out, config)
    except GateFailed:
        log_metrics(metrics, {key: value for key, value in io.read_json(io.join(out, METRICS)).items()
                              if key != "tuning"})
        raise
    log_metrics(metrics, {key: value for key, value in result.as_dict().items() if key != "tuning"})
    index.metadata.update({"num_items": result.num_items, "dims": result.dims,
                           "recall_at_k": result.recall_at_k, "p99_ms": result.p99_ms})

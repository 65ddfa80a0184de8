"""KFP component for stage 1: dataset preparation (Apache Beam, DirectRunner or Dataflow)."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Output

from components.images import BEAM_IMAGE


@dsl.component(base_image=BEAM_IMAGE, install_kfp_package=False)
def prepare_dataset(
    listings: Input[Dataset],
    data_fingerprint: str,
    max_pairs: int,
    val_fraction: float,
    seed: int,
    image_size: int,
    shards: int,
    runner: str,
    beam_options: list,
    pipeline_job: str,
    pipeline_task: str,
    dataset: Output[Dataset],
    metrics: Output[Metrics],
) -> int:
    """Run `visrec.stages.prepare.run_prepare` on the resolved `listings` into `dataset`; return the
    number of training pairs. Settings are `PrepareConfig`'s (max_pairs 0 = keep every pair).

    `data_fingerprint` (the resolver's fingerprint of the listings) is this task's cache key
    for the data: same data, same key. `beam_options`: extra Beam flags (for Dataflow:
    `--project`, `--region`, `--temp_location`, `--sdk_container_image`). On Dataflow the
    job is named after `pipeline_job` and `pipeline_task`, so a retried task waits on the job
    it already started (`visrec.stages.dataflow`). `metrics` receives every count of stats.json
    (`rejected.<reason>` per rejection reason).
    """
    from components.artifacts import location, log_metrics
    from visrec.orchestration.pipeline_config import from_kfp
    from visrec.stages.configs import PrepareConfig
    from visrec.stages.dataflow import task_options
    from visrec.stages.prepare import run_prepare

    stats = run_prepare(PrepareConfig(
        listings_uri=location(listings), out_dir=location(dataset), runner=runner,
        beam_options=task_options(runner, beam_options, pipeline_job, pipeline_task),
        **from_kfp(PrepareConfig, max_pairs=max_pairs, val_fraction=val_fraction, seed=seed, image_size=image_size,
                   shards=shards)))
    log_metrics(metrics, stats.as_dict())
    dataset.metadata.update({"data_fingerprint": data_fingerprint, "train_pairs": stats.train_pairs,
                             "val_pairs": stats.val_pairs})
    return stats.train_pairs

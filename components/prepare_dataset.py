"""KFP component for stage 1: dataset preparation (Apache Beam, DirectRunner or Dataflow)."""

from kfp import dsl
from kfp.dsl import Dataset, Metrics, Output

from components.images import BEAM_IMAGE


@dsl.component(base_image=BEAM_IMAGE, install_kfp_package=False)
def prepare_dataset(
    listings_uri: str,
    max_pairs: int,
    val_fraction: float,
    seed: int,
    image_size: int,
    runner: str,
    beam_options: list,
    dataset: Output[Dataset],
    metrics: Output[Metrics],
    data_snapshot: str = "",
) -> int:
    """Run `visrec.prepare.run_prepare` into the `dataset` artifact; return the number of training pairs.

    `max_pairs`: 0 keeps every pair. `beam_options`: extra Beam flags (for Dataflow:
    `--project`, `--region`, `--temp_location`, `--sdk_container_image`). `metrics`
    receives every count of stats.json (`rejected.<reason>` per rejection reason).
    `data_snapshot` (the input data's version) is part of the cache key and recorded on the output.
    """
    from components.artifacts import location, log_metrics
    from visrec.prepare import PrepareConfig, run_prepare

    stats = run_prepare(PrepareConfig(
        listings_uri=listings_uri, out_dir=location(dataset), max_pairs=max_pairs or None,
        val_fraction=val_fraction, seed=seed, image_size=image_size, runner=runner,
        beam_options=[str(flag) for flag in beam_options]))
    log_metrics(metrics, stats)
    dataset.metadata.update({"data_snapshot": data_snapshot, "train_pairs": stats["train_pairs"],
                             "val_pairs": stats["val_pairs"]})
    return stats["train_pairs"]

"""KFP components around the run's inputs: resolving the data version, recording how the run ended,
and grouping scheduled runs into a Vertex AI Experiment."""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Artifact, Output

from components.images import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def resolve_data(
    listings_uri: str,
    interactions_uri: str,
    partition_key: str,
    done_marker: str,
    resolved: Output[Artifact],
) -> NamedTuple("ResolvedData", [("listings_uri", str), ("listings_fingerprint", str),
                                 ("interactions_uri", str), ("interactions_fingerprint", str)]):
    """Resolve both inputs to what this run reads (`visrec.data.datasource.resolve_input`): a file, a
    prefix, or a prefix's newest complete `<partition_key>=<value>/` partition, and a fingerprint
    of exactly those files. Never cached: the data tasks take the fingerprints as inputs, so
    unchanged data is a cache hit and changed data is recomputed. `resolved` holds both
    resolutions as JSON (and as metadata)."""
    import json
    import os
    from collections import namedtuple

    from visrec.data.datasource import ResolveConfig, resolve_input

    config = ResolveConfig(partition_key=partition_key, done_marker=done_marker)
    listings = resolve_input(listings_uri, config)
    interactions = resolve_input(interactions_uri, config)
    both = {"listings": listings.as_dict(), "interactions": interactions.as_dict()}
    os.makedirs(os.path.dirname(resolved.path) or ".", exist_ok=True)
    with open(resolved.path, "w") as fh:
        json.dump(both, fh, indent=2)
    resolved.metadata.update({f"{name}_{key}": value[key] for name, value in both.items()
                              for key in ("uri", "fingerprint", "files", "partition") if value[key] is not None})
    out = namedtuple("ResolvedData", ["listings_uri", "listings_fingerprint", "interactions_uri",
                                      "interactions_fingerprint"])
    return out(listings.uri, listings.fingerprint, interactions.uri, interactions.fingerprint)


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def record_run(registry: str, listings_uri: str, data_snapshot: str, pipeline_job_name: str,
               status: dsl.PipelineTaskFinalStatus) -> str:
    """The exit handler: append how the run ended (and which tasks failed) to the registry's
    runs.jsonl (`visrec.orchestration.runs.record_run`), success or failure, so `visrec runs` shows a failed
    scheduled retraining. Returns the final state. `pipeline_job_name` names the run where the
    status has no Vertex AI resource name (kfp.local)."""
    from visrec.orchestration.runs import record_run as record

    job = status.pipeline_job_resource_name
    record(registry, state=status.state, pipeline_job=job if "/pipelineJobs/" in job else pipeline_job_name,
           error=status.error_message, parameters={"listings_uri": listings_uri, "data_snapshot": data_snapshot})
    return status.state


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def join_experiment(experiment: str, pipeline_job: str):
    """Attach this run to a Vertex AI Experiment, so scheduled retrainings (whose requests cannot
    name one) line up beside each other with their gate metrics (`visrec.orchestration.vertex_pipelines`)."""
    from visrec.orchestration.vertex_pipelines import associate_with_experiment

    associate_with_experiment(pipeline_job, experiment)

"""KFP component for stage 6: publish the release (and deploy it on Vertex AI when asked)."""

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Model, Output

from components.images import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def deploy(
    decision: str,
    model: Input[Model],
    embeddings: Input[Dataset],
    index: Input[Artifact],
    evaluation: Input[Artifact],
    listings_uri: str,
    registry: str,
    require_approval: bool,
    target: str,
    release: Output[Artifact],
    project: str = "",
    region: str = "",
    serving_image: str = "",
    parent_model: str = "",
    endpoint: str = "",
    machine_type: str = "n1-standard-4",
    min_replicas: int = 1,
    max_replicas: int = 2,
    canary_percent: int = 10,
) -> str:
    """Run `visrec.release.deploy_release`; return its status (deployed | pending | unchanged | refused).

    `decision` is the evaluation component's output; the library re-checks the gate in
    `evaluation`'s metrics.json as well, so a rejected candidate is refused even when
    this component is wired up without the pipeline's branch. `model` is a `visrec
    train` output (its `model/` directory is used) or a model directory itself.
    `release` receives the outcome as JSON and metadata (version, status, path).
    """
    import json
    import logging
    import os

    from components.artifacts import location, trained_model_dir
    from visrec import io
    from visrec.release import REFUSED, DeployConfig, deploy_release
    from visrec.vertex import VertexDeployConfig

    log = logging.getLogger("deploy")
    model_dir = trained_model_dir(model)
    if decision != "deploy":
        result = {"status": REFUSED, "version": None, "path": None,
                  "message": f"the evaluation decided {decision!r}; a rejected candidate is never deployed"}
        log.error(result["message"])
    else:
        vertex = None
        if target == "vertex":
            vertex = VertexDeployConfig(project=project, region=region, serving_image=serving_image,
                                        parent_model=parent_model or None, endpoint=endpoint or None,
                                        machine_type=machine_type, min_replica_count=min_replicas,
                                        max_replica_count=max_replicas, canary_percent=canary_percent)
        result = deploy_release(DeployConfig(
            registry=registry, model_dir=model_dir, embeddings_dir=location(embeddings),
            index_dir=location(index), listings_uri=listings_uri,
            metrics_uri=io.join(location(evaluation), "metrics.json"), require_approval=require_approval,
            target=target, vertex=vertex))
    os.makedirs(os.path.dirname(release.path) or ".", exist_ok=True)
    with open(release.path, "w") as fh:
        json.dump(result, fh, indent=2)
    release.metadata.update({k: result[k] for k in ("status", "version", "path") if result[k] is not None})
    return result["status"]

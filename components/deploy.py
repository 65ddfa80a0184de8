"""KFP component for stage 6: publish the release (and register and roll it out on Vertex AI)."""

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Model, Output

from components.artifacts import VertexModel
from components.images import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def deploy(
    decision: str,
    model: Input[Model],
    embeddings: Input[Dataset],
    index: Input[Artifact],
    evaluation: Input[Artifact],
    listings: Input[Dataset],
    registry: str,
    require_approval: bool,
    target: str,
    project: str,
    region: str,
    serving_image: str,
    model_id: str,
    endpoint_id: str,
    machine_type: str,
    min_replicas: int,
    max_replicas: int,
    canary_percent: int,
    serving_service_account: str,
    serving_admin_token_uri: str,
    release: Output[Artifact],
    vertex_model: Output[VertexModel],
) -> str:
    """Run `visrec.stages.release.deploy.deploy_release`; return its status (deployed | canary | pending |
    unchanged | refused).

    `decision` is the evaluation component's output; the library re-checks the gate in
    `evaluation`'s metrics.json as well, so a rejected candidate is refused even when
    this component is wired up without the pipeline's branch. `model` is a `visrec
    train` output (its `model/` directory is used) or a model directory itself. With target
    `vertex` the release becomes a version of the parent model `model_id` and, unless it
    waits for approval, is rolled out on `endpoint_id` (`VertexDeployConfig`; '' = unset).
    `release` receives the outcome as JSON and metadata (version, status, path);
    `vertex_model` the registered model version, so Vertex ML Metadata links run -> version.
    """
    import json
    import logging
    import os

    from components.artifacts import location, trained_model_dir, vertex_model_uri
    from visrec.core import io
    from visrec.stages.release.deploy import DeployConfig, DeployResult, deploy_release
    from visrec.stages.release.registry import read_manifest
    from visrec.stages.release.release import REFUSED
    from visrec.stages.release.vertex import VertexDeployConfig

    log = logging.getLogger("deploy")
    model_dir = trained_model_dir(model)
    if decision != "deploy":
        result = DeployResult(status=REFUSED, version=None, path=None,
                              message=f"the evaluation decided {decision!r}; a rejected candidate is never deployed")
        log.error(result.message)
    else:
        vertex = None
        if target == "vertex":
            vertex = VertexDeployConfig(project=project, region=region, serving_image=serving_image,
                                        model_id=model_id, endpoint_id=endpoint_id, machine_type=machine_type,
                                        min_replica_count=min_replicas, max_replica_count=max_replicas,
                                        canary_percent=canary_percent, service_account=serving_service_account or None,
                                        admin_token_uri=serving_admin_token_uri or None)
        result = deploy_release(DeployConfig(
            registry=registry, model_dir=model_dir, embeddings_dir=location(embeddings),
            index_dir=location(index), listings_uri=location(listings),
            metrics_uri=io.join(location(evaluation), "metrics.json"), require_approval=require_approval,
            target=target, vertex=vertex))
    os.makedirs(os.path.dirname(release.path) or ".", exist_ok=True)
    with open(release.path, "w") as fh:
        json.dump(result.as_dict(), fh, indent=2)
    release.metadata.update({k: v for k, v in (("status", result.status), ("version", result.version),
                                               ("path", result.path)) if v is not None})
    registered = None
    if result.version and result.status != REFUSED:
        registered = read_manifest(registry, result.version).get("vertex")
    if registered:
        name = f"{registered['model']}@{registered['model_version_id']}"
        vertex_model.uri = vertex_model_uri(registered["region"], name)
        vertex_model.metadata.update({"resourceName": name, "release": result.version})
    return result.status

"""Deploying a release to a Vertex AI endpoint: upload as a model version, canary, then full traffic.

The requests are built by pure functions (`upload_kwargs`, `deploy_kwargs`,
`full_traffic_split`), tested field by field; the thin
`deploy_to_vertex` / `shift_traffic` wrappers hand them to `google-cloud-aiplatform`,
which is what a user runs with credentials. The serving container
(`containers/serving`) finds the release through `AIP_STORAGE_URI`, which Vertex
sets to a copy of the model's `artifact_uri`, and listens on `AIP_HTTP_PORT`.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Any

from visrec.errors import UserError

log = logging.getLogger(__name__)

_ALIAS = re.compile(r"^[a-z][a-z0-9-]{0,126}[a-z0-9]$")


@dataclass
class VertexDeployConfig:
    """Where and how a release is served on Vertex AI.

    serving_image: the serving container image URI (`components.images.SERVING_IMAGE`
        in a pipeline; the library takes it as a plain string).
    parent_model: resource name of the model this release becomes a new version of
        (None: the first upload creates the model).
    version_aliases: extra aliases for the new version; `release-<version>` is always added.
    endpoint: resource name of the endpoint to deploy to (None: create one named
        `endpoint_display_name`).
    canary_percent: share of traffic the new version gets first; 100 (or an endpoint
        with nothing deployed yet) skips the canary step.
    full_after_canary: after the canary deployment is serving, move all traffic to it.
        False leaves it at `canary_percent` for a human to promote in the console.
    """

    project: str
    region: str
    serving_image: str
    model_display_name: str = "visrec-similar-items"
    parent_model: str | None = None
    version_aliases: tuple[str, ...] = ()
    endpoint: str | None = None
    endpoint_display_name: str = "visrec-similar-items"
    machine_type: str = "n1-standard-4"
    min_replica_count: int = 1
    max_replica_count: int = 2
    canary_percent: int = 10
    full_after_canary: bool = True
    service_account: str | None = None
    port: int = 8080
    health_route: str = "/healthz"
    predict_route: str = "/predict"
    labels: dict[str, str] = field(default_factory=lambda: {"app": "visrec"})


def validate_config(config: VertexDeployConfig) -> None:
    """Fail with a clear message before any request is sent."""
    for name in ("project", "region", "serving_image"):
        if not getattr(config, name):
            raise UserError(f"Vertex deployment needs --{name.replace('_', '-')}")
    if not 0 < config.canary_percent <= 100:
        raise UserError(f"canary percent must be in 1..100, got {config.canary_percent}")
    if not 1 <= config.min_replica_count <= config.max_replica_count:
        raise UserError(f"need 1 <= min replicas ({config.min_replica_count}) "
                        f"<= max replicas ({config.max_replica_count})")
    for alias in config.version_aliases:
        if not _ALIAS.match(alias):
            raise UserError(f"invalid version alias {alias!r}: lower-case letters, digits and '-', "
                            "starting with a letter")


def release_alias(version: str) -> str:
    """The version alias naming a release (`release-<version>`, made alias-safe)."""
    alias = re.sub(r"[^a-z0-9-]+", "-", f"release-{version}".lower()).strip("-")
    return alias[:128]


def upload_kwargs(config: VertexDeployConfig, artifact_uri: str, version: str) -> dict[str, Any]:
    """Keyword arguments for `aiplatform.Model.upload(...)`: the release as a new model version."""
    validate_config(config)
    if not artifact_uri.startswith("gs://"):
        raise UserError(f"Vertex needs the release on gs://, got {artifact_uri!r} (use a gs:// --registry)")
    aliases = [release_alias(version)] + [a for a in config.version_aliases if a != release_alias(version)]
    kwargs: dict[str, Any] = {
        "display_name": config.model_display_name,
        "artifact_uri": artifact_uri,
        "serving_container_image_uri": config.serving_image,
        "serving_container_ports": [config.port],
        "serving_container_health_route": config.health_route,
        "serving_container_predict_route": config.predict_route,
        "serving_container_environment_variables": {"VISREC_HOST": "0.0.0.0"},
        "version_aliases": aliases,
        "version_description": f"visrec release {version}",
        # The new version becomes the default only once it takes all traffic.
        "is_default_version": config.canary_percent == 100,
        "labels": dict(config.labels),
        "project": config.project,
        "location": config.region,
        "sync": True,
    }
    if config.parent_model:
        kwargs["parent_model"] = config.parent_model
    return kwargs


def deploy_kwargs(config: VertexDeployConfig, version: str, endpoint_has_traffic: bool) -> dict[str, Any]:
    """Keyword arguments for `Endpoint.deploy(model, ...)` (the model itself is passed separately).

    An endpoint that serves nothing yet gets the new version at 100%: there is
    nothing to compare a canary with.
    """
    validate_config(config)
    kwargs: dict[str, Any] = {
        "deployed_model_display_name": f"{config.model_display_name}-{release_alias(version)}",
        "traffic_percentage": config.canary_percent if endpoint_has_traffic else 100,
        "machine_type": config.machine_type,
        "min_replica_count": config.min_replica_count,
        "max_replica_count": config.max_replica_count,
        "sync": True,
    }
    if config.service_account:
        kwargs["service_account"] = config.service_account
    return kwargs


def full_traffic_split(deployed_model_ids: list[str], deployed_model_id: str) -> dict[str, int]:
    """A split sending 100% to `deployed_model_id` and 0% to every other deployed model."""
    split = {key: 0 for key in deployed_model_ids}
    split[deployed_model_id] = 100
    return split


def _aiplatform(config: VertexDeployConfig) -> Any:
    from google.cloud import aiplatform

    aiplatform.init(project=config.project, location=config.region)
    return aiplatform


def _endpoint(aiplatform: Any, config: VertexDeployConfig) -> Any:
    if config.endpoint:
        return aiplatform.Endpoint(config.endpoint)
    return aiplatform.Endpoint.create(display_name=config.endpoint_display_name, labels=dict(config.labels),
                                      project=config.project, location=config.region)


def _deployed_model_id(endpoint: Any, model: Any) -> str:
    """The id of the deployed model that serves `model`'s version on `endpoint`."""
    for deployed in endpoint.list_models():
        if deployed.model == model.resource_name and str(deployed.model_version_id) == str(model.version_id):
            return deployed.id
    raise RuntimeError(f"{model.resource_name}@{model.version_id} is not deployed on {endpoint.resource_name}")


def deploy_to_vertex(config: VertexDeployConfig, artifact_uri: str, version: str) -> dict[str, Any]:
    """Upload the release as a model version and deploy it (canary, then full traffic).

    Returns the resource names and traffic steps recorded in the release manifest.
    Earlier versions stay deployed at 0% so a rollback is a traffic shift, not a redeploy.
    """
    aiplatform = _aiplatform(config)
    model = aiplatform.Model.upload(**upload_kwargs(config, artifact_uri, version))
    log.info("uploaded %s version %s", model.resource_name, model.version_id)
    endpoint = _endpoint(aiplatform, config)
    has_traffic = any(p > 0 for p in (endpoint.traffic_split or {}).values())
    request = deploy_kwargs(config, version, has_traffic)
    endpoint.deploy(model, **request)
    deployed_id = _deployed_model_id(endpoint, model)
    steps = [{"percent": request["traffic_percentage"], "traffic_split": dict(endpoint.traffic_split)}]
    log.info("deployed %s to %s at %d%%", deployed_id, endpoint.resource_name, request["traffic_percentage"])
    if request["traffic_percentage"] < 100 and config.full_after_canary:
        ids = [d.id for d in endpoint.list_models()]
        endpoint.update(traffic_split=full_traffic_split(ids, deployed_id))
        steps.append({"percent": 100, "traffic_split": dict(endpoint.traffic_split)})
        log.info("moved all traffic to %s", deployed_id)
    return {
        "project": config.project,
        "region": config.region,
        "model": model.resource_name,
        "model_version_id": str(model.version_id),
        "version_aliases": upload_kwargs(config, artifact_uri, version)["version_aliases"],
        "endpoint": endpoint.resource_name,
        "deployed_model_id": deployed_id,
        "traffic_steps": steps,
    }


def shift_traffic(project: str, region: str, endpoint_name: str, deployed_model_id: str) -> dict[str, int]:
    """Send all of an endpoint's traffic to one already deployed model (used by rollback)."""
    from google.cloud import aiplatform

    aiplatform.init(project=project, location=region)
    endpoint = aiplatform.Endpoint(endpoint_name)
    ids = [d.id for d in endpoint.list_models()]
    if deployed_model_id not in ids:
        raise UserError(f"deployed model {deployed_model_id} is no longer on {endpoint_name}")
    endpoint.update(traffic_split=full_traffic_split(ids, deployed_model_id))
    return dict(endpoint.traffic_split)

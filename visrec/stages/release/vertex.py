"""Serving releases on Vertex AI: one parent model with a version per release, one endpoint.

The lifecycle, driven by `visrec.stages.release.deploy` and `visrec.stages.release.promote` (the
registry's `CURRENT` stays the source of truth):

- **register**: a release that passed the gate is uploaded as a new version of the parent
  model `model_id` (created on the first release), aliased `release-<version>`. Nothing is
  served yet, so a release waiting for approval is already in the Model Registry, linked to
  the pipeline run that produced it.
- **roll out**: the version is deployed on the endpoint `endpoint_id` (created when absent)
  at `canary_percent` of the traffic and aliased `challenger`; an endpoint that serves
  nothing yet, or `canary_percent` 100, gets it at 100% and it becomes the champion at once.
- **promote**: all traffic moves to the canary; the aliases `champion` and `default` move to
  its version; deployed models other than the champion and the `keep_previous` releases
  before it are undeployed, so idle min-1 replicas are not billed forever.
- **abort** (a rollback during a canary): all traffic back to the champion, the canary is
  undeployed and loses `challenger`.
- **restore** (a rollback, or a roll-forward): all traffic to an earlier release's deployed
  model, redeploying its version if it was undeployed; the champion aliases follow.

With `invoke_routes` (the default) the version is uploaded with
`serving_container_invoke_route_prefix="/*"` on a dedicated endpoint, so every route of the
service (similar items, writes, reload, metrics) is reachable through the endpoint's
`invoke` API (`docs/google-cloud.md`). Requests are built by pure functions (`*_kwargs`)
and sent through the real `google-cloud-aiplatform` classes; tests record the GAPIC requests.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from typing import Any

from visrec.core.errors import UserError

log = logging.getLogger(__name__)

CHAMPION = "champion"
CHALLENGER = "challenger"
DEFAULT = "default"

_ALIAS = re.compile(r"^[a-z][a-z0-9-]{0,126}[a-z0-9]$")
_MODEL_ID = re.compile(r"^[a-z_][a-z0-9_-]{0,62}$")
_ENDPOINT_ID = re.compile(r"^([a-z][a-z0-9-]{0,61}[a-z0-9]|[1-9][0-9]{0,8})$")


@dataclass
class VertexDeployConfig:
    """Where and how releases are served on Vertex AI (the only place these defaults are written).

    serving_image: the serving container image URI (`components.images.SERVING_IMAGE` in a
        pipeline). model_id / endpoint_id: fixed IDs of the parent model and the endpoint,
        created by the first release and reused by every later one.
    canary_percent: the new version's share of traffic until `visrec promote`; 100 deploys
        in one step. keep_previous: releases before the champion that stay deployed at 0%,
        so a rollback is a traffic shift; older ones are undeployed.
    service_account: what the serving container runs as (it writes the registry's `state/`).
    admin_token_uri: a file or `gs://` object holding the write endpoints' token, read by the
        container at start (`VISREC_ADMIN_TOKEN_URI`); None = writes disabled on Vertex AI.
    invoke_routes: expose every route through the `invoke` API (needs a dedicated endpoint;
        Vertex then disables `:predict`, and `/predict` is reached as `invoke/predict`).
    request_logging_sampling_rate: share of requests Vertex logs to BigQuery (0 = off), into
        `request_logging_bq_table` (`bq://project.dataset.table`; None = Vertex's default table).
    """

    project: str
    region: str
    serving_image: str
    model_id: str = "visrec-similar-items"
    model_display_name: str = "visrec-similar-items"
    endpoint_id: str = "visrec-similar-items"
    endpoint_display_name: str = "visrec-similar-items"
    version_aliases: tuple[str, ...] = ()
    machine_type: str = "n1-standard-4"
    min_replica_count: int = 1
    max_replica_count: int = 2
    canary_percent: int = 10
    keep_previous: int = 1
    service_account: str | None = None
    admin_token_uri: str | None = None
    invoke_routes: bool = True
    request_logging_sampling_rate: float = 0.0
    request_logging_bq_table: str | None = None
    port: int = 8080
    health_route: str = "/healthz"
    predict_route: str = "/predict"
    labels: dict[str, str] = field(default_factory=lambda: {"app": "visrec"})

    @classmethod
    def from_dict(cls, settings: dict[str, Any]) -> VertexDeployConfig:
        """The config a release's manifest keeps (`dataclasses.asdict`; JSON made the aliases a list)."""
        return cls(**{**settings, "version_aliases": tuple(settings.get("version_aliases") or ())})

    def __post_init__(self) -> None:
        """Fail with a clear message before any request is sent."""
        for name in ("project", "region", "serving_image"):
            if not getattr(self, name):
                raise UserError(f"Vertex deployment needs --{name.replace('_', '-')}")
        if not _MODEL_ID.match(self.model_id):
            raise UserError(f"invalid model id {self.model_id!r}: up to 63 of [a-z0-9_-], not starting with "
                            "a digit or '-'")
        if not _ENDPOINT_ID.match(self.endpoint_id):
            raise UserError(f"invalid endpoint id {self.endpoint_id!r}: [a-z0-9-] starting with a letter, "
                            "or up to 9 digits")
        if not 0 < self.canary_percent <= 100:
            raise UserError(f"canary percent must be in 1..100, got {self.canary_percent}")
        if self.keep_previous < 0:
            raise UserError(f"keep_previous must be >= 0, got {self.keep_previous}")
        if not 1 <= self.min_replica_count <= self.max_replica_count:
            raise UserError(f"need 1 <= min replicas ({self.min_replica_count}) "
                            f"<= max replicas ({self.max_replica_count})")
        if not 0.0 <= self.request_logging_sampling_rate <= 1.0:
            raise UserError(f"request logging sampling rate must be in [0, 1], got {self.request_logging_sampling_rate}")
        for alias in self.version_aliases:
            if not _ALIAS.match(alias) or alias in (CHAMPION, CHALLENGER, DEFAULT):
                raise UserError(f"invalid version alias {alias!r}: lower-case letters, digits and '-', starting with "
                                f"a letter, and not one visrec moves itself ({CHAMPION}, {CHALLENGER}, {DEFAULT})")


def model_name(config: VertexDeployConfig) -> str:
    return f"projects/{config.project}/locations/{config.region}/models/{config.model_id}"


def endpoint_name(config: VertexDeployConfig) -> str:
    return f"projects/{config.project}/locations/{config.region}/endpoints/{config.endpoint_id}"


def release_alias(version: str) -> str:
    """The version alias naming a release (`release-<version>`, made alias-safe)."""
    alias = re.sub(r"[^a-z0-9-]+", "-", f"release-{version}".lower()).strip("-")
    return alias[:128]


# ---- requests ---------------------------------------------------------------------------------


def upload_kwargs(config: VertexDeployConfig, artifact_uri: str, version: str, first: bool) -> dict[str, Any]:
    """Keyword arguments for `aiplatform.Model.upload(...)`: the release as a version of the parent model.

    `first`: the parent model does not exist yet, so this upload creates it (`model_id`) and
    its version is the default one; a later version becomes default only when promoted.
    """
    if not artifact_uri.startswith("gs://"):
        raise UserError(f"Vertex needs the release on gs://, got {artifact_uri!r} (use a gs:// --registry)")
    aliases = [release_alias(version)] + [a for a in config.version_aliases if a != release_alias(version)]
    environment = {"VISREC_HOST": "0.0.0.0"}
    if config.admin_token_uri:
        environment["VISREC_ADMIN_TOKEN_URI"] = config.admin_token_uri
    kwargs: dict[str, Any] = {
        "display_name": config.model_display_name,
        "artifact_uri": artifact_uri,
        "serving_container_image_uri": config.serving_image,
        "serving_container_ports": [config.port],
        "serving_container_health_route": config.health_route,
        "serving_container_environment_variables": environment,
        "version_aliases": aliases,
        "version_description": f"visrec release {version}",
        "is_default_version": first,
        "labels": dict(config.labels),
        "project": config.project,
        "location": config.region,
        "sync": True,
    }
    # Vertex takes one of the two: the invoke prefix disables the predict route.
    if config.invoke_routes:
        kwargs["serving_container_invoke_route_prefix"] = "/*"
    else:
        kwargs["serving_container_predict_route"] = config.predict_route
    if first:
        kwargs["model_id"] = config.model_id
    else:
        kwargs["parent_model"] = model_name(config)
    return kwargs


def endpoint_kwargs(config: VertexDeployConfig) -> dict[str, Any]:
    """Keyword arguments for `aiplatform.Endpoint.create(...)` (the first release creates the endpoint)."""
    kwargs: dict[str, Any] = {
        "endpoint_id": config.endpoint_id,
        "display_name": config.endpoint_display_name,
        "labels": dict(config.labels),
        "dedicated_endpoint_enabled": config.invoke_routes,
        "project": config.project,
        "location": config.region,
        "sync": True,
    }
    if config.request_logging_sampling_rate > 0:
        kwargs.update(enable_request_response_logging=True,
                      request_response_logging_sampling_rate=config.request_logging_sampling_rate,
                      request_response_logging_bq_destination_table=config.request_logging_bq_table)
    return kwargs


def deploy_kwargs(config: VertexDeployConfig, version: str, endpoint_has_traffic: bool) -> dict[str, Any]:
    """Keyword arguments for `Endpoint.deploy(model, ...)` (the model itself is passed separately).

    An endpoint that serves nothing yet gets the new version at 100%: there is nothing to
    compare a canary with.
    """
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


def to_undeploy(deployed_model_ids: list[str], keep: list[str]) -> list[str]:
    """The deployed models that are neither the champion nor one of the kept releases."""
    return [key for key in deployed_model_ids if key not in set(keep)]


# ---- calls ------------------------------------------------------------------------------------


def aiplatform_for(project: str, region: str) -> Any:
    """The `google.cloud.aiplatform` module, initialised for `project` / `region`."""
    from google.cloud import aiplatform

    aiplatform.init(project=project, location=region)
    return aiplatform


def _get(cls: Any, name: str) -> Any | None:
    """`cls(name)` read from Vertex AI, or None when there is no such resource."""
    from google.api_core.exceptions import NotFound

    try:
        resource = cls(name)
        if hasattr(resource, "traffic_split"):
            resource.traffic_split  # noqa: B018 - an Endpoint is read lazily: read it now
        return resource
    except NotFound:
        return None


def _endpoint(aiplatform: Any, config: VertexDeployConfig) -> Any:
    endpoint = _get(aiplatform.Endpoint, endpoint_name(config))
    if endpoint is None:
        endpoint = aiplatform.Endpoint.create(**endpoint_kwargs(config))
        log.info("created endpoint %s", endpoint.resource_name)
    return endpoint


def _deployed_model_id(endpoint: Any, model: Any) -> str:
    """The id of the deployed model that serves `model`'s version on `endpoint`."""
    for deployed in endpoint.list_models():
        if deployed.model == model.resource_name and str(deployed.model_version_id) == str(model.version_id):
            return deployed.id
    raise RuntimeError(f"{model.resource_name}@{model.version_id} is not deployed on {endpoint.resource_name}")


def _set_aliases(model: Any, version_id: str, aliases: list[str]) -> None:
    """Merge `aliases` ("x" adds or moves x here, "-x" removes it) on one version of `model`."""
    model.versioning_registry.add_version_aliases(aliases, version=version_id)


def _undeploy_old(endpoint: Any, keep: list[str]) -> list[str]:
    """Undeploy every deployed model of `endpoint` not in `keep` (all of them at 0% by now)."""
    removed = to_undeploy([d.id for d in endpoint.list_models()], keep)
    for deployed_id in removed:
        endpoint.undeploy(deployed_id)
        log.info("undeployed %s from %s", deployed_id, endpoint.resource_name)
    return removed


def register_version(config: VertexDeployConfig, artifact_uri: str, version: str) -> dict[str, Any]:
    """Upload the release as a new version of the parent model (creating it on the first release).

    Returns the record kept under `vertex` in the release manifest.
    """
    aiplatform = aiplatform_for(config.project, config.region)
    first = _get(aiplatform.Model, model_name(config)) is None
    request = upload_kwargs(config, artifact_uri, version, first)
    aliases = list(request["version_aliases"])  # the SDK appends "default" to the list it is given
    model = aiplatform.Model.upload(**request)
    log.info("uploaded %s version %s", model.resource_name, model.version_id)
    return {"release": version, "project": config.project, "region": config.region, "model": model.resource_name,
            "model_version_id": str(model.version_id), "version_aliases": aliases,
            "endpoint": endpoint_name(config), "deployed_model_id": None, "steps": []}


def _step(record: dict[str, Any], action: str, endpoint: Any, **extra: Any) -> dict[str, Any]:
    step = {"action": action, "traffic_split": dict(endpoint.traffic_split), **extra}
    return {**record, "steps": [*record.get("steps", []), step]}


def roll_out(config: VertexDeployConfig, record: dict[str, Any], keep: list[str]) -> dict[str, Any]:
    """Deploy a registered version: at `canary_percent` beside the champion (alias `challenger`),
    or at 100% on an empty endpoint or with `canary_percent` 100 (aliases `champion`, `default`;
    then deployed models not in `keep` are undeployed). Returns the updated record, whose
    `phase` is `canary` or `champion`."""
    aiplatform = aiplatform_for(config.project, config.region)
    model = aiplatform.Model(record["model"], version=record["model_version_id"])
    endpoint = _endpoint(aiplatform, config)
    has_traffic = any(p > 0 for p in (endpoint.traffic_split or {}).values())
    request = deploy_kwargs(config, record["release"], has_traffic)
    endpoint.deploy(model, **request)
    deployed_id = _deployed_model_id(endpoint, model)
    log.info("deployed %s to %s at %d%%", deployed_id, endpoint.resource_name, request["traffic_percentage"])
    record = {**record, "endpoint": endpoint.resource_name, "deployed_model_id": deployed_id}
    if request["traffic_percentage"] < 100:
        _set_aliases(model, record["model_version_id"], [CHALLENGER])
        return {**_step(record, "canary", endpoint, percent=request["traffic_percentage"]), "phase": "canary"}
    _set_aliases(model, record["model_version_id"], [CHAMPION, DEFAULT])
    removed = _undeploy_old(endpoint, [deployed_id, *keep])
    return {**_step(record, "deploy", endpoint, percent=100, undeployed=removed), "phase": "champion"}


def promote(record: dict[str, Any], keep: list[str]) -> dict[str, Any]:
    """All traffic to the canary in `record`; `champion`/`default` move to its version and
    `challenger` is dropped; deployed models not in `keep` are undeployed."""
    aiplatform = aiplatform_for(record["project"], record["region"])
    endpoint = aiplatform.Endpoint(record["endpoint"])
    ids = [d.id for d in endpoint.list_models()]
    if record["deployed_model_id"] not in ids:
        raise UserError(f"deployed model {record['deployed_model_id']} is no longer on {record['endpoint']}")
    endpoint.update(traffic_split=full_traffic_split(ids, record["deployed_model_id"]))
    model = aiplatform.Model(record["model"])
    _set_aliases(model, record["model_version_id"], [CHAMPION, DEFAULT, f"-{CHALLENGER}"])
    removed = _undeploy_old(endpoint, [record["deployed_model_id"], *keep])
    return {**_step(record, "promote", endpoint, percent=100, undeployed=removed), "phase": "champion"}


def abort_canary(canary: dict[str, Any], champion: dict[str, Any]) -> dict[str, Any]:
    """A rollback during a canary: all traffic back to the champion, the canary undeployed and
    its `challenger` alias removed. Returns the canary's updated record."""
    aiplatform = aiplatform_for(canary["project"], canary["region"])
    endpoint = aiplatform.Endpoint(canary["endpoint"])
    ids = [d.id for d in endpoint.list_models()]
    if champion.get("deployed_model_id") not in ids:
        raise UserError(f"the champion's deployed model {champion.get('deployed_model_id')} is no longer on "
                        f"{canary['endpoint']}; shift traffic in the console")
    endpoint.update(traffic_split=full_traffic_split(ids, champion["deployed_model_id"]))
    if canary["deployed_model_id"] in ids:
        endpoint.undeploy(canary["deployed_model_id"])
    _set_aliases(aiplatform.Model(canary["model"]), canary["model_version_id"], [f"-{CHALLENGER}"])
    return {**_step(canary, "canary_aborted", endpoint), "deployed_model_id": None, "phase": "aborted"}


def restore(record: dict[str, Any], config: VertexDeployConfig, keep: list[str]) -> dict[str, Any]:
    """Make an earlier release the champion again (rollback or roll-forward): all traffic to its
    deployed model, redeployed from its registered version if it was undeployed meanwhile."""
    aiplatform = aiplatform_for(record["project"], record["region"])
    endpoint = _endpoint(aiplatform, config)
    model = aiplatform.Model(record["model"], version=record["model_version_id"])
    ids = [d.id for d in endpoint.list_models()]
    deployed_id = record.get("deployed_model_id")
    if deployed_id in ids:
        endpoint.update(traffic_split=full_traffic_split(ids, deployed_id))
        action = "traffic_shift"
    else:
        request = deploy_kwargs(config, record["release"], False)
        request.pop("traffic_percentage")
        endpoint.deploy(model, traffic_split={**{key: 0 for key in ids}, "0": 100}, **request)
        deployed_id = _deployed_model_id(endpoint, model)
        action = "redeploy"
    _set_aliases(model, record["model_version_id"], [CHAMPION, DEFAULT, f"-{CHALLENGER}"])
    removed = _undeploy_old(endpoint, [deployed_id, *keep])
    record = {**record, "endpoint": endpoint.resource_name, "deployed_model_id": deployed_id}
    return {**_step(record, action, endpoint, percent=100, undeployed=removed), "phase": "champion"}


def smoke_query(record: dict[str, Any], item_id: str, invoke_routes: bool = True, k: int = 5,
                timeout: float = 60.0) -> dict[str, Any]:
    """Ask the deployed model in `record` for `item_id`'s neighbours through the endpoint: with
    invoke routes that one deployed model (not the traffic split) via `invoke/predict`, else the
    endpoint's `:predict`. Returns the prediction; UserError when it has no neighbours."""
    aiplatform = aiplatform_for(record["project"], record["region"])
    endpoint = aiplatform.Endpoint(record["endpoint"])
    instance = {"item_id": item_id, "k": k}
    if invoke_routes:
        response = endpoint.invoke("/predict", json.dumps({"instances": [instance]}).encode(),
                                   {"Content-Type": "application/json"},
                                   deployed_model_id=record["deployed_model_id"], timeout=timeout)
        if response.status_code != 200:
            raise UserError(f"smoke query for {item_id} through {record['endpoint']} answered "
                            f"{response.status_code}: {response.text[:200]}")
        prediction = response.json()["predictions"][0]
    else:
        prediction = dict(endpoint.predict(instances=[instance], timeout=timeout).predictions[0])
    if not prediction.get("items"):
        raise UserError(f"smoke query for {item_id} returned no neighbours: {prediction}")
    return prediction

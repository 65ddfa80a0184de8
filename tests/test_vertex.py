"""The Vertex AI model and endpoint lifecycle, through the real google-cloud-aiplatform SDK.

Only the transport is fake (`vertex_fake`: the GAPIC client methods record the request
protos the SDK builds and answer from an in-memory Vertex AI); the registry is a real
`gs://` one in the GCS emulator, and the smoke query before a promotion reaches a real
`visrec serve` process through the endpoint's invoke route. The assertions are on the
requests Vertex AI would receive.
"""

from __future__ import annotations

import json
import re

import pytest
import requests
from test_release import config, inputs  # noqa: F401  (the stage-output fixture)
from vertex_fake import PROJECT, REGION

from visrec.core import io
from visrec.cli import main
from visrec.core.errors import UserError
from visrec.stages.release.deploy import deploy_release
from visrec.stages.release.promote import BakePolicy, approve_release, auto_promote, promote_release, rollback
from visrec.stages.release.registry import (active_canary, current_version, list_releases, load_release, predecessor,
                                            successor)
from visrec.stages.release.release import CANARY_STATUS, DEPLOYED, PENDING, release_uri
from visrec.stages.release.vertex import (VertexDeployConfig, deploy_kwargs, endpoint_kwargs, release_alias, to_undeploy,
                           upload_kwargs)

IMAGE = "us-docker.pkg.dev/my-proj/visrec/serving:abc123"
MODEL = f"projects/{PROJECT}/locations/{REGION}/models/visrec-similar-items"
ENDPOINT = f"projects/{PROJECT}/locations/{REGION}/endpoints/visrec-similar-items"
SERVING_SA = "visrec-serving@my-proj.iam.gserviceaccount.com"


def vertex_config(**kw) -> VertexDeployConfig:
    return VertexDeployConfig(**{"project": PROJECT, "region": REGION, "serving_image": IMAGE,
                                 "service_account": SERVING_SA, **kw})


@pytest.fixture
def registry(gcs_emulator) -> str:
    return f"gs://{gcs_emulator()}/registry"


def ship(inputs, registry, version, metrics="good", **vertex):  # noqa: F811
    return deploy_release(config(inputs, registry, metrics, version=version, target="vertex",
                                 vertex=vertex_config(**vertex)))


def record(registry, version) -> dict:
    return io.read_json(io.join(release_uri(registry, version), "release.json"))["vertex"]


def aliases(vertex_api) -> dict[str, set[str]]:
    """Version id -> its aliases (Vertex AI keeps no order among them)."""
    return {v: set(a) for v, a in vertex_api.model_versions("visrec-similar-items").items()}


def traffic(vertex_api) -> dict[str, int]:
    """Every deployed model of the endpoint -> its share of traffic (0 when the split leaves it out)."""
    endpoint = vertex_api.endpoint("visrec-similar-items")
    return {d.id: endpoint.traffic_split.get(d.id, 0) for d in endpoint.deployed_models}


def deployed_id(registry, version) -> str:
    return record(registry, version)["deployed_model_id"]


# ---- requests built from the config ------------------------------------------------------------


def test_upload_kwargs_first_and_later_versions():
    first = upload_kwargs(vertex_config(version_aliases=("weekly",)), "gs://b/reg/releases/r-1", "r-1", first=True)
    assert first["model_id"] == "visrec-similar-items" and "parent_model" not in first
    assert first["is_default_version"] is True
    assert first["version_aliases"] == ["release-r-1", "weekly"]
    # Every route through the endpoint's invoke API; Vertex takes the invoke prefix or a predict route.
    assert first["serving_container_invoke_route_prefix"] == "/*"
    assert "serving_container_predict_route" not in first
    assert first["serving_container_environment_variables"] == {"VISREC_HOST": "0.0.0.0"}
    later = upload_kwargs(vertex_config(admin_token_uri="gs://b/secrets/token"), "gs://b/reg/releases/r-2", "r-2",
                          first=False)
    assert later["serving_container_environment_variables"]["VISREC_ADMIN_TOKEN_URI"] == "gs://b/secrets/token"
    assert later["parent_model"] == MODEL and "model_id" not in later and later["is_default_version"] is False
    classic = upload_kwargs(vertex_config(invoke_routes=False), "gs://b/r/releases/v", "v", first=False)
    assert classic["serving_container_predict_route"] == "/predict"
    assert "serving_container_invoke_route_prefix" not in classic


def test_endpoint_and_deploy_kwargs():
    assert endpoint_kwargs(vertex_config()) == {
        "endpoint_id": "visrec-similar-items", "display_name": "visrec-similar-items", "labels": {"app": "visrec"},
        "dedicated_endpoint_enabled": True, "project": PROJECT, "location": REGION, "sync": True}
    logged = endpoint_kwargs(vertex_config(request_logging_sampling_rate=0.1,
                                           request_logging_bq_table="bq://my-proj.visrec.requests"))
    assert logged["enable_request_response_logging"] is True
    assert logged["request_response_logging_sampling_rate"] == 0.1
    assert logged["request_response_logging_bq_destination_table"] == "bq://my-proj.visrec.requests"
    cfg = vertex_config(canary_percent=20, machine_type="n1-highmem-8", min_replica_count=2, max_replica_count=5)
    assert deploy_kwargs(cfg, "r-abc", endpoint_has_traffic=True) == {
        "deployed_model_display_name": "visrec-similar-items-release-r-abc", "traffic_percentage": 20,
        "machine_type": "n1-highmem-8", "min_replica_count": 2, "max_replica_count": 5, "sync": True,
        "service_account": SERVING_SA}
    assert deploy_kwargs(cfg, "r-abc", endpoint_has_traffic=False)["traffic_percentage"] == 100
    assert to_undeploy(["1", "2", "3", "4"], keep=["3", "1"]) == ["2", "4"]
    assert release_alias("2026.11_Weekly") == "release-2026-11-weekly"


@pytest.mark.parametrize("change, message", [
    ({"project": ""}, "--project"),
    ({"serving_image": ""}, "--serving-image"),
    ({"canary_percent": 0}, "canary percent"),
    ({"min_replica_count": 3, "max_replica_count": 2}, "replicas"),
    ({"version_aliases": ("Bad_Alias",)}, "invalid version alias"),
    ({"version_aliases": ("champion",)}, "invalid version alias"),
    ({"model_id": "9lives"}, "model id"),
    ({"endpoint_id": "Has Spaces"}, "endpoint id"),
    ({"request_logging_sampling_rate": 2.0}, "sampling rate"),
])
def test_invalid_settings_fail_before_any_request(change, message):
    with pytest.raises(UserError, match=message):
        upload_kwargs(vertex_config(**change), "gs://b/r", "v1", first=True)


def test_vertex_needs_a_gcs_artifact():
    with pytest.raises(UserError, match="gs://"):
        upload_kwargs(vertex_config(), "/local/registry/releases/v1", "v1", first=True)


# ---- the lifecycle through the SDK -------------------------------------------------------------


def test_first_release_creates_the_model_and_endpoint_once(vertex_api, inputs, registry):  # noqa: F811
    with pytest.raises(UserError, match="needs a gs:// registry"):
        deploy_release(config(inputs, "/tmp/local-registry", target="vertex", vertex=vertex_config()))
    first = ship(inputs, registry, "v1")
    assert first.status == DEPLOYED and current_version(registry) == "v1"

    # Nothing existed: one get each (NotFound), then the model and endpoint are created with the fixed IDs.
    [upload] = vertex_api.requests_of("upload_model")
    assert upload.model_id == "visrec-similar-items" and not upload.parent_model
    assert upload.model.artifact_uri == release_uri(registry, "v1")
    assert upload.model.container_spec.image_uri == IMAGE
    assert upload.model.container_spec.invoke_route_prefix == "/*" and not upload.model.container_spec.predict_route
    assert upload.model.container_spec.health_route == "/healthz"
    assert set(upload.model.version_aliases) == {"release-v1", "default"}
    [create] = vertex_api.requests_of("create_endpoint")
    assert create.endpoint_id == "visrec-similar-items" and create.endpoint.dedicated_endpoint_enabled
    [deploy] = vertex_api.requests_of("deploy_model")
    assert dict(deploy.traffic_split) == {"0": 100}  # nothing served yet: no canary
    assert deploy.deployed_model.service_account == SERVING_SA
    assert deploy.deployed_model.dedicated_resources.min_replica_count == 1
    assert aliases(vertex_api) == {"1": {"release-v1", "default", "champion"}}
    assert record(registry, "v1")["phase"] == "champion" and active_canary(registry) is None

    # The next release is a new version of the same model, on the same endpoint: nothing is created.
    vertex_api.clear()
    assert ship(inputs, registry, "v2", "better").status == CANARY_STATUS
    [upload] = vertex_api.requests_of("upload_model")
    assert upload.parent_model == MODEL and not upload.model_id
    assert "default" not in upload.model.version_aliases
    assert vertex_api.requests_of("create_endpoint") == []
    assert len(vertex_api.endpoint("visrec-similar-items").deployed_models) == 2


def test_canary_promote_then_one_step_deploy_undeploys_old_models(vertex_api, inputs, registry, monkeypatch,
                                                                  tmp_path):  # noqa: F811
    from visrec.core.servers import free_port
    from test_serving import Server

    ship(inputs, registry, "v1")
    v1 = deployed_id(registry, "v1")
    vertex_api.clear()
    canary = ship(inputs, registry, "v2", "better", canary_percent=10)
    assert canary.status == CANARY_STATUS and "canary until `visrec promote`" in canary.message
    [deploy] = vertex_api.requests_of("deploy_model")
    assert dict(deploy.traffic_split) == {v1: 90, "0": 10}
    v2 = deployed_id(registry, "v2")
    assert traffic(vertex_api) == {v1: 90, v2: 10}
    assert aliases(vertex_api)["2"] == {"release-v2", "challenger"}
    # CURRENT stays on the champion during the canary; the registry knows the canary.
    assert current_version(registry) == "v1"
    assert active_canary(registry)["version"] == "v2" and active_canary(registry)["base"] == "v1"
    assert {r["version"]: r["status"] for r in list_releases(registry)}["v2"] == "canary 10%"
    # The canary follows the champion's writes and the champion the canary's (docs/serving.md).
    assert ship(inputs, registry, "v3", "best").status == PENDING  # no second canary beside the first
    with pytest.raises(UserError, match="v2 is a canary"):
        approve_release(registry, "v3", who="ana", why="x")
    releases = tmp_path / "cache"
    assert predecessor(load_release(release_uri(registry, "v2"), str(releases))).version == "v1"
    assert successor(load_release(release_uri(registry, "v1"), str(releases))).version == "v2"

    # Promotion asks the canary's own deployed model for neighbours through the endpoint first.
    server = Server(release_uri(registry, "v2"), free_port(), tmp_path / "images", None).start()
    try:
        invoked = route_invoke_to(monkeypatch, {v2: server.url})
        vertex_api.clear()
        with pytest.raises(UserError, match="not the canary"):
            promote_release(registry, "v1", who="ana", why="x")
        promoted = promote_release(registry, "v2", who="ana@example.com", why="canary dashboards fine")
    finally:
        server.stop()
    assert invoked == [(v2, "/predict")]
    assert promoted.smoke_query["results"]
    [update] = vertex_api.requests_of("update_endpoint")
    assert list(update.update_mask.paths) == ["traffic_split"] and dict(update.endpoint.traffic_split) == {v1: 0, v2: 100}
    [merge] = vertex_api.requests_of("merge_version_aliases")
    assert merge.name == f"{MODEL}@2" and set(merge.version_aliases) == {"champion", "default", "-challenger"}
    assert vertex_api.requests_of("undeploy_model") == []  # v1 stays at 0%: a rollback is a traffic shift
    assert aliases(vertex_api) == {"1": {"release-v1"}, "2": {"release-v2", "champion", "default"},
                                   "3": {"release-v3"}}  # registered, waiting for approval
    assert current_version(registry) == "v2" and active_canary(registry) is None
    audit = io.read_jsonl(io.join(release_uri(registry, "v2"), "audit.jsonl"))
    assert [a["action"] for a in audit] == ["created", "canary", "promote"] and audit[-1]["who"] == "ana@example.com"

    # --canary-percent 100: one step; beyond the champion and one previous release, models are undeployed.
    vertex_api.clear()
    assert ship(inputs, registry, "v4", "best", canary_percent=100).status == DEPLOYED
    v4 = deployed_id(registry, "v4")
    [deploy] = vertex_api.requests_of("deploy_model")
    assert dict(deploy.traffic_split) == {"0": 100}
    assert [u.deployed_model_id for u in vertex_api.requests_of("undeploy_model")] == [v1]
    assert traffic(vertex_api) == {v2: 0, v4: 100}
    assert current_version(registry) == "v4"


def test_rollback_shifts_traffic_or_redeploys_and_moves_the_aliases(vertex_api, inputs, registry):  # noqa: F811
    for version, metrics in (("v1", "good"), ("v2", "better"), ("v3", "best")):
        ship(inputs, registry, version, metrics, canary_percent=100)
    v2, v3 = deployed_id(registry, "v2"), deployed_id(registry, "v3")
    assert {d.id for d in vertex_api.endpoint("visrec-similar-items").deployed_models} == {v2, v3}

    vertex_api.clear()
    assert rollback(registry, who="ana", why="p99 regression") == "v2"
    [update] = vertex_api.requests_of("update_endpoint")
    assert dict(update.endpoint.traffic_split) == {v2: 100, v3: 0}
    assert vertex_api.requests_of("deploy_model") == [] and vertex_api.requests_of("undeploy_model") == []
    [merge] = vertex_api.requests_of("merge_version_aliases")
    assert merge.name == f"{MODEL}@2" and "champion" in merge.version_aliases
    assert aliases(vertex_api)["2"] == {"release-v2", "champion", "default"}

    # v1 was undeployed when v3 went out: rolling back to it redeploys its registered version.
    vertex_api.clear()
    assert rollback(registry) == "v1"
    [deploy] = vertex_api.requests_of("deploy_model")
    assert deploy.deployed_model.model == f"{MODEL}@1" and dict(deploy.traffic_split) == {v2: 0, v3: 0, "0": 100}
    assert vertex_api.requests_of("upload_model") == []
    assert [u.deployed_model_id for u in vertex_api.requests_of("undeploy_model")] == [v3]
    v1 = deployed_id(registry, "v1")
    assert traffic(vertex_api) == {v2: 0, v1: 100}
    assert aliases(vertex_api)["1"] == {"release-v1", "champion", "default"}
    assert current_version(registry) == "v1"


def test_rollback_during_a_canary_aborts_it(vertex_api, inputs, registry):  # noqa: F811
    ship(inputs, registry, "v1")
    ship(inputs, registry, "v2", "better")
    v1, v2 = deployed_id(registry, "v1"), deployed_id(registry, "v2")
    # A retraining that passes the gate during a canary waits instead of stacking a second canary.
    assert ship(inputs, registry, "v3", "best").status == PENDING
    vertex_api.clear()
    assert main(["rollback", "--registry", registry, "--who", "ana", "--why", "error rate"]) == 0
    [update] = vertex_api.requests_of("update_endpoint")
    assert dict(update.endpoint.traffic_split) == {v1: 100, v2: 0}
    assert [u.deployed_model_id for u in vertex_api.requests_of("undeploy_model")] == [v2]
    [merge] = vertex_api.requests_of("merge_version_aliases")
    assert merge.name == f"{MODEL}@2" and list(merge.version_aliases) == ["-challenger"]
    assert current_version(registry) == "v1" and active_canary(registry) is None
    assert record(registry, "v2")["phase"] == "aborted"
    # The waiting release can go now, as a canary of its own.
    assert approve_release(registry, "v3", who="ana", why="report read").status == CANARY_STATUS


def test_approval_registers_first_and_deploys_only_when_approved(vertex_api, inputs, registry):  # noqa: F811
    ship(inputs, registry, "v1")
    vertex_api.clear()
    pending = deploy_release(config(inputs, registry, "better", version="v2", target="vertex",
                                    vertex=vertex_config(), require_approval=True))
    assert pending.status == PENDING
    # In the Model Registry at once (the run -> version lineage), not on the endpoint.
    assert [r.parent_model for r in vertex_api.requests_of("upload_model")] == [MODEL]
    assert vertex_api.requests_of("deploy_model") == []
    assert main(["approve", "v2", "--registry", registry, "--who", "ana", "--why", "report read"]) == 0
    assert vertex_api.requests_of("upload_model") != [] and len(vertex_api.requests_of("upload_model")) == 1
    assert active_canary(registry)["version"] == "v2"


def test_auto_promotion_waits_for_the_bake_policy(vertex_api, inputs, registry):  # noqa: F811
    ship(inputs, registry, "v1")
    ship(inputs, registry, "v2", "better")
    assert auto_promote(registry, BakePolicy(min_minutes=60)) is None  # just started
    with pytest.raises(UserError, match="baked 0 of 60 minutes"):
        promote_release(registry, "v2", who="ana", why="x", smoke_query=False, min_minutes=60)
    result = auto_promote(registry, BakePolicy(min_minutes=0, smoke_query=False))
    assert result.version == "v2" and current_version(registry) == "v2"
    audit = io.read_jsonl(io.join(release_uri(registry, "v2"), "audit.jsonl"))
    assert audit[-1]["who"] == "visrec bake policy"
    assert main(["promote", "--auto", "--registry", registry]) == 0  # nothing to do


def route_invoke_to(monkeypatch, backends: dict[str, str]) -> list[tuple[str, str]]:
    """Stand in for the dedicated endpoint's front end: an invoke request for a deployed model
    goes to that model's serving container (a real `visrec serve`), path as the SDK sent it."""
    import types

    import google.auth.transport.requests as google_requests
    from google.cloud.aiplatform import models as sdk_models

    pattern = re.compile(r"^https://[^/]+/v1/projects/[^/]+/locations/[^/]+/endpoints/[^/]+"
                         r"/deployedModels/(?P<id>[^/]+)/invoke(?P<path>/.*)$")
    calls: list[tuple[str, str]] = []

    class Frontend(requests.Session):
        def __init__(self, credentials, *args, **kwargs):
            super().__init__()

        def request(self, method, url, *args, **kwargs):
            match = pattern.match(url)
            assert match and method == "POST", (method, url)
            calls.append((match["id"], match["path"]))
            return super().request(method, backends[match["id"]] + match["path"], *args, **kwargs)

    # Only the SDK's endpoint calls: the storage client uses AuthorizedSession too.
    monkeypatch.setattr(sdk_models, "google_auth_requests",
                        types.SimpleNamespace(AuthorizedSession=Frontend, _DEFAULT_TIMEOUT=google_requests._DEFAULT_TIMEOUT))
    return calls


def test_promote_cli_refuses_without_who_and_why(vertex_api, inputs, registry, capsys):  # noqa: F811
    ship(inputs, registry, "v1")
    ship(inputs, registry, "v2", "better")
    assert main(["promote", "v2", "--registry", registry]) == 2
    assert "--who" in capsys.readouterr().err
    assert main(["releases", "--registry", registry]) == 0
    assert re.search(r"v2 .* canary 10%", capsys.readouterr().out)
    assert json.loads(json.dumps(active_canary(registry)))["percent"] == 10

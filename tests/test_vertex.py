"""Vertex AI deployment: the exact requests handed to google-cloud-aiplatform.

No credentials exist here, so `aiplatform.init`, `Model` and `Endpoint` are replaced
by recorders; everything up to those calls is the real code, including a full
`deploy_release` / `approve_release` / `rollback` on a `gs://` registry (emulator).
"""

from __future__ import annotations

import json

import pytest
from google.cloud import aiplatform
from test_release import config, inputs  # noqa: F401  (the stage-output fixture)

from visrec import io
from visrec.errors import UserError
from visrec.release import (DEPLOYED, PENDING, approve_release, current_version, deploy_release,
                            release_uri, rollback)
from visrec.vertex import (VertexDeployConfig, deploy_kwargs, deploy_to_vertex, full_traffic_split,
                           release_alias, shift_traffic, upload_kwargs)

PROJECT, REGION = "my-proj", "us-central1"
IMAGE = "us-docker.pkg.dev/my-proj/visrec/serving:abc123"
ENDPOINT = f"projects/{PROJECT}/locations/{REGION}/endpoints/42"
PARENT = f"projects/{PROJECT}/locations/{REGION}/models/7"


def vertex_config(**kw) -> VertexDeployConfig:
    return VertexDeployConfig(**{"project": PROJECT, "region": REGION, "serving_image": IMAGE, **kw})


class FakeVertex:
    """Records every call; endpoints keep deployed models and a traffic split like the real service."""

    def __init__(self, deployed: dict[str, int] | None = None):
        self.calls: list[tuple] = []
        self.deployed = dict(deployed or {})  # deployed model id -> traffic percent
        self.models: dict[str, tuple[str, str]] = {}  # deployed model id -> (model, version)
        self.uploads = 0


@pytest.fixture
def fake(monkeypatch):
    rec = FakeVertex()

    class FakeModel:
        def __init__(self, resource_name, version_id):
            self.resource_name, self.version_id = resource_name, version_id

        @classmethod
        def upload(cls, **kwargs):
            rec.calls.append(("Model.upload", kwargs))
            rec.uploads += 1
            return cls(kwargs.get("parent_model") or PARENT, str(rec.uploads))

    class Deployed:
        def __init__(self, id, model, model_version_id):
            self.id, self.model, self.model_version_id = id, model, model_version_id

    class FakeEndpoint:
        def __init__(self, endpoint_name):
            rec.calls.append(("Endpoint", endpoint_name))
            self.resource_name = endpoint_name

        @classmethod
        def create(cls, **kwargs):
            rec.calls.append(("Endpoint.create", kwargs))
            endpoint = cls.__new__(cls)
            endpoint.resource_name = ENDPOINT
            return endpoint

        @property
        def traffic_split(self):
            return {k: v for k, v in rec.deployed.items() if v > 0}

        def list_models(self):
            return [Deployed(i, *rec.models.get(i, ("other", "0"))) for i in rec.deployed]

        def deploy(self, model, **kwargs):
            rec.calls.append(("deploy", model.resource_name, model.version_id, kwargs))
            new_id = f"dm-{len(rec.deployed) + 1}"
            share = kwargs["traffic_percentage"]
            old_total = sum(rec.deployed.values()) or 1
            for key in rec.deployed:
                rec.deployed[key] = rec.deployed[key] * (100 - share) // old_total
            rec.deployed[new_id] = share
            rec.models[new_id] = (model.resource_name, model.version_id)

        def update(self, traffic_split):
            rec.calls.append(("update", traffic_split))
            rec.deployed.update(traffic_split)

    monkeypatch.setattr(aiplatform, "init", lambda **kw: rec.calls.append(("init", kw)))
    monkeypatch.setattr(aiplatform, "Model", FakeModel)
    monkeypatch.setattr(aiplatform, "Endpoint", FakeEndpoint)
    return rec


def test_upload_kwargs_field_by_field():
    kw = upload_kwargs(vertex_config(parent_model=PARENT, version_aliases=("candidate",)),
                       "gs://b/registry/releases/r-abc", "r-abc")
    assert kw == {
        "display_name": "visrec-similar-items",
        "artifact_uri": "gs://b/registry/releases/r-abc",
        "serving_container_image_uri": IMAGE,
        "serving_container_ports": [8080],
        "serving_container_health_route": "/healthz",
        "serving_container_predict_route": "/predict",
        "serving_container_environment_variables": {"VISREC_HOST": "0.0.0.0"},
        "version_aliases": ["release-r-abc", "candidate"],
        "version_description": "visrec release r-abc",
        "is_default_version": False,
        "labels": {"app": "visrec"},
        "project": PROJECT,
        "location": REGION,
        "sync": True,
        "parent_model": PARENT,
    }
    first = upload_kwargs(vertex_config(canary_percent=100), "gs://b/r/releases/v1", "v1")
    assert "parent_model" not in first and first["is_default_version"] is True


def test_deploy_kwargs_and_traffic_split():
    cfg = vertex_config(machine_type="n1-highmem-8", min_replica_count=2, max_replica_count=5, canary_percent=20,
                        service_account="serve@my-proj.iam.gserviceaccount.com")
    assert deploy_kwargs(cfg, "r-abc", endpoint_has_traffic=True) == {
        "deployed_model_display_name": "visrec-similar-items-release-r-abc",
        "traffic_percentage": 20,
        "machine_type": "n1-highmem-8",
        "min_replica_count": 2,
        "max_replica_count": 5,
        "sync": True,
        "service_account": "serve@my-proj.iam.gserviceaccount.com",
    }
    assert deploy_kwargs(cfg, "r-abc", endpoint_has_traffic=False)["traffic_percentage"] == 100
    assert full_traffic_split(["dm-1", "dm-2", "dm-3"], "dm-2") == {"dm-1": 0, "dm-2": 100, "dm-3": 0}
    assert release_alias("2026.11_Weekly") == "release-2026-11-weekly"


@pytest.mark.parametrize("change, message", [
    ({"project": ""}, "--project"),
    ({"serving_image": ""}, "--serving-image"),
    ({"canary_percent": 0}, "canary percent"),
    ({"min_replica_count": 3, "max_replica_count": 2}, "replicas"),
    ({"version_aliases": ("Bad_Alias",)}, "invalid version alias"),
])
def test_invalid_settings_fail_before_any_request(change, message):
    with pytest.raises(UserError, match=message):
        upload_kwargs(vertex_config(**change), "gs://b/r", "v1")


def test_vertex_needs_a_gcs_artifact():
    with pytest.raises(UserError, match="gs://"):
        upload_kwargs(vertex_config(), "/local/registry/releases/v1", "v1")


def test_deploy_to_vertex_canary_then_full(fake):
    fake.deployed = {"dm-old": 100}
    cfg = vertex_config(endpoint=ENDPOINT, parent_model=PARENT, canary_percent=10)
    out = deploy_to_vertex(cfg, "gs://b/reg/releases/r-1", "r-1")
    assert fake.calls[0] == ("init", {"project": PROJECT, "location": REGION})
    assert fake.calls[1] == ("Model.upload", upload_kwargs(cfg, "gs://b/reg/releases/r-1", "r-1"))
    assert fake.calls[2] == ("Endpoint", ENDPOINT)
    assert fake.calls[3] == ("deploy", PARENT, "1", deploy_kwargs(cfg, "r-1", endpoint_has_traffic=True))
    assert fake.calls[4] == ("update", {"dm-old": 0, "dm-2": 100})
    assert len(fake.calls) == 5
    assert out == {
        "project": PROJECT, "region": REGION, "model": PARENT, "model_version_id": "1",
        "version_aliases": ["release-r-1"], "endpoint": ENDPOINT, "deployed_model_id": "dm-2",
        "traffic_steps": [{"percent": 10, "traffic_split": {"dm-old": 90, "dm-2": 10}},
                          {"percent": 100, "traffic_split": {"dm-2": 100}}],
    }


def test_deploy_to_vertex_canary_only_and_new_endpoint(fake):
    out = deploy_to_vertex(vertex_config(full_after_canary=False), "gs://b/reg/releases/r-1", "r-1")
    assert ("Endpoint.create", {"display_name": "visrec-similar-items", "labels": {"app": "visrec"},
                                "project": PROJECT, "location": REGION}) in fake.calls
    # nothing served yet: the first version gets all traffic, no canary step, no update
    assert [c[0] for c in fake.calls] == ["init", "Model.upload", "Endpoint.create", "deploy"]
    assert out["traffic_steps"] == [{"percent": 100, "traffic_split": {"dm-1": 100}}]
    fake.calls.clear()
    deploy_to_vertex(vertex_config(endpoint=ENDPOINT, full_after_canary=False), "gs://b/reg/releases/r-2", "r-2")
    assert [c[0] for c in fake.calls] == ["init", "Model.upload", "Endpoint", "deploy"]
    assert fake.deployed == {"dm-1": 90, "dm-2": 10}


def test_shift_traffic(fake):
    fake.deployed = {"dm-1": 0, "dm-2": 100}
    assert shift_traffic(PROJECT, REGION, ENDPOINT, "dm-1") == {"dm-1": 100}
    assert fake.calls[-1] == ("update", {"dm-1": 100, "dm-2": 0})
    with pytest.raises(UserError, match="no longer on"):
        shift_traffic(PROJECT, REGION, ENDPOINT, "dm-9")


def test_release_on_vertex_deploy_approve_rollback(fake, inputs, gcs_emulator):  # noqa: F811
    registry = f"gs://{gcs_emulator()}/registry"
    vcfg = vertex_config(endpoint=ENDPOINT, parent_model=PARENT, canary_percent=25)
    with pytest.raises(UserError, match="needs a gs:// registry"):
        deploy_release(config(inputs, "/tmp/local-registry", target="vertex", vertex=vcfg))

    first = deploy_release(config(inputs, registry, target="vertex", vertex=vcfg))
    assert first["status"] == DEPLOYED
    upload = next(c[1] for c in fake.calls if c[0] == "Model.upload")
    assert upload["artifact_uri"] == release_uri(registry, first["version"])
    assert upload["parent_model"] == PARENT
    manifest = io.read_json(io.join(release_uri(registry, first["version"]), "release.json"))
    assert manifest["vertex"]["deployed_model_id"] == "dm-1" and manifest["vertex"]["endpoint"] == ENDPOINT
    assert manifest["vertex"]["model"] == PARENT and manifest["vertex"]["model_version_id"] == "1"

    # with approval required nothing reaches Vertex until a human approves
    fake.calls.clear()
    second = deploy_release(config(inputs, registry, "better", target="vertex", vertex=vcfg, require_approval=True))
    assert second["status"] == PENDING and fake.calls == []
    approve_release(registry, second["version"], who="ana", why="reviewed")
    assert [c[0] for c in fake.calls] == ["init", "Model.upload", "Endpoint", "deploy", "update"]
    assert fake.calls[3][3]["traffic_percentage"] == 25
    assert fake.deployed == {"dm-1": 0, "dm-2": 100} and current_version(registry) == second["version"]

    fake.calls.clear()
    assert rollback(registry) == first["version"]
    assert fake.calls == [("init", {"project": PROJECT, "location": REGION}), ("Endpoint", ENDPOINT),
                          ("update", {"dm-1": 100, "dm-2": 0})]
    # rolling forward again is a traffic shift too, not a second upload
    fake.calls.clear()
    approve_release(registry, second["version"], who="ana", why="fixed the p99 issue elsewhere")
    assert [c[0] for c in fake.calls] == ["init", "Endpoint", "update"] and fake.deployed["dm-2"] == 100
    history = [json.loads(x) for x in io.read_text(io.join(registry, "history.jsonl")).splitlines()]
    assert [h["action"] for h in history] == ["deploy", "approve", "rollback", "approve"]

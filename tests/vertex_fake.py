"""An in-memory Vertex AI behind the real `google-cloud-aiplatform` SDK.

Only the transport is fake: the methods of the v1 GAPIC service clients the SDK
uses are patched to record the request protos the SDK built and to answer from
`FakeVertex`, a small stateful imitation of the service. Everything above them
(`aiplatform.Model.upload`, `Endpoint.deploy`, `PipelineJob.submit`, ...) is the
real SDK, so tests see what it really does to arguments before asserting on the
recorded requests. Any other RPC of any v1 or v1beta1 service client raises
AssertionError instead of reaching the network.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import inspect
import itertools
import pkgutil
import re
import threading
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from typing import Any

import proto
import pytest
from google.api_core import exceptions, operation
from google.auth.credentials import AnonymousCredentials
from google.cloud import aiplatform, aiplatform_v1 as v1, aiplatform_v1beta1 as v1beta1
from google.cloud.aiplatform import initializer
from google.cloud.aiplatform.metadata.metadata import _experiment_tracker as experiment_tracker
from google.cloud.aiplatform.utils import gcs_utils, resource_manager_utils
from google.longrunning import operations_pb2
from google.protobuf import any_pb2, empty_pb2

PROJECT = "my-proj"
REGION = "us-central1"
PROJECT_NUMBER = "123456789"

FAKED_SERVICES = ("pipeline_service", "schedule_service", "model_service", "endpoint_service", "metadata_service")

# The RPCs of the FAKED_SERVICES' v1 clients FakeVertex answers (each by its `_<name>` method).
FAKED = frozenset({
    "create_pipeline_job", "get_pipeline_job",
    "create_schedule", "get_schedule", "list_schedules", "pause_schedule", "resume_schedule", "delete_schedule",
    "upload_model", "get_model", "list_model_versions", "merge_version_aliases",
    "create_endpoint", "get_endpoint", "update_endpoint", "deploy_model", "undeploy_model",
    "get_metadata_store", "create_metadata_store", "get_context", "create_context", "update_context",
    "add_context_children",
})

# Vertex's format for version aliases, chosen so an alias can never look like a version id.
ALIAS = re.compile(r"[a-z][a-zA-Z0-9-]{0,126}[a-z0-9]")
# Endpoint ids: a lowercase name of up to 63 characters, or a number of up to 9 digits.
ENDPOINT_ID = re.compile(r"[a-z](?:[a-z0-9-]{0,61}[a-z0-9])?|[1-9][0-9]{0,8}")
DEDICATED = v1.Model.DeploymentResourcesType.DEDICATED_RESOURCES
IGNORED_FIELDS = ("timeout", "retry", "metadata")


def faked_clients() -> list[type]:
    """The `aiplatform_v1` client classes of the FAKED_SERVICES (the ones the SDK uses by default)."""
    classes = []
    for service in FAKED_SERVICES:
        name = "".join(part.capitalize() for part in service.split("_")) + "Client"
        classes.append(getattr(getattr(v1.services, service), name))
    return classes


def all_clients(module: Any) -> list[type]:
    """Every synchronous GAPIC service client class of `aiplatform_v1` or `aiplatform_v1beta1`."""
    classes = []
    for info in pkgutil.iter_modules(module.services.__path__):
        service = importlib.import_module(f"{module.services.__name__}.{info.name}")
        classes += [c for n, c in vars(service).items() if n.endswith("ServiceClient")]
    return classes


def rpc_names(client_class: type) -> list[str]:
    """Public RPC methods of a GAPIC client (its path helpers are static, not plain functions)."""
    return [n for n, v in vars(client_class).items() if not n.startswith("_") and inspect.isfunction(v)]


def request_type(method: str) -> type[proto.Message]:
    """`upload_model` -> `aiplatform_v1.types.UploadModelRequest`."""
    return getattr(v1.types, "".join(part.capitalize() for part in method.split("_")) + "Request")


def now() -> datetime:
    """Timestamps as the service sets them (proto-plus takes aware datetimes)."""
    return datetime.now(timezone.utc)


def pb(message: proto.Message | Any) -> Any:
    """The raw protobuf of a proto-plus message (raw protobufs pass through)."""
    return type(message).pb(message) if isinstance(message, proto.Message) else message


def check_split(split: dict[str, int], deployed: set[str]) -> None:
    """A traffic split names only deployed models, and sums to 100 (or is empty when none are deployed)."""
    unknown = sorted(set(split) - deployed)
    if unknown:
        raise exceptions.InvalidArgument(f"traffic_split names undeployed models {unknown}")
    if any(v < 0 for v in split.values()):
        raise exceptions.InvalidArgument(f"traffic_split has negative percentages: {split}")
    if (deployed or split) and sum(split.values()) != 100:
        raise exceptions.InvalidArgument(f"traffic_split must sum to 100, got {split}")


class FakeVertex:
    """Vertex AI pipelines, schedules, model registry, endpoints and metadata, in memory.

    `requests` holds every faked call as (method name, v1 request proto), in order,
    including calls the fake refused with an error.
    """

    def __init__(self, project: str = PROJECT, region: str = REGION) -> None:
        self.project, self.region = project, region
        self.location = f"projects/{project}/locations/{region}"
        self.requests: list[tuple[str, proto.Message]] = []
        self.pipeline_jobs: dict[str, v1.PipelineJob] = {}
        self.schedules: dict[str, v1.Schedule] = {}
        self.models: dict[str, dict[str, v1.Model]] = {}  # model name -> version id -> version
        self.endpoints: dict[str, v1.Endpoint] = {}
        self.metadata_stores: dict[str, v1.MetadataStore] = {}
        self.contexts: dict[str, v1.Context] = {}
        self._children: dict[str, list[str]] = {}
        self._ids = itertools.count(1001)
        self._lock = threading.Lock()

    # --- for tests -------------------------------------------------------------------------

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Route the FAKED RPCs of the v1 clients to this fake; every other RPC of every client raises."""
        faked = faked_clients()
        for module in (v1, v1beta1):
            for client_class in all_clients(module):
                for name in rpc_names(client_class):
                    if client_class in faked and name in FAKED:
                        handler = self._rpc(name)
                    else:
                        handler = unexpected(name, f"{module.__name__.rsplit('.', 1)[1]}.{client_class.__name__}")
                    monkeypatch.setattr(client_class, name, handler)

    def requests_of(self, method: str) -> list[proto.Message]:
        """The recorded requests of one RPC, oldest first."""
        return [request for name, request in self.requests if name == method]

    def clear(self) -> None:
        """Forget the recorded requests (the service state stays)."""
        self.requests.clear()

    def set_pipeline_job(self, name: str, **fields: Any) -> v1.PipelineJob:
        """Change a stored pipeline job (by id or name) as the service would while it runs.

        Fields are PipelineJob's (state, error, end_time, ...), plus `task_details`,
        which lives in `job_detail`.
        """
        job = self._get_or_404(self.pipeline_jobs, self._full("pipelineJobs", name))
        for field, value in fields.items():
            setattr(job.job_detail if field == "task_details" else job, field, value)
        job.update_time = now()
        return self._pipeline_job(job.name)

    def model_versions(self, model_id: str) -> dict[str, list[str]]:
        """Version id -> its aliases, for one registered model."""
        versions = self._get_or_404(self.models, self._full("models", model_id))
        return {version_id: list(m.version_aliases) for version_id, m in versions.items()}

    def endpoint(self, endpoint_id: str) -> v1.Endpoint:
        """A copy of a stored endpoint, by id or full name."""
        return copy.deepcopy(self._get_or_404(self.endpoints, self._full("endpoints", endpoint_id)))

    def traffic(self, endpoint_id: str) -> dict[str, int]:
        """Deployed model id -> traffic percent of one endpoint."""
        return dict(self.endpoint(endpoint_id).traffic_split)

    def context_children(self, name: str) -> list[str]:
        """Child context names linked under a context (by id in the default store, or full name)."""
        return list(self._children.get(self._full("metadataStores/default/contexts", name), []))

    # --- plumbing ----------------------------------------------------------------------------

    def _rpc(self, method: str) -> Callable[..., Any]:
        """A client method that normalises its call to the request proto, records it and answers it."""

        def call(client: Any, request: Any = None, **fields: Any) -> Any:
            for ignored in IGNORED_FIELDS:
                fields.pop(ignored, None)
            if request is not None and fields:
                raise ValueError(f"{method}: pass either request or fields, not both")
            message = copy.deepcopy(request_type(method)(request if request is not None else fields))
            with self._lock:
                self.requests.append((method, message))
                return getattr(self, f"_{method}")(message)

        call.__name__ = method
        return call

    def _full(self, collection: str, name: str) -> str:
        """A resource id made a full name under this project and region; full names pass through."""
        return name if name.startswith("projects/") else f"{self.location}/{collection}/{name}"

    def _check_parent(self, parent: str) -> None:
        """Resources are created only under this fake's project and region, like a real one's."""
        if parent != self.location:
            raise exceptions.PermissionDenied(f"this fake serves {self.location}, not {parent}")

    def _new_id(self) -> str:
        return str(next(self._ids))

    @staticmethod
    def _get_or_404(store: dict[str, Any], name: str) -> Any:
        if name not in store:
            raise exceptions.NotFound(f"{name} not found")
        return store[name]

    def _done(self, resource: str, response: proto.Message | Any) -> operation.Operation:
        """A finished long-running operation carrying `response`, as `lro.result()` expects."""
        packed = any_pb2.Any()
        packed.Pack(pb(response))
        done = operations_pb2.Operation(name=f"{resource}/operations/{self._new_id()}", done=True, response=packed)
        return operation.Operation(done, refresh=lambda retry=None: done, cancel=lambda: None,
                                   result_type=type(response))

    # --- PipelineService ---------------------------------------------------------------------

    def _create_pipeline_job(self, req: v1.CreatePipelineJobRequest) -> v1.PipelineJob:
        """Stores the job PENDING, with the pipeline and run contexts Vertex makes for it."""
        self._check_parent(req.parent)
        job_id = req.pipeline_job_id or self._new_id()
        name = f"{req.parent}/pipelineJobs/{job_id}"
        if name in self.pipeline_jobs:
            raise exceptions.AlreadyExists(f"{name} already exists")
        store = self._default_store()
        pipeline = self._ensure_context(f"{store}/contexts/{req.pipeline_job.pipeline_spec['pipelineInfo']['name']}",
                                        "system.Pipeline")
        run = self._ensure_context(f"{store}/contexts/{job_id}", "system.PipelineRun")
        self._link(pipeline.name, run.name)
        job = copy.deepcopy(req.pipeline_job)
        job.name, job.state = name, v1.PipelineState.PIPELINE_STATE_PENDING
        job.create_time = job.update_time = now()
        job.job_detail = v1.PipelineJobDetail(pipeline_context=pipeline, pipeline_run_context=run)
        self.pipeline_jobs[name] = job
        return self._pipeline_job(name)

    def _get_pipeline_job(self, req: v1.GetPipelineJobRequest) -> v1.PipelineJob:
        return self._pipeline_job(req.name)

    def _pipeline_job(self, name: str) -> v1.PipelineJob:
        """The stored job with its job_detail contexts as they are now (e.g. parents added since)."""
        job = copy.deepcopy(self._get_or_404(self.pipeline_jobs, name))
        detail = job.job_detail
        detail.pipeline_context = copy.deepcopy(self.contexts[detail.pipeline_context.name])
        detail.pipeline_run_context = copy.deepcopy(self.contexts[detail.pipeline_run_context.name])
        return job

    # --- ScheduleService ---------------------------------------------------------------------

    def _create_schedule(self, req: v1.CreateScheduleRequest) -> v1.Schedule:
        self._check_parent(req.parent)
        if not req.schedule.cron or req.schedule.max_concurrent_run_count <= 0:
            raise exceptions.InvalidArgument("a schedule needs cron and a positive max_concurrent_run_count")
        schedule = copy.deepcopy(req.schedule)
        schedule.name = f"{req.parent}/schedules/{self._new_id()}"
        schedule.state = v1.Schedule.State.ACTIVE
        schedule.create_time = schedule.update_time = now()
        if "start_time" not in schedule:
            schedule.start_time = schedule.create_time
        self.schedules[schedule.name] = schedule
        return copy.deepcopy(schedule)

    def _get_schedule(self, req: v1.GetScheduleRequest) -> v1.Schedule:
        return copy.deepcopy(self._get_or_404(self.schedules, req.name))

    def _list_schedules(self, req: v1.ListSchedulesRequest) -> list[v1.Schedule]:
        """All schedules under the parent; filter and order_by are not honoured."""
        return [copy.deepcopy(s) for name, s in self.schedules.items() if name.startswith(f"{req.parent}/")]

    def _pause_schedule(self, req: v1.PauseScheduleRequest) -> None:
        self._set_schedule_state(req.name, v1.Schedule.State.ACTIVE, v1.Schedule.State.PAUSED)

    def _resume_schedule(self, req: v1.ResumeScheduleRequest) -> None:
        self._set_schedule_state(req.name, v1.Schedule.State.PAUSED, v1.Schedule.State.ACTIVE)

    def _set_schedule_state(self, name: str, expected: v1.Schedule.State, state: v1.Schedule.State) -> None:
        schedule = self._get_or_404(self.schedules, name)
        if schedule.state != expected:
            raise exceptions.FailedPrecondition(f"{name} is {schedule.state.name}, not {expected.name}")
        schedule.state, schedule.update_time = state, now()

    def _delete_schedule(self, req: v1.DeleteScheduleRequest) -> operation.Operation:
        self._get_or_404(self.schedules, req.name)
        del self.schedules[req.name]
        return self._done(req.name, empty_pb2.Empty())

    # --- ModelService ------------------------------------------------------------------------

    def _upload_model(self, req: v1.UploadModelRequest) -> operation.Operation:
        """A new model (`model_id`) or a new version of `parent_model`; aliases move between versions."""
        self._check_parent(req.parent)
        if req.parent_model:
            name = req.parent_model
            self._get_or_404(self.models, name)
        else:
            name = f"{req.parent}/models/{req.model_id or self._new_id()}"
            if name in self.models:
                raise exceptions.AlreadyExists(f"{name} already exists")
        version_id = str(len(self.models.get(name, {})) + 1)
        aliases = ["default", *req.model.version_aliases] if version_id == "1" else list(req.model.version_aliases)
        self._check_aliases(aliases)
        model = copy.deepcopy(req.model)
        model.name, model.version_id, model.version_aliases = name, version_id, []
        model.update_time = model.version_create_time = model.version_update_time = now()
        model.create_time = self.models[name]["1"].create_time if version_id != "1" else model.update_time
        if model.container_spec.image_uri:
            model.supported_deployment_resources_types = [DEDICATED]
        self.models.setdefault(name, {})[version_id] = model
        for alias in aliases:
            self._assign_alias(name, version_id, alias)
        return self._done(name, v1.UploadModelResponse(model=name, model_version_id=version_id))

    def _get_model(self, req: v1.GetModelRequest) -> v1.Model:
        return self._model(*self._resolve(req.name))

    def _list_model_versions(self, req: v1.ListModelVersionsRequest) -> list[v1.Model]:
        """Every version of the model, oldest first; filter and order_by are not honoured."""
        return [self._model(req.name, version_id) for version_id in self._get_or_404(self.models, req.name)]

    def _merge_version_aliases(self, req: v1.MergeVersionAliasesRequest) -> v1.Model:
        """`x` adds an alias (moving it off any other version), `-x` removes one; "default" stays put."""
        if "@" not in req.name:
            raise exceptions.InvalidArgument(f"{req.name} names no version")
        name, version_id = self._resolve(req.name)
        model = self.models[name][version_id]
        for alias in req.version_aliases:
            if alias.startswith("-"):
                if alias == "-default":
                    raise exceptions.FailedPrecondition("the default alias can only be moved, not removed")
                model.version_aliases = [a for a in model.version_aliases if a != alias[1:]]
            else:
                self._check_aliases([alias])
                self._assign_alias(name, version_id, alias)
        model.version_update_time = now()
        return self._model(name, version_id)

    @staticmethod
    def _check_aliases(aliases: list[str]) -> None:
        bad = [a for a in aliases if not ALIAS.fullmatch(a)]
        if bad:
            raise exceptions.InvalidArgument(f"invalid version aliases {bad}")

    def _assign_alias(self, name: str, version_id: str, alias: str) -> None:
        """Aliases are unique within a model: giving one to a version takes it off the others."""
        for other_id, version in self.models[name].items():
            if other_id != version_id and alias in version.version_aliases:
                version.version_aliases = [a for a in version.version_aliases if a != alias]
        target = self.models[name][version_id]
        if alias not in target.version_aliases:
            target.version_aliases.append(alias)

    def _resolve(self, versioned: str) -> tuple[str, str]:
        """`.../models/ID`, `...@<version id>` or `...@<alias>` -> (model name, version id)."""
        name, _, ref = versioned.partition("@")
        versions = self._get_or_404(self.models, name)
        ref = ref or "default"
        if ref in versions:
            return name, ref
        for version_id, model in versions.items():
            if ref in model.version_aliases:
                return name, version_id
        raise exceptions.NotFound(f"{versioned} not found")

    def _model(self, name: str, version_id: str) -> v1.Model:
        """A copy of one version, with the endpoints it is deployed to."""
        model = copy.deepcopy(self.models[name][version_id])
        model.deployed_models = [
            v1.DeployedModelRef(endpoint=endpoint.name, deployed_model_id=deployed.id)
            for endpoint in self.endpoints.values() for deployed in endpoint.deployed_models
            if deployed.model == name and deployed.model_version_id == version_id
        ]
        return model

    # --- EndpointService ---------------------------------------------------------------------

    def _create_endpoint(self, req: v1.CreateEndpointRequest) -> operation.Operation:
        self._check_parent(req.parent)
        endpoint_id = req.endpoint_id or self._new_id()
        if not ENDPOINT_ID.fullmatch(endpoint_id):
            raise exceptions.InvalidArgument(f"invalid endpoint id {endpoint_id!r}")
        name = f"{req.parent}/endpoints/{endpoint_id}"
        if name in self.endpoints:
            raise exceptions.AlreadyExists(f"{name} already exists")
        endpoint = copy.deepcopy(req.endpoint)
        endpoint.name = name
        endpoint.create_time = endpoint.update_time = now()
        if endpoint.dedicated_endpoint_enabled:
            endpoint.dedicated_endpoint_dns = f"{endpoint_id}.{self.region}-{PROJECT_NUMBER}.prediction.vertexai.goog"
        self.endpoints[name] = endpoint
        return self._done(name, copy.deepcopy(endpoint))

    def _get_endpoint(self, req: v1.GetEndpointRequest) -> v1.Endpoint:
        return copy.deepcopy(self._get_or_404(self.endpoints, req.name))

    def _update_endpoint(self, req: v1.UpdateEndpointRequest) -> v1.Endpoint:
        """Applies the fields named in update_mask; a new traffic split must be valid."""
        endpoint = self._get_or_404(self.endpoints, req.endpoint.name)
        paths = list(req.update_mask.paths)
        if not paths:
            raise exceptions.InvalidArgument("update_mask is required")
        immutable = {"name", "deployed_models", "create_time", "update_time", "dedicated_endpoint_dns"}
        if immutable & set(paths):
            raise exceptions.InvalidArgument(f"cannot update {sorted(immutable & set(paths))}")
        if "traffic_split" in paths:
            check_split(dict(req.endpoint.traffic_split), {d.id for d in endpoint.deployed_models})
        for path in paths:
            setattr(endpoint, path, getattr(req.endpoint, path))
        endpoint.update_time = now()
        return copy.deepcopy(endpoint)

    def _deploy_model(self, req: v1.DeployModelRequest) -> operation.Operation:
        """Deploys a model version on dedicated resources; key "0" of the split is the new model."""
        endpoint = self._get_or_404(self.endpoints, req.endpoint)
        deployed = copy.deepcopy(req.deployed_model)
        ref = deployed.model
        if "@" not in ref and deployed.model_version_id:
            ref = f"{ref}@{deployed.model_version_id}"
        name, version_id = self._resolve(ref)
        model = self.models[name][version_id]
        resources = deployed.dedicated_resources
        if (DEDICATED not in model.supported_deployment_resources_types
                or not resources.machine_spec.machine_type or resources.min_replica_count < 1):
            raise exceptions.InvalidArgument(f"{ref} must be deployed on dedicated resources "
                                             "with a machine type and at least one replica")
        deployed.id, deployed.model, deployed.model_version_id = self._new_id(), name, version_id
        deployed.display_name = deployed.display_name or model.display_name
        deployed.create_time = now()
        split = {deployed.id if k == "0" else k: v for k, v in req.traffic_split.items()}
        split = split or dict(endpoint.traffic_split)  # an empty split leaves the current one
        check_split(split, {d.id for d in endpoint.deployed_models} | {deployed.id})
        endpoint.deployed_models.append(deployed)
        endpoint.traffic_split, endpoint.update_time = split, now()
        return self._done(req.endpoint, v1.DeployModelResponse(deployed_model=copy.deepcopy(deployed)))

    def _undeploy_model(self, req: v1.UndeployModelRequest) -> operation.Operation:
        """Removes a deployed model, which must be left without traffic by the new (or current) split."""
        endpoint = self._get_or_404(self.endpoints, req.endpoint)
        ids = [d.id for d in endpoint.deployed_models]
        if req.deployed_model_id not in ids:
            raise exceptions.NotFound(f"{req.endpoint} has no deployed model {req.deployed_model_id}")
        remaining = set(ids) - {req.deployed_model_id}
        if req.traffic_split:
            split = dict(req.traffic_split)
            if split.pop(req.deployed_model_id, 0):
                raise exceptions.InvalidArgument(f"traffic_split still routes traffic to {req.deployed_model_id}")
        else:
            split = dict(endpoint.traffic_split)
            if split.pop(req.deployed_model_id, 0) and remaining:
                raise exceptions.FailedPrecondition(f"{req.deployed_model_id} still receives traffic")
        check_split(split, remaining)
        endpoint.deployed_models = [d for d in endpoint.deployed_models if d.id != req.deployed_model_id]
        endpoint.traffic_split, endpoint.update_time = split, now()
        return self._done(req.endpoint, v1.UndeployModelResponse())

    # --- MetadataService ---------------------------------------------------------------------

    def _get_metadata_store(self, req: v1.GetMetadataStoreRequest) -> v1.MetadataStore:
        return copy.deepcopy(self._get_or_404(self.metadata_stores, req.name))

    def _create_metadata_store(self, req: v1.CreateMetadataStoreRequest) -> operation.Operation:
        self._check_parent(req.parent)
        name = f"{req.parent}/metadataStores/{req.metadata_store_id or 'default'}"
        if name in self.metadata_stores:
            raise exceptions.AlreadyExists(f"{name} already exists")
        store = copy.deepcopy(req.metadata_store)
        store.name, store.create_time, store.update_time = name, now(), now()
        self.metadata_stores[name] = store
        return self._done(name, copy.deepcopy(store))

    def _default_store(self) -> str:
        """The default metadata store, which Vertex creates on a project's first pipeline run."""
        name = f"{self.location}/metadataStores/default"
        self.metadata_stores.setdefault(name, v1.MetadataStore(name=name, create_time=now(), update_time=now()))
        return name

    def _get_context(self, req: v1.GetContextRequest) -> v1.Context:
        return copy.deepcopy(self._get_or_404(self.contexts, req.name))

    def _create_context(self, req: v1.CreateContextRequest) -> v1.Context:
        self._get_or_404(self.metadata_stores, req.parent)
        name = f"{req.parent}/contexts/{req.context_id or self._new_id()}"
        if name in self.contexts:
            raise exceptions.AlreadyExists(f"{name} already exists")
        context = copy.deepcopy(req.context)
        context.name, context.create_time, context.update_time = name, now(), now()
        self.contexts[name] = context
        return copy.deepcopy(context)

    def _ensure_context(self, name: str, schema_title: str) -> v1.Context:
        if name not in self.contexts:
            self.contexts[name] = v1.Context(name=name, display_name=name.rsplit("/", 1)[1],
                                             schema_title=schema_title, schema_version="0.0.1",
                                             create_time=now(), update_time=now())
        return self.contexts[name]

    def _update_context(self, req: v1.UpdateContextRequest) -> v1.Context:
        """Applies the fields in update_mask, or all user-settable ones when it is empty."""
        context = self._get_or_404(self.contexts, req.context.name)
        paths = list(req.update_mask.paths) or ["display_name", "description", "metadata", "schema_title",
                                                 "schema_version", "labels"]
        for path in paths:
            setattr(context, path, getattr(req.context, path))
        context.update_time = now()
        return copy.deepcopy(context)

    def _add_context_children(self, req: v1.AddContextChildrenRequest) -> v1.AddContextChildrenResponse:
        self._get_or_404(self.contexts, req.context)
        for child in req.child_contexts:
            self._get_or_404(self.contexts, child)
            self._link(req.context, child)
        return v1.AddContextChildrenResponse()

    def _link(self, parent: str, child: str) -> None:
        """Records parent -> child, and the child's `parent_contexts` as Vertex reports it."""
        children = self._children.setdefault(parent, [])
        if child not in children:
            children.append(child)
            self.contexts[child].parent_contexts.append(parent)


def unexpected(method: str, client: str) -> Callable[..., Any]:
    """A client method that fails the test instead of calling Vertex AI."""

    def call(self: Any, *args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"unexpected Vertex call: {method} on {client}, args={args}, kwargs={kwargs}")

    call.__name__ = method
    return call


@contextlib.contextmanager
def fake_vertex(monkeypatch: pytest.MonkeyPatch, project: str = PROJECT,
                region: str = REGION) -> Iterator[FakeVertex]:
    """The real SDK, initialised with anonymous credentials, talking to a FakeVertex.

    `PipelineJob.submit` creates its pipeline-root bucket with google-cloud-storage,
    so the caller points that at an emulator. The SDK's checks around that bucket are
    answered here: Cloud Resource Manager's project number is PROJECT_NUMBER, and an
    existing bucket counts as the project's own (the emulator has no projects: every
    bucket reports number 1234, which the SDK would log as a bucket-squatting error).
    On exit the SDK config is reset; the patches are undone with `monkeypatch`.
    """
    fake = FakeVertex(project, region)
    fake.install(monkeypatch)
    monkeypatch.setattr(resource_manager_utils, "get_project_number", lambda *a, **k: PROJECT_NUMBER)
    monkeypatch.setattr(gcs_utils, "_verify_bucket_ownership", lambda *a, **k: True)
    reset_sdk_config()
    aiplatform.init(project=project, location=region, credentials=AnonymousCredentials())
    try:
        yield fake
    finally:
        reset_sdk_config()


@pytest.fixture
def vertex_api(monkeypatch: pytest.MonkeyPatch, gcs_emulator: Any) -> Iterator[FakeVertex]:
    """`fake_vertex` for PROJECT/REGION, with the pipeline-root bucket in the GCS emulator."""
    with fake_vertex(monkeypatch) as fake:
        yield fake


def reset_sdk_config() -> None:
    """Back to the SDK's import-time config: no project, location, credentials or experiment.

    In place, because `aiplatform.init` is bound to the `global_config` object itself.
    """
    initializer.global_config.__init__()
    experiment_tracker.reset()

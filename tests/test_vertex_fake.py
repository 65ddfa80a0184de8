"""The in-memory Vertex AI of `vertex_fake`, driven through the real google-cloud-aiplatform SDK."""

import pytest
from google.api_core import exceptions
from google.auth.credentials import AnonymousCredentials
from google.cloud import aiplatform, aiplatform_v1 as v1, aiplatform_v1beta1 as v1beta1
from google.cloud.aiplatform import initializer
from kfp import compiler, dsl
from vertex_fake import FAKED, PROJECT, REGION, FakeVertex, fake_vertex, faked_clients, rpc_names

LOCATION = f"projects/{PROJECT}/locations/{REGION}"
MODEL = f"{LOCATION}/models/m"
SA = "sa@p.iam.gserviceaccount.com"


def upload(**kw) -> aiplatform.Model:
    """`Model.upload` of a custom serving container, as the release code does it."""
    return aiplatform.Model.upload(**{
        "display_name": "visrec", "artifact_uri": "gs://b/x", "serving_container_image_uri": "img",
        "serving_container_invoke_route_prefix": "/*", "serving_container_health_route": "/healthz",
        "sync": True, **kw})


def deploy(endpoint: aiplatform.Endpoint, model: aiplatform.Model, **kw) -> None:
    endpoint.deploy(model, machine_type="n1-standard-4", min_replica_count=1, max_replica_count=2,
                    service_account=SA, **kw)


def deployed_id(fake: FakeVertex, version: str) -> str:
    return next(d.id for d in fake.endpoint("visrec-ep").deployed_models if d.model_version_id == version)


@pytest.fixture
def two_versions(vertex_api) -> FakeVertex:
    upload(model_id="m")
    upload(parent_model=MODEL, is_default_version=False, version_aliases=["challenger"])
    return vertex_api


@pytest.fixture
def endpoint(vertex_api) -> aiplatform.Endpoint:
    return aiplatform.Endpoint.create(
        endpoint_id="visrec-ep", display_name="visrec", dedicated_endpoint_enabled=True,
        enable_request_response_logging=True, request_response_logging_sampling_rate=0.1,
        request_response_logging_bq_destination_table="bq://p.d.t")


@dsl.container_component
def echo(msg: str):
    return dsl.ContainerSpec(image="alpine", command=["echo"], args=[msg])


@dsl.pipeline(name="tiny-pipeline")
def tiny(msg: str = "hi", n: int = 1):
    first = echo(msg=msg)
    echo(msg="second").after(first).set_caching_options(False)


@pytest.fixture
def template(tmp_path) -> str:
    path = tmp_path / "tiny.yaml"
    compiler.Compiler().compile(tiny, str(path))
    return str(path)


def caching(request: v1.CreatePipelineJobRequest) -> dict[str, dict]:
    tasks = request.pipeline_job.pipeline_spec["root"]["dag"]["tasks"]
    return {name: dict(task.get("cachingOptions", {})) for name, task in tasks.items()}


# --- model registry --------------------------------------------------------------------------

def test_upload_creates_model_then_versions(vertex_api):
    first = upload(model_id="m")
    assert (first.resource_name, first.version_id, first.version_aliases) == (MODEL, "1", ["default"])
    second = upload(parent_model=MODEL, is_default_version=False, version_aliases=["challenger"])
    assert (second.resource_name, second.version_id) == (MODEL, "2")
    assert vertex_api.model_versions("m") == {"1": ["default"], "2": ["challenger"]}

    first_req, second_req = vertex_api.requests_of("upload_model")
    assert (first_req.parent, first_req.model_id, first_req.parent_model) == (LOCATION, "m", "")
    assert list(first_req.model.version_aliases) == ["default"]  # the SDK adds it: is_default_version=True
    assert second_req.parent_model == MODEL and list(second_req.model.version_aliases) == ["challenger"]
    spec = second_req.model.container_spec
    assert (spec.image_uri, spec.invoke_route_prefix, spec.health_route) == ("img", "/*", "/healthz")
    assert second_req.model.artifact_uri == "gs://b/x"
    assert list(first.supported_deployment_resources_types) == [v1.Model.DeploymentResourcesType.DEDICATED_RESOURCES]


def test_upload_refuses_existing_id_and_absent_parent(vertex_api):
    upload(model_id="m")
    with pytest.raises(exceptions.AlreadyExists):
        upload(model_id="m")
    with pytest.raises(exceptions.NotFound):
        upload(parent_model=f"{LOCATION}/models/nope")
    with pytest.raises(exceptions.PermissionDenied):  # the fake serves PROJECT/REGION only
        upload(model_id="elsewhere", project="other-proj")
    assert vertex_api.model_versions("m") == {"1": ["default"]}


def test_default_version_moves_on_upload(two_versions):
    third = upload(parent_model=MODEL, version_aliases=["candidate"])  # is_default_version=True
    assert third.version_id == "3"
    assert two_versions.model_versions("m") == {"1": [], "2": ["challenger"], "3": ["candidate", "default"]}
    assert aiplatform.Model(MODEL).version_id == "3"


def test_get_model_by_version_alias_and_default(two_versions):
    assert aiplatform.Model(MODEL).version_id == "1"
    assert aiplatform.Model(f"{MODEL}@2").version_id == "2"
    assert aiplatform.Model(f"{MODEL}@challenger").version_id == "2"
    assert aiplatform.Model("m", version="challenger").version_id == "2"
    assert two_versions.requests_of("get_model")[-1].name == f"{MODEL}@challenger"
    for absent in (f"{LOCATION}/models/nope", f"{MODEL}@9", f"{MODEL}@champion"):
        with pytest.raises(exceptions.NotFound):
            aiplatform.Model(absent)


def test_version_aliases_move_and_default_stays(two_versions):
    registry = aiplatform.Model(MODEL).versioning_registry
    registry.add_version_aliases(["champion", "default"], version="2")
    assert two_versions.model_versions("m") == {"1": [], "2": ["challenger", "champion", "default"]}
    (merge,) = two_versions.requests_of("merge_version_aliases")
    assert (merge.name, list(merge.version_aliases)) == (f"{MODEL}@2", ["champion", "default"])
    assert aiplatform.Model(f"{MODEL}@champion").version_id == "2"

    registry.add_version_aliases(["champion"], version="1")
    registry.remove_version_aliases(["challenger"], version="2")
    assert two_versions.model_versions("m") == {"1": ["champion"], "2": ["default"]}
    with pytest.raises(exceptions.FailedPrecondition):
        registry.remove_version_aliases(["default"], version="2")
    with pytest.raises(exceptions.InvalidArgument):
        registry.add_version_aliases(["7"], version="1")  # would be ambiguous with a version id
    versions = {v.version_id: list(v.version_aliases) for v in registry.list_versions()}
    assert versions == {"1": ["champion"], "2": ["default"]}


# --- endpoints -------------------------------------------------------------------------------

def test_create_endpoint(vertex_api, endpoint):
    assert endpoint.resource_name == f"{LOCATION}/endpoints/visrec-ep"
    stored = vertex_api.endpoint("visrec-ep")
    assert stored.dedicated_endpoint_dns == f"visrec-ep.{REGION}-123456789.prediction.vertexai.goog"
    logging = stored.predict_request_response_logging_config
    assert (logging.enabled, logging.sampling_rate, logging.bigquery_destination.output_uri) == \
        (True, pytest.approx(0.1), "bq://p.d.t")
    (create,) = vertex_api.requests_of("create_endpoint")
    assert (create.parent, create.endpoint_id, create.endpoint.dedicated_endpoint_enabled) == \
        (LOCATION, "visrec-ep", True)
    assert aiplatform.Endpoint("visrec-ep").dedicated_endpoint_dns == stored.dedicated_endpoint_dns
    with pytest.raises(exceptions.AlreadyExists):
        aiplatform.Endpoint.create(endpoint_id="visrec-ep", display_name="again")

    vertex_api.clear()
    absent = aiplatform.Endpoint(f"{LOCATION}/endpoints/nope")
    assert vertex_api.requests == []  # the SDK's Endpoint(...) is lazy: the first use fetches it
    with pytest.raises(exceptions.NotFound):
        absent.list_models()


def test_long_running_operations_come_back_done(vertex_api, endpoint):
    lro = endpoint.api_client.create_endpoint(parent=LOCATION, endpoint=v1.Endpoint(display_name="other"))
    assert lro.done() and lro.operation.name.startswith(f"{LOCATION}/endpoints/")
    created = lro.result()
    assert created.name == lro.operation.name.split("/operations/")[0]
    assert vertex_api.endpoint(created.name).display_name == "other"


def test_deploy_split_update_undeploy(two_versions, endpoint):
    fake = two_versions
    deploy(endpoint, aiplatform.Model(MODEL), traffic_percentage=100)
    first = deployed_id(fake, "1")
    assert fake.traffic("visrec-ep") == {first: 100}
    request = fake.requests_of("deploy_model")[0]
    assert dict(request.traffic_split) == {"0": 100}  # the SDK names the model being deployed "0"
    assert request.deployed_model.model == f"{MODEL}@1"  # the SDK sends the versioned name
    assert request.deployed_model.service_account == SA
    resources = request.deployed_model.dedicated_resources
    assert (resources.machine_spec.machine_type, resources.min_replica_count, resources.max_replica_count) == \
        ("n1-standard-4", 1, 2)
    stored = fake.endpoint("visrec-ep").deployed_models[0]
    assert (stored.model, stored.model_version_id, stored.display_name) == (MODEL, "1", "visrec")

    deploy(endpoint, aiplatform.Model(f"{MODEL}@challenger"), traffic_split={first: 90, "0": 10})
    second = deployed_id(fake, "2")
    assert dict(fake.requests_of("deploy_model")[1].traffic_split) == {first: 90, "0": 10}
    assert fake.traffic("visrec-ep") == endpoint.traffic_split == {first: 90, second: 10}
    refs = aiplatform.Model(f"{MODEL}@2").gca_resource.deployed_models
    assert [(r.endpoint, r.deployed_model_id) for r in refs] == [(endpoint.resource_name, second)]

    endpoint.update(traffic_split={first: 0, second: 100})
    (update,) = fake.requests_of("update_endpoint")
    assert list(update.update_mask.paths) == ["traffic_split"]
    assert fake.traffic("visrec-ep") == {first: 0, second: 100}

    endpoint.undeploy(first)
    (undeploy,) = fake.requests_of("undeploy_model")
    assert (undeploy.deployed_model_id, dict(undeploy.traffic_split)) == (first, {second: 100})
    assert [d.id for d in fake.endpoint("visrec-ep").deployed_models] == [second]
    endpoint.undeploy(second)
    assert fake.endpoint("visrec-ep").deployed_models == [] and fake.traffic("visrec-ep") == {}


def test_traffic_percentage_scales_the_others_and_undeploy_all(two_versions, endpoint):
    fake = two_versions
    deploy(endpoint, aiplatform.Model(MODEL), traffic_percentage=100)
    first = deployed_id(fake, "1")
    aiplatform.Model(f"{MODEL}@2").deploy(endpoint=endpoint, traffic_percentage=10, machine_type="n1-standard-4")
    assert dict(fake.requests_of("deploy_model")[1].traffic_split) == {first: 90, "0": 10}
    assert fake.traffic("visrec-ep") == {first: 90, deployed_id(fake, "2"): 10}
    endpoint.undeploy_all()
    assert fake.endpoint("visrec-ep").deployed_models == [] and fake.traffic("visrec-ep") == {}


def test_invalid_traffic_splits_are_refused(two_versions, endpoint):
    fake = two_versions
    deploy(endpoint, aiplatform.Model(MODEL), traffic_percentage=100)
    first = deployed_id(fake, "1")
    with pytest.raises(exceptions.InvalidArgument):  # names a model that is not deployed
        endpoint.update(traffic_split={first: 50, "999": 50})
    with pytest.raises(exceptions.InvalidArgument):
        endpoint.api_client.update_endpoint(endpoint=v1.Endpoint(name=endpoint.resource_name,
                                                                traffic_split={first: 90}),
                                            update_mask={"paths": ["traffic_split"]})
    with pytest.raises(exceptions.InvalidArgument):  # sums to 110
        endpoint.api_client.deploy_model(endpoint=endpoint.resource_name, traffic_split={first: 100, "0": 10},
                                         deployed_model=fake.requests_of("deploy_model")[0].deployed_model)
    with pytest.raises(exceptions.InvalidArgument):  # gives the model being undeployed traffic
        endpoint.api_client.undeploy_model(endpoint=endpoint.resource_name, deployed_model_id=first,
                                           traffic_split={first: 100})
    assert fake.traffic("visrec-ep") == {first: 100} and len(fake.endpoint("visrec-ep").deployed_models) == 1


def test_first_deploy_needs_traffic(two_versions, endpoint):
    deployed_model = v1.DeployedModel(
        model=f"{MODEL}@1", dedicated_resources={"machine_spec": {"machine_type": "n1-standard-4"},
                                                 "min_replica_count": 1, "max_replica_count": 1})
    with pytest.raises(exceptions.InvalidArgument):
        endpoint.api_client.deploy_model(endpoint=endpoint.resource_name, deployed_model=deployed_model)
    assert two_versions.endpoint("visrec-ep").deployed_models == []


# --- pipelines, schedules, experiments ------------------------------------------------------

def test_submit_records_request_and_links_experiment(vertex_api, template):
    job = aiplatform.PipelineJob(display_name="tiny", template_path=template, job_id="tiny-1",
                                 pipeline_root="gs://visrec-root/runs", parameter_values={"msg": "yo", "n": 3})
    job.submit(service_account=SA, experiment="exp-a")

    (create,) = vertex_api.requests_of("create_pipeline_job")
    assert (create.parent, create.pipeline_job_id) == (LOCATION, "tiny-1")
    runtime = create.pipeline_job.runtime_config
    assert dict(runtime.parameter_values) == {"msg": "yo", "n": 3}
    assert runtime.gcs_output_directory == "gs://visrec-root/runs"
    assert create.pipeline_job.service_account == SA
    assert caching(create) == {"echo": {"enableCache": True}, "echo-2": {}}  # enable_caching=None: as compiled

    name = f"{LOCATION}/pipelineJobs/tiny-1"
    assert job.resource_name == name and job.state == v1.PipelineState.PIPELINE_STATE_PENDING
    store = f"{LOCATION}/metadataStores/default"
    run = f"{store}/contexts/tiny-1"
    assert vertex_api.context_children("exp-a") == [run]
    experiment = vertex_api.contexts[f"{store}/contexts/exp-a"]
    assert experiment.schema_title == "system.Experiment"
    assert vertex_api.requests_of("add_context_children")[0].child_contexts == [run]
    assert job.get_associated_experiment().name == "exp-a"

    task = v1.PipelineTaskDetail(task_name="echo", state=v1.PipelineTaskDetail.State.SUCCEEDED)
    vertex_api.set_pipeline_job("tiny-1", state=v1.PipelineState.PIPELINE_STATE_SUCCEEDED, task_details=[task])
    job.wait()
    assert job.done() and not job.has_failed
    assert [t.task_name for t in job.task_details] == ["echo"]


def test_experiment_get_or_create_updates_description(vertex_api):
    aiplatform.Experiment.get_or_create("exp-b", description="first")
    aiplatform.Experiment.get_or_create("exp-b", description="second")
    (update,) = vertex_api.requests_of("update_context")
    assert update.context.description == "second"
    assert vertex_api.contexts[f"{LOCATION}/metadataStores/default/contexts/exp-b"].description == "second"


def test_enable_caching_rewrites_every_task(vertex_api, template):
    aiplatform.PipelineJob(display_name="tiny", template_path=template, job_id="tiny-2",
                           pipeline_root="gs://visrec-root/runs", enable_caching=True).submit(service_account=SA)
    (create,) = vertex_api.requests_of("create_pipeline_job")
    assert caching(create) == {"echo": {"enableCache": True}, "echo-2": {"enableCache": True}}


def test_schedule_lifecycle(vertex_api, template):
    job = aiplatform.PipelineJob(display_name="tiny", template_path=template,
                                 pipeline_root="gs://visrec-root/runs", parameter_values={"n": 2})
    schedule = job.create_schedule(cron="TZ=Asia/Tokyo 0 3 * * 1", display_name="weekly",
                                   max_concurrent_run_count=1, service_account=SA)
    (create,) = vertex_api.requests_of("create_schedule")
    assert (create.parent, create.schedule.cron, create.schedule.max_concurrent_run_count) == \
        (LOCATION, "TZ=Asia/Tokyo 0 3 * * 1", 1)
    pipeline_request = create.schedule.create_pipeline_job_request
    assert pipeline_request.parent == LOCATION
    assert dict(pipeline_request.pipeline_job.runtime_config.parameter_values) == {"n": 2}
    assert pipeline_request.pipeline_job.service_account == SA

    (listed,) = aiplatform.PipelineJobSchedule.list()
    assert (listed.resource_name, listed.display_name, listed.cron) == (schedule.resource_name, "weekly",
                                                                         "TZ=Asia/Tokyo 0 3 * * 1")
    assert listed.state == v1.Schedule.State.ACTIVE
    listed.pause()
    assert schedule.state == v1.Schedule.State.PAUSED
    with pytest.raises(exceptions.FailedPrecondition):
        listed.pause()
    listed.resume()
    assert schedule.state == v1.Schedule.State.ACTIVE
    listed.delete()
    assert aiplatform.PipelineJobSchedule.list() == []
    with pytest.raises(exceptions.NotFound):
        aiplatform.PipelineJobSchedule.get(schedule.resource_name)


# --- the fake's guard rails -----------------------------------------------------------------

def test_unfaked_rpc_raises(vertex_api):
    with pytest.raises(AssertionError, match="unexpected Vertex call: list_models on aiplatform_v1.ModelServiceClient"):
        aiplatform.Model.list()
    with pytest.raises(AssertionError, match="unexpected Vertex call: list_pipeline_jobs"):
        aiplatform.PipelineJob.list()
    shared = aiplatform.Endpoint.create(display_name="shared")  # not dedicated: predicts over GAPIC
    with pytest.raises(AssertionError, match="unexpected Vertex call: predict on aiplatform_v1.PredictionService"):
        shared.predict(instances=[{"x": 1}])


def test_v1beta1_clients_are_guarded_too(vertex_api):
    client = v1beta1.services.model_service.ModelServiceClient(credentials=AnonymousCredentials())
    with pytest.raises(AssertionError, match="unexpected Vertex call: get_model on aiplatform_v1beta1.ModelService"):
        client.get_model(name=MODEL)


def test_every_faked_rpc_is_a_v1_method_with_a_handler():
    v1_methods = {name for cls in faked_clients() for name in rpc_names(cls)}
    assert FAKED <= v1_methods
    assert all(callable(getattr(FakeVertex, f"_{name}", None)) for name in FAKED)


def test_fake_vertex_scopes_the_sdk_config(monkeypatch):
    with fake_vertex(monkeypatch, project="other-proj", region="europe-west4") as fake:
        assert (initializer.global_config.project, initializer.global_config.location) == \
            ("other-proj", "europe-west4")
        upload(model_id="m")
        assert fake.requests_of("upload_model")[0].parent == "projects/other-proj/locations/europe-west4"
        fake.clear()
        assert fake.requests == [] and fake.model_versions("m") == {"1": ["default"]}
    assert initializer.global_config._project is None and initializer.global_config._credentials is None

"""Vertex AI Pipelines submit / schedule / experiments, through the real google-cloud-aiplatform SDK.

The compiled pipeline is handed to the real `PipelineJob` and `PipelineJobSchedule`; only
the GAPIC transport is fake (`vertex_fake`), so these tests see what the SDK itself does
to the arguments (it rewrites every task's caching option when `enable_caching` is
passed) and assert on the CreatePipelineJob / CreateSchedule requests Vertex would get.
"""

from __future__ import annotations

import pytest
import yaml
from google.cloud import aiplatform_v1 as v1
from google.protobuf import json_format
from vertex_fake import PROJECT, REGION

from visrec.cli import main
from visrec.core.errors import UserError
from visrec.orchestration.vertex_pipelines import (VertexPipelineConfig, associate_with_experiment, pipeline_job_kwargs,
                                     schedule_kwargs, validate_cron)

# Tasks that decide (never cached) and tasks that compute from the data (cached by its fingerprint).
DECISION_TASKS = ("resolve-data", "resolve-champion", "evaluate", "gate-decision", "deploy", "record-rejection",
                  "record-run", "join-experiment")
DATA_TASKS = ("prepare-dataset", "train", "embed", "embed-2", "build-index")


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("template") / "pipeline.yaml"
    assert main(["compile", "--out", str(out)]) == 0
    return str(out)


@pytest.fixture
def run_config(tmp_path, template, gcs_emulator) -> str:
    """A vertex run config naming the compiled template and a pipeline root in the emulator."""
    path = tmp_path / "vertex.yaml"
    path.write_text(yaml.safe_dump({
        "vertex": {"project": PROJECT, "region": REGION, "pipeline_root": f"gs://{gcs_emulator()}/root",
                   "template_path": template, "service_account": "runner@my-proj.iam.gserviceaccount.com"},
        "parameters": {"listings_uri": "gs://data/listings/", "interactions_uri": "gs://data/impressions/",
                       "registry": "gs://data/registry", "epochs": 5}}))
    return str(path)


def spec_of(pipeline_job: v1.PipelineJob) -> dict:
    return json_format.MessageToDict(type(pipeline_job).pb(pipeline_job))["pipelineSpec"]


def tasks_of(spec: dict) -> dict[str, dict]:
    """Every task of a pipeline spec, sub-DAGs (exit handler, branches) flattened, by name."""
    found = {}
    for component in [spec["root"], *spec["components"].values()]:
        found.update(component.get("dag", {}).get("tasks", {}))
    return found


def caching(spec: dict) -> dict[str, bool]:
    return {name: bool(task.get("cachingOptions", {}).get("enableCache")) for name, task in tasks_of(spec).items()}


def test_submit_keeps_each_tasks_caching_option(vertex_api, run_config, capsys):
    assert main(["submit", "--config", run_config, "--data-snapshot", "2026-11-30"]) == 0
    [request] = vertex_api.requests_of("create_pipeline_job")
    assert request.parent == f"projects/{PROJECT}/locations/{REGION}"
    assert request.pipeline_job.service_account == "runner@my-proj.iam.gserviceaccount.com"
    cached = caching(spec_of(request.pipeline_job))
    assert not any(cached[name] for name in DECISION_TASKS), cached
    assert all(cached[name] for name in DATA_TASKS), cached
    params = dict(request.pipeline_job.runtime_config.parameter_values)
    assert params["listings_uri"] == "gs://data/listings/" and params["data_snapshot"] == "2026-11-30"
    assert request.pipeline_job.runtime_config.gcs_output_directory.endswith("/root")
    assert "pipelineJobs/" in capsys.readouterr().out


@pytest.mark.parametrize("flag, expected", [("--no-cache", False), ("--cache", True)])
def test_cache_flags_override_every_task(vertex_api, run_config, flag, expected):
    assert main(["submit", "--config", run_config, flag]) == 0
    [request] = vertex_api.requests_of("create_pipeline_job")
    assert set(caching(spec_of(request.pipeline_job)).values()) == {expected}


def test_data_tasks_are_keyed_by_the_resolved_data(vertex_api, run_config):
    """What a retraining reads and its cache key come from `resolve-data`, not from frozen parameters."""
    assert main(["submit", "--config", run_config]) == 0
    [request] = vertex_api.requests_of("create_pipeline_job")
    tasks = tasks_of(spec_of(request.pipeline_job))
    for name in ("prepare-dataset", "embed", "embed-2"):
        fingerprint = tasks[name]["inputs"]["parameters"]["data_fingerprint"]
        assert fingerprint["taskOutputParameter"] == {"producerTask": "resolve-data",
                                                      "outputParameterKey": "listings_fingerprint"}, name
    importers = {t["taskInfo"]["name"]: t for t in tasks.values() if t["componentRef"]["name"].startswith("comp-importer")}
    assert importers["listings"]["inputs"]["parameters"]["uri"]["taskOutputParameter"]["producerTask"] == "resolve-data"
    assert importers["impression logs"]["inputs"]["parameters"]["uri"]["taskOutputParameter"][
        "outputParameterKey"] == "interactions_uri"
    artifacts = tasks["prepare-dataset"]["inputs"]["artifacts"]["listings"]["taskOutputArtifact"]
    assert tasks[artifacts["producerTask"]]["taskInfo"]["name"] == "listings"


def test_schedule_request_keeps_caching_and_carries_the_experiment(vertex_api, run_config, capsys):
    assert main(["schedule", "--config", run_config, "--cron", "TZ=Asia/Tokyo 0 3 * * 1", "--name", "weekly",
                 "--experiment", "weekly-retraining"]) == 0
    [request] = vertex_api.requests_of("create_schedule")
    schedule = request.schedule
    assert schedule.cron == "TZ=Asia/Tokyo 0 3 * * 1" and schedule.display_name == "weekly"
    assert schedule.max_concurrent_run_count == 1
    job = schedule.create_pipeline_job_request.pipeline_job
    assert job.service_account == "runner@my-proj.iam.gserviceaccount.com"
    cached = caching(spec_of(job))
    assert not any(cached[name] for name in DECISION_TASKS) and all(cached[name] for name in DATA_TASKS)
    params = dict(job.runtime_config.parameter_values)
    # No frozen data version: each scheduled run resolves the newest data itself.
    assert "data_snapshot" not in params and params["listings_uri"] == "gs://data/listings/"
    assert params["experiment"] == "weekly-retraining"  # the request has no field for it; the run joins itself
    assert "created schedule" in capsys.readouterr().out


def test_submit_with_an_experiment_links_the_run(vertex_api, run_config):
    assert main(["submit", "--config", run_config, "--experiment", "siglip-retraining"]) == 0
    [request] = vertex_api.requests_of("create_pipeline_job")
    assert "experiment" not in dict(request.pipeline_job.runtime_config.parameter_values)
    [created] = vertex_api.requests_of("create_context")
    assert created.context_id == "siglip-retraining" and created.context.schema_title == "system.Experiment"
    job = vertex_api.pipeline_jobs[next(iter(vertex_api.pipeline_jobs))]
    assert vertex_api.context_children("siglip-retraining") == [job.job_detail.pipeline_run_context.name]


def test_a_scheduled_run_joins_its_experiment(vertex_api, run_config):
    """What the pipeline's `join-experiment` task does for a run the schedule created."""
    assert main(["submit", "--config", run_config]) == 0
    name = next(iter(vertex_api.pipeline_jobs))
    context = associate_with_experiment(name, "weekly-retraining")
    assert context.endswith("/contexts/weekly-retraining")
    assert vertex_api.context_children("weekly-retraining") == [
        vertex_api.pipeline_jobs[name].job_detail.pipeline_run_context.name]
    with pytest.raises(UserError, match="not a Vertex AI pipeline job"):
        associate_with_experiment("local-pipeline-1", "weekly-retraining")


def test_a_failed_run_is_recorded_with_its_failed_task(vertex_api, run_config, tmp_path, capsys):
    from visrec.orchestration.runs import list_runs, record_run

    assert main(["submit", "--config", run_config]) == 0
    name = next(iter(vertex_api.pipeline_jobs))
    state = v1.PipelineTaskDetail.State
    vertex_api.set_pipeline_job(name, state=v1.PipelineState.PIPELINE_STATE_FAILED, task_details=[
        v1.PipelineTaskDetail(task_name="prepare-dataset", state=state.SUCCEEDED),
        v1.PipelineTaskDetail(task_name="train", state=state.FAILED)])
    registry = str(tmp_path / "registry")
    record_run(registry, "FAILED", name, error="The DAG failed because some tasks failed.")
    [run] = list_runs(registry)
    assert run["run"] == name and run["state"] == "FAILED" and run["failed_tasks"] == ["train"]
    assert main(["runs", "--registry", registry]) == 1  # the newest run failed: a cron wrapper notices
    out = capsys.readouterr().out
    assert "FAILED" in out and "failed: train" in out and "some tasks failed" in out


def test_schedules_pause_resume_delete_only_the_named_one(vertex_api, run_config, capsys):
    for name in ("weekly", "daily"):
        assert main(["schedule", "--config", run_config, "--cron", "0 3 * * 1", "--name", name]) == 0
    vertex_api.clear()
    assert main(["schedules", "pause", "weekly", "--project", PROJECT, "--region", REGION]) == 0
    [paused] = vertex_api.requests_of("pause_schedule")
    assert paused.name == next(n for n, s in vertex_api.schedules.items() if s.display_name == "weekly")
    assert {s.display_name: s.state.name for s in vertex_api.schedules.values()} == {"weekly": "PAUSED",
                                                                                    "daily": "ACTIVE"}
    assert main(["schedules", "resume", "weekly", "--project", PROJECT, "--region", REGION]) == 0
    assert main(["schedules", "delete", "nope", "--project", PROJECT, "--region", REGION]) == 2
    assert main(["schedules", "delete", "daily", "--project", PROJECT, "--region", REGION]) == 0
    assert [s.display_name for s in vertex_api.schedules.values()] == ["weekly"]
    capsys.readouterr()
    assert main(["schedules", "--project", PROJECT, "--region", REGION]) == 0
    assert "weekly" in capsys.readouterr().out


# ---- keyword arguments and validation ----------------------------------------------------------


def _config(**kw):
    base = dict(project="my-proj", region="us-central1", pipeline_root="gs://bucket/root",
                template_path="gs://bucket/templates/abc123/pipeline.yaml",
                parameter_values={"listings_uri": "gs://b/listings/"},
                service_account="runner@my-proj.iam.gserviceaccount.com")
    base.update(kw)
    return VertexPipelineConfig(**base)


def test_enable_caching_is_passed_only_as_an_override():
    assert "enable_caching" not in pipeline_job_kwargs(_config())
    assert pipeline_job_kwargs(_config(enable_caching=False))["enable_caching"] is False


@pytest.mark.parametrize("bad", [dict(pipeline_root="/local/root"), dict(project=""), dict(labels={"App": "x"}),
                                 dict(experiment="Not_Valid")])
def test_invalid_configs_fail_before_any_request(bad):
    with pytest.raises(UserError):
        pipeline_job_kwargs(_config(**bad))


def test_cron_validation():
    assert validate_cron("0 3 * * 1") == "0 3 * * 1"
    assert validate_cron("TZ=Asia/Tokyo 0 3 * * MON") == "TZ=Asia/Tokyo 0 3 * * MON"
    for bad in ("every monday", "0 3 * *", "0 3 * * 1 2"):
        with pytest.raises(UserError):
            validate_cron(bad)


def test_schedule_kwargs_default_to_one_concurrent_run():
    assert schedule_kwargs(_config(), "0 3 * * 1") == {
        "cron": "0 3 * * 1", "display_name": "visual-recommender-schedule", "max_concurrent_run_count": 1,
        "service_account": "runner@my-proj.iam.gserviceaccount.com"}


def test_default_config_names_the_paper_defaults(vertex_api, template):
    """Without --config, visrec/configs/vertex.yaml supplies the run: paper hyper-parameters, real checkpoints."""
    assert main(["submit", "--template", template, "--pipeline-root", "gs://x/root", "--project", PROJECT,
                 "--region", REGION]) == 0
    [request] = vertex_api.requests_of("create_pipeline_job")
    runtime = request.pipeline_job.runtime_config
    params = json_format.MessageToDict(type(runtime).pb(runtime))["parameterValues"]
    assert params["siglip_model"] == "google/siglip-base-patch16-256-multilingual"
    assert params["baseline_model"] == "google/mobilenet_v2_1.4_224"
    assert (params["epochs"], params["batch_size"], params["lr"], params["pca_dims"]) == (5, 256, 5e-5, 128)
    assert params["train_accelerator_type"] == "NVIDIA_L4" and params["vertex_model_id"] == "visrec-similar-items"

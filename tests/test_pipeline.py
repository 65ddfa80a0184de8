"""The compiled pipeline graph: tasks, dependencies, the gate branch, resources, images, Cloud Build."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from components.images import IMAGES, REGISTRY, TAG
from visrec.cli import main
from visrec.core import io

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ir(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("ir") / "pipeline.yaml"
    assert main(["compile", "--out", str(out)]) == 0
    return yaml.safe_load(out.read_text())


def _tasks(ir: dict) -> dict:
    """Every task of the graph, branches flattened, by name."""
    found = {}

    def walk(tasks: dict) -> None:
        for name, task in tasks.items():
            found[name] = task
            ref = task.get("componentRef", {}).get("name", "")
            sub = ir["components"].get(ref, {}).get("dag")
            if sub:
                walk(sub["tasks"])

    walk(ir["root"]["dag"]["tasks"])
    return found


def _executor(ir: dict, task: dict) -> dict:
    comp = ir["components"][task["componentRef"]["name"]]
    return ir["deploymentSpec"]["executors"][comp["executorLabel"]]


def test_graph_has_every_stage_in_order(ir):
    tasks = _tasks(ir)
    deps = {name: set(t.get("dependentTasks", [])) for name, t in tasks.items()}
    assert {"resolve-data", "prepare-dataset", "train", "embed", "embed-2", "build-index", "evaluate",
            "gate-decision", "deploy", "record-rejection", "resolve-champion", "importer", "importer-2",
            "record-run", "join-experiment"} <= set(tasks)
    assert deps["importer"] == deps["importer-2"] == {"resolve-data"}
    assert deps["prepare-dataset"] == {"importer", "resolve-data"}
    assert deps["train"] == {"prepare-dataset"}
    assert deps["embed"] == {"importer", "resolve-data", "train"}  # candidate: the fine-tuned model
    assert deps["embed-2"] == {"importer", "resolve-data"}          # baseline: in parallel with training
    assert deps["build-index"] == {"embed"}
    assert deps["evaluate"] == {"embed", "embed-2", "importer", "importer-2", "resolve-champion"}
    assert deps["gate-decision"] == {"evaluate"}
    # The candidate embedding task uses the trained model; the baseline names its checkpoint.
    assert tasks["embed"]["inputs"]["artifacts"]["model"]["taskOutputArtifact"]["producerTask"] == "train"
    assert "model" not in tasks["embed-2"]["inputs"].get("artifacts", {})


def test_an_exit_handler_records_every_run(ir):
    """record-run runs after the whole body, success or failure, with the run's final status."""
    root = ir["root"]["dag"]["tasks"]
    assert set(root) == {"exit-handler-1", "record-run"}
    assert root["record-run"]["triggerPolicy"]["strategy"] == "ALL_UPSTREAM_TASKS_COMPLETED"
    assert root["record-run"]["inputs"]["parameters"]["status"]["taskFinalStatus"]["producerTask"] == "exit-handler-1"
    # Everything else is inside the handler.
    assert {"resolve-data", "train", "deploy"} <= set(_tasks(ir)) - set(root)


def test_deploy_and_rejection_branch_on_the_gate_decision(ir):
    tasks = _tasks(ir)
    conditions = {name: t["triggerPolicy"]["condition"] for name, t in tasks.items()
                  if t.get("triggerPolicy", {}).get("condition")}
    gate = "inputs.parameter_values['pipelinechannel--gate-decision-Output'] == 'deploy'"
    assert sorted(conditions.values()) == sorted([
        "inputs.parameter_values['pipelinechannel--experiment'] != ''", gate, f"!({gate})"])
    branch_of = {}
    for name, task in tasks.items():
        sub = ir["components"].get(task.get("componentRef", {}).get("name", ""), {}).get("dag")
        if sub and name in conditions:
            for child in sub["tasks"]:
                branch_of[child] = conditions[name]
    assert branch_of["deploy"] == gate
    assert branch_of["record-rejection"] == f"!({gate})"
    assert branch_of["join-experiment"].startswith("inputs.parameter_values['pipelinechannel--experiment']")


def test_resources_are_pipeline_parameters_with_retries_and_caching(ir):
    from components.resources import TaskResources

    tasks = _tasks(ir)
    params = ir["root"]["inputDefinitions"]["parameters"]

    def channel(name: str) -> str:
        return f"{{{{$.inputs.parameters['pipelinechannel--{name}']}}}}"

    train = _executor(ir, tasks["train"])["container"]["resources"]
    assert train["accelerator"] == {"resourceType": channel("train_accelerator_type"),
                                    "resourceCount": channel("train_accelerator_count")}
    assert train["resourceCpuLimit"] == channel("train_cpu") and train["resourceMemoryLimit"] == channel("train_memory")
    machines = TaskResources()
    assert params["train_accelerator_type"]["defaultValue"] == machines.train_accelerator_type == "NVIDIA_L4"
    assert params["train_accelerator_count"]["defaultValue"] == machines.train_accelerator_count
    for name, cpu in (("prepare-dataset", "beam_cpu"), ("embed", "beam_cpu"), ("embed-2", "beam_cpu"),
                      ("build-index", "index_cpu"), ("evaluate", "evaluate_cpu")):
        res = _executor(ir, tasks[name])["container"]["resources"]
        assert res["resourceCpuLimit"] == channel(cpu) and res["resourceMemoryLimit"], name
    # The sub-DAG around them receives those parameters (kfp 2.17 does not pass them on by itself).
    handler = ir["components"]["comp-exit-handler-1"]["inputDefinitions"]["parameters"]
    assert {f"pipelinechannel--{p}" for p in ("train_cpu", "train_accelerator_type", "beam_memory")} <= set(handler)
    for name in ("train", "prepare-dataset", "embed", "embed-2"):
        assert tasks[name]["retryPolicy"]["maxRetryCount"] >= 1, name
    for name in ("resolve-data", "evaluate", "gate-decision", "deploy", "record-rejection", "resolve-champion",
                 "record-run"):
        assert not tasks[name].get("cachingOptions", {}).get("enableCache"), name
    assert tasks["train"]["cachingOptions"]["enableCache"]


def test_dataflow_launchers_know_their_run_and_task(ir):
    """prepare and both embeddings name their Dataflow job after the run and the task (visrec.stages.dataflow)."""
    tasks = _tasks(ir)
    for name in ("prepare-dataset", "embed", "embed-2"):
        params = tasks[name]["inputs"]["parameters"]
        assert params["pipeline_job"]["runtimeValue"]["constant"] == "{{$.pipeline_job_uuid}}", name
        assert params["pipeline_task"]["runtimeValue"]["constant"] == "{{$.pipeline_task_name}}", name


def test_the_data_fingerprint_keys_the_data_tasks(ir):
    """Each data task takes the resolver's fingerprint; `data_snapshot` is only a label."""
    tasks = _tasks(ir)
    for name in ("prepare-dataset", "embed", "embed-2"):
        ref = tasks[name]["inputs"]["parameters"]["data_fingerprint"]["taskOutputParameter"]
        assert ref == {"producerTask": "resolve-data", "outputParameterKey": "listings_fingerprint"}, name
        assert "data_snapshot" not in tasks[name]["inputs"]["parameters"], name
    params = ir["root"]["inputDefinitions"]["parameters"]
    assert params["data_snapshot"]["defaultValue"] == ""


# Pipeline parameter -> (stage config, field) whose default it must be: a pipeline run trains,
# embeds and gates as the documented stage does.
DEFAULTS_FROM = {
    "epochs": ("visrec.stages.configs", "TrainConfig", "epochs"),
    "batch_size": ("visrec.stages.configs", "TrainConfig", "batch_size"),
    "lr": ("visrec.stages.configs", "TrainConfig", "lr"),
    "warmup_steps": ("visrec.stages.configs", "TrainConfig", "warmup_steps"),
    "max_steps": ("visrec.stages.configs", "TrainConfig", "max_steps"),
    "precision": ("visrec.stages.configs", "TrainConfig", "precision"),
    "train_device": ("visrec.stages.configs", "TrainConfig", "device"),
    "gradient_checkpointing": ("visrec.stages.configs", "TrainConfig", "gradient_checkpointing"),
    "freeze_token_embedding": ("visrec.stages.configs", "TrainConfig", "freeze_token_embedding"),
    "gradient_compression": ("visrec.stages.configs", "TrainConfig", "gradient_compression"),
    "siglip_model": ("visrec.stages.configs", "TrainConfig", "model_uri"),
    "seed": ("visrec.stages.configs", "TrainConfig", "seed"),
    "max_pairs": ("visrec.stages.configs", "PrepareConfig", "max_pairs"),
    "val_fraction": ("visrec.stages.configs", "PrepareConfig", "val_fraction"),
    "image_size": ("visrec.stages.configs", "PrepareConfig", "image_size"),
    "prepare_shards": ("visrec.stages.configs", "PrepareConfig", "shards"),
    "beam_runner": ("visrec.stages.configs", "PrepareConfig", "runner"),
    "embed_batch_size": ("visrec.stages.configs", "EmbedConfig", "batch_size"),
    "pca_dims": ("visrec.stages.configs", "EmbedConfig", "pca_dims"),
    "embed_shards": ("visrec.stages.configs", "EmbedConfig", "shards"),
    "embed_device": ("visrec.stages.configs", "EmbedConfig", "device"),
    "embed_precision": ("visrec.stages.configs", "EmbedConfig", "precision"),
    "embed_share_model": ("visrec.stages.configs", "EmbedConfig", "share_model"),
    "recall_target": ("visrec.stages.index.config", "IndexConfig", "recall_target"),
    "index_k": ("visrec.stages.index.config", "IndexConfig", "k"),
    "max_p99_ms": ("visrec.stages.index.config", "IndexConfig", "max_p99_ms"),
    "bootstrap_resamples": ("visrec.stages.configs", "EvaluateConfig", "bootstrap_resamples"),
    "deploy_target": ("visrec.stages.release.deploy", "DeployConfig", "target"),
    "require_approval": ("visrec.stages.release.deploy", "DeployConfig", "require_approval"),
    "vertex_model_id": ("visrec.stages.release.vertex", "VertexDeployConfig", "model_id"),
    "vertex_endpoint_id": ("visrec.stages.release.vertex", "VertexDeployConfig", "endpoint_id"),
    "serving_machine_type": ("visrec.stages.release.vertex", "VertexDeployConfig", "machine_type"),
    "serving_min_replicas": ("visrec.stages.release.vertex", "VertexDeployConfig", "min_replica_count"),
    "serving_max_replicas": ("visrec.stages.release.vertex", "VertexDeployConfig", "max_replica_count"),
    "canary_percent": ("visrec.stages.release.vertex", "VertexDeployConfig", "canary_percent"),
    "serving_service_account": ("visrec.stages.release.vertex", "VertexDeployConfig", "service_account"),
    "serving_admin_token_uri": ("visrec.stages.release.vertex", "VertexDeployConfig", "admin_token_uri"),
    "partition_key": ("visrec.data.datasource", "ResolveConfig", "partition_key"),
    "done_marker": ("visrec.data.datasource", "ResolveConfig", "done_marker"),
}


@pytest.mark.parametrize("parameter", sorted(DEFAULTS_FROM))
def test_pipeline_defaults_are_the_stage_defaults(ir, parameter):
    import dataclasses
    import importlib

    from visrec.orchestration.pipeline_config import from_kfp

    module, cls_name, field = DEFAULTS_FROM[parameter]
    cls = getattr(importlib.import_module(module), cls_name)
    default = next(f.default for f in dataclasses.fields(cls) if f.name == field)
    compiled = ir["root"]["inputDefinitions"]["parameters"][parameter]["defaultValue"]
    # The compiled default, read back the way a component reads it, is the dataclass default.
    assert from_kfp(cls, **{field: compiled})[field] == default, parameter


def test_components_declare_no_defaults_of_their_own():
    """A component's settings come from the pipeline (whose defaults are the stage's): a default
    written in a component signature could drift from its dataclass unnoticed."""
    import inspect

    from components.build_index import build_index
    from components.deploy import deploy
    from components.embed import embed
    from components.evaluate import evaluate
    from components.prepare_dataset import prepare_dataset
    from components.train import train

    for component in (prepare_dataset, train, embed, build_index, evaluate, deploy):
        defaults = {name: p.default for name, p in inspect.signature(component.python_func).parameters.items()
                    if p.default is not inspect.Parameter.empty}
        # Only the optional-artifact choice of the embed task (trained model or a checkpoint id).
        assert set(defaults) <= {"model", "model_uri"}, (component.name, defaults)


def test_kfp_unset_values_round_trip():
    from visrec.orchestration.pipeline_config import from_kfp, kfp_default
    from visrec.stages.configs import TrainConfig

    assert kfp_default(TrainConfig, "warmup_steps") == -1  # 0 means "no warmup"
    assert from_kfp(TrainConfig, warmup_steps=-1, max_steps=0, precision="") == {
        "warmup_steps": None, "max_steps": None, "precision": None}
    assert from_kfp(TrainConfig, warmup_steps=0, epochs=0)["warmup_steps"] == 0


def test_every_image_is_built_by_cloud_build(ir):
    used = {e["container"]["image"] for e in ir["deploymentSpec"]["executors"].values() if "container" in e}
    build = yaml.safe_load((ROOT / "cloudbuild.yaml").read_text())
    built = {}
    for step in build["steps"]:
        args = step.get("args", [])
        if args[:1] == ["build"]:
            dockerfile = args[args.index("-f") + 1]
            tag = args[args.index("-t") + 1]
            assert (ROOT / dockerfile).exists(), dockerfile
            built[re.sub(r"^\$\{_REGISTRY\}/([a-z]+):\$\{_TAG\}$", r"\1", tag)] = dockerfile
    assert set(built) == set(IMAGES)
    for name, dockerfile in built.items():
        assert dockerfile == f"containers/{name}/Dockerfile"
    assert used <= {f"{REGISTRY}/{name}:{TAG}" for name in IMAGES}
    assert {f"{REGISTRY}/{name}:{TAG}" for name in ("base", "beam", "trainer")} <= used
    # The deploy step names the serving image for Vertex AI.
    deploy_param = _tasks(ir)["deploy"]["inputs"]["parameters"]["serving_image"]
    assert json.dumps(deploy_param).find(f"{REGISTRY}/serving:{TAG}") >= 0
    # Cloud Build compiles with the images it just pushed.
    compile_steps = [s for s in build["steps"] if s.get("entrypoint") == "visrec"]
    for step in compile_steps:
        assert "VISREC_IMAGE_TAG=${_TAG}" in step["env"]
        assert "VISREC_IMAGE_REGISTRY=${_REGISTRY}" in step["env"]
        # The base image's uid 1000 cannot write Cloud Build's root-owned /workspace.
        assert not any(str(arg).startswith("/workspace") for arg in step["args"]), step["args"]
    # Tags exist on a manual `gcloud builds submit` too ($SHORT_SHA is empty there).
    assert build["substitutions"]["_TAG"] == "${BUILD_ID}"
    steps = {step["id"]: step for step in build["steps"]}
    # Nothing is pushed before every image has started its entrypoint on a tiny job.
    assert set(steps["smoke"]["waitFor"]) == {f"build-{name}" for name in IMAGES}
    assert "containers/smoke.py --engine docker --no-build" in steps["smoke"]["args"][-1]
    assert steps["push"]["waitFor"] == ["smoke"]


def test_compile_uploads_the_template_to_gcs(gcs_emulator, tmp_path):
    from visrec.core import io

    bucket = gcs_emulator()
    dest = f"gs://{bucket}/templates/abc123/pipeline.yaml"
    assert main(["compile", "--out", str(tmp_path / "p.yaml"), "--upload", dest]) == 0
    assert yaml.safe_load(io.read_text(dest))["pipelineInfo"]["name"] == "visual-recommender"
    assert main(["compile", "--out", str(tmp_path / "p.yaml"), "--upload", "ftp://nowhere"]) == 2


@pytest.mark.parametrize("name", ["local.yaml", "vertex.yaml"])
def test_config_files_only_name_pipeline_parameters(ir, name):
    """A typo in a config key would otherwise be a silently ignored (or rejected-at-submit) parameter."""
    params = set(ir["root"]["inputDefinitions"]["parameters"])
    config = yaml.safe_load(io.packaged_config(name))
    assert set(config["parameters"]) <= params

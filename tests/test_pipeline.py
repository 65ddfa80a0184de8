"""The compiled pipeline graph: tasks, dependencies, the gate branch, resources, images, Cloud Build."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from components.images import IMAGES, REGISTRY, TAG
from visrec.cli import main

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
    assert {"prepare-dataset", "train", "embed", "embed-2", "build-index", "evaluate", "gate-decision",
            "deploy", "record-rejection", "resolve-champion", "importer"} <= set(tasks)
    assert deps["train"] == {"prepare-dataset"}
    assert deps["embed"] == {"importer", "train"}      # candidate: the fine-tuned model
    assert deps["embed-2"] == {"importer"}             # baseline: in parallel with training
    assert deps["build-index"] == {"embed"}
    assert deps["evaluate"] == {"embed", "embed-2", "resolve-champion"}
    assert deps["gate-decision"] == {"evaluate"}
    # The candidate embedding task uses the trained model; the baseline names its checkpoint.
    assert tasks["embed"]["inputs"]["artifacts"]["model"]["taskOutputArtifact"]["producerTask"] == "train"
    assert "model" not in tasks["embed-2"]["inputs"].get("artifacts", {})


def test_deploy_and_rejection_branch_on_the_gate_decision(ir):
    tasks = _tasks(ir)
    conditions = {name: t["triggerPolicy"]["condition"] for name, t in tasks.items()
                  if t.get("triggerPolicy", {}).get("condition")}
    deploy_branch = [c for c in conditions.values() if c.startswith("inputs.")]
    reject_branch = [c for c in conditions.values() if c.startswith("!(")]
    assert deploy_branch == ["inputs.parameter_values['pipelinechannel--gate-decision-Output'] == 'deploy'"]
    assert reject_branch == [f"!({deploy_branch[0]})"]
    branch_of = {}
    for name, task in tasks.items():
        sub = ir["components"].get(task.get("componentRef", {}).get("name", ""), {}).get("dag")
        if sub and name in conditions:
            for child in sub["tasks"]:
                branch_of[child] = conditions[name]
    assert branch_of["deploy"] == deploy_branch[0]
    assert branch_of["record-rejection"] == reject_branch[0]


def test_resources_retries_and_caching(ir):
    tasks = _tasks(ir)
    train = _executor(ir, tasks["train"])["container"]["resources"]
    assert train["accelerator"]["resourceType"] == "NVIDIA_L4"
    assert train["accelerator"]["resourceCount"] == "1"
    for name in ("prepare-dataset", "embed", "embed-2", "evaluate", "build-index"):
        res = _executor(ir, tasks[name])["container"]["resources"]
        assert res["resourceCpuLimit"] and res["resourceMemoryLimit"], name
    for name in ("train", "prepare-dataset", "embed", "embed-2"):
        assert tasks[name]["retryPolicy"]["maxRetryCount"] >= 1, name
    for name in ("evaluate", "gate-decision", "deploy", "record-rejection", "resolve-champion"):
        assert not tasks[name].get("cachingOptions", {}).get("enableCache"), name
    assert tasks["train"]["cachingOptions"]["enableCache"]


def test_data_snapshot_reaches_the_data_tasks(ir):
    """A new snapshot string changes the cache key of every task that reads the data."""
    tasks = _tasks(ir)
    params = ir["root"]["inputDefinitions"]["parameters"]
    assert "data_snapshot" in params and "defaultValue" not in params["data_snapshot"]
    for name in ("prepare-dataset", "embed", "embed-2"):
        ref = tasks[name]["inputs"]["parameters"]["data_snapshot"]["componentInputParameter"]
        assert ref == "data_snapshot", name
    assert params["epochs"]["defaultValue"] == 5
    assert params["batch_size"]["defaultValue"] == 256
    assert params["lr"]["defaultValue"] == pytest.approx(5e-5)
    assert params["pca_dims"]["defaultValue"] == 128


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
            built[re.sub(r"^\$\{_REGISTRY\}/([a-z]+):\$\{SHORT_SHA\}$", r"\1", tag)] = dockerfile
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
        assert "VISREC_IMAGE_TAG=${SHORT_SHA}" in step["env"]
        assert "VISREC_IMAGE_REGISTRY=${_REGISTRY}" in step["env"]


def test_compile_uploads_the_template_to_gcs(gcs_emulator, tmp_path):
    from visrec import io

    bucket = gcs_emulator()
    dest = f"gs://{bucket}/templates/abc123/pipeline.yaml"
    assert main(["compile", "--out", str(tmp_path / "p.yaml"), "--upload", dest]) == 0
    assert yaml.safe_load(io.read_text(dest))["pipelineInfo"]["name"] == "visual-recommender"
    assert main(["compile", "--out", str(tmp_path / "p.yaml"), "--upload", "ftp://nowhere"]) == 2


@pytest.mark.parametrize("name", ["local.yaml", "vertex.yaml"])
def test_config_files_only_name_pipeline_parameters(ir, name):
    """A typo in a config key would otherwise be a silently ignored (or rejected-at-submit) parameter."""
    params = set(ir["root"]["inputDefinitions"]["parameters"])
    config = yaml.safe_load((ROOT / "configs" / name).read_text())
    assert set(config["parameters"]) <= params

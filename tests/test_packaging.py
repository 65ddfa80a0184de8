"""The package as users install it: a wheel in a fresh virtual environment, away from the checkout."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.integration
def test_an_installed_wheel_finds_its_default_configs_and_compiles(tmp_path):
    """Default configs are package data: an installed wheel reads them and compiles the pipeline."""
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(wheels), str(ROOT)], check=True, capture_output=True)
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                             check=True, capture_output=True, text=True).stdout.strip()
    # Unpacking the wheel is what pip does with it; the dependencies come from this test's
    # environment (PYTHONPATH does not run its .pth files, so the editable checkout stays out).
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", purelib,
                    *map(str, wheels.glob("visrec-*.whl"))], check=True, capture_output=True)
    env = {**os.environ, "PYTHONPATH": sysconfig.get_path("purelib")}
    workdir = tmp_path / "elsewhere"
    workdir.mkdir()

    def run(*code: str) -> str:
        return subprocess.run([str(python), *code], cwd=workdir, env=env, check=True,
                              capture_output=True, text=True).stdout

    where = run("-c", "import visrec; print(visrec.__file__)")
    assert where.startswith(purelib), where
    configs = run("-c", "from visrec.orchestration.pipeline_config import load_run_config\n"
                        "from visrec.stages.evaluate.gate import load_policy\n"
                        "vertex, local = load_run_config(None, 'vertex.yaml'), load_run_config(None, 'local.yaml')\n"
                        "print(vertex['parameters']['train_device'], local['parameters']['epochs'],"
                        " load_policy().thresholds[0].metric)")
    assert configs.split() == ["cuda", "20", "ndcg@5"]
    run("-m", "visrec", "compile", "--out", str(workdir / "pipeline.yaml"))
    assert "visual-recommender" in (workdir / "pipeline.yaml").read_text()

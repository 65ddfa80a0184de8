"""Shared fixtures: a real GCS emulator, a small generated marketplace, tiny models.

Stage-specific fixtures live in each test module; the ones here are expensive and
session-scoped so every module reuses them.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from visrec.core.servers import free_port, stop_process, wait_for_port

# Small CPU machines: keep torch from oversubscribing the cores the Beam workers use.
os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def gcs_emulator():
    """`gcp-storage-emulator` as a real local server; yields a function making a fresh bucket.

    Sets `STORAGE_EMULATOR_HOST` so the real `google-cloud-storage` client (and
    `visrec.core.io`) talk to it.
    """
    port = free_port()
    exe = Path(sys.executable).with_name("gcp-storage-emulator")
    proc = subprocess.Popen([str(exe), "start", "--host=127.0.0.1", f"--port={port}", "--in-memory"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_port(port, proc=proc)
    old = os.environ.get("STORAGE_EMULATOR_HOST")
    os.environ["STORAGE_EMULATOR_HOST"] = f"http://127.0.0.1:{port}"
    from visrec.core import io

    io.gcs_client.cache_clear()
    counter = iter(range(10**6))

    def make_bucket(prefix: str = "visrec-test") -> str:
        name = f"{prefix}-{next(counter)}"
        io.gcs_client().create_bucket(name)
        return name

    try:
        yield make_bucket
    finally:
        stop_process(proc, grace=10)
        io.gcs_client.cache_clear()
        if old is None:
            os.environ.pop("STORAGE_EMULATOR_HOST", None)
        else:
            os.environ["STORAGE_EMULATOR_HOST"] = old


@pytest.fixture(scope="session")
def marketplace(tmp_path_factory) -> Path:
    """A clean 400-item generated marketplace (listings, images, interactions, hidden truth)."""
    from visrec.sim.demo_data import DemoDataConfig, generate_marketplace

    out = tmp_path_factory.mktemp("marketplace")
    generate_marketplace(out, DemoDataConfig(items=400, seed=7))
    return out


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, marketplace) -> Path:
    """`visrec init-models` output: `siglip/` and `mobilenet_v2/` tiny random models."""
    from visrec.model.encoders import init_models

    out = tmp_path_factory.mktemp("models")
    init_models(out, listings_uri=str(marketplace / "listings.jsonl"))
    return out


# The real Vertex AI SDK over a recorded, in-memory transport (tests/vertex_fake.py).
from vertex_fake import vertex_api  # noqa: E402,F401

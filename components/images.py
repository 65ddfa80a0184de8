"""The one place that names the container image each component runs in.

`cloudbuild.yaml` builds every image listed in `IMAGES` from `containers/<name>/Dockerfile`,
checks each (`containers/smoke.py`), pushes it, and compiles the pipeline with
`VISREC_IMAGE_REGISTRY` / `VISREC_IMAGE_TAG` set to the pushed location and the build's `_TAG`,
so a compiled template always names tagged images.
"""

from __future__ import annotations

import os

REGISTRY = os.environ.get("VISREC_IMAGE_REGISTRY", "us-docker.pkg.dev/visrec-project/visrec")
TAG = os.environ.get("VISREC_IMAGE_TAG", "latest")

# Image name -> what runs in it.
IMAGES: dict[str, str] = {
    "base": "library + CPU torch: evaluation, deployment, light stages",
    "beam": "Beam launcher and CPU Dataflow worker (custom container, Beam's boot as entrypoint): prepare, embed",
    "trainer": "CUDA torch: SigLIP fine-tuning on L4/A100/H100, and the GPU Dataflow worker for embedding",
    "serving": "the HTTP similar-items service",
}


def image(name: str) -> str:
    """Full image reference for `name` (one of `IMAGES`)."""
    if name not in IMAGES:
        raise KeyError(f"unknown image {name!r}; known: {sorted(IMAGES)}")
    return f"{REGISTRY}/{name}:{TAG}"


BASE_IMAGE = image("base")
BEAM_IMAGE = image("beam")
TRAINER_IMAGE = image("trainer")
SERVING_IMAGE = image("serving")

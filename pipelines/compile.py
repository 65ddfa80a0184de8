"""Compile the pipeline to KFP IR YAML and upload the template where runs and schedules take it."""

from __future__ import annotations

import logging
from pathlib import Path

from visrec.core import io
from visrec.core.errors import UserError

log = logging.getLogger(__name__)


def compile_pipeline(out: str | Path) -> Path:
    """Write the pipeline's IR YAML to `out` (images named by `components.images`)."""
    from kfp import compiler

    from pipelines.visual_recommender import visual_recommender

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(pipeline_func=visual_recommender, package_path=str(out))
    return out


def upload_template(path: str | Path, destination: str, tags: list[str]) -> str:
    """Upload a compiled template to GCS (`gs://.../pipeline.yaml`) or an Artifact Registry
    Kubeflow Pipelines repository (`https://REGION-kfp.pkg.dev/PROJECT/REPO`)."""
    if io.is_gcs(destination):
        io.write_bytes(destination, Path(path).read_bytes())
        return destination
    if destination.startswith("https://") and "-kfp.pkg.dev/" in destination:
        from kfp.registry import RegistryClient

        client = RegistryClient(host=destination)
        name, version = client.upload_pipeline(file_name=str(path), tags=tags or None)
        return f"{destination}/{name}/{version}"
    raise UserError(f"--upload takes gs://... or https://REGION-kfp.pkg.dev/PROJECT/REPO, got {destination!r}")

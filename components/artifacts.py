"""Where a component reads/writes a KFP artifact.

On Vertex AI an artifact's `.uri` is `gs://...` and `.path` its `/gcs/...` FUSE mount;
under `kfp.local` both are local. Beam/Dataflow and `visrec.core.io` want the `gs://` URI,
so components use `location(artifact)` rather than picking one themselves.
"""

from __future__ import annotations

from kfp import dsl


def location(artifact) -> str:
    """The `gs://` URI of an artifact when it has one, else its local path."""
    uri = getattr(artifact, "uri", "") or ""
    return uri if uri.startswith("gs://") else artifact.path


def trained_model_dir(model_artifact) -> str:
    """The model directory inside a `visrec train` output (its `model/`), or the artifact itself
    when it already is a model directory."""
    from visrec.core import io

    root = location(model_artifact)
    best = io.join(root, "model")
    return best if io.exists(io.join(best, "config.json")) else root


def log_metrics(metrics_artifact, values: dict, prefix: str = "") -> None:
    """Log every numeric leaf of a (nested) dict to a KFP `Metrics` artifact."""
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            log_metrics(metrics_artifact, value, prefix=f"{name}.")
        elif isinstance(value, bool):
            metrics_artifact.log_metric(name, float(value))
        elif isinstance(value, (int, float)):
            metrics_artifact.log_metric(name, float(value))


class VertexModel(dsl.Artifact):
    """A Vertex AI Model Registry version, as Google Cloud Pipeline Components type it.

    Declared here by its schema title because google-cloud-pipeline-components cannot be
    installed beside google-cloud-aiplatform 2: with this type Vertex ML Metadata links the
    pipeline run to the model version (`uri`: its REST URL; `resourceName`: `models/ID@VERSION`).
    """

    schema_title = "google.VertexModel"
    schema_version = "0.0.1"


def vertex_model_uri(region: str, resource_name: str) -> str:
    """The REST URL Vertex AI uses as a `google.VertexModel` artifact's URI."""
    return f"https://{region}-aiplatform.googleapis.com/v1/{resource_name}"

"""Where a component reads/writes a KFP artifact.

On Vertex AI an artifact's `.uri` is `gs://...` and `.path` its `/gcs/...` FUSE mount;
under `kfp.local` both are local. Beam/Dataflow and `visrec.io` want the `gs://` URI,
so components use `location(artifact)` rather than picking one themselves.
"""

from __future__ import annotations


def location(artifact) -> str:
    """The `gs://` URI of an artifact when it has one, else its local path."""
    uri = getattr(artifact, "uri", "") or ""
    return uri if uri.startswith("gs://") else artifact.path


def trained_model_dir(model_artifact) -> str:
    """The model directory inside a `visrec train` output (its `model/`), or the artifact itself
    when it already is a model directory."""
    from visrec import io

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

"""KFP component for stage 3: Beam batch embedding (on Dataflow at scale) and PCA."""

from typing import Optional

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Metrics, Model, Output

from components.images import BEAM_IMAGE


@dsl.component(base_image=BEAM_IMAGE, install_kfp_package=False)
def embed(
    data: Input[Dataset],
    data_fingerprint: str,
    kind: str,
    pca_dims: int,
    batch_size: int,
    runner: str,
    beam_options: list,
    embeddings: Output[Dataset],
    pca: Output[Artifact],
    metrics: Output[Metrics],
    model: Optional[Input[Model]] = None,
    model_uri: str = "",
):
    """Run `visrec.embed.run_embed` on `data` (the resolved listings, or prepared shards).

    The encoder is the upstream `model` artifact (a `visrec train` output: its `model/`
    directory, or a model directory itself), or `model_uri` when that is non-empty: the
    baseline `google/mobilenet_v2_1.4_224` (or a `gs://` copy) is a parameter, not an
    artifact. Other settings are `EmbedConfig`'s. `beam_options`: extra pipeline options,
    e.g. the Dataflow project, region, GPU worker accelerator and custom container
    (docs/embedding.md). `data_fingerprint` (the resolver's) is the data's cache key and is
    recorded on the output. `embeddings` receives the whole stage-3 directory; `pca` a copy
    of its `pca.npz`.
    """
    from components.artifacts import location, log_metrics, trained_model_dir
    from visrec import io
    from visrec.embed import EmbedConfig, run_embed
    from visrec.errors import UserError
    from visrec.pipeline_config import from_kfp

    if model_uri:
        encoder = model_uri
    elif model is not None:
        encoder = trained_model_dir(model)
    else:
        raise UserError("embed needs a model artifact or a model_uri")
    out = location(embeddings)
    stats = run_embed(EmbedConfig(data_uri=location(data), model_uri=encoder, out_dir=out, kind=kind, runner=runner,
                                  beam_options=[str(o) for o in beam_options],
                                  **from_kfp(EmbedConfig, pca_dims=pca_dims, batch_size=batch_size)))
    pca_file = io.join(out, "pca", "pca.npz")
    if io.exists(pca_file):
        io.write_bytes(io.join(location(pca), "pca.npz"), io.read_bytes(pca_file))
    log_metrics(metrics, {k: stats[k] for k in ("items", "rejected", "dims", "pca_explained_variance",
                                                "seconds", "items_per_second") if stats[k] is not None})
    embeddings.metadata.update({"items": stats["items"], "dims": stats["dims"], "kind": kind, "model": encoder,
                                "data_fingerprint": data_fingerprint})

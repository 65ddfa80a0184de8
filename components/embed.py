"""KFP component for stage 3: Beam batch embedding (on Dataflow at scale) and PCA."""

from typing import Optional

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Metrics, Model, Output

from components.images import BEAM_IMAGE


@dsl.component(base_image=BEAM_IMAGE, install_kfp_package=False)
def embed(
    data: Input[Dataset],
    data_fingerprint: str,
    pca_dims: int,
    batch_size: int,
    shards: int,
    device: str,
    precision: str,
    share_model: bool,
    runner: str,
    beam_options: list,
    pipeline_job: str,
    pipeline_task: str,
    embeddings: Output[Dataset],
    pca: Output[Artifact],
    metrics: Output[Metrics],
    model: Optional[Input[Model]] = None,
    model_uri: str = "",
):
    """Run `visrec.stages.embed.run_embed` on `data` (the resolved listings, or prepared shards).

    The encoder is the upstream `model` artifact (a `visrec train` output: its `model/`
    directory, or a model directory itself), or `model_uri` when that is non-empty: the
    baseline `google/mobilenet_v2_1.4_224` (or a `gs://` copy) is a parameter, not an
    artifact. The encoder's kind (SigLIP or MobileNetV2) is the checkpoint's own, read from its
    `config.json`. Other settings are `EmbedConfig`'s: `device` (`auto`: the GPU when the worker has
    one), `precision` (`""`: bf16 autocast on a GPU with bf16 tensor cores, else fp32), `share_model` (one model copy per machine, i.e. per GPU, instead of one per SDK
    process), `shards`. `beam_options`: extra pipeline options, e.g. the Dataflow project,
    region, GPU worker accelerator and custom container (docs/embedding.md); on Dataflow the
    job is named after `pipeline_job` and `pipeline_task` (`visrec.stages.dataflow`). `data_fingerprint` (the resolver's) is the data's cache key and is
    recorded on the output. `embeddings` receives the whole stage-3 directory; `pca` a copy
    of its `pca.npz`.
    """
    from components.artifacts import location, log_metrics, trained_model_dir
    from visrec.core import io
    from visrec.core.errors import UserError
    from visrec.orchestration.pipeline_config import from_kfp
    from visrec.stages.configs import EmbedConfig
    from visrec.stages.dataflow import task_options
    from visrec.stages.embed import run_embed

    if model_uri:
        encoder = model_uri
    elif model is not None:
        encoder = trained_model_dir(model)
    else:
        raise UserError("embed needs a model artifact or a model_uri")
    out = location(embeddings)
    stats = run_embed(EmbedConfig(
        data_uri=location(data), model_uri=encoder, out_dir=out, runner=runner,
        beam_options=task_options(runner, beam_options, pipeline_job, pipeline_task),
        **from_kfp(EmbedConfig, pca_dims=pca_dims, batch_size=batch_size, shards=shards, device=device,
                   precision=precision, share_model=share_model)))
    pca_file = io.join(out, "pca", "pca.npz")
    if io.exists(pca_file):
        io.write_bytes(io.join(location(pca), "pca.npz"), io.read_bytes(pca_file))
    log_metrics(metrics, {k: v for k, v in stats.as_dict().items() if k != "config" and v is not None})
    embeddings.metadata.update({"items": stats.items, "dims": stats.dims, "kind": stats.config.kind, "model": encoder,
                                "data_fingerprint": data_fingerprint})

"""The visual recommender pipeline: data to deployment, one KFP v2 graph.

resolve data -> prepare -> train -> embed (candidate) and embed (baseline) in parallel
-> build index -> evaluate -> gate decision -> dsl.If(deploy) deploy / dsl.Else record the
rejection; an exit handler records how the run ended in the registry.

The same graph runs on Vertex AI Pipelines (compiled by `visrec compile`, submitted by
`visrec submit`, scheduled by `visrec schedule`) and on one machine with `kfp.local`
(`visrec run-local`).

Caching. `resolve-data` is never cached: it resolves the listings and impression-log
inputs to the files this run reads and fingerprints them. The data tasks take those as
inputs (the listings through importers, whose artifact is the same for the same URI, and
the fingerprint as a parameter), so a run on unchanged data reuses the previous run's
preparation, training and embeddings, and changed data recomputes them. The decision
tasks (champion, evaluation, gate, deploy, rejection) are never cached. `data_snapshot`
is only a label recorded with the run.

The branch is on the `gate_decision` component's single plain-string output: kfp.local
silently skips a `dsl.If` on a named output of a multi-output component.

Every default below is read from the stage's config dataclass (`kfp_default`), so a
pipeline run trains, embeds and gates exactly as the documented stage does.
"""
# No `from __future__ import annotations` here: KFP reads the parameter annotations as types.

from kfp import dsl

from components.build_index import build_index
from components.data import join_experiment, record_run, resolve_data
from components.deploy import deploy
from components.embed import embed
from components.evaluate import evaluate
from components.gate import gate_decision, record_rejection, resolve_champion
from components.images import SERVING_IMAGE
from components.prepare_dataset import prepare_dataset
from components.resources import TaskResources, set_resources
from components.train import train
from visrec.data.datasource import ResolveConfig
from visrec.model.encoders import MOBILENET_HUB_ID
from visrec.orchestration.pipeline_config import kfp_default
from visrec.stages.configs import EmbedConfig, EvaluateConfig, PrepareConfig, TrainConfig
from visrec.stages.index.config import IndexConfig
from visrec.stages.release.deploy import DeployConfig
from visrec.stages.release.vertex import VertexDeployConfig

PIPELINE_NAME = "visual-recommender"

# Retries with backoff for the long tasks: a lost machine or a failed Dataflow launch is retried;
# training resumes from its newest checkpoint.
TRAIN_RETRIES = 2
BEAM_RETRIES = 2

MACHINES = TaskResources()
# A Dataflow launcher names its job after the run and the task, so a retry attaches to it.
DATAFLOW_JOB = {"pipeline_job": dsl.PIPELINE_JOB_ID_PLACEHOLDER, "pipeline_task": dsl.PIPELINE_TASK_NAME_PLACEHOLDER}


@dsl.pipeline(name=PIPELINE_NAME,
              description="Fine-tune SigLIP on image-title pairs, embed + PCA, ScaNN index, gate against "
                          "MobileNetV2 and the champion, deploy.")
def visual_recommender(
    listings_uri: str,
    interactions_uri: str,
    registry: str,
    data_snapshot: str = "",
    partition_key: str = kfp_default(ResolveConfig, "partition_key"),
    done_marker: str = kfp_default(ResolveConfig, "done_marker"),
    siglip_model: str = kfp_default(TrainConfig, "model_uri"),
    baseline_model: str = MOBILENET_HUB_ID,
    epochs: int = kfp_default(TrainConfig, "epochs"),
    batch_size: int = kfp_default(TrainConfig, "batch_size"),
    lr: float = kfp_default(TrainConfig, "lr"),
    warmup_steps: int = kfp_default(TrainConfig, "warmup_steps"),
    max_steps: int = kfp_default(TrainConfig, "max_steps"),
    precision: str = kfp_default(TrainConfig, "precision"),
    train_device: str = kfp_default(TrainConfig, "device"),
    gradient_checkpointing: str = kfp_default(TrainConfig, "gradient_checkpointing"),
    freeze_token_embedding: bool = kfp_default(TrainConfig, "freeze_token_embedding"),
    gradient_compression: str = kfp_default(TrainConfig, "gradient_compression"),
    max_pairs: int = kfp_default(PrepareConfig, "max_pairs"),
    val_fraction: float = kfp_default(PrepareConfig, "val_fraction"),
    image_size: int = kfp_default(PrepareConfig, "image_size"),
    prepare_shards: int = kfp_default(PrepareConfig, "shards"),
    embed_batch_size: int = kfp_default(EmbedConfig, "batch_size"),
    embed_shards: int = kfp_default(EmbedConfig, "shards"),
    embed_device: str = kfp_default(EmbedConfig, "device"),
    embed_precision: str = kfp_default(EmbedConfig, "precision"),
    embed_share_model: bool = kfp_default(EmbedConfig, "share_model"),
    pca_dims: int = kfp_default(EmbedConfig, "pca_dims"),
    recall_target: float = kfp_default(IndexConfig, "recall_target"),
    index_k: int = kfp_default(IndexConfig, "k"),
    max_p99_ms: float = kfp_default(IndexConfig, "max_p99_ms"),
    gate_policy: str = "",
    bootstrap_resamples: int = kfp_default(EvaluateConfig, "bootstrap_resamples"),
    deploy_target: str = kfp_default(DeployConfig, "target"),
    require_approval: bool = kfp_default(DeployConfig, "require_approval"),
    vertex_project: str = "",
    vertex_region: str = "",
    vertex_model_id: str = kfp_default(VertexDeployConfig, "model_id"),
    vertex_endpoint_id: str = kfp_default(VertexDeployConfig, "endpoint_id"),
    serving_machine_type: str = kfp_default(VertexDeployConfig, "machine_type"),
    serving_min_replicas: int = kfp_default(VertexDeployConfig, "min_replica_count"),
    serving_max_replicas: int = kfp_default(VertexDeployConfig, "max_replica_count"),
    serving_service_account: str = kfp_default(VertexDeployConfig, "service_account"),
    serving_admin_token_uri: str = kfp_default(VertexDeployConfig, "admin_token_uri"),
    canary_percent: int = kfp_default(VertexDeployConfig, "canary_percent"),
    train_accelerator_type: str = MACHINES.train_accelerator_type,
    train_accelerator_count: int = MACHINES.train_accelerator_count,
    train_cpu: str = MACHINES.train_cpu,
    train_memory: str = MACHINES.train_memory,
    beam_cpu: str = MACHINES.beam_cpu,
    beam_memory: str = MACHINES.beam_memory,
    index_cpu: str = MACHINES.index_cpu,
    index_memory: str = MACHINES.index_memory,
    evaluate_cpu: str = MACHINES.evaluate_cpu,
    evaluate_memory: str = MACHINES.evaluate_memory,
    beam_runner: str = kfp_default(PrepareConfig, "runner"),
    beam_options: list = [],  # noqa: B006 - KFP pipeline parameters take literal defaults
    embed_beam_options: list = [],  # noqa: B006 - the embed tasks' Beam options (GPU workers on Dataflow)
    experiment: str = "",
    seed: int = kfp_default(TrainConfig, "seed"),
):
    """`listings_uri` / `interactions_uri`: a file, a prefix, or a prefix of `dt=YYYY-MM-DD/`
    partitions (the newest complete one is read; docs/data-versions.md). `experiment`: a
    Vertex AI Experiment each run attaches itself to (how scheduled runs are grouped)."""
    finished = record_run(registry=registry, listings_uri=listings_uri, data_snapshot=data_snapshot,
                          pipeline_job_name=dsl.PIPELINE_JOB_NAME_PLACEHOLDER)
    set_resources(finished, "1", "2G").set_display_name("record run").set_caching_options(False)

    with dsl.ExitHandler(finished, name="retraining"):
        with dsl.If(experiment != "", name="in-experiment"):
            joined = join_experiment(experiment=experiment, pipeline_job=dsl.PIPELINE_JOB_RESOURCE_NAME_PLACEHOLDER)
            set_resources(joined, "1", "2G").set_display_name("join experiment").set_caching_options(False)

        data = resolve_data(listings_uri=listings_uri, interactions_uri=interactions_uri,
                            partition_key=partition_key, done_marker=done_marker)
        set_resources(data, "1", "2G").set_display_name("resolve data version").set_caching_options(False)
        listings_fingerprint = data.outputs["listings_fingerprint"]
        # Same URI -> the same artifact (reimport=False), so the cache key moves with the fingerprint only.
        listings = dsl.importer(artifact_uri=data.outputs["listings_uri"], artifact_class=dsl.Dataset,
                                reimport=False)
        listings.set_display_name("listings")
        interactions = dsl.importer(artifact_uri=data.outputs["interactions_uri"], artifact_class=dsl.Dataset,
                                    reimport=False)
        interactions.set_display_name("impression logs")

        prep = prepare_dataset(listings=listings.output, data_fingerprint=listings_fingerprint, max_pairs=max_pairs,
                               val_fraction=val_fraction, seed=seed, image_size=image_size, shards=prepare_shards,
                               runner=beam_runner, beam_options=beam_options, **DATAFLOW_JOB)
        set_resources(prep, beam_cpu, beam_memory, retries=BEAM_RETRIES).set_display_name("prepare dataset")

        trained = train(dataset=prep.outputs["dataset"], model_uri=siglip_model, epochs=epochs,
                        batch_size=batch_size, lr=lr, warmup_steps=warmup_steps, precision=precision,
                        max_steps=max_steps, seed=seed, device=train_device,
                        gradient_checkpointing=gradient_checkpointing, freeze_token_embedding=freeze_token_embedding,
                        gradient_compression=gradient_compression)
        set_resources(trained, train_cpu, train_memory, train_accelerator_type, train_accelerator_count,
                      retries=TRAIN_RETRIES).set_display_name("fine-tune SigLIP")

        # The whole catalog is embedded (not only the training sample): evaluation and serving need every item.
        embedding = dict(batch_size=embed_batch_size, shards=embed_shards, device=embed_device,
                         precision=embed_precision, share_model=embed_share_model, runner=beam_runner, beam_options=embed_beam_options,
                         **DATAFLOW_JOB)
        candidate = embed(data=listings.output, data_fingerprint=listings_fingerprint, model=trained.outputs["model"],
                          pca_dims=pca_dims, **embedding)
        set_resources(candidate, beam_cpu, beam_memory, retries=BEAM_RETRIES).set_display_name(
            "embed candidate (SigLIP + PCA)")

        # The baseline needs no training: it runs in parallel with the fine-tuning.
        baseline = embed(data=listings.output, data_fingerprint=listings_fingerprint, model_uri=baseline_model,
                         pca_dims=0, **embedding)
        set_resources(baseline, beam_cpu, beam_memory, retries=BEAM_RETRIES).set_display_name(
            "embed baseline (MobileNetV2)")

        index = build_index(embeddings=candidate.outputs["embeddings"], recall_target=recall_target, k=index_k,
                            max_p99_ms=max_p99_ms, seed=seed)
        set_resources(index, index_cpu, index_memory).set_display_name("build ScaNN index")

        champion = resolve_champion(registry=registry)
        set_resources(champion, "1", "2G").set_display_name("find champion").set_caching_options(False)

        evaluation = evaluate(interactions=interactions.output, listings=listings.output,
                              candidate=candidate.outputs["embeddings"], baseline=baseline.outputs["embeddings"],
                              champion_uri=champion.output, gate_policy=gate_policy,
                              bootstrap_resamples=bootstrap_resamples)
        set_resources(evaluation, evaluate_cpu, evaluate_memory).set_display_name("evaluate + gate") \
            .set_caching_options(False)

        decision = gate_decision(evaluation=evaluation.outputs["evaluation"])
        set_resources(decision, "1", "2G").set_display_name("gate decision").set_caching_options(False)

        with dsl.If(decision.output == "deploy", name="candidate-passed"):
            release = deploy(decision=decision.output, model=trained.outputs["model"],
                             embeddings=candidate.outputs["embeddings"], index=index.outputs["index"],
                             evaluation=evaluation.outputs["evaluation"], listings=listings.output,
                             registry=registry, require_approval=require_approval, target=deploy_target,
                             project=vertex_project, region=vertex_region, serving_image=SERVING_IMAGE,
                             model_id=vertex_model_id, endpoint_id=vertex_endpoint_id,
                             machine_type=serving_machine_type, min_replicas=serving_min_replicas,
                             max_replicas=serving_max_replicas, canary_percent=canary_percent,
                             serving_service_account=serving_service_account,
                             serving_admin_token_uri=serving_admin_token_uri)
            set_resources(release, "2", "8G").set_display_name("deploy release").set_caching_options(False)
        with dsl.Else(name="candidate-rejected"):
            rejected = record_rejection(evaluation=evaluation.outputs["evaluation"], registry=registry)
            set_resources(rejected, "1", "2G").set_display_name("record rejection").set_caching_options(False)

"""The visual recommender pipeline: data to deployment, one KFP v2 graph.

prepare -> train -> embed (candidate) and embed (baseline) in parallel -> build index
-> evaluate -> gate decision -> dsl.If(deploy) deploy / dsl.Else record the rejection.

The same graph runs on Vertex AI Pipelines (compiled by `visrec compile`, submitted by
`visrec submit`) and on one machine with `kfp.local` (`visrec run-local`). The branch
is on the `gate_decision` component's single plain-string output: kfp.local silently
skips a `dsl.If` on a named output of a multi-output component.
"""
# No `from __future__ import annotations` here: KFP reads the parameter annotations as types.

from kfp import dsl

from components.build_index import build_index
from components.deploy import deploy
from components.embed import embed
from components.evaluate import evaluate
from components.images import SERVING_IMAGE
from components.gate import gate_decision, record_rejection, resolve_champion
from components.prepare_dataset import prepare_dataset
from components.resources import set_resources
from components.train import apply_train_resources, train

PIPELINE_NAME = "visual-recommender"

# Retries for the long, preemptible tasks (GPU training on spot capacity, Dataflow launches).
TRAIN_RETRIES = 2
BEAM_RETRIES = 2


@dsl.pipeline(name=PIPELINE_NAME,
              description="Fine-tune SigLIP on image-title pairs, embed + PCA, ScaNN index, gate against "
                          "MobileNetV2 and the champion, deploy.")
def visual_recommender(
    listings_uri: str,
    interactions_uri: str,
    registry: str,
    data_snapshot: str,
    siglip_model: str = "google/siglip-base-patch16-256-multilingual",
    baseline_model: str = "google/mobilenet_v2_1.4_224",
    epochs: int = 5,
    batch_size: int = 256,
    lr: float = 5e-5,
    warmup_steps: int = 100,
    max_steps: int = 0,
    precision: str = "",
    max_pairs: int = 0,
    val_fraction: float = 0.05,
    image_size: int = 256,
    embed_batch_size: int = 64,
    pca_dims: int = 128,
    recall_target: float = 0.95,
    index_k: int = 10,
    max_p99_ms: float = 25.0,
    gate_policy: str = "",
    bootstrap_resamples: int = 1000,
    deploy_target: str = "local",
    require_approval: bool = False,
    vertex_project: str = "",
    vertex_region: str = "",
    vertex_endpoint: str = "",
    vertex_parent_model: str = "",
    canary_percent: int = 10,
    beam_runner: str = "DirectRunner",
    beam_options: list = [],  # noqa: B006 - KFP pipeline parameters take literal defaults
    embed_beam_options: list = [],  # noqa: B006 - the embed tasks' Beam options (GPU workers on Dataflow)
    seed: int = 0,
):
    """`data_snapshot` names the input data version: it is passed to the first tasks so that
    step caching never reuses results computed from different data."""
    # The listings file as a tracked input artifact (lineage on Vertex; the snapshot in its metadata).
    listings = dsl.importer(artifact_uri=listings_uri, artifact_class=dsl.Dataset, reimport=False,
                            metadata={"data_snapshot": data_snapshot})
    listings.set_display_name("listings")

    prep = prepare_dataset(listings_uri=listings_uri, data_snapshot=data_snapshot, max_pairs=max_pairs,
                           val_fraction=val_fraction, seed=seed, image_size=image_size, runner=beam_runner,
                           beam_options=beam_options)
    set_resources(prep, "4", "16G", retries=BEAM_RETRIES).set_display_name("prepare dataset")

    trained = train(dataset=prep.outputs["dataset"], model_uri=siglip_model, epochs=epochs,
                    batch_size=batch_size, lr=lr, warmup_steps=warmup_steps, max_steps=max_steps,
                    precision=precision, seed=seed)
    apply_train_resources(trained, retries=TRAIN_RETRIES).set_display_name("fine-tune SigLIP")

    # The whole catalog is embedded (not only the training sample): evaluation and serving need every item.
    candidate = embed(data=listings.output, data_snapshot=data_snapshot, model=trained.outputs["model"],
                      kind="siglip", pca_dims=pca_dims, batch_size=embed_batch_size, runner=beam_runner,
                      beam_options=embed_beam_options)
    set_resources(candidate, "4", "16G", retries=BEAM_RETRIES).set_display_name("embed candidate (SigLIP + PCA)")

    # The baseline needs no training: it runs in parallel with the fine-tuning.
    baseline = embed(data=listings.output, data_snapshot=data_snapshot, model_uri=baseline_model,
                     kind="mobilenet_v2", pca_dims=0, batch_size=embed_batch_size, runner=beam_runner,
                     beam_options=embed_beam_options)
    set_resources(baseline, "4", "16G", retries=BEAM_RETRIES).set_display_name("embed baseline (MobileNetV2)")

    index = build_index(embeddings=candidate.outputs["embeddings"], recall_target=recall_target, k=index_k,
                        max_p99_ms=max_p99_ms, seed=seed)
    set_resources(index, "4", "16G").set_display_name("build ScaNN index")

    champion = resolve_champion(registry=registry)
    set_resources(champion, "1", "2G").set_display_name("find champion").set_caching_options(False)

    evaluation = evaluate(interactions_uri=interactions_uri, candidate=candidate.outputs["embeddings"],
                          baseline=baseline.outputs["embeddings"], champion_uri=champion.output,
                          listings_uri=listings_uri, gate_policy=gate_policy,
                          bootstrap_resamples=bootstrap_resamples)
    set_resources(evaluation, "4", "16G").set_display_name("evaluate + gate").set_caching_options(False)

    decision = gate_decision(evaluation=evaluation.outputs["evaluation"])
    set_resources(decision, "1", "2G").set_display_name("gate decision").set_caching_options(False)

    with dsl.If(decision.output == "deploy", name="candidate-passed"):
        release = deploy(decision=decision.output, model=trained.outputs["model"],
                         embeddings=candidate.outputs["embeddings"], index=index.outputs["index"],
                         evaluation=evaluation.outputs["evaluation"], listings_uri=listings_uri,
                         registry=registry, require_approval=require_approval, target=deploy_target,
                         project=vertex_project, region=vertex_region, endpoint=vertex_endpoint,
                         parent_model=vertex_parent_model, canary_percent=canary_percent,
                         serving_image=SERVING_IMAGE)
        set_resources(release, "2", "8G").set_display_name("deploy release").set_caching_options(False)
    with dsl.Else(name="candidate-rejected"):
        rejected = record_rejection(evaluation=evaluation.outputs["evaluation"], registry=registry)
        set_resources(rejected, "1", "2G").set_display_name("record rejection").set_caching_options(False)

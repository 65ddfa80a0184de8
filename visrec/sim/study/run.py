"""`run_study`: the study's stages in order, from the marketplace to `study.json` and `study.md`."""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from visrec.core.errors import UserError
from visrec.sim.study.ab import RANKING_VARIANTS, make_sessions, play_sessions
from visrec.sim.study.config import (ARMS, BASELINE, CANDIDATE, CONTROL, FULL_SIZE_MODELS, StudyConfig,
                                     table1_models, table1_pca_dims, tradeoff_dims)
from visrec.sim.study.controls import shuffle_titles
from visrec.sim.study.plots import plot_ab, plot_table1, plot_tradeoff
from visrec.sim.study.report import assemble_result, render_markdown
from visrec.sim.study.stages import StageRunner
from visrec.sim.pretrain import model_origin
from visrec.sim.study.stats import neighbour_agreement, score_rankings, summarise_ab

log = logging.getLogger(__name__)

# An A/B arm is served to a share of simulated users, never promoted: it only has to rank at all.
ARM_POLICY_YAML = """\
# A/B-test arm (visrec study): served to a share of simulated users, never promoted.
thresholds:
  ndcg@5:
    value:
      lower_bound: 0.0
"""


def directory_bytes(path: str | Path) -> dict[str, int]:
    """Bytes of every file under `path` by top-level entry, plus `total`."""
    out: dict[str, int] = {}
    root = Path(path)
    for f in root.rglob("*"):
        if f.is_file():
            top = f.relative_to(root).parts[0]
            out[top] = out.get(top, 0) + f.stat().st_size
    out["total"] = sum(out.values())
    return out


def _model_config(config: StudyConfig) -> Any:
    from visrec.model.encoders import TinyModelConfig

    return TinyModelConfig(**FULL_SIZE_MODELS, seed=config.seed) if config.full_size else \
        TinyModelConfig(seed=config.seed)


def _image_size(model_dir: str) -> int:
    """The square input size of a SigLIP checkpoint's image processor (what prepare resizes to)."""
    from visrec.stages.embed import load_image_processor

    size = load_image_processor(model_dir).size
    return int(size.get("height") or size.get("shortest_edge"))


def _write_variant(out: Path, ids: list[str], vectors: np.ndarray, pca: Any | None) -> None:
    """A stage-3-format embeddings directory (and its `pca/pca.npz`) for one PCA variant."""
    from visrec.data.embeddings import embeddings_name, write_embeddings
    from visrec.model.pca import PCA_FILE

    out.mkdir(parents=True, exist_ok=True)
    write_embeddings(str(out / embeddings_name(0, 1)), ids, vectors)
    if pca is not None:
        pca.save(str(out / "pca" / PCA_FILE))


def _deploy_arm(registry: Path, model_dir: str, kind: str, embeddings_dir: str, index_dir: str,
                listings: str, evaluation_dir: str) -> dict:
    from visrec.stages.release.deploy import DeployConfig, deploy_release

    outcome = deploy_release(DeployConfig(registry=str(registry), model_dir=model_dir, embeddings_dir=embeddings_dir,
                                          index_dir=index_dir, listings_uri=listings,
                                          metrics_uri=str(Path(evaluation_dir, "metrics.json")), encoder_kind=kind))
    if outcome.status not in ("deployed", "unchanged"):
        raise RuntimeError(f"deploying the {kind} arm to {registry} failed: {outcome}")
    return outcome.as_dict()


def _pretrained(config: StudyConfig) -> dict:
    """The `pretrain` stage: `visrec.sim.pretrain.pretrained_models` (cached), and how it was obtained."""
    from visrec.sim.pretrain import pretrained_models

    models = pretrained_models(cache_dir=config.cache_dir)
    m = models.manifest
    return {"paths": models.paths, "key": models.key, "built_now": models.built_now,
            "build_seconds": models.build_seconds, "corpus_items": m["corpus"]["items"],
            "classes": m["mobilenet_v2"]["classes"], "siglip": m["siglip"],
            "mobilenet_v2": {k: m["mobilenet_v2"][k] for k in ("initial_val_accuracy", "val_accuracy", "train_images",
                                                                "val_images", "samples_per_second", "seconds")},
            "seconds": m["seconds"]}


def run_study(config: StudyConfig, command: str = "") -> dict:
    """Run the whole study into `config.out_dir`; returns (and writes) `study.json`."""
    from visrec.sim.demo_data import DemoDataConfig, generate_marketplace, load_hidden
    from visrec.stages.configs import EmbedConfig, EvaluateConfig, PrepareConfig, TrainConfig
    from visrec.stages.embed import run_embed
    from visrec.data.embeddings import read_embeddings
    from visrec.stages.evaluate.evaluation import LOGGED, RANDOM, run_evaluation
    from visrec.stages.index.build import build_index
    from visrec.stages.index.config import IndexConfig
    from visrec.stages.index.searcher import SimilarityIndex
    from visrec.model.encoders import init_models
    from visrec.model.pca import PcaProjection
    from visrec.stages.prepare import run_prepare
    from visrec.stages.train.trainer import train

    if config.full_size and config.siglip_model is None:
        import torch

        if not torch.cuda.is_available():
            raise UserError("--full-size trains SigLIP ViT-B/16-256 (about 200M parameters, random weights): "
                            "it needs a GPU and none is visible")
    started = time.monotonic()
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stages = StageRunner(out, config)

    # Data and models.
    market = Path(config.marketplace_dir) if config.marketplace_dir else out / "marketplace"
    if config.marketplace_dir is None:
        stages.run("generate", lambda: generate_marketplace(market, DemoDataConfig(
            items=config.items, seed=config.seed, image_size=config.image_size, workers=config.workers)))
    listings, interactions = str(market / "listings.jsonl"), str(market / "interactions.jsonl")
    pretrain, models = None, {}
    if config.models_dir:
        models = {kind: str(Path(config.models_dir) / kind) for kind in ("siglip", "mobilenet_v2")}
    elif config.uses_pretrained_stand_ins():
        pretrain = stages.run("pretrain", lambda: _pretrained(config))
        models = pretrain["paths"]
    elif not (config.siglip_model and config.baseline_model):
        models = stages.run("init_models", lambda: init_models(out / "models", listings_uri=listings,
                                                               config=_model_config(config)))
    siglip_uri = config.siglip_model or models["siglip"]
    baseline_uri = config.baseline_model or models["mobilenet_v2"]
    origins = {"siglip": model_origin(siglip_uri), BASELINE: model_origin(baseline_uri)}

    # Stages 1-3.
    epochs, batch_size, lr = config.training()

    def prepare_and_train(listings_uri: str, root: Path, suffix: str = "") -> dict:
        """Stages 1-2 on `listings_uri` into `root/prepared` and `root/train`: the train metrics."""
        prepared = str(root / "prepared")
        stages.run(f"prepare{suffix}", lambda: run_prepare(PrepareConfig(
            listings_uri=listings_uri, out_dir=prepared, seed=config.seed, image_size=_image_size(siglip_uri),
            shards=4)).as_dict())
        return stages.run(f"train{suffix}", lambda: {k: v for k, v in train(TrainConfig(
            data_uri=prepared, out_dir=str(root / "train"), model_uri=siglip_uri, epochs=epochs,
            batch_size=batch_size, lr=lr, seed=config.seed, checkpoint_every_steps=0,
            num_workers=min(2, config.workers), device=config.device, progress=False)).as_dict().items()
            if k != "step_loss"})

    prepared, trained = str(out / "prepared"), out / "train"
    train_metrics = prepare_and_train(listings, out)
    raw = {"siglip": (str(trained / "model"), "siglip"), "siglip_base": (siglip_uri, "siglip"),
           BASELINE: (baseline_uri, "mobilenet_v2")}
    control = out / "control"
    if config.shuffled_titles_control:
        shuffled = stages.run("shuffle_titles", lambda: shuffle_titles(listings, control / "listings.jsonl",
                                                                       config.seed))
        control_train = prepare_and_train(str(control / "listings.jsonl"), control, "_control")
        raw[CONTROL] = (str(control / "train" / "model"), "siglip")
    emb = out / "embeddings"
    for name, (model_uri, kind) in raw.items():
        stages.run(f"embed_{name}", lambda m=model_uri, k=kind, n=name: run_embed(EmbedConfig(
            data_uri=prepared, model_uri=m, out_dir=str(emb / n), kind=k, pca_dims=0, seed=config.seed,
            device=config.device or "auto", shards=2)).as_dict())

    # PCA variants in numpy, on the raw fine-tuned embeddings.
    ids, full = read_embeddings(str(emb / "siglip"))
    full_dims = full.shape[1]
    kept, skipped = tradeoff_dims(full_dims, config.pca_dims)
    t1_dims = table1_pca_dims(full_dims, config.pca_dims)
    variant_dirs = {"siglip_full": str(emb / "siglip")}

    def fit_variants() -> dict:
        explained = {}
        for d in kept:
            pca = PcaProjection.fit(full, d, seed=config.seed)
            _write_variant(emb / f"siglip_pca{d}", ids, pca.transform(full), pca)
            explained[str(d)] = pca.explained_variance
        return explained

    explained = stages.run("pca_variants", fit_variants)
    variant_dirs.update({f"siglip_pca{d}": str(emb / f"siglip_pca{d}") for d in kept})

    # Table 1 and the trade-off's quality: every embedding set scored on the same lists.
    vectors = {name: read_embeddings(str(emb / name)) for name in raw if name != "siglip"}
    vectors["siglip_full"] = (ids, full)
    vectors.update({f"siglip_pca{d}": read_embeddings(variant_dirs[f"siglip_pca{d}"]) for d in kept})
    dims = {name: vecs.shape[1] for name, (_, vecs) in vectors.items()}
    comparisons = [(name, BASELINE) for name in [*vectors, RANDOM, LOGGED] if name != BASELINE]
    comparisons += [(f"siglip_pca{d}", "siglip_full") for d in kept]
    if config.shuffled_titles_control:
        comparisons.append(("siglip_full", CONTROL))  # what the image-title pairing is worth
    scored = stages.run("score", lambda: score_rankings(interactions, vectors, comparisons,
                                                        config.bootstrap_resamples, config.seed))
    hidden = load_hidden(market)
    neighbours = stages.run("neighbours", lambda: neighbour_agreement(
        {name: vectors[name] for name in table1_models(t1_dims, config.shuffled_titles_control)}, hidden,
        seed=config.seed))

    # Index bytes per item, measured on saved indexes.
    def measure_indexes() -> dict:
        sizes = {}
        for name in variant_dirs:
            vids, vecs = vectors[name]
            target = out / "indexes" / name
            shutil.rmtree(target, ignore_errors=True)
            SimilarityIndex.build(vids, vecs, IndexConfig(seed=config.seed)).save(str(target))
            sizes[name] = {"items": len(vids), "bytes": directory_bytes(target)}
        return sizes

    index_sizes = stages.run("index_sizes", measure_indexes)

    # Stage 4-6 for the two A/B arms: the candidate (SigLIP + Table 1's PCA) and the baseline.
    cand_name = table1_models(t1_dims)[-1]  # Table 1's last model row: with PCA when there is a PCA row
    arm_embeddings = {CANDIDATE: variant_dirs[cand_name], BASELINE: str(emb / BASELINE)}
    index_config = IndexConfig(max_p99_ms=None, seed=config.seed)  # latency is bench/ann.py's job
    for arm in ARMS:
        stages.run(f"index_{arm}", lambda a=arm: build_index(arm_embeddings[a], str(out / "release-index" / a),
                                                             index_config).as_dict())
    evaluation = out / "evaluation"
    gate = stages.run("evaluate", lambda: run_evaluation(EvaluateConfig(
        interactions_uri=interactions, candidate_uri=arm_embeddings[CANDIDATE], baseline_uri=arm_embeddings[BASELINE],
        out_dir=str(evaluation), listings_uri=listings, bootstrap_resamples=config.bootstrap_resamples,
        seed=config.seed)).as_dict())
    shutil.copyfile(evaluation / "report.html", out / "gate_report.html")
    control_result = None
    if config.shuffled_titles_control:
        control_gate = stages.run("evaluate_control", lambda: run_evaluation(EvaluateConfig(
            interactions_uri=interactions, candidate_uri=str(emb / CONTROL), baseline_uri=arm_embeddings[BASELINE],
            out_dir=str(control / "evaluation"), listings_uri=listings,
            bootstrap_resamples=config.bootstrap_resamples, seed=config.seed)).as_dict())
        control_result = {"shuffle": shuffled, "train": control_train, "gate": control_gate}
    arm_policy = out / "ab-arm-gate.yaml"
    arm_policy.write_text(ARM_POLICY_YAML)
    arm_evaluations = {CANDIDATE: str(evaluation)}
    if gate["decision"] != "deploy":
        log.warning("the candidate failed the default gate; the A/B test serves it under the arm policy")
    for arm in ARMS if gate["decision"] != "deploy" else (BASELINE,):
        arm_evaluations[arm] = str(out / f"evaluation-ab-{arm}")
        stages.run(f"evaluate_ab_{arm}", lambda a=arm: run_evaluation(EvaluateConfig(
            interactions_uri=interactions, candidate_uri=arm_embeddings[a], baseline_uri=arm_embeddings[BASELINE],
            out_dir=arm_evaluations[a], gate_config=str(arm_policy), bootstrap_resamples=100,
            seed=config.seed)).decision)
    arm_models = {CANDIDATE: (str(trained / "model"), "siglip"), BASELINE: (baseline_uri, "mobilenet_v2")}
    registries = {arm: out / "registry" / arm for arm in ARMS}
    deployed = {arm: stages.run(f"deploy_{arm}", lambda a=arm: _deploy_arm(
        registries[a], *arm_models[a], arm_embeddings[a], str(out / "release-index" / a), listings,
        arm_evaluations[a])) for arm in ARMS}

    # The simulated A/B test against real serving processes.
    served_ids = set(vectors[cand_name][0]) & set(vectors[BASELINE][0])  # the arms' embeddings, already read
    pool = sorted(i for i in served_ids if hidden[i]["status"] == "on_sale")
    sessions = make_sessions(pool, config.ab_users, config.ab_sessions_per_user, config.seed)

    def ab_test() -> dict:
        records = []
        for variant in RANKING_VARIANTS:
            records += play_sessions({arm: str(registries[arm]) for arm in ARMS}, variant, sessions, hidden,
                                     config.ab_k, config.seed, out / "ab-logs")
        return summarise_ab(records, [v.name for v in RANKING_VARIANTS], config.bootstrap_resamples, config.seed)

    ab_summary = stages.run("ab_test", ab_test)

    result = assemble_result(config, command, market, scored, dims, kept, skipped, t1_dims, explained, index_sizes,
                             gate, cand_name, deployed, ab_summary, sessions, train_metrics, stages, origins,
                             (epochs, batch_size, lr), pretrain, control_result)
    result["neighbour_agreement"] = neighbours
    result["wall_seconds"] = round(time.monotonic() - started, 1)
    files = {"table1.png": plot_table1(result["table1"]["rows"]),
             "pca_tradeoff.png": plot_tradeoff(result["pca_tradeoff"]["points"]),
             "ab_test.png": plot_ab(ab_summary)}
    for name, data in files.items():
        (out / name).write_bytes(data)
    result["files"] = ["study.json", "study.md", *files, "gate_report.html", "evaluation/metrics.json",
                       "train/loss_curve.png"]
    (out / "study.json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    (out / "study.md").write_text(render_markdown(result))
    log.info("study done in %.1f min -> %s", result["wall_seconds"] / 60, out)
    return result

"""The study's results for people and programs: `study.json`'s content from the stages' results,
`study.md`, and the few lines `visrec study` prints."""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Sequence

from visrec.core import io
from visrec.sim.study.ab import Session
from visrec.sim.pretrain import CHECKPOINT, PRETRAINED
from visrec.sim.pretrain import RANDOM as RANDOM_WEIGHTS
from visrec.sim.study.config import (ARMS, BASELINE, CANDIDATE, CONTROL, PAPER, SYNTHETIC_NOTE, StudyConfig,
                                     table1_models)
from visrec.sim.study.stages import StageRunner


_LABELS = {"random": "random order (reference)", "logged_order": "logged order (reference)"}
# Row labels by where the weights came from (`visrec.sim.pretrain.model_origin`).
_BASELINE_LABELS = {PRETRAINED: "MobileNetV2 baseline (classification-pretrained)",
                    RANDOM_WEIGHTS: "MobileNetV2 baseline (random weights)", CHECKPOINT: "MobileNetV2 baseline"}
_BASE_LABELS = {PRETRAINED: "SigLIP pretrained only (zero-shot)",
                RANDOM_WEIGHTS: "SigLIP untrained (random weights, sanity)",
                CHECKPOINT: "SigLIP checkpoint, not fine-tuned (zero-shot)"}


def assemble_result(config: StudyConfig, command: str, market: Path, scored: dict, dims: dict[str, int],
                    kept: list[int], skipped: list[int], t1_dims: int | None, explained: dict, index_sizes: dict,
                    gate: dict, cand_name: str, deployed: dict, ab_summary: dict, sessions: list[Session],
                    train_metrics: dict, stages: StageRunner, origins: dict[str, str],
                    training: tuple[int, int, float], pretrain: dict | None, control: dict | None = None) -> dict:
    """study.json's content from the stages' results. `origins`: where the SigLIP that fine-tuning
    started from and the baseline came from; `training`: (epochs, batch size, lr) of the fine-tuning;
    `pretrain`: the `pretrain` stage's result when the study built or reused the pretrained stand-ins;
    `control`: the shuffled-titles control's shuffle counts, fine-tuning metrics and gate evaluation."""
    import platform

    from visrec.stages.evaluate.evaluation import LOGGED, RANDOM
    from visrec.stages.evaluate.metrics import METRICS

    values, uplift = scored["values"], scored["uplift"]
    full_dims = dims["siglip_full"]

    def row(key: str, label: str) -> dict:
        return {"key": key, "label": label, "dims": dims.get(key, "-"), "metrics": values[key],
                "uplift": {m: uplift[f"{key}_vs_{BASELINE}"][m] for m in METRICS} if key != BASELINE else None}

    labels = {BASELINE: _BASELINE_LABELS[origins[BASELINE]], "siglip_base": _BASE_LABELS[origins["siglip"]],
              "siglip_full": f"SigLIP fine-tuned ({full_dims}-d)",
              f"siglip_pca{t1_dims}": f"SigLIP fine-tuned + PCA {t1_dims}",
              CONTROL: "SigLIP fine-tuned on shuffled titles (control)", **_LABELS}
    rows = [row(key, labels[key]) for key in [*table1_models(t1_dims, control is not None), RANDOM, LOGGED]]
    control_summary = None
    if control is not None:
        gate_ev = control["gate"]
        control_summary = {
            "key": CONTROL, "shuffle": control["shuffle"], "best_val": control["train"].get("best_val"),
            "pairing_uplift": uplift[f"siglip_full_vs_{CONTROL}"]["ndcg@5"],
            "gate": {"decision": gate_ev["decision"], "report": "control/evaluation/report.html",
                     "failed": _failed_thresholds(gate_ev)}}
    pca_note = (f"SigLIP embeds in {full_dims} dims (the paper's in 768); the PCA row keeps "
                f"{t1_dims or '-'}, the size nearest the paper's ratio 128/768.")
    if origins[BASELINE] == RANDOM_WEIGHTS:
        pca_note += (" The baseline is a randomly initialised MobileNetV2, no bar at all; pass --baseline-model "
                     "google/mobilenet_v2_1.4_224 where it can be downloaded, or drop --random-init.")
    elif origins[BASELINE] == PRETRAINED:
        pca_note += (" The baseline is MobileNetV2 pretrained by classification of the synthetic web corpus's object "
                     "classes and used frozen, as the paper's ImageNet one is; SigLIP was pretrained on the same "
                     "corpus's image-caption pairs (`visrec init-models --pretrained`).")

    full_bytes = index_sizes["siglip_full"]["bytes"]["total"]
    points = []
    for name in ["siglip_full", *(f"siglip_pca{d}" for d in sorted(kept, reverse=True))]:
        change = uplift.get(f"{name}_vs_siglip_full", {}).get("ndcg@5")
        size = index_sizes[name]
        points.append({"label": "none" if name == "siglip_full" else str(dims[name]), "key": name,
                       "dims": dims[name], "ndcg@5": values[name]["ndcg@5"]["mean"],
                       "ndcg@5_ci95": values[name]["ndcg@5"]["ci95"],
                       "ndcg@5_relative_change": change["relative"] if change else 0.0,
                       "ndcg@5_change_ci95": change["ci95"] if change else None,
                       "pca_explained_variance": explained.get(str(dims[name])),
                       "index_items": size["items"], "index_bytes": size["bytes"],
                       "bytes_per_item": size["bytes"]["total"] / size["items"],
                       "storage_saving": 1.0 - size["bytes"]["total"] / full_bytes})
    trade_note = f"Sizes above the embedding size are skipped: {skipped}." if skipped else ""
    ab_note = (f"{config.ab_users:,} simulated users ({ab_summary['users'][BASELINE]} baseline, "
               f"{ab_summary['users'][CANDIDATE]} candidate, by a hash of the user id), "
               f"{config.ab_sessions_per_user} page views each: {len(sessions):,} requests per ranking variant "
               f"to two `visrec serve` processes on 127.0.0.1 (release {deployed[BASELINE]['version']}: baseline, "
               f"{deployed[CANDIDATE]['version']}: candidate = {cand_name}), k = {config.ab_k}. Taps come from the "
               "generator's hidden user model (`tap_probability`: position bias x a sigmoid of the hidden visual, "
               "category and price similarity), with the same random draws for a session in every variant. "
               "CTR = taps / items shown; intervals resample users. Price filter off = `--price-low 1e-12 "
               "--price-high 1e12`; category re-rank off = `--category-weight 0`. Both releases went through "
               "`deploy_release`: " + ("the candidate on the default gate's `deploy` decision, the baseline"
                                       if gate["decision"] == "deploy" else
                                       "the candidate was rejected by the default gate, so it and the baseline were")
               + " under the A/B-arm policy `ab-arm-gate.yaml` (nDCG@5 >= 0: an arm is served to a share of "
               "users, never promoted).")
    epochs, batch_size, lr = training
    if pretrain is not None:
        description = (f"SiglipModel / MobileNetV2Model pretrained on a {pretrain['corpus_items']:,}-pair synthetic web "
                       f"corpus (visrec init-models --pretrained, cache entry {pretrain['key']}), CPU")
    elif origins["siglip"] == RANDOM_WEIGHTS:
        description = "tiny randomly initialised SiglipModel / MobileNetV2Model stand-ins (visrec init-models), CPU"
    elif config.full_size:
        description = "SigLIP ViT-B/16-256 and MobileNetV2 1.4 architectures with random weights"
    else:
        description = f"checkpoints {config.siglip_model or config.models_dir} / {config.baseline_model or config.models_dir}"
    return {
        "note": SYNTHETIC_NOTE,
        "command": command,
        "out_dir": config.out_dir,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores",
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(config).items()},
        "marketplace": {"dir": str(market), "items": io.count_lines(str(market / "listings.jsonl")),
                        "impressions": io.count_lines(str(market / "interactions.jsonl"))},
        "models": {"description": description, "siglip_dims": full_dims, "baseline_dims": dims[BASELINE],
                   "origins": origins, "pretrain": pretrain,
                   "training": {"epochs": epochs, "batch_size": batch_size, "lr": lr,
                                **{k: train_metrics.get(k) for k in ("train_pairs", "val_pairs", "best_epoch",
                                                                     "initial_val", "best_val",
                                                                     "samples_per_second", "train_seconds")}}},
        "table1": {"rows": rows, "lists_used": scored["lists_used"], "lists_skipped": scored["lists_skipped"],
                   "note": pca_note, "paper": {k: PAPER[k] for k in ("uplift_ndcg@5", "uplift_precision@1")},
                   "gate": {"candidate": cand_name, "decision": gate["decision"], "report": "gate_report.html",
                            "lists_used": gate["lists_used"], "candidate_ndcg@5": gate["candidate"]["ndcg@5"],
                            "baseline_ndcg@5": gate["baseline"]["ndcg@5"],
                            "failed": _failed_thresholds(gate)},
                   "control": control_summary},
        "pca_tradeoff": {"full_dims": full_dims, "items": points[0]["index_items"], "points": points,
                         "skipped_dims": skipped, "note": trade_note,
                         "paper": {k: PAPER[k] for k in ("pca_768_to_128_storage_saving",
                                                         "pca_768_to_128_ndcg@5_change")}},
        "ab_test": {"summary": ab_summary, "note": ab_note, "releases": deployed,
                    "paper": {k: PAPER[k] for k in ("online_ctr_uplift", "online_cvr_uplift")}},
        "stage_seconds": stages.seconds,
        "stage_cpu_seconds": stages.cpu_seconds,
        "stages_reused": stages.reused,
    }


def _failed_thresholds(evaluation: dict) -> list[str]:
    """The messages of the thresholds an evaluation's gate decision failed."""
    return [r["message"] for r in evaluation["reasons"] if not r["passed"]]


def _decision(gate: dict) -> str:
    """`**reject** (the failed thresholds).` of a study.json gate section, for study.md."""
    return f"**{gate['decision']}**" + (f" ({'; '.join(gate['failed'])})." if gate["failed"] else ".")


def _fmt(x: float | None, pct: bool = False, signed: bool = False) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    if pct:
        return f"{x * 100:+.1f}%" if signed else f"{x * 100:.1f}%"
    return f"{x:+.4f}" if signed else f"{x:.4f}"


def _fmt_s(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}"


def _ci(ci: Sequence[float | None] | None, pct: bool = False, signed: bool = False) -> str:
    if not ci or ci[0] is None:
        return "-"
    return f"[{_fmt(ci[0], pct, signed)}, {_fmt(ci[1], pct, signed)}]"


def _relevance_weights() -> str:
    """The hidden user model's weight of each attribute in its relevance (`visrec.sim.demo_data`)."""
    from visrec.sim.demo_data import RELEVANCE_WEIGHTS, VISUAL_WEIGHTS

    weights = {a: RELEVANCE_WEIGHTS["visual"] * w for a, w in VISUAL_WEIGHTS.items()}
    weights.update({a: w for a, w in RELEVANCE_WEIGHTS.items() if a != "visual"})
    return ", ".join(f"{a} {w:.2f}" for a, w in weights.items())


def render_markdown(result: dict) -> str:
    """`study.md`: the tables of `study.json` for people."""
    from visrec.stages.evaluate.metrics import METRICS

    t1, trade, ab = result["table1"], result["pca_tradeoff"], result["ab_test"]
    nb = result["neighbour_agreement"]
    lines = [f"# Offline study on a synthetic marketplace ({result['marketplace']['items']:,} items, "
             f"seed {result['config']['seed']})", "", f"**{SYNTHETIC_NOTE}**", "",
             f"Command: `{result['command']}`  ", f"Models: {result['models']['description']}  ",
             f"Wall time: {result['wall_seconds'] / 60:.1f} min on {result['machine']} (sum of the stage times "
             f"below: {sum(result['stage_seconds'].values()) / 60:.1f} min)", "",
             "## Table 1: offline ranking quality", "",
             f"{t1['lists_used']:,} impression lists with at least one tap (all rows scored on the same lists); "
             f"95% paired-bootstrap intervals over lists ({result['config']['bootstrap_resamples']} resamples). "
             f"{t1['note']}", "",
             "| model | dims | " + " | ".join(METRICS) + " |", "|---|---:|" + "---:|" * len(METRICS)]
    for row in t1["rows"]:
        cells = [f"{_fmt(row['metrics'][m]['mean'])} {_ci(row['metrics'][m]['ci95'])}" for m in METRICS]
        lines.append(f"| {row['label']} | {row['dims']} | " + " | ".join(cells) + " |")
    lines += ["", "Relative uplift over the MobileNetV2 baseline, then the absolute change and its 95% "
              "paired-bootstrap interval:", "",
              "| model | " + " | ".join(METRICS) + " |", "|---|" + "---:|" * len(METRICS)]
    for row in t1["rows"]:
        if row["key"] == BASELINE:
            continue
        cells = [f"{_fmt(row['uplift'][m]['relative'], pct=True, signed=True)} "
                 f"({_fmt(row['uplift'][m]['absolute'], signed=True)} {_ci(row['uplift'][m]['ci95'], signed=True)})"
                 for m in METRICS]
        lines.append(f"| {row['label']} | " + " | ".join(cells) + " |")
    lines += ["", f"Paper (real data): +{PAPER['uplift_ndcg@5']:.1%} nDCG@5, +{PAPER['uplift_precision@1']:.1%} "
              "P@1 for fine-tuned SigLIP over MobileNetV2.", "",
              f"Gate report of the served candidate ({t1['gate']['candidate']}): `{t1['gate']['report']}`, "
              f"decision {_decision(t1['gate'])}", ""]
    if t1.get("control"):
        c, rows = t1["control"], {r["key"]: r for r in t1["rows"]}
        ndcg, pairing = rows[c["key"]]["metrics"]["ndcg@5"]["mean"], c["pairing_uplift"]
        lines += [f"Control: the same fine-tuning on the same listings with {c['shuffle']['titles_moved']:,} titles "
                  "moved between items (images, titles and recipe unchanged, the pairing broken): nDCG@5 "
                  f"{_fmt(ndcg)} ({_fmt(rows[c['key']]['uplift']['ndcg@5']['relative'], pct=True, signed=True)} vs "
                  f"the baseline). The pairing is worth {_fmt(pairing['absolute'], signed=True)} "
                  f"{_ci(pairing['ci95'], signed=True)} nDCG@5 (fine-tuned vs control). The default gate on the "
                  f"control: {_decision(c['gate'])}", ""]
    lines += ["## What each embedding sees", "",
              f"Share of each item's {nb['k']} nearest neighbours (cosine) with the same hidden attribute, "
              f"over {nb['queries']:,} items (what the hidden user model's relevance weighs: {_relevance_weights()}).",
              "",
              "| model | " + " | ".join(nb["attributes"]) + " |", "|---|" + "---:|" * len(nb["attributes"])]
    labels = {row["key"]: row["label"] for row in t1["rows"]}
    for name, shares in [*nb["models"].items(), ("random", nb["random"])]:
        lines.append(f"| {labels.get(name, name)} | " + " | ".join(_fmt(shares[a]) for a in nb["attributes"]) + " |")
    lines += ["",
              "## PCA trade-off", "",
              f"Fine-tuned SigLIP ({trade['full_dims']}-d) projected by PCA fitted on its own embeddings; index "
              f"bytes per item measured as the saved `SimilarityIndex` directory size / items "
              f"({trade['items']:,} items; ScaNN files + `vectors.npy` + `ids.json`). {trade['note']}", "",
              "| PCA dims | nDCG@5 | 95% interval | change vs full | index bytes / item | saving vs full |",
              "|---|---:|---:|---:|---:|---:|"]
    for p in trade["points"]:
        lines.append(f"| {p['label']} | {_fmt(p['ndcg@5'])} | {_ci(p['ndcg@5_ci95'])} | "
                     f"{_fmt(p['ndcg@5_relative_change'], pct=True, signed=True)} | {p['bytes_per_item']:,.0f} | "
                     f"{_fmt(p['storage_saving'], pct=True)} |")
    lines += ["", f"Paper (real data): 768 -> 128 saves ~{PAPER['pca_768_to_128_storage_saving']:.0%} storage for "
              f"{PAPER['pca_768_to_128_ndcg@5_change']:.1%} nDCG@5.", "",
              "## Simulated online A/B test", "",
              f"{ab['note']}", "",
              "| ranking | arm | sessions | impressions | taps | CTR | 95% interval | expected CTR | "
              "sessions with a tap | p50 / p99 ms |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, v in ab["summary"]["variants"].items():
        for arm in ARMS:
            a = v[arm]
            lines.append(f"| {name} | {arm} | {a['sessions']:,} | {a['impressions']:,} | {a['taps']:,} | "
                         f"{_fmt(a['ctr'])} | {_ci(a['ctr_ci95'])} | {_fmt(a['expected_ctr'])} | "
                         f"{_fmt(a['session_ctr'], pct=True)} | {a['latency_ms_p50']} / {a['latency_ms_p99']} |")
    lines += ["", "CTR uplift of the candidate over the baseline, and what each switch does within an arm "
              "(relative CTR change against the full ranking, paired over the same sessions):", "",
              "| ranking | candidate vs baseline | baseline: vs full | candidate: vs full |", "|---|---:|---:|---:|"]
    for name, v in ab["summary"]["variants"].items():
        within = [f"{_fmt(v[arm].get('relative_change_vs_full'), pct=True, signed=True)} "
                  f"{_ci(v[arm].get('relative_change_ci95'), pct=True, signed=True)}"
                  if "relative_change_vs_full" in v[arm] else "(reference)" for arm in ARMS]
        lines.append(f"| {name} | {_fmt(v['ctr_uplift'], pct=True, signed=True)} "
                     f"{_ci(v['ctr_uplift_ci95'], pct=True, signed=True)} | {within[0]} | {within[1]} |")
    lines += ["", f"Paper (real users): CTR +{PAPER['online_ctr_uplift']:.0%}, CVR +{PAPER['online_cvr_uplift']:.0%}. "
              "The hidden user model only taps, so no CVR is simulated.", "",
              "## Stage timings", ""]
    if result["stages_reused"]:
        lines += [f"Reused from an earlier run of the same config: {', '.join(result['stages_reused'])}.", ""]
    lines += ["| stage | wall s | CPU s (process + children) |", "|---|---:|---:|"]
    lines += [f"| {name} | {sec:.1f} | {_fmt_s(result['stage_cpu_seconds'].get(name))} |"
              for name, sec in result["stage_seconds"].items()]
    lines += ["", "Files: " + ", ".join(f"`{f}`" for f in result["files"]), ""]
    return "\n".join(lines)


def summary_lines(result: dict) -> list[str]:
    """A few lines for the terminal: the headline figures and where the rest is."""
    rows = {r["key"]: r for r in result["table1"]["rows"]}
    lines = [SYNTHETIC_NOTE]
    for key, r in rows.items():
        m = r["metrics"]
        up = r["uplift"]
        lines.append(f"{r['label']:<40} nDCG@5 {_fmt(m['ndcg@5']['mean'])} P@1 {_fmt(m['precision@1']['mean'])}"
                     + (f"  vs baseline {_fmt(up['ndcg@5']['relative'], pct=True, signed=True)} nDCG@5, "
                        f"{_fmt(up['precision@1']['relative'], pct=True, signed=True)} P@1" if up else ""))
    t1 = result["table1"]
    lines.append(f"default gate: candidate {t1['gate']['decision']}"
                 + (f"; shuffled-titles control {t1['control']['gate']['decision']}" if t1["control"] else ""))
    for p in result["pca_tradeoff"]["points"]:
        lines.append(f"PCA {p['label']:>4}: nDCG@5 {_fmt(p['ndcg@5'])} "
                     f"({_fmt(p['ndcg@5_relative_change'], pct=True, signed=True)}), "
                     f"{p['bytes_per_item']:,.0f} index bytes/item ({_fmt(p['storage_saving'], pct=True)} saved)")
    for name, v in result["ab_test"]["summary"]["variants"].items():
        lines.append(f"A/B {name:<20} CTR baseline {_fmt(v[BASELINE]['ctr'])} candidate {_fmt(v[CANDIDATE]['ctr'])} "
                     f"uplift {_fmt(v['ctr_uplift'], pct=True, signed=True)} "
                     f"{_ci(v['ctr_uplift_ci95'], pct=True, signed=True)}")
    lines.append(f"wall time {result['wall_seconds'] / 60:.1f} min; tables: {Path(result['out_dir'], 'study.md')}")
    return lines

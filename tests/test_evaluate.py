"""Stage 5 end to end on fabricated embeddings and impression logs: metrics, gate, outputs, CLI, KFP."""

import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from visrec.stages.configs import EvaluateConfig
from visrec.stages.evaluate.evaluation import EvaluateResult, run_evaluation

CATEGORIES = ["Women/Tops/T-shirts", "Men/Shoes/Sneakers", "Home/Kitchen/Mugs"]


def write_embeddings(directory: Path, ids: list[str], vectors: np.ndarray) -> str:
    directory.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"item_id": ids, "embedding": pa.array(list(vectors.astype(np.float32)),
                                                                   pa.list_(pa.float32()))}),
                   directory / "embeddings-00000-of-00001.parquet")
    return str(directory)


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    """200 items with hidden 8-d "looks"; users tap the candidate that looks most like the query.

    `good` embeddings are the truth plus a little noise, `noisy` plus a lot, `random`
    unrelated: a clear ordering good > noisy > random for every metric.
    """
    from PIL import Image

    root = tmp_path_factory.mktemp("eval-world")
    rng = np.random.default_rng(0)
    n_items, n_lists = 200, 300
    ids = [f"it{i:04d}" for i in range(n_items)]
    truth = rng.normal(size=(n_items, 8))
    truth /= np.linalg.norm(truth, axis=1, keepdims=True)  # taps follow cosine, so `exact` ranks perfectly
    rows = []
    for lst in range(n_lists):
        q = int(rng.integers(n_items))
        cands = rng.choice(np.delete(np.arange(n_items), q), 8, replace=False)
        best = cands[np.argmax(truth[cands] @ truth[q])]
        for pos, c in enumerate(rng.permutation(cands)):
            rows.append({"query_item_id": ids[q], "item_id": ids[c], "position": pos, "tapped": int(c == best),
                         "session_id": f"s{lst}", "ts": "2024-05-01T10:00:00Z"})
    (root / "images").mkdir()
    listings = []
    for i, item in enumerate(ids):
        Image.new("RGB", (24, 24), tuple(int(x) for x in rng.integers(0, 255, 3))).save(root / "images" / f"{item}.jpg")
        listings.append({"item_id": item, "title": f"item {i}", "image_uri": f"images/{item}.jpg",
                         "category": CATEGORIES[i % 3], "price": 1000, "status": "on_sale",
                         "listed_at": "2024-05-01T00:00:00Z"})
    return {
        "root": root,
        "rows": rows,
        "interactions": write_jsonl(root / "interactions.jsonl", rows),
        "listings": write_jsonl(root / "listings.jsonl", listings),
        "exact": write_embeddings(root / "exact", ids, truth),
        "good": write_embeddings(root / "good", ids, truth + 0.1 * rng.normal(size=truth.shape)),
        "noisy": write_embeddings(root / "noisy", ids, truth + 0.3 * rng.normal(size=truth.shape)),
        "random": write_embeddings(root / "random", ids, rng.normal(size=truth.shape)),
    }


def evaluate(world, tmp_path, candidate, baseline, **kw) -> EvaluateResult:
    kw.setdefault("bootstrap_resamples", 300)
    return run_evaluation(EvaluateConfig(interactions_uri=world["interactions"], candidate_uri=world[candidate],
                                         baseline_uri=world[baseline], out_dir=str(tmp_path / "out"), **kw))


def test_better_candidate_deploys_with_all_outputs(world, tmp_path):
    result = evaluate(world, tmp_path, "good", "random", champion_uri=world["noisy"], listings_uri=world["listings"])
    assert result.decision == "deploy", result.reasons
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert saved == result.as_dict()
    assert list(saved) == ["candidate", "baseline", "champion", "uplift", "lists_used", "lists_skipped",
                           "decision", "reasons"]
    assert saved["lists_used"] == 300 and saved["lists_skipped"] == 0
    for m in ("ndcg@5", "precision@1", "precision@3", "hit_rate@1", "hit_rate@3"):
        assert saved["candidate"][m] > saved["champion"][m] > saved["baseline"][m]
        low, high = saved["candidate"]["ci95"][m]
        assert low <= saved["candidate"][m] <= high
    up = saved["uplift"]["candidate_vs_baseline"]["ndcg@5"]
    assert up["absolute"] == pytest.approx(saved["candidate"]["ndcg@5"] - saved["baseline"]["ndcg@5"], abs=2e-6)
    assert up["ci95"][0] > 0
    # The random ranking and the logged order are reported (as uplift entries over the baseline).
    for ref in ("random_vs_baseline", "logged_order_vs_baseline"):
        assert 0 < saved["uplift"][ref]["ndcg@5"]["value"] < saved["candidate"]["ndcg@5"]
    # Slices by the query item's top-level category cover every list.
    slices = saved["candidate"]["slices"]
    assert set(slices) == {"Women", "Men", "Home"}
    assert sum(s["lists"] for s in slices.values()) == 300
    assert set(saved["uplift"]["slices"]["Men"]) >= {"candidate_vs_baseline", "candidate_vs_champion"}

    html = (tmp_path / "out" / "report.html").read_text()
    assert "data:image/png;base64," in html
    assert html.count("class=ex>") == 12
    assert html.count("data:image/jpeg;base64,") == 12 * 11
    assert not re.search(r"""(src|href)=['"]?(https?:|//|/)""", html)  # nothing fetched from elsewhere
    assert "Decision: <b>deploy</b>" in html


@pytest.mark.parametrize("candidate, baseline", [("random", "good"), ("good", "good")])
def test_worse_or_equal_candidate_is_rejected_with_reasons(world, tmp_path, candidate, baseline):
    result = evaluate(world, tmp_path, candidate, baseline)
    assert result.decision == "reject"
    failed = [r for r in result.reasons if not r["passed"]]
    assert any(r["comparison"] == "vs_baseline.ci_lower" for r in failed)
    assert all(r["message"].startswith("ndcg@5 vs baseline") for r in failed)
    if candidate == baseline:
        assert result.uplift["candidate_vs_baseline"]["ndcg@5"]["ci95"] == [0.0, 0.0]


def test_champion_is_scored_with_its_own_embeddings(world, tmp_path):
    # The champion (exact looks) beats the candidate (good): rejected against the champion only.
    result = evaluate(world, tmp_path, "good", "random", champion_uri=world["exact"])
    assert result.decision == "reject"
    by = {r["comparison"]: r for r in result.reasons}
    assert by["vs_baseline.absolute"]["passed"] and by["vs_baseline.ci_lower"]["passed"]
    assert not by["vs_champion.relative"]["passed"]
    assert "ndcg@5 vs champion" in by["vs_champion.relative"]["message"]
    # The champion's numbers are those of its own embeddings, not the candidate's.
    alone = evaluate(world, tmp_path / "alone", "exact", "random")
    assert result.champion["ndcg@5"] == alone.candidate["ndcg@5"] != result.candidate["ndcg@5"]
    assert result.champion["ndcg@5"] == pytest.approx(1.0)


def test_missing_champion_applies_only_baseline_thresholds(world, tmp_path):
    result = evaluate(world, tmp_path, "good", "random")
    assert result.champion is None
    assert "candidate_vs_champion" not in result.uplift
    assert not [r for r in result.reasons if "champion" in r["comparison"]]
    assert result.decision == "deploy"


def test_empty_policy_fails_closed(world, tmp_path):
    policy = tmp_path / "gate.yaml"
    policy.write_text("# nothing configured\n")
    result = evaluate(world, tmp_path, "good", "random", gate_config=str(policy))
    assert result.decision == "reject"
    assert "fails closed" in result.reasons[0]["message"]


def test_slice_policy_with_a_missing_slice(world, tmp_path):
    policy = tmp_path / "gate.yaml"
    policy.write_text("thresholds:\n  ndcg@5: {vs_baseline: {absolute: 0.0}}\n"
                      "slices:\n  - top_level_category: Women\n  - top_level_category: Kids\n")
    result = evaluate(world, tmp_path, "good", "random", listings_uri=world["listings"], gate_config=str(policy))
    assert result.decision == "reject"
    failed = [r for r in result.reasons if not r["passed"]]
    assert [(r["slice"], r["comparison"]) for r in failed] == [("Kids", "slice.present")]
    assert any(r["slice"] == "Women" and r["passed"] for r in result.reasons)


def test_skipped_lists_and_missing_items(tmp_path):
    """Hand-checked: lists without taps and with unembedded queries are skipped; missing items last."""
    def row(q, s, item, pos, tap):
        return {"query_item_id": q, "item_id": item, "position": pos, "tapped": tap, "session_id": s, "ts": "2024-05-01T10:00:00Z"}

    rows = [
        # A: the tapped `a` (logged first) has no candidate embedding -> last for the candidate.
        row("q1", "s1", "a", 0, 1), row("q1", "s1", "b", 1, 0), row("q1", "s1", "c", 2, 0),
        # B: same query, other session, no taps -> skipped.
        row("q1", "s2", "a", 0, 0), row("q1", "s2", "b", 1, 0),
        # C: query not embedded by the baseline -> skipped for every model.
        row("q9", "s1", "a", 0, 1), row("q9", "s1", "b", 1, 0),
        # D: file order shuffled; only the scores and the logged positions say who is first.
        row("q2", "s1", "y", 1, 0), row("q2", "s1", "x", 0, 1), row("q2", "s1", "z", 2, 0),
    ]
    e = np.eye(4)
    cand = write_embeddings(tmp_path / "cand", ["q1", "b", "c", "q2", "x", "y", "z", "q9"],
                            np.stack([e[0], e[0], e[1], e[2], e[2], e[1], e[1], e[3]]))
    # The baseline puts both taps last: a and x are orthogonal to their queries.
    base = write_embeddings(tmp_path / "base", ["q1", "a", "b", "c", "q2", "x", "y", "z"],
                            np.stack([e[0], e[1], e[0], e[0] + e[2], e[2], e[3], e[2], e[2] + e[0]]))
    result = run_evaluation(EvaluateConfig(
        interactions_uri=write_jsonl(tmp_path / "logs.jsonl", rows), candidate_uri=cand, baseline_uri=base,
        out_dir=str(tmp_path / "out"), bootstrap_resamples=0))
    assert result.lists_used == 2 and result.lists_skipped == 2
    # Candidate: A ranks b, c, a -> tap at rank 3; D ranks x first.
    assert result.candidate["precision@1"] == pytest.approx(0.5)
    assert result.candidate["ndcg@5"] == pytest.approx((1 / np.log2(4) + 1.0) / 2)
    assert result.candidate["hit_rate@3"] == pytest.approx(1.0)
    # Baseline: the tap last in both lists; the logged order had it first in both.
    assert result.baseline["precision@1"] == 0.0
    assert result.baseline["ndcg@5"] == pytest.approx(1 / np.log2(4))
    logged = result.uplift["logged_order_vs_baseline"]["ndcg@5"]
    assert logged["value"] == 1.0 and logged["absolute"] == pytest.approx(1 - 1 / np.log2(4))
    # No bootstrap -> no interval -> the default gate cannot show an improvement.
    assert result.uplift["candidate_vs_baseline"]["ndcg@5"]["ci95"] is None
    assert result.decision == "reject"


def test_parquet_logs_bad_rows_and_determinism(world, tmp_path):
    rows = world["rows"]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "logs.parquet")
    from_parquet = run_evaluation(EvaluateConfig(
        interactions_uri=str(tmp_path / "logs.parquet"), candidate_uri=world["good"], baseline_uri=world["random"],
        out_dir=str(tmp_path / "a"), bootstrap_resamples=200, seed=5))
    from_jsonl = evaluate(world, tmp_path, "good", "random", bootstrap_resamples=200, seed=5)
    assert from_parquet == from_jsonl  # same seed, same lists -> identical, intervals included

    # A malformed line and a row missing its position go to a dead-letter file; the run goes on.
    text = Path(world["interactions"]).read_text()
    broken = text + "{not json\n" + json.dumps({**rows[0], "position": None}) + "\n"
    (tmp_path / "broken.jsonl").write_text(broken)
    result = run_evaluation(EvaluateConfig(
        interactions_uri=str(tmp_path / "broken.jsonl"), candidate_uri=world["good"],
        baseline_uri=world["random"], out_dir=str(tmp_path / "b"), bootstrap_resamples=200, seed=5))
    assert result.candidate == from_jsonl.candidate
    dead = [json.loads(x) for x in (tmp_path / "b" / "rejected.jsonl").read_text().splitlines()]
    assert len(dead) == 2 and all(d["reason"] for d in dead)


def test_impression_rows_outside_the_data_contract_are_set_aside(world, tmp_path):
    """The logs are read by the contract's one reader: a tap that is not 0/1, or a row without a valid
    `ts`, is a dead letter with its reason, and the lists are those of the clean logs."""
    rows = world["rows"]
    bad = [{**rows[0], "tapped": 2}, {**rows[1], "ts": "yesterday"}, {k: v for k, v in rows[2].items() if k != "ts"}]
    result = run_evaluation(EvaluateConfig(
        interactions_uri=write_jsonl(tmp_path / "logs.jsonl", rows + bad), candidate_uri=world["good"],
        baseline_uri=world["random"], out_dir=str(tmp_path / "b"), bootstrap_resamples=200, seed=5))
    assert result == evaluate(world, tmp_path, "good", "random", bootstrap_resamples=200, seed=5)
    dead = [json.loads(x) for x in (tmp_path / "b" / "rejected.jsonl").read_text().splitlines()]
    assert [d["reason"] for d in dead] == ["invalid_tapped", "invalid_ts", "missing_column:ts"]


def test_gcs_inputs_and_outputs(world, tmp_path, gcs_emulator):
    from visrec.core import io

    bucket = gcs_emulator()
    base = f"gs://{bucket}/eval"
    io.upload_dir(world["root"] / "good", f"{base}/good")
    io.upload_dir(world["root"] / "random", f"{base}/random")
    io.write_bytes(f"{base}/interactions.jsonl", Path(world["interactions"]).read_bytes())
    result = run_evaluation(EvaluateConfig(
        interactions_uri=f"{base}/interactions.jsonl", candidate_uri=f"{base}/good", baseline_uri=f"{base}/random",
        out_dir=f"{base}/out", bootstrap_resamples=100))
    assert io.read_json(f"{base}/out/metrics.json") == result.as_dict()
    assert io.exists(f"{base}/out/report.html")


def test_cli_prints_the_gate_and_exits_zero_on_reject(world, tmp_path, capsys):
    from visrec.cli import main

    rc = main(["evaluate", "--interactions", world["interactions"], "--candidate", world["random"],
               "--baseline", world["good"], "--out", str(tmp_path / "out"), "--bootstrap", "100"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "decision: reject" in out and "vs_baseline.ci_lower" in out and "FAIL" in out
    rc = main(["evaluate", "--interactions", str(tmp_path / "missing.jsonl"), "--candidate", world["good"],
               "--baseline", world["random"], "--out", str(tmp_path / "out2")])
    assert rc == 2


@pytest.mark.integration
@pytest.mark.parametrize("candidate, baseline, decision", [("good", "random", "deploy"),
                                                           ("random", "good", "reject")])
def test_component_under_kfp_local_branches_on_the_decision(world, tmp_path, candidate, baseline, decision):
    from kfp import dsl, local

    from components.evaluate import evaluate as evaluate_component

    @dsl.component(install_kfp_package=False)
    def announce(decision: str) -> str:
        return f"shipping ({decision})"

    @dsl.pipeline
    def gate_pipeline(interactions_uri: str, listings_uri: str, candidate_uri: str, baseline_uri: str) -> str:
        logs = dsl.importer(artifact_uri=interactions_uri, artifact_class=dsl.Dataset, reimport=False)
        listings = dsl.importer(artifact_uri=listings_uri, artifact_class=dsl.Dataset, reimport=False)
        cand = dsl.importer(artifact_uri=candidate_uri, artifact_class=dsl.Dataset, reimport=False)
        base = dsl.importer(artifact_uri=baseline_uri, artifact_class=dsl.Dataset, reimport=False)
        ev = evaluate_component(interactions=logs.output, listings=listings.output, candidate=cand.output,
                                baseline=base.output, champion_uri="", gate_policy="", bootstrap_resamples=100)
        # The decision is the component's only parameter output ("Output"); its artifacts are the rest.
        with dsl.If(ev.outputs["Output"] == "deploy"):
            announce(decision=ev.outputs["Output"])
        return ev.outputs["Output"]

    root = tmp_path / "root"
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root))
    run = gate_pipeline(interactions_uri=world["interactions"], listings_uri=world["listings"],
                        candidate_uri=world[candidate],
                        baseline_uri=world[baseline])
    assert run.output == decision
    [metrics_file] = list(root.rglob("evaluation/metrics.json"))
    assert json.loads(metrics_file.read_text())["decision"] == decision
    [executor_output] = list(root.rglob("evaluate/executor_output.json"))
    logged = json.loads(executor_output.read_text())["artifacts"]["metrics"]["artifacts"][0]["metadata"]
    assert logged["deploy"] == float(decision == "deploy") and "uplift.candidate_vs_baseline.ndcg@5.absolute" in logged
    assert list(root.rglob("evaluate/report"))
    assert bool(list(root.rglob("announce"))) == (decision == "deploy")

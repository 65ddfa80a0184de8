"""The offline study (visrec.sim.study package): pure parts, and one fast end-to-end run on a tiny marketplace.

The end-to-end run uses the shared 400-item marketplace and tiny models, 1 epoch, few
bootstrap resamples, a few dozen simulated users and the shuffled-titles control: it checks
that every output is written and that the figures agree with each other, not what they are.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from visrec.sim.demo_data import tap_probability
from visrec.stages.evaluate.metrics import METRICS
from visrec.sim.study.ab import RANKING_VARIANTS, Session, arm_of, make_sessions, simulate_taps
from visrec.sim.study.config import (ARMS, BASELINE, CANDIDATE, CONTROL, StudyConfig, table1_pca_dims,
                                     tradeoff_dims)
from visrec.sim.study.controls import derangement, shuffle_titles
from visrec.sim.study.run import run_study
from visrec.sim.study.stats import neighbour_agreement, ratio_bootstrap, summarise_ab
from visrec.core.errors import UserError


def test_table1_pca_dims_keep_the_papers_ratio():
    # 128 of 768: the trade-off size below the embedding size nearest to a sixth of it.
    assert table1_pca_dims(768) == 128
    assert table1_pca_dims(192) == 32
    assert table1_pca_dims(96) == 16
    assert table1_pca_dims(64) == 8
    assert table1_pca_dims(4) is None


def test_tradeoff_skips_sizes_above_the_embedding():
    assert tradeoff_dims(64) == ([4, 8, 16, 32, 64], [128, 256])
    assert tradeoff_dims(768) == ([4, 8, 16, 32, 64, 128, 256], [])


def test_traffic_split_is_stable_per_user_and_roughly_even():
    assert arm_of("user-1", "s") == arm_of("user-1", "s")
    arms = [arm_of(f"user-{i}", "s") for i in range(2000)]
    assert set(arms) == set(ARMS)
    assert 0.45 < arms.count(CANDIDATE) / len(arms) < 0.55
    sessions = make_sessions(["a", "b", "c"], users=10, sessions_per_user=3, seed=0)
    assert len(sessions) == 30 and [s.index for s in sessions] == list(range(30))
    for s in sessions:  # a user always sees one arm
        assert s.arm == arm_of(s.user_id, "study-0")
    with pytest.raises(UserError):
        make_sessions([], 2, 1, 0)


def test_ranking_variants_switch_filter_and_rerank_through_serve_flags():
    flags = {v.name: v.serve_flags() for v in RANKING_VARIANTS}
    assert flags["filter + re-rank"] == []
    assert "--category-weight" in flags["no category re-rank"] and "--price-low" not in flags["no category re-rank"]
    assert "--price-low" in flags["no price filter"] and "--category-weight" not in flags["no price filter"]
    assert "--price-low" in flags["neither"] and "--category-weight" in flags["neither"]


def _hidden(item_id, shape, colour, price, category="Men/Tops/T-shirts"):
    return {"item_id": item_id, "shape": shape, "colour": colour, "pattern": "plain", "category": category,
            "price": price}


def test_neighbour_agreement_says_which_attribute_an_embedding_sees():
    rng = np.random.default_rng(0)
    shapes, colours = ["tote", "mug", "cap"], ["red", "navy"]
    hidden = {f"i{n}": {"shape": shapes[n % 3], "colour": colours[n % 2], "pattern": "plain",
                        "category": shapes[n % 3]} for n in range(120)}
    ids = list(hidden)
    by_shape = np.eye(3)[[n % 3 for n in range(120)]] + 0.01 * rng.normal(size=(120, 3))
    by_colour = np.eye(2)[[n % 2 for n in range(120)]] + 0.01 * rng.normal(size=(120, 2))
    # The colour model embeds only some items: every model is scored on the items all of them embed.
    result = neighbour_agreement({"shape": (ids, by_shape), "colour": (ids[:90], by_colour[:90])}, hidden, k=5,
                                 queries=50)
    assert result["queries"] == 50
    shape, colour = result["models"]["shape"], result["models"]["colour"]
    assert shape["shape"] == shape["category"] == 1.0 and shape["pattern"] == 1.0
    assert colour["colour"] == 1.0 and colour["shape"] < 0.5
    assert result["random"]["shape"] == pytest.approx(1 / 3, abs=1e-4) and result["random"]["colour"] == 0.5


def test_simulated_taps_use_the_hidden_model_and_common_random_numbers():
    hidden = {"q": _hidden("q", "tshirt", "black", 1000), "twin": _hidden("twin", "tshirt", "black", 1000),
              "far": _hidden("far", "mug", "yellow", 9000, "Home/Kitchen/Mugs")}
    session = Session(3, "user-1", CANDIDATE, "q")
    probs, taps = simulate_taps(hidden, session, ["twin", "far"], seed=0, k=10)
    assert probs[0] == pytest.approx(tap_probability(hidden["q"], hidden["twin"], 0))
    assert probs[1] == pytest.approx(tap_probability(hidden["q"], hidden["far"], 1))
    assert probs[0] > 10 * probs[1]
    again = simulate_taps(hidden, session, ["twin", "far"], seed=0, k=10)[1]
    assert (again == taps).all()  # same session, same list: same draws


def test_ratio_bootstrap_and_ab_summary_are_consistent():
    rng = np.random.default_rng(0)
    draws = ratio_bootstrap(np.array([1, 2, 3, 4.0]), np.array([10, 10, 10, 10.0]), 200, rng)
    assert draws.shape == (200, 1) and ((draws >= 0.1) & (draws <= 0.4)).all()
    records = [{"variant": v, "user_id": f"u{u}", "arm": ARMS[u % 2], "impressions": 10,
                "taps": (u % 3) + (v == "a") * (u % 2), "expected_taps": 1.0, "latency_ms": 1.0}
               for v in ("a", "b") for u in range(20)]
    out = summarise_ab(records, ["a", "b"], 100, 0)
    for v in ("a", "b"):
        for arm in ARMS:
            entry = out["variants"][v][arm]
            assert entry["sessions"] == 10 and entry["impressions"] == 100
            assert entry["ctr"] == pytest.approx(entry["taps"] / 100)
        base, cand = out["variants"][v][BASELINE]["ctr"], out["variants"][v][CANDIDATE]["ctr"]
        assert out["variants"][v]["ctr_uplift"] == pytest.approx(cand / base - 1, abs=1e-6)
    assert "relative_change_vs_full" in out["variants"]["b"][CANDIDATE]


def test_derangement_moves_every_element():
    rng = np.random.default_rng(0)
    for n in (2, 3, 10, 500):
        perm = derangement(n, rng)
        assert sorted(perm) == list(range(n)) and not (perm == np.arange(n)).any()
    with pytest.raises(UserError, match="at least 2"):
        derangement(1, rng)


def test_shuffle_titles_moves_every_trainable_title_and_keeps_the_rest(tmp_path):
    market = tmp_path / "market"
    (market / "images").mkdir(parents=True)
    rows = [{"item_id": f"m{i}", "title": f"title {i}", "image_uri": f"images/m{i}.jpg", "price": 100 + i,
             "category": "Home/Kitchen/Mugs", "status": "reserved" if i == 2 else "on_sale"} for i in range(6)]
    (market / "listings.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "control" / "listings.jsonl"
    counts = shuffle_titles(str(market / "listings.jsonl"), out, seed=1)
    assert counts == {"rows": 6, "titles_moved": 5, "kept_in_place": 1}
    shuffled = [json.loads(line) for line in out.read_text().splitlines()]
    for before, after in zip(rows, shuffled):
        assert {k: v for k, v in after.items() if k not in ("title", "image_uri")} == \
            {k: v for k, v in before.items() if k not in ("title", "image_uri")}
        assert after["image_uri"] == str(market / before["image_uri"])  # absolute: the copy lives elsewhere
    # A reserved listing's title is a message prepare drops with it: it stays; every other title moves.
    assert shuffled[2]["title"] == "title 2"
    moved = [(b["title"], a["title"]) for b, a in zip(rows, shuffled) if b["status"] != "reserved"]
    assert all(old != new for old, new in moved)
    assert sorted(new for _, new in moved) == sorted(old for old, _ in moved)
    again = tmp_path / "again.jsonl"
    shuffle_titles(str(market / "listings.jsonl"), again, seed=1)
    assert again.read_text() == out.read_text()
    (market / "listings.jsonl").write_text(json.dumps(rows[0]) + "\n{not json\n")
    with pytest.raises(UserError, match="listings.jsonl:2"):
        shuffle_titles(str(market / "listings.jsonl"), out, seed=1)


@pytest.fixture(scope="module")
def study(tmp_path_factory, marketplace, tiny_models):
    out = tmp_path_factory.mktemp("study")
    config = StudyConfig(out_dir=str(out), marketplace_dir=str(marketplace), models_dir=str(tiny_models), epochs=1,
                         shuffled_titles_control=True, bootstrap_resamples=50, ab_users=30, ab_sessions_per_user=2,
                         workers=1, seed=7)
    result = run_study(config, command="pytest")
    return out, result, config


def test_study_writes_every_output(study):
    out, result, _ = study
    for name in ("study.json", "study.md", "table1.png", "pca_tradeoff.png", "ab_test.png", "gate_report.html",
                 "evaluation/metrics.json", "evaluation/report.html"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert json.loads((out / "study.json").read_text())["table1"]["lists_used"] == result["table1"]["lists_used"]
    md = (out / "study.md").read_text()
    assert "synthetic" in md and "none of them is the paper's" in md
    assert "## Table 1" in md and "## PCA trade-off" in md and "## Simulated online A/B test" in md
    assert (out / "table1.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_table1_has_the_papers_rows_and_consistent_uplifts(study):
    _, result, _ = study
    assert set(result["neighbour_agreement"]["models"]) == {r["key"] for r in result["table1"]["rows"]
                                                           if r["key"] not in ("random", "logged_order")}
    rows = {r["key"]: r for r in result["table1"]["rows"]}
    assert list(rows) == [BASELINE, "siglip_base", CONTROL, "siglip_full", "siglip_pca8", "random", "logged_order"]
    assert rows["siglip_full"]["dims"] == 64 and rows["siglip_pca8"]["dims"] == 8
    base = rows[BASELINE]["metrics"]
    for key, row in rows.items():
        for m in METRICS:
            mean, ci = row["metrics"][m]["mean"], row["metrics"][m]["ci95"]
            assert 0.0 <= mean <= 1.0 and ci[0] <= mean + 1e-9 and mean <= ci[1] + 1e-9
            if key == BASELINE:
                continue
            up = row["uplift"][m]
            assert up["relative"] == pytest.approx((mean - base[m]["mean"]) / base[m]["mean"], abs=1e-5)
            assert up["absolute"] == pytest.approx(mean - base[m]["mean"], abs=1e-5)
    # The gate's own evaluation scored the served candidate and the baseline on the same lists.
    gate = result["table1"]["gate"]
    assert gate["candidate"] == "siglip_pca8" and gate["lists_used"] == result["table1"]["lists_used"]
    assert gate["candidate_ndcg@5"] == pytest.approx(rows["siglip_pca8"]["metrics"]["ndcg@5"]["mean"])
    assert gate["baseline_ndcg@5"] == pytest.approx(base["ndcg@5"]["mean"])


def test_pca_tradeoff_rows_and_sizes(study):
    _, result, _ = study
    trade = result["pca_tradeoff"]
    points = {p["label"]: p for p in trade["points"]}
    assert list(points) == ["none", "64", "32", "16", "8", "4"] and trade["skipped_dims"] == [128, 256]
    full = points["none"]["index_bytes"]["total"]
    assert points["16"]["bytes_per_item"] < points["32"]["bytes_per_item"] < points["none"]["bytes_per_item"]
    for p in trade["points"]:
        assert p["bytes_per_item"] == pytest.approx(p["index_bytes"]["total"] / p["index_items"])
        assert p["storage_saving"] == pytest.approx(1 - p["index_bytes"]["total"] / full)
    rows = {r["key"]: r for r in result["table1"]["rows"]}
    assert points["8"]["ndcg@5"] == rows["siglip_pca8"]["metrics"]["ndcg@5"]["mean"]


def test_shuffled_titles_control_trains_on_the_shuffled_pairs_and_is_gated(study):
    from visrec.stages.train.data import read_prepared

    out, result, _ = study
    control, rows = result["table1"]["control"], {r["key"]: r for r in result["table1"]["rows"]}
    # Fine-tuned on the same items as the candidate, each with the title the shuffle gave it.
    real, shuffled = (read_prepared(str(d))[0] for d in (out / "prepared", out / "control" / "prepared"))
    assert sorted(real.column("item_id").to_pylist()) == sorted(shuffled.column("item_id").to_pylist())
    given = {r["item_id"]: r["title"] for r in map(json.loads, (out / "control" / "listings.jsonl").open())}
    titles = dict(zip(shuffled.column("item_id").to_pylist(), shuffled.column("title").to_pylist()))
    assert titles == {i: given[i] for i in titles}
    own = dict(zip(real.column("item_id").to_pylist(), real.column("title").to_pylist()))
    assert np.mean([titles[i] != own[i] for i in titles]) > 0.9  # some generated titles repeat
    assert control["shuffle"]["titles_moved"] > len(titles)
    # Scored beside the others, compared with the real fine-tuning, and through the default gate.
    pairing = control["pairing_uplift"]
    assert pairing["absolute"] == pytest.approx(rows["siglip_full"]["metrics"]["ndcg@5"]["mean"]
                                                - rows[CONTROL]["metrics"]["ndcg@5"]["mean"], abs=1e-5)
    assert control["gate"]["decision"] in ("deploy", "reject") and (out / control["gate"]["report"]).is_file()
    assert CONTROL in result["neighbour_agreement"]["models"]
    assert "Control: the same fine-tuning" in (out / "study.md").read_text()


def test_ab_test_arms_and_variants_are_consistent(study):
    _, result, config = study
    summary = result["ab_test"]["summary"]
    assert list(summary["variants"]) == [v.name for v in RANKING_VARIANTS]
    assert summary["users"][BASELINE] + summary["users"][CANDIDATE] == config.ab_users
    for name, v in summary["variants"].items():
        assert v[BASELINE]["sessions"] + v[CANDIDATE]["sessions"] == config.ab_users * config.ab_sessions_per_user
        for arm in ARMS:
            a = v[arm]
            assert 0 < a["impressions"] <= a["sessions"] * config.ab_k
            assert 0.0 <= a["ctr"] <= 1.0 and a["ctr"] == pytest.approx(a["taps"] / a["impressions"], abs=1e-6)
            assert a["ctr_ci95"][0] <= a["ctr"] <= a["ctr_ci95"][1]
        assert v["ctr_uplift"] == pytest.approx(v[CANDIDATE]["ctr"] / v[BASELINE]["ctr"] - 1, abs=1e-5)
    releases = result["ab_test"]["releases"]
    assert {r["status"] for r in releases.values()} <= {"deployed", "unchanged"}
    assert releases[BASELINE]["version"] != releases[CANDIDATE]["version"]

"""The synthetic marketplace: determinism, the data contract, corruptions and the hidden user model."""

from __future__ import annotations

import json
import re
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from visrec import cli
from visrec.sim.demo_data import (CATEGORIES, COLOUR_WORDS, CORRUPTION_KINDS, DemoDataConfig, generate_marketplace,
                              load_hidden, ranking_baselines, similarity, tap_probability, visual_similarity)
from visrec.core.errors import UserError

LISTING_KEYS = {"item_id", "title", "image_uri", "category", "price", "status", "listed_at"}
INTERACTION_KEYS = {"query_item_id", "item_id", "position", "tapped", "session_id", "ts"}
HIDDEN_KEYS = {"item_id", "shape", "colour", "pattern", "category", "price", "duplicate_of"}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def decodes(path: Path) -> bool:
    try:
        with Image.open(path) as im:
            im.load()
        return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def corrupted(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("corrupted")
    generate_marketplace(out, DemoDataConfig(items=120, seed=11, corrupt_fraction=0.1, image_size=64, workers=2))
    return out


def snapshot(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_whatever_the_workers(corrupted, tmp_path):
    again = tmp_path / "again"
    generate_marketplace(again, DemoDataConfig(items=120, seed=11, corrupt_fraction=0.1, image_size=64, workers=1))
    a, b = snapshot(corrupted), snapshot(again)
    assert a.keys() == b.keys()
    assert [k for k in a if a[k] != b[k]] == []
    assert sum(k.startswith("images/") for k in a) >= 110


def test_different_seed_differs(corrupted, tmp_path):
    other = tmp_path / "other"
    generate_marketplace(other, DemoDataConfig(items=120, seed=12, corrupt_fraction=0.1, image_size=64, workers=1))
    a, b = snapshot(corrupted), snapshot(other)
    for name in ("listings.jsonl", "interactions.jsonl", "hidden/items.jsonl"):
        assert a[name] != b[name]
    ids_a = {r["item_id"] for r in read_jsonl(corrupted / "hidden" / "items.jsonl")}
    ids_b = {r["item_id"] for r in read_jsonl(other / "hidden" / "items.jsonl")}
    assert not ids_a & ids_b


def test_listings_follow_the_contract(marketplace):
    rows = read_jsonl(marketplace / "listings.jsonl")
    assert len(rows) == 400
    assert len({r["item_id"] for r in rows}) == 400
    for r in rows:
        assert LISTING_KEYS <= r.keys()
        assert isinstance(r["item_id"], str) and r["item_id"]
        assert isinstance(r["title"], str) and r["title"].strip()
        assert r["image_uri"] == f"images/{r['item_id']}.jpg"
        assert (marketplace / r["image_uri"]).is_file()
        assert r["category"] in CATEGORIES and len(r["category"].split("/")) == 3
        assert type(r["price"]) is int and r["price"] > 0
        assert r["status"] in {"on_sale", "sold_out", "reserved"}
        assert datetime.fromisoformat(r["listed_at"]).tzinfo is not None
    statuses = {s: sum(r["status"] == s for r in rows) for s in ("on_sale", "sold_out", "reserved")}
    assert statuses["on_sale"] > 250 and statuses["sold_out"] > 20 and statuses["reserved"] >= 5
    assert len({r["category"] for r in rows}) >= 12
    # Prices depend on the category: bags cost more than mugs.
    median = {c: np.median([r["price"] for r in rows if r["category"] == c]) for c in CATEGORIES}
    assert median["Women/Bags/Handbags"] > 2 * median["Home/Kitchen/Mugs"]


def test_titles_mix_languages_and_mention_attributes(marketplace):
    rows = {r["item_id"]: r for r in read_jsonl(marketplace / "listings.jsonl")}
    hidden = load_hidden(marketplace)
    titles = [r["title"] for r in rows.values() if r["status"] != "reserved"]
    assert sum(bool(re.search(r"[\u3040-\u30ff\u4e00-\u9fff]", t)) for t in titles) > 0.5 * len(titles)
    assert sum(bool(re.search(r"[A-Za-z]{3}", t)) for t in titles) > 0.3 * len(titles)
    names_true_colour = sum(any(w in rows[i]["title"] for w in COLOUR_WORDS[h["colour"]]) for i, h in hidden.items())
    assert 0.3 * len(rows) < names_true_colour < 0.9 * len(rows)  # informative, but not always


def test_reserved_titles_read_like_messages(marketplace):
    rows = read_jsonl(marketplace / "listings.jsonl")
    reserved = [r["title"] for r in rows if r["status"] == "reserved"]
    assert reserved
    for title in reserved:
        assert "専用" in title and re.search("様|さま", title), title
    assert not [r["title"] for r in rows if r["status"] != "reserved" and "専用" in r["title"]]


def test_images_decode_at_the_configured_size(marketplace):
    sizes = set()
    for path in sorted((marketplace / "images").glob("*.jpg")):
        with Image.open(path) as im:
            im.load()
            assert im.mode == "RGB" and im.format == "JPEG"
            assert max(im.size) == 160
            sizes.add(im.size)
    assert (160, 160) in sizes and len(sizes) > 1  # mostly square, some portrait/landscape


def test_relistings_are_near_duplicate_photos(marketplace):
    hidden = load_hidden(marketplace)
    pairs = [(i, h["duplicate_of"]) for i, h in hidden.items() if h["duplicate_of"]]
    assert len(pairs) >= 5

    def pixels(item_id: str) -> np.ndarray:
        with Image.open(marketplace / "images" / f"{item_id}.jpg") as im:
            return np.asarray(im.convert("RGB").resize((32, 32)), dtype=np.float32)

    ids = sorted(hidden)
    for item_id, original in pairs:
        a, b = hidden[item_id], hidden[original]
        assert {k: a[k] for k in ("shape", "colour", "pattern", "category")} == \
               {k: b[k] for k in ("shape", "colour", "pattern", "category")}
        assert b["duplicate_of"] is None
    dup = np.mean([np.abs(pixels(i) - pixels(o)).mean() for i, o in pairs])
    rand = np.mean([np.abs(pixels(ids[k]) - pixels(ids[k + 1])).mean() for k in range(0, 100, 2)])
    assert dup < 0.5 * rand


def test_interactions_follow_the_contract(marketplace):
    listings = {r["item_id"]: r for r in read_jsonl(marketplace / "listings.jsonl")}
    rows = read_jsonl(marketplace / "interactions.jsonl")
    lists: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        assert set(r) == INTERACTION_KEYS
        assert r["tapped"] in (0, 1) and type(r["position"]) is int
        assert r["item_id"] in listings and r["query_item_id"] in listings
        assert listings[r["item_id"]]["status"] != "reserved"
        datetime.fromisoformat(r["ts"])
        lists.setdefault((r["query_item_id"], r["session_id"]), []).append(r)
    assert len(lists) == 400
    for (query, _), items in lists.items():
        assert [r["position"] for r in items] == list(range(10))
        assert len({r["item_id"] for r in items}) == 10 and query not in {r["item_id"] for r in items}
    with_tap = sum(any(r["tapped"] for r in items) for items in lists.values())
    assert 0.25 * len(lists) < with_tap < 0.9 * len(lists)


def test_hidden_truth_covers_every_item(marketplace):
    hidden = load_hidden(marketplace)
    listings = read_jsonl(marketplace / "listings.jsonl")
    assert set(hidden) == {r["item_id"] for r in listings}
    for r in listings:
        h = hidden[r["item_id"]]
        assert HIDDEN_KEYS <= h.keys()
        assert h["category"] == r["category"] and h["price"] == r["price"]
        assert h["shape"] == CATEGORIES[r["category"]][0]
    assert "tap_probability" in (marketplace / "README.txt").read_text(encoding="utf-8")
    with pytest.raises(UserError):
        load_hidden(marketplace / "images")


def test_taps_follow_hidden_similarity(marketplace):
    """Re-ranking the logged lists by the hidden truth must clearly beat random and the logged order."""
    interactions = read_jsonl(marketplace / "interactions.jsonl")
    r = ranking_baselines(interactions, load_hidden(marketplace), seed=1)
    assert r["lists_with_tap"] > 100
    assert r["ndcg@5_oracle"] > r["ndcg@5_random"] + 0.25
    assert r["ndcg@5_oracle_visual"] > r["ndcg@5_logged"] + 0.1
    assert r["ndcg@5_logged"] > r["ndcg@5_random"]  # position bias: taps lean to the top of the log


def test_tap_probability_is_a_user_model(marketplace):
    hidden = load_hidden(marketplace)
    items = list(hidden.values())
    query = items[0]
    twin = dict(query, item_id="twin")
    assert similarity(query, twin) == pytest.approx(1.0)
    assert visual_similarity(query, twin) == pytest.approx(1.0)
    probs = [tap_probability(query, twin, p) for p in range(10)]
    assert all(a > b for a, b in zip(probs, probs[1:]))  # position bias
    assert probs[0] > 0.9
    unlike = min(items[1:], key=lambda c: similarity(query, c))
    assert tap_probability(query, unlike, 0) < 0.05
    for cand in items[1:50]:
        assert 0.0 <= tap_probability(query, cand, 3) <= 1.0


def test_every_corruption_kind_is_injected_and_recorded(corrupted):
    records = read_jsonl(corrupted / "hidden" / "corruptions.jsonl")
    assert {r["kind"] for r in records} == set(CORRUPTION_KINDS)
    assert len(records) == 12 and len({r["line"] for r in records}) == 12
    lines = (corrupted / "listings.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(lines) == 120
    hidden = load_hidden(corrupted)
    bad_lines = {r["line"] for r in records}
    for r in records:
        line, kind, image = lines[r["line"]], r["kind"], corrupted / "images" / f"{r['item_id']}.jpg"
        assert hidden[r["item_id"]]["status"] != "reserved"
        if kind == "malformed_json":
            with pytest.raises(json.JSONDecodeError):
                json.loads(line)
            continue
        row = json.loads(line)
        assert row == r["written"]
        if kind == "missing_image":
            assert not image.exists()
        elif kind == "truncated_image":
            assert image.exists() and not decodes(image)
            with Image.open(image) as im:  # the header survives: only a full decode notices
                assert im.format == "JPEG"
        elif kind == "non_image_bytes":
            assert image.exists() and not decodes(image)
        elif kind == "empty_title":
            assert row["title"] == ""
        elif kind == "non_positive_price":
            assert isinstance(row["price"], int) and row["price"] <= 0
        elif kind == "non_numeric_price":
            assert isinstance(row["price"], str) and not row["price"].lstrip("-").isdigit()
        elif kind == "duplicate_item_id":
            assert row["item_id"] == r["written_item_id"] != r["item_id"]
            earlier = json.loads(lines[r["duplicate_of_line"]])
            assert r["duplicate_of_line"] < r["line"] and r["duplicate_of_line"] not in bad_lines
            assert earlier["item_id"] == row["item_id"]
    for n, line in enumerate(lines):  # every other row is clean
        if n not in bad_lines:
            row = json.loads(line)
            assert row["title"] and row["price"] > 0 and decodes(corrupted / row["image_uri"])


def test_config_rejects_bad_values():
    for bad in (dict(items=1), dict(corrupt_fraction=0.9), dict(image_size=8), dict(workers=0)):
        with pytest.raises(UserError):
            DemoDataConfig(**bad)


def test_cli(tmp_path, capsys):
    out = tmp_path / "cli"
    rc = cli.main(["demo-data", "--out", str(out), "--items", "60", "--seed", "3", "--image-size", "48",
                   "--workers", "1", "--corrupt-fraction", "0.2"])
    assert rc == 0
    summary = capsys.readouterr().out.strip()
    assert summary.count("\n") == 0 and "60 items" in summary and "12 corrupted" in summary
    assert len((out / "listings.jsonl").read_text(encoding="utf-8").splitlines()) == 60
    assert cli.main(["demo-data", "--out", str(tmp_path / "bad"), "--items", "1"]) == 2


def test_writes_to_gcs(gcs_emulator):
    from visrec.core import io

    uri = f"gs://{gcs_emulator()}/demo"
    generate_marketplace(uri, DemoDataConfig(items=20, seed=5, image_size=48, workers=1))
    files = io.list_files(uri)
    assert f"{uri}/listings.jsonl" in files and f"{uri}/hidden/items.jsonl" in files
    assert sum("/images/" in f for f in files) == 20
    assert len(load_hidden(uri)) == 20

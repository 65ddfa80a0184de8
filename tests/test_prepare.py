"""Stage 1 (Beam dataset preparation) on hand-made listings with one row per rejection reason."""

from __future__ import annotations

import csv
import io as _bytes_io
import json
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from visrec.core import io
from visrec.core.errors import UserError
from visrec.stages.configs import PrepareConfig
from visrec.stages.prepare import OUTPUT_SCHEMA, accounted_rows, run_prepare, sample_key, split_of

IMAGE_SIZE = 32
MULTI_PROCESS = ["--direct_num_workers=2", "--direct_running_mode=multi_processing"]


def _jpeg(size: tuple[int, int], colour: tuple[int, int, int]) -> bytes:
    buf = _bytes_io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="JPEG")
    return buf.getvalue()


def _row(name: str, **kw) -> dict:
    row = {"item_id": name, "title": f"title of {name}", "image_uri": f"images/{name}.jpg",
           "category": "Women/Tops/T-shirts", "price": "1500", "status": "on_sale",
           "listed_at": "2024-03-01T10:00:00+09:00", "description": "extra column, ignored"}
    row.update(kw)
    return row


def make_listings(root: Path, fmt: str) -> tuple[Path, dict]:
    """Listings in `fmt` with one bad row per reason, plus the expected stats."""
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    for i, item in enumerate(["a1", "a2", "r1", "b1", "t1", "p1", "p2", "c1", "d1", "e1"]):
        (images / f"{item}.jpg").write_bytes(_jpeg((40, 24 + i), (20 * i, 100, 200)))
    (images / "u1.jpg").write_bytes(_jpeg((40, 40), (1, 2, 3))[:300])  # truncated
    (images / "u2.jpg").write_bytes(b"<!DOCTYPE html><html><body>403 Forbidden</body></html>")
    wide = Image.new("RGBA", (60, 20), (0, 128, 0, 255))
    wide.save(images / "w1.png")
    outside = root.parent / f"{root.name}-elsewhere"
    outside.mkdir(exist_ok=True)
    (outside / "abs1.jpg").write_bytes(_jpeg((30, 30), (9, 9, 9)))

    rows = [
        _row("a1"),
        _row("a2", status="sold_out", price="980"),
        _row("r1", status="reserved", title="専用 山田様 お取り置き"),
        _row("a1", title="DUPLICATE, must lose"),                    # duplicate of the first a1
        _row("b1", title=""),                                          # empty_title; a later b1 is fine
        _row("b1", title="b1 relisted"),
        _row("t1", title="  "),                                        # empty_title
        _row("p1", price="応相談"),                                   # invalid_price
        _row("p2", price="0"),                                         # invalid_price
        _row("c1", category=None),                                     # missing_column:category
        _row("d1", listed_at="next tuesday"),                          # invalid_listed_at
        _row("e1", item_id=" "),                                       # empty_item_id
        _row("m1"),                                                    # image_missing
        _row("u1"),                                                    # image_undecodable (truncated)
        _row("u2"),                                                    # image_undecodable (not an image)
        _row("w1", image_uri="images/w1.png"),
        _row("abs1", image_uri=str(outside / "abs1.jpg")),             # absolute path
    ]
    rejected = {"empty_title": 2, "invalid_price": 2, "missing_column:category": 1, "invalid_listed_at": 1,
                "empty_item_id": 1, "image_missing": 1, "image_undecodable": 2}
    path = root / f"listings.{fmt}"
    if fmt == "jsonl":
        lines = [json.dumps({k: v for k, v in r.items() if v is not None}, ensure_ascii=False) for r in rows]
        lines[3:3] = ['{"item_id": "x1", "title": "cut', "", "[1, 2, 3]"]  # 2 malformed, 1 blank (not a row)
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        rejected["malformed_json"] = 2
    elif fmt == "csv":
        with open(path, "w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        # CSV has no null: a missing cell is an empty string.
        rejected["empty_category"] = rejected.pop("missing_column:category")
    else:
        pq.write_table(pa.Table.from_pylist(rows), path)
    # input = rejected + 1 reserved + 1 duplicate + 5 good pairs
    stats = {"input_rows": sum(rejected.values()) + 1 + 1 + 5, "reserved_excluded": 1, "rejected": rejected,
             "duplicates_dropped": 1, "sampled_out": 0, "train_pairs": None, "val_pairs": None}
    return path, stats


def read_output(out: Path | str) -> pa.Table:
    shards = io.list_files(str(out), "data-*.parquet")
    return pa.concat_tables(pq.read_table(pa.BufferReader(io.read_bytes(s))) for s in shards)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """Each format prepared once: fmt -> (out dir, expected stats, returned stats)."""
    out = {}
    for fmt in ("jsonl", "csv", "parquet"):
        root = tmp_path_factory.mktemp(f"in-{fmt}")
        path, expected = make_listings(root, fmt)
        out_dir = root / "out"
        stats = run_prepare(PrepareConfig(str(path), str(out_dir), val_fraction=0.4, image_size=IMAGE_SIZE,
                                          shards=3))
        out[fmt] = (out_dir, expected, stats)
    return out


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_every_rejection_reason_is_counted(prepared, fmt):
    out_dir, expected, stats = prepared[fmt]
    assert json.loads((out_dir / "stats.json").read_text()) == stats.as_dict()
    assert list(stats.as_dict()) == ["input_rows", "reserved_excluded", "rejected", "duplicates_dropped",
                                     "sampled_out", "train_pairs", "val_pairs"]
    assert {k: v for k, v in stats.as_dict().items() if not k.endswith("_pairs")} == \
        {k: v for k, v in expected.items() if not k.endswith("_pairs")}
    assert stats.train_pairs + stats.val_pairs == 5
    assert accounted_rows(stats) == stats.input_rows


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_dead_letters_keep_row_and_reason(prepared, fmt):
    out_dir, expected, _ = prepared[fmt]
    records = [json.loads(line) for line in (out_dir / "rejected.jsonl").read_text().splitlines()]
    assert Counter(r["reason"] for r in records) == Counter(expected["rejected"])
    by_reason = {}
    for r in records:
        by_reason.setdefault(r["reason"], r)  # the first one in input order
    assert by_reason["invalid_price"]["row"]["item_id"] == "p1"
    assert by_reason["invalid_price"]["row"]["price"] == "応相談"
    assert by_reason["image_missing"]["row"]["image_uri"] == "images/m1.jpg"
    assert {r["row"]["item_id"] for r in records if r["reason"] == "image_undecodable"} == {"u1", "u2"}
    if fmt == "jsonl":
        assert {r["row"] for r in records if r["reason"] == "malformed_json"} == \
            {'{"item_id": "x1", "title": "cut', "[1, 2, 3]"}
        assert by_reason["invalid_price"]["row"]["description"] == "extra column, ignored"
    # Input order, so a person can read the file next to the listings.
    positions = [r["position"] for r in records]
    assert positions == sorted(positions)


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_output_rows_images_and_splits(prepared, fmt):
    out_dir, _, stats = prepared[fmt]
    assert sorted(p.name for p in out_dir.glob("data-*.parquet")) == \
        [f"data-0000{i}-of-00003.parquet" for i in range(3)]
    table = read_output(out_dir)
    assert table.schema == OUTPUT_SCHEMA
    rows = {r["item_id"]: r for r in table.to_pylist()}
    # Reserved rows never reach the output; the first a1 wins; a bad first b1 does not hide a good later one.
    assert sorted(rows) == ["a1", "a2", "abs1", "b1", "w1"]
    assert rows["a1"]["title"] == "title of a1"
    assert rows["b1"]["title"] == "b1 relisted"
    assert rows["a2"]["price"] == 980 and rows["a2"]["category"] == "Women/Tops/T-shirts"
    for r in rows.values():
        img = Image.open(_bytes_io.BytesIO(r["image"]))
        assert img.format == "JPEG" and img.mode == "RGB" and img.size == (IMAGE_SIZE, IMAGE_SIZE)
        assert r["split"] == split_of(r["item_id"], 0, 0.4)
    # The 60x20 picture: scaled to 32 wide, padded white above and below.
    w1 = Image.open(_bytes_io.BytesIO(rows["w1"]["image"])).convert("RGB")
    assert min(w1.getpixel((16, 1))) > 240 and w1.getpixel((16, 16))[1] > 100 > w1.getpixel((16, 16))[0]
    assert Counter(r["split"] for r in rows.values()) == {"train": stats.train_pairs, "val": stats.val_pairs}


def test_sampling_is_by_hash_and_multi_process_output_is_identical(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    rows = []
    for i in range(60):
        (images / f"s{i}.jpg").write_bytes(_jpeg((16, 16), (i * 4, 0, 0)))
        rows.append(_row(f"s{i}", image_uri=f"images/s{i}.jpg", status="reserved" if i % 10 == 0 else "on_sale"))
    path = tmp_path / "listings.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    eligible = [r["item_id"] for r in rows if r["status"] != "reserved"]
    outputs = {}
    for name, options in (("single", []), ("multi", MULTI_PROCESS)):
        out = tmp_path / name
        stats = run_prepare(PrepareConfig(str(path), str(out), max_pairs=20, seed=3, image_size=16, shards=2,
                                          beam_options=options))
        assert stats.sampled_out == len(eligible) - 20 and stats.train_pairs + stats.val_pairs == 20
        assert stats.reserved_excluded == 6 and accounted_rows(stats) == 60
        outputs[name] = [(out / f"data-0000{i}-of-00002.parquet").read_bytes() for i in range(2)]
        kept = set(read_output(out).column("item_id").to_pylist())
        assert kept == set(sorted(eligible, key=lambda item: sample_key(item, 3))[:20])
    assert outputs["single"] == outputs["multi"]
    # Another seed samples other items.
    assert set(sorted(eligible, key=lambda item: sample_key(item, 4))[:20]) != kept


def test_rerun_with_fewer_shards_leaves_no_stale_shards(tmp_path):
    path, _ = make_listings(tmp_path / "in", "jsonl")
    out = tmp_path / "out"
    run_prepare(PrepareConfig(str(path), str(out), image_size=16, shards=4))
    run_prepare(PrepareConfig(str(path), str(out), image_size=16, shards=2))
    assert sorted(p.name for p in out.glob("data-*")) == ["data-00000-of-00002.parquet",
                                                           "data-00001-of-00002.parquet"]
    assert read_output(out).num_rows == 5


@pytest.mark.parametrize("change, message", [
    ({"max_pairs": 0}, "max_pairs"),
    ({"val_fraction": 1.0}, "val_fraction"),
    ({"image_size": 2}, "image_size"),
    ({"jpeg_quality": 0}, "jpeg_quality"),
    ({"shards": 0}, "shards"),
    ({"runner": "DataflowRunner"}, "local paths"),
    ({"runner": "NoSuchRunner"}, "NoSuchRunner"),
])
def test_unusable_settings_are_user_errors(tmp_path, change, message):
    path, _ = make_listings(tmp_path, "jsonl")
    with pytest.raises(UserError, match=message):
        run_prepare(PrepareConfig(str(path), str(tmp_path / "out"), **change))


def test_cli_one_line_errors_and_success(tmp_path, capsys):
    from visrec.cli import main

    assert main(["prepare", "--listings", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "listings file not found" in err
    (tmp_path / "nocol.csv").write_text("item_id,title\nx,y\n")
    assert main(["prepare", "--listings", str(tmp_path / "nocol.csv"), "--out", str(tmp_path / "o")]) == 2
    assert "missing required column(s) image_uri" in capsys.readouterr().err

    path, expected = make_listings(tmp_path / "in", "jsonl")
    assert main(["prepare", "--listings", str(path), "--out", str(tmp_path / "o"), "--image-size", "16",
                 "--shards", "1", "--max-pairs", "3", "--", "--direct_num_workers=1"]) == 0
    stats = json.loads(capsys.readouterr().out)
    # 8 distinct valid rows, 3 sampled; a sampled row with a bad image is rejected, not replaced.
    image_rejects = stats["rejected"].get("image_missing", 0) + stats["rejected"].get("image_undecodable", 0)
    assert stats["sampled_out"] == 5 and stats["train_pairs"] + stats["val_pairs"] + image_rejects == 3
    assert stats == json.loads((tmp_path / "o" / "stats.json").read_text())


def test_gcs_input_and_output_through_the_emulator(tmp_path, gcs_emulator):
    bucket = gcs_emulator()
    path, expected = make_listings(tmp_path / "in", "jsonl")
    src = f"gs://{bucket}/market"
    io.upload_dir(path.parent, src)
    out = f"gs://{bucket}/prepared"
    stats = run_prepare(PrepareConfig(f"{src}/listings.jsonl", out, image_size=16, shards=2))
    assert stats.rejected == expected["rejected"] and stats.train_pairs + stats.val_pairs == 5
    assert io.read_json(f"{out}/stats.json") == stats.as_dict()
    assert [f.rsplit("/", 1)[-1] for f in io.list_files(out)] == \
        ["data-00000-of-00002.parquet", "data-00001-of-00002.parquet", "rejected.jsonl", "stats.json"]
    assert sorted(read_output(out).column("item_id").to_pylist()) == ["a1", "a2", "abs1", "b1", "w1"]
    assert len(io.read_text(f"{out}/rejected.jsonl").splitlines()) == sum(expected["rejected"].values())


# Each kind of bad row the generator injects -> what prepare must do with it.
CORRUPTION_OUTCOME = {
    "missing_image": "image_missing", "truncated_image": "image_undecodable", "non_image_bytes": "image_undecodable",
    "empty_title": "empty_title", "non_positive_price": "invalid_price", "non_numeric_price": "invalid_price",
    "malformed_json": "malformed_json", "duplicate_item_id": "duplicates_dropped",
}


@pytest.mark.integration
def test_generated_marketplace_every_injected_corruption_is_caught(tmp_path):
    from visrec.sim.demo_data import DemoDataConfig, generate_marketplace

    generate_marketplace(tmp_path / "m", DemoDataConfig(items=160, seed=5, corrupt_fraction=0.1, workers=1))
    corruptions = [json.loads(line) for line in (tmp_path / "m" / "hidden" / "corruptions.jsonl").open()]
    expected = Counter(CORRUPTION_OUTCOME[c["kind"]] for c in corruptions)
    assert set(expected) == set(CORRUPTION_OUTCOME.values())  # the generator injected every kind

    stats = run_prepare(PrepareConfig(str(tmp_path / "m" / "listings.jsonl"), str(tmp_path / "out"),
                                      image_size=32, shards=2))
    assert stats.input_rows == 160 and accounted_rows(stats) == 160
    assert stats.duplicates_dropped == expected.pop("duplicates_dropped")
    assert stats.rejected == dict(expected)
    reserved = {json.loads(line)["item_id"] for line in (tmp_path / "m" / "listings.jsonl").open()
                if line.startswith("{") and '"reserved"' in line}
    assert stats.reserved_excluded == len(reserved) > 0
    output_ids = read_output(tmp_path / "out").column("item_id").to_pylist()
    assert len(output_ids) == len(set(output_ids)) == stats.train_pairs + stats.val_pairs
    assert not reserved & set(output_ids)

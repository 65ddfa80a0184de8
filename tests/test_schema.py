"""The data contract in code: validation reasons, the three input formats, read-task splitting."""

from __future__ import annotations

import json
from datetime import datetime

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from visrec.data import schema
from visrec.core.errors import UserError

GOOD = {"item_id": "m1", "title": "白 ストライプ Tシャツ", "image_uri": "images/m1.jpg", "category": "Women/Tops/T-shirts",
        "price": 1200, "status": "on_sale", "listed_at": "2024-03-01T10:00:00+09:00"}


def test_good_row_is_cleaned_and_extra_columns_dropped():
    clean, reason = schema.validate_listing({**GOOD, "title": "  padded  ", "price": "1,200", "brand": "x"})
    assert reason is None
    assert clean == {**GOOD, "title": "padded", "price": 1200}


@pytest.mark.parametrize("change, reason", [
    ({"item_id": None}, "missing_column:item_id"),
    ({"title": None}, "missing_column:title"),
    ({"price": None}, "missing_column:price"),
    ({"listed_at": None}, "missing_column:listed_at"),
    ({"item_id": "  "}, "empty_item_id"),
    ({"title": ""}, "empty_title"),
    ({"title": "\t \n"}, "empty_title"),
    ({"category": ""}, "empty_category"),
    ({"image_uri": ""}, "empty_image_uri"),
    ({"status": ""}, "empty_status"),
    ({"title": ["a"]}, "invalid_title"),
    ({"item_id": True}, "invalid_item_id"),
    ({"price": 0}, "invalid_price"),
    ({"price": -300}, "invalid_price"),
    ({"price": "応相談"}, "invalid_price"),
    ({"price": "12.5"}, "invalid_price"),
    ({"price": 12.5}, "invalid_price"),
    ({"price": float("nan")}, "invalid_price"),
    ({"price": True}, "invalid_price"),
    ({"listed_at": "yesterday"}, "invalid_listed_at"),
    ({"listed_at": 1700000000}, "invalid_listed_at"),
])
def test_each_bad_field_gives_its_reason(change, reason):
    row = {k: v for k, v in {**GOOD, **change}.items() if v is not None}
    assert schema.validate_listing(row) == (None, reason)


@pytest.mark.parametrize("price, expected", [(1200, 1200), ("1200", 1200), (" 980 ", 980), (1500.0, 1500),
                                             ("3e3", 3000), ("-1", None), ("", None)])
def test_price_parsing(price, expected):
    assert schema.parse_price(price) == expected


def test_timestamps_accept_iso_strings_and_datetimes():
    assert schema.parse_timestamp("2024-03-01T10:00:00Z") == "2024-03-01T10:00:00+00:00"
    assert schema.parse_timestamp(datetime(2024, 3, 1, 10)) == "2024-03-01T10:00:00"


@pytest.mark.parametrize("line", [b'{"item_id": "x"', b"[1, 2]", b"\xff\xfe{}", b"null"])
def test_malformed_json_lines(line):
    assert schema.parse_record(line)[2] == "malformed_json"


def test_interaction_validation():
    row = {"query_item_id": "q", "item_id": "c", "position": "3", "tapped": 1, "session_id": "s",
           "ts": "2025-01-01T00:00:00Z"}
    clean, reason = schema.validate_interaction(row)
    assert reason is None and clean["position"] == 3 and clean["tapped"] == 1
    assert schema.validate_interaction({**row, "tapped": 2})[1] == "invalid_tapped"
    assert schema.validate_interaction({**row, "position": -1})[1] == "invalid_position"
    assert schema.validate_interaction({k: v for k, v in row.items() if k != "ts"})[1] == "missing_column:ts"


def _rows(n: int) -> list[dict]:
    return [{**GOOD, "item_id": f"m{i}", "title": f"タイトル {i} " + "x" * (i % 17), "price": 100 + i}
            for i in range(n)]


def _write(tmp_path, rows, fmt):
    path = tmp_path / f"listings.{fmt}"
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    elif fmt == "csv":
        import csv

        with open(path, "w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    else:
        pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=7)
    return path


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_three_formats_read_the_same_rows(tmp_path, fmt):
    rows = _rows(40)
    path = _write(tmp_path, rows, fmt)
    got = list(schema.read_rows(str(path)))
    assert [r[2] for r in got] == [None] * 40
    assert [r[0] for r in got] == [schema.validate_listing(r)[0] for r in rows]


def test_jsonl_read_tasks_cover_every_line_exactly_once(tmp_path):
    rows = _rows(300)
    path = _write(tmp_path, rows, "jsonl")
    size = path.stat().st_size
    for chunk in (29, 64, 151, 4096, size, size + 10):  # lines are ~150-200 bytes
        tasks = schema.plan_reads(str(path), chunk_bytes=chunk)
        records = [rec for t in tasks for rec in schema.read_task(t)]
        assert [json.loads(raw)["item_id"] for _, raw in records] == [r["item_id"] for r in rows], chunk
        # Order keys are byte offsets: the same however the file is split.
        assert [order for order, _ in records] == sorted(order for order, _ in records)
        assert len({order for order, _ in records}) == 300


def test_file_without_trailing_newline_and_blank_lines(tmp_path):
    path = tmp_path / "l.jsonl"
    path.write_text("\n" + json.dumps(GOOD) + "\n\n" + json.dumps({**GOOD, "item_id": "m2"}))
    assert [r[0]["item_id"] for r in schema.read_rows(str(path))] == ["m1", "m2"]


def test_missing_required_column_is_a_user_error(tmp_path):
    rows = [{k: v for k, v in r.items() if k != "price"} for r in _rows(3)]
    for fmt in ("jsonl", "csv", "parquet"):
        with pytest.raises(UserError, match="missing required column.*price"):
            schema.plan_reads(str(_write(tmp_path, rows, fmt)))


def test_unusable_inputs_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        schema.plan_reads(str(tmp_path / "nope.jsonl"))
    (tmp_path / "listings.txt").write_text("x")
    with pytest.raises(UserError, match="no .jsonl, .csv or .parquet"):
        schema.plan_reads(str(tmp_path / "listings.txt"))
    (tmp_path / "garbage.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(UserError, match="cannot read"):
        schema.plan_reads(str(tmp_path / "garbage.parquet"))
    (tmp_path / "binary.jsonl").write_bytes(b"\x00\x01garbage\n" * 5)
    with pytest.raises(UserError, match="JSON object"):
        schema.plan_reads(str(tmp_path / "binary.jsonl"))


def test_directory_of_parquet_shards_keeps_file_order(tmp_path):
    rows = _rows(10)
    (tmp_path / "in").mkdir()
    pq.write_table(pa.Table.from_pylist(rows[:6]), tmp_path / "in" / "part-0.parquet")
    pq.write_table(pa.Table.from_pylist(rows[6:]), tmp_path / "in" / "part-1.parquet")
    got = [r[0]["item_id"] for r in schema.read_rows(str(tmp_path / "in"))]
    assert got == [r["item_id"] for r in rows]


def test_dead_letter_content_is_always_json():
    row = {"when": datetime(2024, 1, 1), "raw": b"\xff", "x": float("inf")}
    assert json.dumps(schema.json_safe(row))


def test_listings_reader_keeps_the_first_valid_row_of_each_item(tmp_path):
    """The one duplicate rule, as in `visrec prepare`: the first valid row in input order wins."""
    rows = [{**GOOD, "price": "free"}, {**GOOD, "title": "first valid"}, {**GOOD, "title": "later copy"},
            {**GOOD, "item_id": "m2"}, {**GOOD, "item_id": "m3", "title": ""}]
    listings = schema.read_listings(str(_write(tmp_path, rows, "jsonl")))
    assert [(r["item_id"], r["title"]) for r in listings.rows] == [("m1", "first valid"), ("m2", GOOD["title"])]
    assert listings.rejected == {"invalid_price": 1, "empty_title": 1} and listings.duplicates == 1


INTERACTION = {"query_item_id": "q", "item_id": "c", "position": 3, "tapped": 1, "session_id": "s",
               "ts": "2025-01-01T00:00:00Z"}
BAD_INTERACTIONS = [{**INTERACTION, "tapped": 2}, {**INTERACTION, "position": -1}, {**INTERACTION, "ts": "later"},
                    {**INTERACTION, "item_id": "  "}, {**INTERACTION, "session_id": None},
                    {**INTERACTION, "query_item_id": " q2 ", "ts": "2025-01-01T09:00:00+09:00"}]


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_interactions_reader_applies_the_row_rules_in_every_format(tmp_path, fmt):
    """Arrow reads each file; the verdict and the clean values are `validate_interaction`'s."""
    # The optional propensity: absent is 1.0, a probability is kept, 0 is a bad row.
    rows = [INTERACTION, {**INTERACTION, "propensity": 0.25}, *BAD_INTERACTIONS, {**INTERACTION, "propensity": 0.0}]
    if fmt != "jsonl":  # a table has the column in every row
        rows = [{"propensity": None, **r} for r in rows]
    if fmt == "csv":  # CSV has no null: an empty cell
        rows = [{k: "" if v is None else v for k, v in r.items()} for r in rows]
    table, dead = schema.read_interactions(str(_write(tmp_path, rows, fmt)))
    verdicts = [schema.validate_interaction(r) for r in rows]
    assert table.to_pylist() == [clean for clean, _ in verdicts if clean is not None]
    assert [d["reason"] for d in dead] == [reason for _, reason in verdicts if reason]
    assert list(table.column_names) == [*schema.INTERACTION_COLUMNS, "propensity"]
    assert table.column("propensity").to_pylist()[:2] == [1.0, 0.25] and dead[-1]["reason"] == "invalid_propensity"


def test_interactions_reader_reads_an_unusual_file_row_by_row(tmp_path):
    """A malformed line or a numeric string makes Arrow give up on the file: the same rules, row by row."""
    path = tmp_path / "logs.jsonl"
    path.write_text(json.dumps(INTERACTION) + "\n{truncated\n" + json.dumps({**INTERACTION, "position": "4"}) + "\n"
                    + json.dumps({**INTERACTION, "tapped": 2}) + "\n")
    table, dead = schema.read_interactions(str(path))
    assert table["position"].to_pylist() == [3, 4]
    assert [d["reason"] for d in dead] == ["malformed_json", "invalid_tapped"]
    with pytest.raises(UserError, match="missing required column.*ts"):
        path.write_text(json.dumps({k: v for k, v in INTERACTION.items() if k != "ts"}) + "\n")
        schema.read_interactions(str(path))

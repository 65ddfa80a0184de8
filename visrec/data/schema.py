"""The data contract in code: column names, reading listings/interactions, row validation.

Listings and impression logs arrive as JSON Lines, CSV or Parquet at a local path
or a `gs://` URI (see docs/data-contract.md). Reading is split into *read tasks*
(a byte range of a JSON Lines file, a whole CSV or Parquet file) so a Beam
pipeline can read one file in parallel; each record comes with an *order key*
(file index, byte offset or record number) that is the same however the file is
split, so "the first row wins" means the same thing on every runner.

Stages that read in one process use the one reader of each input: `read_listings`
(each item once, the first valid row winning, as `visrec prepare` decides) and
`read_interactions` (Arrow-vectorised, with the same per-column rules as
`validate_interaction`).

Validation never raises for a bad row: it returns the clean row or a `reason`
(`malformed_json`, `missing_column:<c>`, `empty_title`, `invalid_price`, ...)
that the caller writes to a dead-letter file. Problems that make the whole input
unusable (file missing or unreadable, a required column absent from the header)
are `UserError`s.
"""

from __future__ import annotations

import csv
import io as _bytes_io
import json
import logging
import math
from dataclasses import dataclass
from datetime import datetime
from typing import IO, Any, Callable, Iterator

from visrec.core import io
from visrec.core.errors import UserError

log = logging.getLogger(__name__)

LISTING_COLUMNS: tuple[str, ...] = ("item_id", "title", "image_uri", "category", "price", "status", "listed_at")
INTERACTION_COLUMNS: tuple[str, ...] = ("query_item_id", "item_id", "position", "tapped", "session_id", "ts")
# Optional impression columns, read when present and their default where absent or null.
# `propensity`: the probability the serving policy showed this item at this position (the service
# logs it; < 1 where it explores), for the inverse-propensity-weighted metric.
OPTIONAL_INTERACTION_DEFAULTS: dict[str, float] = {"propensity": 1.0}
# Listings with this status are excluded from training: their titles are messages to a buyer.
RESERVED_STATUS = "reserved"
# Stage 1's output shards (`visrec prepare`, docs/artifacts.md), read by training and embedding.
PREPARED_SHARDS = "data-*.parquet"
FORMATS: dict[str, str] = {".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".csv": "csv",
                           ".parquet": "parquet"}
# Size of one JSON Lines read task: big enough to amortise a task, small enough to spread a file.
JSONL_CHUNK_BYTES = 8 << 20
_READ_BLOCK = 1 << 20
_HEADER_SAMPLE_LINES = 200

Record = tuple[tuple[int, int], Any]
"""(order key, raw record): a dict, or the undecoded bytes of a JSON Lines line."""


def file_format(uri: str) -> str:
    """`jsonl`, `csv` or `parquet` from the file extension; `UserError` for anything else."""
    name = uri.rstrip("/").rsplit("/", 1)[-1].lower()
    for ext, fmt in FORMATS.items():
        if name.endswith(ext):
            return fmt
    raise UserError(f"cannot tell the format of {uri}: expected a .jsonl, .csv or .parquet file")


def names_a_data_file(uri: str) -> bool:
    """Whether `uri` has a data format's extension: how an input names a file, not a directory/prefix."""
    return uri.lower().endswith(tuple(FORMATS))


def is_data_file(uri: str) -> bool:
    """Whether a file found under an input directory is data: a .jsonl/.csv/.parquet file whose name
    does not start with `_` or `.` (see `input_files`)."""
    return names_a_data_file(uri) and not uri.rsplit("/", 1)[-1].startswith(("_", "."))


def input_files(uri: str) -> list[str]:
    """The data files of `uri`: the file itself, or the .jsonl/.csv/.parquet files under a directory/prefix.

    Under a directory, names starting with `_` or `.` are side files, not data (the Hadoop/Spark
    convention: `_SUCCESS`, `join-events`' `_rejected.jsonl`, an editor's `.swp`)."""
    if names_a_data_file(uri):
        if not io.exists(uri):
            raise UserError(f"listings file not found: {uri}")
        return [uri]
    files = [f for f in io.list_files(uri) if is_data_file(f)]
    if not files:
        raise UserError(f"no .jsonl, .csv or .parquet files at {uri}")
    if len({file_format(f) for f in files}) > 1:
        raise UserError(f"{uri} mixes file formats; give one format per input")
    return files


def open_binary(uri: str) -> IO[bytes]:
    """A seekable binary file object over a local file or a `gs://` object (read in ranges, not downloaded)."""
    if io.is_gcs(uri):
        from google.api_core.exceptions import NotFound

        bucket, name = io.split_gcs(uri)
        blob = io.gcs_client().bucket(bucket).blob(name)
        try:
            blob.reload()
        except NotFound:
            raise FileNotFoundError(uri) from None
        return blob.open("rb")
    return open(uri, "rb")


def file_size(uri: str) -> int:
    with open_binary(uri) as fh:
        return fh.seek(0, 2)


# ---------------------------------------------------------------- read tasks


@dataclass(frozen=True)
class ReadTask:
    """One unit of reading: `[start, end)` bytes of a JSON Lines file, or a whole CSV/Parquet file.

    `file_index` orders the files of a multi-file input; `base_dir` is where
    relative `image_uri`s of this file are resolved.
    """

    uri: str
    fmt: str
    file_index: int
    base_dir: str
    start: int = 0
    end: int = -1


def plan_reads(uri: str, required: tuple[str, ...] = LISTING_COLUMNS,
               chunk_bytes: int = JSONL_CHUNK_BYTES) -> list[ReadTask]:
    """Check every input file is readable and has the `required` columns; split it into read tasks."""
    tasks: list[ReadTask] = []
    for index, f in enumerate(input_files(uri)):
        fmt = file_format(f)
        try:
            check_header(f, fmt, required)
            size = file_size(f) if fmt == "jsonl" else -1
        except (OSError, ValueError) as exc:
            raise UserError(f"cannot read {f}: {exc}") from None
        base = io.parent(f)
        if fmt == "jsonl":
            starts = range(0, max(size, 1), chunk_bytes)
            tasks += [ReadTask(f, fmt, index, base, s, min(s + chunk_bytes, size)) for s in starts]
        else:
            tasks.append(ReadTask(f, fmt, index, base))
    return tasks


def check_header(uri: str, fmt: str, required: tuple[str, ...]) -> None:
    """`UserError` if a required column is absent from the file's header (CSV), schema (Parquet) or,
    for JSON Lines, from every object among its first lines."""
    if fmt == "parquet":
        import pyarrow.parquet as pq

        with open_binary(uri) as fh:
            columns = set(pq.ParquetFile(fh).schema_arrow.names)
    elif fmt == "csv":
        with open_binary(uri) as fh:
            head = fh.read(_READ_BLOCK).decode("utf-8-sig", errors="replace")
        columns = set(next(csv.reader(_bytes_io.StringIO(head)), []))
    else:
        columns, lines, objects = set(), 0, 0
        for _, line in _iter_lines(uri, 0, -1):
            if not line.strip():
                continue
            lines += 1
            row, _reason = parse_json_line(line)
            if row is not None:
                objects += 1
                columns |= set(row)
            if lines >= _HEADER_SAMPLE_LINES:
                break
        if not lines:  # an empty file is valid input that yields no rows
            return
        if not objects:
            raise UserError(f"{uri}: none of the first {lines} non-blank lines is a JSON object")
    missing = [c for c in required if c not in columns]
    if missing:
        raise UserError(f"{uri}: missing required column(s) {', '.join(missing)}")


def read_task(task: ReadTask) -> Iterator[Record]:
    """The records of one read task, each with its order key `(file_index, offset or record number)`."""
    if task.fmt == "jsonl":
        for offset, line in _iter_lines(task.uri, task.start, task.end):
            if line.strip():
                yield (task.file_index, offset), line
    elif task.fmt == "csv":
        with open_binary(task.uri) as fh:
            text = _bytes_io.TextIOWrapper(fh, encoding="utf-8-sig", errors="replace", newline="")
            for n, row in enumerate(csv.DictReader(text)):
                row.pop(None, None)  # values beyond the header's columns
                yield (task.file_index, n), row
    else:
        import pyarrow.parquet as pq

        with open_binary(task.uri) as fh:
            n = 0
            for batch in pq.ParquetFile(fh).iter_batches(batch_size=4096):
                for row in batch.to_pylist():
                    yield (task.file_index, n), row
                    n += 1


def _iter_lines(uri: str, start: int, end: int) -> Iterator[tuple[int, bytes]]:
    """(byte offset, line) for every line that *starts* in `[start, end)` (`end=-1`: to the end).

    A line that straddles `start` belongs to the previous range, so consecutive
    ranges read every line exactly once.
    """
    with open_binary(uri) as fh:
        pos = max(start - 1, 0)
        fh.seek(pos)
        # Starting one byte early: if that byte is the newline ending the previous range's
        # last line, the line at `start` is ours; else we skip to the next line.
        skipping = start > 0
        buf, i = b"", 0
        while end < 0 or pos < end:
            nl = buf.find(b"\n", i)
            if nl < 0:
                block = fh.read(_READ_BLOCK)
                buf, i = buf[i:] + block, 0
                if block:
                    continue
                if buf and not skipping:
                    yield pos, buf
                return
            line, i = buf[i:nl + 1], nl + 1
            if not skipping:
                yield pos, line
            skipping = False
            pos += len(line)


# ---------------------------------------------------------------- validation


def parse_json_line(line: bytes) -> tuple[dict | None, str | None]:
    """(object, None) or (None, `malformed_json`)."""
    try:
        row = json.loads(line.decode("utf-8").lstrip("\ufeff"))
    except ValueError:  # JSONDecodeError and UnicodeDecodeError
        return None, "malformed_json"
    if not isinstance(row, dict):
        return None, "malformed_json"
    return row, None


def _text(value: Any, column: str) -> tuple[str | None, str | None]:
    """A non-blank string (or an integer, read as a string), stripped; else its reason."""
    if value is None:
        return None, f"missing_column:{column}"
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        return None, f"invalid_{column}"
    value = str(value).strip()
    if not value:
        return None, f"empty_{column}"
    return value, None


def parse_price(value: Any) -> int | None:
    """An integer price > 0 (JPY) from an int, an integral float or a numeric string; else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        value = value.strip().replace(",", "")
        try:
            value = int(value) if value.lstrip("+-").isdigit() else float(value)
        except ValueError:
            return None
    if isinstance(value, float):
        if not math.isfinite(value) or not value.is_integer():
            return None
        value = int(value)
    if not isinstance(value, int) or value <= 0:
        return None
    return value


def parse_timestamp(value: Any) -> str | None:
    """An ISO 8601 timestamp (string or datetime) normalised by `datetime.isoformat`; else None."""
    if isinstance(value, datetime):
        return value.isoformat()
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value.strip()).isoformat()
    except ValueError:
        return None


def validate_listing(row: dict) -> tuple[dict | None, str | None]:
    """(clean listing, None) or (None, reason). Extra columns are dropped from the clean row.

    The clean row has the contract's columns with `price` an int and `listed_at`
    normalised; strings are stripped of surrounding whitespace.
    """
    clean: dict[str, Any] = {}
    for column in ("item_id", "title", "image_uri", "category", "status"):
        clean[column], reason = _text(row.get(column), column)
        if reason:
            return None, reason
    for column in ("price", "listed_at"):
        if row.get(column) is None:
            return None, f"missing_column:{column}"
    clean["price"] = parse_price(row["price"])
    if clean["price"] is None:
        return None, "invalid_price"
    clean["listed_at"] = parse_timestamp(row["listed_at"])
    if clean["listed_at"] is None:
        return None, "invalid_listed_at"
    return clean, None


def _position(value: Any) -> tuple[int | None, str | None]:
    position = _as_int(value)
    return (position, None) if position is not None and position >= 0 else (None, "invalid_position")


def _tapped(value: Any) -> tuple[int | None, str | None]:
    tapped = _as_int(value)
    return (tapped, None) if tapped in (0, 1) else (None, "invalid_tapped")


def _propensity(value: Any) -> tuple[float | None, str | None]:
    if value is None or (isinstance(value, str) and not value.strip()):  # absent, or an empty CSV cell
        return OPTIONAL_INTERACTION_DEFAULTS["propensity"], None
    try:
        number = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        number = math.nan
    return (number, None) if 0.0 < number <= 1.0 else (None, "invalid_propensity")


def _ts(value: Any) -> tuple[str | None, str | None]:
    ts = parse_timestamp(value)
    return (ts, None) if ts is not None else (None, "invalid_ts")


def _present(column: str, rule: Callable[[Any], tuple[Any, str | None]]) -> Callable[[Any], tuple[Any, str | None]]:
    """`rule` for a value that is there; `missing_column:<column>` for an absent or null one."""
    def check(value: Any) -> tuple[Any, str | None]:
        return (None, f"missing_column:{column}") if value is None else rule(value)

    return check


# The impression-log contract, one rule per column: value -> (clean value, None) or (None, reason).
# A row gets the reason of its first bad column in this order. The same rules check a row
# (`validate_interaction`) and each distinct value of a column (`read_interactions`).
INTERACTION_RULES: dict[str, Callable[[Any], tuple[Any, str | None]]] = {
    "query_item_id": lambda value: _text(value, "query_item_id"),
    "item_id": lambda value: _text(value, "item_id"),
    "session_id": lambda value: _text(value, "session_id"),
    "position": _present("position", _position),
    "tapped": _present("tapped", _tapped),
    "ts": _present("ts", _ts),
}
OPTIONAL_INTERACTION_RULES: dict[str, Callable[[Any], tuple[Any, str | None]]] = {"propensity": _propensity}


def validate_interaction(row: dict) -> tuple[dict | None, str | None]:
    """(clean impression row, None) or (None, reason): ids non-empty, `position` int >= 0, `tapped` 0/1,
    `ts` ISO 8601 (normalised as `parse_timestamp` does). Extra columns are dropped."""
    clean: dict[str, Any] = {}
    for column, rule in {**INTERACTION_RULES, **OPTIONAL_INTERACTION_RULES}.items():
        clean[column], reason = rule(row.get(column))
        if reason:
            return None, reason
    return {c: clean[c] for c in (*INTERACTION_COLUMNS, *OPTIONAL_INTERACTION_RULES)}, None


def _as_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value if isinstance(value, int) else None


def parse_record(raw: Any, validate=validate_listing) -> tuple[dict | None, Any, str | None]:
    """(clean row, row content for a dead letter, reason) for one raw record from `read_task`."""
    if isinstance(raw, bytes):
        row, reason = parse_json_line(raw)
        if reason:
            return None, raw.decode("utf-8", errors="replace").rstrip("\r\n"), reason
    else:
        row = raw
    clean, reason = validate(row)
    return clean, row, reason


def read_rows(uri: str, validate=validate_listing,
              required: tuple[str, ...] | None = None) -> Iterator[tuple[dict | None, Any, str | None]]:
    """Every record of `uri` in order, as `parse_record` returns it (single-process reading)."""
    if required is None:
        required = LISTING_COLUMNS if validate is validate_listing else INTERACTION_COLUMNS
    for task in plan_reads(uri, required):
        for _, raw in read_task(task):
            yield parse_record(raw, validate)


# ---------------------------------------------------------------- the single-process readers


@dataclass(frozen=True)
class Listings:
    """The valid listings of an input, one per `item_id`: the first valid row in input order wins,
    as in `visrec prepare`, so a bad first row does not hide a good later one.

    `rows`: clean rows (`validate_listing`) in input order; `rejected`: invalid rows by reason;
    `duplicates`: later valid rows of an id already read.
    """

    rows: list[dict[str, Any]]
    rejected: dict[str, int]
    duplicates: int


def read_listings(uri: str) -> Listings:
    """The catalogue at `uri` (any listings format) for a stage that needs each item once."""
    items: dict[str, dict[str, Any]] = {}
    rejected: dict[str, int] = {}
    duplicates = 0
    for clean, _, reason in read_rows(uri):
        if clean is None:
            rejected[reason] = rejected.get(reason, 0) + 1
        elif clean["item_id"] in items:
            duplicates += 1
        else:
            items[clean["item_id"]] = clean
    return Listings(list(items.values()), rejected, duplicates)


def read_interactions(uri: str) -> tuple[Any, list[dict[str, Any]]]:
    """The impression logs at `uri` (any format): (a `pyarrow.Table` of the valid rows, one column per
    `INTERACTION_COLUMNS` holding clean values, and a dead letter per bad row).

    A dead letter is `{"reason", "source", "row"}` with `validate_interaction`'s reasons (or
    `malformed_json`). Each file is read by Arrow and checked with `INTERACTION_RULES` once per
    distinct value of a column, so a million rows take a second; a file Arrow cannot read
    with the contract's types (a malformed line, a number where a string belongs) is read
    row by row, with the very same rules. `UserError` as for `plan_reads`.
    """
    import pyarrow as pa

    files = list(dict.fromkeys(task.uri for task in plan_reads(uri, INTERACTION_COLUMNS)))
    tables, dead = [], []
    for f in files:
        try:
            table = _interactions_arrow(f)
        except pa.ArrowException as exc:
            log.warning("%s: Arrow cannot read it with the contract's types (%s); reading row by row", f, exc)
            table, rejected = _interactions_rows(f)
            dead += rejected
        table, rejected = _check_interactions(table, f)
        tables.append(table)
        dead += rejected
    return pa.concat_tables(tables), dead


def _interaction_types() -> dict[str, Any]:
    import pyarrow as pa

    return {**{c: pa.int64() if c in ("position", "tapped") else pa.string() for c in INTERACTION_COLUMNS},
            **{c: pa.float64() for c in OPTIONAL_INTERACTION_RULES}}


def _interactions_arrow(uri: str) -> Any:
    """The contract's columns of one file as Arrow reads them: JSON with the contract's types, CSV
    as text (what a CSV cell is, and what the row reader sees), Parquet as stored."""
    import pyarrow as pa
    import pyarrow.csv as pcsv
    import pyarrow.json as pjson
    import pyarrow.parquet as pq

    source = pa.BufferReader(io.read_bytes(uri)) if io.is_gcs(uri) else uri
    fmt = file_format(uri)
    columns = [*INTERACTION_COLUMNS, *OPTIONAL_INTERACTION_RULES]
    if fmt == "parquet":
        present = set(pq.ParquetFile(source).schema_arrow.names)
        table = pq.read_table(source, columns=[c for c in columns if c in present])
    elif fmt == "csv":
        # Missing optional columns come as nulls; the required ones were checked by `plan_reads`.
        table = pcsv.read_csv(source, convert_options=pcsv.ConvertOptions(
            column_types={c: pa.string() for c in columns}, include_columns=columns, include_missing_columns=True))
    else:
        table = pjson.read_json(source, parse_options=pjson.ParseOptions(
            explicit_schema=pa.schema(_interaction_types()), unexpected_field_behavior="ignore"))
    for column in OPTIONAL_INTERACTION_RULES:
        if column not in table.column_names:
            table = table.append_column(column, pa.nulls(len(table), pa.float64()))
    return table.select(columns)


def _interactions_rows(uri: str) -> tuple[Any, list[dict[str, Any]]]:
    """One file read row by row (`read_rows`): (a table of the valid rows, dead letters of the rest)."""
    import pyarrow as pa

    clean_rows, dead = [], []
    for clean, content, reason in read_rows(uri, validate_interaction, INTERACTION_COLUMNS):
        if reason:
            dead.append({"reason": reason, "source": uri, "row": json_safe(content)})
        else:
            clean_rows.append(clean)
    types = _interaction_types()
    return pa.table({c: pa.array([r[c] for r in clean_rows], types[c]) for c in types}), dead


def _check_interactions(table: Any, uri: str) -> tuple[Any, list[dict[str, Any]]]:
    """`table` with clean values and only its valid rows, and a dead letter per invalid row."""
    import pyarrow as pa
    import pyarrow.compute as pc

    types = _interaction_types()
    columns, reasons = {}, []
    for column, rule in {**INTERACTION_RULES, **OPTIONAL_INTERACTION_RULES}.items():
        values = table[column].combine_chunks()
        if pa.types.is_dictionary(values.type):
            values = values.dictionary_decode()
        encoded = values.dictionary_encode()  # nulls get a null index
        verdicts = [rule(v) for v in encoded.dictionary.to_pylist()]
        columns[column] = pa.array([v for v, _ in verdicts], types[column]).take(encoded.indices)
        if column in OPTIONAL_INTERACTION_RULES:  # absent -> the default, not a bad row
            columns[column] = pc.fill_null(columns[column], OPTIONAL_INTERACTION_DEFAULTS[column])
        reason = pa.array([r for _, r in verdicts], pa.string()).take(encoded.indices)
        reasons.append(pc.if_else(pc.is_null(encoded.indices), pa.scalar(rule(None)[1], pa.string()), reason))
    first = pc.coalesce(*reasons)  # the first bad column's reason, in INTERACTION_RULES order
    bad = pc.is_valid(first)
    dead = [{"reason": reason, "source": uri, "row": json_safe(row)}
            for reason, row in zip(first.filter(bad).to_pylist(), table.filter(bad).to_pylist())]
    clean = pa.table({c: columns[c] for c in types})
    return clean.filter(pc.invert(bad)), dead


def json_safe(value: Any) -> Any:
    """`value` with datetimes/bytes turned into strings, so a dead letter is always JSON."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value

"""The data contract in code: column names, reading listings/interactions, row validation.

Listings and impression logs arrive as JSON Lines, CSV or Parquet at a local path
or a `gs://` URI (see docs/data-contract.md). Reading is split into *read tasks*
(a byte range of a JSON Lines file, a whole CSV or Parquet file) so a Beam
pipeline can read one file in parallel; each record comes with an *order key*
(file index, byte offset or record number) that is the same however the file is
split, so "the first row wins" means the same thing on every runner.

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
import math
from dataclasses import dataclass
from datetime import datetime
from typing import IO, Any, Iterator

from visrec.core import io
from visrec.core.errors import UserError

LISTING_COLUMNS: tuple[str, ...] = ("item_id", "title", "image_uri", "category", "price", "status", "listed_at")
INTERACTION_COLUMNS: tuple[str, ...] = ("query_item_id", "item_id", "position", "tapped", "session_id", "ts")
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


def input_files(uri: str) -> list[str]:
    """The data files of `uri`: the file itself, or the .jsonl/.csv/.parquet files under a directory/prefix."""
    if any(uri.lower().endswith(ext) for ext in FORMATS):
        if not io.exists(uri):
            raise UserError(f"listings file not found: {uri}")
        return [uri]
    files = [f for f in io.list_files(uri) if any(f.lower().endswith(ext) for ext in FORMATS)]
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


def _text(row: dict, column: str) -> tuple[str | None, str | None]:
    value = row.get(column)
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
        clean[column], reason = _text(row, column)
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


def validate_interaction(row: dict) -> tuple[dict | None, str | None]:
    """(clean impression row, None) or (None, reason): ids non-empty, `position` int >= 0, `tapped` 0/1."""
    clean: dict[str, Any] = {}
    for column in ("query_item_id", "item_id", "session_id"):
        clean[column], reason = _text(row, column)
        if reason:
            return None, reason
    for column in ("position", "tapped", "ts"):
        if row.get(column) is None:
            return None, f"missing_column:{column}"
    position = _as_int(row["position"])
    if position is None or position < 0:
        return None, "invalid_position"
    tapped = _as_int(row["tapped"])
    if tapped not in (0, 1):
        return None, "invalid_tapped"
    ts = parse_timestamp(row["ts"])
    if ts is None:
        return None, "invalid_ts"
    clean.update(position=position, tapped=tapped, ts=ts)
    return clean, None


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

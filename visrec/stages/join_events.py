"""`visrec join-events`: the service's impression and event logs -> interactions partitions.

    LOGS/impressions/dt=D/*.jsonl + LOGS/events/dt=D, D+1/*.jsonl
        -> OUT/dt=D/interactions-SSSSS-of-NNNNN.jsonl, _rejected.jsonl, _stats.json, _SUCCESS

Each impression row (`visrec.online.eventlog`) becomes one interactions row of the data contract
(docs/data-contract.md) with `tapped` = 1 when a `tap` event names its (`request_id`,
`item_id`), plus `purchased`, and the serving columns kept (`request_id`, `release`, `arm`,
`user_id`, `propensity`). Events may arrive up to `attribution_hours` after their impression,
so a day is joined with the events of the next day too; run it once that day is over (the
schedule below runs it daily for yesterday). `_SUCCESS` is written last: the pipeline's data
resolver (`visrec.data.datasource`) takes the newest complete partition as its interactions.

An apache Beam pipeline (DirectRunner here, Dataflow at scale): the join is a CoGroupByKey on
(`request_id`, `item_id`). A line that does not parse, an impression or event missing a field,
and an event without its impression go to `_rejected.jsonl` with a reason; the join goes on.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from typing import Any, Iterable, Iterator

import apache_beam as beam

from visrec.core import io
from visrec.core.errors import UserError
from visrec.core.hashing import stable_hash
from visrec.data.schema import parse_json_line
from visrec.stages.configs import JoinConfig
from visrec.stages.dataflow import make_pipeline, run_pipeline

log = logging.getLogger(__name__)

IMPRESSION_FIELDS = ("request_id", "query_item_id", "item_id", "position", "session_id", "ts")
EVENT_FIELDS = ("request_id", "item_id", "type", "ts")
EVENT_TYPES = ("tap", "purchase")
SERVING_COLUMNS = ("request_id", "release", "arm", "experiment", "user_id", "propensity")
DONE = "_SUCCESS"
# Side files start with "_", so readers of the partition skip them (`visrec.data.schema.input_files`).
REJECTED, STATS = "_rejected.jsonl", "_stats.json"
# A tap is stamped by the client or another replica: it may read slightly earlier than its impression.
CLOCK_SKEW_SECONDS = 60.0


@dataclass
class JoinResult:
    """Per day joined: its partition, rows written, taps and purchases matched, rows rejected."""

    days: dict[str, dict[str, Any]]


def _seconds(ts: str) -> float:
    return datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()


def parse_log_line(element: tuple[str, bytes], required: tuple[str, ...]) -> Iterator[Any]:
    """(source, line) -> the row keyed by (request_id, item_id), or a `rejected` dead letter."""
    source, line = element
    row, reason = parse_json_line(line)
    if row is None:
        yield beam.pvalue.TaggedOutput("rejected", {"reason": reason, "source": source,
                                                    "row": line.decode("utf-8", "replace")})
        return
    missing = [name for name in required if row.get(name) in (None, "")]
    if not missing and "type" in required and row["type"] not in EVENT_TYPES:
        missing = ["type"]
    if not missing:
        try:
            _seconds(str(row["ts"]))
        except ValueError:
            missing = ["ts"]
    if missing:
        yield beam.pvalue.TaggedOutput("rejected", {"reason": f"invalid_{missing[0]}", "source": source, "row": row})
        return
    yield (str(row["request_id"]), str(row["item_id"])), row


def vertex_logged_impressions(element: tuple[str, bytes], day: str) -> Iterator[Any]:
    """One row of Vertex AI's request-response log table (`logging_time`, `response_payload`: the
    logged predictions, JSON strings) -> the impression rows of its predictions shown on `day`, keyed
    as `parse_log_line` keys them; a row that is not such a record is a `rejected` dead letter."""
    source, line = element
    row, reason = parse_json_line(line)
    try:
        if row is None:
            raise ValueError(reason)
        ts = datetime.fromisoformat(str(row["logging_time"]).replace(" UTC", "+00:00").replace("Z", "+00:00"))
        payloads = row["response_payload"]
        payloads = payloads if isinstance(payloads, list) else [payloads]
        predictions = []
        for payload in payloads:
            decoded = json.loads(payload) if isinstance(payload, str) else payload
            predictions += decoded.get("predictions", [decoded]) if isinstance(decoded, dict) else decoded
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        yield beam.pvalue.TaggedOutput("rejected", {"reason": "invalid_request_log_row", "source": source,
                                                    "detail": str(exc), "row": line.decode("utf-8", "replace")})
        return
    stamp = ts.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    if stamp[:10] != day:
        return
    for prediction in predictions:
        if not isinstance(prediction, dict) or "request_id" not in prediction:
            continue  # an error answer (unknown item): nothing was shown
        for position, item in enumerate(prediction.get("items", [])):
            yield (str(prediction["request_id"]), str(item["item_id"])), {
                "request_id": prediction["request_id"], "query_item_id": prediction["item_id"],
                "item_id": item["item_id"], "position": position,
                "session_id": prediction.get("session_id") or prediction.get("user_id") or prediction["request_id"],
                "user_id": prediction.get("user_id"), "ts": stamp, "release": prediction.get("release"),
                "arm": prediction.get("arm"), "experiment": prediction.get("experiment"), "propensity": None}


def join_one(element: tuple[tuple[str, str], dict[str, list[dict]]], attribution_seconds: float) -> Iterator[Any]:
    """One (request, item): its impression with `tapped` / `purchased` filled in, or dead letters
    for events without an impression (or after the attribution window)."""
    _, grouped = element
    impressions, events = grouped["impressions"], grouped["events"]
    if not impressions:
        for event in events:
            yield beam.pvalue.TaggedOutput("rejected", {"reason": "event_without_impression", "row": event})
        return
    impression = min(impressions, key=lambda r: (r["ts"], r["position"]))  # a retried log write: keep one
    shown = _seconds(impression["ts"])
    kinds = set()
    for event in events:
        if -CLOCK_SKEW_SECONDS <= _seconds(event["ts"]) - shown <= attribution_seconds:
            kinds.add(event["type"])
        else:
            yield beam.pvalue.TaggedOutput("rejected", {"reason": "event_outside_attribution_window", "row": event})
    yield {**{name: impression[name] for name in IMPRESSION_FIELDS[1:]},
           "tapped": int("tap" in kinds or "purchase" in kinds), "purchased": int("purchase" in kinds),
           **{name: impression.get(name) for name in SERVING_COLUMNS}}


def _log_lines(uri: str) -> Iterator[tuple[str, bytes]]:
    yield from ((uri, line) for line in io.read_bytes(uri).splitlines() if line.strip())


def write_shard(element: tuple[int, Iterable[dict]], out_dir: str, shards: int) -> int:
    """One output file; rows in (request, position) order, so its bytes do not depend on the runner."""
    index, rows = element
    rows = sorted(rows, key=lambda r: (r["ts"], r["request_id"] or "", r["position"]))
    io.write_text(io.join(out_dir, f"interactions-{index:05d}-of-{shards:05d}.jsonl"),
                  "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return len(rows)


def _files(logs: str, stream: str, days: Iterable[str]) -> list[str]:
    return [uri for day in days for uri in io.list_files(io.join(logs, stream, f"dt={day}"), "*.jsonl")]


def pending_days(config: JoinConfig, today: date) -> list[str]:
    """The days to join: `config.dates`, or every day of impressions before `today` without a
    complete output partition."""
    if config.dates is not None:
        return sorted(config.dates)
    if config.impressions_from:
        raise UserError("give --date with --impressions-from: a request-log export is not partitioned by day")
    days = sorted({uri.split("/dt=")[1][:10] for uri in io.list_files(io.join(config.logs, "impressions"), "*.jsonl")
                   if "/dt=" in uri})
    return [d for d in days if d < today.isoformat() and not io.exists(io.join(config.out, f"dt={d}", DONE))]


def join_day(config: JoinConfig, day: str) -> dict[str, Any]:
    """Join one day's impressions with that day's and the next day's events; returns its counts."""
    out_dir = io.join(config.out, f"dt={day}")
    following = (date.fromisoformat(day) + timedelta(days=1)).isoformat()
    impressions_root = config.impressions_from or io.join(config.logs, "impressions")
    impression_files = (io.list_files(config.impressions_from, "*.json*") if config.impressions_from
                        else _files(config.logs, "impressions", [day]))
    event_files = _files(config.logs, "events", [day, following])
    if not impression_files:
        raise UserError(f"no impressions logged for {day} under {impressions_root}")
    parse_impressions = (beam.FlatMap(vertex_logged_impressions, day) if config.impressions_from
                         else beam.FlatMap(parse_log_line, IMPRESSION_FIELDS))
    io.remove(io.join(out_dir, DONE))
    p = make_pipeline(config.runner, config.beam_options)
    impressions = (p | "ImpressionFiles" >> beam.Create(impression_files) | "ReadImpressions" >> beam.FlatMap(_log_lines)
                   | "ParseImpressions" >> parse_impressions.with_outputs("rejected", main="rows"))
    events = (p | "EventFiles" >> beam.Create(event_files or [None]) | "ReadEvents"
              >> beam.FlatMap(lambda uri: _log_lines(uri) if uri else iter(()))
              | "ParseEvents" >> beam.FlatMap(parse_log_line, EVENT_FIELDS).with_outputs("rejected", main="rows"))
    joined = ({"impressions": impressions.rows, "events": events.rows} | "Join" >> beam.CoGroupByKey()
              | "Attribute" >> beam.FlatMap(join_one, config.attribution_hours * 3600.0)
              .with_outputs("rejected", main="rows"))
    (joined.rows | "KeyByShard" >> beam.Map(lambda r, n: (stable_hash(r["request_id"]) % n, r), config.shards)
     | "GroupShards" >> beam.GroupByKey()
     | "WriteShards" >> beam.Map(write_shard, out_dir, config.shards))
    rejected = ((impressions.rejected, events.rejected, joined.rejected) | "AllRejected" >> beam.Flatten())
    (rejected | "OneRejectedFile" >> beam.combiners.ToList()
     | "WriteRejected" >> beam.Map(lambda rows: io.write_text(
         io.join(out_dir, REJECTED), "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n"
                                                    for r in rows))))
    (joined.rows | "Counts" >> beam.Map(lambda r: (1, r["tapped"], r["purchased"]))
     | "Sum" >> beam.CombineGlobally(lambda counts: tuple(map(sum, zip((0, 0, 0), *counts))))
     | "WriteStats" >> beam.Map(lambda c, where: io.write_json(io.join(where, STATS), {
         "rows": c[0], "taps": c[1], "purchases": c[2]}), out_dir))
    run_pipeline(p)
    counts = json.loads(io.read_text(io.join(out_dir, STATS)))
    counts["rejected"] = sum(1 for _ in io.read_text(io.join(out_dir, REJECTED)).splitlines())
    counts["partition"] = out_dir
    io.write_text(io.join(out_dir, DONE), "")
    log.info("joined %s: %d impressions, %d tapped, %d purchased, %d rejected -> %s", day, counts["rows"],
             counts["taps"], counts["purchases"], counts["rejected"], out_dir)
    return counts


def join_events(config: JoinConfig, today: date | None = None) -> JoinResult:
    """Join every pending day (`pending_days`); `UserError` if there is none."""
    days = pending_days(config, today or datetime.now(timezone.utc).date())
    if not days:
        raise UserError(f"nothing to join: no day of impressions under {config.logs} before today lacks a "
                        f"complete partition in {config.out} (give --date YYYY-MM-DD to join one)")
    return JoinResult({day: join_day(config, day) for day in days})

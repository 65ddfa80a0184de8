"""`visrec ingest`: listing events -> journal entries of the serving release, through Apache Beam.

Marketplace listing events (new or changed listing, status or price change, delete;
docs/data-contract.md "Listing events") become `JournalEntry`s appended to the state
directory of the release in production, which every serving replica already follows
(`visrec.online.journal`), so a listing is recommendable seconds after its event.

- Events are parsed and checked here (`parse_event`); one that breaks the contract is a
  dead letter with a reason, never a failure of the pipeline.
- A listing's image is read, kept in the state directory (as a serving upsert keeps it)
  and embedded with the release's own encoder and PCA through Beam's `RunInference`
  (`visrec.stages.embed`'s handler: batching, GPU workers on Dataflow); updates and
  deletes pass through without the model.
- Entries reach the journal in batches (`append_many`), many entries per append.
- Idempotent: an entry's `at` is the event time and its `id` a digest of the event, so a
  replayed event or a retried bundle appends the same entry again, which the readers'
  per-field newest-wins registers (`visrec.online.writes`) absorb: the newest event time
  of an item wins whatever order or how often its events arrive.

Sources (`visrec.online.ingest_config.IngestConfig.source`): a Pub/Sub subscription
(`projects/P/subscriptions/S`, a streaming pipeline for Dataflow), or a watched prefix (local or `gs://`) into which
`*.jsonl` files of events are dropped; the prefix is polled and each poll's new files run
through the same transforms as one bounded pipeline (the local portable runner does not
run unbounded sources: docs/ingest.md).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Iterable, Iterator, Literal

import apache_beam as beam
from apache_beam.ml.inference.base import KeyedModelHandler, RunInference

from visrec.core import io
from visrec.core.errors import UserError
from visrec.data.schema import json_safe, parse_json_line, parse_price, validate_listing
from visrec.model.encode import project
from visrec.model.pca import PcaProjection
from visrec.online.entry import DELETE, METADATA_FIELDS, UPSERT, JournalEntry
from visrec.online.ingest_config import IngestConfig
from visrec.online.journal import open_journal, store_image
from visrec.stages.dataflow import make_pipeline, run_pipeline
from visrec.stages.embed import DecodeAndPreprocess, ImageEncoderHandler, LoadImage, load_image_processor

log = logging.getLogger(__name__)

LISTING, UPDATE = "listing", "update"
EVENT_TYPES = (LISTING, UPDATE, DELETE)
EVENT_FILES = "*.jsonl"
DEAD_LETTERS = "ingest-dead-letters"
METRICS_NAMESPACE = "visrec_ingest"
_UPDATE_FIELDS = ("price", "status")  # what a status or price change may set


# ---------------------------------------------------------------- events

class BadEvent(ValueError):
    """An event that breaks the contract; `reason` is its dead letter's reason."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class ListingEvent:
    """One checked event. `fields`: the metadata it sets (a listing: all, an update: those it
    carries); `image_uri` only on a listing; `id`: the digest of the event's line, the same
    on every replay of it."""

    type: Literal["listing", "update", "delete"]
    item_id: str
    at: float
    id: str
    title: str | None = None
    fields: tuple[tuple[str, Any], ...] = ()
    image_uri: str | None = None

    def entry(self, vector: tuple[float, ...] | None = None, image_sha256: str | None = None) -> JournalEntry:
        """The journal entry of this event (a listing's with its embedded image)."""
        if self.type == DELETE:
            return JournalEntry(DELETE, self.item_id, self.at, self.id)
        values = dict(self.fields)
        return JournalEntry(UPSERT, self.item_id, self.at, self.id, self.title, values.get("category"),
                            values.get("price"), values.get("status"), tuple(values), vector, image_sha256)


def event_time(value: Any) -> float:
    """Epoch seconds of an event time: a number of epoch seconds, or ISO 8601 with a time zone."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
        return float(value)
    try:
        stamp = datetime.fromisoformat(value.strip()) if isinstance(value, str) else None
    except ValueError:
        stamp = None
    if stamp is None or stamp.tzinfo is None:  # a time without a zone means different instants to different writers
        raise BadEvent("invalid_event_time")
    return stamp.timestamp()


def parse_event(line: bytes) -> ListingEvent:
    """One event line -> `ListingEvent`; `BadEvent` with the reason if it breaks the contract."""
    raw, reason = parse_json_line(line)
    if reason:
        raise BadEvent(reason)
    kind = raw.get("type")
    if kind not in EVENT_TYPES:
        raise BadEvent("invalid_type")
    item_id = raw.get("item_id")
    if isinstance(item_id, bool) or not isinstance(item_id, (str, int)) or not str(item_id).strip():
        raise BadEvent("invalid_item_id")
    if raw.get("event_time") is None:
        raise BadEvent("missing_column:event_time")
    common = dict(item_id=str(item_id).strip(), at=event_time(raw["event_time"]),
                  id=hashlib.sha256(line.strip()).hexdigest()[:32])
    if kind == DELETE:
        return ListingEvent(DELETE, **common)
    if kind == LISTING:
        # The listings contract, with the listing time defaulting to the event's.
        listed_at = datetime.fromtimestamp(common["at"], timezone.utc).isoformat()
        clean, reason = validate_listing({"listed_at": listed_at, **raw})
        if reason:
            raise BadEvent(reason)
        if not (io.is_gcs(clean["image_uri"]) or os.path.isabs(clean["image_uri"])):
            raise BadEvent("invalid_image_uri")  # an event has no file to be relative to
        return ListingEvent(LISTING, **common, title=clean["title"],
                            fields=tuple((name, clean[name]) for name in METADATA_FIELDS),
                            image_uri=clean["image_uri"])
    return ListingEvent(UPDATE, **common, fields=_update_fields(raw))


def _update_fields(raw: dict) -> tuple[tuple[str, Any], ...]:
    """The (field, value) pairs of a status or price change; at least one, each valid."""
    fields: list[tuple[str, Any]] = []
    if raw.get("price") is not None:
        price = parse_price(raw["price"])
        if price is None:
            raise BadEvent("invalid_price")
        fields.append(("price", price))
    if raw.get("status") is not None:
        if not isinstance(raw["status"], str) or not raw["status"].strip():
            raise BadEvent("invalid_status")
        fields.append(("status", raw["status"].strip()))
    if not fields:
        raise BadEvent("empty_update")
    return tuple(fields)


# ---------------------------------------------------------------- Beam parts

@dataclass(frozen=True)
class IngestTarget:
    """Where entries go and what embeds them: the release's state directory, encoder and PCA."""

    version: str
    state_uri: str
    model_uri: str
    kind: str
    pca: PcaProjection | None


def target_of(config: IngestConfig) -> IngestTarget:
    """The release in production (a registry's CURRENT) as an `IngestTarget`."""
    from visrec.stages.release.registry import load_release

    release = load_release(config.release, config.cache_dir)
    pca = PcaProjection.load(str(release.pca_path)) if release.pca_path is not None else None
    return IngestTarget(release.version, release.state_uri, str(release.model_dir), release.encoder_kind, pca)


class ReleaseFollower:
    """The release ingest writes to, following the registry's CURRENT as deploys move it.

    `CURRENT` (one small object) is re-read at most every `follow_seconds`; when it names a new
    release, that release is loaded (verified) with its encoder's image processor, and every later
    entry goes to its journal, embedded by its encoder. Nothing is lost in the switch: entries
    already written to the old release after the new one's catalog snapshot are carried over by the
    new release's hand-over (`visrec.online.follow`), re-embedded with its encoder. A release
    directory given instead of a registry is never switched.
    """

    def __init__(self, config: IngestConfig):
        from visrec.stages.release.registry import CURRENT

        self.config = config
        self.follows = io.exists(io.join(config.release, CURRENT))
        self.target = target_of(config)
        self.image_processor = load_image_processor(self.target.model_uri)
        self.checked_at = time.monotonic()

    def check(self) -> bool:
        """Re-read CURRENT if `follow_seconds` have passed; True if ingest switched to a new release."""
        from visrec.stages.release.registry import current_version

        if not self.follows or time.monotonic() - self.checked_at < self.config.follow_seconds:
            return False
        self.checked_at = time.monotonic()
        version = current_version(self.config.release)
        if version in (None, self.target.version):
            return False
        previous = self.target.version
        self.target = target_of(self.config)
        self.image_processor = load_image_processor(self.target.model_uri)
        log.info("CURRENT moved from %s to %s: ingesting into %s with its encoder", previous, self.target.version,
                 self.target.state_uri)
        return True


def _dead_letter(reason: str, **extra: Any) -> beam.pvalue.TaggedOutput:
    return beam.pvalue.TaggedOutput("dead_letter", {"reason": reason, **extra})


class ParseEvent(beam.DoFn):
    """Event line -> `ListingEvent` (listings to the `listings` output), or a dead letter."""

    def process(self, line: bytes) -> Iterator[Any]:
        try:
            event = parse_event(line)
        except BadEvent as exc:
            yield _dead_letter(exc.reason, event=line.decode("utf-8", "replace"))
            return
        yield beam.pvalue.TaggedOutput("listings", event) if event.type == LISTING else event


def _keep_image(element: tuple[ListingEvent, bytes], state_uri: str) -> tuple[tuple[ListingEvent, str], bytes]:
    """Keep the image in the state directory (for the next release's re-embedding), keyed on with its digest."""
    event, data = element
    return (event, store_image(state_uri, data)), data


def _as_event_dead_letter(record: dict) -> dict:
    """A dead letter of the embed stage's image steps (keyed by event, not item id) in ingest's form."""
    key = record["item_id"]
    event = key[0] if isinstance(key, tuple) else key  # (event, image digest) once the image was kept
    return {**record, "item_id": event.item_id, "event_id": event.id}


def _embedded_entry(element: tuple[tuple[ListingEvent, str], Any], pca: PcaProjection | None) -> JournalEntry:
    (event, digest), features = element
    return event.entry(tuple(project(features[None, :], pca)[0].tolist()), digest)


class AppendSegment(beam.DoFn):
    """A batch of entries -> one `append_many` to the release's journal; yields how many."""

    def __init__(self, state_uri: str):
        self.state_uri = state_uri

    def setup(self) -> None:
        self.journal = open_journal(self.state_uri)
        self.appended = beam.metrics.Metrics.counter(METRICS_NAMESPACE, "entries")

    def process(self, entries: list[JournalEntry]) -> Iterator[int]:
        self.journal.append_many(entries)
        self.appended.inc(len(entries))
        yield len(entries)


class WriteDeadLetters(beam.DoFn):
    """A batch of dead letters -> one JSON Lines object of its own under `prefix`, counted per reason."""

    def __init__(self, prefix: str):
        self.prefix = prefix

    def process(self, records: list[dict]) -> Iterator[int]:
        name = f"{time.time_ns():020d}-{uuid.uuid4().hex}.jsonl"
        io.write_text(io.join(self.prefix, name),
                      "".join(json.dumps(json_safe(r), ensure_ascii=False) + "\n" for r in records))
        for record in records:
            beam.metrics.Metrics.counter(METRICS_NAMESPACE, f"dead_letter_{record['reason']}").inc()
            log.warning("dead letter (%s): %s", record["reason"], record)
        yield len(records)


def ingest_events(lines: Any, target: IngestTarget, config: IngestConfig, image_processor: Any) -> None:
    """Add the ingest transforms to the pipeline of `lines` (a PCollection of event lines, bytes):
    parse, embed listings, append entries to the journal and dead letters beside it."""
    parsed = lines | "Parse" >> beam.ParDo(ParseEvent()).with_outputs("listings", "dead_letter", main="events")
    loaded = (parsed.listings | "ImageUri" >> beam.Map(lambda e: (e, (e.image_uri, None)))
              | "LoadImages" >> beam.ParDo(LoadImage()).with_outputs("rejected", main="images"))
    decoded = (loaded.images | "KeepImages" >> beam.Map(_keep_image, target.state_uri)
               | "DecodePreprocess" >> beam.ParDo(DecodeAndPreprocess(image_processor))
               .with_outputs("rejected", main="pixels"))
    handler = KeyedModelHandler(ImageEncoderHandler(target.model_uri, target.kind, config.device,
                                                    precision=config.precision, max_batch_size=config.batch_size,
                                                    keep_loaded=True))
    embedded = (decoded.pixels | "Embed" >> RunInference(handler)
                | "ToEntries" >> beam.Map(_embedded_entry, target.pca))
    metadata = parsed.events | "MetadataEntries" >> beam.Map(ListingEvent.entry)
    entries = (embedded, metadata) | "AllEntries" >> beam.Flatten()
    (entries | "Segments" >> beam.BatchElements(min_batch_size=1, max_batch_size=config.segment_size)
     | "AppendSegments" >> beam.ParDo(AppendSegment(target.state_uri)))
    image_failures = ((loaded.rejected, decoded.rejected) | "ImageFailures" >> beam.Flatten()
                      | "AsEventDeadLetters" >> beam.Map(_as_event_dead_letter))
    dead_letters = (parsed.dead_letter, image_failures) | "AllDeadLetters" >> beam.Flatten()
    (dead_letters | "DeadLetterBatches" >> beam.BatchElements(min_batch_size=1, max_batch_size=config.segment_size)
     | "WriteDeadLetters" >> beam.ParDo(WriteDeadLetters(io.join(target.state_uri, DEAD_LETTERS))))


# ---------------------------------------------------------------- sources and running

def _file_lines(uri: str) -> Iterator[bytes]:
    yield from (line for line in io.read_bytes(uri).splitlines() if line.strip())


def pubsub_lines(p: beam.Pipeline, subscription: str) -> Any:
    """The streaming source on Dataflow: one event per Pub/Sub message; `UserError` for a malformed
    subscription name (Beam checks it as the transform is built)."""
    try:
        read = beam.io.ReadFromPubSub(subscription=subscription)
    except ValueError as exc:
        raise UserError(f"bad Pub/Sub subscription {subscription!r}: {exc}") from None
    return p | "ReadPubSub" >> read


def file_lines(p: beam.Pipeline, files: Iterable[str]) -> Any:
    """The event lines of `files` (one poll's new files of a watched prefix)."""
    return p | "EventFiles" >> beam.Create(sorted(files)) | "ReadEvents" >> beam.FlatMap(_file_lines)


def new_files(prefix: str, seen: set[str]) -> list[str]:
    """The event files under `prefix` not in `seen`, in name order."""
    return [uri for uri in io.list_files(prefix, EVENT_FILES) if uri not in seen]


def run_ingest(config: IngestConfig, test_pipeline: beam.Pipeline | None = None) -> int:
    """Run `visrec ingest` to its end (a watched prefix: `max_polls` polls; Pub/Sub: until the
    job stops); returns the number of event files read (0 for Pub/Sub).

    Both follow the registry's CURRENT (`ReleaseFollower`): a watched prefix checks it before a
    poll's files run; a Dataflow streaming job is replaced in place (`--update`) with the new
    release's encoder.

    test_pipeline: the pipeline to build the Pub/Sub branch in (not run: tests construct it).
    """
    follower = ReleaseFollower(config)
    log.info("ingesting %s into %s with the encoder %s", config.source, follower.target.state_uri,
             follower.target.model_uri)
    if config.from_pubsub:
        if test_pipeline is not None:
            ingest_events(pubsub_lines(test_pipeline, config.source), follower.target, config,
                          follower.image_processor)
        else:
            _run_streaming(config, follower)
        return 0
    seen: set[str] = set()
    polls = 0
    while config.max_polls is None or polls < config.max_polls:
        files = new_files(config.source, seen)
        if files:
            follower.check()
            p = make_pipeline(config.runner, config.beam_options)
            ingest_events(file_lines(p, files), follower.target, config, follower.image_processor)
            run_pipeline(p)
            seen.update(files)
            log.info("ingested %d event file(s) from %s into release %s", len(files), config.source,
                     follower.target.version)
        polls += 1
        if config.max_polls is None or polls < config.max_polls:
            time.sleep(config.poll_seconds)
    return len(seen)


def streaming_pipeline(config: IngestConfig, follower: ReleaseFollower, update: bool) -> beam.Pipeline:
    """The Pub/Sub pipeline into `follower`'s release; `update`: it replaces the running Dataflow job
    of the same `--job_name` in place (Dataflow keeps its in-flight data and the subscription's
    unacknowledged messages, so no event is lost)."""
    p = make_pipeline(config.runner, [*config.beam_options, "--streaming", *(["--update"] if update else [])])
    ingest_events(pubsub_lines(p, config.source), follower.target, config, follower.image_processor)
    return p


def _run_streaming(config: IngestConfig, follower: ReleaseFollower) -> None:
    """Run the Pub/Sub pipeline. On Dataflow, launch it (replacing a running job of the same name)
    and stay as its supervisor: every `follow_seconds` CURRENT is read, and a new release replaces
    the job in place. Elsewhere (the local runner) it runs in this process until stopped."""
    from apache_beam.options.pipeline_options import GoogleCloudOptions

    from visrec.stages.dataflow import DATAFLOW_RUNNER, find_active_job

    if config.runner != DATAFLOW_RUNNER:
        run_pipeline(streaming_pipeline(config, follower, update=False))
        return
    p = streaming_pipeline(config, follower, update=False)
    cloud = p.options.view_as(GoogleCloudOptions)
    if not cloud.job_name:
        raise UserError("a Dataflow ingest job needs --job_name: the job is replaced by name (--update) when "
                        "a new release becomes CURRENT")
    if find_active_job(cloud.project, cloud.region, cloud.job_name) is not None:
        log.info("Dataflow job %s is running: replacing it with release %s", cloud.job_name, follower.target.version)
        p = streaming_pipeline(config, follower, update=True)
    result = p.run()
    checks = 0
    while config.max_polls is None or checks < config.max_polls:
        time.sleep(config.follow_seconds)
        checks += 1
        if str(result.state) in _TERMINAL_STATES:
            raise RuntimeError(f"the Dataflow ingest job {cloud.job_name} ended {result.state}")
        if follower.check():
            result = streaming_pipeline(config, follower, update=True).run()


_TERMINAL_STATES = {"DONE", "FAILED", "CANCELLED", "DRAINED", "UPDATED"}

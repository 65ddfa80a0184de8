"""`ServingConfig`: everything the service needs besides the release URI, shared by `visrec serve`,
the HTTP app and every worker process it starts (`visrec.online.workers`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from visrec.data.images import MAX_PIXELS
from visrec.online.eventlog import LogConfig
from visrec.online.ranking import RankingConfig


@dataclass
class CompactionConfig:
    """When the serving journal is folded into a snapshot of the state, and how many are kept
    (`visrec.online.compaction`; `visrec compact-journal` and the service read it).

    tail_entries: a serving process compacts once it has read this many journal entries
        since the newest snapshot it knows of, so a start-up replays at most about this many
        after loading a snapshot (0: never in the service; a `visrec compact-journal` job
        does it). A replay applies some 13,000 entries/s on a 2-core VM, so 2,000 add about
        0.15 s to a start-up, what loading a 100,000-item release costs; raise it with the
        catalog (a compaction writes the whole state: index, catalog, registers).
    min_interval_seconds: a serving process starts a compaction at most this often, however
        fast writes come (then a start-up replays up to this long's writes).
    min_tail: a compaction writes a snapshot only if the journal after the newest one holds
        at least this many entries (the service's own compactions ask for `tail_entries`,
        so a replica that finds another one's fresh snapshot writes none).
    jitter: each process draws its threshold from [tail_entries, tail_entries x (1 + jitter)],
        so replicas that reach it together seldom compact at the same time (which is
        harmless, only wasted work).
    retry_seconds: after a compaction failed, a serving process waits this long before the next.
    keep_snapshots: complete snapshots kept, newest first; older ones are deleted once a new
        one is written (more than one, so a reader still loading the previous one finds it).
    orphan_seconds: a snapshot folder still without its manifest this long after it was
        started is a compaction that died; it is deleted.
    """

    tail_entries: int = 2_000
    min_interval_seconds: float = 300.0
    min_tail: int = 1
    jitter: float = 0.25
    retry_seconds: float = 300.0
    keep_snapshots: int = 2
    orphan_seconds: float = 3600.0

    def __post_init__(self) -> None:
        if min(self.tail_entries, self.jitter, self.retry_seconds, self.min_interval_seconds) < 0:
            raise ValueError("tail_entries, jitter, retry_seconds and min_interval_seconds must be >= 0")
        if self.orphan_seconds <= 0:
            raise ValueError("orphan_seconds must be > 0")
        if self.keep_snapshots < 1 or self.min_tail < 1:
            raise ValueError("keep_snapshots and min_tail must be >= 1")


@dataclass
class ServingConfig:
    """Everything the service needs besides the release URI.

    max_body_bytes: request bodies above this are refused (413); 10 MiB holds a
        base64 phone photo with room to spare.
    max_predict_neighbours: the most neighbours one `/predict` may ask for, summed over its
        instances (1,000 instances x k 10); more is refused (422).
    max_concurrent_predicts: `/predict` requests running at once per process; more are
        answered 429. Each runs off the event loop, so reads and health probes keep answering.
    max_image_pixels: an upserted image larger than this (width x height, from its header) is
        refused (422) before any pixel is decoded; smaller ones are decoded at no more than the
        encoder's input size needs (a JPEG at 1/2 to 1/8 scale), so an upload costs megabytes.
    header_timeout_seconds: a connection that has not sent a request's headers this long after
        it opened (or after the previous answer) is closed. keep_alive_seconds: an idle
        connection is closed this long after an answer. max_connections: concurrent
        connections per process; beyond, new requests are answered 503 (uvicorn).
    journal_poll_seconds: how often the journal is re-read for writes made by other
        worker processes; well under the one-second "recommendable" promise.
    image_root: local directory that `image_uri` values may point into; `gs://` URIs
        are always allowed, local paths only under this root (None: local paths refused).
    cache_dir: where a `gs://` release is downloaded (None: a temporary directory).
    reload_signal: a local file through which several worker processes follow each other's
        reloads (`visrec serve --workers N` sets it, `visrec.online.reload`): the worker that
        took `POST /admin/reload` writes a new generation into it, the others see it while
        tailing the journal and reload too. None: a single process.
    compaction: when the service folds its journal into a snapshot of the state.
    logging: where and how impressions and events are logged (`visrec.online.eventlog`; off by default).
    """

    ranking: RankingConfig = field(default_factory=RankingConfig)
    max_body_bytes: int = 10 * 1024 * 1024
    max_predict_neighbours: int = 10_000
    max_concurrent_predicts: int = 4
    max_image_pixels: int = MAX_PIXELS
    header_timeout_seconds: float = 10.0
    keep_alive_seconds: int = 5
    max_connections: int = 1000
    journal_poll_seconds: float = 0.5
    image_root: str | None = None
    cache_dir: str | None = None
    reload_signal: str | None = None
    compaction: CompactionConfig = field(default_factory=CompactionConfig)
    logging: LogConfig = field(default_factory=LogConfig)

    def __post_init__(self) -> None:
        if isinstance(self.compaction, dict):  # handed to worker processes as JSON (`visrec.online.workers`)
            self.compaction = CompactionConfig(**self.compaction)
        if isinstance(self.logging, dict):
            self.logging = LogConfig(**self.logging)

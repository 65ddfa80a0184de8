"""`ServingConfig`: everything the service needs besides the release URI, shared by `visrec serve`,
the HTTP app and every worker process it starts (`visrec.online.workers`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from visrec.data.images import MAX_PIXELS
from visrec.online.ranking import RankingConfig


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

"""`IngestConfig`: the settings of `visrec ingest` (`visrec.online.ingest`), without its heavy
imports, so the CLI reads the defaults (`field_defaults`) without loading Beam."""

from __future__ import annotations

from dataclasses import dataclass, field

from visrec.core.errors import UserError
from visrec.stages.configs import check_encoder_placement

_SUBSCRIPTION_PREFIX = "projects/"


@dataclass
class IngestConfig:
    """`visrec ingest` settings.

    release: a registry (its CURRENT release is the target) or a release directory.
    source: a Pub/Sub subscription `projects/P/subscriptions/S`, or a prefix (local or
        `gs://`) whose `*.jsonl` files hold events, one JSON object a line.
    poll_seconds: how often a watched prefix is listed for new files.
    max_polls: stop after this many polls (None: run until stopped): of a watched prefix, or of
        CURRENT by the supervisor of a Dataflow job (the job itself keeps running).
    follow_seconds: how often the registry's CURRENT is re-read, so ingest writes to (and embeds
        with) the release a deploy made current.
    batch_size: most images per encoder call (`RunInference` batches up to it).
    segment_size: most journal entries per append.
    device / precision: where and how the encoder runs on each worker (as `visrec embed`).
    runner / beam_options: the Beam runner and its flags (Dataflow: docs/ingest.md).
    cache_dir: where a `gs://` release is downloaded (None: a temporary directory).
    """

    release: str
    source: str
    poll_seconds: float = 2.0
    max_polls: int | None = None
    follow_seconds: float = 10.0
    batch_size: int = 16
    segment_size: int = 500
    device: str = "auto"
    precision: str | None = None
    runner: str = "DirectRunner"
    beam_options: list[str] = field(default_factory=list)
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        if self.poll_seconds <= 0:
            raise UserError(f"--poll-seconds must be > 0, got {self.poll_seconds}")
        if self.follow_seconds < 0:
            raise UserError(f"--follow-seconds must be >= 0, got {self.follow_seconds}")
        if self.max_polls is not None and self.max_polls < 1:
            raise UserError(f"--max-polls must be >= 1, got {self.max_polls}")
        if self.batch_size < 1 or self.segment_size < 1:
            raise UserError(f"batch and segment sizes must be >= 1, got {self.batch_size}, {self.segment_size}")
        check_encoder_placement(self.device, self.precision)

    @property
    def from_pubsub(self) -> bool:
        return self.source.startswith(_SUBSCRIPTION_PREFIX)

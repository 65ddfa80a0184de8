"""`ServingState`: one loaded release as the service serves it, with its mutable index and catalog.

A state is built completely (`visrec.online.loading.load_state`) before it is served, and
replaced whole on a reload; only the journal's writes (`visrec.online.replay`) and the
releases it follows (`visrec.online.follow`) change it while it serves.
"""

from __future__ import annotations

import dataclasses
import math
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from visrec.online.errors import NoEncoder
from visrec.online.handover import Handover
from visrec.online.journal import Journal
from visrec.online.lock import ProcessLock
from visrec.online.ranking import ItemCatalog
from visrec.online.writes import WriteRegisters

if TYPE_CHECKING:
    from visrec.model.encode import PreprocessingEncoder
    from visrec.model.pca import PcaProjection
    from visrec.stages.index.searcher import SimilarityIndex
    from visrec.stages.release.release import Release


@dataclass(frozen=True)
class Degraded:
    """Why an earlier release serves: CURRENT (`wanted`) did not verify at start-up (`reason`)."""

    wanted: str | None
    reason: str

    def as_dict(self) -> dict[str, str | None]:
        return dataclasses.asdict(self)


@dataclass
class ServingState:
    """One loaded release with its mutable index and catalog; `lock` guards both.

    encoder_future: the image encoder, loading in the background (None: the release has none).
    pca: the release's projection into the index space (None: the index holds raw features).
    image_size: the encoder's input side, what upserted images are decoded at.
    writes: per item, the newest write of each metadata field, of the vector and of its existence.
    pending_vectors: vectors of items whose creation has not been seen yet.
    skipped_entries: journal entries that parsed but could not be applied (a vector of the
        wrong size); skipped and counted (with those a snapshot it started from counted).
    snapshot: the id of the snapshot of the state the release started from
        (`visrec.online.snapshot`); None: it replayed the whole journal.
    tail_entries: journal entries read since that snapshot (or since the beginning): how
        much a restart would replay, what the in-service compaction watches.
    handover / successor_handover: the writes followed from the predecessor, and from the release
        that replaced this one once it has (`visrec.online.follow`).
    handover_lock: of several worker processes of one machine, one follows the other releases
        (a gs:// state needs no lock: every replica follows, and a write already applied is
        never carried again).
    """

    release: Release
    index: SimilarityIndex
    catalog: ItemCatalog
    encoder_future: Future[PreprocessingEncoder | None]
    pca: PcaProjection | None
    journal: Journal
    lock: threading.Lock = field(default_factory=threading.Lock)
    writes: WriteRegisters = field(default_factory=WriteRegisters)
    pending_vectors: dict[str, np.ndarray] = field(default_factory=dict)
    image_size: int | None = None
    degraded: Degraded | None = None
    skipped_entries: int = 0
    snapshot: str | None = None
    tail_entries: int = 0
    handover: Handover | None = None
    successor_handover: Handover | None = None
    successor_checked_at: float = -math.inf
    handover_lock: ProcessLock = field(default_factory=lambda: ProcessLock(None))

    def handovers(self) -> list[Handover]:
        """The hand-overs this state follows now (predecessor first)."""
        return [h for h in (self.handover, self.successor_handover) if h is not None]

    def entries_skipped(self) -> int:
        """Journal entries skipped so far: unreadable ones and ones that could not be applied."""
        return self.journal.skipped + self.skipped_entries

    def close(self) -> None:
        """This state is no longer served: stop following other releases."""
        for handover in self.handovers():
            handover.close()
        self.handover_lock.release()

    def encoder_status(self) -> str:
        """`loading`, `ready`, `none` (the release has no encoder) or `failed`."""
        if not self.encoder_future.done():
            return "loading"
        if self.encoder_future.exception() is not None:
            return "failed"
        return "none" if self.encoder_future.result() is None else "ready"

    def encoder(self, timeout: float | None = None) -> PreprocessingEncoder | None:
        """The image encoder (None if the release has none); waits while it is still loading."""
        return self.encoder_future.result(timeout)

    def usable_encoder(self, timeout: float | None = None) -> PreprocessingEncoder:
        """The image encoder, or `NoEncoder` if the release has none or it is unavailable
        (failed to load, or still loading after `timeout` seconds)."""
        version = self.release.version
        try:
            encoder = self.encoder(timeout)
        except Exception as exc:  # noqa: BLE001 - still loading past the wait, or failed to load
            raise NoEncoder(f"the image encoder of release {version} is unavailable: {exc!r}") from None
        if encoder is None:
            raise NoEncoder(f"release {version} has no image encoder")
        return encoder

"""Which other releases' writes a serving state follows, and how (`visrec.online.handover`).

A release loaded from a registry follows its predecessor's journal from its catalog
snapshot, so writes taken there during the pipeline's run (and after, by replicas not yet
switched) reach it. A release still serving after another replaced it (its share of a
canary, or kept at 0% for a traffic-shift rollback) follows that successor too, so the
two agree on what is sold and what is new. Of several worker processes of one machine only
the one holding the state's `handover_lock` carries; the others apply what it carries.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Callable

import numpy as np

from visrec.online.entry import JournalEntry
from visrec.online.handover import Handover, HandoverStatus, encoder_fingerprint
from visrec.online.journal import open_journal
from visrec.online.state import ServingState

if TYPE_CHECKING:
    from visrec.stages.release.registry import ReleaseRef

log = logging.getLogger(__name__)

SUCCESSOR_CHECK_SECONDS = 10.0  # how often a served release looks for a release that replaced it


def start_handover(state: ServingState) -> Handover | None:
    """Follow the predecessor's journal from this release's catalog snapshot; None if the release
    has no predecessor (or no recorded snapshot time)."""
    from visrec.stages.release.registry import predecessor

    since = state.release.catalog_snapshot_at
    previous = predecessor(state.release)
    if previous is None or since is None:
        return None
    return _follow(state, previous, since)


def follow_successor(state: ServingState) -> bool:
    """Start following the release that replaced this one, if there is one now; True if it started.

    Checked at most every `SUCCESSOR_CHECK_SECONDS` (a few registry reads).
    """
    from visrec.stages.release.registry import successor
    from visrec.stages.release.release import catalog_snapshot_time

    now = time.monotonic()
    if state.successor_handover is not None or now - state.successor_checked_at < SUCCESSOR_CHECK_SECONDS:
        return False
    state.successor_checked_at = now
    after = successor(state.release)
    if after is None:
        return False
    state.successor_handover = _follow(state, after, catalog_snapshot_time(after.manifest) or 0.0)
    log.info("release %s was replaced by %s; following its writes too", state.release.version, after.version)
    return True


def poll_handover(state: ServingState) -> int:
    """Carry the new writes of the releases `state` follows into its journal (applied by the
    next `sync_journal`); returns how many. Of several worker processes on one machine only
    the one holding the hand-over's file lock does it."""
    handovers = state.handovers()
    if not handovers:
        return 0
    held = state.handover_lock.try_acquire()
    for handover in handovers:
        handover.status.by_other_process = not held
    return sum(handover.poll() for handover in handovers) if held else 0


def _follow(state: ServingState, other: ReleaseRef, since: float) -> Handover:
    """A `Handover` carrying the writes of release `other` after `since` into `state`."""
    same_encoder = encoder_fingerprint(other.manifest) == encoder_fingerprint(state.release.manifest)
    return Handover(HandoverStatus(other.version, since), open_journal(other.state_uri, since=since),
                    state.journal, other.state_uri, state.release.state_uri, same_encoder,
                    applied=lambda entry: _applied(state, entry), embedder=lambda: _batch_embedder(state))


def _applied(state: ServingState, entry: JournalEntry) -> bool:
    """Whether `state` has this write, or newer ones for everything it says (newest write wins)."""
    with state.lock:
        return state.writes.has(entry)


def _batch_embedder(state: ServingState) -> Callable[[list[bytes]], np.ndarray]:
    """Image bytes -> index vectors with `state`'s encoder and PCA (waits for the encoder)."""
    from visrec.data.images import decode_image
    from visrec.model.encode import encode_images

    encoder = state.usable_encoder()
    # Decoded as upserts decode them, so a carried listing gets the vector an upsert would give it.
    return lambda batch: encode_images(encoder, [decode_image(data, target_size=state.image_size) for data in batch],
                                       state.pca)

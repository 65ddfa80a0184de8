"""`RecommenderService`: the framework-free similar-items service, what the HTTP layer calls.

It owns one `ServingState` (`visrec.online.state`) and swaps it for a new one on reload:
the new release is loaded completely (`visrec.online.loading`: index, catalog, encoder,
replayed journal) before a single reference assignment makes it live, so in-flight
requests finish on the old state and a broken release never replaces a working one.

Writes (upsert, delete) go through the release's journal (`visrec.online.journal`: a local
file, or objects on GCS for a `gs://` release): the request handler embeds the image,
keeps it in the state directory, appends one entry (with the vector, so replay never
needs the image again) and then applies every entry it has not applied yet
(`visrec.online.replay`), so there is one write path. A release loaded from a registry
also follows its predecessor's journal and carries the writes made there after its
catalog snapshot into its own (`visrec.online.follow`), on load and with every tail. Once
a tail has grown long, the journal is folded into a snapshot of the state in the
background (`visrec.online.compaction`), so a restart replays only what came after it.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any

from visrec.core import io
from visrec.online.compaction import Compactor
from visrec.online.config import ServingConfig
from visrec.online.entry import METADATA_FIELDS, JournalEntry
from visrec.online.errors import BadItem, UnknownItem
from visrec.online.eventlog import ServiceLog
from visrec.online.experiments import ExperimentFollower, Shown, explore, impression_lines, new_request_id
from visrec.online.follow import follow_successor, poll_handover
from visrec.online.journal import store_image
from visrec.online.loading import load_state
from visrec.online.ranking import ON_SALE, RankedList, recommend
from visrec.online.reload import ReloadSignal
from visrec.online.replay import sync_journal
from visrec.online.state import Degraded, ServingState
from visrec.online.uploads import read_upload

log = logging.getLogger(__name__)

ENCODER_WAIT_SECONDS = 120.0  # an image upsert right after start waits this long for torch to load


class RecommenderService:
    """The service: the current `ServingState` plus the operations the HTTP layer exposes."""

    def __init__(self, release_uri: str, config: ServingConfig | None = None):
        self.release_uri = release_uri
        self.config = config or ServingConfig()
        self._state: ServingState | None = None
        # Serialises writers and reloads: a write never lands in a state being replaced.
        self._write_lock = threading.Lock()
        self._reload_signal = ReloadSignal(self.config.reload_signal)
        # What each answer showed, and the taps and purchases clients report (`visrec.online.eventlog`).
        self.log = ServiceLog(self.config.logging)
        self.experiments = ExperimentFollower(release_uri, self.config)
        self._explore_rng = random.Random()
        self.compactor = Compactor(self.config.compaction)
        # A gs:// release is downloaded. Without a configured cache the service keeps its copies
        # in a directory of its own and deletes each once a reload has replaced it, so weekly
        # reloads do not fill the disk.
        self._own_cache: Path | None = None
        if self.config.cache_dir is None and io.is_gcs(release_uri):
            self._own_cache = Path(tempfile.mkdtemp(prefix="visrec-releases-"))
            self.config = dataclasses.replace(self.config, cache_dir=str(self._own_cache))

    @property
    def ready(self) -> bool:
        return self._state is not None

    @property
    def state(self) -> ServingState:
        if self._state is None:
            raise RuntimeError("no release loaded yet")
        return self._state

    def start(self) -> None:
        """Load the release named at construction. If it is a registry whose CURRENT release does
        not verify (corrupt, incomplete), serve the newest earlier release that does, and say so
        (`ServingState.degraded`), rather than no release at all."""
        from visrec.stages.release.release import ReleaseInvalid

        try:
            state = load_state(self.release_uri, self.config)
        except ReleaseInvalid as exc:
            state = self._fall_back(exc)
        with self._write_lock:
            self._state = state

    def _fall_back(self, refused: Exception) -> ServingState:
        from visrec.stages.release.registry import CURRENT, current_version, fallback_versions
        from visrec.stages.release.release import ReleaseInvalid

        if not io.exists(io.join(self.release_uri, CURRENT)):
            raise refused
        wanted = current_version(self.release_uri)
        for version in fallback_versions(self.release_uri):
            try:
                state = load_state(self.release_uri, self.config, version=version)
            except ReleaseInvalid as exc:
                log.error("release %s does not verify either: %s", version, exc)
                continue
            state.degraded = Degraded(wanted=wanted, reason=str(refused))
            log.critical("CURRENT release %s of %s does not verify (%s): serving %s instead until a reload "
                         "finds a release that does", wanted, self.release_uri, refused, version)
            return state
        raise refused

    def reload(self, announce: bool = True) -> str:
        """Load the release the URI names now (a registry's CURRENT), then swap; returns its version.

        Any error leaves the old state serving and propagates to the caller. With
        `announce`, other worker processes are told to follow (`follow_reloads`).
        """
        new = load_state(self.release_uri, self.config)
        try:
            new.encoder()  # a release whose encoder does not load is refused too
        except BaseException:
            new.close()
            raise
        with self._write_lock:
            # Writes the old release took while the new one was loading, carried and applied
            # before the swap: an acknowledged write is never served undone, not even briefly.
            poll_handover(new)
            sync_journal(new)
            old, self._state = self._state, new
        if old is not None:
            old.close()
        version = new.release.version
        log.info("now serving release %s", version)
        # Requests still on the old state only use what is in memory: its files can go.
        if (old is not None and self._own_cache is not None and old.release.path.parent == self._own_cache
                and old.release.path != new.release.path):
            shutil.rmtree(old.release.path, ignore_errors=True)
        if announce:
            self._reload_signal.announce(version)
        return version

    def follow_reloads(self) -> str | None:
        """Reload if another worker announced a reload since the last look; returns the new version.

        A failure is logged and this worker keeps serving what it has (the worker that took
        the request already answered for the release).
        """
        version = self._reload_signal.unseen()
        if version is None or (self._state is not None and self._state.release.version == version):
            return None
        try:
            return self.reload(announce=False)
        except Exception as exc:  # noqa: BLE001 - keep serving the old release
            log.error("cannot follow the reload to %s: %s", version, exc)
            return None

    def answer(self, item_id: str, k: int, user_id: str | None = None, session_id: str | None = None) -> Shown:
        """Similar items for one page view, from the arm of the user (else the session) when an
        experiment runs, logged as impressions; `UnknownItem` if the item has no embedding."""
        assignment = self.experiments.assign(self.state, user_id or session_id)
        state = assignment.state
        with state.lock:
            try:
                ranked = recommend(item_id, k, state.index, state.catalog, self.config.ranking)
            except KeyError:
                raise UnknownItem(item_id) from None
        return self._shown(item_id, state, ranked, assignment.arm, assignment.experiment, user_id, session_id)

    def _shown(self, item_id: str, state: ServingState, ranked: RankedList, arm: str | None,
               experiment: dict[str, Any] | None, user_id: str | None, session_id: str | None) -> Shown:
        """The answer as shown (exploration applied when the experiment asks for it), logged."""
        exploration = float(experiment.get("exploration", 0.0)) if experiment else 0.0
        depth = int(experiment.get("explore_depth", 2)) if experiment else 2
        ranked, propensities, explored = explore(ranked, exploration, depth, self._explore_rng)
        shown = Shown(new_request_id(), state.release.version, arm, experiment["id"] if experiment else None,
                      ranked, propensities, explored)
        if self.log.enabled:
            self.log.impressions(impression_lines(shown, item_id, user_id, session_id))
        return shown

    def similar(self, item_id: str, k: int) -> tuple[str, RankedList]:
        """(release version, ranked list) for the item, outside any experiment arm; `UnknownItem`
        if it has no embedding."""
        shown = self.answer(item_id, k)
        return shown.release, shown.ranked

    def item(self, item_id: str) -> dict[str, Any]:
        """`{"item_id", "release", "price", "category", "status", "indexed"}` of a catalog item;
        `UnknownItem` if it is not there."""
        state = self.state
        with state.lock:
            row = state.catalog.get(item_id)
            if row is None:
                raise UnknownItem(item_id)
            return {"item_id": item_id, "release": state.release.version, **row, "indexed": item_id in state.index}

    def similar_many(self, queries: list[tuple[str, int]], user_id: str | None = None,
                     session_id: str | None = None) -> list[Shown | UnknownItem]:
        """One answer (or `UnknownItem`) per (item, k), all from the same release and arm: the
        state is read once, so a reload meanwhile cannot mix two releases in one answer. Queries
        with k outside 1..max_k get `UnknownItem` too (the caller checks k)."""
        assignment = self.experiments.assign(self.state, user_id or session_id)
        state = assignment.state
        results: list[Shown | UnknownItem] = []
        for item_id, k in queries:
            if not 1 <= k <= self.config.ranking.max_k:
                results.append(UnknownItem(item_id))
                continue
            with state.lock:  # per query, so writes interleave with a long request
                try:
                    ranked = recommend(item_id, k, state.index, state.catalog, self.config.ranking)
                except KeyError:
                    results.append(UnknownItem(item_id))
                    continue
            results.append(self._shown(item_id, state, ranked, assignment.arm, assignment.experiment, user_id,
                                       session_id))
        return results

    def record_event(self, row: dict[str, Any]) -> None:
        """Log a tap or purchase a client reports (validated by the HTTP layer)."""
        self.log.event(row)

    def sync_journal(self) -> int:
        """Pick up journal lines written by other processes, and the followed releases' new writes."""
        state = self._state
        if state is None:
            return 0
        follow_successor(state)
        poll_handover(state)  # outside the write lock: it may list GCS, and only appends
        with self._write_lock:
            applied = sync_journal(self._state)
        self.compactor.maybe_start(self._state)  # in the background, once the tail is long
        self.experiments.poll()
        treatment = self.experiments.treatment
        if treatment is not None:  # it follows the control's writes through its hand-over
            poll_handover(treatment)
            sync_journal(treatment)
        return applied

    def upsert(self, item_id: str, fields: dict[str, Any]) -> dict[str, Any]:
        """Create or update an item from request fields; embeds the image if one is given.

        `fields`: `title`, `category`, `price`, `status` and optionally `image` (base64)
        or `image_uri`. A new item needs an image and every metadata field; an existing
        one may change only some (e.g. just `status`).
        """
        upload = read_upload(fields, self.config, self.state.image_size)

        def embedded(state: ServingState) -> tuple[tuple[float, ...] | None, str | None]:
            """(vector, kept image's sha256) for `state`'s release; (None, None) without an image."""
            if upload is None:
                return None, None
            from visrec.model.encode import encode_images

            data, image = upload
            vector = encode_images(state.usable_encoder(ENCODER_WAIT_SECONDS), [image], state.pca)[0]
            return tuple(vector.tolist()), store_image(state.release.state_uri, data)

        state = self.state
        vector, image_sha256 = embedded(state)
        with self._write_lock:
            if self.state is not state:  # a reload swapped releases meanwhile: use the new encoder
                state = self.state
                vector, image_sha256 = embedded(state)
            # Merge with the newest state of the item, other workers' and replicas' writes included.
            sync_journal(state)
            with state.lock:
                current = state.catalog.get(item_id)
                indexed = item_id in state.index
            if vector is None and not (current and indexed):
                raise BadItem("a new item needs an image (`image` base64 or `image_uri`)")
            sent = [name for name in METADATA_FIELDS if fields.get(name) is not None]
            if current is None:
                sent = list(METADATA_FIELDS)  # a new listing sets every field (status: on sale)
            merged = {"category": fields.get("category", current and current["category"]),
                      "price": fields.get("price", current and current["price"]),
                      "status": fields.get("status") or (current["status"] if current else ON_SALE)}
            if merged["category"] is None or merged["price"] is None:
                raise BadItem("a new item needs `category` and `price`")
            # `sent`: readers take only these fields from the entry (visrec.online.writes), so a
            # concurrent update of another field on another worker is never undone.
            state.journal.append(JournalEntry.upsert(item_id, title=fields.get("title"), **merged, sent=tuple(sent),
                                                     vector=vector, image_sha256=image_sha256))
            sync_journal(state)
            with state.lock:
                status = (state.catalog.get(item_id) or merged)["status"]
        return {"item_id": item_id, "release": state.release.version, "status": status,
                "embedded": vector is not None}

    def delete(self, item_id: str) -> None:
        """Remove an item from catalog and index; `UnknownItem` if it is not there."""
        with self._write_lock:
            state = self.state
            sync_journal(state)  # it may have been created a moment ago by another worker
            with state.lock:
                known = item_id in state.catalog or item_id in state.index
            if not known:
                raise UnknownItem(item_id)
            state.journal.append(JournalEntry.delete(item_id))
            sync_journal(state)

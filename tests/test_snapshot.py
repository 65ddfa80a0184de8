"""Snapshots of the serving state and journal compaction: a snapshot and its tail give what a
replay of the whole journal gives, whatever was written and however it was batched; a crash,
a corrupt snapshot or a second compactor never costs a write."""

from __future__ import annotations

import dataclasses
import logging
import random
import threading
from pathlib import Path

import numpy as np
import pytest

from visrec.core import io
from visrec.online.compaction import BUSY, NOT_NEEDED, WRITTEN, Compactor, compact_journal
from visrec.online.config import CompactionConfig
from visrec.online.entry import METADATA_FIELDS, JournalEntry
from visrec.online.journal import open_journal
from visrec.online.loading import open_state
from visrec.online.replay import sync_journal
from visrec.online.snapshot import MANIFEST, STATE_FILE, list_snapshots
from visrec.stages.release.release import ReleaseInvalid

DIMS = 8
RELEASE_ITEMS = [f"r{n}" for n in range(12)]
POOL = RELEASE_ITEMS + [f"n{n}" for n in range(6)]
CATEGORIES = ["a/b", "a/c", "d/e"]
STATUSES = ["on_sale", "sold", "reserved"]


@dataclasses.dataclass(frozen=True)
class FakeRelease:
    """What `open_state` and `compact_journal` read of a release: its files and its state directory."""

    version: str
    index_dir: Path
    items_path: Path
    state_uri: str

    def verify_deferred(self, which=None) -> None:
        """Its files are the test's own: nothing to check."""


@pytest.fixture(scope="module")
def release_files(tmp_path_factory) -> tuple[Path, Path]:
    """A 12-item release's index and catalog (the state directories differ per test)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from visrec.stages.index.searcher import SimilarityIndex

    root = tmp_path_factory.mktemp("release")
    SimilarityIndex.build(RELEASE_ITEMS, np.random.default_rng(0).standard_normal((12, DIMS))).save(
        str(root / "index"))
    pq.write_table(pa.table({"item_id": RELEASE_ITEMS, "price": [100 + i for i in range(12)],
                             "category": [CATEGORIES[i % 3] for i in range(12)],
                             "status": [STATUSES[i % 3] for i in range(12)]}), root / "items.parquet")
    return root / "index", root / "items.parquet"


def release_at(release_files, state_uri: str) -> FakeRelease:
    return FakeRelease("v1", *release_files, state_uri)


def started(release: FakeRelease):
    """The state a serving start-up has: from the newest snapshot on, the journal since replayed."""
    state = open_state(release)
    sync_journal(state)
    return state


def random_entries(rng: random.Random, count: int) -> list[JournalEntry]:
    """A journal of every kind of write: new listings and re-listings, image updates and
    metadata updates that set some fields, entries from before `sent`, deletes, a price set
    to null, a vector of the wrong size; write times out of journal order."""
    entries = []
    for n in range(count):
        item, at = rng.choice(POOL), n + rng.uniform(-4, 4)
        kind = rng.choices(["list", "image", "meta", "legacy", "delete", "bad"], [3, 2, 6, 1, 3, 1])[0]
        if kind == "delete":
            entries.append(JournalEntry("delete", item, at, f"e{n}"))
            continue
        values = {"category": rng.choice(CATEGORIES), "price": rng.choice([None, 50, 150.5, 300]) if rng.random() < .1
                  else rng.choice([50, 150.5, 300]), "status": rng.choice(STATUSES)}
        sent = tuple(rng.sample(METADATA_FIELDS, rng.randint(1, 3)))
        if kind in ("list", "bad"):
            sent = METADATA_FIELDS
        vector = None
        if kind in ("list", "image", "bad") or (kind == "legacy" and rng.random() < .5):
            vector = tuple(np.random.default_rng(n).standard_normal(3 if kind == "bad" else DIMS).astype(np.float32)
                           .tolist())
        entries.append(JournalEntry("upsert", item, at, f"e{n}", None, values["category"], values["price"],
                                    values["status"], None if kind == "legacy" else sent, vector, None))
    return entries


def observed(state) -> dict:
    """Everything a state answers with or decides by: catalog rows, indexed vectors, the write
    registers, vectors waiting for their item's creation, and the skipped count."""
    def rounded(vector) -> tuple | None:
        return None if vector is None else tuple(np.round(np.asarray(vector, dtype=np.float64), 5).tolist())

    def field(name, register):
        at, value = register
        return at, float(value) if name == "price" and value is not None else value

    writes = state.writes
    registers = {item: writes.of(item) for item in writes.items()}
    return {
        "catalog": {item: state.catalog.get(item) for item in POOL},
        "catalog_size": len(state.catalog),
        "indexed": {item: rounded(state.index.vector(item)) for item in POOL},
        "index_size": len(state.index),
        # A field kept from the catalog row of a deleted item (`keep_base`, at -inf) is the value the
        # row still holds where the delete was not applied yet: the same answer either way.
        "fields": {item: {name: field(name, r) for name, r in fields.items() if r[0] != float("-inf")}
                   for item, (fields, _, _) in registers.items()
                   if any(r[0] != float("-inf") for r in fields.values())},
        "vector_at": {item: at for item, (_, at, _) in registers.items() if at is not None},
        "existence": {item: e for item, (_, _, e) in registers.items() if e is not None},
        "pending": {item: rounded(v) for item, v in state.pending_vectors.items()},
        "skipped": state.entries_skipped(),
    }


def full_replay(release_files, tmp_path: Path, entries: list[JournalEntry]) -> dict:
    """What a start-up that replays the whole journal, in one batch, gives."""
    state_dir = tmp_path / f"full-{random.random()}"
    open_journal(str(state_dir)).append_many(entries)
    return observed(started(release_at(release_files, str(state_dir))))


@pytest.mark.parametrize("seed", range(40))
def test_a_snapshot_and_its_tail_give_what_a_full_replay_gives(release_files, tmp_path, seed):
    """Random interleavings, compacted at random points (a snapshot of a snapshot too), and a
    live state applying them in random batches: all end in the state of one full replay."""
    rng = random.Random(seed)
    entries = random_entries(rng, 80)
    expected = full_replay(release_files, tmp_path, entries)

    release = release_at(release_files, str(tmp_path / "state"))
    journal = open_journal(release.state_uri)
    live = started(release)
    cuts = sorted(rng.sample(range(1, len(entries)), 6))
    for start, end in zip([0] + cuts, cuts + [len(entries)]):
        journal.append_many(entries[start:end])
        sync_journal(live)
        if rng.random() < 0.6:
            assert compact_journal(release).status == WRITTEN
    assert observed(live) == expected
    restarted = started(release)
    assert restarted.snapshot is not None
    assert observed(restarted) == expected


def test_compaction_writes_only_when_the_tail_is_long_enough_and_keeps_the_newest(release_files, tmp_path):
    release = release_at(release_files, str(tmp_path / "state"))
    journal = open_journal(release.state_uri)
    assert compact_journal(release).status == NOT_NEEDED  # an empty journal: nothing to fold
    entries = random_entries(random.Random(1), 30)
    journal.append_many(entries[:10])
    first = compact_journal(release, CompactionConfig(min_tail=10))
    assert (first.status, first.tail_entries, first.position) == (WRITTEN, 10, journal.path.stat().st_size)
    journal.append_many(entries[10:15])
    assert compact_journal(release, CompactionConfig(min_tail=10)).status == NOT_NEEDED
    names = [first.snapshot]
    for chunk in (entries[15:20], entries[20:30]):
        journal.append_many(chunk)
        result = compact_journal(release, CompactionConfig(keep_snapshots=2))
        names.append(result.snapshot)
    assert result.removed == (names[0],)
    assert [r.name for r in list_snapshots(release.state_uri)] == names[:0:-1]
    state = started(release)
    assert (state.snapshot, state.tail_entries) == (names[-1], 0)
    assert observed(state) == full_replay(release_files, tmp_path, entries)


def test_a_crash_mid_snapshot_leaves_the_previous_one_in_force(release_files, tmp_path, monkeypatch):
    release = release_at(release_files, str(tmp_path / "state"))
    journal = open_journal(release.state_uri)
    entries = random_entries(random.Random(2), 40)
    journal.append_many(entries[:20])
    before = compact_journal(release).snapshot
    journal.append_many(entries[20:])
    write_json = io.write_json

    def dies_before_the_manifest(uri, obj):
        if uri.endswith(MANIFEST):
            raise OSError("the compactor's machine went away")
        write_json(uri, obj)

    monkeypatch.setattr(io, "write_json", dies_before_the_manifest)
    with pytest.raises(OSError, match="went away"):
        compact_journal(release)
    monkeypatch.setattr(io, "write_json", write_json)
    orphan = list_snapshots(release.state_uri)[0]
    assert orphan.name != before and (Path(orphan.uri) / STATE_FILE).exists()  # written beside, never switched
    state = started(release)
    assert (state.snapshot, state.tail_entries) == (before, 20)
    assert observed(state) == full_replay(release_files, tmp_path, entries)
    # The next compaction leaves a folder that may still be written alone, and deletes it once it is old.
    assert compact_journal(release, CompactionConfig(min_tail=1)).status == WRITTEN
    assert orphan.name in {r.name for r in list_snapshots(release.state_uri)}
    journal.append(entries[0])
    assert orphan.name in compact_journal(release, CompactionConfig(orphan_seconds=1e-3)).removed


_DIES_WRITING_THE_MANIFEST = """
import os, signal, sys
from pathlib import Path
from visrec.core import io
from visrec.online.compaction import compact_journal
from visrec.online.snapshot import MANIFEST
sys.path.insert(0, sys.argv[1])
from test_snapshot import FakeRelease

write_json = io.write_json
def dies(uri, obj):
    if uri.endswith(MANIFEST):
        os.kill(os.getpid(), signal.SIGKILL)  # no finally, no flush: as a machine that goes away
    write_json(uri, obj)
io.write_json = dies
compact_journal(FakeRelease("v1", Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4]))
"""


def test_a_compactor_killed_mid_snapshot_costs_nothing(release_files, tmp_path):
    """A real process death just before the switch: the previous snapshot stays in force, and
    the compaction lock it held is free for the next compactor."""
    import os
    import subprocess
    import sys

    release = release_at(release_files, str(tmp_path / "state"))
    journal = open_journal(release.state_uri)
    entries = random_entries(random.Random(9), 30)
    journal.append_many(entries[:10])
    before = compact_journal(release).snapshot
    journal.append_many(entries[10:])
    tests = Path(__file__).resolve().parent
    child = subprocess.run([sys.executable, "-c", _DIES_WRITING_THE_MANIFEST, str(tests), *map(str, release_files),
                            release.state_uri], env={**os.environ, "PYTHONPATH": str(tests.parent)}, timeout=120)
    assert child.returncode == -9
    assert len(list_snapshots(release.state_uri)) == 2  # the dead one's folder, without a manifest
    state = started(release)
    assert (state.snapshot, state.tail_entries) == (before, 20)
    assert observed(state) == full_replay(release_files, tmp_path, entries)
    assert compact_journal(release).status == WRITTEN


def _corrupt_state(folder: Path) -> None:
    data = bytearray((folder / STATE_FILE).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (folder / STATE_FILE).write_bytes(bytes(data))


def _corrupt_index(folder: Path) -> None:
    victim = next(p for p in sorted((folder / "index").rglob("*")) if p.is_file() and p.name != "manifest.json")
    victim.write_bytes(victim.read_bytes()[:-4] + b"bad!")


def _garble_manifest(folder: Path) -> None:
    (folder / MANIFEST).write_text("{not json")


def _move_to_another_position(folder: Path) -> None:
    parts = folder.name.split("-")
    folder.rename(folder.with_name(f"{int(parts[0]) + 1:020d}-{parts[1]}-{parts[2]}"))


@pytest.mark.parametrize("damage", [_corrupt_state, _corrupt_index, _garble_manifest, _move_to_another_position])
def test_a_corrupt_snapshot_is_skipped_for_the_one_before(release_files, tmp_path, caplog, damage):
    release = release_at(release_files, str(tmp_path / "state"))
    journal = open_journal(release.state_uri)
    entries = random_entries(random.Random(3), 30)
    journal.append_many(entries[:15])
    older = compact_journal(release).snapshot
    journal.append_many(entries[15:])
    newer = compact_journal(release).snapshot
    damage(Path(release.state_uri) / "snapshots" / newer)
    with caplog.at_level(logging.ERROR, logger="visrec.online.snapshot"):
        state = started(release)
    assert (state.snapshot, state.tail_entries) == (older, 15)
    assert "cannot be used" in caplog.text
    assert observed(state) == full_replay(release_files, tmp_path, entries)
    _corrupt_state(Path(release.state_uri) / "snapshots" / older)
    state = started(release)
    assert (state.snapshot, state.tail_entries) == (None, 30)  # the whole journal, then
    assert observed(state) == full_replay(release_files, tmp_path, entries)


def test_a_snapshot_of_another_journal_is_not_used(release_files, tmp_path, caplog):
    """The journal was replaced by a shorter one (an operator reset it): the snapshot's position
    is not a line start of it, so the snapshot is skipped rather than the new writes."""
    release = release_at(release_files, str(tmp_path / "state"))
    journal = open_journal(release.state_uri)
    journal.append_many(random_entries(random.Random(4), 20))
    compact_journal(release)
    journal.path.unlink()
    fresh = random_entries(random.Random(5), 3)
    open_journal(release.state_uri).append_many(fresh)
    with caplog.at_level(logging.ERROR, logger="visrec.online.snapshot"):
        state = started(release)
    assert state.snapshot is None and "no line ending just before byte" in caplog.text
    assert observed(state) == full_replay(release_files, tmp_path, fresh)


def test_concurrent_compactors_on_one_machine_are_harmless(release_files, tmp_path):
    release = release_at(release_files, str(tmp_path / "state"))
    entries = random_entries(random.Random(6), 60)
    open_journal(release.state_uri).append_many(entries)
    results, start = [], threading.Barrier(4)

    def compact() -> None:
        start.wait()
        results.append(compact_journal(release).status)

    threads = [threading.Thread(target=compact) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert WRITTEN in results and set(results) <= {WRITTEN, BUSY, NOT_NEEDED}
    assert observed(started(release)) == full_replay(release_files, tmp_path, entries)


def test_the_service_compactor_starts_once_past_its_threshold(release_files, tmp_path):
    release = release_at(release_files, str(tmp_path / "state"))
    journal = open_journal(release.state_uri)
    entries = random_entries(random.Random(7), 30)
    state = started(release)
    compactor = Compactor(CompactionConfig(tail_entries=20, jitter=0.0))
    journal.append_many(entries[:19])
    sync_journal(state)
    assert not compactor.maybe_start(state)
    journal.append_many(entries[19:])
    sync_journal(state)
    assert compactor.maybe_start(state)
    compactor._thread.join(60)
    assert compactor.last.status == WRITTEN and state.tail_entries == 0
    journal.append_many(random_entries(random.Random(8), 25))
    sync_journal(state)
    assert not compactor.maybe_start(state)  # past the threshold again, but within the minimum interval
    restarted = started(release)
    assert restarted.snapshot == compactor.last.snapshot and observed(restarted) == observed(state)


def test_gcs_snapshots_and_concurrent_replicas(release_files, tmp_path, gcs_emulator, caplog):
    """On GCS nothing locks: replicas compacting at once each write a snapshot, a reader takes
    the one that covers most, and a corrupt one is skipped there too."""
    release = release_at(release_files, f"gs://{gcs_emulator()}/registry/releases/v1/state")
    journal = open_journal(release.state_uri)
    entries = random_entries(random.Random(8), 40)
    journal.append_many(entries[:25])
    statuses = []
    threads = [threading.Thread(target=lambda: statuses.append(compact_journal(release).status)) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert statuses == [WRITTEN, WRITTEN]
    journal.append_many(entries[25:])
    expected = full_replay(release_files, tmp_path, entries)
    state = started(release)
    assert state.snapshot is not None and observed(state) == expected
    assert compact_journal(release).status == WRITTEN
    refs = list_snapshots(release.state_uri)
    assert len(refs) == CompactionConfig().keep_snapshots
    io.write_bytes(f"{refs[0].uri}/{STATE_FILE}", b"torn")
    with caplog.at_level(logging.ERROR, logger="visrec.online.snapshot"):
        state = started(release)
    assert state.snapshot == refs[1].name and "cannot be used" in caplog.text
    assert observed(state) == expected


# ---- a served release ------------------------------------------------------------------------


def _answers(service) -> dict:
    """What a service says about every item it knows: its row and its similar items, as the
    scores in order and the items of each score (equal scores, of identical images, come in the
    index's order; the last score's items may be cut at k)."""
    import itertools

    state = service.state
    items = sorted(set(state.catalog.ids.decode(np.flatnonzero(state.catalog.present[:len(state.catalog.ids)]))))
    out = {}
    for item in items:
        row = service.item(item)
        similar = None
        if row["indexed"]:
            ranked = [(round(r.score, 4), r.item_id) for r in service.similar(item, 10)[1].items]
            groups = [(score, {i for _, i in group}) for score, group in itertools.groupby(ranked, lambda r: r[0])]
            similar = [score for score, _ in ranked], groups[:-1]
        out[item] = (row, similar)
    return out


@pytest.mark.integration
def test_a_served_release_restarts_from_its_snapshot_as_from_its_whole_journal(tmp_path, tiny_models, capsys,
                                                                               monkeypatch):
    """The service compacts on its own past its threshold, `visrec compact-journal` does too, and a
    restart from the newest snapshot and its tail answers exactly as one that replays it all. A
    restart from a snapshot checks the snapshot, not the release files it replaces."""
    import base64
    import json
    import shutil

    from test_serving import CATEGORIES, COLOURS, build_release, jpeg
    from visrec.cli import main
    from visrec.online.config import ServingConfig
    from visrec.online.service import RecommenderService

    registry = tmp_path / "registry"
    build_release(tiny_models, registry, "v1")
    service = RecommenderService(str(registry), ServingConfig(compaction=CompactionConfig(tail_entries=6,
                                                                                          jitter=0.0)))
    service.start()
    image = lambda n: base64.b64encode(jpeg(COLOURS[n % len(COLOURS)], n % 5)).decode()  # noqa: E731
    service.upsert("new-1", {"category": CATEGORIES[0], "price": 1500, "image": image(1)})
    service.upsert("new-2", {"category": CATEGORIES[1], "price": 900, "image": image(2)})
    service.upsert("item-0001", {"status": "sold"})
    service.upsert("item-0002", {"price": 2222})
    service.delete("item-0003")
    service.upsert("new-1", {"status": "reserved"})
    service.sync_journal()  # the background tail: 6 entries read, so a compaction starts
    service.compactor._thread.join(120)
    assert service.compactor.last.status == WRITTEN and service.compactor.last.tail_entries == 6
    service.upsert("item-0004", {"image": image(3)})  # a new image for a release item
    service.delete("new-2")
    assert main(["compact-journal", "--release", str(registry)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["status"] == WRITTEN and printed["tail_entries"] == 2
    service.upsert("new-3", {"category": CATEGORIES[2], "price": 1000, "image": image(4)})  # the tail
    expected = _answers(service)

    from visrec.core import checksums

    hashed: list[str] = []
    real = checksums.sha256_file
    monkeypatch.setattr(checksums, "sha256_file", lambda path: hashed.append(str(path)) or real(path))
    restarted = RecommenderService(str(registry))
    restarted.start()
    assert (restarted.state.snapshot, restarted.state.tail_entries) == (printed["snapshot"], 1)
    assert _answers(restarted) == expected
    release_dir = registry / "releases" / "v1"
    read = {Path(p).relative_to(release_dir).parts[0] for p in hashed if Path(p).is_relative_to(release_dir)}
    assert {"model", "state"} <= read and not read & {"index", "items.parquet", "embeddings"}, read
    # A torn release index does not matter while a snapshot replaces it; without one it is refused.
    vectors = release_dir / "index" / "vectors.npy"
    intact = vectors.read_bytes()
    vectors.write_bytes(intact[:-8] + b"garbage!")
    again = RecommenderService(str(registry))
    again.start()
    assert again.state.snapshot == printed["snapshot"] and again.state.degraded is None
    again.state.close()
    snapshots = registry / "releases/v1/state/snapshots"
    shutil.move(str(snapshots), str(tmp_path / "moved-away"))
    with pytest.raises(ReleaseInvalid, match="corrupt: index/vectors.npy"):
        RecommenderService(str(registry)).start()  # no release to fall back to: refused
    vectors.write_bytes(intact)
    shutil.move(str(tmp_path / "moved-away"), str(snapshots))
    shutil.move(str(registry / "releases/v1/state/snapshots"), str(tmp_path / "moved-away"))
    replayed = RecommenderService(str(registry))
    replayed.start()
    assert (replayed.state.snapshot, replayed.state.tail_entries) == (None, 9)
    assert _answers(replayed) == expected
    for s in (service, restarted, replayed):
        s.state.close()


@pytest.mark.integration
def test_a_hand_over_follows_a_compacted_predecessor(tmp_path, tiny_models):
    """Compaction deletes no journal entry: the next release still carries every write made after
    its catalog snapshot, before and after the predecessor's compactions."""
    import base64
    import datetime as dt
    import time

    from test_serving import CATEGORIES, COLOURS, build_release, jpeg
    from visrec.online.service import RecommenderService

    registry = tmp_path / "registry"
    build_release(tiny_models, registry, "v1")
    service = RecommenderService(str(registry))
    service.start()
    v1 = service.state.release
    service.upsert("item-0005", {"status": "sold"})  # before the next release's snapshot
    compact_journal(v1)
    snapshot = time.time()
    time.sleep(0.01)
    service.upsert("item-0000", {"status": "sold"})
    service.upsert("new-1", {"category": CATEGORIES[0], "price": 1010,
                             "image": base64.b64encode(jpeg(COLOURS[1], 2)).decode()})
    assert compact_journal(v1).status == WRITTEN
    service.delete("item-0002")
    build_release(tiny_models, registry, "v2",
                  catalog_snapshot_at=dt.datetime.fromtimestamp(snapshot, dt.timezone.utc).isoformat())
    assert service.reload() == "v2"
    assert service.state.handover.status.carried == 3  # the same encoder: copied, nothing to re-embed
    service.sync_journal()
    state = service.state
    assert state.catalog.get("item-0000")["status"] == "sold" and "new-1" in state.index
    assert "item-0002" not in state.catalog and state.catalog.get("item-0005")["status"] == "on_sale"
    # Still following v1 after a compaction of v1 and of v2.
    still_on_v1 = RecommenderService(str(registry / "releases" / "v1"))
    still_on_v1.start()
    assert still_on_v1.state.snapshot is not None
    compact_journal(state.release)
    still_on_v1.upsert("item-0006", {"price": 4321})
    service.sync_journal()
    assert service.state.catalog.get("item-0006")["price"] == 4321
    for s in (service, still_on_v1):
        s.state.close()

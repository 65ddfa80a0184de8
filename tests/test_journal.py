"""The serving write journal: local file and GCS stores, and replicas converging on one state."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from visrec.core import io
from visrec.online.entry import BadEntry, JournalEntry
from visrec.online.journal import LATE_ENTRY_WINDOW_SECONDS as LATE_WINDOW
from visrec.online.journal import FileJournal, GcsJournal, open_journal


def entry(raw: dict) -> JournalEntry:
    """The entry a journal line holding `raw` stands for."""
    return JournalEntry.from_json(json.dumps(raw))


def test_file_journal_returns_each_complete_line_once(tmp_path):
    journal = open_journal(str(tmp_path / "state"))
    assert isinstance(journal, FileJournal) and journal.read_new() == []
    journal.append(JournalEntry("delete", "a", 1.0))
    with open(journal.path, "ab") as fh:  # a writer is half-way through a line, and a bad line
        fh.write(b"not json\n{\"op\": \"delete\", \"item_")
    assert journal.read_new() == [JournalEntry("delete", "a", 1.0)]
    with open(journal.path, "ab") as fh:
        fh.write(b"id\": \"b\", \"at\": 2.0}\n")
    assert journal.read_new() == [JournalEntry("delete", "b", 2.0)]
    assert journal.read_new() == []


def _line(raw: dict) -> bytes:
    return json.dumps(raw, separators=(",", ":")).encode() + b"\n"


FIRST_RAW = {"op": "delete", "id": "first", "item_id": "a", "at": 1.0}
NEXT_RAW = {"op": "delete", "id": "next", "item_id": "b", "at": 2.0}
FIRST, NEXT = entry(FIRST_RAW), entry(NEXT_RAW)
TORN = b'{"op":"upsert","id":"torn","item_id":"c","vector":[0.1,0.2'  # a crash mid-append


def test_entries_keep_the_journal_line_format():
    """An upsert and a delete are the JSON lines they always were: the same keys in the same order."""
    upsert = JournalEntry.upsert("x", title="t", category="a/b", price=900, status="sold", sent=("price", "status"),
                                 vector=(0.5, -0.25), image_sha256="ab" * 32)
    assert json.loads(upsert.to_json()) == {
        "op": "upsert", "id": upsert.id, "item_id": "x", "title": "t", "category": "a/b", "price": 900,
        "status": "sold", "sent": ["price", "status"], "vector": [0.5, -0.25], "image_sha256": "ab" * 32,
        "at": upsert.at}
    assert list(json.loads(upsert.to_json())) == ["op", "id", "item_id", "title", "category", "price", "status",
                                                  "sent", "vector", "image_sha256", "at"]
    delete = JournalEntry.delete("x")
    assert delete.to_json() == json.dumps({"op": "delete", "id": delete.id, "item_id": "x", "at": delete.at},
                                          separators=(",", ":"))
    for written in (upsert, delete):
        assert JournalEntry.from_json(written.to_json()) == written
    legacy = {"op": "upsert", "item_id": "x", "at": 1, "category": "a/b", "price": 1, "status": "sold"}
    assert entry(legacy).sent is None and entry(legacy).fields_set == ("category", "price", "status")


@pytest.mark.parametrize("line", [
    b"not json", b"[1, 2]", b'{"op": "delete", "item_id": "x"}', b'{"op": "rename", "item_id": "x", "at": 1.0}',
    b'{"op": "upsert", "item_id": "x", "at": 1.0, "sent": ["price"]}',  # says it set a price it lacks
    b'{"op": "upsert", "item_id": "x", "at": 1.0, "sent": ["price"], "price": "cheap"}',
    b'{"op": "upsert", "item_id": "x", "at": 1.0, "sent": ["status"], "status": 3}',
    b'{"op": "upsert", "item_id": "x", "at": 1.0, "sent": [], "vector": [0.5, "x"]}',
])
def test_a_line_that_is_not_a_usable_entry_is_skipped_and_counted(tmp_path, line):
    with pytest.raises(BadEntry):
        JournalEntry.from_json(line)
    journal = FileJournal(tmp_path / "journal.jsonl")
    journal.path.write_bytes(line + b"\n" + _line(FIRST_RAW))
    assert journal.read_new() == [FIRST] and journal.skipped == 1


def test_append_after_a_torn_tail_cuts_it_off_and_keeps_the_new_entry(tmp_path, caplog):
    """The acknowledged write after a torn line is not glued to it (and so lost) but read, live and on replay."""
    writer = open_journal(str(tmp_path / "state"))
    writer.append(FIRST)
    live = FileJournal(writer.path)
    assert live.read_new() == [FIRST]
    with open(writer.path, "ab") as fh:
        fh.write(TORN)
    assert live.read_new() == []
    with caplog.at_level(logging.WARNING, logger="visrec.online.journal"):
        writer.append(NEXT)
    assert writer.path.read_bytes() == _line(FIRST_RAW) + _line(NEXT_RAW)
    assert f"dropping {len(TORN)} bytes" in caplog.text
    assert live.read_new() == [NEXT]
    assert FileJournal(writer.path).read_new() == [FIRST, NEXT]


@pytest.mark.parametrize("kept, torn", [
    pytest.param(_line(FIRST_RAW), TORN, id="after-a-line"),
    pytest.param(_line(FIRST_RAW) * 3, b"x" * 200_000, id="longer-than-one-tail-scan"),
    pytest.param(b"", TORN, id="nothing-but-the-fragment"),
])
def test_opening_a_journal_repairs_a_torn_tail(tmp_path, caplog, kept, torn):
    path = tmp_path / "journal.jsonl"
    path.write_bytes(kept + torn)
    with caplog.at_level(logging.WARNING, logger="visrec.online.journal"):
        journal = FileJournal(path)
    assert path.read_bytes() == kept
    assert f"dropping {len(torn)} bytes" in caplog.text
    journal.append(NEXT)
    assert FileJournal(path).read_new() == [FIRST] * kept.count(b"\n") + [NEXT]


def test_opening_an_intact_or_missing_journal_changes_nothing(tmp_path, caplog):
    path = tmp_path / "journal.jsonl"
    with caplog.at_level(logging.WARNING, logger="visrec.online.journal"):
        assert FileJournal(path).read_new() == [] and not path.exists()
        path.write_bytes(_line(FIRST_RAW))
        assert FileJournal(path).read_new() == [FIRST]
    assert path.read_bytes() == _line(FIRST_RAW) and not caplog.records


_APPENDER = """
import sys
from pathlib import Path
from dataclasses import replace
from visrec.online.entry import JournalEntry
from visrec.online.journal import FileJournal

path, writer, count = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
journal = FileJournal(path)
pad = writer * 50_000  # far beyond a pipe's atomic write size: only the lock keeps lines whole
for i in range(count):
    entry = JournalEntry("delete", pad, float(i), id=f"{writer}-{i}")
    if i % 4:
        journal.append(entry)
    else:
        journal.append_many([entry, replace(entry, id=f"{writer}-{i}-batch")])
"""


def test_processes_appending_at_once_never_interleave(tmp_path, caplog):
    path = tmp_path / "journal.jsonl"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    writers = [subprocess.Popen([sys.executable, "-c", _APPENDER, str(path), w, "40"], env=env) for w in "abcd"]
    reader, seen = FileJournal(path), []
    with caplog.at_level(logging.ERROR, logger="visrec.online.journal"):
        while any(w.poll() is None for w in writers):  # a reader never sees half an append either
            seen += reader.read_new()
        seen += reader.read_new()
    assert [w.returncode for w in writers] == [0] * 4
    assert not caplog.records
    expected = sorted([f"{w}-{i}" for w in "abcd" for i in range(40)]
                      + [f"{w}-{i}-batch" for w in "abcd" for i in range(0, 40, 4)])
    assert sorted(e.id for e in seen) == expected
    assert [e.id for e in FileJournal(path).read_new()] == [e.id for e in seen]
    assert all(e.item_id == e.id[0] * 50_000 for e in seen)


def test_gcs_journal_sees_every_writer_once_including_late_arrivals(gcs_emulator):
    bucket = gcs_emulator()
    state = f"gs://{bucket}/registry/releases/v1/state"
    writer, other_writer, reader = open_journal(state), open_journal(state), open_journal(state)
    assert isinstance(reader, GcsJournal)
    threads = [threading.Thread(target=w.append, args=(JournalEntry("delete", f"{n}-{i}", i),))
               for n, w in (("a", writer), ("b", other_writer)) for i in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    first = reader.read_new()
    assert sorted(e.item_id for e in first) == sorted(f"{n}-{i}" for n in "ab" for i in range(5))
    assert reader.read_new() == []
    # An upload that finishes late carries an older name than entries already read: still returned.
    late = io.join(state, "journal/00000000000000000001-late.json")
    newest = max(b.name for b in io.gcs_client().bucket(bucket).list_blobs(prefix="registry"))
    folder, name = newest.rsplit("/", 1)
    ten_seconds_older = int(name.split("-")[0]) - 10 * 10**9
    io.write_text(f"gs://{bucket}/{folder}/{ten_seconds_older:020d}-late.json",
                  json.dumps({"op": "delete", "item_id": "late", "at": 0.5}))
    io.write_text(late, "{broken")  # far outside the window, and unreadable: never returned
    assert [e.item_id for e in reader.read_new()] == ["late"]
    assert reader.read_new() == []
    # A new reader (a restarted replica) replays everything readable, oldest first.
    replay = open_journal(state).read_new()
    assert len(replay) == 11 and replay[0].item_id == "late"
    # A hand-over reader lists only what was appended after (a minute before) its snapshot time.
    assert open_journal(state, since=time.time() + 3600).read_new() == []
    assert len(open_journal(state, since=time.time() - 3600).read_new()) == 11
    batch = [JournalEntry("delete", f"c-{i}", 9.0, id=f"batch-{i}") for i in range(20)]
    writer.append_many(batch)
    assert sorted(e.id for e in reader.read_new()) == sorted(e.id for e in batch)


@pytest.mark.parametrize("where", ["local", "gcs"])
def test_kept_images(where, tmp_path, request):
    """What the hand-over to the next release re-embeds from: an upsert's image bytes, by content."""
    from visrec.online.journal import load_image, store_image

    state = (f"gs://{request.getfixturevalue('gcs_emulator')()}/registry/releases/v1/state"
             if where == "gcs" else str(tmp_path / "state"))
    digest = store_image(state, b"\xff\xd8jpeg bytes")
    assert store_image(state, b"\xff\xd8jpeg bytes") == digest and len(digest) == 64
    assert load_image(state, digest) == b"\xff\xd8jpeg bytes"
    with pytest.raises(FileNotFoundError):
        load_image(state, "0" * 64)


@pytest.fixture
def tiny_state(tmp_path):
    """Two serving states over the same small catalog and index, each with its own scripted journal."""
    from visrec.stages.index.searcher import SimilarityIndex
    from visrec.online.ranking import ItemCatalog, label_index_with_catalog
    from visrec.online.state import ServingState

    class Scripted:
        def __init__(self):
            self.pending: list[JournalEntry] = []

        def append(self, entry):
            self.pending.append(entry)

        def read_new(self):
            out, self.pending = self.pending, []
            return out

    def make() -> ServingState:
        rng = np.random.default_rng(0)
        ids = [f"i{n}" for n in range(20)]
        index = SimilarityIndex.build(ids, rng.standard_normal((20, 8)))
        catalog = ItemCatalog.from_columns(ids, [100] * 20, ["a/b"] * 20, ["on_sale"] * 20)
        label_index_with_catalog(index, catalog, ids)
        return ServingState(release=None, index=index, catalog=catalog, encoder_future=None, pca=None,
                            journal=Scripted())

    return make


def test_replicas_reading_entries_in_different_orders_converge(tiny_state):
    from visrec.online.replay import sync_journal

    vec = lambda seed: np.random.default_rng(seed).standard_normal(8).tolist()  # noqa: E731
    entries = [entry(raw) for raw in [
        {"op": "upsert", "item_id": "new", "price": 120, "category": "a/b", "status": "on_sale", "vector": vec(1),
         "at": 1.0},
        {"op": "upsert", "item_id": "new", "price": 120, "category": "a/b", "status": "sold", "vector": None,
         "at": 2.0},  # a status change made on a replica that had seen the first write
        {"op": "delete", "item_id": "i3", "at": 3.0},
        {"op": "upsert", "item_id": "i3", "price": 90, "category": "a/c", "status": "on_sale", "vector": vec(2),
         "at": 2.5},  # older than the delete
        {"op": "upsert", "item_id": "i4", "price": 80, "category": "a/b", "status": "on_sale", "vector": vec(3),
         "at": 4.0},
    ]]
    states = []
    for order in ([0, 1, 2, 3, 4], [4, 3, 1, 2, 0], [1, 2, 0, 4, 3]):
        state = tiny_state()
        for i in order:  # one entry per sync: the worst case for ordering
            state.journal.append(entries[i])
            sync_journal(state)
        states.append(state)
    for state in states:
        assert state.catalog.get("new") == {"price": 120, "category": "a/b", "status": "sold"}
        assert "new" in state.index  # its vector arrived even when the status change came first
        assert state.catalog.get("i3") is None and "i3" not in state.index
        assert state.catalog.get("i4")["price"] == 80
        np.testing.assert_allclose(state.index.vector("i4"), states[0].index.vector("i4"))
        assert sorted(state.index.ids()) == sorted(states[0].index.ids())


def test_gcs_polls_list_only_the_folders_after_their_horizon(gcs_emulator):
    """Objects go to a folder per `BUCKET_SECONDS` of write time, so a poll lists the newest
    folders only: its work does not grow with the journal's history, even on a store (the
    emulator) that ignores startOffset. A reader opened at a position starts there."""
    from visrec.online.journal import BUCKET_SECONDS, JournalPosition

    state = f"gs://{gcs_emulator()}/registry/releases/v1/state"
    prefix = io.join(state, "journal")
    now = time.time_ns()
    clock = iter([])

    def writer(history_ns: list[int]) -> GcsJournal:
        nonlocal clock
        clock = iter(history_ns)
        return GcsJournal(prefix, clock=lambda: next(clock))

    # A day of history, 5 writes every folder (one of them a batch), then "now".
    folder_ns = BUCKET_SECONDS * 10**9
    starts = [now - (144 - n) * folder_ns for n in range(144)]
    history = writer([start + k * 10**9 for start in starts for k in range(5)])
    for n, _ in enumerate(starts):
        history.append(JournalEntry("delete", f"old-{n}", float(n), id=f"old-{n}"))
        history.append_many([JournalEntry("delete", f"old-{n}-{k}", float(n), id=f"old-{n}-{k}") for k in range(3)])
        for k in range(3):
            history.append(JournalEntry("delete", f"older-{n}-{k}", float(n)))
    reader = open_journal(state)
    assert len(reader.read_new()) == 144 * 7
    before = dataclasses.replace(reader.stats)
    writer([now + 10**9]).append(JournalEntry("delete", "new", 200.0))
    assert [e.item_id for e in reader.read_new()] == ["new"]
    polled = reader.stats.listed - before.listed
    # The journal's 145 folder names, then the objects of the folders from the horizon's (a minute
    # before the newest write seen: at most two folders of history) to the newest.
    assert polled <= 145 + 2 * 5 + 1 and reader.stats.list_requests - before.list_requests <= 4
    assert reader.stats.objects_read - before.objects_read == 1
    # A reader opened at that reader's position reads what came after, nothing twice.
    writer([now + 2 * 10**9]).append(JournalEntry("delete", "newer", 201.0))
    at = reader.position()
    assert isinstance(at, JournalPosition) and at.seen
    assert [e.item_id for e in open_journal(state, position=at).read_new()] == ["newer"]


def test_gcs_objects_of_the_layout_before_folders_are_still_read(gcs_emulator):
    """A journal written before folders existed (objects directly under `journal/`) is read,
    alongside and in write order with the new layout, at start-up and when they keep coming."""
    state = f"gs://{gcs_emulator()}/registry/releases/v1/state"
    now = time.time_ns()
    io.write_text(io.join(state, f"journal/{now - 5 * 10**9:020d}-a.json"), JournalEntry("delete", "a", 1.0).to_json())
    io.write_text(io.join(state, f"journal/{now - 4 * 10**9:020d}-b.jsonl"),
                  JournalEntry("delete", "b", 2.0).to_json() + "\n" + JournalEntry("delete", "c", 3.0).to_json() + "\n")
    reader = open_journal(state)
    open_journal(state).append(JournalEntry("delete", "d", 4.0))
    assert [e.item_id for e in reader.read_new()] == ["a", "b", "c", "d"]
    io.write_text(io.join(state, f"journal/{time.time_ns():020d}-e.json"), JournalEntry("delete", "e", 5.0).to_json())
    assert [e.item_id for e in reader.read_new()] == ["e"]


def test_a_local_follower_from_a_time_starts_at_the_checkpoint_before_it(tmp_path):
    """Compactions checkpoint the local journal (offset, time): a hand-over following it from a
    later time skips what was appended before, and never an entry appended after."""
    state = tmp_path / "state"
    journal = open_journal(str(state))
    journal.append_many([JournalEntry("delete", f"early-{n}", float(n)) for n in range(5)])
    journal.read_new()
    journal.checkpoint()
    checkpointed = journal.path.stat().st_size
    time.sleep(0.01)
    since = time.time() + LATE_WINDOW
    journal.append(JournalEntry("delete", "late", since + 1))
    follower = open_journal(str(state), since=since)
    assert follower.position().offset == checkpointed
    assert [e.item_id for e in follower.read_new()] == ["late"]
    assert len(open_journal(str(state), since=since - 2 * LATE_WINDOW).read_new()) == 6  # before the checkpoint
    # A checkpoint that no longer fits the file (the journal was replaced) is ignored.
    journal.path.write_bytes(_line(FIRST_RAW))
    assert open_journal(str(state), since=since).read_new() == [FIRST]

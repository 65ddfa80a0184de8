"""Serving journal benchmark: start-up time and the work of one poll, before and after compaction.

A release of `--items` items (128-d vectors, the tree-AH index `visrec build-index` builds)
takes `--writes` journal writes in a marketplace's mix, spread over a week of write time:

- 65% price changes and 25% status changes (sold / reserved / on sale again) of live items,
  each an entry that sets that one field, as `PUT {"price": ...}` writes it;
- 5% new listings: every field and a 128-d vector (as an image upsert journals it);
- 5% deletes of live items.

The journal is written with the library (`FileJournal.append_many` in batches of 10,000),
which is what makes a million writes quick to set up. Start-up is `open_release` (the release
files the service reads checked against `release.json`, as `load_state` does: the index and the
catalog only when no snapshot replaces them; this release has only those, a real one also
embeddings and the model) and then `open_state` (the release's index and catalog, checked
then, or the newest snapshot) and `sync_journal` (the journal after it,
replayed): `load_state` but for the encoder, PCA and hand-over, which cost the same with any
journal. Measured:
no writes; every write uncompacted (a whole replay); compacted (`compact_journal`, timed
too) with an empty tail; compacted with a tail of `--tail` writes (the in-service
compaction threshold, `CompactionConfig.tail_entries`: what a start-up replays at worst);
and one poll (`sync_journal` after 10 new writes) at each stage. The start-ups compared take
turns (`--repeats` rounds, the median of each), so each sees the same load of a shared machine.

On the GCS emulator (`gcp-storage-emulator`, slow: an upload takes tens of ms) the same mix
is smaller: `--gcs-items` items and `--gcs-objects` journal objects of `--gcs-segment`
entries (the batches `visrec ingest` and hand-overs write), spread over a day of write time
(144 folders of `BUCKET_SECONDS`). One poll's objects listed and read is measured as the
history grows (a third, two thirds, all of it), and once more on the same objects written
in the layout before folders, which the emulator (it ignores startOffset) lists whole on
every poll.

    python bench/journal.py                                  # 1,000,000 local writes, 100k items
    python bench/journal.py --writes 100000 --items 20000 --skip-gcs    # quick
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchkit import RESULTS_DIR, machine_info, print_table, write_results  # noqa: E402
from visrec.core import io  # noqa: E402
from visrec.core.servers import free_port, stop_process, wait_for_port  # noqa: E402
from visrec.online.compaction import compact_journal  # noqa: E402
from visrec.online.config import CompactionConfig  # noqa: E402
from visrec.online.entry import METADATA_FIELDS, JournalEntry, new_entry_id  # noqa: E402
from visrec.online.journal import BUCKET_SECONDS, JOURNAL_PREFIX, GcsJournal, open_journal  # noqa: E402
from visrec.online.loading import not_read_by_the_service, open_state  # noqa: E402
from visrec.online.replay import sync_journal  # noqa: E402
from visrec.stages.release.release import Release, open_release  # noqa: E402

log = logging.getLogger("bench.journal")
DIMS = 128
CATEGORIES = [f"{a}/{b}/{c}" for a in ("fashion", "home", "toys", "books") for b in ("x", "y", "z") for c in "pqrs"]
STATUSES = ("on_sale", "sold", "reserved")
WEEK = 7 * 24 * 3600.0
DAY = 24 * 3600.0


def build_release(root: Path, items: int, registry: str | None = None) -> Release:
    """A release directory of `items` items: the index (`IndexConfig` defaults), `items.parquet`
    and a `release.json` with their checksums. `registry`: a `gs://` registry, so the release's
    state lives there (as on Vertex AI)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from visrec.core.checksums import checksum_files
    from visrec.stages.index.config import IndexConfig
    from visrec.stages.index.searcher import SimilarityIndex
    from visrec.stages.release.release import MANIFEST

    rng = np.random.default_rng(0)
    ids = [f"item-{n:07d}" for n in range(items)]
    SimilarityIndex.build(ids, rng.standard_normal((items, DIMS)).astype(np.float32), IndexConfig()).save(
        str(root / "index"))
    pq.write_table(pa.table({"item_id": ids, "price": rng.integers(300, 50_000, items),
                             "category": [CATEGORIES[n % len(CATEGORIES)] for n in range(items)],
                             "status": [STATUSES[0]] * items}), root / "items.parquet")
    io.write_json(str(root / MANIFEST), {"version": root.name, "files": checksum_files(root)})
    (root / "state").mkdir()
    return Release(version=root.name, path=root, manifest={}, source=str(root), registry=registry)


def mix(count: int, items: int, start: float, span: float, seed: int = 0) -> Iterator[JournalEntry]:
    """`count` writes of the mix in the module docstring, in write order over [start, start + span)."""
    rng, vectors = random.Random(seed), np.random.default_rng(seed)
    live = [f"item-{n:07d}" for n in range(items)]
    new = 0
    for n in range(count):
        at, r = start + span * n / count, rng.random()
        if r < 0.05:
            item, new = f"new-{seed}-{new:07d}", new + 1
            live.append(item)
            yield JournalEntry("upsert", item, at, new_entry_id(), f"listing {item}", rng.choice(CATEGORIES),
                               rng.randrange(300, 50_000), STATUSES[0], METADATA_FIELDS,
                               tuple(vectors.standard_normal(DIMS).astype(np.float32).tolist()), f"{n:064x}")
        elif r < 0.10:
            slot = rng.randrange(len(live))
            item, live[slot] = live[slot], live[-1]
            live.pop()
            yield JournalEntry("delete", item, at, new_entry_id())
        elif r < 0.35:
            yield JournalEntry("upsert", rng.choice(live), at, new_entry_id(), None, None, None, rng.choice(STATUSES),
                               ("status",), None, None)
        else:
            yield JournalEntry("upsert", rng.choice(live), at, new_entry_id(), None, None, rng.randrange(300, 50_000),
                               None, ("price",), None, None)


def start(release: Release):
    """What a serving start-up does that depends on the journal: the verified release, its state."""
    # The release files, whichever registry holds the state; those a snapshot replaces are checked
    # by `open_state` if it reads them.
    verified = open_release(str(release.path), defer=not_read_by_the_service)
    state = open_state(dataclasses.replace(verified, version=release.version, registry=release.registry))
    sync_journal(state)
    return state


def timed_start(release: Release, repeats: int) -> dict:
    """`start` `repeats` times (after one not timed, so imports and the page cache are warm): the
    median seconds, and the last state with what it started from."""
    start(release).close()
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        state = start(release)
        seconds.append(time.perf_counter() - started)
        state.close()
    return {"seconds": statistics.median(seconds), "runs": len(seconds), "snapshot": state.snapshot is not None,
            "replayed": state.tail_entries, "items": len(state.catalog), "indexed": len(state.index), "state": state}


def poll_work(state, append, new: int = 10) -> dict:
    """One poll (`sync_journal`) after `new` writes: its seconds and what it cost the journal reader."""
    append([JournalEntry("delete", f"poll-{time.time_ns()}-{n}", time.time(), new_entry_id()) for n in range(new)])
    before = dict(vars(state.journal.stats))
    started = time.perf_counter()
    applied = sync_journal(state)
    seconds = time.perf_counter() - started
    after = vars(state.journal.stats)
    return {"seconds": seconds, "applied": applied, **{k: after[k] - before[k] for k in after}}


def folder_bytes(uri: str) -> int:
    return sum(v.size for v in io.file_versions(uri))


def linked_copy(release: Release, to: Path, state: bool = False) -> Release:
    """Another release directory with the same files (hard links) and its own state directory:
    empty, or (`state`) a copy of `release`'s."""
    for path in release.path.rglob("*"):
        relative = path.relative_to(release.path)
        if path.is_file() and relative.parts[0] != "state":
            (to / relative).parent.mkdir(parents=True, exist_ok=True)
            os.link(path, to / relative)
    if state:
        shutil.copytree(release.path / "state", to / "state")
    else:
        (to / "state").mkdir()
    return dataclasses.replace(release, version=to.name, path=to, source=str(to))


def run_local(args: argparse.Namespace, work: Path) -> list[dict]:
    started = time.perf_counter()
    empty = build_release(work / "empty", args.items)
    log.info("release of %d items built in %.1fs", args.items, time.perf_counter() - started)
    full = linked_copy(empty, work / "full")
    journal = open_journal(full.state_uri)
    started = time.perf_counter()
    batch: list[JournalEntry] = []
    for entry in mix(args.writes, args.items, time.time() - WEEK, WEEK):
        batch.append(entry)
        if len(batch) == 10_000:
            journal.append_many(batch)
            batch = []
    journal.append_many(batch)
    log.info("%d writes journaled in %.1fs (%.0f MB)", args.writes, time.perf_counter() - started,
             journal.path.stat().st_size / 1e6)
    uncompacted = timed_start(full, 1)
    polls = {"uncompacted": poll_work(uncompacted["state"], journal.append_many)}
    compaction = compact_journal(full, CompactionConfig())
    log.info("compaction: %s", compaction)
    tailed = linked_copy(full, work / "tailed", state=True)
    open_journal(tailed.state_uri).append_many(list(mix(args.tail, args.items, time.time() - 60, 60, seed=1)))
    # The three start-ups to compare take turns, so each sees the same load of a shared machine.
    stages = [("no writes", empty, 0), ("compacted, no tail", full, args.writes),
              (f"compacted, tail {args.tail}", tailed, args.writes + args.tail)]
    timings: dict[str, list[dict]] = {name: [] for name, _, _ in stages}
    for _ in range(args.repeats):
        for name, release, _ in stages:
            timings[name].append(timed_start(release, 1))
    timings["uncompacted"] = [uncompacted]
    rows = []
    for name, release, writes in [stages[0], ("uncompacted", full, args.writes), *stages[1:]]:
        runs = timings[name]
        last = runs[-1]
        poll = polls.get(name) or poll_work(last["state"], open_journal(release.state_uri).append_many)
        row = {"store": "local file", "stage": name, "writes": writes,
               "startup_seconds": statistics.median(r["seconds"] for r in runs), "runs": len(runs),
               **{k: last[k] for k in ("snapshot", "replayed", "items", "indexed")},
               "journal_bytes": Path(release.state_uri, "journal.jsonl").stat().st_size,
               **{f"poll_{k}": v for k, v in poll.items() if k != "applied"}}
        if name == "compacted, no tail":
            row.update(compaction_seconds=compaction.seconds,
                       snapshot_bytes=folder_bytes(io.join(release.state_uri, "snapshots")))
        log.info("%s", row)
        rows.append(row)
    return rows


def start_emulator() -> subprocess.Popen:
    """`gcp-storage-emulator` on a free port, in memory; `STORAGE_EMULATOR_HOST` points at it."""
    port = free_port()
    proc = subprocess.Popen([str(Path(sys.executable).with_name("gcp-storage-emulator")), "start",
                             "--host=127.0.0.1", f"--port={port}", "--in-memory"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_port(port, proc=proc)
    os.environ["STORAGE_EMULATOR_HOST"] = f"http://127.0.0.1:{port}"
    io.gcs_client.cache_clear()
    return proc


def write_history(prefix: str, segments: list[list[JournalEntry]], written_ns: list[int],
                  legacy: bool = False) -> None:
    """One journal object per segment, named by its write time (`legacy`: directly under the
    prefix, as before folders), uploaded concurrently."""
    def upload(job: tuple[list[JournalEntry], int]) -> None:
        segment, ns = job
        if legacy:
            io.write_text(f"{prefix.rstrip('/')}/{ns:020d}-{new_entry_id()}.jsonl",
                          "".join(e.to_json() + "\n" for e in segment))
        else:
            GcsJournal(prefix, clock=lambda: ns).append_many(segment)

    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(upload, zip(segments, written_ns)))


def run_gcs(args: argparse.Namespace, work: Path) -> list[dict]:
    proc = start_emulator()
    try:
        io.gcs_client().create_bucket("bench-journal")
        registry = "gs://bench-journal/registry"
        release = build_release(work / "gcs", args.gcs_items, registry=registry)
        prefix = io.join(release.state_uri, JOURNAL_PREFIX)
        journal = open_journal(release.state_uri)
        entries = list(mix(args.gcs_objects * args.gcs_segment, args.gcs_items, time.time() - DAY, DAY))
        segments = [entries[n:n + args.gcs_segment] for n in range(0, len(entries), args.gcs_segment)]
        now = time.time_ns()
        written_ns = [now - int(DAY * 1e9) + int(n * DAY * 1e9 / len(segments)) for n in range(len(segments))]
        rows = []
        writes_so_far = 0

        def stage(name: str, repeats: int, of: Release = release) -> dict:
            start = timed_start(of, repeats)
            state = start.pop("state")
            poll = poll_work(state, journal.append_many)
            row = {"store": "GCS emulator", "stage": name, "writes": writes_so_far,
                   "startup_seconds": start["seconds"],
                   **{k: start[k] for k in ("runs", "snapshot", "replayed", "items", "indexed")},
                   **{f"poll_{k}": v for k, v in poll.items() if k != "applied"}}
            log.info("%s", row)
            rows.append(row)
            return row

        stage("no writes", args.repeats)
        thirds = [len(segments) // 3, 2 * len(segments) // 3, len(segments)]
        done = 0
        for part, upto in enumerate(thirds):
            started = time.perf_counter()
            write_history(prefix, segments[done:upto], written_ns[done:upto])
            log.info("%d journal objects uploaded in %.1fs", upto - done, time.perf_counter() - started)
            done = upto
            writes_so_far = upto * args.gcs_segment + 10 * (part + 1)
            stage(f"uncompacted, {part + 1}/3 of the history", 1)
        compaction = compact_journal(release, CompactionConfig())
        writes_so_far += 10
        row = stage("compacted, no tail", args.repeats)
        row["compaction_seconds"] = compaction.seconds
        row["snapshot_bytes"] = folder_bytes(io.join(release.state_uri, "snapshots"))
        # The same history in the layout before folders, read by today's reader: every poll lists it all.
        legacy = Release(version="legacy", path=release.path, manifest={}, source=str(release.path),
                         registry="gs://bench-journal/legacy-registry")
        started = time.perf_counter()
        write_history(io.join(legacy.state_uri, JOURNAL_PREFIX), segments, written_ns, legacy=True)
        log.info("%d journal objects uploaded in the layout before folders in %.1fs", len(segments),
                 time.perf_counter() - started)
        journal = open_journal(legacy.state_uri)
        writes_so_far = len(entries)
        stage("layout before folders, uncompacted", 1, of=legacy)
        return rows
    finally:
        stop_process(proc, grace=10)
        os.environ.pop("STORAGE_EMULATOR_HOST", None)
        io.gcs_client.cache_clear()


COLUMNS = [("store", "store", "<13"), ("stage", "stage", "<36"), ("writes", "writes", ">9,"),
           ("start-up s", "startup_seconds", ">10.2f"), ("replayed", "replayed", ">9,"),
           ("items", "items", ">8,"), ("poll ms", lambda r: r["poll_seconds"] * 1e3, ">8.1f"),
           ("poll lists", "poll_list_requests", ">10"), ("folders listed", "poll_folders_listed", ">14,"),
           ("objects listed", "poll_listed", ">14,"), ("objects read", "poll_objects_read", ">12,"),
           ("bytes read", "poll_bytes_read", ">10,")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=100_000, help="release items, local (default: 100000)")
    parser.add_argument("--writes", type=int, default=1_000_000, help="journal writes, local (default: 1000000)")
    parser.add_argument("--tail", type=int, default=CompactionConfig().tail_entries,
                        help="writes after the snapshot in the last stage (default: the in-service threshold)")
    parser.add_argument("--gcs-items", type=int, default=10_000, help="release items on GCS (default: 10000)")
    parser.add_argument("--gcs-objects", type=int, default=1200, help="journal objects on GCS (default: 1200)")
    parser.add_argument("--gcs-segment", type=int, default=50, help="entries per GCS object (default: 50)")
    parser.add_argument("--repeats", type=int, default=3, help="start-ups per stage, median (default: 3)")
    parser.add_argument("--skip-gcs", action="store_true", help="local file journal only")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "journal.json", help="results JSON")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for noisy in ("visrec.stages.index", "visrec.online.snapshot", "visrec.online.replay", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.ERROR)

    work = Path(tempfile.mkdtemp(prefix="visrec-bench-journal-"))
    try:
        rows = run_local(args, work)
        if not args.skip_gcs:
            rows += run_gcs(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print()
    print_table(rows, COLUMNS)
    local = {r["stage"]: r for r in rows if r["store"] == "local file"}
    base = local["no writes"]["startup_seconds"]
    ratios = {stage: r["startup_seconds"] / base for stage, r in local.items()}
    print("\nlocal start-up vs no writes: " + ", ".join(f"{stage} {ratio:.2f}x" for stage, ratio in ratios.items()))
    write_results(args.out, {
        "machine": machine_info(), "command": " ".join(["python", "bench/journal.py", *sys.argv[1:]]),
        "mix": {"price": 0.65, "status": 0.25, "new_listing_128d": 0.05, "delete": 0.05},
        "bucket_seconds": BUCKET_SECONDS,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "rows": rows, "local_startup_vs_no_writes": ratios})


if __name__ == "__main__":
    main()

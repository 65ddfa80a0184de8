"""Where a serving process's memory goes, step by step, per million items.

    python bench/memory.py [--items 1000000] [--workdir /tmp/visrec-bench-serve] [--release DIR]

Loads a release the way `visrec serve` does (`visrec.online.loading`: the index, the
catalog, the labels, torch and the encoder), one step at a time in this one process, and
records the resident memory after each: anonymous (`RssAnon`: heap, numpy arrays, ScaNN)
and file-backed (`RssFile`: shared libraries, memory-mapped files). ScaNN's own
share is the load's growth minus what the index object reports holding itself
(`SimilarityIndex.memory_bytes`). The release is `bench/serve.py`'s synthetic one (built or
reused in `--workdir`), or any release directory (`--release`). Prints a table and writes
`bench/results/memory.json`.
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path

import numpy as np
from benchkit import RESULTS_DIR, machine_info, print_table, write_results

from visrec.stages.index.config import REORDER_DTYPES

RESULTS = RESULTS_DIR / "memory.json"


def resident_mb() -> dict[str, float]:
    """This process's resident memory in MiB: total, anonymous, file-backed."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "RssAnon", "RssFile"):
            fields[name] = int(value.split()[0]) / 1024
    return {"rss": fields["VmRSS"], "anon": fields["RssAnon"], "file": fields["RssFile"]}


class Steps:
    """Resident memory after each step, as deltas from the step before."""

    def __init__(self) -> None:
        self.rows: list[dict] = []
        self.last = resident_mb()

    def record(self, name: str, seconds: float, held_bytes: int | None = None) -> None:
        gc.collect()
        now = resident_mb()
        row = {"step": name, "seconds": round(seconds, 2),
               "anon_mb": round(now["anon"] - self.last["anon"], 1), "file_mb": round(now["file"] - self.last["file"], 1),
               "rss_mb": round(now["rss"], 1),
               "held_mb": None if held_bytes is None else round(held_bytes / 2**20, 1)}
        self.rows.append(row)
        self.last = now
        print(f"{name:<44} anon {row['anon_mb']:>8.1f} MB  file {row['file_mb']:>7.1f} MB  rss {row['rss_mb']:>8.1f} MB",
              flush=True)


def measure(release_dir: Path, lookups: int) -> dict:
    steps = Steps()
    steps.record("python + visrec", 0.0)
    started = time.monotonic()
    import fastapi  # noqa: F401 - what the server imports before loading a release
    import pyarrow.parquet  # noqa: F401
    import uvicorn  # noqa: F401
    from scann.scann_ops.py import scann_ops_pybind  # noqa: F401

    from visrec.online.loading import read_catalog
    from visrec.online.ranking import label_index_with_catalog
    from visrec.stages.index.searcher import SimilarityIndex
    steps.record("numpy, pyarrow, fastapi, uvicorn, scann", time.monotonic() - started)

    started = time.monotonic()
    index = SimilarityIndex.load(str(release_dir / "index"), verified=True)
    held = index.memory_bytes()
    steps.record("index: ScaNN + ids + key maps + labels", time.monotonic() - started,
                 held["ids"] + held["positions_and_keys"] + held["labels"] + held["vectors_in_memory"])
    started = time.monotonic()
    catalog = read_catalog(str(release_dir / "items.parquet"))
    steps.record("catalog (items.parquet)", time.monotonic() - started, sum(catalog.memory_bytes().values()))
    started = time.monotonic()
    label_index_with_catalog(index, catalog, index.ids())
    steps.record("labels = catalog rows", time.monotonic() - started)

    rng = np.random.default_rng(0)
    ids = index.ids()
    queries = [ids[int(i)] for i in rng.integers(0, len(index), lookups)]
    started = time.monotonic()
    for item_id in queries:
        index.search_labels(index.vector(item_id), 200)
    steps.record(f"{lookups} look-ups + searches (pages in)", time.monotonic() - started)

    started = time.monotonic()
    import torch  # noqa: F401
    steps.record("import torch", time.monotonic() - started)
    manifest = json.loads((release_dir / "release.json").read_text())
    if (release_dir / "model").is_dir():
        from visrec.model.encoders import load_image_encoder

        started = time.monotonic()
        encoder = load_image_encoder(str(release_dir / "model"), kind=manifest.get("encoder_kind", "siglip"))
        steps.record("image encoder", time.monotonic() - started)
        del encoder
    return {"items": len(index), "index_format": index.info.get("format"), "params": index.params,
            "index_holds": held, "catalog_holds": catalog.memory_bytes(), "steps": steps.rows,
            "final": resident_mb()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=1_000_000, help="synthetic release size (bench/serve.py's)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/visrec-bench-serve"))
    parser.add_argument("--reorder-dtype", choices=REORDER_DTYPES, help="the synthetic release's index (bench/serve.py's)")
    parser.add_argument("--release", type=Path, help="a release directory instead of the synthetic one")
    parser.add_argument("--lookups", type=int, default=2000, help="item look-ups + searches after loading")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.release is None:
        from serve import build_release

        args.release = build_release(args.workdir, args.items, args.reorder_dtype) / "releases" / "bench"
    result = measure(args.release, args.lookups)
    per_million = 1e6 / result["items"]
    for row in result["steps"]:
        row["anon_bytes_per_item"] = round(row["anon_mb"] * 2**20 / result["items"], 1)
    rows = result["steps"]
    print(f"\n{result['items']:,} items, release {args.release}")
    print_table(rows, [("step", "step", "<44"), ("anon MB", "anon_mb", ">9.1f"), ("file MB", "file_mb", ">8.1f"),
                       ("anon B/item", "anon_bytes_per_item", ">11.1f"), ("seconds", "seconds", ">8.2f"),
                       ("RSS MB", "rss_mb", ">8.1f")])
    final = result["final"]
    print(f"total RSS {final['rss']:.0f} MB (anonymous {final['anon']:.0f}, file-backed {final['file']:.0f}) "
          f"= {final['rss'] * per_million:.0f} MB per million items")
    write_results(args.out, {"machine": machine_info(), "release": str(args.release), **result})


if __name__ == "__main__":
    main()

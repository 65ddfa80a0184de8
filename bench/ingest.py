"""Ingest benchmark: listing events/s through `visrec ingest`, and event written -> recommendable.

A release is built by the serving tests' `build_release` (a tiny generated catalog through
`deploy_release`). Throughput: one poll of `run_ingest` over a file of `--events` new listings
(their JPEGs beside it), wall time from the start of the run (Beam pipeline, encoder load,
RunInference, PCA, journal segments) to its end, against a bare loop over the same images in the
same batches (decode, preprocessing, forward, PCA). Latency: a `visrec ingest` process watches a
prefix; each round drops a file of `--latency-events` listings and times until a
`RecommenderService` following the release's journal has them all in its index.

    python bench/ingest.py                        # ViT-S/16-sized SigLIP at 224 px
    python bench/ingest.py --model-size tiny      # the tests' tiny model: quick
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from benchkit import RESULTS_DIR, machine_info, print_table, write_results  # noqa: E402
from handover import SIZES  # noqa: E402
from test_serving import CATEGORIES, COLOURS, build_release, jpeg  # noqa: E402
from visrec.data.images import decode_image  # noqa: E402
from visrec.model.encode import encode_images  # noqa: E402
from visrec.model.encoders import init_models  # noqa: E402
from visrec.online.ingest import run_ingest  # noqa: E402
from visrec.online.ingest_config import IngestConfig  # noqa: E402
from visrec.online.service import RecommenderService  # noqa: E402

log = logging.getLogger("bench.ingest")


def write_events(folder: Path, name: str, ids: list[str], at: float) -> list[bytes]:
    """A `name`.jsonl of listing events for `ids`, their JPEGs under `folder/images/`; returns the JPEGs."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    images, lines = [], []
    for i, item_id in enumerate(ids):
        data = jpeg(COLOURS[i % len(COLOURS)], i % 7)
        path = folder / "images" / f"{item_id}.jpg"
        path.write_bytes(data)
        images.append(data)
        lines.append(json.dumps({"type": "listing", "item_id": item_id, "title": f"new {item_id}",
                                 "category": CATEGORIES[i % len(CATEGORIES)], "price": 1000 + i,
                                 "status": "on_sale", "image_uri": str(path), "event_time": at + i}))
    tmp = folder / f".{name}.tmp"
    tmp.write_text("\n".join(lines) + "\n")
    tmp.rename(folder / f"{name}.jsonl")  # appear whole: the watcher lists *.jsonl
    return images


def throughput(args: argparse.Namespace, registry: Path, work: Path) -> dict:
    ids = [f"bulk-{i:05d}" for i in range(args.events)]
    images = write_events(work / "bulk", "events", ids, time.time())
    started = time.perf_counter()
    run_ingest(IngestConfig(release=str(registry), source=str(work / "bulk"), max_polls=1, poll_seconds=0.1,
                            batch_size=args.batch_size, device="cpu"))
    ingest_seconds = time.perf_counter() - started
    service = RecommenderService(str(registry))
    service.start()
    missing = [i for i in ids if i not in service.state.index]
    assert not missing, f"{len(missing)} ingested listings are not served"
    encoder, pca = service.state.encoder(), service.state.pca
    started = time.perf_counter()
    for start in range(0, len(images), args.batch_size):
        encode_images(encoder, [decode_image(d) for d in images[start:start + args.batch_size]], pca)
    bare_seconds = time.perf_counter() - started
    return {"events": args.events, "ingest_seconds": ingest_seconds,
            "ingest_events_per_second": args.events / ingest_seconds,
            "bare_images_per_second": args.events / bare_seconds,
            "ingest_vs_bare": (args.events / ingest_seconds) / (args.events / bare_seconds)}


def latency(args: argparse.Namespace, registry: Path, work: Path) -> dict:
    watched = work / "watched"
    watched.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "visrec", "ingest", "--release", str(registry),
                             "--source", str(watched), "--poll-seconds", str(args.poll_seconds),
                             "--device", "cpu"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    service = RecommenderService(str(registry))
    service.start()
    seconds = []
    try:
        for round_ in range(args.rounds):
            ids = [f"live-{round_}-{i}" for i in range(args.latency_events)]
            written = time.perf_counter()
            write_events(watched, f"round-{round_}", ids, time.time())
            deadline = written + 600
            while not all(i in service.state.index for i in ids):
                if proc.poll() is not None or time.perf_counter() > deadline:
                    raise RuntimeError(f"round {round_}: listings not served (ingest exit {proc.returncode})")
                service.sync_journal()
                time.sleep(0.05)
            seconds.append(time.perf_counter() - written)
            log.info("round %d: %d listings recommendable after %.2f s", round_, len(ids), seconds[-1])
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    ordered = sorted(seconds)
    return {"latency_rounds": args.rounds, "latency_events": args.latency_events,
            "poll_seconds": args.poll_seconds, "latency_p50_seconds": ordered[len(ordered) // 2],
            "latency_max_seconds": ordered[-1], "latency_seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=500, help="catalog size of the release (default: 500)")
    parser.add_argument("--events", type=int, default=512, help="listing events of the throughput run (default: 512)")
    parser.add_argument("--batch-size", type=int, default=IngestConfig.batch_size,
                        help="images per encoder call, in both loops (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=5, help="latency rounds (default: 5)")
    parser.add_argument("--latency-events", type=int, default=4, help="listings per latency round (default: 4)")
    parser.add_argument("--poll-seconds", type=float, default=IngestConfig.poll_seconds,
                        help="the watcher's poll interval (default: %(default)s)")
    parser.add_argument("--model-size", choices=sorted(SIZES), default="small", help="SigLIP size (default: small)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "ingest.json", help="results JSON")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for noisy in ("visrec.online", "visrec.stages", "apache_beam"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    work = Path(tempfile.mkdtemp(prefix="visrec-bench-ingest-"))
    try:
        init_models(work / "models", config=SIZES[args.model_size])
        registry = work / "registry"
        build_release(work / "models", registry, "v1", n_items=args.items)
        result = {**throughput(args, registry, work), **latency(args, registry, work)}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print()
    print_table([result], [
        ("events", "events", ">7d"), ("ingest s", "ingest_seconds", ">9.1f"),
        ("events/s", "ingest_events_per_second", ">9.1f"), ("bare img/s", "bare_images_per_second", ">11.1f"),
        ("ratio", "ingest_vs_bare", ">6.2f"), ("latency p50 s", "latency_p50_seconds", ">14.2f"),
        ("max s", "latency_max_seconds", ">6.2f")])
    write_results(args.out, {"machine": machine_info(), "model_size": args.model_size, **result})


if __name__ == "__main__":
    main()

"""Serving hand-over benchmark: how long after a reload the new release has today's catalog.

A registry holds v1 (served) and then v2, built from a retrained encoder (the image
tower's weights moved), whose catalog snapshot is taken before a burst of writes to
v1: `--metadata-writes` status and price changes and `--new-listings` image upserts.
`POST /admin/reload`'s work (`RecommenderService.reload`) is timed, and then the
background re-embedding until the last new listing is recommendable. The
re-embedding rate is compared with a bare loop over the same images in the same
batches (decode, the encoder's preprocessing, forward, PCA): the ratio is the
hand-over's own cost (read the kept image, keep it in v2's state, append the journal
entries, and share the CPU with the service's journal tail). A restart on v2,
which finds everything carried, is timed as well.

The releases are built by the serving tests' `build_release` (tiny generated
catalogs through `deploy_release`), so this script imports it from `tests/`.

    python bench/handover.py                         # ViT-S/16-sized SigLIP at 224 px
    python bench/handover.py --model-size tiny       # the tests' tiny model: quick
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import logging
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from benchkit import RESULTS_DIR, machine_info, print_table, write_results  # noqa: E402
from test_serving import CATEGORIES, COLOURS, build_release, jpeg  # noqa: E402
from visrec.data.images import decode_image  # noqa: E402
from visrec.model.encode import encode_images  # noqa: E402
from visrec.model.encoders import TinyModelConfig, init_models, load_siglip  # noqa: E402
from visrec.online.handover import REEMBED_BATCH_SIZE  # noqa: E402
from visrec.online.service import RecommenderService  # noqa: E402

log = logging.getLogger("bench.handover")
SIZES = {"tiny": TinyModelConfig(),
         "small": TinyModelConfig(hidden_size=384, num_layers=6, num_heads=6, intermediate_size=1536,
                                  image_size=224)}


def retrained_copy(models: Path, out: Path) -> Path:
    """`models` with the SigLIP image tower's weights moved a little: a different encoder."""
    import torch

    model, processor = load_siglip(str(models / "siglip"))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.vision_model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    model.save_pretrained(out / "siglip")
    processor.save_pretrained(out / "siglip")
    return out


def run(args: argparse.Namespace, work: Path) -> dict:
    init_models(work / "models", config=SIZES[args.model_size])
    retrained_copy(work / "models", work / "retrained")
    registry = work / "registry"
    build_release(work / "models", registry, "v1", n_items=args.items)
    service = RecommenderService(str(registry))
    service.start()
    service.state.encoder()
    rng = random.Random(0)
    snapshot = time.time()

    started = time.perf_counter()
    for i in range(args.metadata_writes):
        item = f"item-{rng.randrange(args.items):04d}"
        service.upsert(item, {"status": "sold"} if i % 2 else {"price": 1000 + rng.randrange(500)})
    metadata_seconds = time.perf_counter() - started
    images = [jpeg(COLOURS[i % len(COLOURS)], i % 7) for i in range(args.new_listings)]
    started = time.perf_counter()
    for i, data in enumerate(images):
        service.upsert(f"new-{i}", {"title": f"new {i}", "category": CATEGORIES[i % len(CATEGORIES)],
                                    "price": 1000 + i, "image": base64.b64encode(data).decode()})
    upsert_seconds = time.perf_counter() - started
    log.info("v1 took %d metadata writes (%.0f/s) and %d image upserts (%.1f/s)", args.metadata_writes,
             args.metadata_writes / metadata_seconds, args.new_listings, args.new_listings / upsert_seconds)

    build_release(work / "retrained", registry, "v2", n_items=args.items,
                  catalog_snapshot_at=dt.datetime.fromtimestamp(snapshot, dt.timezone.utc).isoformat())
    started = time.perf_counter()
    service.reload()
    reload_seconds = time.perf_counter() - started
    status = service.state.handover.status
    embed_started = time.perf_counter()
    while not status.done:
        time.sleep(0.01)
    service.sync_journal()
    done_seconds = time.perf_counter() - started
    reembed_seconds = time.perf_counter() - embed_started
    assert status.failed == 0 and all(f"new-{i}" in service.state.index for i in range(args.new_listings))

    state = service.state
    encoder = state.encoder()
    started = time.perf_counter()
    for start in range(0, len(images), REEMBED_BATCH_SIZE):
        encode_images(encoder, [decode_image(d) for d in images[start:start + REEMBED_BATCH_SIZE]], state.pca)
    bare_seconds = time.perf_counter() - started

    started = time.perf_counter()
    restarted = RecommenderService(str(registry))
    restarted.start()
    restart_seconds = time.perf_counter() - started
    assert restarted.state.handover.status.carried == 0 and restarted.state.handover.status.to_embed == 0

    return {"items": args.items, "metadata_writes": args.metadata_writes, "new_listings": args.new_listings,
            "carried": status.carried, "re_embedded": status.embedded,
            "reload_seconds": reload_seconds, "until_all_recommendable_seconds": done_seconds,
            "reembed_per_second": status.embedded / reembed_seconds if reembed_seconds else None,
            "bare_embed_per_second": args.new_listings / bare_seconds,
            "reembed_vs_bare": (status.embedded / reembed_seconds) / (args.new_listings / bare_seconds),
            "restart_seconds": restart_seconds,
            "write_path_metadata_per_second": args.metadata_writes / metadata_seconds,
            "write_path_image_upserts_per_second": args.new_listings / upsert_seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=1000, help="catalog size of each release (default: 1000)")
    parser.add_argument("--metadata-writes", type=int, default=20_000,
                        help="status/price changes v1 takes after the snapshot (default: 20000)")
    parser.add_argument("--new-listings", type=int, default=200,
                        help="image upserts v1 takes after the snapshot (default: 200)")
    parser.add_argument("--model-size", choices=sorted(SIZES), default="small", help="SigLIP size (default: small)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "handover.json", help="results JSON")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for noisy in ("visrec.online.service", "visrec.online.journal", "visrec.stages.release", "visrec.stages.index"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    work = Path(tempfile.mkdtemp(prefix="visrec-bench-handover-"))
    try:
        result = run(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print()
    print_table([result], [
        ("carried", "carried", ">8d"), ("re-embedded", "re_embedded", ">11d"),
        ("reload s", "reload_seconds", ">9.2f"), ("all in s", "until_all_recommendable_seconds", ">9.2f"),
        ("re-embed/s", "reembed_per_second", ">11.1f"), ("bare/s", "bare_embed_per_second", ">8.1f"),
        ("ratio", "reembed_vs_bare", ">6.2f"), ("restart s", "restart_seconds", ">10.2f")])
    write_results(args.out, {"machine": machine_info(), "model_size": args.model_size, **result})


if __name__ == "__main__":
    main()

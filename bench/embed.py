"""Stage-3 benchmark: `visrec embed` (Beam + RunInference) against a bare PyTorch loop, and PCA fit time.

Both sides embed the same prepared Parquet shards (synthetic marketplace photos,
JPEG) with the same randomly initialised SigLIP image encoder: read -> decode ->
the encoder's own preprocessing -> forward -> L2-normalise. The bare loop is the
fastest plain way to do that on one machine (sequential batches, no framework);
the ratio is the price of Beam's portability (Dataflow, dead letters, sharded
output). Wall time includes loading the model on both sides; `visrec embed` also
pays pipeline construction and the shuffle before writing shards.

Also measured: preprocessing per image vs per batch (the DoFn preprocesses per
image), Beam's adaptive batching (min batch 1) vs a fixed batch size, and the
PCA fit on 100k and 1M vectors of 768 dims (the production sample size).

    python bench/embed.py                    # ViT-S/16-sized SigLIP at 224 px, 512 images, PCA up to 1M
    python bench/embed.py --images 200 --pca-sizes 100000   # quick
    python bench/embed.py --full-size        # SigLIP ViT-B/16 at 256 px (the real architecture): GPU machines
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from visrec.embed import EmbedConfig, run_embed  # noqa: E402
from visrec.embeddings import read_embeddings  # noqa: E402
from visrec.pca import PcaProjection, l2_normalise  # noqa: E402

log = logging.getLogger("bench.embed")
RESULTS = Path(__file__).resolve().parent / "results"
# (name, min batch size (None = the batch size), PCA dims) of the `visrec embed` runs.
RUNS: list[tuple[str, int | None, int]] = [
    ("beam", None, 0), ("beam_adaptive_batch_min1", 1, 0), ("beam_pca128", None, 128)]

# Vision tower sizes: ViT-S/16 (a CPU-sized stand-in) and SigLIP base patch16-256 (the production model).
SIZES: dict[str, dict[str, int]] = {
    "small": dict(hidden_size=384, num_layers=6, num_heads=6, intermediate_size=1536, image_size=224),
    "full": dict(hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072, image_size=256),
}


def make_model(out: Path, size: str) -> Path:
    """A random SigLIP of the given vision size, saved like `visrec init-models` saves its tiny one."""
    from visrec.models import TinyModelConfig, init_models

    dims = SIZES[size]
    paths = init_models(out, config=TinyModelConfig(**dims, patch_size=16, vocab_size=500))
    return Path(paths["siglip"])


def make_prepared(out: Path, images: int) -> Path:
    """Prepared-shaped shards (item_id + JPEG) of synthetic marketplace photos."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from visrec.demo_data import DemoDataConfig, generate_marketplace

    market = out / "market"
    generate_marketplace(market, DemoDataConfig(items=images, seed=3, image_size=256))
    rows = [json.loads(line) for line in (market / "listings.jsonl").read_text().splitlines()]
    data = out / "prepared"
    data.mkdir()
    shards = 4
    for shard in range(shards):
        part = rows[shard::shards]
        pq.write_table(pa.table({"item_id": [r["item_id"] for r in part],
                                 "image": pa.array([(market / r["image_uri"]).read_bytes() for r in part],
                                                   pa.binary())}),
                       data / f"data-{shard:05d}-of-{shards:05d}.parquet")
    return data


def bare_loop(data: Path, model_dir: Path, batch_size: int) -> tuple[float, float, dict[str, np.ndarray]]:
    """Wall and CPU seconds for the plain PyTorch loop over the same shards, and its embeddings."""
    import pyarrow.parquet as pq
    import torch

    from visrec.images import decode_image
    from visrec.models import load_image_encoder, preprocess_images

    start, cpu = time.perf_counter(), time.process_time()
    encoder = load_image_encoder(str(model_dir), "siglip")
    out: dict[str, np.ndarray] = {}
    for f in sorted(data.glob("data-*.parquet")):
        table = pq.read_table(f)
        ids, blobs = table["item_id"].to_pylist(), table["image"].to_pylist()
        for begin in range(0, len(ids), batch_size):
            images = [decode_image(b) for b in blobs[begin:begin + batch_size]]
            with torch.inference_mode():
                features = encoder(preprocess_images(encoder, images))
            out.update(zip(ids[begin:begin + batch_size], l2_normalise(features.numpy())))
    return time.perf_counter() - start, time.process_time() - cpu, out


def preprocessing_ms(data: Path, model_dir: Path, batch_size: int) -> dict[str, float]:
    """ms per image: the image processor called per image (as the DoFn does) vs on whole batches."""
    import pyarrow.parquet as pq

    from visrec.embed import load_image_processor
    from visrec.images import decode_image
    from visrec.models import preprocess_images

    class Holder:
        image_processor = load_image_processor(str(model_dir))

    blobs = pq.read_table(sorted(data.glob("data-*.parquet"))[0])["image"].to_pylist()[:128]
    images = [decode_image(b) for b in blobs]
    # CPU time: on a shared machine wall time mostly measures the neighbours.
    start = time.process_time()
    for image in images:
        preprocess_images(Holder, [image])
    per_image = time.process_time() - start
    start = time.process_time()
    for begin in range(0, len(images), batch_size):
        preprocess_images(Holder, images[begin:begin + batch_size])
    batched = time.process_time() - start
    return {"per_image_ms": 1e3 * per_image / len(images), "batched_ms": 1e3 * batched / len(images)}


def beam_run(data: Path, model_dir: Path, out: Path, batch_size: int, min_batch_size: int,
             pca_dims: int) -> tuple[float, float, dict[str, Any], dict[str, np.ndarray]]:
    """Wall and CPU seconds of `run_embed` (the DirectRunner runs in this process), stats, embeddings."""
    start, cpu = time.perf_counter(), time.process_time()
    stats = run_embed(EmbedConfig(data_uri=str(data), model_uri=str(model_dir), out_dir=str(out),
                                  pca_dims=pca_dims, batch_size=batch_size, min_batch_size=min_batch_size))
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
    ids, vectors = read_embeddings(str(out))
    return seconds, cpu_seconds, stats, dict(zip(ids, vectors))


def pca_fit_seconds(n: int, dims: int = 768, out_dims: int = 128, seed: int = 0) -> dict[str, float]:
    """Fit (and transform) time on n unit vectors with a decaying spectrum, like image embeddings."""
    rng = np.random.default_rng(seed)
    scale = np.geomspace(3.0, 0.02, dims).astype(np.float32)
    vectors = np.empty((n, dims), np.float32)
    for begin in range(0, n, 100_000):  # in blocks: no float64 temporary of the whole matrix
        end = min(n, begin + 100_000)
        block = rng.standard_normal((end - begin, dims), dtype=np.float32) * scale
        vectors[begin:end] = block / np.linalg.norm(block, axis=1, keepdims=True)
    start = time.perf_counter()
    pca = PcaProjection.fit(vectors, out_dims, sample_size=n, seed=seed)
    fit = time.perf_counter() - start
    start = time.perf_counter()
    for begin in range(0, n, 100_000):
        pca.transform(vectors[begin:begin + 100_000])
    transform = time.perf_counter() - start
    return {"n": n, "dims": dims, "out_dims": out_dims, "fit_seconds": fit, "transform_seconds": transform,
            "explained_variance": pca.explained_variance}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=512, help="catalog images to embed (default: 512)")
    parser.add_argument("--batch-size", type=int, default=32, help="inference batch size (default: 32)")
    parser.add_argument("--full-size", action="store_true",
                        help="SigLIP ViT-B/16 at 256 px (the production architecture, random weights)")
    parser.add_argument("--pca-sizes", type=int, nargs="*", default=[100_000, 1_000_000],
                        help="numbers of 768-d vectors to time the PCA fit on (default: 100000 1000000)")
    parser.add_argument("--out", type=Path, default=RESULTS / "embed.json", help="results JSON")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        force=True)  # Beam configures the root logger on import
    for noisy in ("apache_beam", "visrec.embed", "visrec.models", "visrec.demo_data", "visrec.pca"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    import torch

    size = "full" if args.full_size else "small"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    results: dict[str, Any] = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "device": device,
                    "torch_threads": torch.get_num_threads(),
                    "gpu": torch.cuda.get_device_name(0) if device == "cuda" else None},
        "model": {"size": size, **SIZES[size]}, "images": args.images, "batch_size": args.batch_size,
    }
    with tempfile.TemporaryDirectory(prefix="bench-embed-") as tmp:
        tmp_path = Path(tmp)
        log.info("generating %d photos and a %s SigLIP", args.images, size)
        data = make_prepared(tmp_path, args.images)
        model_dir = make_model(tmp_path / "models", size)
        results["preprocessing"] = preprocessing_ms(data, model_dir, args.batch_size)

        bare_loop(data, model_dir, args.batch_size)  # warm-up: file cache, lazy imports, allocator
        bare_seconds, bare_cpu, bare = bare_loop(data, model_dir, args.batch_size)
        runs = {}
        for name, min_batch, pca_dims in RUNS:
            seconds, cpu_seconds, stats, vectors = beam_run(data, model_dir, tmp_path / name, args.batch_size,
                                                            min_batch or args.batch_size, pca_dims)
            runs[name] = {"seconds": seconds, "cpu_seconds": cpu_seconds,
                          "min_batch_size": min_batch or args.batch_size, "pca_dims": pca_dims,
                          "images_per_second": len(vectors) / seconds,
                          "images_per_cpu_second": len(vectors) / cpu_seconds,
                          "stats_items_per_second": stats["items_per_second"], "dims": stats["dims"]}
            if pca_dims == 0:
                diff = max(float(np.abs(vectors[i] - bare[i]).max()) for i in bare)
                runs[name]["max_abs_diff_vs_bare"] = diff
            log.info("%s: %.1f s", name, seconds)
        results["bare_loop"] = {"seconds": bare_seconds, "cpu_seconds": bare_cpu,
                                "images_per_second": len(bare) / bare_seconds,
                                "images_per_cpu_second": len(bare) / bare_cpu}
        results["visrec_embed"] = runs
        for measure in ("images_per_second", "images_per_cpu_second"):
            results[f"ratio_{measure}"] = runs["beam"][measure] / results["bare_loop"][measure]

    results["pca"] = []
    for n in args.pca_sizes:
        log.info("PCA fit on %d x 768", n)
        results["pca"].append(pca_fit_seconds(n))

    print(f"\nstage 3 on {results['machine']['cpus']} CPUs ({device}), SigLIP {size} "
          f"({SIZES[size]['hidden_size']}-d, {SIZES[size]['num_layers']} layers, {SIZES[size]['image_size']} px), "
          f"{args.images} images, batch {args.batch_size}")
    print(f"{'run':<40}{'wall s':>8}{'images/s':>10}{'vs bare':>9}{'CPU s':>8}{'img/CPU s':>11}{'vs bare':>9}")
    bare_run = results["bare_loop"]
    rows = [("bare PyTorch loop", bare_run)] + [(f"visrec embed ({name})", run) for name, run in runs.items()]
    for name, run in rows:
        print(f"{name:<40}{run['seconds']:>8.1f}{run['images_per_second']:>10.1f}"
              f"{run['images_per_second'] / bare_run['images_per_second']:>9.2f}{run['cpu_seconds']:>8.1f}"
              f"{run['images_per_cpu_second']:>11.2f}"
              f"{run['images_per_cpu_second'] / bare_run['images_per_cpu_second']:>9.2f}")
    pre = results["preprocessing"]
    print(f"preprocessing: {pre['per_image_ms']:.2f} ms/image per image, {pre['batched_ms']:.2f} ms/image batched")
    print(f"max |beam - bare| = {runs['beam']['max_abs_diff_vs_bare']:.2e}")
    print(f"\n{'PCA 768->128 on':<20}{'fit s':>8}{'transform s':>13}{'explained':>11}")
    for row in results["pca"]:
        print(f"{row['n']:<20}{row['fit_seconds']:>8.1f}{row['transform_seconds']:>13.1f}"
              f"{row['explained_variance']:>11.3f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()

"""Stage-3 benchmark: `visrec embed` (Beam + RunInference) against a bare PyTorch loop, and PCA fit time.

Both sides embed the same prepared Parquet shards (synthetic marketplace photos,
JPEG) with the same randomly initialised encoder: read -> decode -> the encoder's
own preprocessing -> forward -> L2-normalise. The bare loop is the fastest plain
way to do that on one machine (sequential batches, no framework); the ratio is the
price of Beam's portability (Dataflow, dead letters, sharded output). Wall time
includes loading the model on both sides; `visrec embed` also pays pipeline
construction, the reshuffle that spreads rows over workers and the shuffle before
writing shards. The two loops alternate `--repeats` times and the ratio is the
median of the paired runs' ratios: on a shared machine a neighbour's burst hits one
run, not the median.

Encoders: the candidate (SigLIP vision tower) and the baseline (MobileNetV2 with
depth multiplier 1.4 at 224 px: the production `google/mobilenet_v2_1.4_224`
architecture), both random. Also measured: preprocessing per image vs per batch
(the DoFn preprocesses per image), Beam's adaptive batching (min batch 1) vs a
fixed batch size, PCA inside the pipeline, and the PCA fit on 100k and 1M vectors
of 768 dims (the production sample size).

Both loops run on the same device (`--device`, default the GPU when there is one) at
the same precision (`--precision`, default `visrec embed`'s: bf16 autocast on a GPU with
bf16 tensor cores, fp32 on CPU), so the ratio compares Beam with plain PyTorch, not a
GPU with a CPU.

    python bench/embed.py                    # ViT-S/16-sized SigLIP at 224 px + MobileNetV2 1.4, 512 images
    python bench/embed.py --images 200 --repeats 1 --pca-sizes 100000   # quick
    python bench/embed.py --full-size        # SigLIP ViT-B/16 at 256 px (the real architecture): GPU machines
    python bench/embed.py --full-size --kinds siglip --images 64 --repeats 1 --pca-sizes   # the same on CPU
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from visrec.stages.configs import EmbedConfig  # noqa: E402
from visrec.stages.embed import EmbedResult, run_embed  # noqa: E402
from visrec.model.encoders import resolve_precision  # noqa: E402
from visrec.data.embeddings import read_embeddings  # noqa: E402
from visrec.model.pca import PcaProjection, l2_normalise  # noqa: E402
from visrec.data.schema import PREPARED_SHARDS  # noqa: E402
from benchkit import RESULTS_DIR, machine_info, print_table, write_results  # noqa: E402

log = logging.getLogger("bench.embed")
KINDS = ("siglip", "mobilenet_v2")
# Extra `visrec embed` runs, once each on the SigLIP: (name, min batch size (None = the batch size), PCA dims).
VARIANTS: list[tuple[str, int | None, int]] = [("beam_adaptive_batch_min1", 1, 0), ("beam_pca128", None, 128)]

# Vision tower sizes: ViT-S/16 (a CPU-sized stand-in) and SigLIP base patch16-256 (the production model).
SIZES: dict[str, dict[str, int]] = {
    "small": dict(hidden_size=384, num_layers=6, num_heads=6, intermediate_size=1536, image_size=224),
    "full": dict(hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072, image_size=256),
}
# The baseline's production architecture, whatever the SigLIP size.
MOBILENET = dict(mobilenet_depth_multiplier=1.4, image_size=224)


def make_models(out: Path, size: str) -> dict[str, Path]:
    """Random encoders saved like `visrec init-models` saves its tiny ones: a SigLIP of the given vision
    size and a MobileNetV2 1.4 at 224 px."""
    from visrec.model.encoders import TinyModelConfig, init_models

    siglip = init_models(out / "siglip", config=TinyModelConfig(**SIZES[size], patch_size=16, vocab_size=500))
    mobilenet = init_models(out / "mobilenet", config=TinyModelConfig(**MOBILENET, vocab_size=500))
    return {"siglip": Path(siglip["siglip"]), "mobilenet_v2": Path(mobilenet["mobilenet_v2"])}


def make_prepared(out: Path, images: int) -> Path:
    """Prepared-shaped shards (item_id + JPEG) of synthetic marketplace photos."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from visrec.sim.demo_data import DemoDataConfig, generate_marketplace

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


def bare_loop(data: Path, model_dir: Path, kind: str, batch_size: int, device: str,
              precision: str) -> tuple[float, float, dict[str, np.ndarray]]:
    """Wall and CPU seconds for the plain PyTorch loop over the same shards on `device` (`cpu`/`cuda`) at
    `precision`, and its embeddings."""
    import pyarrow.parquet as pq
    import torch

    from visrec.data.images import decode_image
    from visrec.model.encoders import load_image_encoder, preprocess_images

    start, cpu = time.perf_counter(), time.process_time()
    encoder = load_image_encoder(str(model_dir), kind).to(device)
    out: dict[str, np.ndarray] = {}
    for f in sorted(data.glob(PREPARED_SHARDS)):
        table = pq.read_table(f)
        ids, blobs = table["item_id"].to_pylist(), table["image"].to_pylist()
        for begin in range(0, len(ids), batch_size):
            images = [decode_image(b) for b in blobs[begin:begin + batch_size]]
            pixels = preprocess_images(encoder, images).to(device)
            with torch.inference_mode(), torch.autocast(device_type=device, dtype=torch.bfloat16,
                                                        enabled=precision == "bf16"):
                features = encoder(pixels).float().cpu()  # .cpu() waits for the GPU: the timing is honest
            out.update(zip(ids[begin:begin + batch_size], l2_normalise(features.numpy())))
    return time.perf_counter() - start, time.process_time() - cpu, out


def preprocessing_ms(data: Path, model_dir: Path, batch_size: int) -> dict[str, float]:
    """ms per image: the image processor called per image (as the DoFn does) vs on whole batches."""
    import pyarrow.parquet as pq

    from visrec.stages.embed import load_image_processor
    from visrec.data.images import decode_image
    from visrec.model.encoders import preprocess_images

    class Holder:
        image_processor = load_image_processor(str(model_dir))

    blobs = pq.read_table(sorted(data.glob(PREPARED_SHARDS))[0])["image"].to_pylist()[:128]
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


def beam_run(data: Path, model_dir: Path, kind: str, out: Path, batch_size: int, min_batch_size: int,
             pca_dims: int, device: str,
             precision: str) -> tuple[float, float, EmbedResult, dict[str, np.ndarray]]:
    """Wall and CPU seconds of `run_embed` (the DirectRunner runs in this process) on `device` (`cpu`/`cuda`)
    at `precision`, stats, embeddings."""
    start, cpu = time.perf_counter(), time.process_time()
    stats = run_embed(EmbedConfig(data_uri=str(data), model_uri=str(model_dir), kind=kind, out_dir=str(out),
                                  pca_dims=pca_dims, batch_size=batch_size, min_batch_size=min_batch_size,
                                  device="gpu" if device == "cuda" else "cpu", precision=precision))
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
    ids, vectors = read_embeddings(str(out))
    return seconds, cpu_seconds, stats, dict(zip(ids, vectors))


def device_name(device: str) -> str:
    """The GPU's name, or the CPU's model name (`platform.processor()` is only `x86_64` on Linux)."""
    import platform

    import torch

    if device == "cuda":
        return torch.cuda.get_device_name(0)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def timing(seconds: float, cpu_seconds: float, images: int) -> dict[str, float]:
    return {"seconds": seconds, "cpu_seconds": cpu_seconds, "images_per_second": images / seconds,
            "images_per_cpu_second": images / cpu_seconds}


def paired_runs(data: Path, model_dir: Path, kind: str, work: Path, batch_size: int, repeats: int,
                device: str, precision: str) -> dict[str, Any]:
    """Bare loop and `visrec embed` (fixed batches, no PCA) alternated `repeats` times after a warm-up."""
    bare_loop(data, model_dir, kind, batch_size, device, precision)  # warm-up: file cache, imports, allocator, CUDA
    bare_runs, beam_runs = [], []
    bare: dict[str, np.ndarray] = {}
    beam: dict[str, np.ndarray] = {}
    for repeat in range(repeats):
        seconds, cpu_seconds, bare = bare_loop(data, model_dir, kind, batch_size, device, precision)
        bare_runs.append(timing(seconds, cpu_seconds, len(bare)))
        seconds, cpu_seconds, _, beam = beam_run(data, model_dir, kind, work / f"{kind}-{repeat}", batch_size,
                                                 batch_size, 0, device, precision)
        beam_runs.append(timing(seconds, cpu_seconds, len(beam)))
        log.info("%s repeat %d: bare %.1f s, visrec embed %.1f s", kind, repeat + 1, bare_runs[-1]["seconds"],
                 beam_runs[-1]["seconds"])
    ratios = {measure: statistics.median(o[measure] / b[measure] for o, b in zip(beam_runs, bare_runs))
              for measure in ("images_per_second", "images_per_cpu_second")}
    return {"bare_loop": {k: statistics.median(r[k] for r in bare_runs) for k in bare_runs[0]},
            "visrec_embed": {k: statistics.median(r[k] for r in beam_runs) for k in beam_runs[0]},
            "runs": {"bare_loop": bare_runs, "visrec_embed": beam_runs},
            "ratio_images_per_second": ratios["images_per_second"],
            "ratio_images_per_cpu_second": ratios["images_per_cpu_second"],
            "max_abs_diff_vs_bare": max(float(np.abs(beam[i] - bare[i]).max()) for i in bare),
            "items": len(beam)}


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
    parser.add_argument("--repeats", type=int, default=3,
                        help="alternating runs of each loop per encoder; ratios are medians of pairs (default: 3)")
    parser.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS), help="encoders to time")
    parser.add_argument("--full-size", action="store_true",
                        help="SigLIP ViT-B/16 at 256 px (the production architecture, random weights)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="where both loops run (default: auto = cuda when available)")
    parser.add_argument("--precision", choices=("bf16", "fp32"),
                        help="both loops' precision (default: visrec embed's: bf16 autocast on a GPU with bf16 "
                             "tensor cores, fp32 otherwise)")
    parser.add_argument("--pca-sizes", type=int, nargs="*", default=[100_000, 1_000_000],
                        help="numbers of 768-d vectors to time the PCA fit on (default: 100000 1000000)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "embed.json", help="results JSON")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        force=True)  # Beam configures the root logger on import
    for noisy in ("apache_beam", "visrec.stages.embed", "visrec.model.encoders", "visrec.sim.demo_data", "visrec.model.pca"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    import torch

    size = "full" if args.full_size else "small"
    device = args.device if args.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no GPU here")
    precision = resolve_precision(args.precision, device)
    results: dict[str, Any] = {
        "machine": machine_info(device=device, device_name=device_name(device),
                                torch_threads=torch.get_num_threads(),
                                gpu=torch.cuda.get_device_name(0) if device == "cuda" else None),
        "precision": precision,
        "models": {"siglip": {"size": size, **SIZES[size]}, "mobilenet_v2": MOBILENET},
        "images": args.images, "batch_size": args.batch_size, "repeats": args.repeats, "ratio_goal": 0.8,
    }
    with tempfile.TemporaryDirectory(prefix="bench-embed-") as tmp:
        tmp_path = Path(tmp)
        log.info("generating %d photos, a %s SigLIP and a MobileNetV2 1.4", args.images, size)
        data = make_prepared(tmp_path, args.images)
        models = make_models(tmp_path / "models", size)
        results["preprocessing"] = {kind: preprocessing_ms(data, models[kind], args.batch_size)
                                    for kind in args.kinds}
        results["encoders"] = {kind: paired_runs(data, models[kind], kind, tmp_path, args.batch_size, args.repeats,
                                                 device, precision)
                               for kind in args.kinds}
        variants = {}
        if "siglip" in args.kinds:
            for name, min_batch, pca_dims in VARIANTS:
                seconds, cpu_seconds, _, vectors = beam_run(data, models["siglip"], "siglip", tmp_path / name,
                                                            args.batch_size, min_batch or args.batch_size, pca_dims,
                                                            device, precision)
                variants[name] = {**timing(seconds, cpu_seconds, len(vectors)),
                                  "min_batch_size": min_batch or args.batch_size, "pca_dims": pca_dims}
                log.info("%s: %.1f s", name, seconds)
        results["siglip_variants"] = variants

    results["pca"] = []
    for n in args.pca_sizes:
        log.info("PCA fit on %d x 768", n)
        results["pca"].append(pca_fit_seconds(n))

    print_report(results)
    write_results(args.out, results)


def print_report(results: dict[str, Any]) -> None:
    machine, siglip = results["machine"], results["models"]["siglip"]
    print(f"\nstage 3 on {machine['device']} ({machine['device_name']}; {machine['cpus']} CPUs), both loops "
          f"{results['precision']}, {results['images']} images, "
          f"batch {results['batch_size']}, medians of {results['repeats']} paired runs; SigLIP {siglip['size']} "
          f"({siglip['hidden_size']}-d, {siglip['num_layers']} layers, {siglip['image_size']} px), "
          f"MobileNetV2 1.4 at 224 px")
    rows = []
    for kind, runs in results["encoders"].items():
        rows += [{"run": f"{kind}: bare PyTorch loop", **runs["bare_loop"], "wall_ratio": 1.0, "cpu_ratio": 1.0},
                 {"run": f"{kind}: visrec embed", **runs["visrec_embed"],
                  "wall_ratio": runs["ratio_images_per_second"], "cpu_ratio": runs["ratio_images_per_cpu_second"]}]
    if "siglip" in results["encoders"]:
        bare = results["encoders"]["siglip"]["bare_loop"]
        rows += [{"run": f"siglip: visrec embed ({name})", **run,
                  "wall_ratio": run["images_per_second"] / bare["images_per_second"],
                  "cpu_ratio": run["images_per_cpu_second"] / bare["images_per_cpu_second"]}
                 for name, run in results["siglip_variants"].items()]
    print_table(rows, [("run", "run", "<52"), ("wall s", "seconds", ">8.1f"),
                       ("images/s", "images_per_second", ">10.1f"), ("vs bare", "wall_ratio", ">9.2f"),
                       ("CPU s", "cpu_seconds", ">8.1f"), ("img/CPU s", "images_per_cpu_second", ">11.2f"),
                       ("vs bare", "cpu_ratio", ">9.2f")])
    for kind, pre in results["preprocessing"].items():
        print(f"{kind} preprocessing: {pre['per_image_ms']:.2f} ms/image per image, "
              f"{pre['batched_ms']:.2f} ms/image batched")
    for kind, runs in results["encoders"].items():
        print(f"{kind}: max |beam - bare| = {runs['max_abs_diff_vs_bare']:.2e}")
    print(f"\n{'PCA 768->128 on':<20}{'fit s':>8}{'transform s':>13}{'explained':>11}")
    for row in results["pca"]:
        print(f"{row['n']:<20}{row['fit_seconds']:>8.1f}{row['transform_seconds']:>13.1f}"
              f"{row['explained_variance']:>11.3f}")


if __name__ == "__main__":
    main()

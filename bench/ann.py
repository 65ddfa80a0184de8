"""ANN benchmark: exact search vs this index (ScaNN, auto-tuned) vs faiss HNSW and IVF-PQ at matched recall.

One run, side by side, on clustered synthetic vectors (default 1M x 128; `--n` to
shrink) or on real stage-3 embeddings (`--embeddings URI`). The ScaNN index goes
through the real stage: Parquet shards -> `visrec.stages.index.build.build_index` (build, tune to
recall@10 >= 0.95, measure, gate, save) -> `SimilarityIndex.load`. faiss baselines are
tuned on the benchmark's own queries to the same recall (a small advantage to them).

Reported per method: build seconds, recall@k on held-out queries, single-query
p50/p99 and QPS (one query per call, one thread), batched QPS (all queries in one
call, all threads), and memory (index bytes; RSS growth while building).

    python bench/ann.py                  # 1M x 128 (about 10-15 min on 2 cores)
    python bench/ann.py --n 100000       # quick
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from visrec.data.embeddings import read_embeddings  # noqa: E402
from visrec.model.pca import l2_normalise  # noqa: E402
from visrec.stages.index.build import build_index  # noqa: E402
from visrec.stages.index.config import REORDER_DTYPES, IndexConfig  # noqa: E402
from visrec.stages.index.searcher import SimilarityIndex  # noqa: E402
from visrec.stages.index.tuning import exact_top_k  # noqa: E402
from benchkit import RESULTS_DIR, machine_info, print_table, write_results  # noqa: E402

log = logging.getLogger("bench.ann")


def clustered(n: int, dims: int, seed: int) -> np.ndarray:
    """Gaussian clusters (one per ~1000 points) whose noise matches their spread, L2-normalised."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((max(10, n // 1000), dims)).astype(np.float32)
    out = np.empty((n, dims), dtype=np.float32)
    for start in range(0, n, 100_000):  # in blocks: no 2x temporary at 1M
        stop = min(n, start + 100_000)
        out[start:stop] = centers[rng.integers(0, len(centers), stop - start)]
        out[start:stop] += rng.standard_normal((stop - start, dims), dtype=np.float32)
    return l2_normalise(out, np.float32)


def rss_bytes() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def recall(found: list[list[int]] | np.ndarray, truth: np.ndarray) -> float:
    k = truth.shape[1]
    return float(np.mean([len(set(map(int, f[:k])) & set(map(int, t))) / k for f, t in zip(found, truth)]))


def latency(search_one: Callable[[np.ndarray], Any], queries: np.ndarray, count: int) -> dict[str, float]:
    """Single-query latency: one call per query."""
    search_one(queries[0])
    times = np.empty(min(count, len(queries)))
    for i in range(len(times)):
        started = time.perf_counter()
        search_one(queries[i])
        times[i] = time.perf_counter() - started
    return {"p50_ms": float(np.percentile(times, 50) * 1e3), "p99_ms": float(np.percentile(times, 99) * 1e3),
            "qps_single": float(len(times) / times.sum())}


def batched_qps(search_all: Callable[[np.ndarray], Any], queries: np.ndarray) -> float:
    started = time.perf_counter()
    search_all(queries)
    return len(queries) / (time.perf_counter() - started)


def write_parquet(directory: Path, vectors: np.ndarray, shards: int) -> list[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    directory.mkdir(parents=True, exist_ok=True)
    ids = [f"item-{i}" for i in range(len(vectors))]
    for s, rows in enumerate(np.array_split(np.arange(len(vectors)), shards)):
        emb = pa.FixedSizeListArray.from_arrays(pa.array(vectors[rows].ravel()), vectors.shape[1])
        table = pa.table({"item_id": pa.array(ids[rows[0]:rows[-1] + 1], pa.string()),
                          "embedding": emb.cast(pa.list_(pa.float32()))})
        pq.write_table(table, directory / f"embeddings-{s:05d}-of-{shards:05d}.parquet")
    return ids


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def bench_exact(data: np.ndarray, queries: np.ndarray, truth: np.ndarray, k: int, args) -> dict[str, Any]:
    def one(q: np.ndarray) -> np.ndarray:
        sims = data @ q
        return np.argpartition(-sims, k)[:k]

    single = latency(one, queries, args.exact_single)
    return {"method": "exact (numpy BLAS)", "build_s": 0.0, "recall": 1.0, **single,
            "qps_batched": batched_qps(lambda qs: exact_top_k(data, qs, k), queries),
            "index_bytes": int(data.nbytes), "rss_growth_bytes": 0, "params": {}}


def bench_scann(data: np.ndarray, queries: np.ndarray, truth: np.ndarray, k: int, args,
                work: Path, ids: list[str] | None) -> dict[str, Any]:
    emb = work / "embeddings"
    if ids is None:
        started = time.perf_counter()
        ids = write_parquet(emb, data, shards=max(1, len(data) // 250_000))
        log.info("wrote %d embeddings as Parquet in %.1fs", len(ids), time.perf_counter() - started)
    position = {item_id: row for row, item_id in enumerate(ids)}
    rss0 = rss_bytes()
    started = time.perf_counter()
    config = IndexConfig(k=k, recall_target=args.target, reorder_dtype=args.reorder_dtype,
                         tuning_queries=args.tuning_queries, max_p99_ms=None)
    result = build_index(args.embeddings or str(emb), str(work / "index"), config)
    stage_s = time.perf_counter() - started
    rss_growth = rss_bytes() - rss0
    started = time.perf_counter()
    index = SimilarityIndex.load(str(work / "index"))
    load_s = time.perf_counter() - started
    found, _ = index.search(queries, k)
    got = [[position[i] for i in row] for row in found]
    scann_bytes = dir_bytes(work / "index" / "scann")
    return {"method": "visrec index (ScaNN, tuned)", "build_s": result.build_seconds, "recall": recall(got, truth),
            **latency(lambda q: index.search(q[None, :], k), queries, args.single),
            "qps_batched": batched_qps(lambda qs: index.search(qs, k), queries),
            "index_bytes": scann_bytes, "rss_growth_bytes": rss_growth,
            "params": {key: result.params.get(key) for key in ("num_leaves", "leaves_to_search",
                                                              "pre_reorder_num_neighbors", "reorder_dtype")},
            "stage": {"total_s": stage_s, "tune_s": result.tuning["seconds"], "load_s": load_s,
                      "tuned_recall_on_items": result.recall_at_k, "p99_ms_stage": result.p99_ms,
                      "index_dir_bytes": dir_bytes(work / "index"), "frontier": result.tuning["frontier"]}}


def _tune(search: Callable[[np.ndarray, Any], np.ndarray], grid: list[Any], queries: np.ndarray,
          truth: np.ndarray, target: float) -> tuple[Any, float]:
    """The fastest grid setting (time on a batch, one thread) whose recall reaches `target`."""
    import faiss

    faiss.omp_set_num_threads(1)
    best, best_time, best_recall, fallback = None, float("inf"), 0.0, (grid[-1], 0.0)
    for setting in grid:
        started = time.perf_counter()
        rows = search(queries, setting)
        elapsed = time.perf_counter() - started
        r = recall(rows, truth)
        if r > fallback[1]:
            fallback = (setting, r)
        if r >= target and elapsed < best_time:
            best, best_time, best_recall = setting, elapsed, r
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    return (best, best_recall) if best is not None else fallback


def faiss_timings(index: Any, queries: np.ndarray, k: int, single: int) -> dict[str, Any]:
    """Single-query latency on one thread (as a serving process runs it), batched QPS on all
    cores, and the serialized size of a tuned faiss index."""
    import faiss

    faiss.omp_set_num_threads(1)
    one = latency(lambda q: index.search(q[None, :], k), queries, single)
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    return {**one, "qps_batched": batched_qps(lambda qs: index.search(qs, k), queries),
            "index_bytes": len(faiss.serialize_index(index))}


def bench_faiss_hnsw(data, queries, truth, k, args) -> dict[str, Any]:
    import faiss

    rss0 = rss_bytes()
    started = time.perf_counter()
    index = faiss.IndexHNSWFlat(data.shape[1], args.hnsw_m, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = args.hnsw_ef_construction
    index.add(data)
    build_s = time.perf_counter() - started
    rss_growth = rss_bytes() - rss0

    def search(qs: np.ndarray, ef: int) -> np.ndarray:
        index.hnsw.efSearch = ef
        return index.search(qs, k)[1]

    ef, r = _tune(search, [16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512], queries, truth, args.target)
    index.hnsw.efSearch = ef
    return {"method": f"faiss HNSW (M={args.hnsw_m})", "build_s": build_s, "recall": r,
            **faiss_timings(index, queries, k, args.single), "rss_growth_bytes": rss_growth,
            "params": {"M": args.hnsw_m, "efConstruction": args.hnsw_ef_construction, "efSearch": ef}}


def bench_faiss_ivfpq(data, queries, truth, k, args) -> dict[str, Any]:
    import faiss

    rng = np.random.default_rng(1)
    nlist = max(1, int(round(np.sqrt(len(data)))))
    m = data.shape[1] // 4  # 8-bit code per 4 dims: 32 B/vector at 128 dims, as ScaNN's 4-bit AH per 2 dims
    rss0 = rss_bytes()
    started = time.perf_counter()
    quantizer = faiss.IndexFlatIP(data.shape[1])
    ivfpq = faiss.IndexIVFPQ(quantizer, data.shape[1], nlist, m, 8, faiss.METRIC_INNER_PRODUCT)
    index = faiss.IndexRefineFlat(ivfpq)  # exact float32 re-ranking, like ScaNN's re-ordering
    # faiss's own guidance: ~40 points per IVF centroid and >= 39 x 256 for the PQ codebooks.
    index.train(data[rng.choice(len(data), min(len(data), max(20_000, 40 * nlist)), replace=False)])
    index.add(data)
    build_s = time.perf_counter() - started
    rss_growth = rss_bytes() - rss0

    def search(qs: np.ndarray, setting: tuple[int, int]) -> np.ndarray:
        nprobe, factor = setting
        ivfpq.nprobe = nprobe
        index.k_factor = factor
        return index.search(qs, k)[1]

    grid = [(p, f) for p in (1, 2, 4, 8, 16, 32, 64, 128) if p <= nlist for f in (1, 2, 4, 8)]
    (nprobe, factor), r = _tune(search, grid, queries, truth, args.target)
    ivfpq.nprobe, index.k_factor = nprobe, factor
    return {"method": f"faiss IVF-PQ (nlist={nlist}, m={m}) + refine", "build_s": build_s, "recall": r,
            **faiss_timings(index, queries, k, args.single), "rss_growth_bytes": rss_growth,
            "params": {"nlist": nlist, "m": m, "nprobe": nprobe, "k_factor": factor}}


def print_ann_table(rows: list[dict[str, Any]], exact_qps: float) -> None:
    print_table(rows, [("method", "method", "<42"), ("build s", "build_s", ">8.1f"), ("recall", "recall", ">7.4f"),
                       ("p50 ms", "p50_ms", ">8.3f"), ("p99 ms", "p99_ms", ">8.3f"), ("QPS 1q", "qps_single", ">9.0f"),
                       ("QPS batch", "qps_batched", ">10.0f"),
                       ("x exact", lambda r: r["qps_single"] / exact_qps, ">8.1f"),
                       ("index MB", lambda r: r["index_bytes"] / 2**20, ">9.1f"),
                       ("RSS+ MB", lambda r: r["rss_growth_bytes"] / 2**20, ">8.1f")])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="synthetic database size")
    parser.add_argument("--dims", type=int, default=128)
    parser.add_argument("--embeddings", help="benchmark real stage-3 embeddings instead (queries: sampled items)")
    parser.add_argument("--queries", type=int, default=1000, help="held-out queries")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--target", type=float, default=0.95, help="recall@k every method is matched to")
    parser.add_argument("--reorder-dtype", default=IndexConfig.reorder_dtype, choices=REORDER_DTYPES)
    parser.add_argument("--tuning-queries", type=int, default=1000)
    parser.add_argument("--single", type=int, default=1000, help="queries timed one at a time")
    parser.add_argument("--exact-single", type=int, default=200, help="queries timed one at a time for exact")
    parser.add_argument("--hnsw-m", type=int, default=32)
    parser.add_argument("--hnsw-ef-construction", type=int, default=40)
    parser.add_argument("--skip", action="append", default=[], choices=("hnsw", "ivfpq"), help="skip a baseline")
    parser.add_argument("--workdir", help="where Parquet shards and the index go (default: a temp dir)")
    parser.add_argument("--out", default=str(RESULTS_DIR / "ann.json"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")

    started = time.perf_counter()
    if args.embeddings:
        ids, data = read_embeddings(args.embeddings)
        data = l2_normalise(data, np.float32)
        rows = np.random.default_rng(7).choice(len(data), min(args.queries, len(data)), replace=False)
        queries, dataset = data[rows], f"embeddings {args.embeddings}"
    else:
        ids = None
        data = clustered(args.n + args.queries, args.dims, seed=0)
        queries, data = data[args.n:].copy(), data[: args.n]
        dataset = f"clustered synthetic {args.n} x {args.dims} (held-out queries)"
    log.info("data: %s, %d queries (%.1fs)", dataset, len(queries), time.perf_counter() - started)
    truth, _ = exact_top_k(data, queries, args.k)

    if args.workdir:
        Path(args.workdir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="visrec-ann-", dir=args.workdir) as tmp:
        rows_out = [bench_exact(data, queries, truth, args.k, args)]
        log.info("exact done")
        rows_out.append(bench_scann(data, queries, truth, args.k, args, Path(tmp), ids))
        log.info("visrec index done")
    if "hnsw" not in args.skip:
        rows_out.append(bench_faiss_hnsw(data, queries, truth, args.k, args))
        log.info("faiss HNSW done")
    if "ivfpq" not in args.skip:
        rows_out.append(bench_faiss_ivfpq(data, queries, truth, args.k, args))
        log.info("faiss IVF-PQ done")

    print(f"\n{dataset}, k={args.k}, recall target {args.target}; machine: {platform.machine()}, "
          f"{os.cpu_count()} cores\n")
    print_ann_table(rows_out, rows_out[0]["qps_single"])
    from importlib.metadata import version

    result = {"dataset": dataset, "n": len(data), "dims": data.shape[1], "queries": len(queries), "k": args.k,
              "target": args.target, "machine": machine_info(),
              "versions": {name: version(name) for name in ("scann", "faiss-cpu", "numpy")},
              "total_seconds": time.perf_counter() - started, "results": rows_out}
    write_results(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())

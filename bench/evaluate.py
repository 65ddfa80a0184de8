"""Benchmark `visrec evaluate`: wall time and rows/s on generated impression logs of 1M rows.

Generates a catalog with hidden 128-d "looks", impression lists of 10 candidates
where users tend to tap the candidate that looks most like the query (plus position
bias), and three embedding sets (candidate, champion, baseline) of decreasing
quality. Each case runs the whole stage (read, group, score 3 models + random +
logged order, 1000-resample paired bootstrap overall and per slice, gate, report)
in a fresh process so peak memory is per case. Prints a table and writes
`bench/results/evaluate.json`.

    .venv/bin/python bench/evaluate.py [--rows 1000000] [--items 100000] [--bootstrap 1000]
"""

import argparse
import json
import multiprocessing as mp
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from benchkit import RESULTS_DIR, machine_info, print_table, write_results

RESULTS = RESULTS_DIR / "evaluate.json"
LIST_LEN = 10


def _write_embeddings(directory: Path, ids: pa.Array, vectors: np.ndarray) -> str:
    directory.mkdir(parents=True, exist_ok=True)
    n, d = vectors.shape
    emb = pa.ListArray.from_arrays(pa.array(np.arange(0, n * d + 1, d, dtype=np.int32)),
                                   pa.array(vectors.astype(np.float32).ravel()))
    pq.write_table(pa.table({"item_id": ids, "embedding": emb}), directory / "embeddings-00000-of-00001.parquet")
    return str(directory)


def generate(root: Path, rows: int, items: int, dims: int = 128, seed: int = 0) -> dict:
    """Impression logs (Parquet and JSONL), listings and three embedding sets under `root`."""
    rng = np.random.default_rng(seed)
    ids = pa.array([f"item-{i:07d}" for i in range(items)])
    truth = rng.normal(size=(items, dims)).astype(np.float32)
    truth /= np.linalg.norm(truth, axis=1, keepdims=True)
    n_lists = rows // LIST_LEN
    query = rng.integers(0, items, n_lists)
    cands = rng.integers(0, items, (n_lists, LIST_LEN))
    sims = np.einsum("ld,lkd->lk", truth[query], truth[cands])
    # Tap the best-looking candidate with p=0.6, plus position-biased random taps; ~25% of lists have none.
    tapped = np.zeros((n_lists, LIST_LEN), dtype=np.int64)
    best = sims.argmax(axis=1)
    tapped[np.arange(n_lists), best] = rng.random(n_lists) < 0.6
    tapped |= rng.random((n_lists, LIST_LEN)) < (0.08 / (1 + np.arange(LIST_LEN)))
    table = pa.table({
        "query_item_id": ids.take(pa.array(np.repeat(query, LIST_LEN))),
        "item_id": ids.take(pa.array(cands.ravel())),
        "position": np.tile(np.arange(LIST_LEN), n_lists),
        "tapped": tapped.ravel(),
        "session_id": pa.array([f"s{i}" for i in range(n_lists)]).take(
            pa.array(np.repeat(np.arange(n_lists), LIST_LEN))),
        "ts": pa.array(["2024-05-01T10:00:00Z"] * (n_lists * LIST_LEN)),
    })
    pq.write_table(table, root / "interactions.parquet")
    with open(root / "interactions.jsonl", "w") as fh:
        for batch in table.to_batches(100_000):
            cols = batch.to_pydict()
            fh.writelines(json.dumps(dict(zip(cols, values))) + "\n" for values in zip(*cols.values()))
    categories = [f"Top{c}/Sub/Leaf" for c in range(8)]
    with open(root / "listings.jsonl", "w") as fh:
        for i, item in enumerate(ids.to_pylist()):
            fh.write(json.dumps({"item_id": item, "title": item, "image_uri": f"images/{item}.jpg",
                                 "category": categories[i % 8], "price": 1000, "status": "on_sale",
                                 "listed_at": "2024-05-01T00:00:00Z"}) + "\n")
    noise = lambda s: rng.normal(scale=s, size=truth.shape).astype(np.float32)  # noqa: E731
    return {
        "candidate": _write_embeddings(root / "candidate", ids, truth + noise(0.08)),
        "champion": _write_embeddings(root / "champion", ids, truth + noise(0.12)),
        "baseline": _write_embeddings(root / "baseline", ids, truth + noise(0.3)),
        "listings": str(root / "listings.jsonl"),
        "rows": table.num_rows,
        "lists": n_lists,
    }


def _case(queue, kwargs: dict) -> None:
    import logging

    from visrec.stages.configs import EvaluateConfig
    from visrec.stages.evaluate.evaluation import run_evaluation

    logging.basicConfig(level=logging.INFO, format="    %(relativeCreated)6.0f ms %(name)s: %(message)s")
    logging.getLogger("matplotlib").setLevel(logging.WARNING)

    t = time.perf_counter()
    result = run_evaluation(EvaluateConfig(**kwargs))
    seconds = time.perf_counter() - t
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    queue.put({"seconds": seconds, "peak_rss_mb": peak_mb, "lists_used": result.lists_used,
               "lists_skipped": result.lists_skipped, "decision": result.decision,
               "candidate_ndcg@5": result.candidate["ndcg@5"], "baseline_ndcg@5": result.baseline["ndcg@5"]})


def run_case(kwargs: dict) -> dict:
    """One evaluation in a fresh process (so its peak RSS is its own)."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_case, args=(queue, kwargs))
    proc.start()
    out = queue.get()
    proc.join()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--bootstrap", type=int, default=1000)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="visrec-bench-eval-") as tmp:
        root = Path(tmp)
        t = time.perf_counter()
        data = generate(root, args.rows, args.items)
        print(f"generated {data['rows']:,} impression rows, {data['lists']:,} lists, {args.items:,} items "
              f"in {time.perf_counter() - t:.1f}s")
        base = {"candidate_uri": data["candidate"], "baseline_uri": data["baseline"],
                "bootstrap_resamples": args.bootstrap}
        cases = [
            ("parquet, 2 models", {"interactions_uri": str(root / "interactions.parquet")}),
            ("parquet, 3 models + slices", {"interactions_uri": str(root / "interactions.parquet"),
                                            "champion_uri": data["champion"], "listings_uri": data["listings"]}),
            ("jsonl, 3 models + slices", {"interactions_uri": str(root / "interactions.jsonl"),
                                          "champion_uri": data["champion"], "listings_uri": data["listings"]}),
        ]
        results = []
        for i, (name, extra) in enumerate(cases):
            out = run_case({**base, **extra, "out_dir": str(root / f"out{i}")})
            out.update(case=name, rows=data["rows"], rows_per_second=data["rows"] / out["seconds"])
            results.append(out)
            print(f"  {name}: {out['seconds']:.1f}s")

    print_table(results, [("case", "case", "<28"), ("rows", "rows", ">10,"), ("lists used", "lists_used", ">10,"),
                          ("seconds", "seconds", ">8.1f"), ("rows/s", "rows_per_second", ">10,.0f"),
                          ("peak MB", "peak_rss_mb", ">8.0f"), ("decision", "decision", ">8")])
    write_results(RESULTS, {"machine": machine_info(), "rows": args.rows, "items": args.items,
                            "bootstrap_resamples": args.bootstrap, "cases": results})

if __name__ == "__main__":
    main()

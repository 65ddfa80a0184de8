"""Serving benchmark: the real `visrec serve` over a release of synthetic vectors, under load.

    python bench/serve.py [--items 1000000] [--requests 3000] [--concurrency 1 8 32]

1. Builds (or reuses, in --workdir) a release of `--items` synthetic 128-d vectors
   (clustered, like real embeddings, with categories and prices correlated with the
   clusters) through the real stages: a tiny SigLIP whose image features are 128-d (so
   upserts would work), a tuned ScaNN index, `deploy_release`.
2. Times the bare index search for the serving fetch (`SimilarityIndex.search_labels`,
   200 candidates: the call `recommend` makes) and the in-process `recommend` (search +
   filter + re-rank) on the same query items.
3. Starts `visrec serve` and drives it from a second process (`c` keep-alive connections,
   each with one request in flight: a closed loop, so the load is bounded by `c`) at each
   concurrency: QPS and p50/p95/p99 end-to-end, CPU per request of server and client.
4. Writes (`--upserts`, default 100): new listings PUT one after another (a generated
   photo, base64, embedded by the release's encoder), each followed at once by a read of
   its similar items, which must answer 200 (recommendable as soon as the PUT returned);
   then concurrency 8 again while a writer upserts 5 listings a second.
5. With `--logging-rounds N`: the same release served by two processes at once, impression
   logging off and on (`--log-uri`, the service's batched writer), the load alternating between
   them N rounds at concurrency 8 so both see the same machine; p99 and QPS of each from the
   pooled rounds, their ratios, and the rows written and dropped.
6. Reports the ratio of end-to-end latency to bare search, the overhead (end-to-end minus
   bare search) in units of the bare search, write latencies, recall@10 of the served index
   against exact search, start-up time, and the server's RSS per million items (anonymous and
   file-backed, and above the RSS of the same server over a `--baseline-items` release: what
   the process costs before it holds any items); prints a table and writes
   `bench/results/serve.json`.

The release is reused between runs (`--workdir`); its write journal is cleared before
each run, so every run starts from the release as built. Nothing here holds a Python object
per item, so 10M items build on a 24 GB machine (`--items 10000000`; where the memory goes:
`bench/memory.py`).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import multiprocessing as mp
import os
import random
import secrets
import shutil
import threading
import time
from pathlib import Path

import numpy as np
from benchkit import RESULTS_DIR, machine_info, write_results

from visrec.core.servers import ServeProcess
from visrec.stages.index.config import REORDER_DTYPES, IndexConfig

ROOT = Path(__file__).resolve().parents[1]
RESULTS = RESULTS_DIR / "serve.json"
DIMS = 128
CATEGORY_TREE = [f"{a}/{b}/{c}" for a in ("fashion", "home", "kids", "sports", "hobby")
                 for b in ("women", "men", "unisex", "misc") for c in ("bags", "shoes", "tops")]


STATUSES = ["on_sale", "sold", "reserved"]
# Vectors generated per step: no full-size float64 temporary at 10M items.
CHUNK = 1_000_000


def item_ids(items: int) -> np.ndarray:
    """`i0000000`, `i0000001`, ... as fixed-width bytes, built from digits (no str per item)."""
    n = np.arange(items)
    chars = np.empty((items, 8), dtype=np.uint8)
    chars[:, 0] = ord("i")
    for place in range(7):
        chars[:, 7 - place] = ord("0") + (n // 10 ** place) % 10
    return chars.view("S8").ravel()


def synthetic_catalog(items: int, seed: int = 0) -> dict:
    """Clustered unit vectors plus metadata that correlates with the clusters, as in a real catalog.

    Columns are numpy arrays (ids as bytes, codes into `CATEGORY_TREE` and `STATUSES`), never a
    Python object per item.
    """
    rng = np.random.default_rng(seed)
    clusters = max(16, items // 500)
    centres = rng.standard_normal((clusters, DIMS)).astype(np.float32)
    assign = rng.integers(0, clusters, size=items)
    vectors = np.empty((items, DIMS), dtype=np.float32)
    for start in range(0, items, CHUNK):
        part = centres[assign[start:start + CHUNK]]
        part += 0.6 * rng.standard_normal(part.shape, dtype=np.float32)
        part /= np.linalg.norm(part, axis=1, keepdims=True)
        vectors[start:start + CHUNK] = part
    cluster_category = rng.integers(0, len(CATEGORY_TREE), size=clusters)
    own = rng.random(items) < 0.8
    category_idx = np.where(own, cluster_category[assign], rng.integers(0, len(CATEGORY_TREE), size=items))
    cluster_price = np.exp(rng.normal(8.0, 1.0, size=clusters))
    prices = np.maximum(100, np.round(cluster_price[assign] * np.exp(rng.normal(0, 0.5, size=items)))).astype(np.int64)
    statuses = rng.choice(len(STATUSES), size=items, p=[0.92, 0.05, 0.03])
    return {"ids": item_ids(items), "vectors": vectors, "prices": prices,
            "categories": category_idx.astype(np.int32), "statuses": statuses.astype(np.int32)}


def write_listings(path: Path, cat: dict) -> None:
    """The catalog as a listings file (the data contract's columns), built in Arrow."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    ids, items = pa.array(cat["ids"]).cast(pa.string()), len(cat["ids"])
    pq.write_table(pa.table({
        "item_id": ids, "title": pc.utf8_replace_slice(ids, 0, 0, "item "),
        "image_uri": pc.utf8_replace_slice(pc.utf8_replace_slice(ids, 0, 0, "images/"), 99, 99, ".jpg"),
        "listed_at": pa.repeat(pa.scalar("2026-01-01T00:00:00Z"), items), "price": cat["prices"],
        "category": pa.DictionaryArray.from_arrays(cat["categories"], CATEGORY_TREE).cast(pa.string()),
        "status": pa.DictionaryArray.from_arrays(cat["statuses"], STATUSES).cast(pa.string())}), path)


def build_release(workdir: Path, items: int, reorder_dtype: str | None = None) -> Path:
    """A registry with one release of the synthetic catalog (`reorder_dtype`: the index's, default
    `IndexConfig`'s); reused when already built so."""
    from visrec.data.embeddings import write_embeddings
    from visrec.stages.index.searcher import SimilarityIndex
    from visrec.stages.index.tuning import tune_search_params
    from visrec.model.encoders import TinyModelConfig, init_models
    from visrec.stages.release.deploy import DeployConfig, deploy_release

    registry = workdir / "registry"
    marker = workdir / "built.json"
    reorder_dtype = reorder_dtype or IndexConfig.reorder_dtype
    wanted = {"items": items, "reorder_dtype": reorder_dtype}
    if marker.exists() and {key: json.loads(marker.read_text()).get(key, IndexConfig.reorder_dtype)
                            for key in wanted} == wanted \
            and (registry / "releases" / "bench" / "index" / "ids.npy").exists():
        print(f"reusing release in {registry}")
        return registry
    shutil.rmtree(workdir, ignore_errors=True)
    work = workdir / "work"
    (work / "embeddings").mkdir(parents=True)
    started = time.monotonic()
    cat = synthetic_catalog(items)
    # Image features of this tiny SigLIP are 128-d, matching the index, so the release verifies
    # (encoder dims == index dims) without a PCA step.
    init_models(work / "models", config=TinyModelConfig(hidden_size=DIMS))
    shards = max(1, -(-items // CHUNK))  # write_embeddings holds a file in memory: 1M rows each
    for shard in range(shards):
        rows = slice(shard * CHUNK, (shard + 1) * CHUNK)
        write_embeddings(str(work / "embeddings" / f"embeddings-{shard:05d}-of-{shards:05d}.parquet"),
                         cat["ids"][rows].astype(str).tolist(), cat["vectors"][rows])
    write_listings(work / "listings.parquet", cat)
    config = IndexConfig(tuning_queries=300, reorder_dtype=reorder_dtype)
    index_started = time.monotonic()
    # Popped: while ScaNN builds, the index's normalised copy is the only one left.
    index = SimilarityIndex.build(cat.pop("ids"), cat.pop("vectors"), config)
    index_seconds = time.monotonic() - index_started
    tuning = tune_search_params(index, config)
    index.set_search_params(tuning.params)
    index.save(str(work / "index"))
    print(f"index built in {index_seconds:.0f} s, tuned in {tuning.seconds:.0f} s: {index.params}, "
          f"recall@10 {tuning.recall_at_k}")
    built = {**wanted, "index_build_seconds": round(index_seconds, 1),
             "tuning_seconds": round(tuning.seconds, 1), "tuned_recall_at_10": tuning.recall_at_k,
             "params": index.params}
    del index, cat
    (work / "metrics.json").write_text(json.dumps(
        {"decision": "deploy", "reasons": [{"name": "benchmark", "passed": True, "message": "synthetic release"}]}))
    deploy_release(DeployConfig(registry=str(registry), model_dir=str(work / "models" / "siglip"),
                                embeddings_dir=str(work / "embeddings"), index_dir=str(work / "index"),
                                listings_uri=str(work / "listings.parquet"),
                                metrics_uri=str(work / "metrics.json"), version="bench"))
    shutil.rmtree(work)
    marker.write_text(json.dumps({**built, "build_seconds": round(time.monotonic() - started, 1)}))
    return registry


def percentiles_ms(seconds: list[float] | np.ndarray) -> dict[str, float]:
    ms = np.asarray(seconds) * 1e3
    return {f"p{q}_ms": round(float(np.percentile(ms, q)), 3) for q in (50, 95, 99)}


def time_in_process(registry: Path, queries: list[str], fetch: int, recall_queries: int, k: int) -> dict:
    """Bare index search for the serving fetch, and the whole `recommend`, one query at a time;
    and the loaded index's recall@k against exact search.

    The bare search is `SimilarityIndex.search_labels`, the call `recommend` makes: ScaNN
    plus the index's lock, query normalisation and label gather.
    """
    from visrec.online.ranking import RankingConfig, recommend
    from visrec.online.config import ServingConfig
    from visrec.online.loading import load_state

    state = load_state(str(registry), ServingConfig())  # the server's own loading path
    state.encoder()  # loaded in the background: wait, so it does not share the CPU with the timing
    index, catalog = state.index, state.catalog
    config = RankingConfig(fetch=fetch)
    vectors = [index.vector(q) for q in queries]
    for v in vectors[:200]:
        index.search_labels(v, fetch)
    bare = []
    for v in vectors:
        t = time.perf_counter()
        index.search_labels(v, fetch)
        bare.append(time.perf_counter() - t)
    ranked = []
    survivors = []
    for q in queries:
        t = time.perf_counter()
        out = recommend(q, 10, index, catalog, config)
        ranked.append(time.perf_counter() - t)
        survivors.append(out.survivors)
    recall = ann_recall(index, registry / "releases" / "bench" / "index", queries[:recall_queries], k)
    state.close()
    return {"bare_search": percentiles_ms(bare), "recommend_in_process": percentiles_ms(ranked),
            "mean_survivors": round(float(np.mean(survivors)), 1), "recall_at_k": round(recall, 4)}


def serve_baseline(workdir: Path, items: int) -> dict:
    """RSS of `visrec serve` over a tiny release built the same way: the process before items."""
    registry = build_release(workdir, items)
    with ServeProcess(registry, [], workdir / "server.log", env={"PYTHONPATH": str(ROOT)}) as server:
        server.wait_healthy(ready=lambda health: health["encoder"] != "loading")
        return {"items": items, "rss_mb": rss_mb(server.proc.pid)}


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class HttpConnection:
    """One keep-alive HTTP/1.1 connection speaking just enough of the protocol for GETs.

    The load generator shares the two cores with the server, so every microsecond it
    spends is one the server does not get: raw asyncio streams on uvloop cost a fraction
    of a full client library per request. Responses are framed by Content-Length, which
    the server always sends.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str):
        self.reader, self.writer, self.host = reader, writer, host

    @classmethod
    async def open(cls, host: str, port: int) -> "HttpConnection":
        reader, writer = await asyncio.open_connection(host, port)
        return cls(reader, writer, host)

    async def get(self, path: str) -> tuple[int, bytes]:
        self.writer.write(f"GET {path} HTTP/1.1\r\nHost: {self.host}\r\n\r\n".encode())
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.lower() == b"content-length":
                length = int(value)
        return status, await self.reader.readexactly(length)

    def close(self) -> None:
        self.writer.close()


def warmup_requests(concurrency: int) -> int:
    """Untimed requests before each timed level."""
    return max(200, 10 * concurrency)


async def _drive(host: str, port: int, ids: list[str], concurrency: int, requests: int, k: int,
                 server_pid: int) -> dict:
    latencies: list[float] = []
    errors = 0
    rng = random.Random(concurrency)
    connections = [await HttpConnection.open(host, port) for _ in range(concurrency)]

    async def worker(connection: HttpConnection, counter) -> None:
        nonlocal errors
        for _ in counter:
            path = f"/v1/items/{rng.choice(ids)}/similar?k={k}"
            t = time.perf_counter()
            status, _ = await connection.get(path)
            latencies.append(time.perf_counter() - t)
            errors += status != 200

    # Warm-up at the same concurrency, so caches and the server's allocator are warm.
    warmup = iter(range(warmup_requests(concurrency)))
    await asyncio.gather(*(worker(c, warmup) for c in connections))
    latencies.clear()
    errors = 0
    counter = iter(range(requests))
    load_before = os.getloadavg()[0]
    started, cpu_started, server_cpu_started = time.perf_counter(), time.process_time(), cpu_seconds(server_pid)
    await asyncio.gather(*(worker(c, counter) for c in connections))
    elapsed, client_cpu = time.perf_counter() - started, time.process_time() - cpu_started
    server_cpu = cpu_seconds(server_pid) - server_cpu_started
    for connection in connections:
        connection.close()
    return {"concurrency": concurrency, "requests": len(latencies), "errors": errors,
            "seconds": elapsed, "latencies_s": latencies,
            "qps": round(len(latencies) / elapsed, 1), **percentiles_ms(latencies),
            # The client shares the cores with the server (and, on a shared VM, with others).
            "client_cpu_ms_per_request": round(1e3 * client_cpu / len(latencies), 3),
            "server_cpu_ms_per_request": round(1e3 * server_cpu / len(latencies), 3),
            "loadavg_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)]}


def load_generator(port: int, ids: list[str], levels: list[int], requests: int, k: int, server_pid: int,
                   out: mp.Queue) -> None:
    """Runs in its own process so client CPU is not the server's."""
    import uvloop

    out.put([uvloop.run(_drive("127.0.0.1", port, ids, c, requests, k, server_pid)) for c in levels])


def run_levels(port: int, ids: list[str], levels: list[int], requests: int, k: int, server_pid: int,
               keep_latencies: bool = False) -> list[dict]:
    """The load generator in a fresh process, one result per concurrency level (with each request's
    seconds in `latencies_s` and the level's wall `seconds` if `keep_latencies`)."""
    queue: mp.Queue = mp.get_context("spawn").Queue()
    gen = mp.get_context("spawn").Process(target=load_generator,
                                          args=(port, ids, levels, requests, k, server_pid, queue))
    gen.start()
    results = queue.get()
    gen.join()
    if not keep_latencies:
        for level in results:
            del level["latencies_s"], level["seconds"]
    return results


def count_log_rows(root: Path) -> int:
    """Rows in the JSON Lines objects under a log root."""
    return sum(path.read_bytes().count(b"\n") for path in root.rglob("*.jsonl"))


def logging_overhead(registry: Path, workdir: Path, ids: list[str], fetch: int, concurrency: int,
                     requests: int, rounds: int, k: int) -> dict:
    """Impression logging off vs on, in one run: two `visrec serve` processes over the same release
    (the second with `--log-uri`), the load alternating between them round by round (off-on, then
    on-off) so both meet the same machine; p99 and QPS from each server's pooled rounds."""
    import httpx

    log_root = workdir / "impression-logs"
    shutil.rmtree(log_root, ignore_errors=True)
    pooled: dict[str, dict] = {arm: {"latencies": [], "seconds": 0.0, "errors": 0, "server_cpu_ms": []}
                               for arm in ("off", "on")}
    flags = ["--fetch", str(fetch)]
    env = {"PYTHONPATH": str(ROOT)}
    with ServeProcess(registry, flags, workdir / "server-logging-off.log", env=env, timeout=3600.0) as off, \
            ServeProcess(registry, [*flags, "--log-uri", str(log_root)], workdir / "server-logging-on.log",
                         env=env, timeout=3600.0) as on:
        servers = {"off": off, "on": on}
        for server in servers.values():
            server.wait_healthy(ready=lambda health: health["encoder"] != "loading")
        for round_ in range(rounds):
            for arm in ("off", "on") if round_ % 2 == 0 else ("on", "off"):
                server = servers[arm]
                level = run_levels(server.port, ids, [concurrency], requests, k, server.proc.pid,
                                   keep_latencies=True)[0]
                pooled[arm]["latencies"] += level["latencies_s"]
                pooled[arm]["seconds"] += level["seconds"]
                pooled[arm]["errors"] += level["errors"]
                pooled[arm]["server_cpu_ms"].append(level["server_cpu_ms_per_request"])
        metrics = httpx.get(on.url + "/metrics").text
    arms = {arm: {"requests": len(p["latencies"]), "errors": p["errors"],
                  "qps": round(len(p["latencies"]) / p["seconds"], 1), **percentiles_ms(p["latencies"]),
                  "server_cpu_ms_per_request": round(float(np.mean(p["server_cpu_ms"])), 3)}
            for arm, p in pooled.items()}
    counters = {line.split()[0]: float(line.split()[1]) for line in metrics.splitlines()
                if line.startswith(("visrec_log_written_rows", "visrec_log_dropped_rows"))}
    return {"concurrency": concurrency, "rounds": rounds, "requests_per_round": requests, **arms,
            "p99_on_over_off": round(arms["on"]["p99_ms"] / arms["off"]["p99_ms"], 3),
            "qps_on_over_off": round(arms["on"]["qps"] / arms["off"]["qps"], 3),
            # All rows are written once the server has stopped: about k per answer, warm-ups included.
            "answers_logged": rounds * (requests + warmup_requests(concurrency)),
            "impression_rows_written": count_log_rows(log_root / "impressions"),
            "log_counters_before_stop": counters}


def listing_photo(n: int) -> str:
    """A small generated product photo (JPEG, base64), different for every n."""
    import base64
    import io as bytes_io

    from PIL import Image, ImageDraw

    rng = random.Random(n)
    image = Image.new("RGB", (96, 96), tuple(rng.randrange(256) for _ in range(3)))
    ImageDraw.Draw(image).ellipse([rng.randrange(40), rng.randrange(40), 56 + rng.randrange(40), 56 + rng.randrange(40)],
                                  fill=tuple(rng.randrange(256) for _ in range(3)))
    buffer = bytes_io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return base64.b64encode(buffer.getvalue()).decode()


def upsert_listing(client, n: int) -> tuple[float, bool]:
    """PUT listing `w<n>`, then read its similar items: (PUT seconds, whether the read answered 200)."""
    body = {"title": f"bench listing {n}", "category": CATEGORY_TREE[n % len(CATEGORY_TREE)],
            "price": 1000 + n, "image": listing_photo(n)}
    started = time.perf_counter()
    put = client.put(f"/v1/items/w{n:07d}", json=body)
    seconds = time.perf_counter() - started
    put.raise_for_status()
    return seconds, client.get(f"/v1/items/w{n:07d}/similar", params={"k": 10}).status_code == 200


def write_phase(url: str, token: str, upserts: int) -> dict:
    """Sequential upserts, each read back at once."""
    import httpx

    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=60) as client:
        upsert_listing(client, 0)  # warm-up: the encoder's first forward pass
        timings = [upsert_listing(client, n) for n in range(1, upserts + 1)]
    return {"upserts": upserts, "put": percentiles_ms([t for t, _ in timings]),
            "recommendable_at_once": sum(ok for _, ok in timings)}


def background_writer(url: str, token: str, per_second: float, stop: threading.Event, out: list) -> None:
    """Upserts `per_second` listings a second until `stop` (ids after the write phase's)."""
    import httpx

    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=60) as client:
        n = 1_000_000
        while not stop.wait(1 / per_second):
            out.append(upsert_listing(client, n))
            n += 1


def rss_mb(pid: int) -> dict[str, float]:
    """Resident memory of `pid` in MiB: total, anonymous (heap, arrays, ScaNN), file-backed (libraries)."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "RssAnon", "RssFile"):
            fields[name] = round(int(value.split()[0]) / 1024, 1)
    return {"total": fields["VmRSS"], "anon": fields["RssAnon"], "file": fields["RssFile"]}


def ann_recall(index, index_dir: Path, queries: list[str], k: int) -> float:
    """Recall@k of the served index (its tuned search; the query item itself excluded) against
    exact search over the release's `vectors.npy`, streamed a chunk at a time."""
    from visrec.stages.index.tuning import exact_top_k

    file_ids = np.load(index_dir / "ids.npy")  # file row -> id: no write is applied (journal cleared)
    data = np.load(index_dir / "vectors.npy", mmap_mode="r")
    vectors = np.stack([index.vector(q) for q in queries])
    best_rows = np.zeros((len(queries), 0), dtype=np.int64)
    best_scores = np.zeros((len(queries), 0), dtype=np.float32)
    for start in range(0, len(data), CHUNK):
        rows, scores = exact_top_k(np.asarray(data[start:start + CHUNK]), vectors, k + 1)
        rows, scores = np.hstack([best_rows, rows + start]), np.hstack([best_scores, scores])
        top = np.argsort(-scores, axis=1, kind="stable")[:, : k + 1]
        best_rows, best_scores = np.take_along_axis(rows, top, 1), np.take_along_axis(scores, top, 1)
    found, _ = index.search(vectors, k + 1)
    hits = 0
    for query, exact_rows, got in zip(queries, best_rows, found):
        exact = [i for i in file_ids[exact_rows].astype(str).tolist() if i != query][:k]
        hits += len(set(exact) & set([i for i in got if i != query][:k]))
    return hits / (k * len(queries))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--requests", type=int, default=3000, help="timed requests per concurrency level")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--fetch", type=int, default=200)
    parser.add_argument("--reorder-dtype", choices=REORDER_DTYPES, default="bfloat16",
                        help="the index's (default: %(default)s, what a 10M-item replica needs)")
    parser.add_argument("--upserts", type=int, default=100, help="listings PUT in the write phase (0: none)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/visrec-bench-serve"))
    parser.add_argument("--baseline-items", type=int, default=1000,
                        help="size of the release whose server RSS is the fixed baseline (0: skip)")
    parser.add_argument("--recall-queries", type=int, default=300, help="queries for recall@k vs exact search")
    parser.add_argument("--logging-rounds", type=int, default=0,
                        help="rounds per server of the impression logging off-vs-on comparison (0: skip)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    import httpx

    baseline = serve_baseline(args.workdir / "baseline", args.baseline_items) if args.baseline_items else None
    registry = build_release(args.workdir, args.items, args.reorder_dtype)
    built = json.loads((args.workdir / "built.json").read_text())
    rng = random.Random(0)
    ids = [f"i{rng.randrange(args.items):07d}" for _ in range(2000)]
    release_dir = registry / "releases" / "bench"
    for journal in (release_dir / "state").glob("journal*"):
        journal.unlink()  # earlier runs' upserts: every run starts from the release as built
    in_process = time_in_process(registry, ids, args.fetch, args.recall_queries, args.k)

    token = secrets.token_hex(16)
    started = time.monotonic()
    writes: dict = {}
    # A million-item release loads for minutes: wait as long as it takes, within an hour.
    with ServeProcess(registry, ["--fetch", str(args.fetch)], args.workdir / "server.log",
                      env={"PYTHONPATH": str(ROOT), "VISREC_ADMIN_TOKEN": token}, timeout=3600.0) as server:
        server.wait_healthy()
        ready_seconds = time.monotonic() - started
        # Steady state: also wait for the encoder, whose background import would steal CPU.
        server.wait_healthy(ready=lambda health: health["encoder"] != "loading")
        url, port, pid = server.url, server.port, server.proc.pid
        load_seconds = time.monotonic() - started
        rss_loaded = rss_mb(pid)
        levels = run_levels(port, ids, args.concurrency, args.requests, args.k, pid)
        if args.upserts:
            writes = write_phase(url, token, args.upserts)
            stop, background = threading.Event(), []
            writer = threading.Thread(target=background_writer, args=(url, token, 5.0, stop, background))
            writer.start()
            try:
                # Three times the requests: long enough for a few dozen writes to land meanwhile.
                writes["reads_at_concurrency_8_while_writing"] = run_levels(port, ids, [8], 3 * args.requests,
                                                                            args.k, pid)[0]
            finally:
                stop.set()
                writer.join()
            writes["background_upserts"] = len(background)
            writes["background_put"] = percentiles_ms([t for t, _ in background]) if background else None
        rss_after = rss_mb(pid)
        metrics = httpx.get(url + "/metrics").text
    logging = logging_overhead(registry, args.workdir, ids, args.fetch, 8, args.requests, args.logging_rounds,
                               args.k) if args.logging_rounds else None

    bare_p50 = in_process["bare_search"]["p50_ms"]
    bare_p99 = in_process["bare_search"]["p99_ms"]
    for level in levels:
        level["p50_over_bare_p50"] = round(level["p50_ms"] / bare_p50, 2)
        # What HTTP + filter + re-rank add on top of the search, in units of the search.
        level["overhead_over_bare_p50"] = round((level["p50_ms"] - bare_p50) / bare_p50, 2)
        level["p99_over_bare_p99"] = round(level["p99_ms"] / bare_p99, 2)
    result = {
        "machine": machine_info(note="server and load generator share these cores"),
        # uvicorn picks uvloop + httptools when installed, else asyncio + h11.
        "http_stack": {name: importlib.util.find_spec(name) is not None for name in ("uvloop", "httptools")},
        "items": args.items, "dims": DIMS, "k": args.k, "fetch": args.fetch,
        "requests_per_level": args.requests, "build": built,
        # Process start to /healthz 200 (index, catalog, journal: reads are served) and to the
        # encoder loaded (image upserts too); both include checking every file's sha256.
        "startup_seconds": {"ready": round(ready_seconds, 1), "encoder_loaded": round(load_seconds, 1)},
        "in_process": in_process, "levels": levels, "writes": writes, "logging": logging,
        "rss_mb": {"after_load": rss_loaded, "after_bench": rss_after,
                   "per_million_items": round(rss_after["total"] / (args.items / 1e6), 1),
                   "baseline": baseline,
                   "per_million_items_above_baseline": None if baseline is None else
                   round((rss_after["total"] - baseline["rss_mb"]["total"]) / (args.items / 1e6), 1)},
        "server_metrics_excerpt": [line for line in metrics.splitlines()
                                   if line.startswith(("visrec_candidates_surviving_sum",
                                                       "visrec_candidates_surviving_count",
                                                       "visrec_search_widened_total", "visrec_index_items"))],
        "goals": {"p99_ms_at_concurrency_8": 10.0, "overhead_over_bare_p50_at_concurrency_1": 2.0,
                  "rss_mb_per_million_items": 500.0, "recall_at_10": 0.95,
                  "logging_on_over_off_p99_at_most": 1.1, "logging_on_over_off_qps_at_least": 0.9},
    }

    print(f"\n{args.items:,} items x {DIMS}-d, k={args.k}, fetch={args.fetch}, {os.cpu_count()} CPUs")
    print(f"bare search (fetch {args.fetch}): p50 {bare_p50} ms, p99 {bare_p99} ms; "
          f"recommend in-process p50 {in_process['recommend_in_process']['p50_ms']} ms; "
          f"mean survivors {in_process['mean_survivors']}; recall@{args.k} vs exact {in_process['recall_at_k']} "
          f"(tuned on validation queries: {built.get('tuned_recall_at_10')})")
    print(f"{'conc':>5} {'QPS':>8} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'p50/bare':>9} {'ovh/bare':>9} "
          f"{'p99/bare':>9} {'srv cpu ms':>10} {'cli cpu ms':>10} {'load':>11} {'errors':>6}")
    for lv in levels:
        print(f"{lv['concurrency']:>5} {lv['qps']:>8} {lv['p50_ms']:>8} {lv['p95_ms']:>8} {lv['p99_ms']:>8} "
              f"{lv['p50_over_bare_p50']:>9} {lv['overhead_over_bare_p50']:>9} {lv['p99_over_bare_p99']:>9} "
              f"{lv['server_cpu_ms_per_request']:>10} "
              f"{lv['client_cpu_ms_per_request']:>10} {'%.1f->%.1f' % tuple(lv['loadavg_1min']):>11} {lv['errors']:>6}")
    if writes:
        during = writes["reads_at_concurrency_8_while_writing"]
        print(f"writes: {writes['upserts']} PUTs p50 {writes['put']['p50_ms']} ms, p99 {writes['put']['p99_ms']} ms; "
              f"{writes['recommendable_at_once']}/{writes['upserts']} recommendable on the next request; "
              f"concurrency 8 while upserting 5/s ({writes['background_upserts']} PUTs): {during['qps']} QPS, "
              f"p99 {during['p99_ms']} ms")
    if logging:
        print(f"impression logging, concurrency 8, {logging['rounds']} alternating rounds of {args.requests}:")
        for arm in ("off", "on"):
            lv = logging[arm]
            print(f"  logging {arm:>3}: {lv['qps']:>8} QPS, p50 {lv['p50_ms']} ms, p99 {lv['p99_ms']} ms, "
                  f"server cpu {lv['server_cpu_ms_per_request']} ms/request, errors {lv['errors']}")
        print(f"  on/off: p99 {logging['p99_on_over_off']}, QPS {logging['qps_on_over_off']}; "
              f"{logging['impression_rows_written']:,} impression rows written for {logging['answers_logged']:,} "
              f"answers")
    above = result["rss_mb"]["per_million_items_above_baseline"]
    print(f"server RSS {rss_after['total']:.0f} MB (anonymous {rss_after['anon']:.0f}, file-backed "
          f"{rss_after['file']:.0f}) = {result['rss_mb']['per_million_items']} MB per million items"
          + ("" if baseline is None else f"; {above} MB per million above the {baseline['rss_mb']['total']:.0f} MB "
                                         f"of a {baseline['items']:,}-item release")
          + f"; ready in {ready_seconds:.1f} s, encoder in {load_seconds:.1f} s; "
          f"index built in {built.get('index_build_seconds')} s + tuned in {built.get('tuning_seconds')} s")
    write_results(args.out, result)


if __name__ == "__main__":
    main()

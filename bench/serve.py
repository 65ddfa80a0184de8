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
5. Reports the ratio of end-to-end latency to bare search, the overhead (end-to-end minus
   bare search) in units of the bare search, write latencies, and the server's RSS per
   million items; prints a table and writes `bench/results/serve.json`.

The release is reused between runs (`--workdir`); its write journal is cleared before
each run, so every run starts from the release as built.
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

ROOT = Path(__file__).resolve().parents[1]
RESULTS = RESULTS_DIR / "serve.json"
DIMS = 128
CATEGORY_TREE = [f"{a}/{b}/{c}" for a in ("fashion", "home", "kids", "sports", "hobby")
                 for b in ("women", "men", "unisex", "misc") for c in ("bags", "shoes", "tops")]


def synthetic_catalog(items: int, seed: int = 0) -> dict:
    """Clustered unit vectors plus metadata that correlates with the clusters, as in a real catalog."""
    rng = np.random.default_rng(seed)
    clusters = max(16, items // 500)
    centres = rng.standard_normal((clusters, DIMS)).astype(np.float32)
    assign = rng.integers(0, clusters, size=items)
    vectors = centres[assign] + 0.6 * rng.standard_normal((items, DIMS)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    cluster_category = rng.integers(0, len(CATEGORY_TREE), size=clusters)
    own = rng.random(items) < 0.8
    category_idx = np.where(own, cluster_category[assign], rng.integers(0, len(CATEGORY_TREE), size=items))
    cluster_price = np.exp(rng.normal(8.0, 1.0, size=clusters))
    prices = np.maximum(100, np.round(cluster_price[assign] * np.exp(rng.normal(0, 0.5, size=items)))).astype(np.int64)
    statuses = rng.choice(np.array(["on_sale", "sold", "reserved"]), size=items, p=[0.92, 0.05, 0.03])
    return {"ids": [f"i{n:07d}" for n in range(items)], "vectors": vectors, "prices": prices,
            "categories": [CATEGORY_TREE[c] for c in category_idx], "statuses": statuses.tolist()}


def build_release(workdir: Path, items: int) -> Path:
    """A registry with one release of the synthetic catalog; reused when already built."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from visrec.data.embeddings import write_embeddings
    from visrec.stages.index.config import IndexConfig
    from visrec.stages.index.searcher import SimilarityIndex
    from visrec.stages.index.tuning import tune_search_params
    from visrec.model.encoders import TinyModelConfig, init_models
    from visrec.stages.release.deploy import DeployConfig, deploy_release

    registry = workdir / "registry"
    marker = workdir / "built.json"
    if marker.exists() and json.loads(marker.read_text()).get("items") == items:
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
    write_embeddings(str(work / "embeddings" / "embeddings-00000-of-00001.parquet"), cat["ids"], cat["vectors"])
    pq.write_table(pa.table({"item_id": cat["ids"], "title": [f"item {i}" for i in cat["ids"]],
                             "image_uri": [f"images/{i}.jpg" for i in cat["ids"]],
                             "listed_at": ["2026-01-01T00:00:00Z"] * items,
                             "price": cat["prices"], "category": cat["categories"], "status": cat["statuses"]}),
                   work / "listings.parquet")
    config = IndexConfig(tuning_queries=300)
    index = SimilarityIndex.build(cat["ids"], cat["vectors"], config)
    tuning = tune_search_params(index, config)
    index.set_search_params(tuning.params)
    index.save(str(work / "index"))
    print(f"index built and tuned: {index.params}, recall@10 {tuning.recall_at_k}")
    del index, cat
    (work / "metrics.json").write_text(json.dumps(
        {"decision": "deploy", "reasons": [{"name": "benchmark", "passed": True, "message": "synthetic release"}]}))
    deploy_release(DeployConfig(registry=str(registry), model_dir=str(work / "models" / "siglip"),
                                embeddings_dir=str(work / "embeddings"), index_dir=str(work / "index"),
                                listings_uri=str(work / "listings.parquet"),
                                metrics_uri=str(work / "metrics.json"), version="bench"))
    shutil.rmtree(work)
    marker.write_text(json.dumps({"items": items, "build_seconds": round(time.monotonic() - started, 1)}))
    return registry


def percentiles_ms(seconds: list[float] | np.ndarray) -> dict[str, float]:
    ms = np.asarray(seconds) * 1e3
    return {f"p{q}_ms": round(float(np.percentile(ms, q)), 3) for q in (50, 95, 99)}


def time_in_process(registry: Path, queries: list[str], fetch: int) -> dict:
    """Bare index search for the serving fetch, and the whole `recommend`, one query at a time.

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
    return {"bare_search": percentiles_ms(bare), "recommend_in_process": percentiles_ms(ranked),
            "mean_survivors": round(float(np.mean(survivors)), 1)}


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
    warmup = iter(range(max(200, 10 * concurrency)))
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


def run_levels(port: int, ids: list[str], levels: list[int], requests: int, k: int, server_pid: int) -> list[dict]:
    """The load generator in a fresh process, one result per concurrency level."""
    queue: mp.Queue = mp.get_context("spawn").Queue()
    gen = mp.get_context("spawn").Process(target=load_generator,
                                          args=(port, ids, levels, requests, k, server_pid, queue))
    gen.start()
    results = queue.get()
    gen.join()
    return results


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


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--requests", type=int, default=3000, help="timed requests per concurrency level")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--fetch", type=int, default=200)
    parser.add_argument("--upserts", type=int, default=100, help="listings PUT in the write phase (0: none)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/visrec-bench-serve"))
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    import httpx

    registry = build_release(args.workdir, args.items)
    rng = random.Random(0)
    ids = [f"i{rng.randrange(args.items):07d}" for _ in range(2000)]
    release_dir = registry / "releases" / "bench"
    for journal in (release_dir / "state").glob("journal*"):
        journal.unlink()  # earlier runs' upserts: every run starts from the release as built
    in_process = time_in_process(registry, ids, args.fetch)

    token = secrets.token_hex(16)
    started = time.monotonic()
    writes: dict = {}
    # A million-item release loads for minutes: wait as long as it takes, within an hour.
    with ServeProcess(registry, ["--fetch", str(args.fetch)], args.workdir / "server.log",
                      env={"PYTHONPATH": str(ROOT), "VISREC_ADMIN_TOKEN": token}, timeout=3600.0) as server:
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
        "requests_per_level": args.requests, "startup_seconds": round(load_seconds, 1),
        "in_process": in_process, "levels": levels, "writes": writes,
        "rss_mb": {"after_load": round(rss_loaded, 1), "after_bench": round(rss_after, 1),
                   "per_million_items": round(rss_after / (args.items / 1e6), 1)},
        "server_metrics_excerpt": [line for line in metrics.splitlines()
                                   if line.startswith(("visrec_candidates_surviving_sum",
                                                       "visrec_candidates_surviving_count",
                                                       "visrec_search_widened_total", "visrec_index_items"))],
        "goals": {"p99_ms_at_concurrency_8": 25.0, "overhead_over_bare_p50_at_concurrency_1": 2.0},
    }

    print(f"\n{args.items:,} items x {DIMS}-d, k={args.k}, fetch={args.fetch}, {os.cpu_count()} CPUs")
    print(f"bare search (fetch {args.fetch}): p50 {bare_p50} ms, p99 {bare_p99} ms; "
          f"recommend in-process p50 {in_process['recommend_in_process']['p50_ms']} ms; "
          f"mean survivors {in_process['mean_survivors']}")
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
    print(f"server RSS {rss_after:.0f} MB = {result['rss_mb']['per_million_items']} MB per million items; "
          f"startup {load_seconds:.1f} s")
    write_results(args.out, result)


if __name__ == "__main__":
    main()

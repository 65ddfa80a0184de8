"""Benchmark `visrec demo-data`: items/s for N items at several worker counts.

Also reports CPU seconds (parent + rendering workers), which stay meaningful on a
shared machine where wall time depends on the neighbours, and the nDCG@5 the
generated logs allow (oracle / visual-only oracle / logged order / random).

    python bench/demo_data.py --items 10000 --workers 1 2
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

from visrec.sim.demo_data import DemoDataConfig, generate_marketplace
from visrec.sim.study.stages import cpu_seconds
from benchkit import RESULTS_DIR, machine_info, write_results

RESULTS = RESULTS_DIR / "demo_data.json"


def bench(items: int, workers: int, seed: int) -> dict:
    out = Path(tempfile.mkdtemp(prefix="visrec-bench-demo-"))
    try:
        load = os.getloadavg()[0]
        cpu, wall = cpu_seconds(), time.perf_counter()
        summary = generate_marketplace(out, DemoDataConfig(items=items, seed=seed, workers=workers))
        wall, cpu = time.perf_counter() - wall, cpu_seconds() - cpu
        disk = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return {"items": items, "workers": workers, "wall_s": round(wall, 1), "cpu_s": round(cpu, 1),
            "items_per_s": round(items / wall, 1), "disk_mb": round(disk / 2**20, 1),
            "load_before": round(load, 2), "impressions": summary["impressions"], **summary["ranking"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, nargs="+", default=[10000])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rows = [bench(n, w, args.seed) for n in args.items for w in args.workers]
    cols = ["items", "workers", "wall_s", "cpu_s", "items_per_s", "disk_mb", "load_before",
            "ndcg@5_oracle", "ndcg@5_oracle_visual", "ndcg@5_logged", "ndcg@5_random"]
    print(" | ".join(cols))
    for r in rows:
        print(" | ".join(str(r.get(c)) for c in cols))
    write_results(RESULTS, {"machine": machine_info(note="load-dependent: shared VM"), "results": rows})

if __name__ == "__main__":
    main()

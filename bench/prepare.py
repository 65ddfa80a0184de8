"""Benchmark `visrec prepare`: rows/s and peak memory on generated marketplaces.

For each size (default 10,000 and 50,000 items, 2% corrupt rows) the marketplace
is generated once, then `visrec prepare` runs as a fresh process on DirectRunner
single-process and multi-process (`--direct-workers N`, N = CPU count). Peak
memory is the largest sum of resident memory over the command and all its child
processes (Beam worker processes included), sampled from /proc every 0.1 s.
Prints a table and writes `bench/results/prepare.json`.

    .venv/bin/python bench/prepare.py [--sizes 10000 50000] [--workers N] [--work-dir DIR]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from benchkit import RESULTS_DIR, machine_info, print_table, write_results

RESULTS = RESULTS_DIR / "prepare.json"
PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024


def _tree_rss_mib(root: int) -> float:
    """Resident memory of `root` and all its descendants (Linux /proc)."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{entry}/statm") as fh:
                rss[int(entry)] = int(fh.read().split()[1]) * PAGE_KIB
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(int(fields[1]), []).append(int(entry))
    total, stack = 0, [root]
    while stack:
        pid = stack.pop()
        total += rss.get(pid, 0)
        stack += children.get(pid, [])
    return total / 1024


def run_measured(cmd: list[str]) -> tuple[float, float, str]:
    """(wall seconds, peak tree RSS MiB, stdout) of a command; raises if it fails."""
    started = time.monotonic()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err)
        peak = 0.0
        while proc.poll() is None:
            peak = max(peak, _tree_rss_mib(proc.pid))
            time.sleep(0.1)
        seconds = time.monotonic() - started
        out.seek(0)
        err.seek(0)
        if proc.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err.read()[-3000:]}")
        return seconds, peak, out.read()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 50_000])
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2, help="multi-process worker count")
    parser.add_argument("--corrupt-fraction", type=float, default=0.02)
    parser.add_argument("--work-dir", help="keep generated data here (default: a temporary directory)")
    args = parser.parse_args()

    visrec = [sys.executable, "-m", "visrec"]
    rows = []
    with tempfile.TemporaryDirectory(prefix="visrec-bench-") as tmp:
        work = Path(args.work_dir or tmp)
        for size in args.sizes:
            market = work / f"market-{size}"
            if not (market / "listings.jsonl").exists():
                t0 = time.monotonic()
                subprocess.run(visrec + ["demo-data", "--out", str(market), "--items", str(size), "--seed", "0",
                                         "--corrupt-fraction", str(args.corrupt_fraction)],
                               check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                print(f"generated {size} items in {time.monotonic() - t0:.0f} s", flush=True)
            for mode, flags in (("single-process", ["--direct-workers", "1"]),
                                (f"multi-process x{args.workers}", ["--direct-workers", str(args.workers)])):
                out = work / f"prepared-{size}-{mode.split()[0]}"
                seconds, peak, stdout = run_measured(visrec + ["prepare", "--listings", str(market / "listings.jsonl"),
                                                               "--out", str(out), *flags])
                stats = json.loads(stdout)
                rows.append({"items": size, "mode": mode, "seconds": round(seconds, 1),
                             "rows_per_second": round(stats["input_rows"] / seconds, 1),
                             "peak_rss_mib": round(peak), "pairs": stats["train_pairs"] + stats["val_pairs"],
                             "stats": stats})
                print(f"{size} items, {mode}: {seconds:.1f} s", flush=True)

    print_table(rows, [("items", "items", ">7"), ("mode", "mode", "<18"), ("seconds", "seconds", ">8.1f"),
                       ("rows/s", "rows_per_second", ">8.1f"), ("peak RSS MiB", "peak_rss_mib", ">13"),
                       ("pairs", "pairs", ">7")])
    write_results(RESULTS, {
        "machine": machine_info(),
        "settings": {"image_size": 256, "jpeg_quality": 90, "shards": 8, "corrupt_fraction": args.corrupt_fraction,
                     "runner": "DirectRunner"},
        "results": rows,
    })

if __name__ == "__main__":
    main()

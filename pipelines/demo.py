"""`make demo`: the main job end to end on a generated marketplace.

Generate a synthetic marketplace, run the whole pipeline with kfp.local (tiny models
from `visrec init-models`), start the serving container's app on the new release,
ask it for similar items for a few listings and print them, and say where the HTML
gate report is.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from visrec.cli import configure_logging


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get_json(url: str, timeout: float = 10.0) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return json.loads(resp.read())


def _wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with status {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} not healthy after {timeout:.0f}s")


def ask_for_recommendations(registry: Path, listings: list[dict], queries: int = 3, k: int = 5) -> None:
    """Serve the registry's current release over HTTP and print recommendations for a few items."""
    port = _free_port()
    env = dict(os.environ, VISREC_ADMIN_TOKEN="")
    proc = subprocess.Popen([sys.executable, "-m", "visrec", "serve", "--release", str(registry),
                             "--host", "127.0.0.1", "--port", str(port)], env=env)
    try:
        base = f"http://127.0.0.1:{port}"
        _wait_healthy(f"{base}/healthz", proc)
        by_id = {row["item_id"]: row for row in listings}
        asked = 0
        for row in listings:
            if asked == queries:
                break
            if row.get("status") != "on_sale":
                continue
            try:
                answer = _get_json(f"{base}/v1/items/{row['item_id']}/similar?k={k}")
            except OSError:
                continue  # not in the release (e.g. rejected at embedding time)
            asked += 1
            print(f"\nitem {row['item_id']}  {row['category']}  ¥{row['price']:,}  {row['title']!r}")
            for rank, item in enumerate(answer["items"], 1):
                title = by_id.get(item["item_id"], {}).get("title", "")
                print(f"  {rank}. {item['item_id']}  score={item['score']:.3f}  {item['category']}  "
                      f"¥{item['price']:,}  {title!r}")
        print(f"\n(release {answer.get('release') if asked else '?'} served at {base})")
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", default="demo-work")
    parser.add_argument("--items", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    configure_logging()
    from pipelines.run_local import format_summary, run_local
    from visrec.sim.demo_data import DemoDataConfig, generate_marketplace

    started = time.time()
    work = Path(args.work_dir).resolve()
    data = work / "data"
    if not (data / "interactions.jsonl").exists():
        generate_marketplace(data, DemoDataConfig(items=args.items, seed=args.seed))
    summary = run_local(str(data / "listings.jsonl"), str(data / "interactions.jsonl"), work / "run")
    print("\n" + format_summary(summary))
    if summary.get("deployed") and summary.get("deploy_status") == "deployed":
        listings = [json.loads(line) for line in (data / "listings.jsonl").read_text().splitlines()]
        ask_for_recommendations(Path(summary["parameters"]["registry"]), listings)
    print(f"\nHTML gate report: {summary.get('report')}")
    print(f"demo finished in {time.time() - started:.0f}s (work dir {work})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

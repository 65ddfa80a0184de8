"""`make demo`: the main job end to end on a generated marketplace.

Generate a synthetic marketplace, run the whole pipeline with kfp.local (tiny models
from `visrec init-models`), start the serving container's app on the new release,
ask it for similar items for a few listings and print them, and say where the HTML
gate report is.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from visrec.cli import configure_logging
from visrec.core.servers import ServeProcess, get_json


def ask_for_recommendations(registry: Path, listings: list[dict], log_path: Path, queries: int = 3,
                            k: int = 5) -> None:
    """Serve the registry's current release over HTTP (the server's output to `log_path`) and print
    recommendations for a few items."""
    with ServeProcess(registry, log_path=log_path, env={"VISREC_ADMIN_TOKEN": ""}) as server:
        server.wait_healthy()
        by_id = {row["item_id"]: row for row in listings}
        asked, release = 0, "?"
        for row in listings:
            if asked == queries:
                break
            if row.get("status") != "on_sale":
                continue
            answer = get_json(f"{server.url}/v1/items/{row['item_id']}/similar?k={k}", timeout=10.0)
            if answer is None:
                continue  # not in the release (e.g. rejected at embedding time)
            asked, release = asked + 1, answer.get("release")
            print(f"\nitem {row['item_id']}  {row['category']}  ¥{row['price']:,}  {row['title']!r}")
            for rank, item in enumerate(answer["items"], 1):
                title = by_id.get(item["item_id"], {}).get("title", "")
                print(f"  {rank}. {item['item_id']}  score={item['score']:.3f}  {item['category']}  "
                      f"¥{item['price']:,}  {title!r}")
        print(f"\n(release {release} served at {server.url}; server log {log_path})")


def run_on_marketplace(work: Path, items: int, seed: int) -> tuple[Path, dict]:
    """Generate the marketplace under `work/data` (unless it is there) and run the pipeline on it:
    (the data directory, the run summary)."""
    from pipelines.run_local import run_local
    from visrec.sim.demo_data import DemoDataConfig, generate_marketplace

    data = work / "data"
    if not (data / "interactions.jsonl").exists():
        generate_marketplace(data, DemoDataConfig(items=items, seed=seed))
    return data, run_local(str(data / "listings.jsonl"), str(data / "interactions.jsonl"), work / "run")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", default="demo-work")
    parser.add_argument("--items", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    configure_logging()
    from pipelines.run_local import format_summary

    started = time.time()
    work = Path(args.work_dir).resolve()
    data, summary = run_on_marketplace(work, args.items, args.seed)
    print("\n" + format_summary(summary))
    if summary.get("deployed") and summary.get("deploy_status") == "deployed":
        listings = [json.loads(line) for line in (data / "listings.jsonl").read_text().splitlines()]
        ask_for_recommendations(Path(summary["parameters"]["registry"]), listings, Path(summary["logs"]) / "serve.log")
    print(f"\nHTML gate report: {summary.get('report')}")
    print(f"demo finished in {time.time() - started:.0f}s (work dir {work})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

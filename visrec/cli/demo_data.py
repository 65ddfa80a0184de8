"""`visrec demo-data`: generate a synthetic marketplace (listings, photos, impression logs, hidden truth)."""

from __future__ import annotations

import argparse

from visrec.core.defaults import field_defaults

HELP = "generate a synthetic marketplace: listings.jsonl, images/, interactions.jsonl, hidden ground truth"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from visrec.sim.demo_data import DemoDataConfig

    defaults = field_defaults(DemoDataConfig)
    parser.add_argument("--out", required=True, help="output directory, local or gs://")
    parser.add_argument("--items", type=int, default=defaults["items"], help="listings to generate")
    parser.add_argument("--seed", type=int, default=defaults["seed"], help="same seed and options, same bytes")
    parser.add_argument("--corrupt-fraction", type=float, default=defaults["corrupt_fraction"],
                        help="share of listing rows made bad (missing/truncated/non-image files, empty titles, "
                             "bad prices, duplicate ids, malformed lines); recorded in hidden/corruptions.jsonl")
    parser.add_argument("--image-size", type=int, default=defaults["image_size"], help="longest photo side in px")
    parser.add_argument("--sessions-per-item", type=float, default=defaults["sessions_per_item"],
                        help="impression lists logged per item")
    parser.add_argument("--workers", type=int, default=defaults["workers"],
                        help="image rendering processes (the output does not depend on it)")


def run(args: argparse.Namespace) -> int:
    from visrec.sim.demo_data import DemoDataConfig, generate_marketplace

    config = DemoDataConfig(items=args.items, seed=args.seed, corrupt_fraction=args.corrupt_fraction,
                            image_size=args.image_size, sessions_per_item=args.sessions_per_item,
                            workers=args.workers)
    s = generate_marketplace(args.out, config)
    r = s["ranking"]
    print(f"{args.out}: {s['items']} items ({s['status']['reserved']} reserved, {s['relistings']} relistings, "
          f"{sum(s['corrupted'].values())} corrupted), {s['impression_lists']} impression lists "
          f"({s['lists_with_tap']} with taps, {s['taps']} taps); nDCG@5 oracle {r.get('ndcg@5_oracle')} "
          f"logged {r.get('ndcg@5_logged')} random {r.get('ndcg@5_random')}; "
          f"{s['seconds']}s ({s['items_per_second']} items/s)")
    return 0

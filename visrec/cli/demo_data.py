"""`visrec demo-data`: generate a synthetic marketplace (listings, photos, impression logs, hidden truth),
or with `--kind web` the generic web image-caption corpus the pretrained stand-ins learn from."""

from __future__ import annotations

import argparse

from visrec.core.defaults import field_defaults

HELP = ("generate a synthetic marketplace (listings.jsonl, images/, interactions.jsonl, hidden ground truth) "
        "or, with --kind web, a web image-caption corpus for pretraining")
KINDS = ("marketplace", "web")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from visrec.sim.demo_data import DemoDataConfig
    from visrec.sim.web_corpus import WebCorpusConfig

    defaults, web = field_defaults(DemoDataConfig), field_defaults(WebCorpusConfig)
    parser.add_argument("--out", required=True, help="output directory, local or gs://")
    parser.add_argument("--kind", choices=KINDS, default=KINDS[0],
                        help="marketplace (default), or web: other object classes and scenes with alt-text "
                             "captions, drawn independently of any marketplace (docs/training.md)")
    parser.add_argument("--items", type=int, help=f"listings (web: image-caption pairs) to generate "
                                                  f"(default {defaults['items']}; web {web['items']})")
    parser.add_argument("--seed", type=int, help=f"same seed and options, same bytes (default {defaults['seed']}; "
                                                 f"web {web['seed']})")
    parser.add_argument("--corrupt-fraction", type=float, default=defaults["corrupt_fraction"],
                        help="share of listing rows made bad (missing/truncated/non-image files, empty titles, "
                             "bad prices, duplicate ids, malformed lines); recorded in hidden/corruptions.jsonl")
    parser.add_argument("--image-size", type=int, help=f"longest photo side in px (default {defaults['image_size']}; "
                                                       f"web {web['image_size']})")
    parser.add_argument("--sessions-per-item", type=float, default=defaults["sessions_per_item"],
                        help="impression lists logged per item")
    parser.add_argument("--workers", type=int, default=defaults["workers"],
                        help="image rendering processes (the output does not depend on it)")


def _given(args: argparse.Namespace, *names: str) -> dict:
    """The flags the user set among `names`: the rest keep their config's defaults."""
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


def run(args: argparse.Namespace) -> int:
    if args.kind == "web":
        from visrec.sim.web_corpus import PAIRS_FILE, WebCorpusConfig, generate_web_corpus

        config = WebCorpusConfig(workers=args.workers, **_given(args, "items", "seed", "image_size"))
        s = generate_web_corpus(args.out, config)
        print(f"{args.out}: {s['items']} web image-caption pairs in {PAIRS_FILE} ({len(s['classes'])} classes, "
              f"{s['second_objects']} with a second object); {s['seconds']}s")
        return 0
    from visrec.sim.demo_data import DemoDataConfig, generate_marketplace

    config = DemoDataConfig(corrupt_fraction=args.corrupt_fraction, sessions_per_item=args.sessions_per_item,
                            workers=args.workers, **_given(args, "items", "seed", "image_size"))
    s = generate_marketplace(args.out, config)
    r = s["ranking"]
    print(f"{args.out}: {s['items']} items ({s['status']['reserved']} reserved, {s['relistings']} relistings, "
          f"{sum(s['corrupted'].values())} corrupted), {s['impression_lists']} impression lists "
          f"({s['lists_with_tap']} with taps, {s['taps']} taps); nDCG@5 oracle {r.get('ndcg@5_oracle')} "
          f"logged {r.get('ndcg@5_logged')} random {r.get('ndcg@5_random')}; "
          f"{s['seconds']}s ({s['items_per_second']} items/s)")
    return 0

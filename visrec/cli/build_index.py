"""`visrec build-index`: stage 4, the ScaNN index tuned to a recall target, with its quality gate."""

from __future__ import annotations

import argparse

from visrec.core.defaults import field_defaults

HELP = "build the ScaNN similarity index from embeddings, tune it to a recall target and gate it"


def _num_leaves(value: str) -> int | None:
    if value == "auto":
        return None
    try:
        leaves = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a positive integer, got {value!r}") from None
    if leaves < 1:
        raise argparse.ArgumentTypeError("num-leaves must be >= 1")
    return leaves


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from visrec.stages.index.config import REORDER_DTYPES, IndexConfig

    defaults = field_defaults(IndexConfig)
    parser.add_argument("--embeddings", required=True,
                        help="stage-3 embeddings directory or Parquet file (local or gs://)")
    parser.add_argument("--out", required=True, help="index directory to write (local or gs://)")
    parser.add_argument("--recall-target", type=float, default=defaults["recall_target"],
                        help="recall@k vs exact search the tuned setting must reach (gate)")
    parser.add_argument("--k", type=int, default=defaults["k"], help="neighbours recall is measured at")
    parser.add_argument("--num-leaves", type=_num_leaves, default=None, metavar="auto|N",
                        help="tree partitions (default auto: about sqrt(N))")
    parser.add_argument("--reorder-dtype", choices=REORDER_DTYPES, default=defaults["reorder_dtype"],
                        help="precision of the re-ordering data (memory vs recall)")
    parser.add_argument("--max-p99-ms", type=float, default=defaults["max_p99_ms"],
                        help="gate on single-query p99 latency in ms (0: no latency gate)")
    parser.add_argument("--tuning-queries", type=int, default=defaults["tuning_queries"],
                        help="sample queries for tuning (as many again validate the choice)")
    parser.add_argument("--seed", type=int, default=defaults["seed"], help="sample-query seed")


def run(args: argparse.Namespace) -> int:
    import json

    from visrec.core.errors import UserError
    from visrec.stages.index.build import build_index
    from visrec.stages.index.config import IndexConfig

    try:
        config = IndexConfig(k=args.k, recall_target=args.recall_target, num_leaves=args.num_leaves,
                             reorder_dtype=args.reorder_dtype, max_p99_ms=args.max_p99_ms or None,
                             tuning_queries=args.tuning_queries, seed=args.seed)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    result = build_index(args.embeddings, args.out, config)
    summary = {"num_items": result.num_items, "dims": result.dims, "recall_at_k": result.recall_at_k,
               "p50_ms": result.p50_ms, "p99_ms": result.p99_ms, "qps_batched": result.qps_batched,
               "build_seconds": result.build_seconds,
               "search_params": {key: result.params.get(key) for key in ("leaves_to_search",
                                                                         "pre_reorder_num_neighbors")}}
    print(json.dumps(summary))
    return 0

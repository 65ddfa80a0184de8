"""`visrec serve`: the similar-items HTTP service for a release (or a registry's CURRENT release)."""

from __future__ import annotations

import argparse
import os

from visrec.core.defaults import field_defaults

HELP = "serve similar items for a release over HTTP (Vertex AI prediction contract included)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from visrec.online.config import ServingConfig
    from visrec.online.eventlog import LogConfig
    from visrec.online.ranking import RankingConfig

    ranking = field_defaults(RankingConfig)
    limits = field_defaults(ServingConfig)
    parser.add_argument("--release", default=os.environ.get("AIP_STORAGE_URI"),
                        help="release directory or registry, local or gs:// (default: $AIP_STORAGE_URI)")
    parser.add_argument("--host", default=os.environ.get("VISREC_HOST", "127.0.0.1"),
                        help="bind address (default: $VISREC_HOST or 127.0.0.1)")
    parser.add_argument("--port", type=int, default=int(os.environ.get("AIP_HTTP_PORT", "8080")),
                        help="port (default: $AIP_HTTP_PORT or 8080)")
    parser.add_argument("--workers", type=int, default=1,
                        help="worker processes; each holds the index, writes reach all through the journal")
    parser.add_argument("--fetch", type=int, default=ranking["fetch"], help="ANN candidates fetched per query")
    parser.add_argument("--price-low", type=float, default=ranking["price_low"],
                        help="keep candidates priced >= this factor of the query price")
    parser.add_argument("--price-high", type=float, default=ranking["price_high"],
                        help="keep candidates priced <= this factor of the query price")
    parser.add_argument("--category-weight", type=float, default=ranking["category_weight"],
                        help="weight of category similarity in the re-rank score")
    parser.add_argument("--image-root", help="local directory PUT image_uri paths may point into")
    parser.add_argument("--cache-dir", help="where a gs:// release is downloaded")
    parser.add_argument("--access-log", action="store_true", help="log every request (secret query values blanked)")
    parser.add_argument("--header-timeout", type=float, default=limits["header_timeout_seconds"],
                        help="close a connection that sent no complete request headers for this long (s)")
    parser.add_argument("--keep-alive", type=int, default=limits["keep_alive_seconds"],
                        help="close an idle connection this long after an answer (s)")
    parser.add_argument("--max-connections", type=int, default=limits["max_connections"],
                        help="concurrent connections per process; beyond, 503")
    parser.add_argument("--max-predict-neighbours", type=int, default=limits["max_predict_neighbours"],
                        help="the most neighbours one /predict may ask for (sum of k)")
    parser.add_argument("--max-concurrent-predicts", type=int, default=limits["max_concurrent_predicts"],
                        help="/predict requests at once per process; beyond, 429")
    logs = field_defaults(LogConfig)
    parser.add_argument("--log-uri", default=os.environ.get("VISREC_LOG_URI", logs["uri"]),
                        help="log impressions and taps under this root, local or gs:// (default: $VISREC_LOG_URI; "
                             "unset: no logging); `visrec join-events` turns them into interactions")
    parser.add_argument("--log-batch-rows", type=int, default=logs["batch_rows"],
                        help="log rows per written object (default: %(default)s)")
    parser.add_argument("--log-flush-seconds", type=float, default=logs["flush_seconds"],
                        help="longest a log row waits in memory (default: %(default)s)")


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from visrec.core.errors import UserError
    from visrec.online.config import ServingConfig
    from visrec.online.eventlog import LogConfig
    from visrec.online.ranking import RankingConfig
    from visrec.online.workers import WorkerSpec, shared_by_workers

    if not args.release:
        raise UserError("no release: pass --release or set AIP_STORAGE_URI")
    if args.workers < 1:
        raise UserError("--workers must be >= 1")
    try:
        ranking = RankingConfig(fetch=args.fetch, price_low=args.price_low, price_high=args.price_high,
                                category_weight=args.category_weight)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    # A bad admin token stops the server here, once, not in a restart loop of every worker.
    from serving.app import configured_admin_token

    configured_admin_token()
    config = ServingConfig(ranking=ranking, image_root=args.image_root, cache_dir=args.cache_dir,
                           max_predict_neighbours=args.max_predict_neighbours,
                           max_concurrent_predicts=args.max_concurrent_predicts,
                           header_timeout_seconds=args.header_timeout, keep_alive_seconds=args.keep_alive,
                           max_connections=args.max_connections,
                           logging=LogConfig(uri=args.log_uri, batch_rows=args.log_batch_rows,
                                             flush_seconds=args.log_flush_seconds))
    options = dict(host=args.host, port=args.port, access_log=args.access_log, log_level="info",
                   http="serving.app:HeaderTimeoutProtocol", timeout_keep_alive=config.keep_alive_seconds,
                   limit_concurrency=config.max_connections)

    if args.workers == 1:
        from serving.app import create_app

        os.environ.update(WorkerSpec(args.release, config).to_env())  # the HTTP protocol's header timeout
        # A release that fails to load stops this server (late-bound: `server` exists by then).
        app = create_app(args.release, config, on_load_error=lambda: setattr(server, "should_exit", True))
        server = uvicorn.Server(uvicorn.Config(app, **options))
        server.run()
        if app.state.load_error:
            raise UserError(f"cannot load release {args.release}: {app.state.load_error}")
        return 0

    # Several processes, each started from the spec (`visrec.online.workers`).
    os.environ.update(WorkerSpec(args.release, shared_by_workers(args.release, config)).to_env())
    uvicorn.run("serving.app:app_from_env", factory=True, workers=args.workers, **options)
    return 0

"""`visrec deploy`: assemble, verify and publish a release; make it current (or wait for approval)."""

from __future__ import annotations

import argparse

from visrec.core.defaults import field_defaults

HELP = ("publish a release (model, PCA, index, item metadata, metrics) into a registry and make it current; "
        "refuses a candidate the evaluation gate rejected (exit 3)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from visrec.stages.release.deploy import DeployConfig
    from visrec.stages.release.vertex import VertexDeployConfig

    deploy = field_defaults(DeployConfig)
    parser.add_argument("--registry", required=True, help="registry directory, local or gs:// (vertex: gs://)")
    parser.add_argument("--model", required=True, help="trained model directory (visrec train output model/)")
    parser.add_argument("--embeddings", required=True, help="embeddings directory (visrec embed output, with pca/)")
    parser.add_argument("--index", required=True, help="index directory (visrec build-index output)")
    parser.add_argument("--listings", required=True, help="listings file (JSONL or Parquet) for item metadata")
    parser.add_argument("--metrics", required=True, help="the evaluation's metrics.json (its gate decision)")
    parser.add_argument("--version", help="release version (default: derived from the content's checksums)")
    parser.add_argument("--require-approval", action="store_true",
                        help="store the release as pending until `visrec approve VERSION`")
    parser.add_argument("--target", choices=("local", "vertex"), default=deploy["target"],
                        help="local: registry pointer only; vertex: also upload and deploy on Vertex AI")
    parser.add_argument("--encoder-kind", default=deploy["encoder_kind"],
                        help="model kind of --model (siglip | mobilenet_v2; default: its config.json)")
    parser.add_argument("--catalog-snapshot-at", metavar="ISO8601",
                        help="when the listings were exported (default: the listings file's modification time); "
                             "serving carries writes made after it into this release")
    defaults = field_defaults(VertexDeployConfig)
    vertex = parser.add_argument_group("Vertex AI (--target vertex)")
    vertex.add_argument("--project", help="Google Cloud project")
    vertex.add_argument("--region", help="Vertex AI region, e.g. us-central1")
    vertex.add_argument("--serving-image", help="serving container image URI")
    vertex.add_argument("--model-id", default=defaults["model_id"],
                        help="parent model ID; each release becomes a version of it (created on the first)")
    vertex.add_argument("--endpoint-id", default=defaults["endpoint_id"], help="endpoint ID (created when absent)")
    vertex.add_argument("--model-display-name", default=defaults["model_display_name"], help="model display name")
    vertex.add_argument("--version-alias", action="append", default=[], help="extra version alias (repeatable)")
    vertex.add_argument("--machine-type", default=defaults["machine_type"], help="serving machine type")
    vertex.add_argument("--min-replicas", type=int, default=defaults["min_replica_count"],
                        help="minimum serving replicas")
    vertex.add_argument("--max-replicas", type=int, default=defaults["max_replica_count"],
                        help="maximum serving replicas")
    vertex.add_argument("--canary-percent", type=int, default=defaults["canary_percent"],
                        help="traffic share of the new version until `visrec promote` (100: one step)")
    vertex.add_argument("--keep-previous", type=int, default=defaults["keep_previous"],
                        help="earlier releases kept deployed at 0%% for traffic-shift rollbacks")
    vertex.add_argument("--service-account", help="service account the serving container runs as")
    vertex.add_argument("--admin-token-uri", help="gs:// object holding the write endpoints' token "
                                                   "(read by the container; unset: writes disabled)")
    vertex.add_argument("--no-invoke-routes", dest="invoke_routes", action="store_false",
                        help="a shared endpoint with only :predict (no writes, reload or metrics through Vertex)")
    vertex.add_argument("--request-logging-rate", type=float, default=defaults["request_logging_sampling_rate"],
                        help="share of requests Vertex logs to BigQuery (0: off)")
    vertex.add_argument("--request-logging-table", help="BigQuery table for request logs (bq://project.dataset.table)")


def vertex_config_from_args(args: argparse.Namespace):
    from visrec.stages.release.vertex import VertexDeployConfig

    if args.target != "vertex":
        return None
    return VertexDeployConfig(
        project=args.project or "", region=args.region or "", serving_image=args.serving_image or "",
        model_id=args.model_id, endpoint_id=args.endpoint_id, model_display_name=args.model_display_name,
        version_aliases=tuple(args.version_alias), machine_type=args.machine_type,
        min_replica_count=args.min_replicas, max_replica_count=args.max_replicas,
        canary_percent=args.canary_percent, keep_previous=args.keep_previous, service_account=args.service_account,
        admin_token_uri=args.admin_token_uri,
        invoke_routes=args.invoke_routes, request_logging_sampling_rate=args.request_logging_rate,
        request_logging_bq_table=args.request_logging_table)


def run(args: argparse.Namespace) -> int:
    from visrec.stages.release.deploy import DeployConfig, deploy_release
    from visrec.stages.release.release import REFUSED

    result = deploy_release(DeployConfig(
        registry=args.registry, model_dir=args.model, embeddings_dir=args.embeddings, index_dir=args.index,
        listings_uri=args.listings, metrics_uri=args.metrics, version=args.version,
        require_approval=args.require_approval, target=args.target, vertex=vertex_config_from_args(args),
        encoder_kind=args.encoder_kind, catalog_snapshot_at=args.catalog_snapshot_at))
    print(f"{result.status}: {result.message}")
    if result.path:
        print(f"release {result.version} at {result.path}")
    return 3 if result.status == REFUSED else 0

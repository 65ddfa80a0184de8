"""`visrec submit`: submit the compiled pipeline to Vertex AI Pipelines."""

from __future__ import annotations

import argparse

HELP = "submit a pipeline run to Vertex AI Pipelines"


def add_vertex_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags shared by `submit` and `schedule`."""
    parser.add_argument("--config", help="run config YAML (default: visrec/configs/vertex.yaml)")
    parser.add_argument("--project", help="Google Cloud project")
    parser.add_argument("--region", help="Vertex AI region, e.g. us-central1")
    parser.add_argument("--pipeline-root", help="gs:// root for pipeline artifacts")
    parser.add_argument("--template", help="compiled pipeline (local YAML, gs:// or Artifact Registry URL)")
    parser.add_argument("--service-account", help="service account the run executes as")
    parser.add_argument("--data-snapshot", help="a label for the input data, recorded with the run (the cache key "
                                                "is the data's own fingerprint, docs/data-versions.md)")
    parser.add_argument("--param", action="append", metavar="KEY=VALUE", help="override a pipeline parameter")
    parser.add_argument("--cache", action=argparse.BooleanOptionalAction, default=None,
                        help="--no-cache recomputes every task, --cache caches every task (decisions included); "
                             "default: each task's own setting (data tasks cached by data fingerprint)")
    parser.add_argument("--experiment", help="Vertex AI Experiment the run(s) are attached to")


def vertex_config_from_args(args: argparse.Namespace):
    from visrec.orchestration.pipeline_config import load_run_config, parse_overrides
    from visrec.orchestration.vertex_pipelines import VertexPipelineConfig

    cfg = load_run_config(args.config, "vertex.yaml")
    vertex = dict(cfg["vertex"])
    params = dict(cfg["parameters"])
    params.update(parse_overrides(args.param))
    if args.data_snapshot:
        params["data_snapshot"] = args.data_snapshot
    for flag, key in (("project", "project"), ("region", "region"), ("pipeline_root", "pipeline_root"),
                      ("template", "template_path"), ("service_account", "service_account")):
        if getattr(args, flag):
            vertex[key] = getattr(args, flag)
    if args.cache is not None:
        vertex["enable_caching"] = args.cache
    if args.experiment:
        vertex["experiment"] = args.experiment
    return VertexPipelineConfig(project=vertex.pop("project", ""), region=vertex.pop("region", ""),
                                pipeline_root=vertex.pop("pipeline_root", ""), parameter_values=params,
                                **vertex)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_vertex_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from visrec.orchestration.vertex_pipelines import submit_pipeline

    name = submit_pipeline(vertex_config_from_args(args))
    print(f"submitted {name}")
    return 0

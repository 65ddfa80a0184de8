"""`visrec compile`: write the pipeline's KFP IR YAML (and optionally upload the template)."""

from __future__ import annotations

import argparse

HELP = "compile the KFP pipeline to IR YAML; --upload to GCS or an Artifact Registry KFP repository"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="pipeline.yaml", help="where to write the IR YAML")
    parser.add_argument("--upload", action="append", default=[], metavar="DEST",
                        help="gs://.../pipeline.yaml or https://REGION-kfp.pkg.dev/PROJECT/REPO (repeatable)")
    parser.add_argument("--tag", action="append", default=[], help="template tag for Artifact Registry uploads")


def run(args: argparse.Namespace) -> int:
    from components.images import REGISTRY, TAG
    from pipelines.compile import compile_pipeline, upload_template

    path = compile_pipeline(args.out)
    print(f"compiled {path} (images {REGISTRY}/*:{TAG})")
    for dest in args.upload:
        print(f"uploaded {upload_template(path, dest, args.tag)}")
    return 0

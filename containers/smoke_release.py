"""A tiny release for the image smoke test, built inside the image by the image's own visrec.

Usage (inside an image): python smoke_release.py OUT_DIR -> OUT_DIR/registry with CURRENT set,
and OUT_DIR/query.txt holding an on-sale item id to ask for similar items.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(out: Path) -> None:
    from visrec.sim.demo_data import DemoDataConfig, generate_marketplace
    from visrec.stages.configs import EmbedConfig
    from visrec.stages.embed import run_embed
    from visrec.stages.index.build import build_index
    from visrec.stages.index.config import IndexConfig
    from visrec.model.encoders import init_models
    from visrec.stages.release.deploy import DeployConfig, deploy_release

    data, models = out / "data", out / "models"
    generate_marketplace(data, DemoDataConfig(items=40, seed=0))
    init_models(models, listings_uri=str(data / "listings.jsonl"))
    run_embed(EmbedConfig(data_uri=str(data / "listings.jsonl"), model_uri=str(models / "siglip"),
                          out_dir=str(out / "embeddings"), pca_dims=8, shards=1))
    build_index(str(out / "embeddings"), str(out / "index"), IndexConfig(tuning_queries=10, max_p99_ms=None))
    # The smoke test checks that the image serves, not the model: a gate result that lets it deploy.
    (out / "metrics.json").write_text(json.dumps(
        {"decision": "deploy", "reasons": [{"passed": True, "message": "image smoke test"}]}))
    deploy_release(DeployConfig(registry=str(out / "registry"), model_dir=str(models / "siglip"),
                                embeddings_dir=str(out / "embeddings"), index_dir=str(out / "index"),
                                listings_uri=str(data / "listings.jsonl"), metrics_uri=str(out / "metrics.json")))
    rows = [json.loads(line) for line in (data / "listings.jsonl").read_text().splitlines()]
    (out / "query.txt").write_text(next(r["item_id"] for r in rows if r["status"] == "on_sale"))


if __name__ == "__main__":
    main(Path(sys.argv[1]))

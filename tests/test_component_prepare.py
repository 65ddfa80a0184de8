"""The stage-1 KFP component runs under `kfp.local` (SubprocessRunner) and fills its artifacts."""

# No `from __future__ import annotations`: KFP reads the pipeline's parameter annotations as types.

import io as _bytes_io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

pytestmark = pytest.mark.integration


def test_prepare_dataset_component_under_kfp_local(tmp_path):
    from kfp import dsl, local

    from components.prepare_dataset import prepare_dataset

    images = tmp_path / "market" / "images"
    images.mkdir(parents=True)
    rows = []
    for i in range(6):
        Image.new("RGB", (20, 12), (40 * i, 90, 10)).save(images / f"k{i}.jpg")
        rows.append({"item_id": f"k{i}", "title": f"item {i}", "image_uri": f"images/k{i}.jpg", "category": "Men/Shoes",
                     "price": 1000 + i, "status": "reserved" if i == 0 else "on_sale",
                     "listed_at": "2024-05-01T00:00:00Z"})
    rows[1]["price"] = -5
    listings = tmp_path / "market" / "listings.jsonl"
    listings.write_text("".join(json.dumps(r) + "\n" for r in rows))

    @dsl.pipeline
    def prepare_pipeline(listings_uri: str):
        listings = dsl.importer(artifact_uri=listings_uri, artifact_class=dsl.Dataset, reimport=False)
        prepare_dataset(listings=listings.output, data_fingerprint="sha256:abc", max_pairs=0, val_fraction=0.0,
                        seed=0, image_size=16, shards=2, runner="DirectRunner", beam_options=[], pipeline_job="run",
                        pipeline_task="prepare-dataset")

    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "root"))
    prepare_pipeline(listings_uri=str(listings))
    [executor_output] = list((tmp_path / "root").rglob("prepare-dataset/executor_output.json"))
    output = json.loads(executor_output.read_text())
    assert output["parameterValues"]["Output"] == 4
    [dataset] = output["artifacts"]["dataset"]["artifacts"]
    assert dataset["metadata"]["data_fingerprint"] == "sha256:abc"
    out = dataset["uri"]
    stats = json.loads(open(f"{out}/stats.json").read())
    assert stats["reserved_excluded"] == 1 and stats["rejected"] == {"invalid_price": 1}
    table = pa.concat_tables(pq.read_table(p) for p in sorted(Path(out).glob("data-*.parquet")))
    assert sorted(table.column("item_id").to_pylist()) == ["k2", "k3", "k4", "k5"]
    assert set(table.column("split").to_pylist()) == {"train"}
    assert len(list(Path(out).glob("data-*.parquet"))) == 2  # the shard count is a parameter
    assert Image.open(_bytes_io.BytesIO(table.column("image")[0].as_py())).size == (16, 16)
    metrics = output["artifacts"]["metrics"]["artifacts"][0]["metadata"]
    assert metrics["train_pairs"] == 4.0 and metrics["rejected.invalid_price"] == 1.0
    assert metrics["reserved_excluded"] == 1.0 and metrics["input_rows"] == 6.0

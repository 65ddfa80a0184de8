"""Stage 3: the Beam embedding pipeline against the model run directly, PCA reuse, dead letters, gs://."""

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from visrec.core import io
from visrec.cli import main as cli_main
from visrec.stages.configs import EmbedConfig
from visrec.stages.embed import build_pipeline, encoder_handler, plan_input, run_embed
from visrec.core.errors import UserError
from visrec.data.embeddings import EMBEDDINGS_SCHEMA, read_embeddings, write_embeddings
from visrec.model.encoders import encoder_kind
from visrec.model.pca import PcaProjection, l2_normalise

ITEMS = 24  # marketplace photos per test catalog: enough for batches and shards, fast on 2 cores
CORRUPT_ID = "corrupt-jpeg"


def _listings(marketplace: Path) -> list[dict]:
    return [json.loads(line) for line in (marketplace / "listings.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def prepared(marketplace, tmp_path_factory) -> Path:
    """A stage-1-shaped dataset: two `data-*.parquet` shards of item_id + JPEG bytes, one corrupt image."""
    out = tmp_path_factory.mktemp("prepared")
    rows = [(r["item_id"], (marketplace / r["image_uri"]).read_bytes()) for r in _listings(marketplace)[:ITEMS]]
    rows.append((CORRUPT_ID, rows[0][1][: len(rows[0][1]) // 3]))  # a truncated JPEG
    for shard in range(2):
        part = rows[shard::2]
        pq.write_table(pa.table({"item_id": [r[0] for r in part], "image": pa.array([r[1] for r in part], pa.binary()),
                                 "split": ["train"] * len(part)}),
                       out / f"data-{shard:05d}-of-00002.parquet")
    return out


def _direct_embeddings(model_dir: Path, kind: str, images: dict[str, bytes]) -> dict[str, np.ndarray]:
    """The reference: the encoder applied to the same images in one plain PyTorch batch."""
    import torch

    from visrec.data.images import decode_image
    from visrec.model.encoders import load_image_encoder, preprocess_images

    encoder = load_image_encoder(str(model_dir), kind)
    ids = sorted(images)
    with torch.inference_mode():
        features = encoder(preprocess_images(encoder, [decode_image(images[i]) for i in ids]))
    return dict(zip(ids, l2_normalise(features.numpy())))


def _by_id(out: str) -> dict[str, np.ndarray]:
    ids, vectors = read_embeddings(out)
    assert len(ids) == len(set(ids))
    return dict(zip(ids, vectors))


@pytest.fixture(scope="module")
def raw_run(prepared, tiny_models, tmp_path_factory) -> tuple[str, dict]:
    """SigLIP embeddings of the prepared data without PCA, with small, adaptive batches."""
    out = str(tmp_path_factory.mktemp("raw"))
    stats = run_embed(EmbedConfig(data_uri=str(prepared), model_uri=str(tiny_models / "siglip"), out_dir=out,
                                  pca_dims=0, batch_size=8, min_batch_size=2, shards=3))
    return out, stats


@pytest.fixture(scope="module")
def pca_run(prepared, tiny_models, tmp_path_factory) -> tuple[str, dict]:
    out = str(tmp_path_factory.mktemp("pca"))
    stats = run_embed(EmbedConfig(data_uri=str(prepared), model_uri=str(tiny_models / "siglip"), out_dir=out,
                                  pca_dims=8, batch_size=16))
    return out, stats


def test_beam_embeddings_equal_the_model_run_directly(raw_run, prepared, tiny_models):
    out, stats = raw_run
    images = {}
    for f in sorted(prepared.glob("data-*.parquet")):
        t = pq.read_table(f)
        images.update(zip(t["item_id"].to_pylist(), t["image"].to_pylist()))
    del images[CORRUPT_ID]
    expected = _direct_embeddings(tiny_models / "siglip", "siglip", images)
    got = _by_id(out)
    assert set(got) == set(expected)
    for item_id, vector in expected.items():
        np.testing.assert_allclose(got[item_id], vector, atol=1e-5)
        assert np.linalg.norm(got[item_id]) == pytest.approx(1.0, abs=1e-5)
    assert stats.items == ITEMS and stats.rejected == 1
    assert stats.dims == 64 and stats.pca_explained_variance is None
    assert stats.items_per_second > 0 and stats.seconds > 0
    assert json.loads(Path(out, "embed_stats.json").read_text())["items"] == ITEMS
    assert sorted(p.name for p in Path(out).glob("embeddings-*.parquet")) == [
        f"embeddings-0000{i}-of-00003.parquet" for i in range(3)]
    assert not Path(out, "pca").exists()


def test_corrupt_image_goes_to_dead_letters(raw_run):
    out, _ = raw_run
    rejected = [json.loads(line) for line in Path(out, "rejected.jsonl").read_text().splitlines()]
    assert len(rejected) == 1
    assert rejected[0]["item_id"] == CORRUPT_ID and rejected[0]["reason"] == "undecodable_image"
    assert rejected[0]["detail"]


def test_pca_output_is_the_fitted_projection_of_the_raw_embeddings(pca_run, raw_run):
    out, stats = pca_run
    pca = PcaProjection.load(str(Path(out, "pca")))
    assert pca.dims == stats.dims == 8
    assert stats.pca_explained_variance == pytest.approx(pca.explained_variance)
    assert 0 < stats.pca_explained_variance <= 1
    raw, reduced = _by_id(raw_run[0]), _by_id(out)
    assert set(raw) == set(reduced)
    ids = sorted(raw)
    np.testing.assert_allclose(np.stack([reduced[i] for i in ids]),
                               pca.transform(np.stack([raw[i] for i in ids])), atol=1e-5)
    # The fit sees every embedded item here, so it is the fit of the raw embeddings themselves.
    direct = PcaProjection.fit(np.stack([raw[i] for i in ids]), 8)
    np.testing.assert_allclose(pca.explained_variance_ratio, direct.explained_variance_ratio, rtol=1e-4)


def test_listings_input_with_an_existing_pca(pca_run, marketplace, tiny_models, tmp_path):
    """New listings are projected with the production PCA: same vector for the same item; bad rows dead-lettered.

    Also runs the model shared across processes (Beam's cross-process proxy), as on a GPU worker.
    """
    listings = _listings(marketplace)[:6]
    for row in listings:
        row["image_uri"] = str(marketplace / row["image_uri"])  # absolute paths work as well as relative
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "broken.jpg").write_bytes(b"not a jpeg")
    lines = [json.dumps(r) for r in listings]
    lines += [json.dumps(dict(listings[0], item_id="new-broken", image_uri="images/broken.jpg")),
              json.dumps(dict(listings[0], item_id="new-missing", image_uri="images/missing.jpg")),
              json.dumps(dict(listings[1], title="duplicate")),
              '{"item_id": "truncated json',
              json.dumps(dict(listings[2], item_id="no-price", price=None))]
    listings_file = tmp_path / "listings.jsonl"
    listings_file.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    rc = cli_main(["embed", "--data", str(listings_file), "--model", str(tiny_models / "siglip"), "--out", str(out),
                   "--pca", pca_run[0] + "/pca", "--batch-size", "4", "--shards", "2", "--share-model",
                   "--precision", "fp32"])
    assert rc == 0
    assert json.loads((out / "embed_stats.json").read_text())["config"]["precision"] == "fp32"
    reused = _by_id(str(out))
    production = _by_id(pca_run[0])
    assert set(reused) == {r["item_id"] for r in listings}
    for item_id, vector in reused.items():
        np.testing.assert_allclose(vector, production[item_id], atol=1e-5)
    # The PCA used travels with the embeddings, unchanged.
    with np.load(out / "pca" / "pca.npz") as a, np.load(Path(pca_run[0], "pca", "pca.npz")) as b:
        np.testing.assert_array_equal(a["components"], b["components"])
    reasons = {}
    for line in (out / "rejected.jsonl").read_text().splitlines():
        record = json.loads(line)
        reasons[record["reason"]] = record
    assert set(reasons) == {"undecodable_image", "unreadable_image", "duplicate_item_id", "malformed_json",
                            "missing_column:price"}
    assert reasons["undecodable_image"]["item_id"] == "new-broken"
    assert reasons["unreadable_image"]["item_id"] == "new-missing"
    assert reasons["duplicate_item_id"]["item_id"] == listings[1]["item_id"]
    stats = json.loads((out / "embed_stats.json").read_text())
    assert (stats["items"], stats["rejected"], stats["dims"]) == (6, 5, 8)


def test_baseline_has_the_same_format_and_gcs_works(prepared, tiny_models, gcs_emulator):
    """MobileNetV2 baseline, reading and writing gs:// (the emulator), lands in the very same format."""
    bucket = gcs_emulator()
    io.upload_dir(prepared, f"gs://{bucket}/prepared")
    out = f"gs://{bucket}/baseline"
    io.write_text(f"{out}/embeddings-00000-of-00009.parquet", "stale output of an earlier run")
    stats = run_embed(EmbedConfig(data_uri=f"gs://{bucket}/prepared", model_uri=str(tiny_models / "mobilenet_v2"),
                                  out_dir=out, kind="mobilenet_v2", pca_dims=16, batch_size=32, shards=2))
    assert (stats.items, stats.rejected, stats.dims) == (ITEMS, 1, 16)
    files = io.list_files(out, "embeddings-*.parquet")
    assert [f.rsplit("/", 1)[1] for f in files] == ["embeddings-00000-of-00002.parquet",
                                                     "embeddings-00001-of-00002.parquet"]
    assert pq.read_schema(io.local_file(files[0])).equals(EMBEDDINGS_SCHEMA)
    ids, vectors = read_embeddings(out)
    assert len(ids) == ITEMS and vectors.shape == (ITEMS, 16) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert PcaProjection.load(f"{out}/pca").dims == 16
    assert io.read_json(f"{out}/embed_stats.json")["items"] == ITEMS
    assert len(io.read_text(f"{out}/rejected.jsonl").splitlines()) == 1


def test_write_read_embeddings_round_trip(tmp_path):
    ids = [f"m{i}" for i in range(10)]
    vectors = np.random.default_rng(0).normal(size=(10, 5)).astype(np.float32)
    write_embeddings(str(tmp_path / "embeddings-00000-of-00001.parquet"), ids, vectors)
    got_ids, got = read_embeddings(str(tmp_path))
    assert got_ids == ids
    np.testing.assert_array_equal(got, vectors)


def test_user_errors(tiny_models, tmp_path, capsys):
    model = str(tiny_models / "siglip")
    assert cli_main(["embed", "--data", str(tmp_path / "nothing"), "--model", model, "--out", str(tmp_path)]) == 2
    assert "error" in capsys.readouterr().err
    assert cli_main(["embed", "--data", str(tmp_path), "--model", model, "--out", str(tmp_path),
                     "--pca", str(tmp_path / "no-pca")]) == 2
    assert cli_main(["embed", "--data", str(tmp_path), "--model", model, "--out", str(tmp_path),
                     "--pca-dims", "-1"]) == 2
    with pytest.raises(SystemExit) as exc:  # argparse: only bf16 and fp32
        cli_main(["embed", "--data", str(tmp_path), "--model", model, "--out", str(tmp_path), "--precision", "fp16"])
    assert exc.value.code == 2


def test_the_encoder_kind_is_the_checkpoints(raw_run, prepared, tiny_models, tmp_path, capsys):
    """No kind given: the checkpoint's own (its config.json); a kind it is not is refused before any work."""
    assert encoder_kind(str(tiny_models / "siglip")) == raw_run[1].config.kind == "siglip"
    assert encoder_kind(str(tiny_models / "mobilenet_v2")) == "mobilenet_v2"
    out = tmp_path / "out"
    with pytest.raises(UserError, match="mobilenet_v2 checkpoint, not siglip"):
        run_embed(EmbedConfig(data_uri=str(prepared), model_uri=str(tiny_models / "mobilenet_v2"), out_dir=str(out),
                              kind="siglip"))
    assert not out.exists()
    assert cli_main(["embed", "--data", str(prepared), "--model", str(tiny_models / "siglip"), "--out", str(out),
                     "--kind", "mobilenet_v2"]) == 2
    assert "siglip checkpoint, not mobilenet_v2" in capsys.readouterr().err
    with pytest.raises(UserError, match="cannot read the model config"):
        encoder_kind(str(tmp_path))


def test_precision_is_bf16_fp32_or_the_device_default(tmp_path):
    config = dict(data_uri=str(tmp_path), model_uri="m", out_dir=str(tmp_path))
    assert EmbedConfig(**config).precision is None  # bf16 on a GPU worker, fp32 on a CPU one
    for precision in ("bf16", "fp32", None):
        EmbedConfig(**config, precision=precision)
    for precision in ("fp16", "BF16", ""):
        with pytest.raises(UserError, match="precision"):
            EmbedConfig(**config, precision=precision)


def test_bf16_run_embed_matches_fp32(raw_run, prepared, tiny_models, tmp_path):
    """`EmbedConfig.precision` reaches the encoder through the pipeline: bf16 vectors, close to fp32's."""
    out = str(tmp_path / "bf16")
    stats = run_embed(EmbedConfig(data_uri=str(prepared), model_uri=str(tiny_models / "siglip"), out_dir=out,
                                  pca_dims=0, batch_size=8, precision="bf16"))
    assert stats.items == ITEMS and stats.config.precision == "bf16"
    fp32, bf16 = _by_id(raw_run[0]), _by_id(out)
    assert set(bf16) == set(fp32)
    cosine = np.array([bf16[i] @ fp32[i] for i in fp32])
    assert cosine.min() > 0.99 and not all(np.array_equal(bf16[i], fp32[i]) for i in fp32)


@pytest.mark.parametrize("settings, shared", [({"share_model": True}, True), ({}, False)])
def test_share_model_reaches_the_beam_handler(prepared, tiny_models, tmp_path, settings, shared):
    """`EmbedConfig.share_model` (the component passes it) becomes Beam's `large_model`: one copy per machine."""
    import apache_beam as beam
    from apache_beam.ml.inference.base import RunInference

    config = EmbedConfig(data_uri=str(prepared), model_uri=str(tiny_models / "siglip"), out_dir=str(tmp_path),
                         **settings)
    assert encoder_handler(config).share_model_across_processes() is shared

    # And it is that handler the built pipeline runs (nothing is executed).
    p = beam.Pipeline()
    build_pipeline(p, config, plan_input(config.data_uri), image_processor=None, pca=None)
    handlers = []

    class FindRunInference(beam.pipeline.PipelineVisitor):
        def enter_composite_transform(self, node) -> None:
            if isinstance(node.transform, RunInference):
                handlers.append(node.transform._model_handler)

    p.visit(FindRunInference())
    assert [h.share_model_across_processes() for h in handlers] == [shared]


@pytest.mark.integration
def test_component_under_kfp_local(prepared, tiny_models, tmp_path):
    """The candidate from an upstream Model artifact and the baseline from a URI, in one local pipeline."""
    from kfp import dsl, local

    from components.embed import embed as embed_component

    @dsl.pipeline
    def embed_pipeline(data_uri: str, trained_uri: str, baseline_uri: str):
        data = dsl.importer(artifact_uri=data_uri, artifact_class=dsl.Dataset, reimport=False)
        trained = dsl.importer(artifact_uri=trained_uri, artifact_class=dsl.Model, reimport=False)
        settings = dict(data=data.output, data_fingerprint="sha256:x", batch_size=16, shards=4, device="auto",
                        precision="", share_model=False, runner="DirectRunner", beam_options=[], pipeline_job="run",
                        pipeline_task="embed")
        embed_component(model=trained.output, pca_dims=8, **settings)
        embed_component(model_uri=baseline_uri, pca_dims=0, **settings)

    root = tmp_path / "root"
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root))
    embed_pipeline(data_uri=str(prepared), trained_uri=str(tiny_models / "siglip"),
                   baseline_uri=str(tiny_models / "mobilenet_v2"))
    stats = {json.loads(f.read_text())["config"]["kind"]: json.loads(f.read_text())
             for f in root.rglob("embeddings/embed_stats.json")}
    assert stats["siglip"]["dims"] == 8 and stats["mobilenet_v2"]["dims"] == 1280
    assert stats["siglip"]["items"] == stats["mobilenet_v2"]["items"] == ITEMS
    # The `pca` output artifact holds a copy of the fitted projection; the baseline (pca_dims=0) has none.
    [pca_copy] = [f for f in root.rglob("pca.npz") if f.parent.parent.name != "embeddings"]
    assert PcaProjection.load(str(pca_copy)).dims == 8
    logged = [json.loads(f.read_text())["artifacts"]["metrics"]["artifacts"][0]["metadata"]
              for f in root.rglob("executor_output.json")]
    assert sorted(m["dims"] for m in logged) == [8, 1280]

"""One encode function: stage 3 and serving upserts give an image the very same index vector."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ITEMS = 6


def test_batch_embedding_and_serving_upserts_give_bit_identical_vectors(marketplace, tiny_models, tmp_path):
    from visrec.data.embeddings import read_embeddings
    from visrec.model.encode import encode_images
    from visrec.model.encoders import encoder_input_size, load_image_encoder
    from visrec.model.pca import PcaProjection
    from visrec.online.config import ServingConfig
    from visrec.online.uploads import read_upload
    from visrec.stages.configs import EmbedConfig
    from visrec.stages.embed import run_embed

    listings = [json.loads(line) for line in (marketplace / "listings.jsonl").read_text().splitlines()[:ITEMS]]
    images = {row["item_id"]: (marketplace / row["image_uri"]).read_bytes() for row in listings}
    prepared = tmp_path / "prepared"
    prepared.mkdir()
    pq.write_table(pa.table({"item_id": list(images), "image": pa.array(list(images.values()), pa.binary())}),
                   prepared / "data-00000-of-00001.parquet")
    model_dir = tiny_models / "siglip"
    # The production PCA, as a release carries it (fitted here on other vectors than the ones compared).
    rng = np.random.default_rng(0)
    pca = PcaProjection.fit(rng.standard_normal((64, load_image_encoder(str(model_dir)).dims)), 8)
    pca.save(str(tmp_path / "pca.npz"))

    # Stage 3, one image per forward pass, as an upsert embeds one.
    out = tmp_path / "embeddings"
    run_embed(EmbedConfig(data_uri=str(prepared), model_uri=str(model_dir), out_dir=str(out),
                          pca_uri=str(tmp_path / "pca.npz"), batch_size=1, shards=1))
    ids, vectors = read_embeddings(str(out))
    batch = dict(zip(ids, vectors))

    # Serving: the request's image read and decoded as `PUT /v1/items/{id}` does, then embedded.
    encoder = load_image_encoder(str(model_dir))
    served = PcaProjection.load(str(tmp_path / "pca.npz"))
    for item_id, data in images.items():
        _, image = read_upload({"image": base64.b64encode(data).decode()}, ServingConfig(),
                               encoder_input_size(model_dir))
        vector = encode_images(encoder, [image], served)[0]
        assert vector.dtype == batch[item_id].dtype == np.float32
        assert np.array_equal(vector, batch[item_id]), item_id
    assert set(batch) == set(images) and Path(out, "embed_stats.json").exists()

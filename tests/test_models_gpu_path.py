"""The encoder as GPU workers run it: only SigLIP's vision tower, float32 weights, bf16 autocast.

Everything runs on CPU (bf16 autocast works there too), on the tiny `init-models` stand-ins.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from visrec.stages.embed import ImageEncoderHandler
from visrec.core.errors import UserError
from visrec.data.images import decode_image
from visrec.model.encoders import image_features, load_image_encoder, load_siglip, preprocess_images

IMAGES = 8


@pytest.fixture(scope="module")
def photos(marketplace: Path) -> list:
    """A few generated marketplace photos, decoded."""
    rows = [json.loads(line) for line in (marketplace / "listings.jsonl").read_text().splitlines()[:IMAGES]]
    return [decode_image((marketplace / r["image_uri"]).read_bytes()) for r in rows]


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_siglip_encoder_is_the_vision_tower_with_the_old_features(tiny_models, photos):
    """The vision tower alone gives what the whole `SiglipModel`'s `get_image_features` gave, quietly."""
    from transformers import SiglipModel, SiglipVisionModel

    # transformers' loggers do not propagate to the root logger, so listen on theirs.
    records, transformers_log = _Records(), logging.getLogger("transformers")
    transformers_log.addHandler(records)
    try:
        encoder = load_image_encoder(str(tiny_models / "siglip"), "siglip")
    finally:
        transformers_log.removeHandler(records)
    assert not [m for m in records.messages if "LOAD REPORT" in m], records.messages

    full = SiglipModel.from_pretrained(str(tiny_models / "siglip")).eval()
    assert isinstance(encoder.model, SiglipVisionModel) and not hasattr(encoder.model, "text_model")
    assert sum(p.numel() for p in encoder.parameters()) == sum(p.numel() for p in full.vision_model.parameters())
    assert encoder.dims == full.config.vision_config.hidden_size == 64
    pixels = preprocess_images(encoder, photos)
    with torch.inference_mode():
        old, new = image_features(full, pixels), encoder(pixels)
    np.testing.assert_allclose(new.numpy(), old.numpy(), atol=1e-5)


def test_a_checkpoint_without_a_vision_tower_is_refused(tiny_models):
    """transformers would fill the missing weights with random values: a silent random encoder."""
    with pytest.raises(UserError, match="vision tower"):
        load_image_encoder(str(tiny_models / "mobilenet_v2"), "siglip")


def test_bf16_checkpoints_load_as_float32(tiny_models, tmp_path):
    """transformers 5 would keep a bf16 checkpoint in bf16 (`dtype="auto"`); training needs fp32 weights."""
    from transformers import AutoImageProcessor, AutoProcessor, MobileNetV2Model, SiglipModel

    siglip_dir, mobilenet_dir = tmp_path / "siglip", tmp_path / "mobilenet_v2"
    siglip = SiglipModel.from_pretrained(str(tiny_models / "siglip")).to(torch.bfloat16)
    siglip.save_pretrained(siglip_dir)
    AutoProcessor.from_pretrained(str(tiny_models / "siglip")).save_pretrained(siglip_dir)
    MobileNetV2Model.from_pretrained(str(tiny_models / "mobilenet_v2")).to(torch.bfloat16).save_pretrained(
        mobilenet_dir)
    AutoImageProcessor.from_pretrained(str(tiny_models / "mobilenet_v2")).save_pretrained(mobilenet_dir)

    model, _ = load_siglip(str(siglip_dir))
    encoder = load_image_encoder(str(siglip_dir), "siglip")
    baseline = load_image_encoder(str(mobilenet_dir), "mobilenet_v2")
    for module in (model, encoder, baseline):
        assert {p.dtype for p in module.parameters()} == {torch.float32}
    # The right weights, upcast: the checkpoint's bf16 vision weights, exactly.
    saved = siglip.vision_model.state_dict()
    for name, value in encoder.model.state_dict().items():
        torch.testing.assert_close(value, saved[name].float(), rtol=0, atol=0)


@pytest.mark.parametrize("kind, min_cosine", [
    ("siglip", 0.99),
    # The random MobileNetV2 stand-in is chaotic: in fp32, 0.4% input noise (bf16's rounding) already
    # moves its features to cosine ~0.97, a JPEG re-encode at quality 90 to ~0.83. Its bf16 features
    # agree to 0.948 at worst on these photos; a trained CNN is not that sensitive, but none can be
    # downloaded here.
    ("mobilenet_v2", 0.9),
])
def test_bf16_autocast_features_agree_with_fp32(tiny_models, photos, kind, min_cosine):
    """Through the handler's own `load_model` + `run_inference`: float32, unit-norm, close to fp32."""
    handlers = {p: ImageEncoderHandler(str(tiny_models / kind), kind, "cpu", precision=p) for p in ("fp32", "bf16")}
    models = {p: h.load_model() for p, h in handlers.items()}
    assert (models["fp32"].precision, models["bf16"].precision) == ("fp32", "bf16")
    assert {p.dtype for p in models["bf16"].encoder.parameters()} == {torch.float32}
    batch = list(preprocess_images(models["fp32"].encoder, photos))
    fp32, bf16 = (np.stack(handlers[p].run_inference(batch, models[p])) for p in ("fp32", "bf16"))
    assert bf16.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(bf16, axis=1), 1.0, atol=1e-5)
    assert not np.array_equal(bf16, fp32)  # autocast did run in bf16
    cosine = (bf16 * fp32).sum(axis=1)
    assert cosine.min() > min_cosine, cosine


def test_default_precision_is_decided_where_the_model_runs(tiny_models, monkeypatch):
    """None: fp32 on a CPU worker (here), bf16 on a GPU one with bf16 tensor cores, fp32 on a T4."""
    from visrec.model.encoders import resolve_precision

    assert ImageEncoderHandler(str(tiny_models / "siglip"), "siglip", "cpu").load_model().precision == "fp32"
    assert resolve_precision(None, "cpu") == "fp32" and resolve_precision("bf16", "cpu") == "bf16"
    for native_bf16, expected in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: native_bf16)
        assert resolve_precision(None, "cuda") == expected
        assert resolve_precision("fp32", "cuda") == "fp32"

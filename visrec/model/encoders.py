"""Loading the real checkpoints, and creating tiny stand-ins with the same classes.

Production runs load `google/siglip-base-patch16-256-multilingual` (candidate) and
`google/mobilenet_v2_1.4_224` (baseline) with `from_pretrained`. No machine here can
download weights, so `init_models` creates randomly initialised *tiny* models of the
very same classes (`SiglipModel`, `MobileNetV2Model`), a tokenizer trained on the
catalog's titles and matching image processors, saved with `save_pretrained`. They
load back through exactly the code path the real checkpoints use; only the sizes and
the (random) weights differ.

Every loader asks for float32 weights: transformers 5 defaults to `dtype="auto"`,
which would keep a bf16 checkpoint in bf16 (training needs fp32 master weights;
inference picks its precision with autocast, `visrec.stages.embed`).
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from visrec.core import io
from visrec.core.errors import UserError

log = logging.getLogger(__name__)

SIGLIP_HUB_ID = "google/siglip-base-patch16-256-multilingual"
MOBILENET_HUB_ID = "google/mobilenet_v2_1.4_224"
KINDS = ("siglip", "mobilenet_v2")
TEXT_MAX_LENGTH = 64  # SigLIP was trained with max_length padding to 64 tokens.
TINY_NOTE = "visrec_tiny.json"  # beside the weights of a random stand-in: what it is

# A few bilingual product words so a tokenizer can be trained even without a catalog.
_FALLBACK_TITLES = [
    "白 Tシャツ 無地 美品", "black leather bag 黒 バッグ", "ストライプ シャツ blue striped shirt",
    "ドット柄 マグカップ red dotted mug", "チェック キャップ check cap green", "スニーカー 靴 sneakers",
    "ワンピース dress 花柄 floral", "新品 未使用 送料無料", "vintage jacket ヴィンテージ",
]


@dataclass
class TinyModelConfig:
    """Sizes of the stand-in models: small enough to train in minutes on 2 CPU cores."""

    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 2
    intermediate_size: int = 128
    image_size: int = 64
    patch_size: int = 16
    vocab_size: int = 2000
    mobilenet_depth_multiplier: float = 0.35
    seed: int = 0
    # The text tower's width; None: `hidden_size`. A narrower one projects to `hidden_size` (SigLIP's
    # text head), so image and text embeddings still share one space, at a fraction of the cost of
    # 64 padded tokens per title.
    text_hidden_size: int | None = None
    text_intermediate_size: int | None = None


def resolve_model_dir(uri: str, workdir: str | Path | None = None) -> str:
    """What `from_pretrained` should get: a local dir as is, a `gs://` dir downloaded, a hub id as is."""
    if io.is_gcs(uri):
        dest = Path(workdir or tempfile.mkdtemp(prefix="visrec-model-"))
        return str(io.download_dir(uri, dest))
    return str(uri)


def load_siglip(uri: str = SIGLIP_HUB_ID) -> tuple[Any, Any]:
    """A `SiglipModel` and its `AutoProcessor` (image processor + tokenizer) from a hub id or directory."""
    import torch
    from transformers import AutoProcessor, SiglipModel

    path = resolve_model_dir(uri)
    try:
        model = SiglipModel.from_pretrained(path, dtype=torch.float32)
        processor = AutoProcessor.from_pretrained(path)
    except OSError as exc:
        raise UserError(f"cannot load a SigLIP model from {uri}: {exc}") from exc
    return model, processor


def image_features(model: Any, pixel_values: Any) -> Any:
    """Pooled image embeddings of a `SiglipModel`.

    transformers 5.x returns an output object from `get_image_features`; older
    versions returned the tensor itself. Accept both so checkpoints of either era work.
    """
    out = model.get_image_features(pixel_values=pixel_values)
    return getattr(out, "pooler_output", out)


def text_features(model: Any, input_ids: Any) -> Any:
    """Pooled text embeddings of a `SiglipModel` (an output object or a tensor: see `image_features`)."""
    out = model.get_text_features(input_ids=input_ids)
    return getattr(out, "pooler_output", out)


def resolve_precision(precision: str | None, device_type: str) -> str:
    """The precision a model runs at on torch device type `device_type` (`cuda`/`cpu`).

    Unset means bf16 on a GPU with bf16 tensor cores (compute capability 8+: L4, A100,
    H100) and fp32 elsewhere: on CPU, and on a T4, where bf16 is only emulated and slower.
    fp16 needs a GPU (training's loss scaler does).
    """
    import torch

    if precision == "fp16" and device_type != "cuda":
        raise UserError("precision fp16 needs a GPU; use bf16 or fp32 on CPU")
    if precision:
        return precision
    if device_type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False):
        return "bf16"
    return "fp32"


def _image_encoder_class():
    import torch

    class ImageEncoder(torch.nn.Module):
        """`pixel_values (n, 3, H, W) -> (n, d)` pooled image features of either model kind.

        One interface for the fine-tuned SigLIP image tower (a `SiglipVisionModel`: its
        pooled output is what `SiglipModel.get_image_features` returns) and the
        MobileNetV2 baseline, so embedding, evaluation and serving treat them alike.
        """

        def __init__(self, model: Any, image_processor: Any, kind: str):
            super().__init__()
            self.model = model
            self.image_processor = image_processor
            self.kind = kind

        @property
        def dims(self) -> int:
            if self.kind == "siglip":
                return int(self.model.config.hidden_size)
            return int(self.model.conv_1x1.convolution.out_channels)

        def forward(self, pixel_values: Any) -> Any:
            return self.model(pixel_values=pixel_values).pooler_output

    return ImageEncoder


def _load_siglip_vision_tower(path: str, uri: str) -> Any:
    """The float32 `SiglipVisionModel` of the full `SiglipModel` checkpoint at `path` (fetched from `uri`).

    transformers maps the checkpoint's `vision_model.*` weights onto the tower; the text
    tower and the logit scale/bias are skipped on purpose, so their "unexpected keys"
    report is silenced, while a missing vision weight (which transformers would fill
    with random values) is an error.
    """
    import torch
    from transformers import SiglipVisionModel

    class SiglipVisionTower(SiglipVisionModel):
        _keys_to_ignore_on_load_unexpected = [r"^text_model\.", r"^logit_(scale|bias)$"]

    model, info = SiglipVisionTower.from_pretrained(path, dtype=torch.float32, output_loading_info=True)
    if info["missing_keys"]:
        raise UserError(f"{uri} is not a SigLIP checkpoint with a vision tower: missing "
                        f"{sorted(info['missing_keys'])[:5]}")
    return model


def encoder_kind(model_dir: str, expected: str = "") -> str:
    """The kind (`KINDS`) of the checkpoint at `model_dir` (hub id, local or `gs://` directory): the
    `model_type` its `config.json` records, which `save_pretrained` writes for both model classes.

    `expected` (a kind, or "" for none): the kind the caller was told; `UserError` when the
    checkpoint is another kind, is neither kind, or has no readable config.
    """
    try:
        if io.is_gcs(model_dir) or Path(model_dir).is_dir():
            config = io.read_json(io.join(model_dir, "config.json"))
        else:  # a hub id
            from transformers import PretrainedConfig

            config, _ = PretrainedConfig.get_config_dict(model_dir)
    except (OSError, ValueError) as exc:  # missing file or hub repo, invalid JSON
        raise UserError(f"cannot read the model config of {model_dir}: {exc}") from None
    kind = config.get("model_type")
    if kind not in KINDS:
        raise UserError(f"{model_dir} is a {kind!r} checkpoint; expected one of {KINDS}")
    if expected and expected != kind:
        raise UserError(f"{model_dir} is a {kind} checkpoint, not {expected}")
    return kind


def load_image_encoder(uri: str, kind: str = "") -> Any:
    """An `ImageEncoder` (eval mode, float32) for `kind` in `KINDS` ("": the checkpoint's own,
    `encoder_kind`), from a hub id, local or `gs://` directory.

    For SigLIP only the vision tower is loaded (a quarter of the production checkpoint),
    so every embedding worker and serving replica holds just what it runs.
    """
    if kind and kind not in KINDS:
        raise UserError(f"unknown model kind {kind!r}; expected one of {KINDS}")
    import torch
    from transformers import AutoImageProcessor

    path = resolve_model_dir(uri)
    kind = kind or encoder_kind(path)
    try:
        if kind == "siglip":
            model = _load_siglip_vision_tower(path, uri)
        else:
            from transformers import MobileNetV2Model

            model = MobileNetV2Model.from_pretrained(path, dtype=torch.float32)
        image_processor = AutoImageProcessor.from_pretrained(path)
    except OSError as exc:
        raise UserError(f"cannot load a {kind} model from {uri}: {exc}") from exc
    encoder = _image_encoder_class()(model, image_processor, kind)
    encoder.eval()
    return encoder


def preprocess_images(encoder: Any, images: Sequence[Any]) -> Any:
    """PIL images -> `pixel_values` tensor the encoder expects (its own processor's resize/normalise)."""
    return encoder.image_processor(images=list(images), return_tensors="pt")["pixel_values"]


def train_title_tokenizer(titles: Iterable[str], vocab_size: int = 2000, alphabet: Sequence[str] = ()) -> Any:
    """A Unigram tokenizer trained on catalog titles, wrapped as `PreTrainedTokenizerFast`.

    Unigram over NFKC-normalised, lower-cased text handles Japanese (no spaces) and
    English alike; `</s>` is appended as SigLIP's own tokenizer does. `alphabet`: characters
    every piece of text may need even if `titles` lack them (a tokenizer trained on one corpus
    and used on another spells unseen words with them instead of `<unk>`).
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    special_tokens = ["<pad>", "</s>", "<unk>"]
    trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=special_tokens,
                                      unk_token="<unk>", shrinking_factor=0.75, initial_alphabet=list(alphabet))
    tok.train_from_iterator(list(titles) + _FALLBACK_TITLES, trainer=trainer)
    tok.model = _canonical_unigram(json.loads(tok.to_str())["model"], len(special_tokens))
    eos = tok.token_to_id("</s>")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", eos)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                                   unk_token="<unk>", model_max_length=TEXT_MAX_LENGTH)


# The Unigram trainer appends the corpus characters that EM pruned, with scores
# min, min + 1e-4, min + 2e-4, ... handed out in (per-process random) hash-set order.
_APPENDED_CHAR_SCORE_STEP = 1e-4


def _canonical_unigram(model_state: dict, specials: int) -> Any:
    """The trained Unigram model made a function of the titles alone.

    Two things vary from run to run with the same titles: the last bits of the EM
    scores (the trainer sums over threads), and which appended character gets which
    of the appended scores. Both change the ids of pieces, so the same catalog gave
    a differently numbered vocabulary and a different training run each time.
    Scores are rounded to 1e-9, the appended characters (single characters on the
    min + k * 1e-4 grid) are re-dealt those scores in code-point order, and pieces
    are sorted by (score, piece).
    """
    from tokenizers import models

    vocab = model_state["vocab"]
    pieces = [(piece, round(score, 9)) for piece, score in vocab[specials:]]
    lowest = min(score for _, score in pieces)

    def grid_step(score: float) -> float:
        return (score - lowest) / _APPENDED_CHAR_SCORE_STEP

    appended = {piece: score for piece, score in pieces
                if len(piece) == 1 and abs(grid_step(score) - round(grid_step(score))) < 1e-3}
    rescored = dict(zip(sorted(appended), sorted(appended.values(), reverse=True)))
    pieces = sorted(((p, rescored.get(p, s)) for p, s in pieces), key=lambda p: (-p[1], p[0]))
    return models.Unigram([tuple(v) for v in vocab[:specials]] + pieces, unk_id=model_state["unk_id"],
                          byte_fallback=model_state.get("byte_fallback", False))


def _calibrate_random_cnn(model: Any, image_size: int, batches: int = 4, batch_size: int = 32) -> None:
    """Give a randomly initialised CNN activations of a usable scale.

    With transformers' default init (std 0.02) and untouched BatchNorm running
    statistics, a random MobileNetV2 shrinks its input at every block and pools to
    ~1e-25: every image would get the same (zero) embedding. He-initialised convolutions
    and BatchNorm statistics measured on random images give a random but informative
    feature extractor, which is what an untrained stand-in for the baseline should be.
    """
    import torch

    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight, mode="fan_out")
        elif isinstance(module, torch.nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # cumulative average over the calibration batches
    model.train()
    with torch.no_grad():
        for _ in range(batches):
            model(pixel_values=torch.rand(batch_size, 3, image_size, image_size) * 2 - 1)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = 0.1
    model.eval()


def _catalog_titles(listings_uri: str | None) -> list[str]:
    if not listings_uri:
        return []
    from visrec.data.schema import read_listings

    # The catalogue's reader: valid listings, each item's title once, in any of the three formats.
    return [row["title"] for row in read_listings(listings_uri).rows]


def new_siglip(config: TinyModelConfig, tokenizer: Any, logit_bias: float = -10.0) -> tuple[Any, Any]:
    """A randomly initialised `SiglipModel` of `config`'s sizes for `tokenizer`, and its `SiglipProcessor`.

    `logit_bias`: the initial bias b. The SigLIP paper's -10 balances the loss of a 32k-pair batch
    (-log 32768 ~ -10.4); a small batch from scratch wants about -log(batch size) instead.
    """
    import torch
    from transformers import SiglipConfig, SiglipImageProcessor, SiglipModel, SiglipProcessor

    common = dict(hidden_size=config.hidden_size, num_hidden_layers=config.num_layers,
                  num_attention_heads=config.num_heads, intermediate_size=config.intermediate_size)
    text = dict(common, vocab_size=len(tokenizer), max_position_embeddings=TEXT_MAX_LENGTH,
                pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                bos_token_id=tokenizer.eos_token_id)
    if config.text_hidden_size is not None:
        text.update(hidden_size=config.text_hidden_size, projection_size=config.hidden_size,
                    intermediate_size=config.text_intermediate_size or config.intermediate_size)
    siglip = SiglipModel(SiglipConfig(
        text_config=text, vision_config=dict(common, image_size=config.image_size, patch_size=config.patch_size)))
    with torch.no_grad():
        # The SigLIP paper's from-scratch initialisation, t' = log 10 and b = -10 unless told otherwise
        # (transformers zero-initialises both, which starts training far from a balanced sigmoid loss).
        siglip.logit_scale.fill_(math.log(10.0))
        siglip.logit_bias.fill_(logit_bias)
    image_processor = SiglipImageProcessor(size={"height": config.image_size, "width": config.image_size})
    return siglip, SiglipProcessor(image_processor=image_processor, tokenizer=tokenizer)


def new_mobilenet(config: TinyModelConfig) -> tuple[Any, Any]:
    """A randomly initialised, calibrated `MobileNetV2Model` of `config`'s sizes, and its image processor."""
    from transformers import MobileNetV2Config, MobileNetV2ImageProcessor, MobileNetV2Model

    mobilenet = MobileNetV2Model(MobileNetV2Config(depth_multiplier=config.mobilenet_depth_multiplier,
                                                   image_size=config.image_size))
    _calibrate_random_cnn(mobilenet, config.image_size)
    processor = MobileNetV2ImageProcessor(size={"shortest_edge": config.image_size},
                                          crop_size={"height": config.image_size, "width": config.image_size})
    return mobilenet, processor


def save_model(model: Any, processor: Any, out_dir: Path, note_name: str, note: dict) -> None:
    """`save_pretrained` of `model` and `processor` into `out_dir` (what a real checkpoint holds), plus
    `note_name` recording how the weights came about (so nobody mistakes them for the real ones)."""
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    io.write_json(str(out_dir / note_name), note)


def init_models(out_dir: str | Path, listings_uri: str | None = None,
                config: TinyModelConfig | None = None) -> dict[str, str]:
    """Create tiny random `siglip/` and `mobilenet_v2/` model directories under `out_dir`.

    Returns {kind: directory}. The directories hold exactly what `save_pretrained`
    writes for the real checkpoints, plus `visrec_tiny.json` recording that these are
    random stand-ins (so nobody mistakes them for trained weights).
    """
    import torch

    config = config or TinyModelConfig()
    torch.manual_seed(config.seed)
    titles = _catalog_titles(listings_uri)
    tokenizer = train_title_tokenizer(titles, vocab_size=config.vocab_size)
    siglip, processor = new_siglip(config, tokenizer)
    note = {"tiny_random_stand_in": True, "real_checkpoint": None, "config": asdict(config),
            "tokenizer_trained_on_titles": len(titles)}
    with io.output_dir(str(out_dir)) as local:
        save_model(siglip, processor, local / "siglip", TINY_NOTE, {**note, "real_checkpoint": SIGLIP_HUB_ID})
        mobilenet, mobilenet_processor = new_mobilenet(config)
        save_model(mobilenet, mobilenet_processor, local / "mobilenet_v2", TINY_NOTE,
                   {**note, "real_checkpoint": MOBILENET_HUB_ID})
    paths = {kind: io.join(str(out_dir), kind) for kind in KINDS}
    log.info("created tiny random models (tokenizer on %d titles): %s", len(titles), paths)
    return paths


def encoder_input_size(model_dir: str | Path) -> int | None:
    """The side, in pixels, of the images the encoder saved in `model_dir` is fed (its image
    processor's resize target), or None when its config does not say: what an image needs to be
    decoded at, at most, for it (`visrec.data.images.decode_image(target_size=...)`)."""
    try:
        config = json.loads((Path(model_dir) / "preprocessor_config.json").read_text())
    except (OSError, ValueError):
        return None
    sides = []
    for key in ("size", "crop_size"):
        value = config.get(key)
        sides += [value] if isinstance(value, int) else [v for v in (value or {}).values() if isinstance(v, int)]
    return max(sides) if sides else None


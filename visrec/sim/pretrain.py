"""Pretrained stand-ins the project builds itself, offline: the paper's two starting points.

The paper compares an ImageNet-pretrained MobileNetV2 (a classifier's features, used frozen)
with SigLIP pretrained on web image-text pairs and then fine-tuned on marketplace pairs.
Neither checkpoint can be downloaded here, and random weights are no bar for a gate, so
`pretrained_models` makes both from the synthetic web corpus (`visrec.sim.web_corpus`), which
is not the marketplace:

- SigLIP (`SiglipModel`, a small config whose image embedding is wide enough that PCA to a
  sixth of it is a real trade-off, as 768 -> 128 is) pretrained contrastively on the corpus's
  image-caption pairs by the project's own trainer (`visrec prepare` + `visrec train`, the
  sigmoid loss), with a tokenizer trained on the captions;
- MobileNetV2 (`MobileNetV2Model`) pretrained by supervised classification of the corpus's
  object classes (`visrec.model.classify.train_classifier`), its head then dropped.

The pair is cached by content: the key hashes `PretrainConfig`, the library versions and the
source of every module the weights depend on (`SOURCE_MODULES`), so a changed default or
changed code builds a new entry and an unchanged one is reused. The cache lives in
`$VISREC_CACHE_DIR/models` (default `$XDG_CACHE_HOME/visrec/models`, i.e. `~/.cache/visrec/models`),
one `pretrained-<key>/` directory per entry; delete it to force a rebuild. Builds run on CPU
(the same weights on every machine of one kind) and are serialised by a lock file, so two
processes asking at once build once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from visrec.core import io
from visrec.model.classify import ClassifierConfig
from visrec.model.encoders import TinyModelConfig
from visrec.online.lock import exclusive_lock
from visrec.sim.web_corpus import WebCorpusConfig

log = logging.getLogger(__name__)

CACHE_ENV = "VISREC_CACHE_DIR"
NOTE = "visrec_pretrained.json"  # beside each model's weights: how they were made
MANIFEST = "pretrain.json"  # in the cache entry: the config, the key, every training figure
KINDS = ("siglip", "mobilenet_v2")
# The modules whose code decides the weights; their source is part of the cache key.
SOURCE_MODULES = (
    "visrec.sim.pretrain", "visrec.sim.web_corpus", "visrec.sim.demo_data", "visrec.model.encoders",
    "visrec.model.classify", "visrec.model.siglip_loss", "visrec.data.images", "visrec.data.schema",
    "visrec.stages.prepare", "visrec.stages.configs", "visrec.stages.train.trainer", "visrec.stages.train.data",
    "visrec.stages.train.encoder", "visrec.stages.train.checkpoints",
)
LIBRARIES = ("torch", "transformers", "tokenizers", "numpy", "PIL")
# Characters a multilingual tokenizer knows although the corpus's captions may not use them all:
# ASCII letters and digits, hiragana, katakana and the long-vowel mark.
TOKENIZER_ALPHABET = tuple(
    [chr(c) for c in range(ord("a"), ord("z") + 1)] + [chr(c) for c in range(ord("0"), ord("9") + 1)]
    + [chr(c) for c in range(0x3041, 0x3097)] + [chr(c) for c in range(0x30A1, 0x30FB)] + ["ー"])


def _model_sizes() -> TinyModelConfig:
    # A 96-d embedding (PCA 96 -> 16 is the paper's 768 -> 128 ratio, a sixth) on 64 px images: wider
    # towers (192-d) stay on the sigmoid loss's constant-prediction plateau for longer than a few
    # minutes of CPU training can afford on a corpus this size.
    return TinyModelConfig(hidden_size=96, num_layers=2, num_heads=3, intermediate_size=384, image_size=64,
                           patch_size=16, vocab_size=2000, mobilenet_depth_multiplier=0.35, seed=0)


@dataclass
class PretrainConfig:
    """Everything the pretrained stand-ins are a function of (with the code in `SOURCE_MODULES`).

    corpus: the web corpus (`WebCorpusConfig`; its `workers` does not change the output).
    models: sizes of both models (`TinyModelConfig`) and the initialisation seed.
    siglip_epochs, siglip_batch_size, siglip_lr, siglip_warmup_steps: contrastive pretraining with
        `visrec train` on the corpus's image-caption pairs; the best epoch by validation recall is kept.
    val_fraction: share of the corpus held out (`visrec prepare`'s split) for both models' validation.
    mobilenet: classification pretraining (`ClassifierConfig`).
    """

    corpus: WebCorpusConfig = field(default_factory=WebCorpusConfig)
    models: TinyModelConfig = field(default_factory=_model_sizes)
    siglip_epochs: int = 5
    siglip_batch_size: int = 64
    siglip_lr: float = 1e-3
    siglip_warmup_steps: int = 20
    val_fraction: float = 0.05
    mobilenet: ClassifierConfig = field(default_factory=ClassifierConfig)

    def fingerprint(self) -> dict[str, Any]:
        """The settings the weights depend on (not how many processes render the corpus)."""
        out = dataclasses.asdict(self)
        out["corpus"].pop("workers")
        return out


@dataclass(frozen=True)
class PretrainedModels:
    """A cache entry: the model directories by kind, its key, whether this call built it, and the
    manifest (with how long the build took, now or when it was built: `build_seconds`)."""

    paths: dict[str, str]
    key: str
    built_now: bool
    manifest: dict[str, Any]

    @property
    def build_seconds(self) -> float:
        return self.manifest["seconds"]["total"]


# Where a model directory's weights came from (`model_origin`).
PRETRAINED, RANDOM, CHECKPOINT = "pretrained stand-in", "random stand-in", "checkpoint"


def model_origin(model_uri: str) -> str:
    """`PRETRAINED` for a directory `pretrained_models` wrote, `RANDOM` for `init_models`' tiny random
    ones, `CHECKPOINT` for anything else (a hub id, a real or fine-tuned checkpoint)."""
    from visrec.model.encoders import TINY_NOTE

    for note, origin in ((NOTE, PRETRAINED), (TINY_NOTE, RANDOM)):
        if io.exists(io.join(model_uri, note)):
            return origin
    return CHECKPOINT


def default_cache_dir() -> Path:
    """`$VISREC_CACHE_DIR/models`, else `$XDG_CACHE_HOME/visrec/models` (`~/.cache/visrec/models`)."""
    base = os.environ.get(CACHE_ENV) or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "visrec"
    return Path(base) / "models"


def cache_key(config: PretrainConfig) -> str:
    """Hex digest of the config, the library versions and the source of `SOURCE_MODULES`."""
    digest = hashlib.sha256(json.dumps(config.fingerprint(), sort_keys=True).encode())
    for name in LIBRARIES:
        digest.update(f"{name}={getattr(importlib.import_module(name), '__version__', '?')}".encode())
    for name in SOURCE_MODULES:
        digest.update(name.encode() + Path(importlib.import_module(name).__file__).read_bytes())
    return digest.hexdigest()[:16]


def pretrained_models(config: PretrainConfig | None = None, cache_dir: str | Path | None = None,
                      rebuild: bool = False) -> PretrainedModels:
    """The pretrained SigLIP and MobileNetV2 of `config`: from the cache, or built into it now.

    `rebuild` builds again even if the entry exists (and replaces it).
    """
    config = config or PretrainConfig()
    key = cache_key(config)
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    entry = root / f"pretrained-{key}"
    root.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(root / f"pretrained-{key}.lock"):
        built_now = rebuild or not (entry / MANIFEST).is_file()
        if built_now:
            staging = root / f"pretrained-{key}.building"
            shutil.rmtree(staging, ignore_errors=True)
            log.info("pretrained models %s: building into %s (a few minutes on CPU)", key, entry)
            build_pretrained(staging, config, key)
            shutil.rmtree(entry, ignore_errors=True)
            staging.rename(entry)
        else:
            log.info("pretrained models %s: reusing %s", key, entry)
    manifest = json.loads((entry / MANIFEST).read_text())
    return PretrainedModels(paths={kind: str(entry / kind) for kind in KINDS}, key=key, built_now=built_now,
                            manifest=manifest)


def copy_models(models: PretrainedModels, out_dir: str) -> dict[str, str]:
    """Copy a cache entry's model directories to `out_dir` (local or `gs://`); {kind: directory}."""
    with io.output_dir(out_dir) as local:
        for kind, path in models.paths.items():
            shutil.copytree(path, local / kind, dirs_exist_ok=True)
    return {kind: io.join(out_dir, kind) for kind in models.paths}


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """torch on one thread: the same arithmetic (hence weights) on every machine, and no collapse when
    the cores are shared (two OpenMP threads that wait on each other run several times slower there)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _pixels(table: Any, processor: Any, labels: dict[str, str], classes: list[str]) -> tuple[Any, Any]:
    """(pixel_values, class indices) of a prepared table's images, through the model's own processor."""
    import torch

    from visrec.data.images import decode_image

    images = [decode_image(data) for data in table.column("image").to_pylist()]
    index = {c: i for i, c in enumerate(classes)}
    targets = torch.tensor([index[labels[i]] for i in table.column("item_id").to_pylist()], dtype=torch.long)
    pixels = processor(images=images, return_tensors="pt")["pixel_values"] if images else torch.zeros(0, 3, 1, 1)
    return pixels, targets


def pretrain_mobilenet(prepared: str, pairs: str, out_dir: str, config: PretrainConfig, key: str) -> dict[str, Any]:
    """MobileNetV2: random (calibrated) init, then classification of the corpus's object classes
    (`train_classifier`) on `prepared`'s train split, validated on its val split; saved to `out_dir`
    with its note. Returns the classifier's figures. Runs in its own process beside SigLIP's training."""
    import torch

    from visrec.model.classify import train_classifier
    from visrec.model.encoders import MOBILENET_HUB_ID, new_mobilenet, save_model
    from visrec.stages.train.data import read_prepared

    with _one_thread():
        labels = {row["item_id"]: row["category"] for row in io.read_jsonl(pairs)}
        classes = sorted(set(labels.values()))
        torch.manual_seed(config.models.seed)
        model, processor = new_mobilenet(config.models)
        train_table, val_table = read_prepared(prepared)
        figures = train_classifier(model, _pixels(train_table, processor, labels, classes),
                                   _pixels(val_table, processor, labels, classes), len(classes), config.mobilenet)
    save_model(model, processor, Path(out_dir), NOTE, {
        **_note(config, key), "real_checkpoint": MOBILENET_HUB_ID,
        "pretraining": f"supervised classification of {len(classes)} object classes", "class_names": classes,
        "figures": figures})
    return figures


def _note(config: PretrainConfig, key: str) -> dict[str, Any]:
    return {"pretrained_stand_in": True, "cache_key": key, "corpus": "synthetic web corpus (visrec.sim.web_corpus)",
            "config": config.fingerprint()}


def build_pretrained(out_dir: Path, config: PretrainConfig, key: str = "") -> dict[str, Any]:
    """Generate the web corpus, pretrain both models on it and write `siglip/`, `mobilenet_v2/` and
    `pretrain.json` into `out_dir` (local). Returns the manifest.

    The two trainings run at once, each on one thread of its own process (MobileNetV2's in a child),
    so two cores take half the wall time of one.
    """
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    import torch

    from visrec.model.encoders import SIGLIP_HUB_ID, TINY_NOTE, new_siglip, save_model, train_title_tokenizer
    from visrec.sim.web_corpus import PAIRS_FILE, generate_web_corpus
    from visrec.stages.configs import PrepareConfig, TrainConfig
    from visrec.stages.prepare import run_prepare
    from visrec.stages.train.trainer import train

    started, seconds = time.monotonic(), {}
    work = out_dir / "work"

    def timed(name: str, fn: Any) -> Any:
        t = time.monotonic()
        result = fn()
        seconds[name] = round(time.monotonic() - t, 2)
        log.info("pretraining: %s done in %.1fs", name, seconds[name])
        return result

    sizes = config.models
    corpus = timed("corpus", lambda: generate_web_corpus(work / "corpus", config.corpus))
    pairs = str(work / "corpus" / PAIRS_FILE)
    prepared = str(work / "prepared")
    timed("prepare", lambda: run_prepare(PrepareConfig(
        listings_uri=pairs, out_dir=prepared, val_fraction=config.val_fraction, seed=config.corpus.seed,
        image_size=sizes.image_size, shards=2)))

    # SigLIP: random init with a tokenizer of the captions, then `visrec train` on the pairs.
    with _one_thread():
        torch.manual_seed(sizes.seed)
        tokenizer = train_title_tokenizer([row["title"] for row in io.read_jsonl(pairs)],
                                          vocab_size=sizes.vocab_size, alphabet=TOKENIZER_ALPHABET)
        # b = -log(batch): the balanced sigmoid loss of this batch size. With the paper's -10 (balanced
        # for 32k pairs) the loss is balanced only by squeezing every cosine towards 0.6, a collapse
        # that a few hundred steps of Adam on the bias cannot undo.
        siglip, processor = new_siglip(sizes, tokenizer, logit_bias=-math.log(config.siglip_batch_size))
    save_model(siglip, processor, work / "siglip-init", TINY_NOTE, {"tiny_random_stand_in": True})
    t = time.monotonic()
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        mobilenet = pool.submit(pretrain_mobilenet, prepared, pairs, str(out_dir / "mobilenet_v2"), config, key)
        with _one_thread():
            siglip_run = timed("siglip", lambda: train(TrainConfig(
                data_uri=prepared, out_dir=str(work / "siglip-train"), model_uri=str(work / "siglip-init"),
                epochs=config.siglip_epochs, batch_size=config.siglip_batch_size, lr=config.siglip_lr,
                warmup_steps=config.siglip_warmup_steps, seed=sizes.seed, precision="fp32", device="cpu",
                checkpoint_every_steps=0, keep_checkpoints=1, num_workers=0, progress=False)))
        classifier = mobilenet.result()
    seconds["mobilenet"] = classifier["seconds"]
    seconds["siglip_and_mobilenet"] = round(time.monotonic() - t, 2)
    shutil.copytree(work / "siglip-train" / "model", out_dir / "siglip")
    shutil.rmtree(work)
    seconds["total"] = round(time.monotonic() - started, 2)

    siglip_figures = {k: getattr(siglip_run, k) for k in ("train_pairs", "val_pairs", "best_epoch", "initial_val",
                                                           "best_val", "samples_per_second", "train_seconds")}
    io.write_json(str(out_dir / "siglip" / NOTE), {
        **_note(config, key), "real_checkpoint": SIGLIP_HUB_ID, "pretraining": "sigmoid contrastive loss on "
        "image-caption pairs (visrec train)", "figures": siglip_figures})
    manifest = {"key": key, "config": config.fingerprint(), "corpus": corpus, "siglip": siglip_figures,
                "mobilenet_v2": classifier, "seconds": seconds}
    io.write_json(str(out_dir / MANIFEST), manifest)
    log.info("pretraining done in %.1fs: SigLIP val %s; MobileNetV2 val accuracy %s", seconds["total"],
             siglip_figures["best_val"], classifier["val_accuracy"])
    return manifest

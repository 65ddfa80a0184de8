"""The pretrained stand-ins: the web corpus, classification pretraining, the content cache, the CLI.

Every build here uses `TINY`, a config small enough for CI; the default stand-ins (minutes to build)
are built by `visrec study` and `visrec init-models --pretrained`, which report their figures.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from visrec import cli
from visrec.core.errors import UserError
from visrec.model.classify import ClassifierConfig, train_classifier
from visrec.model.encoders import TinyModelConfig, load_image_encoder, load_siglip
from visrec.sim import pretrain
from visrec.sim.demo_data import CATEGORIES, COLOUR_WORDS, TYPE_WORDS
from visrec.sim.web_corpus import CLASS_WORDS, CLASSES, PAIRS_FILE, WEB_SILHOUETTES, WebCorpusConfig, generate_web_corpus


def snapshot(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("web")
    generate_web_corpus(out, WebCorpusConfig(items=80, image_size=48, workers=2))
    return out


def test_web_corpus_is_deterministic_whatever_the_workers(corpus, tmp_path):
    generate_web_corpus(tmp_path / "again", WebCorpusConfig(items=80, image_size=48, workers=1))
    a, b = snapshot(corpus), snapshot(tmp_path / "again")
    assert a.keys() == b.keys() and [k for k in a if a[k] != b[k]] == []
    generate_web_corpus(tmp_path / "other", WebCorpusConfig(items=80, image_size=48, workers=1, seed=1))
    assert snapshot(tmp_path / "other")[PAIRS_FILE] != a[PAIRS_FILE]


def test_web_corpus_is_readable_pairs_and_not_the_marketplace(corpus):
    from visrec.data.schema import read_listings

    listings = read_listings(str(corpus / PAIRS_FILE))
    assert len(listings.rows) == 80 and not listings.rejected  # the listings data contract, every row valid
    hidden = {r["item_id"]: r for r in map(json.loads, (corpus / "hidden" / "items.jsonl").read_text().splitlines())}
    for row in listings.rows:
        assert row["category"] == hidden[row["item_id"]]["label"] in CLASSES
        assert (corpus / row["image_uri"]).stat().st_size > 0
    # Other object classes and silhouettes than the marketplace's, and none of its product words.
    assert not set(CLASSES) & set(CATEGORIES)
    assert not {shape for shape, *_ in CATEGORIES.values()} & set(WEB_SILHOUETTES)
    product_words = {w.lower() for words in TYPE_WORDS.values() for w in words}
    captions = [row["title"].lower() for row in listings.rows]
    assert not [c for c in captions if any(w in c.split() for w in product_words)]
    # Captions mostly name what is shown (English or Japanese), as alt-text does, often with a colour.
    named = sum(any(w in c for w in sum(CLASS_WORDS[r["category"]], [])) for c, r in zip(captions, listings.rows))
    assert named >= 0.6 * len(captions)
    colour_words = {w for words in COLOUR_WORDS.values() for w in words}
    assert sum(any(w in c for w in colour_words) for c in captions) >= 0.4 * len(captions)


def test_demo_data_cli_writes_the_web_corpus(tmp_path, capsys):
    assert cli.main(["demo-data", "--kind", "web", "--out", str(tmp_path / "w"), "--items", "12", "--image-size",
                     "40", "--workers", "1"]) == 0
    assert "12 web image-caption pairs" in capsys.readouterr().out
    assert len((tmp_path / "w" / PAIRS_FILE).read_text().splitlines()) == 12
    assert len(list((tmp_path / "w" / "images").glob("*.jpg"))) == 12


def test_train_classifier_learns_and_is_deterministic():
    import torch

    from visrec.model.encoders import new_mobilenet

    # Two classes a CNN separates at once: reddish vs bluish noise images.
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(160) % 2
    pixels = torch.rand(160, 3, 32, 32, generator=gen) * 0.5 - 0.25
    pixels[:, 0] += torch.where(labels == 0, 0.6, -0.6)[:, None, None]
    pixels[:, 2] -= torch.where(labels == 0, 0.6, -0.6)[:, None, None]
    config = ClassifierConfig(epochs=4, batch_size=16, lr=3e-3, crop_padding=2)
    sizes = TinyModelConfig(image_size=32)
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        model, _ = new_mobilenet(sizes)
        figures = train_classifier(model, (pixels[:128], labels[:128]), (pixels[128:], labels[128:]), 2, config)
        runs.append((figures, torch.cat([p.detach().flatten() for p in model.parameters()])))
    figures = runs[0][0]
    assert [e["epoch"] for e in figures["epochs"]] == [1, 2, 3, 4] and figures["train_images"] == 128
    assert figures["val_accuracy"] >= 0.8 > figures["initial_val_accuracy"] and not model.training
    assert torch.equal(runs[0][1], runs[1][1])  # a function of its inputs and seed
    with pytest.raises(UserError):
        train_classifier(model, (pixels[:8], labels[:8]), (pixels[:0], labels[:0]), 2, config)


TINY = pretrain.PretrainConfig(
    corpus=WebCorpusConfig(items=96, image_size=40, workers=1),
    models=TinyModelConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, image_size=32,
                           patch_size=16, vocab_size=400, text_hidden_size=16, text_intermediate_size=32),
    siglip_epochs=1, siglip_batch_size=16, siglip_warmup_steps=1, val_fraction=0.2,
    mobilenet=ClassifierConfig(epochs=1, batch_size=16))


def test_cache_key_follows_the_config_not_the_workers():
    key = pretrain.cache_key(TINY)
    assert key == pretrain.cache_key(dataclasses.replace(TINY, corpus=dataclasses.replace(TINY.corpus, workers=2)))
    assert key != pretrain.cache_key(dataclasses.replace(TINY, siglip_epochs=2))
    assert key != pretrain.cache_key(dataclasses.replace(TINY, corpus=dataclasses.replace(TINY.corpus, seed=1)))


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory) -> tuple[Path, pretrain.PretrainedModels]:
    """A cache holding the `TINY` stand-ins, built by the first call: (cache dir, that call's result)."""
    cache = tmp_path_factory.mktemp("pretrained-cache")
    return cache, pretrain.pretrained_models(TINY, cache_dir=cache)


@pytest.mark.integration
def test_pretrained_models_are_built_once_cached_and_reproducible(tiny_cache, tmp_path):
    cache, first = tiny_cache
    assert first.built_now and Path(first.paths["siglip"]).parent.name == f"pretrained-{first.key}"
    again = pretrain.pretrained_models(TINY, cache_dir=cache)
    assert not again.built_now and again.paths == first.paths and again.manifest == first.manifest
    for kind in pretrain.KINDS:  # the same classes and loading path as the real checkpoints
        encoder = load_image_encoder(first.paths[kind])
        assert encoder.kind == kind and pretrain.model_origin(first.paths[kind]) == pretrain.PRETRAINED
        note = json.loads((Path(first.paths[kind]) / pretrain.NOTE).read_text())
        assert note["cache_key"] == first.key and note["pretrained_stand_in"]
    model, processor = load_siglip(first.paths["siglip"])
    assert model.config.vision_config.hidden_size == 32 and model.config.text_config.hidden_size == 16
    assert processor.tokenizer("赤い傘")["input_ids"][:-1] != [processor.tokenizer.unk_token_id] * 2
    m = first.manifest
    assert m["siglip"]["train_pairs"] + m["siglip"]["val_pairs"] == 96 and m["mobilenet_v2"]["classes"] >= 2
    # Deterministic: a second build elsewhere writes the same weights.
    other = pretrain.pretrained_models(TINY, cache_dir=tmp_path / "other")
    for kind in pretrain.KINDS:
        for name in ("model.safetensors", "config.json"):
            assert (Path(other.paths[kind]) / name).read_bytes() == (Path(first.paths[kind]) / name).read_bytes()


@pytest.mark.integration
def test_init_models_cli_pretrained_copies_the_cached_models(tiny_cache, tmp_path, capsys, monkeypatch):
    cache, built = tiny_cache
    build = pretrain.pretrained_models  # the CLI asks for the default config: TINY instead
    monkeypatch.setattr(pretrain, "pretrained_models", lambda config=None, **kw: build(config or TINY, **kw))
    assert cli.main(["init-models", "--pretrained", "--cache-dir", str(cache), "--out", str(tmp_path / "m")]) == 0
    assert f"pretrained models {built.key} (from the cache" in capsys.readouterr().out
    for kind in pretrain.KINDS:
        assert (tmp_path / "m" / kind / "model.safetensors").read_bytes() == \
            (Path(built.paths[kind]) / "model.safetensors").read_bytes()
    assert cli.main(["init-models", "--pretrained", "--listings", "x.jsonl"]) == 2
    assert cli.main(["init-models"]) == 2  # random models need --out

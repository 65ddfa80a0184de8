"""Stage 2 (SigLIP fine-tuning) on CPU with a tiny random model and generated image-title pairs.

The data are coloured shapes whose titles name the colour and shape, so a model can
only get better than chance at matching images to titles by learning the pairing.
"""

from __future__ import annotations

import io as bytes_io
import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image, ImageDraw

from visrec.core.errors import UserError
from visrec.model.encoders import TinyModelConfig, init_models
from visrec.stages.configs import TrainConfig
from visrec.stages.train.checkpoints import list_checkpoints
from visrec.stages.train.encoder import lr_multiplier, retrieval_recall
from visrec.stages.train.trainer import TrainResult, train

COLOURS = {"red": (220, 30, 30), "blue": (30, 60, 220), "green": (30, 170, 60), "yellow": (235, 200, 20),
           "black": (20, 20, 20), "purple": (140, 40, 170)}
SHAPES = ("circle", "square", "triangle", "bar", "ring")
# Smaller than `init-models`' default so a from-scratch run learns within seconds.
TEST_MODEL = TinyModelConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, image_size=32,
                             patch_size=8)


def shape_jpeg(colour: str, shape: str, rng: random.Random, size: int = 64) -> bytes:
    img = Image.new("RGB", (size, size), (245, 245, 245))
    draw = ImageDraw.Draw(img)
    r = rng.randint(size // 4, size // 3)
    cx, cy = rng.randint(r, size - r), rng.randint(r, size - r)
    box, fill = (cx - r, cy - r, cx + r, cy + r), COLOURS[colour]
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    elif shape == "bar":
        draw.rectangle((cx - r, cy - r // 3, cx + r, cy + r // 3), fill=fill)
    else:
        draw.ellipse(box, outline=fill, width=max(2, r // 3))
    buf = bytes_io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def write_shapes_dataset(out: Path, items: int, seed: int = 0, shuffle_titles: bool = False,
                         val_fraction: float = 0.2) -> Path:
    """A prepared dataset (stage-1 format) of `items` shape images titled "<colour> <shape>"."""
    rng = random.Random(seed)
    rows = []
    for i in range(items):
        colour, shape = rng.choice(sorted(COLOURS)), rng.choice(SHAPES)
        rows.append({"item_id": f"item-{i}", "title": f"{colour} {shape}", "category": "toys", "price": 1000,
                     "image": shape_jpeg(colour, shape, rng), "split": "val" if rng.random() < val_fraction
                     else "train"})
    if shuffle_titles:  # breaks the image-title pairing, keeps everything else identical
        titles = [r["title"] for r in rows]
        rng.shuffle(titles)
        for row, title in zip(rows, titles):
            row["title"] = title
    out.mkdir(parents=True, exist_ok=True)
    half = len(rows) // 2
    for n, part in enumerate((rows[:half], rows[half:])):
        pq.write_table(pa.Table.from_pylist(part), out / f"data-{n:05d}-of-00002.parquet")
    return out


@pytest.fixture(scope="module")
def shape_model(tmp_path_factory) -> str:
    """A tiny random SigLIP whose tokenizer knows the shape titles (as `init-models --listings` does)."""
    root = tmp_path_factory.mktemp("shape-models")
    listings = root / "listings.jsonl"
    rows = [{"item_id": f"{c}-{s}", "title": f"{c} {s}", "image_uri": f"images/{c}-{s}.jpg", "category": "toys",
             "price": 1000, "status": "on_sale", "listed_at": "2024-03-01T10:00:00+09:00"}
            for c in COLOURS for s in SHAPES]
    listings.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return init_models(root, listings_uri=str(listings), config=TEST_MODEL)["siglip"]


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> Path:
    return write_shapes_dataset(tmp_path_factory.mktemp("small-data"), items=160, seed=1)


def _config(data: Path, out: Path, model: str, **kw) -> TrainConfig:
    base = dict(data_uri=str(data), out_dir=str(out), model_uri=model, epochs=2, batch_size=16, lr=3e-3,
                num_workers=0, checkpoint_every_steps=3, progress=False)
    base.update(kw)
    return TrainConfig(**base)


def _weights(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(model_dir / "model.safetensors"))


def test_retrieval_recall_counts_identical_titles_as_one_text():
    img = torch.eye(4)[[0, 1, 2, 2]]  # items 2 and 3 look alike and share a title
    txt = torch.eye(4)[[1, 0, 2, 2]]  # items 0 and 1 have swapped texts
    r = retrieval_recall(img, txt, ["a", "b", "c", "c"], ks=(1, 5))
    assert r["image_to_text_recall@1"] == pytest.approx(2 / 4)
    assert r["text_to_image_recall@1"] == pytest.approx(1 / 3)
    assert r["image_to_text_recall@5"] == r["text_to_image_recall@5"] == 1.0


def test_lr_warms_up_then_decays_to_zero():
    f = lr_multiplier(warmup_steps=4, total_steps=14)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(9) == pytest.approx(0.5)
    assert f(14) == pytest.approx(0.0)


def test_outputs_follow_the_artifact_contract(small_data, shape_model, tmp_path):
    from transformers import AutoProcessor, SiglipModel

    from visrec.model.encoders import load_image_encoder

    out = tmp_path / "out"
    metrics = train(_config(small_data, out, shape_model, epochs=1))
    for name in ("model", "last", "checkpoints", "train_metrics.json", "loss_curve.png"):
        assert (out / name).exists(), name
    saved = json.loads((out / "train_metrics.json").read_text())
    assert saved["epochs_completed"] == 1 and saved["global_step"] == metrics.global_step > 0
    epoch = saved["epochs"][0]
    for key in ("image_to_text_recall@1", "image_to_text_recall@5", "text_to_image_recall@1",
                "text_to_image_recall@5", "loss"):
        assert 0 <= epoch["val"][key] < float("inf")
    assert epoch["samples_per_second"] > 0 and len(saved["step_loss"]) == saved["global_step"]
    assert (out / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert TrainResult.from_dict(saved) == metrics and list(saved) == list(metrics.as_dict())
    # Loadable by plain transformers and by the embedding stage's loader.
    SiglipModel.from_pretrained(out / "model")
    AutoProcessor.from_pretrained(out / "model")
    encoder = load_image_encoder(str(out / "model"), "siglip")
    assert encoder(torch.zeros(2, 3, TEST_MODEL.image_size, TEST_MODEL.image_size)).shape == (2, encoder.dims)


def test_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(small_data, shape_model, tmp_path):
    full = tmp_path / "full"
    ref = train(_config(small_data, full, shape_model))
    steps = ref.global_step
    assert steps == 2 * ref.steps_per_epoch and steps > 8

    parts = tmp_path / "parts"
    # Interrupted mid-epoch 1, then mid-epoch 2, then to the end; loader workers differ too.
    first = train(_config(small_data, parts, shape_model, max_steps=5))
    assert first.global_step == 5 and first.epochs_completed == 0 and first.stopped_at is not None
    second = train(_config(small_data, parts, shape_model, max_steps=steps - 2, resume=True, num_workers=1))
    assert second.resumed_from.endswith("step-00000005") and second.epochs_completed == 1
    last = train(_config(small_data, parts, shape_model, resume=True))
    assert last.global_step == steps

    assert last.step_loss == ref.step_loss
    assert [e["val"] for e in last.epochs] == [e["val"] for e in ref.epochs]
    for name in ("last", "model"):
        a, b = _weights(full / name), _weights(parts / name)
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=f"{name}/{key}")


def test_incomplete_checkpoints_are_ignored(small_data, shape_model, tmp_path):
    out = tmp_path / "out"
    done = train(_config(small_data, out, shape_model, epochs=1))
    ckpts = out / "checkpoints"
    complete = list_checkpoints(str(out))
    assert complete and complete[-1][0] == done.global_step
    # What a crash mid-write leaves: a newer directory without its marker, and a temp directory.
    (ckpts / "step-99999999").mkdir()
    (ckpts / "step-99999999" / "state.pt").write_bytes(b"truncated")
    shutil.copytree(ckpts / complete[-1][1].rsplit("/", 1)[-1], ckpts / ".tmp-step-99999998")
    assert list_checkpoints(str(out)) == complete
    resumed = train(_config(small_data, out, shape_model, epochs=1, resume=True))
    assert resumed.resumed_from == complete[-1][1] and resumed.global_step == done.global_step


def test_bad_settings_are_user_errors(small_data, shape_model, tmp_path):
    for bad in ({"epochs": 0}, {"lr": 0.0}, {"precision": "fp8"}, {"gradient_checkpointing": "maybe"}):
        with pytest.raises(UserError, match="must"):  # refused by TrainConfig itself, before any work
            _config(small_data, tmp_path / "z", shape_model, **bad)
    with pytest.raises(UserError, match="fewer than one batch"):
        train(_config(small_data, tmp_path / "a", shape_model, batch_size=4096))
    with pytest.raises(UserError, match="split evenly"):
        train(_config(small_data, tmp_path / "b", shape_model, batch_size=16, grad_accum=3))
    with pytest.raises(UserError, match="no data-"):
        train(_config(tmp_path, tmp_path / "c", shape_model))
    with pytest.raises(UserError, match="fp16 needs a GPU"):
        train(_config(small_data, tmp_path / "d", shape_model, precision="fp16"))


def test_cli_trains_and_resumes(small_data, shape_model, tmp_path, capsys):
    from visrec.cli import main

    out = tmp_path / "cli"
    common = ["train", "--data", str(small_data), "--model", shape_model, "--out", str(out), "--epochs", "1",
              "--batch-size", "16", "--lr", "1e-3", "--no-augment", "--num-workers", "0", "--seed", "3"]
    assert main(common + ["--max-steps", "2", "--checkpoint-every", "1"]) == 0
    metrics = json.loads((out / "train_metrics.json").read_text())
    assert metrics["global_step"] == 2 and metrics["config"]["augment"] is False
    assert metrics["config"]["seed"] == 3 and metrics["config"]["checkpoint_every_steps"] == 1
    assert main(common + ["--resume"]) == 0
    metrics = json.loads((out / "train_metrics.json").read_text())
    assert metrics["resumed_from"].endswith("step-00000002") and metrics["epochs_completed"] == 1
    assert main(["train", "--data", str(tmp_path / "nowhere"), "--model", shape_model, "--out",
                 str(tmp_path / "x")]) == 2
    assert "error:" in capsys.readouterr().err


@pytest.mark.integration
def test_training_learns_the_pairing_and_shuffled_titles_do_not(shape_model, tmp_path):
    """The must-show, scaled to the test budget (bench/train.py --must-show runs the full 2,000 items)."""
    cfg = dict(epochs=3, batch_size=8, lr=3e-3, checkpoint_every_steps=0)
    paired = write_shapes_dataset(tmp_path / "paired", items=400, seed=0)
    shuffled = write_shapes_dataset(tmp_path / "shuffled", items=400, seed=0, shuffle_titles=True)
    real = train(_config(paired, tmp_path / "out-paired", shape_model, **cfg))
    fake = train(_config(shuffled, tmp_path / "out-shuffled", shape_model, **cfg))

    key = "image_to_text_recall@5"
    before, after = real.initial_val[key], real.epochs[-1]["val"][key]
    # 30 distinct titles: chance recall@5 is about 5/30.
    assert before < 0.3
    assert after >= 0.6 and after >= before + 0.35, (before, after)
    assert real.epochs[-1]["val"]["text_to_image_recall@5"] >= 0.5
    assert real.epochs[-1]["val"]["loss"] < real.initial_val["loss"]
    fake_after = max(e["val"][key] for e in fake.epochs)
    assert fake_after <= 0.35 and fake_after <= fake.initial_val[key] + 0.15, fake_after


def test_component_trains_into_its_model_artifact(small_data, shape_model, tmp_path):
    from kfp import dsl

    from components.train import train as train_component

    model, metrics = dsl.Model(uri=str(tmp_path / "model")), dsl.Metrics(uri=str(tmp_path / "metrics"))
    train_component.python_func(dataset=dsl.Dataset(uri=str(small_data)), model_uri=shape_model, model=model,
                                metrics=metrics, epochs=1, batch_size=16, lr=1e-3, warmup_steps=-1, precision="",
                                max_steps=2, seed=0, device="", gradient_checkpointing="auto",
                                freeze_token_embedding=False, gradient_compression="none")
    assert (tmp_path / "model" / "model" / "config.json").exists()
    assert model.metadata["model_dir"] == str(tmp_path / "model" / "model")
    assert metrics.metadata["global_step"] == 2.0 and "initial_val.image_to_text_recall@5" in metrics.metadata
    assert metrics.metadata["gradient_checkpointing"] == 0.0 and metrics.metadata["peak_memory_estimate_gib"] >= 0


def test_train_resources_are_set_on_the_task():
    import tempfile

    import yaml
    from kfp import compiler, dsl

    from components.images import TRAINER_IMAGE
    from components.resources import set_resources
    from components.train import train as train_component

    @dsl.pipeline(name="train-resources")
    def pipeline():
        data = dsl.importer(artifact_uri="gs://bucket/prepared", artifact_class=dsl.Dataset)
        task = train_component(dataset=data.output, model_uri="google/siglip-base-patch16-256-multilingual",
                               epochs=5, batch_size=256, lr=5e-5, warmup_steps=-1, precision="", max_steps=0, seed=0,
                               device="cuda", gradient_checkpointing="auto", freeze_token_embedding=False,
                               gradient_compression="none")
        set_resources(task, "16", "64G", "NVIDIA_TESLA_A100", 2, retries=3)

    with tempfile.TemporaryDirectory() as tmp:
        compiler.Compiler().compile(pipeline, f"{tmp}/p.yaml")
        spec = yaml.safe_load(open(f"{tmp}/p.yaml"))
    resources = spec["deploymentSpec"]["executors"]["exec-train"]["container"]["resources"]
    assert resources["accelerator"]["resourceType"] == "NVIDIA_TESLA_A100"
    assert resources["accelerator"]["resourceCount"] == "2"
    assert resources["resourceCpuLimit"] == "16" and resources["resourceMemoryLimit"] == "64G"
    assert spec["root"]["dag"]["tasks"]["train"]["retryPolicy"]["maxRetryCount"] == 3
    assert spec["deploymentSpec"]["executors"]["exec-train"]["container"]["image"] == TRAINER_IMAGE


@pytest.mark.integration
def test_gcs_data_and_output_with_resume(small_data, shape_model, gcs_emulator):
    from visrec.core import io

    bucket = gcs_emulator()
    data, out = f"gs://{bucket}/prepared", f"gs://{bucket}/train"
    io.upload_dir(small_data, data)
    cfg = dict(epochs=1, checkpoint_every_steps=1, keep_checkpoints=2)
    first = train(_config(data, out, shape_model, max_steps=3, **cfg))
    assert first.global_step == 3
    # Older checkpoints are pruned on GCS too; each kept one has its state and its marker.
    assert [step for step, _ in list_checkpoints(out)] == [2, 3]
    assert io.exists(io.join(out, "checkpoints", "step-00000003", "state.pt"))
    done = train(_config(data, out, shape_model, resume=True, **cfg))
    assert done.resumed_from == io.join(out, "checkpoints", "step-00000003")
    assert done.epochs_completed == 1
    for name in ("model/config.json", "last/model.safetensors", "train_metrics.json", "loss_curve.png"):
        assert io.exists(io.join(out, name)), name
    assert io.read_json(io.join(out, "train_metrics.json"))["global_step"] == done.global_step


def test_init_models_cli_writes_loadable_stand_ins(tmp_path, capsys):
    from visrec.cli import main
    from visrec.model.encoders import load_image_encoder, load_siglip

    listings = tmp_path / "listings.jsonl"
    listings.write_text(json.dumps({"item_id": "1", "title": "赤 Tシャツ red t-shirt", "image_uri": "a.jpg",
                                    "category": "Women/Tops", "price": 1200, "status": "on_sale",
                                    "listed_at": "2024-03-01T10:00:00+09:00"}) + "\n")
    assert main(["init-models", "--out", str(tmp_path / "m"), "--listings", str(listings)]) == 0
    assert "siglip:" in capsys.readouterr().out
    model, processor = load_siglip(str(tmp_path / "m" / "siglip"))
    assert model.logit_bias.item() == -10.0  # the SigLIP paper's initialisation
    assert len(processor.tokenizer("red", padding="max_length", max_length=64)["input_ids"]) == 64
    assert load_image_encoder(str(tmp_path / "m" / "mobilenet_v2"), "mobilenet_v2").kind == "mobilenet_v2"


def test_title_tokenizer_is_the_same_in_every_process(tmp_path):
    """Same titles, same vocabulary ids: the trainer's thread sums and hash order must not leak in.

    Each process hashes with its own random seed, which used to shuffle the ids of
    the characters the trainer appends (and so change every training run).
    """
    from visrec.sim.demo_data import DemoDataConfig, generate_marketplace

    generate_marketplace(tmp_path, DemoDataConfig(items=300, seed=5))
    script = ("import sys, hashlib\n"
              "from visrec.model.encoders import _catalog_titles, train_title_tokenizer\n"
              "tok = train_title_tokenizer(_catalog_titles(sys.argv[1]))\n"
              "print(hashlib.sha256(tok.backend_tokenizer.to_str().encode()).hexdigest())\n")
    digests = {subprocess.run([sys.executable, "-c", script, str(tmp_path / "listings.jsonl")], check=True,
                              capture_output=True, text=True, cwd=Path(__file__).parent.parent).stdout.strip()
               for _ in range(3)}
    assert len(digests) == 1 and len(next(iter(digests))) == 64

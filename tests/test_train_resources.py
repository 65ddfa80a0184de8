"""What a training run checks about its machine before the first step (visrec.stages.train.resources):
the accelerator it asked for, memory for (model, batch, precision, world size), /dev/shm for
its loader workers; and the training paths those checks choose (checkpointing, uint8 batches
through pipes) giving the same training."""

from __future__ import annotations

import datetime
import os

import numpy as np
import pytest
import torch
from PIL import Image

from test_train import _config, shape_model, small_data  # noqa: F401  (shared fixtures)
from visrec.stages.train import resources as tr
from visrec.core.errors import UserError
from visrec.stages.train.distributed import setup_processes
from visrec.stages.train.encoder import PairEncoder
from visrec.stages.train.trainer import SiglipTrainer, train

GiB, MiB = tr.GiB, tr.MiB


def _tiny_siglip(layers: int = 2):
    from transformers import SiglipConfig, SiglipModel

    tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=2)
    torch.manual_seed(0)
    return SiglipModel(SiglipConfig(text_config=dict(tower, vocab_size=100, max_position_embeddings=16),
                                    vision_config=dict(tower, image_size=32, patch_size=8)))


def _forward(model):
    encoder = PairEncoder(model).train()

    def forward(pairs: int):  # draws from the global RNG, as the trainer's probe does
        pixels = torch.randn(pairs, 3, 32, 32)
        ids = torch.randint(0, 100, (pairs, 16))
        return encoder(pixels, ids)

    return forward


def _profile(per_pair_layers=(8 * MiB,) * 4, inputs=(MiB,) * 4, outside=2 * MiB, fixed=100 * MiB):
    return tr.ActivationProfile(fixed, outside, tuple(per_pair_layers), tuple(inputs))


SIZES = dict(parameters=370_000_000, trainable=370_000_000, largest_trainable=192_000_000)

# ---- memory ----------------------------------------------------------------------------------------


def test_memory_check_refuses_a_run_that_cannot_fit_and_names_what_would():
    profile = _profile()
    plan = tr.plan_memory(profile, **SIZES, pairs_per_process=256, world_size=1, checkpointing=False)
    # 370M params x 16 B + 0.7 GiB transient + 100 MiB + 256 x 34 MiB: ~15.2 GiB.
    assert plan.total_bytes == pytest.approx(370e6 * 16 + 192e6 * 4 + 100 * MiB + 256 * 34 * MiB, rel=1e-9)
    with pytest.raises(UserError) as err:
        tr.check_memory(plan, 8 * GiB, "cuda:0 (fake 8 GiB GPU)", profile, global_pairs=256)
    message = str(err.value)
    assert "cuda:0 (fake 8 GiB GPU) has 8.0 GiB usable" in message
    assert "--gradient-checkpointing on" in message and "--grad-accum" in message
    tr.check_memory(plan, 40 * GiB, "big", profile, global_pairs=256)  # fits: no error


def test_auto_checkpointing_turns_on_only_when_needed():
    profile = _profile()
    args = dict(**SIZES, pairs_per_process=256, world_size=1)
    assert not tr.choose_checkpointing("auto", profile, 40 * GiB, **args).checkpointing
    on = tr.choose_checkpointing("auto", profile, 14 * GiB, **args)
    # Checkpointed: outside + every layer's input + one layer recomputed = 2 + 4 + 8 MiB per pair.
    assert on.checkpointing and on.activation_per_pair == 14 * MiB
    assert tr.choose_checkpointing("off", profile, 14 * GiB, **args).checkpointing is False
    assert tr.choose_checkpointing("on", profile, 40 * GiB, **args).checkpointing is True


def test_more_gpus_need_ddp_buckets_but_fewer_activations():
    profile = _profile()
    one = tr.plan_memory(profile, **SIZES, pairs_per_process=256, world_size=1, checkpointing=False)
    eight = tr.plan_memory(profile, **SIZES, pairs_per_process=32, world_size=8, checkpointing=False)
    assert eight.training_state_bytes - one.training_state_bytes == SIZES["trainable"] * 4
    assert eight.activation_bytes < one.activation_bytes / 7


def test_activation_profile_predicts_what_autograd_keeps():
    """The probe's per-pair figures, scaled to 8 pairs, are what a forward of 8 pairs saves."""
    model = _tiny_siglip()
    forward = _forward(model)
    rng = torch.get_rng_state()
    profile = tr.measure_activations(model, forward)
    assert torch.equal(torch.get_rng_state(), rng)  # the probe leaves the training's randomness alone
    assert all(p.grad is None for p in model.parameters())
    assert len(profile.layer_per_pair) == 4  # 2 vision + 2 text layers
    saved = tr._saved_bytes(forward, model, 8)
    measured = saved[0] + sum(saved[1])
    assert measured == pytest.approx(profile.fixed_bytes + 8 * profile.per_pair(False), rel=0.02)
    # A checkpointed layer keeps only its input: far less than its contents.
    assert profile.per_pair(True) < 0.6 * profile.per_pair(False)


def test_gradient_checkpointing_gives_the_same_loss_and_gradients():
    from visrec.model.siglip_loss import sigmoid_loss

    def loss_and_grads(checkpointing: bool):
        model = _tiny_siglip()
        if checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        img, txt, scale, bias = _forward(model)(6)
        loss = sigmoid_loss(img, txt, scale, bias)
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    loss, grads = loss_and_grads(False)
    ckpt_loss, ckpt_grads = loss_and_grads(True)
    assert ckpt_loss == pytest.approx(loss, abs=1e-5)
    assert grads.keys() == ckpt_grads.keys() and len(grads) > 20
    for name in grads:
        torch.testing.assert_close(ckpt_grads[name], grads[name], rtol=0, atol=1e-5, msg=name)


def test_training_refuses_at_start_what_the_device_cannot_hold(small_data, shape_model, tmp_path, monkeypatch):
    monkeypatch.setattr("visrec.stages.train.trainer.usable_memory", lambda device, held, processes: (100_000, "fake 100 kB"))
    with pytest.raises(UserError, match="fake 100 kB has 0.0 GiB usable"):
        train(_config(small_data, tmp_path / "out", shape_model, epochs=1))
    assert not (tmp_path / "out" / "checkpoints").exists()  # refused before the first step


def test_auto_checkpointing_trains_where_only_checkpointing_fits(small_data, shape_model, tmp_path, monkeypatch):
    """A device between the checkpointed and the plain plan: auto turns checkpointing on, and the
    training is the one without it."""
    real = tr.choose_checkpointing

    def device_in_between(setting, profile, usable, **args):
        low = tr.plan_memory(profile, checkpointing=True, **args).total_bytes
        high = tr.plan_memory(profile, checkpointing=False, **args).total_bytes
        return real(setting, profile, int((low + high) / 2 * (1 + tr.MEMORY_HEADROOM)), **args)

    plain = train(_config(small_data, tmp_path / "plain", shape_model, epochs=1, gradient_checkpointing="off"))
    monkeypatch.setattr("visrec.stages.train.trainer.choose_checkpointing", device_in_between)
    trainer = SiglipTrainer(_config(small_data, tmp_path / "auto", shape_model, epochs=1), setup_processes("cpu"))
    layers = tr.checkpointable_layers(trainer.model)
    assert layers and all(layer.gradient_checkpointing for layer in layers)
    auto = trainer.run()
    assert auto.memory_plan["checkpointing"] is True and plain.memory_plan["checkpointing"] is False
    assert auto.step_loss == pytest.approx(plain.step_loss, abs=1e-5)


# ---- the accelerator ---------------------------------------------------------------------------------


def test_a_requested_gpu_that_cuda_cannot_use_fails_at_once(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(tr, "nvidia_driver_version", lambda: "535.104.05")
    for request in ("cuda", "gpu", "cuda:1"):
        with pytest.raises(UserError) as err:
            tr.resolve_device(request)
        message = str(err.value)
        assert "built for CUDA 13.0 (needs NVIDIA driver >= 580)" in message
        assert "NVIDIA driver 535.104.05" in message and "CUDA is not usable" in message
    assert tr.resolve_device(None) == torch.device("cpu")  # unrequested: CPU is a fine default
    assert tr.resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(UserError, match="expected cpu, cuda"):
        tr.resolve_device("tpu-ish")


def test_train_fails_before_reading_anything_when_cuda_is_missing(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="CUDA is not usable"):
        train(_config(tmp_path / "no-such-data", tmp_path / "out", "no-such-model", device="gpu"))


def test_cpu_wheel_is_named_as_such(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.setattr(tr, "nvidia_driver_version", lambda: None)
    report = tr.cuda_report()
    assert "CPU-only build" in report and "no NVIDIA driver found" in report


def test_process_group_timeout_covers_slow_checkpoint_uploads(monkeypatch):
    seen = {}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda backend, **kw: seen.update(kw, backend=backend))
    setup_processes("cpu", timeout_minutes=60)
    assert seen == {"backend": "gloo", "timeout": datetime.timedelta(minutes=60)}


# ---- loader workers and shared memory -------------------------------------------------------------


def test_loader_workers_scale_with_the_cpus():
    assert tr.default_num_workers(1, cpus=2) == 1
    assert tr.default_num_workers(1, cpus=8) == 7  # g2-standard-8 with one L4
    assert tr.default_num_workers(8, cpus=208) == 16  # a3-highgpu-8g: capped
    assert tr.default_num_workers(4, cpus=48) == 11


def test_a_small_dev_shm_sends_batches_through_pipes():
    batch = 256 * 3 * 256 * 256  # one uint8 batch of 256 pairs: 48 MiB
    docker_default = tr.plan_shared_memory(7, batch, 1, 0, free_bytes=64 * MiB)
    assert not docker_default.batches_in_shared_memory
    assert "--shm-size" in docker_default.advice()
    roomy = tr.plan_shared_memory(7, batch, 1, 0, free_bytes=8 * GiB)
    assert roomy.batches_in_shared_memory
    assert tr.plan_shared_memory(0, batch, 1, 0, free_bytes=0).batches_in_shared_memory  # no workers, no shm


def test_nccl_shared_memory_is_turned_off_when_short(monkeypatch):
    monkeypatch.delenv("NCCL_SHM_DISABLE", raising=False)
    assert not tr.disable_nccl_shared_memory_if_short(1, free_bytes=0)  # one GPU: no NCCL transport
    assert tr.disable_nccl_shared_memory_if_short(8, free_bytes=64 * MiB)
    assert os.environ["NCCL_SHM_DISABLE"] == "1"
    monkeypatch.setenv("NCCL_SHM_DISABLE", "0")  # the user's choice stands
    assert not tr.disable_nccl_shared_memory_if_short(8, free_bytes=64 * MiB)


def test_uint8_batches_normalised_on_device_are_the_processors_bit_for_bit(shape_model):  # noqa: F811
    from transformers import AutoProcessor

    from visrec.stages.train.data import Collate

    processor = AutoProcessor.from_pretrained(shape_model)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((50, 70), (32, 32), (97, 13))]
    expected = processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
    for as_numpy in (False, True):
        collate = Collate(processor, as_numpy=as_numpy)
        pixels, ids = collate([(img, "red circle") for img in images])
        assert pixels.dtype == (np.uint8 if as_numpy else torch.uint8)
        assert collate.batch_bytes(3) == pixels.nbytes + ids.nbytes
        assert torch.equal(collate.normalise(torch.as_tensor(pixels)), expected)  # bit for bit


def test_batches_through_pipes_train_exactly_as_through_shared_memory(small_data, shape_model, tmp_path,  # noqa: F811
                                                                      monkeypatch):
    shm = train(_config(small_data, tmp_path / "shm", shape_model, epochs=2, num_workers=1))
    monkeypatch.setattr("visrec.stages.train.trainer.shared_memory_free", lambda: 1024)
    pipes = train(_config(small_data, tmp_path / "pipes", shape_model, epochs=2, num_workers=1))
    assert shm.shared_memory["batches_in_shared_memory"] is True
    assert pipes.shared_memory["batches_in_shared_memory"] is False
    assert pipes.step_loss == shm.step_loss

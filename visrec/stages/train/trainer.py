"""Stage 2: fine-tune SigLIP on the prepared image-title pairs with the pairwise sigmoid loss.

One function, `train(TrainConfig)`, serves the CLI (`visrec train`), the KFP
component and the tests. It runs as a single process or under `torchrun` (DDP:
NCCL on GPU, gloo on CPU; `RANK`/`WORLD_SIZE`/`LOCAL_RANK` from the environment),
and is preemption-safe: resumable checkpoints are written atomically every N steps
and at each epoch end, and a resumed run ends with the weights of an uninterrupted one.

Output (docs/artifacts.md section 2): `model/` (best epoch by validation recall),
`last/`, `checkpoints/step-*/`, `train_metrics.json`, `loss_curve.png`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from visrec.core import io
from visrec.core.errors import UserError
from visrec.model.encoders import TEXT_MAX_LENGTH, load_siglip, resolve_precision
from visrec.model.siglip_loss import distributed_sigmoid_loss
from visrec.stages.configs import TrainConfig
from visrec.stages.train.checkpoints import (RunOutput, list_checkpoints, load_state, model_writer, rng_state,
                                             seed_everything, set_rng_state)
from visrec.stages.train.data import Augment, Collate, PairDataset, RunBatchSampler, read_prepared
from visrec.stages.train.distributed import (Processes, bf16_allreduce_hook, broadcast, local_processes,
                                             setup_processes)
from visrec.stages.train.encoder import (SELECTION_METRIC, PairEncoder, autocast, lr_multiplier, on_device,
                                         param_groups, validate)
from visrec.stages.train.resources import (MemoryPlan, check_memory, choose_checkpointing, default_num_workers,
                                           measure_activations, model_sizes, nccl_shared_memory_needed,
                                           plan_shared_memory, shared_memory_free, usable_memory)

log = logging.getLogger(__name__)

LOSS_READBACK_STEPS = 10  # step losses are read back (a device sync) every this many steps


@dataclass(frozen=True)
class TrainResult:
    """What `train` returns: the content of `train_metrics.json` (docs/training.md), one field per key.

    Settings and sizes of the run, progress (`global_step`, `epochs_completed`, `resumed_from`),
    the model selection (`best_epoch` by `selection_metric`, its `best_val`, `initial_val` before
    training), throughput, the memory and shared-memory plans (their `as_dict`s), the learned
    logit scale/bias, every epoch's entry and every step's loss. `stopped_at` (epoch, step and
    validation) only when `max_steps` stopped the run inside an epoch.
    """

    model_uri: str
    data_uri: str
    out_dir: str
    config: TrainConfig
    precision: str
    device: str
    world_size: int
    train_pairs: int
    val_pairs: int
    steps_per_epoch: int
    warmup_steps: int
    global_step: int
    epochs_completed: int
    resumed_from: str | None
    selection_metric: str
    best_epoch: int | None
    best_val: dict[str, float] | None
    initial_val: dict[str, float] | None
    final_train_loss: float | None
    samples_per_second: float | None
    steady_samples_per_second: float | None
    train_seconds: float
    num_workers: int
    memory_plan: dict[str, Any]
    shared_memory: dict[str, Any]
    logit_scale: float
    logit_bias: float
    epochs: list[dict[str, Any]]
    step_loss: list[float]
    stopped_at: dict[str, Any] | None = None

    def as_dict(self) -> dict[str, Any]:
        """The `train_metrics.json` content (no `stopped_at` key for a run that ended at an epoch end)."""
        out = asdict(self)
        if self.stopped_at is None:
            del out["stopped_at"]
        return out

    @classmethod
    def from_dict(cls, metrics: dict[str, Any]) -> "TrainResult":
        """The result a `train_metrics.json` records."""
        return cls(**{**metrics, "config": TrainConfig(**metrics["config"])})


# ---- checkpoints and outputs -------------------------------------------------------------


def plot_loss_curve(step_loss: list[float], epochs: list[dict], steps_per_epoch: int) -> bytes:
    """PNG: per-step training loss (raw and smoothed) with validation loss, and validation recall@5."""
    from visrec.core.plots import figure_png, pyplot

    fig, (ax_loss, ax_recall) = pyplot().subplots(1, 2, figsize=(11, 4))
    steps = np.arange(1, len(step_loss) + 1)
    ax_loss.plot(steps, step_loss, alpha=0.3, label="train (per step)")
    if len(step_loss) >= 2:
        window = max(1, min(50, len(step_loss) // 10))
        smooth = np.convolve(step_loss, np.ones(window) / window, mode="valid")
        ax_loss.plot(steps[window - 1:], smooth, label=f"train ({window}-step mean)")
    ep = [e for e in epochs if e.get("val")]
    if ep:
        ax_loss.plot([e["epoch"] * steps_per_epoch for e in ep], [e["val"]["loss"] for e in ep], "o-",
                     label="validation")
        for key in ("image_to_text_recall@5", "text_to_image_recall@5"):
            ax_recall.plot([e["epoch"] for e in ep], [e["val"][key] for e in ep], "o-", label=key)
    ax_loss.set(xlabel="optimizer step", ylabel="sigmoid loss", title="loss")
    ax_recall.set(xlabel="epoch", ylabel="recall", title="validation recall@5", ylim=(0, 1))
    ax_loss.legend()
    if ep:
        ax_recall.legend()
    fig.tight_layout()
    return figure_png(fig)


# ---- the training run ----------------------------------------------------------------------

def _subset(table, max_items: int, seed: int):
    if max_items <= 0 or len(table) <= max_items:
        return table
    rows = torch.randperm(len(table), generator=torch.Generator().manual_seed(seed))[:max_items]
    return table.take(sorted(rows.tolist()))


def train(config: TrainConfig) -> TrainResult:
    """Fine-tune `config.model_uri` on `config.data_uri`; write stage-2 outputs; return what
    `train_metrics.json` records."""
    procs = setup_processes(config.device, config.process_group_timeout_minutes)
    try:
        return SiglipTrainer(config, procs).run()
    finally:
        if procs.owns_group:
            dist.destroy_process_group()


class SiglipTrainer:
    """One training run: model, data, optimizer and the resumable `progress` state.

    Everything a preemption must not lose is in `progress` plus the model, optimizer,
    scheduler, loss-scaler and RNG states, which `save_checkpoint` writes together.
    """

    def __init__(self, config: TrainConfig, procs: Processes):
        self.config, self.procs = config, procs
        self.device = device = procs.device
        self.precision = resolve_precision(config.precision, device.type)
        self.group = config.batch_size // config.grad_accum
        if config.batch_size % config.grad_accum or self.group % procs.world_size:
            raise UserError(f"--batch-size {config.batch_size} must split evenly into --grad-accum "
                            f"{config.grad_accum} x {procs.world_size} process(es)")
        seed_everything(config.seed)

        self.model, self.processor = load_siglip(config.model_uri)
        if config.freeze_token_embedding:
            self.model.text_model.embeddings.token_embedding.weight.requires_grad_(False)
        train_table, val_table = read_prepared(config.data_uri)
        val_table = _subset(val_table, config.val_max_items, config.seed)
        if len(val_table) == 0:
            raise UserError(f"{config.data_uri} has no validation pairs (split == 'val')")
        self.steps_per_epoch = len(train_table) // config.batch_size
        if self.steps_per_epoch == 0:
            raise UserError(f"{len(train_table)} training pairs are fewer than one batch of {config.batch_size}")
        self.total_steps = self.steps_per_epoch * config.epochs
        self.warmup = config.warmup_steps if config.warmup_steps is not None else round(0.05 * self.total_steps)
        augment = Augment(config.augment_min_crop_area, hflip=config.augment_hflip) if config.augment else None
        self.train_set = PairDataset(train_table, augment=augment, seed=config.seed)
        self.val_set = PairDataset(val_table)
        self.num_workers = config.num_workers if config.num_workers is not None else \
            default_num_workers(local_processes())
        micro = self.group // procs.world_size
        nccl_shm = 0 if os.environ.get("NCCL_SHM_DISABLE") == "1" or device.type != "cuda" else \
            nccl_shared_memory_needed(local_processes())
        collate = Collate(self.processor)
        self.shared_memory = plan_shared_memory(self.num_workers, collate.batch_bytes(micro), local_processes(),
                                                nccl_shm, shared_memory_free())
        if not self.shared_memory.batches_in_shared_memory:
            log.warning("%s", self.shared_memory.advice())
        self.collate = Collate(self.processor, as_numpy=not self.shared_memory.batches_in_shared_memory)

        self.model.to(device)
        self.encoder = PairEncoder(self.model)
        self.memory_plan = self._plan_memory(micro)
        if self.memory_plan.checkpointing:
            self.model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        log.info("memory plan per process: %s", self.memory_plan.describe())
        self.step_encoder: torch.nn.Module = self.encoder
        if procs.distributed:
            self.step_encoder = torch.nn.parallel.DistributedDataParallel(
                self.encoder, device_ids=[device.index] if device.type == "cuda" else None,
                broadcast_buffers=False)
            if config.gradient_compression == "bf16":
                self.step_encoder.register_comm_hook(None, bf16_allreduce_hook)
        self.optimizer = torch.optim.AdamW(param_groups(self.encoder, config.weight_decay), lr=config.lr,
                                           fused=device.type == "cuda")
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer,
                                                           lr_multiplier(self.warmup, self.total_steps))
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.precision == "fp16")
        self.output = RunOutput(config.out_dir) if procs.main else None
        self.progress: dict[str, Any] = {
            "epoch": 0, "step_in_epoch": 0, "global_step": 0, "step_loss": [], "epochs": [],
            "initial_val": None, "best_epoch": None, "best_score": None}
        self.resumed_from = self._resume() if config.resume else None
        self._pending: list[torch.Tensor] = []  # step losses not read back yet (no device sync per step)
        self._run_samples, self._run_seconds = 0, 0.0  # this invocation's throughput, validation excluded
        # (optimizer steps, seconds) between loss read-backs (each a device sync), checkpoints excluded:
        # the windows after the first give the throughput past warm-up.
        self._windows: list[tuple[int, float]] = []
        self._batches = None  # one loader for the whole run (see RunBatchSampler)

    def _plan_memory(self, micro: int) -> MemoryPlan:
        """Measure activations on a probe batch, choose checkpointing, refuse what cannot fit."""
        config, device = self.config, self.device
        vision = self.model.config.vision_config

        def probe(pairs: int):
            pixels = torch.randn(pairs, 3, vision.image_size, vision.image_size, device=device)
            ids = torch.zeros(pairs, TEXT_MAX_LENGTH, dtype=torch.long, device=device)
            with autocast(device, self.precision):
                return self.encoder(pixels, ids)

        was_training = self.encoder.training
        self.encoder.train()
        profile = measure_activations(self.model, probe)
        self.encoder.train(was_training)
        sizes = model_sizes(self.model)
        held = sizes["parameters"] * 4 if device.type == "cpu" else 0
        usable, name = usable_memory(device, held, local_processes() if device.type == "cpu" else 1)
        plan = choose_checkpointing(config.gradient_checkpointing, profile, usable, **sizes,
                                    pairs_per_process=micro, world_size=self.procs.world_size)
        if config.memory_check:
            check_memory(plan, usable, name, profile, self.group)
        return plan

    def _loader(self):
        """The run's batches from the current position on, through one DataLoader (workers kept)."""
        config, progress = self.config, self.progress
        sampler = RunBatchSampler(len(self.train_set), config.batch_size, config.grad_accum, self.procs.rank,
                                  self.procs.world_size, config.seed, progress["epoch"],
                                  progress["step_in_epoch"], config.epochs)
        return iter(torch.utils.data.DataLoader(
            self.train_set, batch_sampler=sampler, collate_fn=self.collate, num_workers=self.num_workers,
            pin_memory=self.device.type == "cuda" and self.shared_memory.batches_in_shared_memory))

    # -- state ---------------------------------------------------------------------------------

    def _resume(self) -> str | None:
        checkpoints = list_checkpoints(self.config.out_dir)
        if not checkpoints:
            log.info("--resume: no complete checkpoint under %s; starting fresh", self.config.out_dir)
            return None
        uri = checkpoints[-1][1]
        state = load_state(uri)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        rng = state["rng"]
        set_rng_state(rng[self.procs.rank] if len(rng) == self.procs.world_size else rng[0], self.device)
        self.progress = state["progress"]
        log.info("resumed from %s (epoch %d, step %d)", uri, self.progress["epoch"] + 1,
                 self.progress["global_step"])
        return uri

    def save_checkpoint(self) -> None:
        """Write the resumable state (collective: every process calls it; process 0 writes)."""
        self._flush_losses()
        rng = [rng_state(self.device)]
        if self.procs.distributed:
            rng = [None] * self.procs.world_size
            dist.all_gather_object(rng, rng_state(self.device))
        if self.procs.main:
            state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                     "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                     "rng": rng, "progress": self.progress, "config": asdict(self.config)}
            self.output.write_checkpoint(state, self.progress["global_step"], self.config.keep_checkpoints)

    def _save_model(self, name: str) -> None:
        if self.procs.main:
            self.output.replace_dir(name, model_writer(self.model, self.processor))

    def _flush_losses(self) -> None:
        if not self._pending:
            return
        values = torch.stack(self._pending)
        if self.procs.distributed:  # each process holds its share; the global-batch loss is their mean
            dist.all_reduce(values)
            values /= self.procs.world_size
        self.progress["step_loss"].extend(values.tolist())
        self._pending.clear()

    def validate(self) -> dict:
        """Validation metrics, computed by process 0 and shared with all (collective)."""
        result = None
        if self.procs.main:
            result = validate(self.encoder, self.val_set, self.collate, self.group, self.device,
                              self.precision, self.num_workers)
        if self.procs.distributed:
            dist.barrier()
        return broadcast(result, self.procs)

    # -- training ------------------------------------------------------------------------------

    def _optimizer_step(self, batches) -> torch.Tensor:
        """One optimizer step over `grad_accum` micro-batches; returns this process's loss share."""
        config, device = self.config, self.device
        step_loss = torch.zeros((), device=device)
        for micro in range(config.grad_accum):
            pixels, input_ids = next(batches)
            pixel_values = self.collate.normalise(on_device(device, pixels))
            input_ids = on_device(device, input_ids)
            # DDP all-reduces gradients only on the last micro-batch of the step.
            sync = micro == config.grad_accum - 1 or not self.procs.distributed
            with contextlib.nullcontext() if sync else self.step_encoder.no_sync():
                with autocast(device, self.precision):
                    img, txt, scale, bias = self.step_encoder(pixel_values, input_ids)
                loss = distributed_sigmoid_loss(img, txt, scale, bias) / config.grad_accum
                self.scaler.scale(loss).backward()
            step_loss += loss.detach()
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.encoder.parameters(), config.max_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return step_loss

    def _train_epoch(self, bar) -> bool:
        """Train the rest of the current epoch; False when `max_steps` stopped it before its end."""
        config, progress = self.config, self.progress
        epoch = progress["epoch"]
        if self._batches is None:
            self._batches = self._loader()
        self.step_encoder.train()
        started, samples = time.perf_counter(), 0
        window_start, window_steps = started, 0
        for step in range(progress["step_in_epoch"], self.steps_per_epoch):
            self._pending.append(self._optimizer_step(self._batches))
            samples += config.batch_size
            window_steps += 1
            progress["global_step"] += 1
            progress["step_in_epoch"] = step + 1
            last_in_epoch = step + 1 == self.steps_per_epoch
            stop = config.max_steps is not None and progress["global_step"] >= config.max_steps
            if len(self._pending) >= LOSS_READBACK_STEPS or last_in_epoch or stop:
                self._flush_losses()
                now = time.perf_counter()
                self._windows.append((window_steps, now - window_start))
                window_start, window_steps = now, 0
            if bar is not None:
                bar.update(1)
                if not self._pending:
                    bar.set_postfix(epoch=epoch + 1, loss=f"{progress['step_loss'][-1]:.4f}",
                                    samples_s=f"{samples / (time.perf_counter() - started):.1f}", refresh=False)
            # The epoch-end checkpoint follows the last step; mid-epoch stops checkpoint right away.
            every = config.checkpoint_every_steps
            if not last_in_epoch and (stop or (every and progress["global_step"] % every == 0)):
                self.save_checkpoint()
                self._windows.append((window_steps, time.perf_counter() - window_start))
                window_start, window_steps = time.perf_counter(), 0
            if stop:
                break
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - started
        self._run_samples += samples
        self._run_seconds += seconds
        if progress["step_in_epoch"] < self.steps_per_epoch:
            return False
        self._end_epoch(samples, seconds)
        return True

    def _end_epoch(self, samples: int, seconds: float) -> None:
        progress, epoch = self.progress, self.progress["epoch"]
        val = self.validate()
        entry = {"epoch": epoch + 1, "global_step": progress["global_step"],
                 "train_loss": float(np.mean(progress["step_loss"][-self.steps_per_epoch:])), "val": val,
                 "samples": samples, "seconds": round(seconds, 3),
                 "samples_per_second": samples / seconds if seconds > 0 else None,
                 "lr": self.scheduler.get_last_lr()[0]}
        progress["epochs"].append(entry)
        log.info("epoch %d/%d: train loss %.4f, val %s, %.1f samples/s", epoch + 1, self.config.epochs,
                 entry["train_loss"], _fmt(val), entry["samples_per_second"] or 0)
        improved = progress["best_score"] is None or val[SELECTION_METRIC] > progress["best_score"]
        if improved:
            progress["best_score"], progress["best_epoch"] = val[SELECTION_METRIC], epoch + 1
        self._save_model("last")
        if improved:
            self._save_model("model")
        progress["epoch"], progress["step_in_epoch"] = epoch + 1, 0
        self.save_checkpoint()

    def run(self) -> TrainResult:
        """Train to the last epoch (or `max_steps`), write the outputs, return what `train_metrics.json` records."""
        config, progress = self.config, self.progress
        if progress["initial_val"] is None:
            progress["initial_val"] = self.validate()
            log.info("before training: %s", _fmt(progress["initial_val"]))
        bar = None
        if self.procs.main and config.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=min(self.total_steps, config.max_steps or self.total_steps),
                       initial=progress["global_step"], unit="step", desc="train", dynamic_ncols=True)
        def more() -> bool:
            return progress["epoch"] < config.epochs and (
                config.max_steps is None or progress["global_step"] < config.max_steps)

        try:
            while more() and self._train_epoch(bar):
                pass
        finally:
            self._batches = None  # ends the loader's workers
            if bar is not None:
                bar.close()
        stopped_at = None
        if progress["step_in_epoch"]:
            # Stopped mid-epoch by max_steps: validate what we have; `last/` (and `model/` while no
            # epoch has finished) get these weights. Not part of `progress`: a resumed run redoes it.
            stopped_at = {"epoch": progress["epoch"] + 1, "global_step": progress["global_step"],
                          "val": self.validate()}
            self._save_model("last")
            if progress["best_epoch"] is None:
                self._save_model("model")
        result = self.result(stopped_at)
        if self.procs.main:
            self.output.write_file("train_metrics.json", (json.dumps(result.as_dict(), indent=2) + "\n").encode())
            self.output.write_file("loss_curve.png", plot_loss_curve(
                progress["step_loss"], progress["epochs"], self.steps_per_epoch))
            self.output.close()
        return result

    def result(self, stopped_at: dict[str, Any] | None) -> TrainResult:
        """The run as `TrainResult`: settings, per-epoch loss/recall/throughput, best epoch, loss per step."""
        config, progress = self.config, self.progress
        best = next((e for e in progress["epochs"] if e["epoch"] == progress["best_epoch"]), None)
        return TrainResult(
            model_uri=config.model_uri, data_uri=config.data_uri, out_dir=config.out_dir, config=config,
            precision=self.precision, device=str(self.device), world_size=self.procs.world_size,
            train_pairs=len(self.train_set), val_pairs=len(self.val_set), steps_per_epoch=self.steps_per_epoch,
            warmup_steps=self.warmup, global_step=progress["global_step"],
            epochs_completed=len(progress["epochs"]), resumed_from=self.resumed_from,
            selection_metric=SELECTION_METRIC, best_epoch=progress["best_epoch"],
            best_val=best["val"] if best else None, initial_val=progress["initial_val"],
            final_train_loss=progress["step_loss"][-1] if progress["step_loss"] else None,
            samples_per_second=self._run_samples / self._run_seconds if self._run_seconds > 0 else None,
            steady_samples_per_second=self._steady_samples_per_second(),
            train_seconds=round(self._run_seconds, 3), num_workers=self.num_workers,
            memory_plan=self.memory_plan.as_dict(), shared_memory=self.shared_memory.as_dict(),
            logit_scale=float(self.model.logit_scale.detach().exp()),
            logit_bias=float(self.model.logit_bias.detach()),
            epochs=progress["epochs"], step_loss=progress["step_loss"], stopped_at=stopped_at)

    def _steady_samples_per_second(self) -> float | None:
        """Throughput past warm-up: the loss read-back windows after this invocation's first."""
        steps = sum(n for n, _ in self._windows[1:])
        seconds = sum(t for _, t in self._windows[1:])
        return steps * self.config.batch_size / seconds if steps and seconds > 0 else None


def _fmt(val: dict) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in val.items())


def train_on_all_devices(config: TrainConfig) -> TrainResult:
    """`train` on every GPU of this machine: one DDP process per GPU via torchrun when there are
    several (and we are not already one of torchrun's processes), else in this process."""
    import subprocess
    import sys

    gpus = torch.cuda.device_count()
    if gpus <= 1 or "WORLD_SIZE" in os.environ or (config.device or "cuda").startswith("cpu"):
        return train(config)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}",
           "-m", "visrec.stages.train.trainer", json.dumps(asdict(config))]
    log.info("training on %d GPUs: %s", gpus, " ".join(cmd[:6]))
    subprocess.run(cmd, check=True)
    return TrainResult.from_dict(io.read_json(io.join(config.out_dir, "train_metrics.json")))


if __name__ == "__main__":  # what torchrun starts in each process (see train_on_all_devices)
    import sys

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    train(TrainConfig(**json.loads(sys.argv[1])))

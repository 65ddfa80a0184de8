"""KFP component for stage 2: SigLIP fine-tuning on a GPU, resumable across preemptions."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from components.images import TRAINER_IMAGE
from components.resources import set_resources


@dsl.component(base_image=TRAINER_IMAGE, install_kfp_package=False)
def train(
    dataset: Input[Dataset],
    model_uri: str,
    model: Output[Model],
    metrics: Output[Metrics],
    epochs: int = 5,
    batch_size: int = 256,
    lr: float = 5e-5,
    warmup_steps: int = -1,
    weight_decay: float = 0.1,
    precision: str = "",
    grad_accum: int = 1,
    max_steps: int = 0,
    checkpoint_every_steps: int = 500,
    augment: bool = True,
    num_workers: int = 4,
    seed: int = 0,
):
    """Fine-tune `model_uri` (hub id or gs:// dir) on the prepared `dataset` (`visrec.train`).

    `model` receives the whole stage-2 directory (`model/`, `last/`, `checkpoints/`,
    `train_metrics.json`, `loss_curve.png`). Always resumes: a retried task (after a
    preemption) gets the same output URI and continues from its newest checkpoint.
    Uses every GPU of the machine (one DDP process each). warmup_steps -1 = 5% of the
    steps, max_steps 0 = no limit, precision "" = bf16 on GPU / fp32 on CPU.
    """
    from components.artifacts import location, log_metrics
    from visrec.train import TrainConfig, train_on_all_devices

    out = location(model)
    values = train_on_all_devices(TrainConfig(
        data_uri=location(dataset), out_dir=out, model_uri=model_uri, epochs=epochs, batch_size=batch_size,
        lr=lr, warmup_steps=None if warmup_steps < 0 else warmup_steps, weight_decay=weight_decay,
        precision=precision or None, grad_accum=grad_accum, max_steps=max_steps or None,
        checkpoint_every_steps=checkpoint_every_steps, augment=augment, num_workers=num_workers, seed=seed,
        resume=True, progress=False))
    summary = {key: values[key] for key in ("global_step", "epochs_completed", "best_epoch", "samples_per_second",
                                            "final_train_loss", "logit_scale", "logit_bias") if values[key] is not None}
    summary["best_val"] = values["best_val"] or {}
    summary["initial_val"] = values["initial_val"] or {}
    log_metrics(metrics, summary)
    model.metadata.update({"framework": "transformers", "architecture": "SiglipModel", "base_model": model_uri,
                           "model_dir": f"{out.rstrip('/')}/model", "best_epoch": values["best_epoch"]})


def apply_train_resources(task: dsl.PipelineTask, accelerator: str = "NVIDIA_L4", count: int = 1, cpu: str = "8",
                          memory: str = "32G", retries: int = 2) -> dsl.PipelineTask:
    """Vertex AI machine for the training task: `count` GPUs of `accelerator` ("" for none),
    CPU/memory limits, and retries with backoff so a preempted (spot) run resumes."""
    return set_resources(task, cpu, memory, accelerator, count, retries)

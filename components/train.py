"""KFP component for stage 2: SigLIP fine-tuning on a GPU, resumable across preemptions."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from components.images import TRAINER_IMAGE


@dsl.component(base_image=TRAINER_IMAGE, install_kfp_package=False)
def train(
    dataset: Input[Dataset],
    model_uri: str,
    epochs: int,
    batch_size: int,
    lr: float,
    warmup_steps: int,
    precision: str,
    max_steps: int,
    seed: int,
    device: str,
    gradient_checkpointing: str,
    freeze_token_embedding: bool,
    gradient_compression: str,
    model: Output[Model],
    metrics: Output[Metrics],
):
    """Fine-tune `model_uri` (hub id or gs:// dir) on the prepared `dataset` (`visrec.stages.train.trainer`).

    Settings are `TrainConfig`'s; unset values are KFP's stand-ins for None
    (`visrec.orchestration.pipeline_config.from_kfp`: warmup_steps -1 = 5% of the steps, max_steps 0 =
    no limit, precision "" = bf16 on GPU / fp32 on CPU, device "" = the GPU when CUDA is
    usable; "cuda" fails at once when it is not). `model` receives the whole stage-2
    directory (`model/`, `last/`, `checkpoints/`, `train_metrics.json`, `loss_curve.png`).
    Always resumes: a retried task gets the same output URI and continues from its newest
    checkpoint. Uses every GPU of the machine (one DDP process each).
    """
    from components.artifacts import location, log_metrics
    from visrec.orchestration.pipeline_config import from_kfp
    from visrec.stages.configs import TrainConfig
    from visrec.stages.train.trainer import train_on_all_devices

    out = location(model)
    result = train_on_all_devices(TrainConfig(
        data_uri=location(dataset), out_dir=out, model_uri=model_uri, resume=True, progress=False,
        **from_kfp(TrainConfig, epochs=epochs, batch_size=batch_size, lr=lr, warmup_steps=warmup_steps,
                   precision=precision, max_steps=max_steps, seed=seed, device=device,
                   gradient_checkpointing=gradient_checkpointing, freeze_token_embedding=freeze_token_embedding,
                   gradient_compression=gradient_compression)))
    summary = {"global_step": result.global_step, "epochs_completed": result.epochs_completed,
               "best_epoch": result.best_epoch, "samples_per_second": result.samples_per_second,
               "final_train_loss": result.final_train_loss, "logit_scale": result.logit_scale,
               "logit_bias": result.logit_bias}
    summary = {key: value for key, value in summary.items() if value is not None}
    summary["best_val"] = result.best_val or {}
    summary["initial_val"] = result.initial_val or {}
    summary["peak_memory_estimate_gib"] = result.memory_plan["total_gib"]
    summary["gradient_checkpointing"] = result.memory_plan["checkpointing"]
    log_metrics(metrics, summary)
    model.metadata.update({"framework": "transformers", "architecture": "SiglipModel", "base_model": model_uri,
                           "model_dir": f"{out.rstrip('/')}/model", "best_epoch": result.best_epoch})

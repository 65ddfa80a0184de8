"""The settings of the prepare, train, embed and evaluate stages: one config dataclass each.

A config dataclass is the only place its stage's defaults are written: the CLI flags
(`visrec/cli`, through `visrec.core.defaults.field_default`), the pipeline parameters
(`kfp_default`) and the tests all read them from here. The configs live apart from the
stages, which import torch and Apache Beam, so `visrec --help` builds every flag in
milliseconds and the pipeline compiles without those libraries.

Each config checks in `__post_init__` what its own values can tell (ranges, choices) and
raises `UserError` naming the first unusable setting; what needs the data, the checkpoint
or the machine (a model's kind, the device) is checked when the stage runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date

from visrec.core import io
from visrec.core.errors import UserError
from visrec.model.encoders import KINDS, SIGLIP_HUB_ID

TRAIN_PRECISIONS = ("bf16", "fp16", "fp32")
GRADIENT_COMPRESSION = ("none", "bf16")
CHECKPOINTING = ("auto", "on", "off")
EMBED_DEVICES = ("auto", "cpu", "gpu")
EMBED_PRECISIONS = ("bf16", "fp32")


@dataclass
class PrepareConfig:
    """Settings of the dataset-preparation stage (`visrec.stages.prepare`).

    listings_uri: a listings file (.jsonl/.csv/.parquet) or a directory/prefix of them, local or gs://.
    out_dir: where shards, rejected.jsonl and stats.json go, local or gs://.
    max_pairs: keep at most this many pairs, chosen by a hash of (seed, item_id); None keeps all.
    val_fraction: share of items (by a hash of the item) in the validation split.
    image_size: output images are `image_size` square (longest side scaled to it, padded).
    shards: number of Parquet files; each is built in one worker's memory, so raise it for big inputs.
    runner: a Beam runner (`DirectRunner` here, `DataflowRunner` at scale).
    beam_options: extra Beam pipeline flags, e.g. `--direct_num_workers=2`, `--project=...`.
    """

    listings_uri: str
    out_dir: str
    max_pairs: int | None = None
    val_fraction: float = 0.05
    seed: int = 0
    image_size: int = 256
    jpeg_quality: int = 90
    shards: int = 8
    runner: str = "DirectRunner"
    beam_options: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.max_pairs is not None and self.max_pairs < 1:
            raise UserError(f"max_pairs must be >= 1 (or unset for all), got {self.max_pairs}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise UserError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if not 8 <= self.image_size <= 4096:
            raise UserError(f"image_size must be in [8, 4096], got {self.image_size}")
        if not 1 <= self.jpeg_quality <= 95:
            raise UserError(f"jpeg_quality must be in [1, 95], got {self.jpeg_quality}")
        if not 1 <= self.shards <= 99999:
            raise UserError(f"shards must be in [1, 99999], got {self.shards}")
        if self.runner == "DataflowRunner":
            local = [u for u in (self.listings_uri, self.out_dir) if not io.is_gcs(u)]
            if local:
                raise UserError(f"DataflowRunner workers cannot see local paths: {local}; use gs:// URIs")


@dataclass
class TrainConfig:
    """Fine-tuning settings (`visrec.stages.train.trainer`); defaults are the paper's (5 epochs, batch 256,
    lr 5e-5).

    `batch_size` is the global batch per optimizer step, over all processes and
    accumulation steps; the sigmoid loss sees `batch_size / grad_accum` pairs at once
    (negatives are shared across processes), so results do not depend on the GPU count.
    """

    data_uri: str
    out_dir: str
    model_uri: str = SIGLIP_HUB_ID
    epochs: int = 5
    batch_size: int = 256
    lr: float = 5e-5
    # None: 5% of all optimizer steps; -1 stands for None in KFP parameters, where 0 means no warmup.
    warmup_steps: int | None = field(default=None, metadata={"kfp_unset": -1})
    weight_decay: float = 0.1
    precision: str | None = None  # None: bf16 on a GPU with bf16 tensor cores (L4, A100, H100), else fp32
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    resume: bool = False
    seed: int = 0
    max_steps: int | None = None  # stop (resumably) after this many optimizer steps
    checkpoint_every_steps: int = 500  # 0: only at epoch ends
    keep_checkpoints: int = 2
    augment: bool = True
    augment_min_crop_area: float = 0.8
    augment_hflip: bool = True
    # None: the machine's CPUs shared out over its training processes (-1 in KFP parameters).
    num_workers: int | None = field(default=None, metadata={"kfp_unset": -1})
    val_max_items: int = 10_000  # recall is O(n^2): a fixed seeded subset of larger val splits
    # None: cuda:LOCAL_RANK when usable, else cpu. "cuda"/"gpu": fail at once if CUDA is not usable.
    device: str | None = None
    # "auto": on only when the run would not fit the device without it (`CHECKPOINTING`).
    gradient_checkpointing: str = "auto"
    memory_check: bool = True  # refuse at start a run whose estimated peak memory exceeds the device's
    # The multilingual vocabulary is half the model (192M of 371M parameters): freezing it halves
    # gradients, optimizer state and each step's all-reduce.
    freeze_token_embedding: bool = False
    gradient_compression: str = "none"  # "bf16": all-reduce gradients in bf16 (half the traffic)
    # Collectives wait this long, e.g. while process 0 validates and writes ~7 GB of checkpoint and
    # models to GCS at an epoch end (torch's default of 10 minutes does not cover a slow upload).
    process_group_timeout_minutes: int = 60
    progress: bool = True

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise UserError(f"--epochs must be >= 1, got {self.epochs}")
        if self.grad_accum < 1 or self.batch_size < 2:
            raise UserError("--batch-size must be >= 2 and --grad-accum >= 1")
        if self.precision is not None and self.precision not in TRAIN_PRECISIONS:
            raise UserError(f"--precision must be one of {TRAIN_PRECISIONS}, got {self.precision!r}")
        if self.lr <= 0:
            raise UserError(f"--lr must be positive, got {self.lr}")
        if self.max_steps is not None and self.max_steps < 1:
            raise UserError(f"--max-steps must be >= 1, got {self.max_steps}")
        if self.gradient_checkpointing not in CHECKPOINTING:
            raise UserError(f"--gradient-checkpointing must be one of {CHECKPOINTING}, "
                            f"got {self.gradient_checkpointing!r}")
        if self.gradient_compression not in GRADIENT_COMPRESSION:
            raise UserError(f"--gradient-compression must be one of {GRADIENT_COMPRESSION}, "
                            f"got {self.gradient_compression!r}")
        if self.num_workers is not None and self.num_workers < 0:
            raise UserError(f"--num-workers must be >= 0, got {self.num_workers}")


def check_encoder_placement(device: str, precision: str | None) -> None:
    """`UserError` unless the image encoder can run on `device` at `precision` (`visrec embed`, `visrec ingest`)."""
    if device.lower() not in EMBED_DEVICES:
        raise UserError(f"unknown device {device!r}; expected one of {EMBED_DEVICES}")
    if precision is not None and precision not in EMBED_PRECISIONS:
        raise UserError(f"unknown precision {precision!r}; expected one of {EMBED_PRECISIONS}")


@dataclass
class EmbedConfig:
    """Stage-3 settings (`visrec.stages.embed`).

    data_uri: prepared Parquet dir (`data-*.parquet`) or a listings file (JSONL/CSV/Parquet
        whose `image_uri` is relative to the file, or absolute / `gs://`).
    model_uri: image encoder: a trained model dir, hub id or `gs://` dir.
    kind: `""`: the checkpoint's own (`visrec.model.encoders.encoder_kind`: `siglip` for the
        candidate, `mobilenet_v2` for the baseline); a kind given here must be the checkpoint's.
    pca_dims: output dimensions (128 in the paper); 0 keeps the encoder's own, without PCA.
    pca_uri: an existing `pca.npz` (or a dir holding one) to apply instead of fitting;
        new listings must be projected with the production PCA.
    pca_sample_size: at most this many vectors for the PCA fit.
    batch_size / min_batch_size / max_batch_size: `BatchElements` bounds for inference; both
        default to `batch_size`: fixed batches keep memory per forward predictable (a GPU's
        limit), and on CPU Beam's adaptive sizing from 1 was no faster (bench/embed.py). A
        smaller minimum lets Beam shrink batches (memory, streaming).
    shards: number of `embeddings-*.parquet` files.
    device: `auto` (GPU when the worker has one), `cpu` or `gpu`.
    precision: `bf16` (autocast) or `fp32`; None: bf16 on a GPU with bf16 tensor cores, fp32 on
        CPU (and a T4), decided on the worker. Features leave the encoder as float32 either way.
    share_model: one model copy per machine shared by all its SDK processes
        (Beam's `large_model`), for big models on one GPU.
    seed: selects the PCA sample.
    """

    data_uri: str
    model_uri: str
    out_dir: str
    kind: str = ""
    pca_dims: int = 128
    pca_uri: str | None = None
    pca_sample_size: int = 1_000_000
    batch_size: int = 64
    min_batch_size: int | None = None
    max_batch_size: int | None = None
    runner: str = "DirectRunner"
    beam_options: list[str] = field(default_factory=list)
    shards: int = 4
    device: str = "auto"
    precision: str | None = None
    share_model: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind and self.kind not in KINDS:
            raise UserError(f"unknown model kind {self.kind!r}; expected one of {KINDS} (or none: the checkpoint's)")
        if self.pca_dims < 0:
            raise UserError(f"--pca-dims must be >= 0, got {self.pca_dims}")
        if self.pca_sample_size < 2:
            raise UserError(f"PCA sample size must be >= 2, got {self.pca_sample_size}")
        if not 1 <= self.batch_size_min <= self.batch_size_max:
            raise UserError(f"need 1 <= min batch size ({self.batch_size_min}) <= max batch size "
                            f"({self.batch_size_max})")
        if self.shards < 1:
            raise UserError(f"shards must be >= 1, got {self.shards}")
        check_encoder_placement(self.device, self.precision)

    @property
    def batch_size_min(self) -> int:
        return self.min_batch_size or self.batch_size

    @property
    def batch_size_max(self) -> int:
        return self.max_batch_size or self.batch_size


@dataclass
class EvaluateConfig:
    """Inputs and knobs of one evaluation (`visrec.stages.evaluate.evaluation`).

    interactions_uri: impression logs (JSONL, CSV or Parquet; the data contract).
    candidate_uri, baseline_uri, champion_uri: stage-3 embedding directories
        (`embeddings-*.parquet`); no champion before the first release.
    listings_uri: optional listings, for per-top-level-category slices and report pictures.
    gate_config: YAML gate policy (`docs/gate.md`); None = the default (`visrec/configs/gate.yaml`).
    bootstrap_resamples: paired bootstrap resamples over lists (0 = no intervals).
    seed: seeds the random ranking, the bootstrap and the report's sample queries.
    report_examples: query items shown with their top-5 in the report.
    """

    interactions_uri: str
    candidate_uri: str
    baseline_uri: str
    out_dir: str
    champion_uri: str | None = None
    listings_uri: str | None = None
    gate_config: str | None = None
    bootstrap_resamples: int = 1000
    seed: int = 0
    report_examples: int = 12

    def __post_init__(self) -> None:
        if self.bootstrap_resamples < 0:
            raise UserError(f"bootstrap_resamples must be >= 0, got {self.bootstrap_resamples}")


@dataclass
class JoinConfig:
    """`visrec join-events` settings (`visrec.stages.join_events`).

    logs: the service's log root (`LogConfig.uri`). out: the interactions prefix (of `dt=` partitions).
    dates: the days (YYYY-MM-DD) to join; None: every day of impressions before today (UTC) whose
        output partition is not complete yet.
    attribution_hours: how long after its impression a tap or purchase still counts.
    shards: output files per day.
    impressions_from: read the impressions from Vertex AI's request-response log instead of
        `LOGS/impressions`: a prefix of that BigQuery table exported as JSON Lines
        (`bq extract --destination_format=NEWLINE_DELIMITED_JSON`); events still come from `LOGS/events`.
    """

    logs: str
    out: str
    dates: list[str] | None = None
    impressions_from: str | None = None
    attribution_hours: float = 24.0
    shards: int = 4
    runner: str = "DirectRunner"
    beam_options: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        for day in self.dates or []:
            try:
                date.fromisoformat(day)
            except ValueError:
                raise UserError(f"--date wants YYYY-MM-DD, got {day!r}") from None
        if self.shards < 1 or self.attribution_hours <= 0:
            raise UserError("--shards must be >= 1 and --attribution-hours > 0")

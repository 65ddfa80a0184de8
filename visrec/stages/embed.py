"""Stage 3: embed every catalog image with an Apache Beam pipeline, then PCA to the index space.

The pipeline reads the prepared Parquet shards (stage 1) or the raw listings (to
embed the whole catalog, not only the training sample), decodes and preprocesses
each image with the encoder's own image processor, and runs the image encoder
through Beam's `RunInference` with a keyed model handler: item ids travel as keys,
the model is loaded once per worker process and shared by its threads (or by all
of a machine's processes with `share_model`), batches are sized by
`BatchElements` between `min_batch_size` and `max_batch_size`, and the model runs
on the GPU when the worker has one (under bf16 autocast by default). Embeddings
are L2-normalised, projected by a PCA fitted on a deterministic sample (or by an
existing production PCA) and L2-normalised again. Images that cannot be read or
decoded go to `rejected.jsonl` with a reason instead of failing the run.

The same code runs on the DirectRunner on one machine and on Dataflow (GPU
workers, custom container: docs/embedding.md); every file access goes through
`visrec.core.io`, so inputs and outputs may be local or `gs://`.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
import zlib
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import apache_beam as beam
import numpy as np
import pyarrow.parquet as pq
from apache_beam.ml.inference.base import KeyedModelHandler, ModelHandler, RunInference

from visrec.core import io
from visrec.stages.dataflow import make_pipeline, run_pipeline
from visrec.core.errors import UserError
from visrec.core.hashing import hash64
from visrec.model.encoders import encoder_kind, load_image_encoder, preprocess_images, resolve_precision
from visrec.data.embeddings import (EMBEDDINGS_PATTERN, EMBEDDINGS_SCHEMA, ROWS_PER_GROUP, embeddings_name,
                               embeddings_table, write_embeddings)
from visrec.model.encode import features, project
from visrec.model.pca import PCA_FILE, PcaProjection
from visrec.data.schema import PREPARED_SHARDS
from visrec.stages.configs import EmbedConfig

log = logging.getLogger(__name__)

_PROGRESS_SECONDS = 10.0
_ROWS_PER_READ = 256


# ---------------------------------------------------------------- inputs

def plan_input(data_uri: str) -> tuple[str, list[Any]]:
    """What to read: (`prepared`, Parquet shard URIs) or (`listings`, `visrec.data.schema.ReadTask`s).

    A directory of `data-*.parquet` (or one such file, recognised by its `image`
    column) is stage-1 output; anything else is read as listings per the data contract.
    """
    from visrec.data import schema

    if not schema.names_a_data_file(str(data_uri)):
        files = io.list_files(data_uri, PREPARED_SHARDS)
        if files:
            return "prepared", files
    elif str(data_uri).endswith(".parquet") and io.exists(data_uri):
        with schema.open_binary(data_uri) as fh:
            names = pq.ParquetFile(fh).schema_arrow.names
        if "image" in names and "image_uri" not in names:
            return "prepared", [data_uri]
    return "listings", schema.plan_reads(data_uri)


def read_prepared_shard(uri: str) -> Iterator[tuple[str, bytes]]:
    """(item_id, JPEG bytes) of one prepared shard, a few hundred rows in memory at a time."""
    local = io.local_file(uri, suffix=".parquet")
    try:
        shard = pq.ParquetFile(local)
        missing = {"item_id", "image"} - set(shard.schema_arrow.names)
        if missing:
            raise UserError(f"prepared shard {uri}: missing column(s) {sorted(missing)}")
        for batch in shard.iter_batches(batch_size=_ROWS_PER_READ, columns=["item_id", "image"]):
            yield from zip(batch.column(0).to_pylist(), batch.column(1).to_pylist())
    finally:
        if io.is_gcs(uri):
            local.unlink(missing_ok=True)


# ---------------------------------------------------------------- Beam parts

def _dead_letter(item_id: Any, reason: str, **extra: Any) -> beam.pvalue.TaggedOutput:
    return beam.pvalue.TaggedOutput("rejected", {"item_id": item_id, "reason": reason, **extra})


def _read_listing_task(task: Any) -> Iterator[tuple[tuple[int, int], Any, str]]:
    from visrec.data.schema import read_task

    for order, raw in read_task(task):
        yield order, raw, task.base_dir


class ParseListing(beam.DoFn):
    """(order key, raw record, base dir) -> (item_id, (order key, image_uri, base dir)) per the data contract."""

    def process(self, element: tuple[tuple[int, int], Any, str]) -> Iterator[Any]:
        from visrec.data.schema import json_safe, parse_record

        order, raw, base_dir = element
        clean, row, reason = parse_record(raw)
        if reason:
            yield _dead_letter(row.get("item_id") if isinstance(row, dict) else None, reason, row=json_safe(row))
            return
        yield clean["item_id"], (order, clean["image_uri"], base_dir)


def first_listing(element: tuple[str, Iterable[tuple[tuple[int, int], str, str]]]) -> Iterator[Any]:
    """One listing per item id: the first in input order wins (as in `visrec prepare`), the rest are dead letters."""
    item_id, listings = element
    first, *rest = sorted(listings)
    yield item_id, first[1:]
    for _, image_uri, _ in rest:
        yield _dead_letter(item_id, "duplicate_item_id", image_uri=image_uri)


class LoadImage(beam.DoFn):
    """(item_id, (image_uri, base dir)) -> (item_id, bytes); a missing/unreadable file is a dead letter."""

    def process(self, element: tuple[str, tuple[str, str]]) -> Iterator[Any]:
        from visrec.data.images import load_image_bytes

        item_id, (image_uri, base_dir) = element
        try:
            yield item_id, load_image_bytes(image_uri, base_dir)
        except (OSError, UserError) as exc:
            yield _dead_letter(item_id, "unreadable_image", image_uri=image_uri, detail=str(exc))


class DecodeAndPreprocess(beam.DoFn):
    """(item_id, JPEG bytes) -> (item_id, pixel_values (3, H, W)) with the encoder's own processor.

    Per element, so one bad image is one dead letter; the PIL-backed processors are
    no faster on a list than image by image (measured in bench/embed.py).
    """

    def __init__(self, image_processor: Any):
        # `preprocess_images` takes anything with an `.image_processor`: this DoFn is one.
        self.image_processor = image_processor

    def process(self, element: tuple[str, bytes]) -> Iterator[Any]:
        from visrec.data.images import ImageDecodeError, decode_image

        item_id, data = element
        try:
            image = decode_image(data)
        except ImageDecodeError as exc:
            yield _dead_letter(item_id, "undecodable_image", detail=exc.reason)
            return
        yield item_id, preprocess_images(self, [image])[0]


class EncoderOnDevice:
    """The encoder where it runs: CPU pixel batch in, CPU float32 features out.

    A plain callable, so it also works through the cross-process proxy Beam puts
    in front of a model shared by all of a machine's processes (`share_model`):
    the device move, `inference_mode` and autocast happen where the model lives.
    """

    def __init__(self, encoder: Any, device: str, precision: str = "fp32"):
        self.encoder = encoder
        self.device = device
        self.precision = precision

    def __call__(self, pixel_values: Any) -> Any:
        import torch

        # Weights stay float32; autocast runs the matmuls and convolutions in bf16.
        with torch.inference_mode(), torch.autocast(device_type=self.device, dtype=torch.bfloat16,
                                                    enabled=self.precision == "bf16"):
            return self.encoder(pixel_values.to(self.device)).float().cpu()


# The encoder an `ImageEncoderHandler(keep_loaded=True)` loaded last, by (model, kind, device, precision).
_KEPT_ENCODER: dict[tuple[str, str, str, str], EncoderOnDevice] = {}


class ImageEncoderHandler(ModelHandler):
    """RunInference handler: batches of (3, H, W) tensors -> L2-normalised float32 embeddings.

    The stock `PytorchModelHandlerTensor` wants a model class and a state-dict path;
    this one loads through `visrec.model.encoders.load_image_encoder`, so a hub id, a local
    dir and a `gs://` dir load exactly as in every other stage.
    """

    def __init__(self, model_uri: str, kind: str, device: str = "auto", *, precision: str | None = None,
                 min_batch_size: int = 1, max_batch_size: int = 64, share_model: bool = False,
                 keep_loaded: bool = False):
        super().__init__(min_batch_size=min_batch_size, max_batch_size=max_batch_size, large_model=share_model)
        self.model_uri = model_uri
        self.kind = kind
        self.device = device.lower()
        self.precision = precision
        self.keep_loaded = keep_loaded

    def _torch_device(self) -> str:
        import torch

        # Resolved on the worker: the launcher may have no GPU while Dataflow workers do.
        if self.device == "gpu" or (self.device == "auto" and torch.cuda.is_available()):
            return "cuda"
        return "cpu"

    def load_model(self) -> "EncoderOnDevice":
        """The encoder on this worker's device. With `keep_loaded`, the last one loaded stays in the
        process for the next pipeline with the same model (`visrec ingest` runs one per poll)."""
        device = self._torch_device()
        precision = resolve_precision(self.precision, device)
        key = (self.model_uri, self.kind, device, precision)
        if self.keep_loaded and key in _KEPT_ENCODER:
            return _KEPT_ENCODER[key]
        encoder = load_image_encoder(self.model_uri, self.kind).to(device)
        log.info("loaded %s encoder from %s on %s, %s (%d dims)", self.kind, self.model_uri, device, precision,
                 encoder.dims)
        loaded = EncoderOnDevice(encoder, device, precision)
        if self.keep_loaded:
            _KEPT_ENCODER.clear()  # one at a time: a new release's encoder replaces the old one
            _KEPT_ENCODER[key] = loaded
        return loaded

    def run_inference(self, batch: Sequence[Any], model: "EncoderOnDevice",
                      inference_args: dict | None = None) -> list[np.ndarray]:
        import torch

        return list(features(model, torch.stack(list(batch))))

    def get_num_bytes(self, batch: Sequence[Any]) -> int:
        # The default pickles the whole batch just to measure it.
        return sum(t.element_size() * t.nelement() for t in batch)

    def get_metrics_namespace(self) -> str:
        return "visrec_embed"


class LogProgress(beam.DoFn):
    """Counts embedded items and logs this worker's rate every few seconds."""

    def setup(self) -> None:
        self.count = 0
        self.start = self.last = time.monotonic()
        self.counter = beam.metrics.Metrics.counter("visrec_embed", "embedded")

    def process(self, element: Any) -> Iterator[Any]:
        self.count += 1
        self.counter.inc()
        now = time.monotonic()
        if now - self.last >= _PROGRESS_SECONDS:
            self.last = now
            log.info("embedded %d items (%.1f items/s)", self.count, self.count / (now - self.start))
        yield element

    def teardown(self) -> None:
        if self.count:
            elapsed = time.monotonic() - self.start
            log.info("embedded %d items in %.1f s (%.1f items/s)", self.count, elapsed, self.count / elapsed)


def sample_priority(item_id: str, seed: int) -> int:
    """A stable pseudo-random rank per item: the PCA sample is the same for the same catalog."""
    # Its own text, not `stable_hash(seed, item_id)`: that joins with "\x1f" and would pick another sample.
    return hash64(f"{seed}:{item_id}")


def shard_of(item_id: str, shards: int) -> int:
    return zlib.crc32(item_id.encode()) % shards


def _priority(element: tuple[int, np.ndarray]) -> int:
    return element[0]


def fit_pca_on_sample(sample: list[tuple[int, np.ndarray]], dims: int, seed: int) -> PcaProjection:
    """PCA on the sampled vectors, in priority order so the fit does not depend on arrival order."""
    vectors = np.stack([v for _, v in sorted(sample, key=_priority)])
    return PcaProjection.fit(vectors, dims, sample_size=len(vectors), seed=seed)


def _save_pca(pca: PcaProjection, uri: str) -> None:
    pca.save(uri)


def _project(element: tuple[str, np.ndarray], pca: PcaProjection) -> tuple[str, np.ndarray]:
    item_id, vector = element
    return item_id, project(vector[None, :], pca)[0]


class WriteShard(beam.DoFn):
    """(shard, [(item_id, vector)...]) -> one `embeddings-SSSSS-of-NNNNN.parquet`, streamed in row groups."""

    def __init__(self, out_dir: str, shards: int):
        self.out_dir = out_dir
        self.shards = shards

    def setup(self) -> None:
        self.written = beam.metrics.Metrics.counter("visrec_embed", "written")

    def process(self, element: tuple[int, Iterable[tuple[str, np.ndarray]]]) -> Iterator[int]:
        shard, rows = element
        with tempfile.TemporaryDirectory(prefix="visrec-emb-") as tmp:
            local = Path(tmp, embeddings_name(shard, self.shards))
            with pq.ParquetWriter(local, EMBEDDINGS_SCHEMA) as writer:
                for chunk in _chunks(rows, ROWS_PER_GROUP):
                    ids = [item_id for item_id, _ in chunk]
                    writer.write_table(embeddings_table(ids, np.stack([v for _, v in chunk])))
                    self.written.inc(len(chunk))
            # The whole temp dir is this one file: uploads it to a local dir or gs:// alike.
            io.upload_dir(tmp, self.out_dir)
        yield shard


def _chunks(rows: Iterable[Any], size: int) -> Iterator[list[Any]]:
    chunk: list[Any] = []
    for row in rows:
        chunk.append(row)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _write_rejected(records: list[dict], uri: str) -> None:
    io.write_text(uri, "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in records))


def load_image_processor(model_uri: str) -> Any:
    """Only the encoder's image processor (for the preprocessing step), without the weights."""
    from transformers import AutoImageProcessor

    try:
        if io.is_gcs(model_uri):
            with tempfile.TemporaryDirectory(prefix="visrec-proc-") as tmp:
                name = "preprocessor_config.json"
                io.write_bytes(str(Path(tmp, name)), io.read_bytes(io.join(model_uri, name)))
                return AutoImageProcessor.from_pretrained(tmp)
        return AutoImageProcessor.from_pretrained(model_uri)
    except (OSError, FileNotFoundError) as exc:
        raise UserError(f"cannot load the image processor of {model_uri}: {exc}") from exc


def encoder_handler(config: EmbedConfig) -> KeyedModelHandler:
    """The RunInference handler `build_pipeline` uses: keyed by item id, sized, placed and shared per `config`."""
    return KeyedModelHandler(ImageEncoderHandler(
        config.model_uri, config.kind, config.device, precision=config.precision,
        min_batch_size=config.batch_size_min, max_batch_size=config.batch_size_max, share_model=config.share_model))


def build_pipeline(p: beam.Pipeline, config: EmbedConfig, plan: tuple[str, list[Any]], image_processor: Any,
                   pca: PcaProjection | None) -> None:
    """Add the stage-3 transforms to `p`: read `plan` (from `plan_input`), decode, embed, (fit and) project,
    write."""
    input_kind, reads = plan
    dead_letters = []
    if input_kind == "prepared":
        # Spread the rows: a few big shards must not pin the work to a few workers.
        encoded = (p | "InputFiles" >> beam.Create(reads) | "ReadShards" >> beam.FlatMap(read_prepared_shard)
                   | "Spread" >> beam.Reshuffle())
    else:
        parsed = (p | "ReadTasks" >> beam.Create(reads) | "SpreadTasks" >> beam.Reshuffle()
                  | "ReadListings" >> beam.FlatMap(_read_listing_task)
                  | "Parse" >> beam.ParDo(ParseListing()).with_outputs("rejected", main="listings"))
        unique = (parsed.listings | "ById" >> beam.GroupByKey()
                  | "FirstListing" >> beam.FlatMap(first_listing).with_outputs("rejected", main="listings"))
        loaded = unique.listings | "LoadImages" >> beam.ParDo(LoadImage()).with_outputs("rejected", main="images")
        encoded = loaded.images
        dead_letters += [parsed.rejected, unique.rejected, loaded.rejected]
    decoded = (encoded | "DecodePreprocess" >> beam.ParDo(DecodeAndPreprocess(image_processor))
               .with_outputs("rejected", main="pixels"))
    dead_letters.append(decoded.rejected)

    vectors = (decoded.pixels | "Embed" >> RunInference(encoder_handler(config))
               | "Progress" >> beam.ParDo(LogProgress()))

    pca_uri = io.join(config.out_dir, "pca", PCA_FILE)
    if pca is not None:
        projection = p | "GivenPca" >> beam.Create([pca])
    elif config.pca_dims > 0:
        seed, dims = config.seed, config.pca_dims
        projection = (vectors
                      | "Prioritise" >> beam.Map(lambda kv: (sample_priority(kv[0], seed), kv[1]))
                      | "Sample" >> beam.combiners.Top.Of(config.pca_sample_size, key=_priority)
                      | "FitPca" >> beam.Map(fit_pca_on_sample, dims, seed))
    else:
        projection = None
    if projection is not None:
        projection | "SavePca" >> beam.Map(_save_pca, pca_uri)
        vectors = vectors | "Project" >> beam.Map(_project, beam.pvalue.AsSingleton(projection))

    shards = config.shards
    (vectors
     | "ShardKey" >> beam.Map(lambda kv: (shard_of(kv[0], shards), kv))
     | "GroupShards" >> beam.GroupByKey()
     | "WriteShards" >> beam.ParDo(WriteShard(config.out_dir, shards)))
    (dead_letters | "AllRejected" >> beam.Flatten()
     | "CollectRejected" >> beam.combiners.ToList()
     | "WriteRejected" >> beam.Map(_write_rejected, io.join(config.out_dir, "rejected.jsonl")))


# ---------------------------------------------------------------- the stage

def _remove_previous_outputs(out_dir: str) -> None:
    """Old shards of a rerun into the same directory would otherwise mix with the new ones."""
    stale = io.list_files(out_dir, EMBEDDINGS_PATTERN) + io.list_files(io.join(out_dir, "pca"), PCA_FILE)
    for uri in stale:
        io.remove(uri)


def _fill_empty_shards(out_dir: str, shards: int) -> None:
    """Shards no item hashed to still get a (empty) file, so `-of-N` names a complete set."""
    present = set(io.list_files(out_dir, EMBEDDINGS_PATTERN))
    for shard in range(shards):
        uri = io.join(out_dir, embeddings_name(shard, shards))
        if uri not in present:
            write_embeddings(uri, [], np.zeros((0, 0), np.float32))


def _written_shape(out_dir: str) -> tuple[int, int]:
    """(items, dims) of the written shards, from their Parquet footers and the first row of the
    first non-empty one (ranged reads on GCS), whichever runner wrote them: a task attached to a
    Dataflow job it did not launch has no pipeline result to ask for counters."""
    from visrec.data.schema import open_binary

    items, dims = 0, 0
    for uri in io.list_files(out_dir, EMBEDDINGS_PATTERN):
        with open_binary(uri) as fh:
            shard = pq.ParquetFile(fh)
            rows = shard.metadata.num_rows
            if rows and not dims:
                dims = len(shard.read_row_group(0, columns=["embedding"]).column(0)[0])
        items += rows
    return items, dims


@dataclass(frozen=True)
class EmbedResult:
    """What `run_embed` returns, and `embed_stats.json` records: items embedded, rows rejected
    (`rejected.jsonl`), output dimensions, the PCA's explained variance (None without PCA),
    wall time, throughput, and the settings used (`config.kind` the checkpoint's kind)."""

    items: int
    rejected: int
    dims: int
    pca_explained_variance: float | None
    seconds: float
    items_per_second: float | None
    config: EmbedConfig

    def as_dict(self) -> dict[str, Any]:
        """The `embed_stats.json` content (the settings without the launcher's Beam options)."""
        out = asdict(self)
        del out["config"]["beam_options"]
        return out


def run_embed(config: EmbedConfig) -> EmbedResult:
    """Stage 3: embed every image of `config.data_uri`; returns what it writes to `embed_stats.json`.

    The encoder's kind is the checkpoint's (`encoder_kind`); `UserError` when `config.kind`
    names another.
    """
    start = time.monotonic()
    config = replace(config, kind=encoder_kind(config.model_uri, config.kind))
    pca = PcaProjection.load(config.pca_uri) if config.pca_uri else None
    image_processor = load_image_processor(config.model_uri)
    plan = plan_input(config.data_uri)  # here, not in Beam: a missing input or column fails fast
    io.makedirs(config.out_dir)
    log.info("embedding %s with %s (%s) -> %s on %s", config.data_uri, config.model_uri, config.kind,
             config.out_dir, config.runner)
    p = make_pipeline(config.runner, config.beam_options)
    build_pipeline(p, config, plan, image_processor, pca)
    run_pipeline(p, before_launch=lambda: _remove_previous_outputs(config.out_dir))

    items, dims = _written_shape(config.out_dir)
    _fill_empty_shards(config.out_dir, config.shards)
    pca_uri = io.join(config.out_dir, "pca", PCA_FILE)
    explained = PcaProjection.load(pca_uri).explained_variance if io.exists(pca_uri) else None
    seconds = time.monotonic() - start
    rejected = io.join(config.out_dir, "rejected.jsonl")
    stats = EmbedResult(items=items, rejected=io.count_lines(rejected) if io.exists(rejected) else 0, dims=dims,
                        pca_explained_variance=explained, seconds=round(seconds, 3),
                        items_per_second=round(items / seconds, 3) if seconds > 0 else None, config=config)
    io.write_json(io.join(config.out_dir, "embed_stats.json"), stats.as_dict())
    log.info("embedded %d items (%d rejected) to %d dims in %.1f s (%.1f items/s)", stats.items,
             stats.rejected, dims, seconds, stats.items_per_second or 0.0)
    return stats

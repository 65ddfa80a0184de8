"""Stage 1: listings -> image-title training pairs, as an Apache Beam pipeline.

    read (parallel read tasks) -> validate each row -> drop `reserved` -> de-duplicate item_id
    -> sample at most `max_pairs` -> load, decode, resize+pad, JPEG -> train/val split
    -> sharded Parquet + rejected.jsonl + stats.json

Every decision is a pure function of the data and the seed (order keys from the
input's byte offsets/record numbers, hashes of `item_id`), so DirectRunner
single-process, multi-process and Dataflow produce the same rows. Every input
row ends up counted exactly once in `stats.json` (the "fate" counts below), and
the counts are aggregated by the pipeline itself, not by side-channel metrics
that retried bundles could inflate.

All file access inside transforms goes through `visrec.core.io` (local or `gs://`),
so the same code runs on Dataflow workers and against the GCS emulator.
"""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import asdict, dataclass, fields
from typing import Any, Iterable, Iterator

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq

from visrec.core import io
from visrec.core.hashing import stable_hash
from visrec.core.progress import Progress

from visrec.data import schema
from visrec.stages.dataflow import make_pipeline, run_pipeline
from visrec.core.errors import UserError
from visrec.data.images import ImageDecodeError, decode_image, encode_jpeg, load_image_bytes, resize_and_pad
from visrec.stages.configs import PrepareConfig

log = logging.getLogger(__name__)

OUTPUT_SCHEMA = pa.schema([("item_id", pa.string()), ("title", pa.string()), ("category", pa.string()),
                           ("price", pa.int64()), ("image", pa.binary()), ("split", pa.string())])


@dataclass(frozen=True)
class PrepareResult:
    """What `run_prepare` returns: the counts of `stats.json` (docs/data-contract.md), every input
    row in exactly one of them; `rejected` maps each rejection reason to its count."""

    input_rows: int
    reserved_excluded: int
    rejected: dict[str, int]
    duplicates_dropped: int
    sampled_out: int
    train_pairs: int
    val_pairs: int

    def as_dict(self) -> dict[str, Any]:
        """The `stats.json` content, keys in this order."""
        return asdict(self)


STATS_KEYS = tuple(f.name for f in fields(PrepareResult))
PROGRESS_EVERY_S = 10.0
_PARQUET_ROW_GROUP = 1024
_FATE = "fate"
_REJECTED = "rejected"


# ---------------------------------------------------------------- pure helpers


def sample_key(item_id: str, seed: int) -> tuple[int, str]:
    """Sampling order: the `max_pairs` items with the smallest keys are kept."""
    return stable_hash("sample", seed, item_id), item_id


def split_of(item_id: str, seed: int, val_fraction: float) -> str:
    """`val` for a `val_fraction` share of items, by a hash independent of the sampling hash."""
    return "val" if stable_hash("split", seed, item_id) < val_fraction * 2**64 else "train"


def shard_of(item_id: str, shards: int) -> int:
    return stable_hash("shard", item_id) % shards


def shard_name(index: int, shards: int) -> str:
    return f"data-{index:05d}-of-{shards:05d}.parquet"


def assemble_stats(counts: dict[str, int]) -> dict:
    """`stats.json` from the pipeline's fate counts (`rejected:<reason>` keys grouped under `rejected`)."""
    rejected = {k.split(":", 1)[1]: v for k, v in sorted(counts.items()) if k.startswith("rejected:")}
    stats = {k: int(counts.get(k, 0)) for k in STATS_KEYS if k != "rejected"}
    stats["rejected"] = rejected
    return {k: stats[k] for k in STATS_KEYS}


def accounted_rows(stats: PrepareResult) -> int:
    """Rows accounted for by every fate; equals `input_rows` for a consistent stats.json."""
    return (stats.reserved_excluded + sum(stats.rejected.values()) + stats.duplicates_dropped
            + stats.sampled_out + stats.train_pairs + stats.val_pairs)


def dead_letter(task_uri: str, order: tuple[int, int], row: Any, reason: str, detail: str = "") -> dict:
    """One `rejected.jsonl` record: where the row came from, why it was rejected, and its content."""
    record = {"reason": reason, "source": task_uri, "position": order[1], "row": schema.json_safe(row)}
    if detail:
        record["detail"] = detail
    return record


# ---------------------------------------------------------------- transforms


class ReadAndValidate(beam.DoFn):
    """Read task -> (item_id, (order, clean row)) for every valid non-reserved row.

    Side outputs: `rejected` dead letters (order, record) and `fate` counts.
    """

    def setup(self) -> None:
        self.progress = Progress(log, "prepare: rows read", every_s=PROGRESS_EVERY_S)

    def process(self, task: schema.ReadTask) -> Iterator[Any]:
        for order, raw in schema.read_task(task):
            self.progress.add()
            yield beam.pvalue.TaggedOutput(_FATE, ("input_rows", 1))
            clean, content, reason = schema.parse_record(raw)
            if reason:
                yield beam.pvalue.TaggedOutput(_FATE, (f"rejected:{reason}", 1))
                yield beam.pvalue.TaggedOutput(_REJECTED, (order, dead_letter(task.uri, order, content, reason)))
            elif clean["status"] == schema.RESERVED_STATUS:
                yield beam.pvalue.TaggedOutput(_FATE, ("reserved_excluded", 1))
            else:
                yield clean["item_id"], (order, clean)


class FirstAndCount(beam.CombineFn):
    """Per item_id: the row with the smallest order key, and how many rows had that id."""

    def create_accumulator(self) -> tuple[Any, int]:
        return None, 0

    def add_input(self, acc: tuple[Any, int], element: tuple) -> tuple[Any, int]:
        first, n = acc
        return (element if first is None or element[0] < first[0] else first), n + 1

    def merge_accumulators(self, accumulators: Iterable[tuple[Any, int]]) -> tuple[Any, int]:
        first, total = None, 0
        for acc_first, n in accumulators:
            total += n
            if acc_first is not None and (first is None or acc_first[0] < first[0]):
                first = acc_first
        return first, total

    def extract_output(self, acc: tuple[Any, int]) -> tuple[Any, int]:
        return acc


def _keep_first(element: tuple[str, tuple[Any, int]]) -> Iterator[Any]:
    _, (first, n) = element
    if n > 1:
        yield beam.pvalue.TaggedOutput(_FATE, ("duplicates_dropped", n - 1))
    yield first


def _sample(element: tuple, threshold: tuple[int, str] | None, seed: int) -> Iterator[Any]:
    if threshold is None or sample_key(element[1]["item_id"], seed) <= threshold:
        yield element
    else:
        yield beam.pvalue.TaggedOutput(_FATE, ("sampled_out", 1))


def _sample_key_of(element: tuple, seed: int) -> tuple[int, str]:
    return sample_key(element[1]["item_id"], seed)


def _key_by_shard(row: dict, shards: int) -> tuple[int, dict]:
    return shard_of(row["item_id"], shards), row


def _threshold(smallest: list, max_pairs: int) -> tuple[int, str] | None:
    """The largest kept sample key, or None when there are no more rows than `max_pairs`."""
    return smallest[-1] if len(smallest) >= max_pairs else None


class MakeExample(beam.DoFn):
    """(order, clean row) -> output row with JPEG `image` and `split`; bad images become dead letters."""

    def __init__(self, uris: list[str], base_dirs: list[str], config: PrepareConfig):
        self.uris, self.base_dirs = uris, base_dirs
        self.image_size, self.quality = config.image_size, config.jpeg_quality
        self.seed, self.val_fraction = config.seed, config.val_fraction

    def setup(self) -> None:
        self.progress = Progress(log, "prepare: images processed", every_s=PROGRESS_EVERY_S)

    def process(self, element: tuple[tuple[int, int], dict]) -> Iterator[Any]:
        order, row = element
        self.progress.add()
        try:
            data = load_image_bytes(row["image_uri"], self.base_dirs[order[0]])
            img = decode_image(data)
        except FileNotFoundError as exc:
            yield from self._reject(order, row, "image_missing", str(exc))
            return
        except ImageDecodeError as exc:
            yield from self._reject(order, row, "image_undecodable", exc.reason)
            return
        except (OSError, UserError, ValueError) as exc:  # permissions, bad gs:// URI, ...
            yield from self._reject(order, row, "image_unreadable", f"{type(exc).__name__}: {exc}")
            return
        split = split_of(row["item_id"], self.seed, self.val_fraction)
        yield beam.pvalue.TaggedOutput(_FATE, (f"{split}_pairs", 1))
        yield {"item_id": row["item_id"], "title": row["title"], "category": row["category"],
               "price": row["price"], "image": encode_jpeg(resize_and_pad(img, self.image_size), self.quality),
               "split": split}

    def _reject(self, order: tuple[int, int], row: dict, reason: str, detail: str) -> Iterator[Any]:
        yield beam.pvalue.TaggedOutput(_FATE, (f"rejected:{reason}", 1))
        yield beam.pvalue.TaggedOutput(_REJECTED, (order, dead_letter(self.uris[order[0]], order, row, reason,
                                                                      detail)))


def write_shard(element: tuple[int, Iterable[dict | None]], out_dir: str, shards: int) -> str:
    """Write one Parquet shard (rows sorted by item_id, so output bytes do not depend on the runner)."""
    index, rows = element
    rows = sorted((r for r in rows if r is not None), key=lambda r: r["item_id"])
    table = pa.Table.from_pylist(rows, schema=OUTPUT_SCHEMA)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, row_group_size=_PARQUET_ROW_GROUP)
    uri = io.join(out_dir, shard_name(index, shards))
    io.write_bytes(uri, sink.getvalue().to_pybytes())
    return uri


def write_rejected(records: list[tuple[tuple[int, int], dict]], out_dir: str) -> str:
    """All dead letters, in input order, as one JSON Lines file."""
    uri = io.join(out_dir, "rejected.jsonl")
    io.write_text(uri, "".join(json.dumps(r, ensure_ascii=False) + "\n" for _, r in sorted(records,
                                                                                         key=lambda x: x[0])))
    return uri


def write_stats(counts: dict[str, int], out_dir: str) -> str:
    uri = io.join(out_dir, "stats.json")
    io.write_json(uri, assemble_stats(counts))
    return uri


def build_pipeline(pipeline: beam.Pipeline, config: PrepareConfig, tasks: list[schema.ReadTask]) -> None:
    """Add the preparation transforms for `tasks` (from `schema.plan_reads`) to `pipeline`."""
    n_files = max((t.file_index for t in tasks), default=-1) + 1
    uris, base_dirs = [""] * n_files, [""] * n_files
    for t in tasks:
        uris[t.file_index], base_dirs[t.file_index] = t.uri, t.base_dir

    read = (pipeline
            | "ReadTasks" >> beam.Create(tasks)
            | "SpreadTasks" >> beam.Reshuffle()
            | "ReadAndValidate" >> beam.ParDo(ReadAndValidate()).with_outputs(_FATE, _REJECTED, main="rows"))
    unique = (read.rows
              | "FirstPerItem" >> beam.CombinePerKey(FirstAndCount())
              | "KeepFirst" >> beam.FlatMap(_keep_first).with_outputs(_FATE, main="rows"))
    fates = [read[_FATE], unique[_FATE]]
    rows = unique.rows
    if config.max_pairs is not None:
        threshold = (rows
                     | "SampleKeys" >> beam.Map(_sample_key_of, config.seed)
                     | "Smallest" >> beam.combiners.Top.Smallest(config.max_pairs)
                     | "Threshold" >> beam.Map(_threshold, config.max_pairs))
        sampled = rows | "Sample" >> beam.FlatMap(
            _sample, beam.pvalue.AsSingleton(threshold), config.seed).with_outputs(_FATE, main="rows")
        fates.append(sampled[_FATE])
        rows = sampled.rows
    examples = (rows
                | "SpreadImages" >> beam.Reshuffle()
                | "MakeExamples" >> beam.ParDo(MakeExample(uris, base_dirs, config)).with_outputs(
                    _FATE, _REJECTED, main="rows"))
    fates.append(examples[_FATE])

    empty_shards = pipeline | "ShardIds" >> beam.Create([(i, None) for i in range(config.shards)])
    keyed = examples.rows | "KeyByShard" >> beam.Map(_key_by_shard, config.shards)
    _ = ((keyed, empty_shards)
         | "AllShards" >> beam.Flatten()
         | "GroupShards" >> beam.GroupByKey()
         | "WriteShards" >> beam.Map(write_shard, config.out_dir, config.shards))
    _ = ((read[_REJECTED], examples[_REJECTED])
         | "AllRejected" >> beam.Flatten()
         | "CollectRejected" >> beam.combiners.ToList()
         | "WriteRejected" >> beam.Map(write_rejected, config.out_dir))
    _ = (fates
         | "AllFates" >> beam.Flatten()
         | "CountFates" >> beam.CombinePerKey(sum)
         | "CollectCounts" >> beam.combiners.ToDict()
         | "WriteStats" >> beam.Map(write_stats, config.out_dir))


def _remove_old_outputs(out_dir: str) -> None:
    """Delete shards/stats of an earlier run, so a different shard count never mixes two runs."""
    names = re.compile(r"data-\d+-of-\d+\.parquet|stats\.json|rejected\.jsonl")
    stale = [f for f in io.list_files(out_dir) if names.fullmatch(f.rsplit("/", 1)[-1])
             and io.parent(f).rstrip("/") == out_dir.rstrip("/")]
    for f in stale:
        io.remove(f)


def run_prepare(config: PrepareConfig) -> PrepareResult:
    """Run the preparation pipeline; return the counts it also writes to `out_dir/stats.json`.

    `UserError` for an unreadable listings input or a missing required column (`PrepareConfig`
    itself refuses unusable settings); bad rows and images never stop the run.
    """
    # Beam logs every string annotation (from `from __future__ import annotations`) at INFO.
    logging.getLogger("apache_beam.typehints.native_type_compatibility").setLevel(logging.WARNING)
    tasks = schema.plan_reads(config.listings_uri)
    io.makedirs(config.out_dir)
    log.info("prepare: %s -> %s (%d read task(s), runner %s %s)", config.listings_uri, config.out_dir,
             len(tasks), config.runner, " ".join(config.beam_options))
    started = time.monotonic()
    pipeline = make_pipeline(config.runner, config.beam_options)
    build_pipeline(pipeline, config, tasks)
    run_pipeline(pipeline, before_launch=lambda: _remove_old_outputs(config.out_dir))
    seconds = time.monotonic() - started
    stats = PrepareResult(**io.read_json(io.join(config.out_dir, "stats.json")))
    log.info("prepare: %d input rows in %.1f s (%.0f rows/s): %d train, %d val, %d reserved, %d duplicates, "
             "%d sampled out, rejected %s", stats.input_rows, seconds, stats.input_rows / max(seconds, 1e-9),
             stats.train_pairs, stats.val_pairs, stats.reserved_excluded, stats.duplicates_dropped,
             stats.sampled_out, stats.rejected or "none")
    if accounted_rows(stats) != stats.input_rows:
        raise RuntimeError(f"prepare stats do not add up: {stats}")
    return stats

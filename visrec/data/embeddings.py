"""Stage-3 embedding files: Parquet with `item_id` (string) and `embedding` (list<float32>).

Kept apart from `visrec.stages.embed` (which imports Beam) because every later stage —
index, evaluation, release, serving — reads these files and should not pay for Beam.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from visrec.core import io
from visrec.core.errors import UserError

EMBEDDINGS_PATTERN = "embeddings-*.parquet"
EMBEDDINGS_SCHEMA = pa.schema([("item_id", pa.string()), ("embedding", pa.list_(pa.float32()))])
ROWS_PER_GROUP = 8192


def embeddings_name(shard: int, shards: int) -> str:
    return f"embeddings-{shard:05d}-of-{shards:05d}.parquet"


def write_embeddings(uri: str, ids: Sequence[str], vectors: np.ndarray) -> None:
    """One embeddings Parquet file (`item_id` string, `embedding` list<float32>) at `uri`, local or `gs://`."""
    vectors = np.asarray(vectors, dtype=np.float32)
    if len(ids) != len(vectors):
        raise ValueError(f"{len(ids)} ids for {len(vectors)} vectors")
    with tempfile.TemporaryDirectory(prefix="visrec-emb-") as tmp:
        local = Path(tmp, "embeddings.parquet")
        with pq.ParquetWriter(local, EMBEDDINGS_SCHEMA) as writer:
            for begin in range(0, len(ids), ROWS_PER_GROUP):
                end = begin + ROWS_PER_GROUP
                writer.write_table(embeddings_table(ids[begin:end], vectors[begin:end]))
        io.write_bytes(uri, local.read_bytes())


def embeddings_table(ids: Sequence[str], vectors: np.ndarray) -> pa.Table:
    """A table for one row group (list offsets are int32: keep row groups well under 2**31 floats)."""
    dims = vectors.shape[1] if vectors.ndim == 2 else 0
    offsets = pa.array(np.arange(len(ids) + 1, dtype=np.int32) * dims, pa.int32())
    values = pa.array(np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1), pa.float32())
    return pa.table({"item_id": pa.array(list(ids), pa.string()),
                     "embedding": pa.ListArray.from_arrays(offsets, values)}, schema=EMBEDDINGS_SCHEMA)


def read_embeddings(uri: str) -> tuple[list[str], np.ndarray]:
    """Stage-3 output (a dir of `embeddings-*.parquet`, or one file) -> (ids, float32 (n, d) vectors)."""
    files = [uri] if str(uri).endswith(".parquet") else io.list_files(uri, EMBEDDINGS_PATTERN)
    if not files:
        raise UserError(f"no {EMBEDDINGS_PATTERN} under {uri}")
    ids: list[str] = []
    parts: list[np.ndarray] = []
    for f in files:
        local = io.local_file(f, suffix=".parquet")
        try:
            table = pq.read_table(local, columns=["item_id", "embedding"])
        except (pa.ArrowInvalid, KeyError, OSError) as exc:
            raise UserError(f"unreadable embeddings file {f}: {exc}") from None
        finally:
            if io.is_gcs(f):
                local.unlink(missing_ok=True)
        emb = table.column("embedding").combine_chunks()
        if len(emb) == 0:
            continue
        if emb.null_count or table.column("item_id").null_count:
            raise UserError(f"{f}: null item_id or embedding")
        lengths = emb.value_lengths().to_numpy(zero_copy_only=False)
        if (lengths != lengths[0]).any():
            raise UserError(f"{f}: embeddings of different lengths")
        parts.append(emb.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(len(emb), -1))
        ids.extend(table.column("item_id").to_pylist())
    if parts and len({p.shape[1] for p in parts}) > 1:
        raise UserError(f"{uri}: shards with different embedding sizes")
    vectors = np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)
    return ids, vectors

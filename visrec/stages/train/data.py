"""Training data for SigLIP fine-tuning: prepared Parquet -> batches of (pixel_values, input_ids).

Reproducibility and resumption come from making every random choice a pure
function of (seed, epoch, position): the epoch's order is a seeded permutation and
each sample's augmentation is seeded by (seed, epoch, index). A run resumed at
step `s` of epoch `e` therefore sees exactly the batches an uninterrupted run sees,
whatever the number of processes or loader workers.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from PIL import Image

from visrec.core import io
from visrec.core.errors import UserError
from visrec.data.images import decode_image
from visrec.model.encoders import TEXT_MAX_LENGTH
from visrec.data.schema import PREPARED_SHARDS

log = logging.getLogger(__name__)

COLUMNS = ("item_id", "title", "image", "split")


def read_prepared(data_uri: str) -> tuple[pa.Table, pa.Table]:
    """The (train, val) image-title pairs of a prepared dataset directory (local or `gs://`).

    Only `item_id`, `title` and `image` are kept. The JPEG bytes stay in Arrow
    buffers, which forked loader workers share copy-on-write instead of copying.
    """
    shards = io.list_files(data_uri, pattern=PREPARED_SHARDS)
    if not shards:
        raise UserError(f"no {PREPARED_SHARDS} shards under {data_uri}")
    tables = []
    for shard in shards:
        try:
            source = shard if not io.is_gcs(shard) else pa.BufferReader(io.read_bytes(shard))
            table = pq.read_table(source)
        except (OSError, pa.ArrowInvalid) as exc:
            raise UserError(f"cannot read prepared shard {shard}: {exc}") from exc
        missing = [c for c in COLUMNS if c not in table.column_names]
        if missing:
            raise UserError(f"{shard} lacks column(s) {missing}; expected the `visrec prepare` output")
        tables.append(table.select(list(COLUMNS)))
    table = pa.concat_tables(tables).combine_chunks()
    split = table.column("split")
    train = table.filter(pc.equal(split, "train")).drop_columns(["split"])
    val = table.filter(pc.equal(split, "val")).drop_columns(["split"])
    log.info("read %d train and %d val pairs from %d shard(s) of %s", len(train), len(val), len(shards), data_uri)
    return train, val


@dataclass(frozen=True)
class Augment:
    """Appearance-preserving augmentation: a mild random-resized crop and a horizontal flip.

    Colour, pattern and shape are what make a product look like another, so no
    colour jitter and no aggressive crops.
    """

    min_crop_area: float = 0.8
    aspect_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: bool = True

    def __call__(self, img: Image.Image, rng: random.Random) -> Image.Image:
        w, h = img.size
        for _ in range(10):
            area = w * h * rng.uniform(self.min_crop_area, 1.0)
            ratio = rng.uniform(*self.aspect_ratio)
            cw, ch = round((area * ratio) ** 0.5), round((area / ratio) ** 0.5)
            if 0 < cw <= w and 0 < ch <= h:
                x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
                img = img.crop((x, y, x + cw, y + ch))
                break
        if self.hflip and rng.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return img


class PairDataset(torch.utils.data.Dataset):
    """Indexed by `(epoch, row)` so a sample's augmentation depends only on seed, epoch and row."""

    def __init__(self, table: pa.Table, augment: Augment | None = None, seed: int = 0):
        self.titles: list[str] = table.column("title").to_pylist()
        self.images = table.column("image")
        self.augment = augment
        self.seed = seed

    def __len__(self) -> int:
        return len(self.titles)

    def __getitem__(self, key: tuple[int, int]) -> tuple[Image.Image, str]:
        epoch, row = key
        img = decode_image(self.images[row].as_py())
        if self.augment is not None:
            img = self.augment(img, random.Random(f"{self.seed}/{epoch}/{row}"))
        return img, self.titles[row]


class Collate:
    """Samples -> (pixels, input_ids) with the model's own image processor and tokenizer.

    Using the checkpoint's processor keeps training inputs identical to what the
    embedding and serving stages feed the image encoder. The processor only resizes
    here: pixels leave the loader as uint8 (4x less to pass between processes than
    float32) and `normalise` finishes its rescale and normalisation on the training
    device. Titles are padded to `max_length` (64), as SigLIP was trained: its text
    tower pools the last position. `as_numpy` returns NumPy arrays, which loader workers
    send through their pipes instead of shared memory (for a too small /dev/shm).
    """

    def __init__(self, processor: Any, max_length: int = TEXT_MAX_LENGTH, as_numpy: bool = False):
        self.image_processor = processor.image_processor
        self.tokenizer = processor.tokenizer
        self.max_length = max_length
        self.as_numpy = as_numpy
        ip = self.image_processor
        self._scale = float(ip.rescale_factor) if ip.do_rescale else 1.0
        self._mean = tuple(ip.image_mean) if ip.do_normalize else (0.0, 0.0, 0.0)
        self._std = tuple(ip.image_std) if ip.do_normalize else (1.0, 1.0, 1.0)

    def __call__(self, samples: list[tuple[Image.Image, str]]) -> tuple[Any, Any]:
        images, titles = zip(*samples)
        kind = "np" if self.as_numpy else "pt"
        pixels = self.image_processor(images=list(images), do_rescale=False, do_normalize=False,
                                      return_tensors=kind)["pixel_values"]
        input_ids = self.tokenizer(list(titles), padding="max_length", max_length=self.max_length,
                                   truncation=True, return_tensors=kind)["input_ids"]
        return (pixels.astype("uint8", copy=False) if self.as_numpy else pixels.to(torch.uint8)), input_ids

    def normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 pixels (n, 3, H, W), on any device -> exactly the processor's float32 `pixel_values`.

        The same arithmetic as transformers' NumPy processor: the rescale is a float64
        product rounded to float32, then (x - mean) / std in float32. Bit for bit, so a run
        trains exactly as it did with the processor's own float batches.
        """
        mean = torch.tensor(self._mean, dtype=torch.float32, device=pixels.device).view(1, -1, 1, 1)
        std = torch.tensor(self._std, dtype=torch.float32, device=pixels.device).view(1, -1, 1, 1)
        return ((pixels.double() * self._scale).float() - mean) / std

    def batch_bytes(self, pairs: int) -> int:
        """Bytes of one batch of `pairs` as the loader hands it over (uint8 pixels, int64 ids)."""
        size = self.image_processor.size
        return pairs * (3 * size["height"] * size["width"] + 8 * self.max_length)


class EpochBatchSampler(torch.utils.data.Sampler):
    """This process's micro-batches of one epoch, from optimizer step `start_step` on.

    The epoch order is a permutation seeded by (seed, epoch). Optimizer step `s` uses
    rows `perm[s*B:(s+1)*B]` (B = global batch), cut into `grad_accum` contrastive
    groups of B/grad_accum rows; each process takes its equal slice of a group. The
    groups, hence the negatives every image sees, do not depend on the process count.
    The incomplete tail of an epoch is dropped (contrastive batches stay full).
    """

    def __init__(self, rows: int, batch_size: int, grad_accum: int, rank: int, world_size: int,
                 seed: int, epoch: int, start_step: int = 0):
        self.rows, self.batch_size, self.grad_accum = rows, batch_size, grad_accum
        self.rank, self.world_size = rank, world_size
        self.seed, self.epoch, self.start_step = seed, epoch, start_step
        self.group = batch_size // grad_accum
        self.micro = self.group // world_size

    @property
    def steps(self) -> int:
        return self.rows // self.batch_size

    def __len__(self) -> int:
        return (self.steps - self.start_step) * self.grad_accum

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        perm = torch.randperm(self.rows, generator=gen).tolist()
        for step in range(self.start_step, self.steps):
            for a in range(self.grad_accum):
                start = step * self.batch_size + a * self.group + self.rank * self.micro
                yield [(self.epoch, row) for row in perm[start:start + self.micro]]


class RunBatchSampler(torch.utils.data.Sampler):
    """The micro-batches of a whole run, from (`first_epoch`, `start_step`) to the last epoch.

    One sampler for the run lets one DataLoader, and its workers, live across epochs:
    no worker restart and no empty prefetch queue at each epoch boundary.
    """

    def __init__(self, rows: int, batch_size: int, grad_accum: int, rank: int, world_size: int,
                 seed: int, first_epoch: int, start_step: int, epochs: int):
        self.epochs = [EpochBatchSampler(rows, batch_size, grad_accum, rank, world_size, seed, epoch,
                                         start_step if epoch == first_epoch else 0)
                       for epoch in range(first_epoch, epochs)]

    def __len__(self) -> int:
        return sum(len(e) for e in self.epochs)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for epoch in self.epochs:
            yield from epoch

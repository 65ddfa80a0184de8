"""The index's float32 item vectors: what `SimilarityIndex.vector` answers (the serving query).

ScaNN keeps its own copy for re-ordering, in `reorder_dtype`, and cannot hand it back, so
look-ups need one more. Held in memory it cost 4d bytes an item (512 at d=128), as much as
everything else together. A loaded index therefore reads a vector from `vectors.npy` when
it is asked for (one `pread` of 4d bytes, about a microsecond from the page cache): the
process holds none of the file, the page cache shares it between `--workers` processes and
drops it under memory pressure. (A memory map would do the same, but every page fault maps
the 64 KiB around it into the process, so each look-up grew the resident set by ~100 KB
until all of the file was counted.) Vectors written since the index was loaded (upserts)
go to anonymous rows beside the file, whose slots are reused after deletes, so the file is
never written while an index reads it. A freshly built index keeps its vectors in memory.
"""

from __future__ import annotations

import mmap
import os
import weakref
from pathlib import Path
from typing import BinaryIO

import numpy as np


class VectorStore:
    """Float32 vectors by slot: slots below `base_rows` are the base (an in-memory array, or a
    `.npy` file read on demand), slots above are rows written since, in anonymous memory."""

    def __init__(self, array: np.ndarray | None = None, file: BinaryIO | None = None,
                 offset: int = 0, shape: tuple[int, int] = (0, 0)) -> None:
        # Use `in_memory` or `from_file`.
        self._array = array
        self._file = file
        if file is not None:
            weakref.finalize(self, file.close)  # closed with the store, quietly
        self._offset = offset
        self.base_rows, dims = array.shape if array is not None else shape
        self._row_bytes = 4 * dims
        self._written = np.empty((0, dims), dtype=np.float32)
        self._used = 0  # rows of `_written` ever handed out
        self._free: list[int] = []  # of those, rows released again

    @classmethod
    def in_memory(cls, vectors: np.ndarray) -> VectorStore:
        if vectors.ndim != 2 or vectors.dtype != np.float32:
            raise ValueError(f"expected float32 (n, d) vectors, got {vectors.dtype} {vectors.shape}")
        return cls(array=vectors)

    @classmethod
    def from_file(cls, path: Path) -> VectorStore:
        """A store over a float32 (n, d) `.npy` file, kept open (it may be unlinked meanwhile).

        `ValueError` if the file does not hold such an array.
        """
        file = open(path, "rb", buffering=0)  # noqa: SIM115 - owned by the store for its lifetime
        try:
            version = np.lib.format.read_magic(file)
            read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                           (2, 0): np.lib.format.read_array_header_2_0}.get(version)
            if read_header is None:
                raise ValueError(f"{path.name}: .npy format version {version} is not supported")
            shape, fortran, dtype = read_header(file)
            size = os.fstat(file.fileno()).st_size
            if dtype != np.float32 or fortran or len(shape) != 2 or size != file.tell() + 4 * shape[0] * shape[1]:
                raise ValueError(f"{path.name} holds {dtype} {shape}, not float32 (n, d) vectors")
            return cls(file=file, offset=file.tell(), shape=(int(shape[0]), int(shape[1])))
        except BaseException:
            file.close()
            raise

    @property
    def dims(self) -> int:
        return int(self._written.shape[1])

    def get(self, slot: int) -> np.ndarray:
        """A copy of the vector in `slot`."""
        if slot >= self.base_rows:
            return self._written[slot - self.base_rows].copy()
        if self._array is not None:
            return self._array[slot].copy()
        data = os.pread(self._file.fileno(), self._row_bytes, self._offset + slot * self._row_bytes)
        if len(data) != self._row_bytes:  # the file was cut short under a live index
            raise OSError(f"vectors file ends before row {slot}")
        return np.frombuffer(data, dtype=np.float32).copy()

    def gather(self, slots: np.ndarray) -> np.ndarray:
        """The vectors in `slots`, as one new (len(slots), d) array."""
        slots = np.asarray(slots, dtype=np.int64)
        out = np.empty((len(slots), self.dims), dtype=np.float32)
        in_base = slots < self.base_rows
        out[~in_base] = self._written[slots[~in_base] - self.base_rows]
        if self._array is not None:
            out[in_base] = self._array[slots[in_base]]
        elif in_base.any():
            # Bulk reads (saving, tuning) map the file for the duration only.
            with mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
                rows = np.frombuffer(mapped, dtype=np.float32, count=self.base_rows * self.dims,
                                     offset=self._offset).reshape(self.base_rows, self.dims)
                out[in_base] = rows[slots[in_base]]
                del rows
        return out

    def base_view(self, count: int) -> np.ndarray | None:
        """The first `count` base vectors without copying, if they are in memory (else None)."""
        return None if self._array is None else self._array[:count]

    def put(self, slot: int, vector: np.ndarray) -> int:
        """Store `vector`, overwriting `slot` if it is a written row, else in a fresh one; returns its slot.

        `slot` < 0: no slot yet. A base row is never written (another index may read the file).
        """
        if slot < self.base_rows:
            if self._free:
                row = self._free.pop()
            else:
                row = self._used
                self._used += 1
                if row >= len(self._written):
                    grown = np.empty((max(16, 2 * len(self._written)), self.dims), dtype=np.float32)
                    grown[: len(self._written)] = self._written
                    self._written = grown
            slot = self.base_rows + row
        self._written[slot - self.base_rows] = vector
        return slot

    def release(self, slot: int) -> None:
        """`slot` is no longer used (its item was deleted); a written row is reused later."""
        if slot >= self.base_rows:
            self._free.append(slot - self.base_rows)

    def memory_bytes(self) -> dict[str, int]:
        """Bytes held in memory, and bytes left on disk to be read on demand."""
        on_disk = 0 if self._array is not None else self.base_rows * self._row_bytes
        in_memory = (0 if self._array is None else int(self._array.nbytes)) + int(self._written.nbytes)
        return {"in_memory": in_memory, "on_disk": on_disk}

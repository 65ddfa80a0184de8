"""Item ids <-> dense integer keys, without a Python object per id.

Ten million ids as a Python list plus a dict cost about 150 bytes an id (the str objects,
the list slots, the dict entries, the boxed ints) and seconds of start-up to create. An
`IdMap` keeps the ids it was built from as one sorted numpy array of fixed-width UTF-8
bytes (an id costs its bytes padded to the longest one) and finds an id by binary search
(about 2 us). Keys are stable and append-only: the ids the map was built from get keys
0..n-1 in sorted order; an id added later (a write since the last build) gets the next key
and lives in a small dict beside the array. The index (positions of its ScaNN datapoints)
and the serving catalog (its rows) both key their per-item numpy columns by it.

Ids the map is built from must not contain NUL (numpy's bytes type pads with it); ids added
later may (they are kept as str), but cannot be written out with `encode`.
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence, overload

import numpy as np

# Ids decoded per numpy call when iterating (bounds the temporary list).
_CHUNK = 65536


def encode_ids(ids: Sequence[str] | np.ndarray) -> np.ndarray:
    """Ids as a numpy array of fixed-width UTF-8 bytes (`S<longest>`); `ValueError` for a NUL in an id.

    A bytes array (`dtype.kind == "S"`) is returned as it is.
    """
    if isinstance(ids, np.ndarray) and ids.dtype.kind == "S":
        return ids
    if isinstance(ids, IdSequence):
        return ids.encoded()
    encoded = [str(i).encode() for i in ids]
    if any(b"\x00" in e for e in encoded):
        raise ValueError("item ids must not contain NUL characters")
    return np.array(encoded, dtype=bytes) if encoded else np.zeros(0, dtype="S1")


class IdMap:
    """Stable integer keys for item ids: a sorted bytes array for the ids it was built from, a
    dict for ids added since. Build with `IdMap.from_ids`."""

    def __init__(self, sorted_ids: np.ndarray) -> None:
        self._sorted = sorted_ids
        self._added: list[str] = []
        self._added_key: dict[str, int] = {}

    @classmethod
    def from_ids(cls, ids: Sequence[str] | np.ndarray) -> tuple[IdMap, np.ndarray]:
        """A map over `ids` and `order`, where `order[key]` is the input row that got `key`.

        `ValueError` for duplicate ids or a NUL in an id.
        """
        encoded = encode_ids(ids)
        order = np.argsort(encoded)
        sorted_ids = encoded[order]
        if len(sorted_ids) > 1:
            same = np.flatnonzero(sorted_ids[1:] == sorted_ids[:-1])
            if len(same):
                raise ValueError(f"duplicate item id {sorted_ids[same[0]].decode()!r}")
        return cls(sorted_ids), order

    # ---- look-ups ---------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._sorted) + len(self._added)

    @property
    def base_size(self) -> int:
        """Keys below this are the ids the map was built from."""
        return len(self._sorted)

    def key(self, item_id: str) -> int:
        """The key of `item_id`, or -1 if the map does not know it."""
        key = self._added_key.get(item_id)
        if key is not None:
            return key
        if "\x00" in item_id:
            return -1
        encoded = item_id.encode()
        if len(encoded) > self._sorted.itemsize or not len(self._sorted):
            return -1
        slot = int(np.searchsorted(self._sorted, encoded))
        return slot if slot < len(self._sorted) and self._sorted[slot] == encoded else -1

    def keys(self, ids: Sequence[str] | np.ndarray) -> np.ndarray:
        """Keys of many ids at once (int64, -1 for unknown ones), vectorised over the sorted array."""
        if isinstance(ids, IdSequence) and ids.idmap is self:
            return ids.keys.astype(np.int64)
        if not isinstance(ids, (np.ndarray, IdSequence)):
            ids = list(ids)
            odd = [n for n, i in enumerate(ids) if "\x00" in i]
            out = self.keys(encode_ids(["" if "\x00" in i else i for i in ids]) if odd else encode_ids(ids))
            for n in odd:
                out[n] = self._added_key.get(ids[n], -1)
            return out
        encoded = encode_ids(ids)
        out = np.full(len(encoded), -1, dtype=np.int64)
        if len(self._sorted) and len(encoded):
            width = self._sorted.itemsize
            rows = np.arange(len(encoded))
            if encoded.itemsize > width:  # longer ids cannot be in the array
                rows = np.flatnonzero(np.char.str_len(encoded) <= width)
            wanted = encoded[rows].astype(self._sorted.dtype)
            slots = np.searchsorted(self._sorted, wanted)
            found = self._sorted[np.minimum(slots, len(self._sorted) - 1)] == wanted
            out[rows[found]] = slots[found]
        if self._added_key:
            for n in np.flatnonzero(out < 0).tolist():
                out[n] = self._added_key.get(encoded[n].decode(), -1)
        return out

    def id(self, key: int) -> str:
        """The id of `key` (`IndexError` for a key the map never gave)."""
        if key < 0:
            raise IndexError(key)
        base = len(self._sorted)
        return self._sorted[key].decode() if key < base else self._added[key - base]

    def decode(self, keys: np.ndarray) -> list[str]:
        """The ids of `keys`, as str."""
        keys = np.asarray(keys, dtype=np.int64)
        base = len(self._sorted)
        if not self._added or (len(keys) and keys.max() < base):
            return [b.decode() for b in self._sorted[keys].tolist()]
        return [self.id(k) for k in keys.tolist()]

    def encode(self, keys: np.ndarray) -> np.ndarray:
        """The ids of `keys` as fixed-width bytes (what the index writes to disk).

        `ValueError` if one of them was added with a NUL character (bytes cannot hold it).
        """
        keys = np.asarray(keys, dtype=np.int64)
        base = len(self._sorted)
        added = keys >= base
        if not added.any():
            return self._sorted[keys]
        extra = encode_ids([self._added[k - base] for k in keys[added].tolist()])
        out = np.zeros(len(keys), dtype=f"S{max(self._sorted.itemsize, extra.itemsize)}")
        out[~added] = self._sorted[keys[~added]]
        out[added] = extra
        return out

    def sequence(self, keys: np.ndarray) -> IdSequence:
        """The ids of `keys` as a lazily decoded sequence."""
        return IdSequence(self, np.asarray(keys))

    # ---- writes -----------------------------------------------------------------------

    def add(self, item_id: str) -> int:
        """The key of `item_id`, giving it the next key if it is new."""
        key = self.key(item_id)
        if key < 0:
            key = len(self)
            self._added.append(item_id)
            self._added_key[item_id] = key
        return key

    @property
    def nbytes(self) -> int:
        """Memory held, roughly: the array, plus ~100 bytes per added id (str, list slot, dict entry)."""
        return int(self._sorted.nbytes) + 100 * len(self._added)


class IdSequence(Sequence[str]):
    """The ids of some keys of an `IdMap`, in order, decoded only when read (no str per id held)."""

    def __init__(self, idmap: IdMap, keys: np.ndarray) -> None:
        self.idmap = idmap
        self.keys = keys

    def __len__(self) -> int:
        return len(self.keys)

    @overload
    def __getitem__(self, index: int) -> str: ...

    @overload
    def __getitem__(self, index: slice) -> list[str]: ...

    def __getitem__(self, index: int | slice) -> str | list[str]:
        if isinstance(index, slice):
            return self.idmap.decode(self.keys[index])
        return self.idmap.id(int(self.keys[index]))

    def __iter__(self) -> Iterator[str]:
        for start in range(0, len(self.keys), _CHUNK):
            yield from self.idmap.decode(self.keys[start:start + _CHUNK])

    def encoded(self) -> np.ndarray:
        """The ids as fixed-width bytes."""
        return self.idmap.encode(self.keys)


def encode_arrow_ids(column: Any) -> np.ndarray:
    """An Arrow string column (`pyarrow.Array` or `ChunkedArray`) as fixed-width UTF-8 bytes,
    straight from its buffers: no Python string per id.

    `ValueError` for a null id or a NUL in one.
    """
    import pyarrow as pa

    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if array.null_count:
        raise ValueError(f"{array.null_count} null item ids")
    array = array.cast(pa.large_binary())
    n = len(array)
    if not n:
        return np.zeros(0, dtype="S1")
    _, offsets_buffer, data_buffer = array.buffers()
    offsets = np.frombuffer(offsets_buffer, dtype=np.int64)[array.offset:array.offset + n + 1]
    data = np.frombuffer(data_buffer, dtype=np.uint8) if data_buffer is not None else np.zeros(0, np.uint8)
    data = data[offsets[0]:offsets[-1]]
    offsets = offsets - offsets[0]
    if (data == 0).any():
        raise ValueError("item ids must not contain NUL characters")
    lengths = np.diff(offsets)
    width = max(1, int(lengths.max()))
    if (lengths == width).all():  # ids of one length (the usual case): the bytes already are the array
        return data.copy().view(f"S{width}")
    out = np.zeros((n, width), dtype=np.uint8)
    for byte in range(width):  # one vectorised pass per byte position
        rows = np.flatnonzero(lengths > byte)
        out[rows, byte] = data[offsets[rows] + byte]
    return out.view(f"S{width}").ravel()

"""What serving writes mean when several processes and replicas take them: per-field newest-wins.

Every write is a journal entry with its write time `at`. An upsert names the metadata
fields its request set (`sent`); a delete removes the item. Readers see entries in any
order (other worker processes, other replicas, late GCS listings), so the state of an
item is decided per field, not per entry:

- each metadata field (`category`, `price`, `status`) takes the value of the newest
  entry that sent it (a null sent is no value, and ignored): `PUT {"status": "sold"}` on
  one worker and `PUT {"price": 900}` on another a moment later leave the item sold at 900
  everywhere, in whichever order the two entries arrive;
- the vector is the newest entry's that carried one (an image upsert);
- existence is the newest of "embedded" (an image upsert) and "deleted": a metadata-only
  update never brings a deleted item back, an image upsert after a delete re-lists it;
- a field no entry has set keeps the value the item had in the release's catalog, also
  through a delete and a re-listing (`keep_base`), so the outcome never depends on how
  the entries were batched: one replay at start-up, many polls, or a snapshot and its tail.

`WriteRegisters` holds those registers; `visrec.online.replay.sync_journal` applies entries
through it and materialises the touched items into the catalog and the index. A state
started from a snapshot (`visrec.online.snapshot`) holds most of them as `RegisterColumns`,
numpy columns read per item when the item is first touched, so starting costs no Python
object per item written since the release was built.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from visrec.online.entry import DELETE, METADATA_FIELDS, JournalEntry
from visrec.stages.index.idmap import IdMap

_NEVER = float("-inf")
_STRING_FIELDS = ("category", "status")  # stored as codes into a vocabulary; price as a float

# (field name -> (time, value)), vector time or None, (time, alive) or None: one item's registers.
ItemRegisters = tuple[dict[str, tuple[float, Any]], float | None, tuple[float, bool] | None]


@dataclass
class Change:
    """What one entry changed: the item, and a newer vector if it brought one."""

    item_id: str
    vector: tuple[float, ...] | None = None


@dataclass
class RegisterColumns:
    """The registers of many items as columns (what a snapshot stores): per metadata field its
    time (NaN: never set) and value (strings as codes into a vocabulary, -1 for none; prices
    as floats), the vector time and existence (NaN: never)."""

    ids: IdMap
    columns: dict[str, np.ndarray]

    @classmethod
    def of(cls, items: list[str], registers: list[ItemRegisters]) -> RegisterColumns:
        """Columns of `registers[n]`, the registers of `items[n]`."""
        n = len(items)
        columns: dict[str, np.ndarray] = {}
        for name in METADATA_FIELDS:
            at = np.full(n, np.nan)
            values: list[Any] = [None] * n
            for row, (fields, _, _) in enumerate(registers):
                if name in fields:
                    at[row], values[row] = fields[name]
            columns[f"{name}_at"] = at
            if name in _STRING_FIELDS:
                vocabulary = sorted({v for v in values if v is not None})
                code = {v: c for c, v in enumerate(vocabulary)}
                columns[f"{name}_vocabulary"] = (np.array(vocabulary, dtype=np.str_) if vocabulary
                                                 else np.zeros(0, dtype="<U1"))
                columns[f"{name}_codes"] = np.array([-1 if v is None else code[v] for v in values], dtype=np.int32)
            else:
                columns[f"{name}_values"] = np.array([np.nan if v is None else v for v in values], dtype=np.float64)
        columns["vector_at"] = np.array([np.nan if v is None else v for _, v, _ in registers], dtype=np.float64)
        columns["existence_at"] = np.array([np.nan if e is None else e[0] for _, _, e in registers], dtype=np.float64)
        columns["existence_alive"] = np.array([e is not None and e[1] for _, _, e in registers], dtype=bool)
        return cls.from_arrays({"ids": np.array(items, dtype=np.str_) if items else np.zeros(0, "<U1"), **columns})

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> RegisterColumns:
        """Columns from `to_arrays`' arrays (rows in any order of `arrays["ids"]`)."""
        ids, order = IdMap.from_ids(arrays["ids"])
        return cls(ids, {name: column if name.endswith("_vocabulary") else column[order]
                         for name, column in arrays.items() if name != "ids"})

    def merged(self, keep: np.ndarray, other: RegisterColumns) -> RegisterColumns:
        """The rows `keep` of these columns and all of `other` (items of neither in both)."""
        arrays = {"ids": np.concatenate([self.ids.encode(keep), other.ids.encode(np.arange(len(other)))])
                  .astype(np.bytes_)}
        for name, column in self.columns.items():
            if name.endswith("_vocabulary"):
                continue
            if name.endswith("_codes"):
                vocabulary_name = name.replace("_codes", "_vocabulary")
                vocabulary = np.union1d(self.columns[vocabulary_name], other.columns[vocabulary_name])
                arrays[vocabulary_name] = vocabulary
                column = np.concatenate([_recoded(column[keep], self.columns[vocabulary_name], vocabulary),
                                         _recoded(other.columns[name], other.columns[vocabulary_name], vocabulary)])
            else:
                column = np.concatenate([column[keep], other.columns[name]])
            arrays[name] = column
        return RegisterColumns.from_arrays(arrays)

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The columns and the item ids (fixed-width UTF-8), as arrays to store."""
        return {"ids": self.ids.encode(np.arange(len(self.ids))), **self.columns}

    def __len__(self) -> int:
        return len(self.ids)

    def registers(self, row: int) -> ItemRegisters:
        """The registers of the item in `row`."""
        c = self.columns
        fields: dict[str, tuple[float, Any]] = {}
        for name in METADATA_FIELDS:
            at = float(c[f"{name}_at"][row])
            if at == at:  # not NaN
                if name in _STRING_FIELDS:
                    code = int(c[f"{name}_codes"][row])
                    fields[name] = (at, None if code < 0 else str(c[f"{name}_vocabulary"][code]))
                else:
                    value = float(c[f"{name}_values"][row])
                    fields[name] = (at, None if value != value else value)
        vector_at, existence_at = float(c["vector_at"][row]), float(c["existence_at"][row])
        return (fields, vector_at if vector_at == vector_at else None,
                (existence_at, bool(c["existence_alive"][row])) if existence_at == existence_at else None)


@dataclass
class WriteRegisters:
    """Newest-wins registers per item: each metadata field, the vector, and existence.

    base: registers of items not touched since a snapshot, as columns; an item's move into
    the dicts the first time anything asks about it.
    """

    fields: dict[str, dict[str, tuple[float, Any]]] = field(default_factory=dict)
    vector_at: dict[str, float] = field(default_factory=dict)
    existence: dict[str, tuple[float, bool]] = field(default_factory=dict)
    base: RegisterColumns | None = None
    _moved: set[str] = field(default_factory=set)

    def _load(self, item: str) -> None:
        """Move `item`'s registers from `base` into the dicts, once."""
        if self.base is not None and item not in self._moved:
            self._moved.add(item)
            self._put(item, self.base.ids.key(item))

    def load(self, items: Iterable[str]) -> None:
        """`_load` for many items with one vectorised look-up (a replay does it per batch)."""
        if self.base is None:
            return
        new = [item for item in dict.fromkeys(items) if item not in self._moved]
        self._moved.update(new)
        for item, row in zip(new, self.base.ids.keys(new).tolist() if new else []):
            self._put(item, row)

    def _put(self, item: str, row: int) -> None:
        if row < 0:
            return
        fields, vector_at, existence = self.base.registers(row)
        if fields:
            self.fields[item] = fields
        if vector_at is not None:
            self.vector_at[item] = vector_at
        if existence is not None:
            self.existence[item] = existence

    def of(self, item: str) -> ItemRegisters:
        """The item's registers: fields, vector time, existence (None: never written)."""
        self._load(item)
        return dict(self.fields.get(item, {})), self.vector_at.get(item), self.existence.get(item)

    def items(self) -> list[str]:
        """Every item with a register."""
        base = [] if self.base is None else [i for i in self.base.ids.decode(np.arange(len(self.base)))
                                             if i not in self._moved]
        return list(dict.fromkeys([*base, *self.fields, *self.vector_at, *self.existence]))

    def columns(self) -> RegisterColumns:
        """All registers as columns (for a snapshot): those still in `base` copied as they are,
        the others from the dicts."""
        touched = list(dict.fromkeys([*self.fields, *self.vector_at, *self.existence]))
        fresh = RegisterColumns.of(touched, [self.of(item) for item in touched])
        if self.base is None:
            return fresh
        keep = np.ones(len(self.base), dtype=bool)
        moved = self.base.ids.keys(list(self._moved)) if self._moved else np.zeros(0, np.int64)
        keep[moved[moved >= 0]] = False
        return self.base.merged(np.flatnonzero(keep), fresh)

    def apply(self, entry: JournalEntry) -> Change | None:
        """Take an entry into the registers; the change it made, or None if everything it says
        is older than what the registers hold."""
        item, at = entry.item_id, entry.at
        self._load(item)
        if entry.op == DELETE:
            if at < self.existence.get(item, (_NEVER, True))[0]:
                return None
            self.existence[item] = (at, False)
            self.vector_at[item] = max(at, self.vector_at.get(item, _NEVER))
            return Change(item)
        changed = False
        registers = self.fields.setdefault(item, {})
        for name in _set_fields(entry):
            if at >= registers.get(name, (_NEVER, None))[0]:
                registers[name] = (at, getattr(entry, name))
                changed = True
        if entry.vector is not None and at >= self.vector_at.get(item, _NEVER):
            self.vector_at[item] = at
            if at >= self.existence.get(item, (_NEVER, True))[0]:
                self.existence[item] = (at, True)
            return Change(item, entry.vector)
        return Change(item) if changed else None

    def keep_base(self, item: str, row: dict | None) -> None:
        """Before the catalog forgets a deleted item's `row`, keep the fields no entry has set
        as the oldest possible writes: a re-listing that sets only some fields then merges
        with them, as it would had it been applied before the delete."""
        if row is None:
            return
        self._load(item)
        registers = self.fields.setdefault(item, {})
        for name in METADATA_FIELDS:
            registers.setdefault(name, (_NEVER, row[name]))

    def has(self, entry: JournalEntry) -> bool:
        """Whether the registers already hold this write or newer ones for everything it says
        (a hand-over never carries such an entry again)."""
        item, at = entry.item_id, entry.at
        self._load(item)
        if entry.op == DELETE:
            return self.existence.get(item, (_NEVER, True))[0] >= at
        registers = self.fields.get(item, {})
        if any(registers.get(name, (_NEVER, None))[0] < at for name in _set_fields(entry)):
            return False
        return entry.vector is None or self.vector_at.get(item, _NEVER) >= at

    def alive(self, item: str, default: bool) -> bool:
        """Whether the item exists: its newest embed-or-delete, or `default` (it is in the
        release's catalog) when the journal never said."""
        self._load(item)
        return self.existence.get(item, (_NEVER, default))[1]

    def complete(self, item: str) -> bool:
        """Whether every metadata field of the item has a register (its catalog row adds nothing)."""
        self._load(item)
        return len(self.fields.get(item, ())) == len(METADATA_FIELDS)

    def metadata(self, item: str, current: dict | None) -> dict | None:
        """The item's metadata: its registers over `current` (the catalog row); None while a
        field is still unknown (a partial update seen before the item's creation)."""
        self._load(item)
        registers = self.fields.get(item, {})
        merged = {name: registers[name][1] if name in registers else (current or {}).get(name)
                  for name in METADATA_FIELDS}
        return None if any(value is None for value in merged.values()) else merged


def _recoded(codes: np.ndarray, vocabulary: np.ndarray, into: np.ndarray) -> np.ndarray:
    """`codes` into `vocabulary` as codes into `into` (a sorted superset); -1 stays -1."""
    mapped = np.searchsorted(into, vocabulary).astype(np.int32)
    return np.where(codes < 0, -1, mapped[np.maximum(codes, 0)] if len(mapped) else -1).astype(np.int32)


def _set_fields(entry: JournalEntry) -> list[str]:
    """The metadata fields an upsert sets: those it sent, except any sent as null (no value a
    catalog row could hold, so the field keeps the one it has)."""
    return [name for name in entry.fields_set if getattr(entry, name) is not None]

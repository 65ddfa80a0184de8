"""What serving writes mean when several processes and replicas take them: per-field newest-wins.

Every write is a journal entry with its write time `at`. An upsert names the metadata
fields its request set (`sent`); a delete removes the item. Readers see entries in any
order (other worker processes, other replicas, late GCS listings), so the state of an
item is decided per field, not per entry:

- each metadata field (`category`, `price`, `status`) takes the value of the newest
  entry that sent it: `PUT {"status": "sold"}` on one worker and `PUT {"price": 900}` on
  another a moment later leave the item sold at 900 everywhere, in whichever order the
  two entries arrive;
- the vector is the newest entry's that carried one (an image upsert);
- existence is the newest of "embedded" (an image upsert) and "deleted": a metadata-only
  update never brings a deleted item back, an image upsert after a delete re-lists it.

`WriteRegisters` holds those registers; `visrec.online.replay.sync_journal` applies entries
through it and materialises the touched items into the catalog and the index.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from visrec.online.entry import DELETE, METADATA_FIELDS, JournalEntry

_NEVER = float("-inf")


@dataclass
class Change:
    """What one entry changed: the item, and a newer vector if it brought one."""

    item_id: str
    vector: tuple[float, ...] | None = None


@dataclass
class WriteRegisters:
    """Newest-wins registers per item: each metadata field, the vector, and existence."""

    fields: dict[str, dict[str, tuple[float, Any]]] = field(default_factory=dict)
    vector_at: dict[str, float] = field(default_factory=dict)
    existence: dict[str, tuple[float, bool]] = field(default_factory=dict)

    def apply(self, entry: JournalEntry) -> Change | None:
        """Take an entry into the registers; the change it made, or None if everything it says
        is older than what the registers hold."""
        item, at = entry.item_id, entry.at
        if entry.op == DELETE:
            if at < self.existence.get(item, (_NEVER, True))[0]:
                return None
            self.existence[item] = (at, False)
            self.vector_at[item] = max(at, self.vector_at.get(item, _NEVER))
            return Change(item)
        changed = False
        registers = self.fields.setdefault(item, {})
        for name in entry.fields_set:
            if at >= registers.get(name, (_NEVER, None))[0]:
                registers[name] = (at, getattr(entry, name))
                changed = True
        if entry.vector is not None and at >= self.vector_at.get(item, _NEVER):
            self.vector_at[item] = at
            if at >= self.existence.get(item, (_NEVER, True))[0]:
                self.existence[item] = (at, True)
            return Change(item, entry.vector)
        return Change(item) if changed else None

    def has(self, entry: JournalEntry) -> bool:
        """Whether the registers already hold this write or newer ones for everything it says
        (a hand-over never carries such an entry again)."""
        item, at = entry.item_id, entry.at
        if entry.op == DELETE:
            return self.existence.get(item, (_NEVER, True))[0] >= at
        registers = self.fields.get(item, {})
        if any(registers.get(name, (_NEVER, None))[0] < at for name in entry.fields_set):
            return False
        return entry.vector is None or self.vector_at.get(item, _NEVER) >= at

    def alive(self, item: str, default: bool) -> bool:
        """Whether the item exists: its newest embed-or-delete, or `default` (it is in the
        release's catalog) when the journal never said."""
        return self.existence.get(item, (_NEVER, default))[1]

    def metadata(self, item: str, current: dict | None) -> dict | None:
        """The item's metadata: its registers over `current` (the catalog row); None while a
        field is still unknown (a partial update seen before the item's creation)."""
        registers = self.fields.get(item, {})
        merged = {name: registers[name][1] if name in registers else (current or {}).get(name)
                  for name in METADATA_FIELDS}
        return None if any(value is None for value in merged.values()) else merged

"""One write of the serving journal (`JournalEntry`) and its JSON form, the journal's line format.

An upsert or a delete of one item, with its write time `at` and a unique `id`. An upsert
names the metadata fields its request set (`sent`: readers take only those, see
`visrec.online.writes`) and carries the embedded vector (so replay never needs the image
again) and the digest of the kept image (for a hand-over's re-embedding). On disk an
entry is one compact JSON object:

- upsert: `op, id, item_id, title, category, price, status, sent, vector, image_sha256, at`;
- delete: `op, id, item_id, at`.

`from_json` is the one place a stored entry is checked: anything that is not such an
object (not JSON, a missing field, an unknown op, a vector that is not numbers) raises
`BadEntry`, and the journal reader skips, logs and counts it.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal

UPSERT, DELETE = "upsert", "delete"
METADATA_FIELDS = ("category", "price", "status")
_NUMBERS = (int, float)  # what JSON numbers parse to; by exact type, so `true` is not one


class BadEntry(ValueError):
    """A stored journal entry that is not a usable write; skipped and counted by the reader."""


def new_entry_id() -> str:
    return uuid.uuid4().hex


@dataclass(frozen=True)
class JournalEntry:
    """One upsert or delete; the fields after `id` belong to upserts (None on a delete).

    id: None only for an entry written by hand without one. sent: the metadata fields the
    request set; None for entries written before `sent` existed, which set them all.
    vector: the index vector of an image upsert (the float32 values, as JSON holds them), None
        for a metadata-only one.
    """

    op: Literal["upsert", "delete"]
    item_id: str
    at: float
    id: str | None = None
    title: str | None = None
    category: str | None = None
    price: float | None = None
    status: str | None = None
    sent: tuple[str, ...] | None = None
    vector: tuple[float, ...] | None = None
    image_sha256: str | None = None

    @classmethod
    def upsert(cls, item_id: str, *, title: str | None, category: str, price: float, status: str,
               sent: tuple[str, ...], vector: tuple[float, ...] | None, image_sha256: str | None) -> JournalEntry:
        """A new upsert written now."""
        return cls(UPSERT, item_id, time.time(), new_entry_id(), title, category, price, status, sent, vector,
                   image_sha256)

    @classmethod
    def delete(cls, item_id: str) -> JournalEntry:
        """A new delete written now."""
        return cls(DELETE, item_id, time.time(), new_entry_id())

    @property
    def fields_set(self) -> tuple[str, ...]:
        """The metadata fields this upsert set."""
        return METADATA_FIELDS if self.sent is None else self.sent

    def to_json(self) -> str:
        """The entry as one compact JSON object (no newline)."""
        out: dict[str, Any] = {"op": self.op}
        if self.id is not None:
            out["id"] = self.id
        out["item_id"] = self.item_id
        if self.op == UPSERT:
            out.update(title=self.title, category=self.category, price=self.price, status=self.status,
                       sent=None if self.sent is None else list(self.sent),
                       vector=None if self.vector is None else list(self.vector),
                       image_sha256=self.image_sha256)
        out["at"] = self.at
        return json.dumps(out, separators=(",", ":"))

    @classmethod
    def from_json(cls, data: bytes | str) -> JournalEntry:
        """Parse one stored entry; `BadEntry` says why one is unusable."""
        try:
            raw = json.loads(data)
        except ValueError as exc:
            raise BadEntry(str(exc)) from None
        if not isinstance(raw, dict):
            raise BadEntry("not a JSON object")
        try:
            return cls._from_object(raw)
        except KeyError as exc:
            raise BadEntry(f"no {exc.args[0]!r} field") from None
        except (TypeError, ValueError) as exc:
            raise BadEntry(str(exc)) from None

    @classmethod
    def _from_object(cls, raw: dict[str, Any]) -> JournalEntry:
        op, item_id, at = raw["op"], str(raw["item_id"]), float(raw["at"])
        entry_id = None if raw.get("id") is None else str(raw["id"])
        if op == DELETE:
            return cls(DELETE, item_id, at, entry_id)
        if op != UPSERT:
            raise ValueError(f"unknown op {op!r}")
        sent = None if raw.get("sent") is None else tuple(f for f in raw["sent"] if f in METADATA_FIELDS)
        missing = [name for name in (METADATA_FIELDS if sent is None else sent) if name not in raw]
        if missing:
            raise KeyError(missing[0])  # a field the entry says it set
        # The values that reach the catalog (and a page of results) must be what the catalog holds.
        price = raw.get("price")
        if price is not None and type(price) not in _NUMBERS:
            raise TypeError(f"price {price!r} is not a number")
        for name in ("category", "status"):
            if raw.get(name) is not None and not isinstance(raw[name], str):
                raise TypeError(f"{name} {raw[name]!r} is not a string")
        vector = None if raw.get("vector") is None else tuple(raw["vector"])
        if vector is not None and not all(type(v) in _NUMBERS for v in vector):
            raise TypeError("the vector holds values that are not numbers")
        return cls(UPSERT, item_id, at, entry_id, raw.get("title"), raw.get("category"), price,
                   raw.get("status"), sent, vector, raw.get("image_sha256"))


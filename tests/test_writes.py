"""Per-field newest-wins write registers: whatever order replicas see entries in, they agree."""

from __future__ import annotations

import itertools
import json

import pytest

from visrec.online.entry import JournalEntry
from visrec.online.writes import WriteRegisters


def upsert(item: str, at: float, vector: bool = False, sent: list[str] | None = None, **fields) -> JournalEntry:
    row = {"category": "a/b", "price": 100, "status": "on_sale", **fields}
    entry = {"op": "upsert", "id": f"{item}-{at}", "item_id": item, "at": at, "vector": [1.0] if vector else None,
             **row}
    if sent is not None:
        entry["sent"] = sent
    return JournalEntry.from_json(json.dumps(entry))


def delete(item: str, at: float) -> JournalEntry:
    return JournalEntry("delete", item, at, id=f"del-{item}-{at}")


def replay(entries: list[JournalEntry], base: dict | None = None) -> tuple[WriteRegisters, dict | None, bool]:
    registers = WriteRegisters()
    for entry in entries:
        registers.apply(entry)
    item = entries[0].item_id
    return registers, registers.metadata(item, base), registers.alive(item, default=base is not None)


BASE = {"category": "a/b", "price": 100, "status": "on_sale"}


def test_updates_of_different_fields_both_stand_in_any_order():
    """`sold` from one replica, a new price from another (which merged with a stale row): both stand."""
    sold = upsert("x", 1.0, sent=["status"], status="sold")
    repriced = upsert("x", 2.0, sent=["price"], price=900)  # its `status` field is the stale on_sale
    for order in itertools.permutations([sold, repriced]):
        _, metadata, alive = replay(list(order), BASE)
        assert metadata == {"category": "a/b", "price": 900, "status": "sold"} and alive


def test_a_metadata_update_never_brings_a_deleted_item_back():
    for order in itertools.permutations([delete("x", 2.0), upsert("x", 3.0, sent=["price"], price=5)]):
        _, _, alive = replay(list(order), BASE)
        assert not alive
    # A re-listing (a new image) after the delete does.
    for order in itertools.permutations([delete("x", 2.0), upsert("x", 3.0, vector=True)]):
        assert replay(list(order), BASE)[2]
    # An older re-listing does not undo a newer delete.
    for order in itertools.permutations([delete("x", 4.0), upsert("x", 3.0, vector=True)]):
        assert not replay(list(order), BASE)[2]


def test_a_partial_update_seen_before_the_creation_is_kept():
    created = upsert("new", 1.0, vector=True, price=300)
    sold = upsert("new", 2.0, sent=["status"], status="sold")
    registers, metadata, alive = replay([sold])
    assert metadata is None and not registers.alive("new", default=False)  # not materialisable yet
    for order in itertools.permutations([created, sold]):
        _, metadata, alive = replay(list(order))
        assert metadata == {"category": "a/b", "price": 300, "status": "sold"} and alive


def test_old_entries_without_sent_set_every_field_and_newer_ones_win():
    old_full = upsert("x", 1.0, price=10, status="reserved")  # written before `sent` existed
    newer = upsert("x", 2.0, sent=["status"], status="sold")
    for order in itertools.permutations([old_full, newer]):
        _, metadata, _ = replay(list(order), BASE)
        assert metadata == {"category": "a/b", "price": 10, "status": "sold"}


def test_has_says_whether_a_write_or_newer_ones_are_held():
    registers = WriteRegisters()
    entry = upsert("x", 2.0, sent=["status"], status="sold")
    assert not registers.has(entry)
    registers.apply(entry)
    assert registers.has(entry) and registers.has(upsert("x", 1.0, sent=["status"]))
    assert not registers.has(upsert("x", 1.0, sent=["price"]))  # price never written
    assert not registers.has(upsert("x", 2.0, sent=["status"], vector=True))  # no vector held
    registers.apply(delete("x", 3.0))
    assert registers.has(delete("x", 2.5)) and not registers.has(delete("x", 3.5))


@pytest.mark.parametrize("bad", [{"op": "upsert", "item_id": "x"}, {"op": "rename", "item_id": "x", "at": 1.0},
                                 {"item_id": "x", "at": 1.0}, {"op": "upsert", "at": 1.0, "item_id": "x",
                                                                "sent": ["price"]}])
def test_unusable_entries_raise_for_the_caller_to_skip(bad):
    with pytest.raises((KeyError, ValueError, TypeError)):
        WriteRegisters().apply(JournalEntry.from_json(json.dumps(bad)))

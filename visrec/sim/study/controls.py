"""The study's negative control: fine-tuning on titles shuffled between items.

A candidate can beat the zero-shot model without learning what the pairing teaches: the
fine-tuning also adapts it to the marketplace's photos and vocabulary. Fine-tuned on the same
listings with every title moved to another item (the images, the titles and the recipe
unchanged, only the pairing broken), a candidate shows what that adaptation alone is worth, and
the gate must reject it against the baseline: it is the data bug (image and title columns
misaligned by a join or a shuffle) the gate exists to catch.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from visrec.core import io
from visrec.core.errors import UserError
from visrec.data.schema import RESERVED_STATUS


def derangement(n: int, rng: np.random.Generator) -> np.ndarray:
    """A uniformly drawn permutation of range(n) with no fixed point (n >= 2), by rejection:
    about e draws on average."""
    if n < 2:
        raise UserError(f"moving every title to another item needs at least 2 items, got {n}")
    while True:
        perm = rng.permutation(n)
        if not (perm == np.arange(n)).any():
            return perm


def shuffle_titles(listings_uri: str, out_path: str | Path, seed: int) -> dict:
    """Write `listings_uri` (JSON Lines, the listings contract) to `out_path` with the titles of
    the listings fine-tuning trains on (every status but `reserved`, whose titles prepare drops
    with them) moved between items by a seeded derangement: no such title stays with its image.
    Every other field is kept; relative `image_uri`s are made absolute (resolved against the
    listings' directory) so the copy can live anywhere. Returns the counts."""
    base = io.parent(listings_uri) if io.is_gcs(listings_uri) else str(Path(listings_uri).resolve().parent)
    rows = []
    for number, line in enumerate(io.read_text(listings_uri).splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise UserError(f"{listings_uri}:{number}: not a JSON object ({e.msg}); the control shuffles a "
                            "clean marketplace such as `visrec demo-data` writes") from None
    movable = [i for i, r in enumerate(rows) if r.get("status") != RESERVED_STATUS]
    perm = derangement(len(movable), np.random.default_rng(seed))
    titles = [rows[i]["title"] for i in movable]
    for i, j in zip(movable, perm):
        rows[i] = {**rows[i], "title": titles[j]}
    for r in rows:
        uri = r.get("image_uri")
        if isinstance(uri, str) and uri and not io.is_gcs(uri) and not os.path.isabs(uri):
            r["image_uri"] = io.join(base, uri)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return {"rows": len(rows), "titles_moved": len(movable), "kept_in_place": len(rows) - len(movable)}

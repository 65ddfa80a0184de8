"""Serving-time ranking: ANN candidates -> availability and price filter -> category re-rank.

This is the paper's production recipe as pure functions over arrays, so the HTTP
layer (`serving/`) only parses requests and the logic is unit-testable without a
server. The flow for one query item (`recommend`):

1. fetch an over-sized candidate set from the ANN index with the item's stored
   embedding (default 200, far more than the k <= 100 a page shows, because the
   filters below typically discard a large share of it);
2. drop the query item itself and every candidate that is not `on_sale`;
3. drop candidates whose price lies outside [p * price_low, p * price_high] of the
   query item's price p (a buyer looking at a 40 EUR bag rarely wants a 900 EUR one);
4. re-rank by a blend of the ANN score and the category similarity (shared depth of
   the two category paths, normalised to [0, 1]);
5. if fewer than k survive, fetch once more with a wider candidate set before answering.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from typing import Protocol, Sequence

import numpy as np

from visrec.stages.index.idmap import IdMap, IdSequence

ON_SALE = "on_sale"

# Category paths are written "fashion/women/bags"; " > " is accepted too.
_CATEGORY_SEPARATOR = re.compile(r"\s*[/>]\s*")


@dataclass
class RankingConfig:
    """How candidates are fetched, filtered and re-ranked; defaults follow the paper's system.

    fetch: ANN candidates per query (over-fetch, so filtering still leaves k).
    widen_factor: the one retry fetches `fetch * widen_factor` when fewer than k survive.
    price_low, price_high: keep candidates priced within [p * price_low, p * price_high]
        of the query price p ([p/2, 2p]: same budget class, a symmetric factor of two).
        A query item without a positive price disables the band.
    category_weight: weight w of the category similarity in the final score
        `(1 - w) * ann_score + w * category_similarity`. Within an over-fetched top-200
        the ANN scores are close together, so 0.3 lets the category decide between
        visually similar candidates without lifting a poor visual match above a
        near-duplicate of the query.
    max_k: the largest page size a client may ask for.
    """

    fetch: int = 200
    widen_factor: int = 5
    price_low: float = 0.5
    price_high: float = 2.0
    category_weight: float = 0.3
    max_k: int = 100

    def __post_init__(self) -> None:
        if self.fetch < 1 or self.widen_factor < 1:
            raise ValueError("fetch and widen_factor must be >= 1")
        if not 0 < self.price_low <= 1 <= self.price_high:
            raise ValueError("need 0 < price_low <= 1 <= price_high")
        if not 0.0 <= self.category_weight <= 1.0:
            raise ValueError("category_weight must be in [0, 1]")


class VectorIndex(Protocol):
    """What ranking needs from `visrec.stages.index.searcher.SimilarityIndex`: its labels are catalog rows
    (`label_index_with_catalog`)."""

    def search_labels(self, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]: ...

    def set_labels(self, ids: Sequence[str], labels: np.ndarray) -> None: ...

    def vector(self, item_id: str) -> np.ndarray | None: ...

    def __len__(self) -> int: ...


def _encode(value: str, vocabulary: list[str], codes: dict[str, int]) -> int:
    """Small-integer code of a repeated string (a category or a status), extending the vocabulary."""
    code = codes.get(value)
    if code is None:
        code = codes[value] = len(vocabulary)
        vocabulary.append(value)
    return code


@dataclass
class CodedColumn:
    """A column of repeated strings (categories, statuses) as int32 codes into `values`.

    What `read_catalog` hands over from Arrow's dictionary encoding, so loading ten million
    rows never makes a Python string per row.
    """

    codes: np.ndarray
    values: list[str]

    @classmethod
    def of(cls, column: Sequence[str] | CodedColumn) -> CodedColumn:
        if isinstance(column, CodedColumn):
            return column
        values, codes = np.unique(np.asarray(list(column), dtype=str), return_inverse=True)
        return cls(codes.astype(np.int32), values.tolist())


@dataclass
class ItemCatalog:
    """Item metadata needed at serving time, columnar so filtering 200 candidates is vectorised.

    A row is the item's key in `ids` (an `IdMap`: no Python object per item). Rows are
    append-only (an upsert of a new item appends; a delete only clears `present`), so a row
    number stays valid for the catalog's lifetime. Arrays grow by doubling to keep upserts
    amortised O(1).
    """

    ids: IdMap = field(default_factory=lambda: IdMap.from_ids([])[0])
    prices: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.float64))
    on_sale: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))
    present: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))
    category_codes: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int32))
    categories: list[str] = field(default_factory=list)
    status_codes: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int32))
    statuses: list[str] = field(default_factory=list)
    _category_code: dict[str, int] = field(default_factory=dict)
    _status_code: dict[str, int] = field(default_factory=dict)
    _similarity_rows: dict[int, np.ndarray] = field(default_factory=dict)
    _count: int = 0

    @classmethod
    def from_columns(cls, item_ids: Sequence[str] | np.ndarray, prices: Sequence[float] | np.ndarray,
                     categories: Sequence[str] | CodedColumn,
                     statuses: Sequence[str] | CodedColumn) -> "ItemCatalog":
        """Build from parallel columns (e.g. the release's `items.parquet`); `item_ids` may be
        fixed-width UTF-8 bytes. `ValueError` for a duplicate item id."""
        ids, order = IdMap.from_ids(item_ids)  # row r holds input row order[r]
        category, status = CodedColumn.of(categories), CodedColumn.of(statuses)
        if not len(order) == len(prices) == len(category.codes) == len(status.codes):
            raise ValueError("catalog columns of different lengths")
        catalog = cls(ids=ids, categories=list(category.values), statuses=list(status.values))
        catalog._category_code = {value: code for code, value in enumerate(catalog.categories)}
        catalog._status_code = {value: code for code, value in enumerate(catalog.statuses)}
        catalog.prices = np.asarray(prices, dtype=np.float64)[order]
        catalog.category_codes = np.asarray(category.codes, dtype=np.int32)[order]
        catalog.status_codes = np.asarray(status.codes, dtype=np.int32)[order]
        on_sale = catalog._status_code.get(ON_SALE, -1)
        catalog.on_sale = catalog.status_codes == on_sale
        catalog.present = np.ones(len(order), dtype=bool)
        catalog._count = len(order)
        return catalog

    def _category(self, category: str) -> int:
        return _encode(category, self.categories, self._category_code)

    def _status(self, status: str) -> int:
        return _encode(status, self.statuses, self._status_code)

    def __len__(self) -> int:
        return self._count

    def row(self, item_id: str) -> int:
        """The row of `item_id` (present or deleted), or -1 if the catalog never had it."""
        return self.ids.key(item_id)

    def item_id(self, row: int) -> str:
        return self.ids.id(row)

    def __contains__(self, item_id: str) -> bool:
        row = self.ids.key(item_id)
        return row >= 0 and bool(self.present[row])

    def get(self, item_id: str) -> dict | None:
        """`{"price", "category", "status"}` of a present item, else None."""
        row = self.ids.key(item_id)
        if row < 0 or not self.present[row]:
            return None
        return {"price": int(self.prices[row]),
                "category": self.categories[self.category_codes[row]],
                "status": self.statuses[self.status_codes[row]]}

    def upsert(self, item_id: str, price: float, category: str, status: str) -> None:
        """Insert or overwrite one item's metadata."""
        row = self.ids.key(item_id)
        if row < 0:
            if len(self.ids) >= len(self.prices):
                self._grow(max(16, 2 * len(self.prices)))
            row = self.ids.add(item_id)
        self.prices[row] = price
        self.on_sale[row] = status == ON_SALE
        self.category_codes[row] = self._category(category)
        self.status_codes[row] = self._status(status)
        if not self.present[row]:
            self.present[row] = True
            self._count += 1

    def delete(self, item_id: str) -> bool:
        """Forget an item; returns whether it was present."""
        row = self.ids.key(item_id)
        if row < 0 or not self.present[row]:
            return False
        self.present[row] = False
        self.on_sale[row] = False
        self._count -= 1
        return True

    def _grow(self, capacity: int) -> None:
        def grown(a: np.ndarray) -> np.ndarray:
            out = np.zeros(capacity, dtype=a.dtype)
            out[: len(a)] = a
            return out

        # Build every grown array before assigning any, so a concurrent reader
        # never sees columns of different lengths.
        columns = (grown(self.prices), grown(self.on_sale), grown(self.present),
                   grown(self.category_codes), grown(self.status_codes))
        self.prices, self.on_sale, self.present, self.category_codes, self.status_codes = columns

    def category_similarities(self, code: int) -> np.ndarray:
        """`category_similarity` of category `code` to every category code, as one array.

        Cached per code: a catalog has few distinct categories, so re-ranking a candidate
        list is one gather instead of a call per candidate. A new category (upsert) makes
        the cached arrays too short, which rebuilds them.
        """
        sims = self._similarity_rows.get(code)
        if sims is None or len(sims) != len(self.categories):
            query = self.categories[code]
            sims = np.array([category_similarity(query, other) for other in self.categories], dtype=np.float64)
            self._similarity_rows[code] = sims
        return sims

    def rows(self, item_ids: Sequence[str]) -> np.ndarray:
        """Row numbers of `item_ids` (int64, vectorised); -1 for ids the catalog does not know."""
        return self.ids.keys(item_ids)

    def memory_bytes(self) -> dict[str, int]:
        """Bytes held, by part: the id map and the numpy columns."""
        return {"ids": self.ids.nbytes,
                "columns": int(sum(a.nbytes for a in (self.prices, self.on_sale, self.present,
                                                        self.category_codes, self.status_codes)))}


@dataclass
class Recommendation:
    item_id: str
    score: float
    price: int  # JPY, as in the data contract
    category: str


@dataclass
class RankedList:
    """A ranked answer plus what happened on the way (for metrics and debugging)."""

    items: list[Recommendation]
    fetched: int
    survivors: int
    widened: bool


def category_path(category: str) -> tuple[str, ...]:
    """`"fashion/women/bags"` -> `("fashion", "women", "bags")` (case-insensitive, trimmed)."""
    return tuple(p for p in _CATEGORY_SEPARATOR.split(category.strip().lower()) if p)


@functools.lru_cache(maxsize=65536)
def category_similarity(a: str, b: str) -> float:
    """Shared depth of two category paths divided by the deeper path's depth, in [0, 1].

    Equal paths give 1, paths diverging at the root 0, `fashion/women/bags` vs
    `fashion/women/shoes` 2/3. Cached: a catalog has few distinct categories.
    """
    pa, pb = category_path(a), category_path(b)
    depth = max(len(pa), len(pb))
    if depth == 0:
        return 0.0
    shared = 0
    for x, y in zip(pa, pb):
        if x != y:
            break
        shared += 1
    return shared / depth


def price_band_filter(query_price: float, prices: np.ndarray,
                      low: float = 0.5, high: float = 2.0) -> np.ndarray:
    """Boolean mask of `prices` within [query_price * low, query_price * high].

    Without a positive query price there is no reference, so everything passes.
    """
    prices = np.asarray(prices, dtype=np.float64)
    if not query_price or query_price <= 0:
        return np.ones(prices.shape, dtype=bool)
    return (prices >= query_price * low) & (prices <= query_price * high)


def rerank(ann_scores: np.ndarray, category_similarities: np.ndarray,
           category_weight: float) -> tuple[np.ndarray, np.ndarray]:
    """Blend ANN scores with category similarities; returns (order, blended scores).

    `order` sorts candidates by the blended score, best first; ties keep the ANN order
    (a stable sort), so with weight 0 the result is exactly the ANN ranking.
    """
    blended = ((1.0 - category_weight) * np.asarray(ann_scores, dtype=np.float64)
               + category_weight * np.asarray(category_similarities, dtype=np.float64))
    order = np.argsort(-blended, kind="stable")
    return order, blended


def label_index_with_catalog(index: VectorIndex, catalog: ItemCatalog, item_ids: Sequence[str]) -> None:
    """Label the index's `item_ids` with their catalog rows (-1: not in the catalog).

    `recommend` reads candidates' prices, statuses and categories by these rows. Call it
    for every indexed item once after loading and again for items whose catalog entry is
    new (a catalog row never changes once given: the catalog is append-only).
    """
    ids = item_ids if isinstance(item_ids, IdSequence) else list(item_ids)  # the index's own: vectorised
    if len(ids):
        index.set_labels(ids, catalog.rows(ids))


def _filter_candidates(query_row: int, rows: np.ndarray, scores: np.ndarray, catalog: ItemCatalog,
                       config: RankingConfig) -> tuple[np.ndarray, np.ndarray]:
    """(rows, scores) of the candidates that are on sale, not the query, within the price band."""
    safe_rows = np.where(rows >= 0, rows, 0)
    # `on_sale` is False for deleted items too, so it also covers `present`.
    keep = (rows >= 0) & (rows != query_row) & catalog.on_sale[safe_rows]
    keep &= price_band_filter(catalog.prices[query_row], catalog.prices[safe_rows],
                              config.price_low, config.price_high)
    idx = np.flatnonzero(keep)
    return rows[idx], np.asarray(scores, dtype=np.float64)[idx]


def recommend(item_id: str, k: int, index: VectorIndex, catalog: ItemCatalog,
              config: RankingConfig = RankingConfig()) -> RankedList:
    """The k most similar on-sale items to `item_id` (see the module docstring for the steps).

    The index's labels must be catalog rows (`label_index_with_catalog`). Raises
    `KeyError` when the item is unknown to the catalog or has no stored embedding.
    """
    query_row = catalog.row(item_id)
    if query_row < 0 or not catalog.present[query_row]:
        raise KeyError(item_id)
    query = index.vector(item_id)
    if query is None:
        raise KeyError(item_id)
    if not 1 <= k <= config.max_k:
        raise ValueError(f"k must be in 1..{config.max_k}, got {k}")
    size = len(index)
    fetch = min(max(config.fetch, k + 1), size)
    widened = False
    while True:
        rows, ann = _filter_candidates(query_row, *index.search_labels(query, fetch), catalog, config)
        if len(rows) >= k or widened or fetch >= size:
            break
        fetch = min(fetch * config.widen_factor, size)
        widened = True
    codes = catalog.category_codes[rows]
    sims = catalog.category_similarities(int(catalog.category_codes[query_row]))[codes]
    order, blended = rerank(ann, sims, config.category_weight)
    items = [Recommendation(item_id=catalog.item_id(int(rows[i])), score=float(blended[i]),
                            price=int(catalog.prices[rows[i]]), category=catalog.categories[codes[i]])
             for i in order[:k].tolist()]
    return RankedList(items=items, fetched=fetch, survivors=len(rows), widened=widened)

"""A synthetic second-hand marketplace with a known (hidden) notion of "similar".

No public marketplace data can be downloaded here, so the project makes its own:
rendered product photos (category-specific silhouettes with colours, patterns,
backgrounds, lighting, scale and rotation jitter, near-duplicate relistings),
noisy Japanese/English titles, a category tree, log-normal prices, `reserved`
listings whose titles are direct messages, and impression logs from a plausible
old production system whose taps come from a hidden user model
(`tap_probability`). Because the ground truth is known, tests and the simulated
A/B test can check that a model which embeds images well really wins.

Every item is generated from `(seed, index)` alone (and, for a relisting, from the
item it copies), and images are rendered from those per-item specs, so the output
is byte-identical for a seed and config whatever the number of worker processes.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import multiprocessing
import os
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from io import BytesIO
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from visrec.core import io
from visrec.core.errors import UserError
from visrec.core.progress import Progress
from visrec.stages.evaluate.metrics import ndcg_at_k

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------
# The catalogue: category tree (leaf path -> silhouette, median price JPY, log-sd of price, weight).
# Men's and women's tops share silhouettes, so "same shape" and "same category" differ.
CATEGORIES: dict[str, tuple[str, int, float, float]] = {
    "Women/Tops/T-shirts": ("tshirt", 1500, 0.55, 1.4),
    "Women/Tops/Blouses": ("shirt", 2200, 0.6, 1.0),
    "Women/Dresses/One-piece": ("dress", 3500, 0.7, 1.0),
    "Women/Bottoms/Skirts": ("skirt", 2500, 0.6, 0.8),
    "Women/Bags/Handbags": ("handbag", 8000, 0.9, 1.0),
    "Women/Bags/Tote bags": ("tote", 3000, 0.7, 0.8),
    "Women/Shoes/Pumps": ("pump", 4000, 0.7, 0.7),
    "Men/Tops/T-shirts": ("tshirt", 1800, 0.55, 1.2),
    "Men/Tops/Shirts": ("shirt", 3000, 0.6, 0.9),
    "Men/Bottoms/Pants": ("pants", 3500, 0.6, 0.8),
    "Men/Shoes/Sneakers": ("sneaker", 7000, 0.8, 1.1),
    "Men/Hats/Caps": ("cap", 2000, 0.6, 0.7),
    "Men/Bags/Backpacks": ("backpack", 5000, 0.8, 0.7),
    "Home/Kitchen/Mugs": ("mug", 1200, 0.5, 0.8),
    "Home/Kitchen/Plates": ("plate", 1500, 0.6, 0.6),
    "Home/Interior/Vases": ("vase", 2800, 0.7, 0.5),
}
# Named colours (RGB) and how common each is among listings.
COLOURS: dict[str, tuple[tuple[int, int, int], float]] = {
    "black": ((32, 32, 34), 1.6), "white": ((236, 236, 230), 1.4), "grey": ((128, 128, 132), 1.0),
    "navy": ((28, 40, 86), 1.2), "blue": ((45, 95, 200), 0.9), "red": ((196, 34, 44), 0.7),
    "pink": ((236, 150, 178), 0.7), "orange": ((236, 128, 34), 0.4), "yellow": ((236, 206, 52), 0.4),
    "green": ((44, 136, 64), 0.6), "khaki": ((148, 138, 88), 0.6), "purple": ((118, 62, 148), 0.4),
    "brown": ((110, 70, 42), 0.8), "beige": ((216, 196, 158), 0.9),
}
PATTERNS: dict[str, float] = {"plain": 0.45, "stripes": 0.2, "dots": 0.15, "checks": 0.2}
BACKGROUNDS: list[tuple[int, int, int]] = [
    (245, 245, 242), (228, 228, 226), (238, 230, 214), (214, 196, 170), (190, 160, 120),
    (222, 232, 240), (240, 226, 230), (205, 215, 200), (250, 250, 250), (170, 172, 176),
]
STATUSES: dict[str, float] = {"on_sale": 0.8, "sold_out": 0.16, "reserved": 0.04}
# Each kind of bad row `--corrupt-fraction` injects (the `kind` in hidden/corruptions.jsonl).
CORRUPTION_KINDS: tuple[str, ...] = (
    "missing_image", "truncated_image", "non_image_bytes", "empty_title",
    "non_positive_price", "non_numeric_price", "duplicate_item_id", "malformed_json",
)
DUPLICATE_RATE = 0.06  # share of items that are re-photographed relistings of an earlier item
LISTED_FROM = datetime(2024, 1, 1, tzinfo=timezone(timedelta(hours=9)))
LISTING_DAYS = 365
LOGS_FROM = LISTED_FROM + timedelta(days=LISTING_DAYS)
LOG_DAYS = 30
PROGRESS_EVERY_S = 5.0

# Random streams: every draw comes from default_rng([seed, stream, index]).
_ITEM, _SESSION, _CORRUPT, _EVAL = 1, 2, 3, 4


def _rng(seed: int, stream: int, index: int = 0) -> np.random.Generator:
    return np.random.default_rng([seed, stream, index])


def _choice(rng: np.random.Generator, weighted: dict[str, Any]) -> str:
    """A key of `weighted` drawn with probability proportional to its weight (last field of tuples)."""
    keys = list(weighted)
    w = np.array([v[-1] if isinstance(v, tuple) else v for v in weighted.values()], dtype=np.float64)
    return keys[int(rng.choice(len(keys), p=w / w.sum()))]


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


@dataclass
class DemoDataConfig:
    """Size and shape of the synthetic marketplace.

    items: listings to generate (before corruption, which rewrites rows in place).
    seed: everything is a pure function of the seed and the config.
    corrupt_fraction: share of listing rows turned into bad rows (see `CORRUPTION_KINDS`);
        every kind appears at least once when > 0 and items >= 50.
    image_size: longest side of the rendered photos in pixels (small keeps generation fast;
        the prepare stage resizes anyway).
    sessions_per_item: impression lists logged per item.
    candidates_per_list: candidates the old production system showed per list.
    workers: processes rendering images (the output does not depend on it).
    """

    items: int = 2000
    seed: int = 0
    corrupt_fraction: float = 0.0
    image_size: int = 160
    sessions_per_item: float = 1.0
    candidates_per_list: int = 10
    workers: int = dataclasses.field(default_factory=lambda: os.cpu_count() or 1)

    def __post_init__(self) -> None:
        if self.items < 2:
            raise UserError(f"items must be >= 2, got {self.items}")
        if not 0.0 <= self.corrupt_fraction <= 0.5:
            raise UserError(f"corrupt_fraction must be in [0, 0.5], got {self.corrupt_fraction}")
        if self.image_size < 32:
            raise UserError(f"image_size must be >= 32 px, got {self.image_size}")
        if self.sessions_per_item <= 0:
            raise UserError(f"sessions_per_item must be > 0, got {self.sessions_per_item}")
        if self.candidates_per_list < 2:
            raise UserError(f"candidates_per_list must be >= 2, got {self.candidates_per_list}")
        if self.workers < 1:
            raise UserError(f"workers must be >= 1, got {self.workers}")


# ---------------------------------------------------------------------------------------------
# The hidden user model.
#
# relevance = 0.65 * visual + 0.15 * category + 0.20 * price closeness, where
# visual = 0.45 * same shape + 0.35 * colour similarity + 0.20 * same pattern.
# A user examines position p with probability (1 + p) ** -POSITION_EXPONENT and taps an examined
# candidate with probability NOISE_TAP + (1 - NOISE_TAP) * sigmoid(STEEPNESS * (relevance - MIDPOINT)).
VISUAL_WEIGHTS = {"shape": 0.45, "colour": 0.35, "pattern": 0.20}
RELEVANCE_WEIGHTS = {"visual": 0.65, "category": 0.15, "price": 0.20}
COLOUR_SCALE = 90.0  # RGB distance at which colour similarity falls to 1/e
PRICE_SCALE = 0.7  # |log price ratio| at which price closeness falls to 1/e
STEEPNESS = 16.0
MIDPOINT = 0.74
NOISE_TAP = 0.01
POSITION_EXPONENT = 0.5
# The old production system's order: same leaf category first-ish, newer first-ish, popularity noise.
OLD_CATEGORY_WEIGHT = 0.5
OLD_RECENCY_WEIGHT = 0.5
OLD_NOISE = 0.7

_COLOUR_NAMES = list(COLOURS)
_RGB = np.array([COLOURS[c][0] for c in _COLOUR_NAMES], dtype=np.float64)
_COLOUR_SIM = np.exp(-(((_RGB[:, None, :] - _RGB[None, :, :]) ** 2).sum(-1) / COLOUR_SCALE**2))
_COLOUR_INDEX = {c: i for i, c in enumerate(_COLOUR_NAMES)}


def colour_similarity(a: str, b: str) -> float:
    """exp(-(RGB distance / COLOUR_SCALE)^2) of two named colours: navy~black, pink~red, blue!~orange."""
    return float(_COLOUR_SIM[_COLOUR_INDEX[a], _COLOUR_INDEX[b]])


def category_similarity(a: str, b: str) -> float:
    """Shared depth of two category paths over the deeper one's depth, in [0, 1]."""
    pa, pb = a.split("/"), b.split("/")
    shared = 0
    for x, y in zip(pa, pb):
        if x != y:
            break
        shared += 1
    return shared / max(len(pa), len(pb))


def visual_similarity(query: dict, candidate: dict) -> float:
    """The part of the hidden similarity a photo shows: shape, colour and pattern, in [0, 1]."""
    return (VISUAL_WEIGHTS["shape"] * (query["shape"] == candidate["shape"])
            + VISUAL_WEIGHTS["colour"] * colour_similarity(query["colour"], candidate["colour"])
            + VISUAL_WEIGHTS["pattern"] * (query["pattern"] == candidate["pattern"]))


def similarity(query: dict, candidate: dict) -> float:
    """The hidden relevance of `candidate` to a user looking at `query`, in [0, 1].

    Both are rows of `load_hidden` (`shape`, `colour`, `pattern`, `category`, `price`).
    """
    price = math.exp(-abs(math.log(candidate["price"] / query["price"])) / PRICE_SCALE)
    return (RELEVANCE_WEIGHTS["visual"] * visual_similarity(query, candidate)
            + RELEVANCE_WEIGHTS["category"] * category_similarity(query["category"], candidate["category"])
            + RELEVANCE_WEIGHTS["price"] * price)


def tap_probability(query: dict, candidate: dict, position: int) -> float:
    """Probability that a user viewing `query` taps `candidate` shown at 0-based `position`.

    Examination (position bias) times attraction (a steep sigmoid of `similarity`), plus a
    small rate of curiosity taps. This produced the logged taps; the simulated A/B test
    replays it against served recommendations.
    """
    examine = (1.0 + position) ** -POSITION_EXPONENT
    attract = 1.0 / (1.0 + math.exp(-STEEPNESS * (similarity(query, candidate) - MIDPOINT)))
    return examine * (NOISE_TAP + (1.0 - NOISE_TAP) * attract)


def load_hidden(out_dir: str | Path) -> dict[str, dict]:
    """`hidden/items.jsonl` of a generated marketplace: item_id -> hidden attributes."""
    path = io.join(str(out_dir), "hidden", "items.jsonl")
    if not io.exists(path):
        raise UserError(f"no hidden ground truth at {path} (not a `visrec demo-data` directory?)")
    return {row["item_id"]: row for row in io.read_jsonl(path)}


# ---------------------------------------------------------------------------------------------
# Items: hidden attributes, listing fields and how the photo is taken.

@dataclass
class PhotoSpec:
    """Everything needed to render one product photo; a relisting copies and jitters it."""

    shape: str
    rgb: tuple[int, int, int]
    pattern: str
    pattern_rgb: tuple[int, int, int]
    pattern_period: float  # fraction of the image's short side
    pattern_angle: float  # degrees, relative to the object
    stretch: tuple[float, float]  # silhouette width/height factors (model variation)
    scale: float  # object half-size as a fraction of the short side
    rotation: float  # degrees
    offset: tuple[float, float]  # fraction of the short side
    size: tuple[int, int]  # (width, height) as fractions of image_size
    background: tuple[int, int, int]
    light_angle: float
    light_strength: float
    exposure: float
    noise: float  # sensor noise sigma
    jpeg_quality: int
    noise_seed: int


@dataclass
class Item:
    """One generated item: hidden truth, listing fields and photo spec."""

    index: int
    item_id: str
    category: str
    shape: str
    colour: str
    pattern: str
    pattern_colour: str
    price: int
    status: str
    title: str
    listed_at: str
    seller_id: str
    duplicate_of: str | None
    photo: PhotoSpec

    def hidden(self) -> dict:
        return {"item_id": self.item_id, "shape": self.shape, "colour": self.colour, "pattern": self.pattern,
                "pattern_colour": self.pattern_colour, "category": self.category, "price": self.price,
                "status": self.status, "duplicate_of": self.duplicate_of}

    def listing(self) -> dict:
        return {"item_id": self.item_id, "title": self.title, "image_uri": f"images/{self.item_id}.jpg",
                "category": self.category, "price": self.price, "status": self.status,
                "listed_at": self.listed_at, "seller_id": self.seller_id}


def _new_photo(rng: np.random.Generator, shape: str, colour: str, pattern: str, pattern_colour: str) -> PhotoSpec:
    aspect = rng.random()
    size = (1.0, 1.0) if aspect < 0.7 else (0.75, 1.0) if aspect < 0.85 else (1.0, 0.75)
    background = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    # A white shirt on a white sheet is realistic but says little; re-draw once if too close.
    if np.abs(np.subtract(background, COLOURS[colour][0])).sum() < 60:
        background = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    return PhotoSpec(
        shape=shape, rgb=COLOURS[colour][0], pattern=pattern, pattern_rgb=COLOURS[pattern_colour][0],
        pattern_period=float(rng.uniform(0.06, 0.12)), pattern_angle=float(_pick(rng, [0.0, 90.0, 45.0, 0.0])),
        stretch=(float(rng.uniform(0.88, 1.12)), float(rng.uniform(0.9, 1.1))),
        scale=float(rng.uniform(0.62, 0.86)), rotation=float(rng.normal(0, 8)),
        offset=(float(rng.uniform(-0.07, 0.07)), float(rng.uniform(-0.07, 0.07))), size=size,
        background=background, light_angle=float(rng.uniform(0, 2 * math.pi)),
        light_strength=float(rng.uniform(0.03, 0.2)), exposure=float(rng.uniform(0.88, 1.08)),
        noise=float(rng.uniform(1.0, 4.0)), jpeg_quality=int(rng.integers(78, 95)),
        noise_seed=int(rng.integers(2**31)))


def _rephotograph(rng: np.random.Generator, p: PhotoSpec) -> PhotoSpec:
    """The same object photographed again: small changes of pose, light and camera."""
    return dataclasses.replace(
        p, scale=p.scale * float(rng.uniform(0.94, 1.06)), rotation=p.rotation + float(rng.normal(0, 3)),
        offset=(p.offset[0] + float(rng.uniform(-0.03, 0.03)), p.offset[1] + float(rng.uniform(-0.03, 0.03))),
        light_angle=p.light_angle + float(rng.normal(0, 0.5)), exposure=p.exposure * float(rng.uniform(0.95, 1.05)),
        jpeg_quality=int(rng.integers(78, 95)), noise_seed=int(rng.integers(2**31)))


# Title vocabulary: several spellings per attribute, Japanese and English mixed as sellers do.
TYPE_WORDS = {
    "tshirt": ["Tシャツ", "半袖Tシャツ", "T-shirt", "tee", "カットソー"],
    "shirt": ["シャツ", "ブラウス", "shirt", "長袖シャツ", "blouse"],
    "dress": ["ワンピース", "dress", "ロングワンピース", "one-piece"],
    "skirt": ["スカート", "skirt", "フレアスカート"],
    "pants": ["パンツ", "pants", "スラックス", "ズボン", "trousers"],
    "handbag": ["ハンドバッグ", "handbag", "バッグ"],
    "tote": ["トートバッグ", "tote bag", "トート"],
    "backpack": ["リュック", "backpack", "バックパック"],
    "sneaker": ["スニーカー", "sneakers", "シューズ"],
    "pump": ["パンプス", "pumps", "ヒール"],
    "cap": ["キャップ", "cap", "帽子"],
    "mug": ["マグカップ", "mug", "マグ"],
    "plate": ["お皿", "plate", "プレート"],
    "vase": ["花瓶", "vase", "フラワーベース"],
}
COLOUR_WORDS = {
    "black": ["黒", "ブラック", "black"], "white": ["白", "ホワイト", "white"], "grey": ["グレー", "灰色", "gray"],
    "navy": ["ネイビー", "紺", "navy"], "blue": ["青", "ブルー", "blue"], "red": ["赤", "レッド", "red"],
    "pink": ["ピンク", "pink"], "orange": ["オレンジ", "orange"], "yellow": ["黄色", "イエロー", "yellow"],
    "green": ["緑", "グリーン", "green"], "khaki": ["カーキ", "khaki"], "purple": ["紫", "パープル", "purple"],
    "brown": ["茶色", "ブラウン", "brown"], "beige": ["ベージュ", "beige"],
}
PATTERN_WORDS = {
    "plain": ["無地", "plain"], "stripes": ["ボーダー", "ストライプ", "stripe", "striped"],
    "dots": ["ドット", "水玉", "polka dot", "dots"], "checks": ["チェック", "ギンガムチェック", "check", "plaid"],
}
BRANDS = ["KOHARU", "Asagi&Co", "mono label", "SORAMIMI", "ひなた工房", "NORD LINE", "ミナモ", "Tsumugi",
          "URBAN PARK", "kinari"]
CONDITIONS = ["美品", "新品未使用", "未使用に近い", "中古", "USED", "used", "タグ付き", "good condition"]
SIZES = {"clothes": ["S", "M", "L", "XL", "フリーサイズ", "Mサイズ"], "shoes": ["23.5cm", "24cm", "25cm", "26.5cm", "27cm"]}
EXTRAS = ["送料無料", "即購入OK", "お値下げ", "最終価格", "匿名配送", "美品です", "人気"]
UNINFORMATIVE = ["お値下げしました！", "まとめ売り", "断捨離中", "used item", "お譲りします", "最終値下げ",
                 "sale!!", "お気に入りでした", "出品テスト", "早い者勝ち"]
# Reserved listings: the title is a message to one buyer (the paper excludes them from training).
RESERVED_TEMPLATES = ["専用 {n}様", "{n}様専用 お取り置き", "{n}さま専用", "【{n}様専用】", "{n}様 専用ページ",
                      "専用出品 {n}様 ご確認お願いします", "{n}様 おまとめ専用", "{n}様専用です。購入お待ちしております"]
BUYER_NAMES = ["○○", "〇〇", "さくら", "ゆき", "はるか", "みー", "Aki", "田中", "佐藤", "mii", "ゆうこ", "ken", "りな"]


def _typo(rng: np.random.Generator, word: str) -> str:
    """Drop, double or swap one letter of an ASCII word, as hurried sellers do."""
    if len(word) < 4 or not (word.isascii() and word.isalpha()):
        return word
    i = int(rng.integers(1, len(word) - 1))
    kind = int(rng.integers(3))
    if kind == 0:
        return word[:i] + word[i + 1:]
    if kind == 1:
        return word[:i] + word[i] + word[i:]
    return word[:i - 1] + word[i] + word[i - 1] + word[i + 1:]


def _title(rng: np.random.Generator, shape: str, colour: str, pattern: str, status: str, relist: bool) -> str:
    if status == "reserved":
        return _pick(rng, RESERVED_TEMPLATES).format(n=_pick(rng, BUYER_NAMES))
    if rng.random() < 0.08:
        return _pick(rng, UNINFORMATIVE) + ("" if rng.random() < 0.5 else f" {int(rng.integers(1, 20))}")
    # Sellers sometimes name the wrong colour (lighting, or just a different word for it).
    said_colour = colour if rng.random() > 0.08 else _pick(rng, _COLOUR_NAMES)
    words: list[str] = []
    if rng.random() < 0.5:
        words.append(_pick(rng, BRANDS))
    attributes = []
    if rng.random() < 0.7:
        attributes.append(_pick(rng, COLOUR_WORDS[said_colour]))
    if rng.random() < (0.7 if pattern != "plain" else 0.2):
        attributes.append(_pick(rng, PATTERN_WORDS[pattern]))
    if rng.random() < 0.85:
        attributes.append(_pick(rng, TYPE_WORDS[shape]))
    if rng.random() < 0.3:
        rng.shuffle(attributes)
    words.extend(attributes)
    if shape in ("tshirt", "shirt", "dress", "skirt", "pants") and rng.random() < 0.4:
        words.append(_pick(rng, SIZES["clothes"]))
    if shape in ("sneaker", "pump") and rng.random() < 0.5:
        words.append(_pick(rng, SIZES["shoes"]))
    if rng.random() < 0.6:
        words.append(_pick(rng, CONDITIONS))
    if rng.random() < 0.3:
        words.append(_pick(rng, EXTRAS))
    words = [_typo(rng, w) if rng.random() < 0.12 else w for w in words] or [_pick(rng, UNINFORMATIVE)]
    title = " ".join(words)
    if rng.random() < 0.2:
        title = f"【{_pick(rng, CONDITIONS)}】{title}"
    return f"再出品 {title}" if relist and rng.random() < 0.5 else title


def _price(rng: np.random.Generator, category: str) -> int:
    _, median, sigma, _ = CATEGORIES[category]
    return max(300, int(round(median * math.exp(rng.normal(0, sigma)), -1)))


def make_items(config: DemoDataConfig) -> list[Item]:
    """All items, each drawn from `(seed, index)`; a relisting copies an earlier item's object."""
    items: list[Item] = []
    ids: set[str] = set()
    originals: dict[str, Item] = {}
    for i in range(config.items):
        rng = _rng(config.seed, _ITEM, i)
        item_id = f"m{int(rng.integers(10**10, 10**11))}"
        while item_id in ids:
            item_id = f"m{int(rng.integers(10**10, 10**11))}"
        ids.add(item_id)
        status = _choice(rng, STATUSES)
        listed_at = LISTED_FROM + timedelta(seconds=int(rng.integers(LISTING_DAYS * 86400)))
        original = items[int(rng.integers(i))] if i > 0 and rng.random() < DUPLICATE_RATE else None
        if original is not None:
            original = originals.get(original.duplicate_of, original)  # the object's first listing
            category, shape, colour = original.category, original.shape, original.colour
            pattern, pattern_colour = original.pattern, original.pattern_colour
            price = max(300, int(round(original.price * rng.uniform(0.85, 1.0), -1)))
            photo = _rephotograph(rng, original.photo)
            seller_id = original.seller_id
        else:
            category = _choice(rng, CATEGORIES)
            shape = CATEGORIES[category][0]
            colour = _choice(rng, COLOURS)
            pattern = _choice(rng, PATTERNS)
            pattern_colour = _pick(rng, [c for c in _COLOUR_NAMES if _COLOUR_SIM[_COLOUR_INDEX[c], _COLOUR_INDEX[colour]] < 0.3])
            price = _price(rng, category)
            photo = _new_photo(rng, shape, colour, pattern, pattern_colour)
            seller_id = f"u{int(rng.integers(10**8, 10**9))}"
        item = Item(
            index=i, item_id=item_id, category=category, shape=shape, colour=colour, pattern=pattern,
            pattern_colour=pattern_colour, price=price, status=status,
            title=_title(rng, shape, colour, pattern, status, original is not None),
            listed_at=listed_at.isoformat(), seller_id=seller_id,
            duplicate_of=original.item_id if original is not None else None, photo=photo)
        items.append(item)
        if original is None:
            originals[item_id] = item
    return items


# ---------------------------------------------------------------------------------------------
# Rendering: silhouettes as polygons in object coordinates ([-1, 1], y down), then pattern,
# shading, shadow, lighting gradient, sensor noise and JPEG.

Polygon = list[tuple[float, float]]


def _ellipse(cx: float, cy: float, rx: float, ry: float, a0: float = 0.0, a1: float = 2 * math.pi,
             n: int = 28) -> Polygon:
    return [(cx + rx * math.cos(a), cy + ry * math.sin(a)) for a in np.linspace(a0, a1, n)]


def _band(cx: float, cy: float, rx: float, ry: float, a0: float, a1: float, width: float) -> Polygon:
    """An elliptical arc of the given width (bag handles, mug handles, plate rims)."""
    return _ellipse(cx, cy, rx, ry, a0, a1) + _ellipse(cx, cy, rx - width, ry - width, a1, a0)


def _rect(x0: float, y0: float, x1: float, y1: float) -> Polygon:
    return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]


def _mirror(half: Polygon) -> Polygon:
    """A left-right symmetric outline from its right half (top to bottom)."""
    return half + [(-x, y) for x, y in reversed(half)]


def silhouette(shape: str) -> dict[str, list[Polygon]]:
    """Polygons per layer: `body` (patterned), `dark` and `light` (solid details drawn on top)."""
    if shape == "tshirt":
        body = [_mirror([(0.13, -0.82), (0.36, -0.8), (0.82, -0.5), (0.64, -0.24), (0.43, -0.36), (0.43, 0.86)])]
        return {"body": body, "dark": [_band(0, -0.82, 0.14, 0.13, 0, math.pi, 0.04)], "light": []}
    if shape == "shirt":
        body = [_mirror([(0.1, -0.86), (0.32, -0.84), (0.62, -0.6), (0.8, 0.55), (0.6, 0.6), (0.46, -0.2),
                         (0.43, 0.86)])]
        collar = [[(-0.02, -0.7), (-0.2, -0.66), (-0.12, -0.88)], [(0.02, -0.7), (0.2, -0.66), (0.12, -0.88)]]
        buttons = [_ellipse(0, y, 0.025, 0.025, n=8) for y in (-0.5, -0.2, 0.1, 0.4, 0.7)]
        return {"body": body, "dark": buttons, "light": collar}
    if shape == "dress":
        body = [_mirror([(0.16, -0.86), (0.3, -0.62), (0.22, -0.1), (0.66, 0.86)])]
        return {"body": body, "dark": [_rect(-0.23, -0.14, 0.23, -0.06)], "light": []}
    if shape == "skirt":
        body = [_mirror([(0.44, -0.62), (0.78, 0.76)])]
        return {"body": body, "dark": [_rect(-0.46, -0.74, 0.46, -0.58)], "light": []}
    if shape == "pants":
        legs = [(0.46, -0.84), (0.52, 0.9), (0.12, 0.9), (0.0, -0.3), (-0.12, 0.9), (-0.52, 0.9), (-0.46, -0.84)]
        return {"body": [legs], "dark": [_rect(-0.47, -0.9, 0.47, -0.78)], "light": []}
    if shape == "handbag":
        body = [_mirror([(0.58, -0.15), (0.76, 0.72)]), _band(0, -0.12, 0.38, 0.58, math.pi, 2 * math.pi, 0.09)]
        return {"body": body, "dark": [], "light": [_rect(-0.08, 0.0, 0.08, 0.12)]}
    if shape == "tote":
        handles = [_band(x, -0.28, 0.17, 0.5, math.pi, 2 * math.pi, 0.05) for x in (-0.24, 0.24)]
        return {"body": [_rect(-0.62, -0.3, 0.62, 0.82)] + handles, "dark": [], "light": []}
    if shape == "backpack":
        top = _ellipse(0, -0.35, 0.55, 0.45, math.pi, 2 * math.pi)
        body = [top + [(0.55, 0.85), (-0.55, 0.85)], _band(0, -0.78, 0.14, 0.14, math.pi, 2 * math.pi, 0.05)]
        pocket = _ellipse(0, 0.15, 0.38, 0.2, math.pi, 2 * math.pi) + [(0.38, 0.62), (-0.38, 0.62)]
        return {"body": body, "dark": [pocket], "light": []}
    if shape == "sneaker":
        upper = [(-0.86, 0.3), (-0.82, -0.12), (-0.45, -0.22), (-0.1, -0.48), (0.16, -0.48), (0.32, -0.16),
                 (0.82, 0.04), (0.92, 0.3)]
        laces = [_rect(x - 0.02, y - 0.1, x + 0.02, y + 0.1) for x, y in ((-0.05, -0.3), (0.08, -0.22), (0.2, -0.12))]
        return {"body": [upper], "dark": laces, "light": [_rect(-0.9, 0.26, 0.95, 0.44)]}
    if shape == "pump":
        shoe = [(-0.86, 0.2), (-0.6, -0.16), (-0.1, -0.04), (0.52, -0.34), (0.8, -0.36), (0.76, 0.02),
                (0.7, 0.58), (0.6, 0.58), (0.52, 0.16), (0.2, 0.3), (-0.86, 0.32)]
        return {"body": [shoe], "dark": [_rect(-0.84, 0.28, 0.2, 0.34)], "light": []}
    if shape == "cap":
        dome = _ellipse(-0.1, 0.2, 0.62, 0.66, math.pi, 2 * math.pi)
        visor = _ellipse(0.5, 0.2, 0.46, 0.1)
        return {"body": [dome, visor], "dark": [_ellipse(-0.1, -0.46, 0.06, 0.04, n=10)], "light": []}
    if shape == "mug":
        body = [_rect(-0.52, -0.6, 0.36, 0.7), _band(0.36, 0.02, 0.32, 0.34, -math.pi / 2, math.pi / 2, 0.1)]
        return {"body": body, "dark": [], "light": [_ellipse(-0.08, -0.6, 0.44, 0.07)]}
    if shape == "plate":
        return {"body": [_ellipse(0, 0, 0.92, 0.6)], "dark": [_band(0, 0, 0.62, 0.4, 0, 2 * math.pi, 0.03)],
                "light": []}
    if shape == "vase":
        ys = np.linspace(-0.9, 0.86, 18)
        half = [(0.14 + 0.36 * math.sin(math.pi * (y + 0.9) / 1.76) ** 1.5, float(y)) for y in ys]
        return {"body": [_mirror(half)], "dark": [_rect(-0.17, -0.92, 0.17, -0.84)], "light": []}
    raise ValueError(f"unknown shape {shape!r}")


_SILHOUETTES = {shape: silhouette(shape) for shape, *_ in CATEGORIES.values()}
_SUPERSAMPLE = 2  # masks are drawn at 2x and box-filtered down: anti-aliased edges


Silhouette = dict[str, list[Polygon]]


def _masks(p: PhotoSpec, width: int, height: int, layers: Silhouette) -> dict[str, np.ndarray]:
    """Anti-aliased float masks (H, W) per non-empty layer of `layers`, posed by scale, rotation, offset."""
    short = min(width, height)
    s = _SUPERSAMPLE
    cx, cy = width / 2 + p.offset[0] * short, height / 2 + p.offset[1] * short
    r = math.radians(p.rotation)
    cos, sin = math.cos(r), math.sin(r)
    half = p.scale * short / 2

    def pose(poly: Polygon) -> list[tuple[float, float]]:
        out = []
        for x, y in poly:
            x, y = x * p.stretch[0] * half, y * p.stretch[1] * half
            out.append(((cx + x * cos - y * sin) * s, (cy + x * sin + y * cos) * s))
        return out

    masks = {}
    for layer, polys in layers.items():
        if not polys:
            continue
        canvas = Image.new("L", (width * s, height * s), 0)
        draw = ImageDraw.Draw(canvas)
        for poly in polys:
            draw.polygon(pose(poly), fill=255)
        masks[layer] = np.asarray(canvas.resize((width, height), Image.BOX), dtype=np.float32) / 255.0
    return masks


def _pattern(p: PhotoSpec, width: int, height: int) -> np.ndarray | None:
    """(H, W) share of the pattern colour, in the object's frame so it turns with the object."""
    if p.pattern == "plain":
        return None
    period = max(4.0, p.pattern_period * min(width, height))
    a = math.radians(p.rotation + p.pattern_angle)
    xs = np.arange(width, dtype=np.float32)[None, :] - width / 2
    ys = np.arange(height, dtype=np.float32)[:, None] - height / 2
    u = np.mod(xs * math.cos(a) + ys * math.sin(a), period)
    if p.pattern == "stripes":
        return (u < period * 0.45).astype(np.float32)
    v = np.mod(ys * math.cos(a) - xs * math.sin(a), period)
    if p.pattern == "dots":
        u -= period / 2
        v -= period / 2
        return (u * u + v * v < (period * 0.28) ** 2).astype(np.float32)
    # gingham checks: one band gives the half tone, both bands the full tone
    return 0.5 * ((u < period / 2).astype(np.float32) + (v < period / 2).astype(np.float32))


def object_layers(p: PhotoSpec, width: int, height: int,
                  layers: Silhouette) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """(masks, drop shadow, shading) of one posed object on a `width` x `height` canvas: the shadow
    (H, W) falls to the lower right, the shading (H, W) darkens the object's edges for some volume."""
    masks = _masks(p, width, height, layers)
    body_img = Image.fromarray((masks["body"] * 255).astype(np.uint8))
    blur = max(1.0, min(width, height) / 40)
    shadow = np.asarray(body_img.transform(body_img.size, Image.AFFINE, (1, 0, -blur * 1.5, 0, 1, -blur * 2))
                        .filter(ImageFilter.GaussianBlur(blur * 2)), dtype=np.float32) * (0.35 / 255.0)
    shade = np.asarray(body_img.filter(ImageFilter.GaussianBlur(blur * 1.5)), dtype=np.float32) * (0.28 / 255.0)
    shade += 0.72
    return masks, shadow, shade


def paint_object(img: np.ndarray, p: PhotoSpec, masks: dict[str, np.ndarray], shade: np.ndarray) -> None:
    """Paint the object of `object_layers` onto `img` (H, W, 3 float32) in place: its colour and
    pattern, shaded, then the solid `dark` and `light` details."""
    width, height = img.shape[1], img.shape[0]
    base = np.array(p.rgb, dtype=np.float32)
    amount = _pattern(p, width, height)
    fabric = base if amount is None else base + amount[..., None] * (np.array(p.pattern_rgb, np.float32) - base)
    img += masks["body"][..., None] * (fabric * shade[..., None] - img)
    for layer, colour in (("dark", base * 0.5), ("light", base + 0.7 * (245.0 - base))):
        if layer in masks:
            img += masks[layer][..., None] * (colour - img)


def develop(img: np.ndarray, p: PhotoSpec) -> bytes:
    """JPEG bytes of `img` (H, W, 3 float32, modified) as `p`'s camera takes it: a lighting
    gradient and exposure, sensor noise, and its JPEG quality."""
    height, width = img.shape[:2]
    xs = (np.arange(width, dtype=np.float32) / width - 0.5) * (2 * math.cos(p.light_angle))
    ys = (np.arange(height, dtype=np.float32) / height - 0.5) * (2 * math.sin(p.light_angle))
    img *= (p.exposure * (1.0 + p.light_strength * (xs[None, :] + ys[:, None])))[..., None]
    # Luminance-only sensor noise: looks the same as per-channel noise at a third of the cost.
    noise = np.random.default_rng(p.noise_seed).standard_normal((height, width, 1), dtype=np.float32)
    noise *= p.noise
    img += noise
    np.clip(img, 0, 255, out=img)
    out = BytesIO()
    Image.fromarray(img.astype(np.uint8), "RGB").save(out, "JPEG", quality=p.jpeg_quality)
    return out.getvalue()


def render_photo(p: PhotoSpec, image_size: int) -> bytes:
    """JPEG bytes of one product photo; a pure function of the spec (same bytes every time)."""
    width, height = max(1, round(p.size[0] * image_size)), max(1, round(p.size[1] * image_size))
    masks, shadow, shade = object_layers(p, width, height, _SILHOUETTES[p.shape])
    img = (1.0 - shadow)[..., None] * np.array(p.background, dtype=np.float32)
    paint_object(img, p, masks, shade)
    return develop(img, p)


RenderTask = tuple[Callable[[Any, int], bytes], Any, int, str]  # (render function, spec, image size, path)


def _render_to_file(task: RenderTask) -> int:
    render, spec, image_size, path = task
    data = render(spec, image_size)
    Path(path).write_bytes(data)
    return len(data)


def render_files(tasks: Sequence[RenderTask], workers: int, what: str = "images") -> int:
    """Run every `(render, spec, image_size, path)` task, writing `render(spec, image_size)` to `path`,
    with `workers` processes; total bytes. Each file depends on its task alone, not on the workers."""
    progress = Progress(log, what, len(tasks), PROGRESS_EVERY_S)
    total = 0
    if workers == 1:
        for task in tasks:
            total += _render_to_file(task)
            progress.add()
        return total
    # fork: workers inherit the imported module instead of re-importing numpy and PIL.
    ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else None)
    with ctx.Pool(workers) as pool:
        chunk = max(1, min(64, len(tasks) // (workers * 8)))
        for size in pool.imap_unordered(_render_to_file, tasks, chunksize=chunk):
            total += size
            progress.add()
    return total


def render_images(items: Sequence[Item], image_dir: Path, config: DemoDataConfig) -> int:
    """Render every item's photo to `image_dir/<item_id>.jpg` with `config.workers` processes; total bytes."""
    image_dir.mkdir(parents=True, exist_ok=True)
    return render_files([(render_photo, it.photo, config.image_size, str(image_dir / f"{it.item_id}.jpg"))
                         for it in items], config.workers)


# ---------------------------------------------------------------------------------------------
# Impression logs from the old production system.

def make_interactions(items: Sequence[Item], config: DemoDataConfig) -> list[dict]:
    """Impression-log rows: per list, the old system's candidates in its order and the drawn taps.

    The old system showed a few items of the query's leaf category plus random items, ordered
    by category match, recency and popularity noise, so its order tracks the hidden relevance
    only weakly. Taps are drawn from `tap_probability`. Reserved items are never shown or queried.
    """
    visible = [it for it in items if it.status != "reserved"]
    if len(visible) < 2:
        return []
    by_category: dict[str, list[int]] = {}
    for k, it in enumerate(visible):
        by_category.setdefault(it.category, []).append(k)
    hidden = [it.hidden() for it in visible]
    listed = np.array([datetime.fromisoformat(it.listed_at).timestamp() for it in visible])
    recency = (listed - listed.min()) / max(float(np.ptp(listed)), 1.0)
    n_lists = max(1, round(config.items * config.sessions_per_item))
    n_cand = min(config.candidates_per_list, len(visible) - 1)
    rows: list[dict] = []
    progress = Progress(log, "impression lists", n_lists, PROGRESS_EVERY_S)
    for li in range(n_lists):
        rng = _rng(config.seed, _SESSION, li)
        q = int(rng.integers(len(visible)))
        same = [k for k in by_category[visible[q].category] if k != q]
        n_same = min(len(same), int(rng.integers(3, 8)), n_cand)
        chosen = [same[int(j)] for j in rng.choice(len(same), n_same, replace=False)] if n_same else []
        taken = set(chosen) | {q}
        while len(chosen) < n_cand:
            k = int(rng.integers(len(visible)))
            if k not in taken:
                taken.add(k)
                chosen.append(k)
        old_score = [OLD_CATEGORY_WEIGHT * (visible[k].category == visible[q].category)
                     + OLD_RECENCY_WEIGHT * recency[k] + rng.normal(0, OLD_NOISE) for k in chosen]
        order = [chosen[j] for j in np.argsort(old_score, kind="stable")[::-1]]
        session_id = f"s{rng.bytes(8).hex()}"
        ts = (LOGS_FROM + timedelta(seconds=int(rng.integers(LOG_DAYS * 86400)))).isoformat()
        for pos, k in enumerate(order):
            tapped = int(rng.random() < tap_probability(hidden[q], hidden[k], pos))
            rows.append({"query_item_id": visible[q].item_id, "item_id": visible[k].item_id, "position": pos,
                         "tapped": tapped, "session_id": session_id, "ts": ts})
        progress.add()
    return rows


def ranking_baselines(interactions: Sequence[dict], hidden: dict[str, dict], seed: int = 0, k: int = 5) -> dict:
    """nDCG@k of re-ranking each logged list (with >= 1 tap) by the hidden truth, at random, as logged.

    `oracle` sorts by `similarity`, `oracle_visual` by `visual_similarity` only (the best an
    image embedding alone can do); both should clearly beat `random` and `logged`.
    """
    lists: dict[tuple[str, str], list[dict]] = {}
    for row in interactions:
        lists.setdefault((row["query_item_id"], row["session_id"]), []).append(row)
    tapped_lists = [sorted(rows, key=lambda r: r["position"]) for rows in lists.values()
                    if any(r["tapped"] for r in rows)]
    if not tapped_lists:
        return {"lists": len(lists), "lists_with_tap": 0}
    m = max(len(rows) for rows in tapped_lists)
    rng = _rng(seed, _EVAL)
    orders: dict[str, list[np.ndarray]] = {"oracle": [], "oracle_visual": [], "random": [], "logged": []}
    for rows in tapped_lists:
        q = hidden[rows[0]["query_item_id"]]
        cands = [hidden[r["item_id"]] for r in rows]
        orders["oracle"].append(np.argsort([-similarity(q, c) for c in cands], kind="stable"))
        orders["oracle_visual"].append(np.argsort([-visual_similarity(q, c) for c in cands], kind="stable"))
        orders["random"].append(rng.permutation(len(rows)))
        orders["logged"].append(np.arange(len(rows)))
    out: dict[str, Any] = {"lists": len(lists), "lists_with_tap": len(tapped_lists)}
    for name, per_list in orders.items():
        rel = np.zeros((len(tapped_lists), m))
        for i, (rows, order) in enumerate(zip(tapped_lists, per_list)):
            rel[i, :len(rows)] = [rows[j]["tapped"] for j in order]
        out[f"ndcg@{k}_{name}"] = round(float(ndcg_at_k(rel, k).mean()), 4)
    return out


# ---------------------------------------------------------------------------------------------
# Corruption: bad rows for the prepare stage's dead-letter path.

def corrupt_rows(items: Sequence[Item], lines: list[str], image_dir: Path, config: DemoDataConfig) -> list[dict]:
    """Turn a `corrupt_fraction` of listing lines into bad rows, in place; one record per bad row.

    Reserved rows are left alone (so each bad row's reason is its corruption), and so is the
    first eligible row, so every duplicated id has a clean earlier row it repeats.
    """
    eligible = [it.index for it in items if it.status != "reserved"]
    n = round(config.corrupt_fraction * config.items)
    if config.corrupt_fraction > 0 and config.items >= 50:
        n = max(n, len(CORRUPTION_KINDS))
    n = min(n, len(eligible) - 1)
    if n <= 0:
        return []
    rng = _rng(config.seed, _CORRUPT)
    picked = [eligible[1:][int(j)] for j in rng.choice(len(eligible) - 1, n, replace=False)]
    clean = sorted(set(eligible) - set(picked))
    records = []
    for j, line_no in enumerate(picked):
        kind = CORRUPTION_KINDS[j % len(CORRUPTION_KINDS)]
        it = items[line_no]
        row = it.listing()
        image = image_dir / f"{it.item_id}.jpg"
        record: dict[str, Any] = {"line": line_no, "item_id": it.item_id, "kind": kind}
        if kind == "missing_image":
            image.unlink()
        elif kind == "truncated_image":
            data = image.read_bytes()  # an interrupted upload: headers intact, scan data cut short
            scan = data.find(b"\xff\xda")
            image.write_bytes(data[: scan + int((len(data) - scan) * rng.uniform(0.2, 0.7))])
        elif kind == "non_image_bytes":
            image.write_bytes(b"<!DOCTYPE html><html><body>403 Forbidden</body></html>\n"
                              if rng.random() < 0.5 else rng.bytes(512))
        elif kind == "empty_title":
            row["title"] = ""
        elif kind == "non_positive_price":
            row["price"] = _pick(rng, [0, -row["price"]])
        elif kind == "non_numeric_price":
            row["price"] = _pick(rng, ["応相談", "free", "SOLD", "n/a"])
        elif kind == "duplicate_item_id":
            earlier = [c for c in clean if c < line_no]
            original = earlier[int(rng.integers(len(earlier)))]
            row["item_id"] = items[original].item_id
            record.update(written_item_id=row["item_id"], duplicate_of_line=original)
        record["written"] = row
        line = json.dumps(row, ensure_ascii=False)
        if kind == "malformed_json":  # any strict prefix of a JSON object is invalid JSON
            line = line[: int(len(line) * rng.uniform(0.3, 0.8))]
            record["written"] = line
        lines[line_no] = line
        records.append(record)
    return records


# ---------------------------------------------------------------------------------------------

def _readme(config: DemoDataConfig, summary: dict) -> str:
    leaves = "\n".join(f"  {path:28s} silhouette={shape:9s} median price {median:>6,d} JPY, log-sd {sigma}"
                       for path, (shape, median, sigma, _) in CATEGORIES.items())
    return f"""Synthetic second-hand marketplace generated by `visrec demo-data` (visrec.sim.demo_data).

Config: {json.dumps({k: v for k, v in dataclasses.asdict(config).items() if k != 'workers'})}
(the output does not depend on `workers`; the same seed and config give the same bytes.)

Files
  listings.jsonl      listings per docs/data-contract.md (+ seller_id, an extra column stages ignore)
  images/<id>.jpg     product photos, longest side {config.image_size} px (some 3:4 or 4:3)
  interactions.jsonl  impression logs: one row per shown candidate; a list = (query_item_id, session_id)
  hidden/items.jsonl  the ground truth per item: shape, colour, pattern, pattern_colour, category,
                      price, status, duplicate_of (the item a relisting re-photographs, else null)
  hidden/corruptions.jsonl  every bad row injected by --corrupt-fraction: line, item_id, kind, what was written
Stages must never read hidden/; tests and the simulated A/B test do.

Items
  Category leaf (uniform-ish weights) decides the silhouette and a log-normal price.
{leaves}
  Colour: {', '.join(COLOURS)} (black/white/navy most common). Pattern: {', '.join(PATTERNS)},
  drawn in a second, contrasting colour. Photos: background colour, drop shadow, edge shading,
  lighting gradient and exposure, scale/rotation/offset jitter, sensor noise, JPEG quality 78-94.
  {DUPLICATE_RATE:.0%} of items are relistings: the same object re-photographed with small jitter, same
  seller, price 0-15% lower, a new item_id and `duplicate_of` set.
  Titles mix Japanese and English, mention colour/pattern/item type only sometimes, name the
  wrong colour 8% of the time, have typos, and 8% say nothing about the item. Status:
  {', '.join(f'{k} {v:.0%}' for k, v in STATUSES.items())}; reserved titles are messages to a buyer
  ("専用 ○○様"), so they must not be used as descriptions.

Hidden user model (visrec.sim.demo_data.tap_probability)
  visual     = {VISUAL_WEIGHTS['shape']} * same shape + {VISUAL_WEIGHTS['colour']} * colour similarity
               + {VISUAL_WEIGHTS['pattern']} * same pattern; colour similarity = exp(-(RGB distance / {COLOUR_SCALE:g})^2)
  relevance  = {RELEVANCE_WEIGHTS['visual']} * visual + {RELEVANCE_WEIGHTS['category']} * category similarity
               (shared path depth / 3) + {RELEVANCE_WEIGHTS['price']} * exp(-|log price ratio| / {PRICE_SCALE})
  P(tap)     = (1 + position)^-{POSITION_EXPONENT} * ({NOISE_TAP} + {1 - NOISE_TAP:g} * sigmoid({STEEPNESS:g} * (relevance - {MIDPOINT})))

Logged system (what produced the impressions)
  Per list: a random non-reserved query item, 3-7 items of its leaf category and random others
  ({config.candidates_per_list} in all), ordered by {OLD_CATEGORY_WEIGHT} * same category + {OLD_RECENCY_WEIGHT} * recency + N(0, {OLD_NOISE}) noise,
  so the logged order follows relevance only weakly.

What the logs allow (nDCG@5 over the {summary['ranking'].get('lists_with_tap', 0)} lists with a tap, re-ranking each list)
  oracle (hidden relevance)  {summary['ranking'].get('ndcg@5_oracle')}
  oracle (visual part only)  {summary['ranking'].get('ndcg@5_oracle_visual')}
  logged order               {summary['ranking'].get('ndcg@5_logged')}
  random order               {summary['ranking'].get('ndcg@5_random')}

Summary: {json.dumps({k: v for k, v in summary.items() if k != 'ranking'}, ensure_ascii=False)}
"""


def _jsonl(rows: Sequence[Any]) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows)


def generate_marketplace(out_dir: str | Path, config: DemoDataConfig) -> dict:
    """Write a synthetic marketplace to `out_dir` (local or `gs://`); returns summary counts.

    Writes `listings.jsonl`, `images/<item_id>.jpg`, `interactions.jsonl`, `README.txt`,
    `hidden/items.jsonl` and `hidden/corruptions.jsonl`. Byte-identical for a seed and config.
    """
    start = time.monotonic()
    with io.output_dir(str(out_dir)) as out:
        items = make_items(config)
        image_bytes = render_images(items, out / "images", config)
        interactions = make_interactions(items, config)
        hidden = {it.item_id: it.hidden() for it in items}
        lines = [json.dumps(it.listing(), ensure_ascii=False) for it in items]
        corruptions = corrupt_rows(items, lines, out / "images", config)
        taps_per_list: dict[tuple[str, str], int] = {}
        for row in interactions:
            key = (row["query_item_id"], row["session_id"])
            taps_per_list[key] = taps_per_list.get(key, 0) + row["tapped"]
        summary: dict[str, Any] = {
            "items": len(items),
            "relistings": sum(it.duplicate_of is not None for it in items),
            "status": {s: sum(it.status == s for it in items) for s in STATUSES},
            "image_bytes": image_bytes,
            "impression_lists": len(taps_per_list),
            "impressions": len(interactions),
            "taps": sum(taps_per_list.values()),
            "lists_with_tap": sum(1 for t in taps_per_list.values() if t),
            "corrupted": {kind: sum(r["kind"] == kind for r in corruptions) for kind in CORRUPTION_KINDS
                          if any(r["kind"] == kind for r in corruptions)},
            "ranking": ranking_baselines(interactions, hidden, config.seed),
        }
        io.write_text(str(out / "listings.jsonl"), _jsonl(lines))
        io.write_text(str(out / "interactions.jsonl"), _jsonl(interactions))
        io.write_text(str(out / "hidden" / "items.jsonl"), _jsonl(list(hidden.values())))
        io.write_text(str(out / "hidden" / "corruptions.jsonl"), _jsonl(corruptions))
        io.write_text(str(out / "README.txt"), _readme(config, summary))
    seconds = time.monotonic() - start
    summary.update(seconds=round(seconds, 2), items_per_second=round(len(items) / seconds, 1))
    log.info("demo-data: %d items in %.1fs (%.0f items/s) -> %s", len(items), seconds, len(items) / seconds, out_dir)
    return summary

"""A synthetic web image-text corpus: the generic pretraining data the marketplace is not.

Real SigLIP is pretrained on web images with their alt-text and ImageNet MobileNetV2 on
photos with class labels, before either meets a marketplace. No such corpus can be
downloaded here, so the project renders its own (`visrec demo-data --kind web`): other
object classes (animals, fruit, vehicles, furniture, ...: none of the marketplace's product
silhouettes), in scenes (studio, outdoors with sky and ground, a room, a textured
backdrop), sometimes with a second, smaller object, and captions in the style of alt-text
("photo of a red striped umbrella on the beach", "赤い傘のイラスト", "IMG_4821.JPG").

What it shares with the marketplace is what a web corpus would: colour and pattern words
and what colours and patterns look like. Its palette is its own (other colour centres and
frequencies, jittered per image), its pattern periods and its seed differ, and no part of
the marketplace's hidden similarity or its titles is used.

Every image is a pure function of `(seed, index)`; the output is byte-identical for a seed
and config whatever the number of worker processes. Output: `pairs.jsonl` (one row per
image in the listings data contract, so `visrec prepare` reads it: `title` is the caption,
`category` the class path, the label classification pretraining learns; a web image has
no price, so `price` is 1 and no stage that trains on the corpus reads it),
`images/<id>.jpg`, `hidden/items.jsonl` (class, colour, pattern, scene, second object) and
`README.txt`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from visrec.core import io
from visrec.core.errors import UserError
from visrec.sim.demo_data import (LISTED_FROM, PhotoSpec, Polygon, Silhouette, _band, _ellipse, _jsonl, _mirror,
                                  _pick, _rect, develop, object_layers, paint_object, render_files)

log = logging.getLogger(__name__)

# Random streams: every draw comes from default_rng([seed, WEB_STREAM, index]); the marketplace uses 1-4,
# the study's traffic 5.
WEB_STREAM = 11
PAIRS_FILE = "pairs.jsonl"


@dataclass
class WebCorpusConfig:
    """Size and shape of the web corpus.

    items: image-caption pairs.
    seed: everything is a pure function of the seed and the config (a seed no marketplace default uses).
    image_size: longest side of the images in pixels.
    second_object_rate: share of images with a second, smaller object of another class.
    uninformative_caption_rate: share of captions that say nothing about the image (file names).
    workers: rendering processes (the output does not depend on it).
    """

    items: int = 12_000
    seed: int = 20_240_601
    image_size: int = 96
    second_object_rate: float = 0.2
    uninformative_caption_rate: float = 0.08
    workers: int = dataclasses.field(default_factory=lambda: os.cpu_count() or 1)

    def __post_init__(self) -> None:
        if self.items < 2:
            raise UserError(f"items must be >= 2, got {self.items}")
        if self.image_size < 32:
            raise UserError(f"image_size must be >= 32 px, got {self.image_size}")
        for name in ("second_object_rate", "uninformative_caption_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise UserError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.workers < 1:
            raise UserError(f"workers must be >= 1, got {self.workers}")


# ---------------------------------------------------------------------------------------------
# Classes: path (the classification label) -> (English words, Japanese words), and their outlines
# in object coordinates ([-1, 1], y down) with `body` (coloured, patterned), `dark` and `light` layers.

def _polygon(points: int, radius: float, inner: float, phase: float = -math.pi / 2) -> Polygon:
    """A star (inner < radius) or a regular polygon (inner == radius) around the origin."""
    out = []
    for k in range(2 * points):
        r = radius if k % 2 == 0 else inner
        a = phase + math.pi * k / points
        out.append((r * math.cos(a), r * math.sin(a)))
    return out


def _heart() -> Polygon:
    ts = np.linspace(0, 2 * math.pi, 40)
    return [(0.055 * 16 * math.sin(t) ** 3,
             -0.055 * (13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)) + 0.1)
            for t in ts]


def _crescent() -> Polygon:
    outer = _ellipse(0, 0, 0.8, 0.8, math.pi * 0.35, math.pi * 1.65, n=30)
    inner = _ellipse(-0.35, 0, 0.62, 0.62, math.pi * 1.55, math.pi * 0.45, n=30)
    return outer + inner


def _silhouettes() -> dict[str, Silhouette]:
    petals = [_ellipse(0.42 * math.cos(a), 0.42 * math.sin(a), 0.3, 0.3) for a in np.linspace(0, 2 * math.pi, 7)[:-1]]
    return {
        "Animals/Cat": {"body": [_ellipse(0.05, 0.35, 0.6, 0.45), _ellipse(-0.45, -0.3, 0.32, 0.3),
                                 [(-0.7, -0.45), (-0.62, -0.82), (-0.45, -0.55)],
                                 [(-0.42, -0.56), (-0.25, -0.82), (-0.2, -0.45)],
                                 _band(0.62, 0.05, 0.3, 0.5, -math.pi / 2, math.pi / 4, 0.09)],
                        "dark": [_ellipse(-0.52, -0.32, 0.04, 0.05, n=8), _ellipse(-0.36, -0.32, 0.04, 0.05, n=8)],
                        "light": []},
        "Animals/Fish": {"body": [_ellipse(-0.15, 0, 0.62, 0.36), [(0.4, 0), (0.9, -0.4), (0.9, 0.4)]],
                         "dark": [_ellipse(-0.5, -0.08, 0.06, 0.06, n=10)],
                         "light": [[(-0.1, -0.3), (0.1, -0.55), (0.25, -0.28)]]},
        "Animals/Bird": {"body": [_ellipse(0.05, 0.15, 0.55, 0.38), _ellipse(-0.5, -0.3, 0.25, 0.24),
                                  [(0.45, 0.05), (0.95, -0.15), (0.9, 0.2)]],
                         "dark": [_ellipse(0.1, 0.08, 0.32, 0.16), _ellipse(-0.55, -0.34, 0.04, 0.04, n=8)],
                         "light": [[(-0.74, -0.32), (-0.95, -0.22), (-0.72, -0.2)]]},
        "Animals/Rabbit": {"body": [_ellipse(0.1, 0.45, 0.5, 0.42), _ellipse(-0.1, -0.15, 0.3, 0.28),
                                    _ellipse(-0.22, -0.65, 0.09, 0.3), _ellipse(0.05, -0.65, 0.09, 0.3)],
                           "dark": [_ellipse(-0.2, -0.18, 0.04, 0.04, n=8)],
                           "light": [_ellipse(0.58, 0.55, 0.14, 0.14)]},
        "Fruit/Apple": {"body": [_ellipse(0, 0.12, 0.72, 0.7)],
                        "dark": [_rect(-0.04, -0.78, 0.05, -0.5)],
                        "light": [_ellipse(0.25, -0.7, 0.22, 0.09)]},
        "Fruit/Banana": {"body": [_band(0, -0.55, 0.9, 1.15, math.pi * 0.2, math.pi * 0.8, 0.32)],
                         "dark": [_ellipse(0.72, 0.15, 0.06, 0.05, n=8)], "light": []},
        "Fruit/Pear": {"body": [_ellipse(0, 0.35, 0.55, 0.52), _ellipse(0, -0.3, 0.32, 0.38)],
                       "dark": [_rect(-0.03, -0.9, 0.04, -0.62)], "light": []},
        "Vehicles/Car": {"body": [_rect(-0.9, -0.1, 0.9, 0.35), [(-0.5, -0.1), (-0.3, -0.5), (0.35, -0.5),
                                                                 (0.6, -0.1)]],
                         "dark": [_ellipse(-0.5, 0.38, 0.2, 0.2), _ellipse(0.5, 0.38, 0.2, 0.2)],
                         "light": [[(-0.38, -0.14), (-0.24, -0.42), (0.02, -0.42), (0.02, -0.14)],
                                   [(0.1, -0.14), (0.1, -0.42), (0.32, -0.42), (0.5, -0.14)]]},
        "Vehicles/Boat": {"body": [[(-0.85, 0.25), (0.85, 0.25), (0.55, 0.65), (-0.6, 0.65)],
                                   [(0.02, -0.85), (0.02, 0.18), (0.65, 0.18)]],
                          "dark": [_rect(-0.04, -0.9, 0.02, 0.25)], "light": []},
        "Vehicles/Bicycle": {"body": [_band(-0.5, 0.3, 0.36, 0.36, 0, 2 * math.pi, 0.08),
                                      _band(0.5, 0.3, 0.36, 0.36, 0, 2 * math.pi, 0.08),
                                      [(-0.5, 0.3), (-0.15, -0.3), (0.35, -0.3), (0.5, 0.3), (0.4, 0.3),
                                       (0.3, -0.18), (-0.1, -0.18), (-0.4, 0.34)]],
                             "dark": [_rect(-0.3, -0.42, -0.05, -0.34), _rect(0.3, -0.5, 0.38, -0.3)], "light": []},
        "Home/Umbrella": {"body": [_ellipse(0, 0, 0.85, 0.62, math.pi, 2 * math.pi) + [(0.85, 0.02), (-0.85, 0.02)]],
                          "dark": [_rect(-0.03, 0.0, 0.03, 0.7), _band(0.13, 0.7, 0.16, 0.16, 0, math.pi, 0.05)],
                          "light": []},
        "Home/Chair": {"body": [_rect(-0.5, 0.0, 0.5, 0.15), _rect(-0.5, -0.85, -0.36, 0.0), _rect(-0.5, 0.15, -0.4, 0.85),
                                _rect(0.4, 0.15, 0.5, 0.85)],
                       "dark": [_rect(-0.46, -0.7, -0.4, -0.2)], "light": []},
        "Home/Lamp": {"body": [[(-0.35, -0.85), (0.35, -0.85), (0.62, -0.25), (-0.62, -0.25)]],
                      "dark": [_rect(-0.04, -0.25, 0.04, 0.7), _ellipse(0, 0.75, 0.4, 0.1)], "light": []},
        "Home/Clock": {"body": [_ellipse(0, 0, 0.78, 0.78)],
                       "dark": [_band(0, 0, 0.78, 0.78, 0, 2 * math.pi, 0.07), _rect(-0.03, -0.55, 0.03, 0.0),
                                _rect(0.0, -0.03, 0.4, 0.03)],
                       "light": []},
        "Home/Bottle": {"body": [_rect(-0.3, -0.3, 0.3, 0.88), _rect(-0.12, -0.75, 0.12, -0.3),
                                 _ellipse(0, -0.3, 0.3, 0.14)],
                        "dark": [_rect(-0.14, -0.9, 0.14, -0.74)], "light": [_rect(-0.3, 0.1, 0.3, 0.4)]},
        "Places/House": {"body": [_rect(-0.6, -0.15, 0.6, 0.8), [(-0.8, -0.12), (0.0, -0.85), (0.8, -0.12)]],
                         "dark": [_rect(-0.12, 0.35, 0.12, 0.8)], "light": [_rect(0.25, 0.05, 0.45, 0.25)]},
        "Plants/Tree": {"body": [_ellipse(0, -0.3, 0.62, 0.55)], "dark": [_rect(-0.1, 0.2, 0.1, 0.88)],
                        "light": []},
        "Plants/Flower": {"body": petals, "dark": [_ellipse(0, 0, 0.22, 0.22)], "light": []},
        "Shapes/Star": {"body": [_polygon(5, 0.9, 0.38)], "dark": [], "light": []},
        "Shapes/Heart": {"body": [_heart()], "dark": [], "light": []},
        "Shapes/Moon": {"body": [_crescent()], "dark": [], "light": []},
        "Toys/Balloon": {"body": [_ellipse(0, -0.25, 0.5, 0.6)], "dark": [_rect(-0.015, 0.35, 0.015, 0.95)],
                         "light": [_ellipse(-0.18, -0.5, 0.08, 0.14)]},
        "Toys/Kite": {"body": [[(0, -0.9), (0.5, -0.2), (0, 0.45), (-0.5, -0.2)]],
                      "dark": [_rect(-0.015, 0.45, 0.015, 0.95), _rect(-0.5, -0.22, 0.5, -0.18)], "light": []},
        "Music/Guitar": {"body": [_ellipse(0, 0.45, 0.45, 0.42), _ellipse(0, -0.05, 0.33, 0.3), _rect(-0.07, -0.9, 0.07, 0)],
                         "dark": [_ellipse(0, 0.3, 0.12, 0.12), _rect(-0.1, -0.95, 0.1, -0.8)], "light": []},
    }


WEB_SILHOUETTES: dict[str, Silhouette] = _silhouettes()
CLASS_WORDS: dict[str, tuple[list[str], list[str]]] = {
    "Animals/Cat": (["cat", "kitten"], ["猫", "ねこ"]),
    "Animals/Fish": (["fish"], ["魚", "さかな"]),
    "Animals/Bird": (["bird"], ["鳥", "小鳥"]),
    "Animals/Rabbit": (["rabbit", "bunny"], ["うさぎ"]),
    "Fruit/Apple": (["apple"], ["りんご"]),
    "Fruit/Banana": (["banana"], ["バナナ"]),
    "Fruit/Pear": (["pear"], ["洋梨"]),
    "Vehicles/Car": (["car"], ["車", "自動車"]),
    "Vehicles/Boat": (["boat", "sailboat"], ["ヨット", "船"]),
    "Vehicles/Bicycle": (["bicycle", "bike"], ["自転車"]),
    "Home/Umbrella": (["umbrella"], ["傘"]),
    "Home/Chair": (["chair"], ["椅子", "イス"]),
    "Home/Lamp": (["lamp"], ["ランプ"]),
    "Home/Clock": (["clock"], ["時計"]),
    "Home/Bottle": (["bottle"], ["ボトル", "瓶"]),
    "Places/House": (["house"], ["家"]),
    "Plants/Tree": (["tree"], ["木"]),
    "Plants/Flower": (["flower"], ["花"]),
    "Shapes/Star": (["star"], ["星"]),
    "Shapes/Heart": (["heart"], ["ハート"]),
    "Shapes/Moon": (["moon"], ["月", "三日月"]),
    "Toys/Balloon": (["balloon"], ["風船"]),
    "Toys/Kite": (["kite"], ["凧", "カイト"]),
    "Music/Guitar": (["guitar"], ["ギター"]),
}
CLASSES = tuple(WEB_SILHOUETTES)

# The web's palette: its own colour centres and frequencies (not the marketplace's), jittered per
# image. name -> (RGB, weight, English words, Japanese words).
PALETTE: dict[str, tuple[tuple[int, int, int], float, list[str], list[str]]] = {
    "red": ((214, 40, 40), 1.3, ["red"], ["赤", "赤い", "レッド"]),
    "orange": ((245, 140, 30), 1.0, ["orange"], ["オレンジ", "橙色"]),
    "yellow": ((245, 215, 40), 1.1, ["yellow"], ["黄色", "黄色い", "イエロー"]),
    "green": ((60, 160, 60), 1.2, ["green"], ["緑", "緑色", "グリーン"]),
    "teal": ((20, 140, 140), 0.5, ["teal", "turquoise"], ["青緑", "ターコイズ"]),
    "blue": ((40, 90, 220), 1.3, ["blue"], ["青", "青い", "ブルー"]),
    "purple": ((130, 60, 170), 0.8, ["purple", "violet"], ["紫", "パープル"]),
    "pink": ((245, 130, 180), 0.9, ["pink"], ["ピンク"]),
    "brown": ((120, 75, 40), 0.9, ["brown"], ["茶色", "ブラウン"]),
    "black": ((25, 25, 28), 0.8, ["black"], ["黒", "黒い", "ブラック"]),
    "white": ((242, 242, 238), 0.8, ["white"], ["白", "白い", "ホワイト"]),
    "grey": ((140, 140, 145), 0.6, ["grey", "gray"], ["グレー", "灰色"]),
}
COLOUR_JITTER = 14.0  # per-channel sd of an image's colour around its name's centre
PATTERNS: dict[str, tuple[float, list[str], list[str]]] = {
    "plain": (0.55, [], []),
    "stripes": (0.17, ["striped", "stripy"], ["ストライプ", "しましま", "縞模様の"]),
    "dots": (0.14, ["polka dot", "spotted", "dotted"], ["水玉", "ドット柄の"]),
    "checks": (0.14, ["checkered", "checked", "plaid"], ["チェック柄の", "格子柄の"]),
}
# Scenes: name -> (weight, English phrases, Japanese phrases).
SCENES: dict[str, tuple[float, list[str], list[str]]] = {
    "studio": (0.35, ["on a white background", "isolated", "studio shot"], ["白背景", "シンプル背景"]),
    "outdoor": (0.3, ["outdoors", "in the park", "under a blue sky", "on the beach"], ["屋外", "公園で", "青空"]),
    "indoor": (0.2, ["indoors", "in the living room", "on the floor"], ["室内", "部屋の中", "インテリア"]),
    "texture": (0.15, ["on a colorful background", "abstract background"], ["カラフルな背景"]),
}
EN_TEMPLATES = ["{a} {thing}", "photo of {a} {thing}", "{a} {thing} {scene}", "a picture of {a} {thing}",
                "stock photo: {a} {thing}", "{thing} illustration", "close-up of {a} {thing}",
                "cute {thing} {scene}", "{thing}"]
JA_TEMPLATES = ["{thing}", "{thing}の写真", "{thing}のイラスト", "{scene} {thing}", "かわいい{thing}",
                "{thing} 画像", "{thing}の素材"]
UNINFORMATIVE = ["IMG_{n}.JPG", "DSC{n}.jpg", "image", "untitled", "photo {n}", "写真", "画像 {n}", "download",
                 "スクリーンショット"]


def _weighted(rng: np.random.Generator, weights: dict[str, float]) -> str:
    """A key of `weights` drawn with probability proportional to its value."""
    keys = list(weights)
    w = np.array(list(weights.values()), dtype=np.float64)
    return keys[int(rng.choice(len(keys), p=w / w.sum()))]


_COLOUR_WEIGHTS = {name: v[1] for name, v in PALETTE.items()}
_PATTERN_WEIGHTS = {name: v[0] for name, v in PATTERNS.items()}
_SCENE_WEIGHTS = {name: v[0] for name, v in SCENES.items()}


@dataclass
class WebObject:
    """One object of a web image: its class and the photo parameters it is drawn with."""

    label: str
    colour: str
    photo: PhotoSpec


@dataclass
class WebImage:
    """One pair of the corpus: the scene, its main object (the label), an optional second object,
    the caption and the camera (light, noise, JPEG: the main object's `PhotoSpec`)."""

    index: int
    item_id: str
    scene: str
    scene_rgb: tuple[tuple[int, int, int], tuple[int, int, int]]
    horizon: float  # outdoor and indoor scenes: where the upper colour ends, as a fraction of the height
    texture_seed: int
    main: WebObject
    second: WebObject | None
    caption: str

    def hidden(self) -> dict:
        return {"item_id": self.item_id, "label": self.main.label, "colour": self.main.colour,
                "pattern": self.main.photo.pattern, "scene": self.scene,
                "second_label": self.second.label if self.second else None}

    def pair(self) -> dict:
        """The listings-contract row `visrec prepare` reads (`price` 1: a web image has none)."""
        return {"item_id": self.item_id, "title": self.caption, "image_uri": f"images/{self.item_id}.jpg",
                "category": self.main.label, "price": 1, "status": "on_sale", "listed_at": LISTED_FROM.isoformat()}


def _jittered(rng: np.random.Generator, colour: str) -> tuple[int, int, int]:
    rgb = np.array(PALETTE[colour][0], dtype=np.float64) + rng.normal(0, COLOUR_JITTER, 3)
    return tuple(int(v) for v in np.clip(rgb, 0, 255))


def _object(rng: np.random.Generator, label: str, scale: tuple[float, float],
            offset: float) -> WebObject:
    colour = _weighted(rng, _COLOUR_WEIGHTS)
    pattern = _weighted(rng, _PATTERN_WEIGHTS)
    others = [c for c in PALETTE if c != colour]
    photo = PhotoSpec(
        shape=label, rgb=_jittered(rng, colour), pattern=pattern, pattern_rgb=_jittered(rng, _pick(rng, others)),
        pattern_period=float(rng.uniform(0.08, 0.16)), pattern_angle=float(rng.uniform(0, 180)),
        stretch=(float(rng.uniform(0.85, 1.15)), float(rng.uniform(0.85, 1.15))),
        scale=float(rng.uniform(*scale)), rotation=float(rng.normal(0, 8)),
        offset=(float(rng.uniform(-offset, offset)), float(rng.uniform(-offset, offset))), size=(1.0, 1.0),
        background=(0, 0, 0), light_angle=float(rng.uniform(0, 2 * math.pi)),
        light_strength=float(rng.uniform(0.0, 0.3)), exposure=float(rng.uniform(0.8, 1.15)),
        noise=float(rng.uniform(1.0, 6.0)), jpeg_quality=int(rng.integers(60, 95)),
        noise_seed=int(rng.integers(2**31)))
    return WebObject(label, colour, photo)


def _article(phrase: str) -> str:
    return "an" if phrase[:1] in tuple("aeiou") else "a"


def _caption(rng: np.random.Generator, image: WebImage, uninformative_rate: float) -> str:
    """Alt-text: English or Japanese, naming the class, often its colour, sometimes its pattern,
    the scene or the second object; some captions are file names."""
    if rng.random() < uninformative_rate:
        return _pick(rng, UNINFORMATIVE).format(n=int(rng.integers(100, 10_000)))
    main, english = image.main, rng.random() < 0.6
    lang = 0 if english else 1
    adjectives = []
    if rng.random() < 0.5:
        adjectives.append(_pick(rng, PALETTE[main.colour][2 + lang]))
    pattern_words = PATTERNS[main.photo.pattern][1 + lang]
    if pattern_words and rng.random() < 0.5:
        adjectives.append(_pick(rng, pattern_words))
    noun = _pick(rng, CLASS_WORDS[main.label][lang]) if rng.random() < 0.97 else ""
    scene = _pick(rng, SCENES[image.scene][1 + lang]) if rng.random() < 0.4 else ""
    second = _pick(rng, CLASS_WORDS[image.second.label][lang]) if image.second and rng.random() < 0.4 else ""
    if english:
        thing = " ".join(adjectives + [noun]).strip() + (f" and {_article(second)} {second}" if second else "")
        text = _pick(rng, EN_TEMPLATES).format(a=_article(thing), thing=thing, scene=scene)
    else:  # 赤い + ストライプの + 傘: adjectives end in い or take の
        thing = "".join(a if a.endswith(("い", "の")) else a + "の" for a in adjectives) + noun
        thing = (thing[:-1] if thing.endswith("の") else thing) + (f"と{second}" if second else "")
        text = _pick(rng, JA_TEMPLATES).format(thing=thing, scene=scene)
    text = " ".join(text.split())
    return text or _pick(rng, UNINFORMATIVE).format(n=int(rng.integers(100, 10_000)))


def make_web_images(config: WebCorpusConfig) -> list[WebImage]:
    """Every pair of the corpus, each drawn from `(seed, index)` alone."""
    images = []
    for i in range(config.items):
        rng = np.random.default_rng([config.seed, WEB_STREAM, i])
        label = CLASSES[int(rng.integers(len(CLASSES)))]
        scene = _weighted(rng, _SCENE_WEIGHTS)
        scene_rgb = (_jittered(rng, _pick(rng, list(PALETTE))), _jittered(rng, _pick(rng, list(PALETTE))))
        if scene == "studio":
            scene_rgb = ((int(rng.integers(225, 255)),) * 3, scene_rgb[1])
        elif scene == "outdoor":  # sky above, grass or sand below
            scene_rgb = (_jittered(rng, _pick(rng, ["blue", "teal", "white", "grey"])),
                         _jittered(rng, _pick(rng, ["green", "brown", "yellow"])))
        main = _object(rng, label, (0.6, 0.85), 0.1)
        second = None
        if rng.random() < config.second_object_rate:
            other = CLASSES[int(rng.integers(len(CLASSES) - 1))]
            other = other if other != label else CLASSES[-1]
            second = _object(rng, other, (0.16, 0.26), 0.0)
            corner = (_pick(rng, [-1.0, 1.0]) * 0.32, _pick(rng, [-1.0, 1.0]) * 0.32)
            second.photo = dataclasses.replace(second.photo, offset=corner)
        image = WebImage(index=i, item_id=f"w{i:07d}", scene=scene, scene_rgb=scene_rgb,
                         horizon=float(rng.uniform(0.45, 0.75)), texture_seed=int(rng.integers(2**31)),
                         main=main, second=second, caption="")
        image.caption = _caption(rng, image, config.uninformative_caption_rate)
        images.append(image)
    return images


def _background(image: WebImage, size: int) -> np.ndarray:
    """(size, size, 3) float32 scene: flat studio, sky over ground, wall over floor, or a blotchy texture."""
    upper, lower = (np.array(c, dtype=np.float32) for c in image.scene_rgb)
    if image.scene == "studio":
        return np.broadcast_to(upper, (size, size, 3)).copy()
    if image.scene == "texture":
        grid = np.random.default_rng(image.texture_seed).random((4, 4, 1), dtype=np.float32)
        blend = np.asarray(Image.fromarray((grid[..., 0] * 255).astype(np.uint8)).resize((size, size),
                                                                                           Image.BICUBIC),
                           dtype=np.float32)[..., None] / 255.0
        return upper + blend * (lower - upper)
    rows = (np.arange(size, dtype=np.float32) / size)[:, None, None]
    sky = upper * (0.85 + 0.3 * rows) if image.scene == "outdoor" else upper
    return np.where(rows < image.horizon, sky, lower * np.ones((1, size, 1), dtype=np.float32)).astype(np.float32)


def render_web_image(image: WebImage, image_size: int) -> bytes:
    """JPEG bytes of one corpus image; a pure function of `image` (same bytes every time)."""
    img = _background(image, image_size)
    for obj in ([image.second] if image.second else []) + [image.main]:
        masks, shadow, shade = object_layers(obj.photo, image_size, image_size, WEB_SILHOUETTES[obj.label])
        img *= (1.0 - shadow)[..., None]
        paint_object(img, obj.photo, masks, shade)
    return develop(img, image.main.photo)


def _readme(config: WebCorpusConfig, summary: dict) -> str:
    return f"""Synthetic web image-text corpus generated by `visrec demo-data --kind web` (visrec.sim.web_corpus).

Config: {json.dumps({k: v for k, v in dataclasses.asdict(config).items() if k != 'workers'})}
(the output does not depend on `workers`; the same seed and config give the same bytes.)

Files
  {PAIRS_FILE}         one row per image in the listings data contract (docs/data-contract.md), so
                      `visrec prepare` reads it: title = the caption (alt-text), category = the class
                      (the label of classification pretraining), price = 1 (a web image has none;
                      nothing trained on the corpus reads it), status on_sale
  images/<id>.jpg     {config.image_size} px square
  hidden/items.jsonl  per image: label, colour, pattern, scene, second_label

Classes ({len(CLASSES)}): {', '.join(CLASSES)}
Colours: {', '.join(PALETTE)} (jittered per image, sd {COLOUR_JITTER:g} per channel)
Patterns: {', '.join(PATTERNS)}; scenes: {', '.join(SCENES)}; {config.second_object_rate:.0%} of images
have a second, smaller object of another class; {config.uninformative_caption_rate:.0%} of captions are file names.

Summary: {json.dumps(summary, ensure_ascii=False)}
"""


def generate_web_corpus(out_dir: str | Path, config: WebCorpusConfig) -> dict:
    """Write the web corpus to `out_dir` (local or `gs://`); returns summary counts.

    Writes `pairs.jsonl`, `images/<id>.jpg`, `hidden/items.jsonl` and `README.txt`.
    Byte-identical for a seed and config.
    """
    start = time.monotonic()
    with io.output_dir(str(out_dir)) as out:
        images = make_web_images(config)
        (out / "images").mkdir(parents=True, exist_ok=True)
        image_bytes = render_files([(render_web_image, im, config.image_size, str(out / "images" / f"{im.item_id}.jpg"))
                                    for im in images], config.workers, "web images")
        summary = {"items": len(images), "image_bytes": image_bytes,
                   "classes": {c: sum(im.main.label == c for im in images) for c in CLASSES},
                   "scenes": {s: sum(im.scene == s for im in images) for s in SCENES},
                   "second_objects": sum(im.second is not None for im in images)}
        io.write_text(str(out / PAIRS_FILE), _jsonl([im.pair() for im in images]))
        io.write_text(str(out / "hidden" / "items.jsonl"), _jsonl([im.hidden() for im in images]))
        io.write_text(str(out / "README.txt"), _readme(config, summary))
    summary["seconds"] = round(time.monotonic() - start, 2)
    log.info("web corpus: %d images in %.1fs -> %s", len(images), summary["seconds"], out_dir)
    return summary

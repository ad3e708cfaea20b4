"""Random scenes: coloured boxes and circles and one short word on a plain background, at many aspect
ratios. A scene is data (:class:`Scene`) first and pixels second (:func:`render_scene`), so captions and
answers are derived from exactly what was drawn. Deterministic given a ``random.Random``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal

from PIL import Image, ImageDraw, ImageFont

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 200, 30),
    "purple": (140, 60, 170),
    "orange": (245, 130, 30),
}
WORDS = ("cat", "sun", "tree", "map", "boat", "lamp", "frog", "kite", "star", "milk", "door", "bell")
BACKGROUND = (250, 250, 250)
FONT_NAME = "DejaVuSans.ttf"

# (width, height) choices: square, wide, tall and extreme strips, so plans vary from 1 piece to many slices.
DEFAULT_SIZES: tuple[tuple[int, int], ...] = (
    (224, 224),
    (336, 224),
    (224, 336),
    (448, 224),
    (224, 448),
    (448, 336),
    (336, 448),
    (560, 280),
    (280, 560),
    (672, 224),
    (224, 672),
    (448, 448),
    (160, 120),
    (96, 320),
)
_MIN_SHAPE, _SHAPE_FRACTION = 12, 0.22  # a shape's side: at least 12 px, at most 22% of the short side
_MAX_PLACEMENT_TRIES = 200
_WORD_HEIGHT_FRACTION = 0.14  # the word's font size relative to the short side

ShapeKind = Literal["box", "circle"]


@dataclass(frozen=True)
class Shape:
    kind: ShapeKind
    colour: str
    box: tuple[int, int, int, int]  # (left, top, right, bottom)


@dataclass(frozen=True)
class Scene:
    """What one synthetic image shows; ``word_box`` is where the word was drawn."""

    width: int
    height: int
    shapes: tuple[Shape, ...]
    word: str
    word_box: tuple[int, int, int, int]

    def count(self, kind: ShapeKind, colour: str | None = None) -> int:
        return sum(1 for s in self.shapes if s.kind == kind and (colour is None or s.colour == colour))


def _overlaps(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(FONT_NAME, size)


def make_scene(rng: random.Random, size: tuple[int, int], max_shapes: int = 5) -> Scene:
    """Draw a scene's contents: the word first (it needs the most room), then 1..max_shapes shapes."""
    width, height = size
    short = min(width, height)
    word = rng.choice(WORDS)
    font = _font(max(_MIN_SHAPE, int(short * _WORD_HEIGHT_FRACTION)))
    left, top, right, bottom = font.getbbox(word)
    ww, wh = right - left, bottom - top
    wx, wy = rng.randint(0, max(0, width - ww)), rng.randint(0, max(0, height - wh))
    word_box = (wx, wy, wx + ww, wy + wh)
    taken = [word_box]
    shapes: list[Shape] = []
    side_max = max(_MIN_SHAPE, int(short * _SHAPE_FRACTION))
    for _ in range(rng.randint(1, max_shapes)):
        for _ in range(_MAX_PLACEMENT_TRIES):
            side = rng.randint(_MIN_SHAPE, side_max)
            x, y = rng.randint(0, width - side), rng.randint(0, height - side)
            box = (x, y, x + side, y + side)
            if not any(_overlaps(box, t) for t in taken):
                shapes.append(Shape(rng.choice(("box", "circle")), rng.choice(sorted(COLOURS)), box))
                taken.append(box)
                break
    return Scene(width, height, tuple(shapes), word, word_box)


def render_scene(scene: Scene) -> Image.Image:
    """The RGB image of a scene."""
    image = Image.new("RGB", (scene.width, scene.height), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for shape in scene.shapes:
        if shape.kind == "box":
            draw.rectangle(shape.box, fill=COLOURS[shape.colour])
        else:
            draw.ellipse(shape.box, fill=COLOURS[shape.colour])
    short = min(scene.width, scene.height)
    font = _font(max(_MIN_SHAPE, int(short * _WORD_HEIGHT_FRACTION)))
    left, top, _, _ = font.getbbox(scene.word)
    draw.text((scene.word_box[0] - left, scene.word_box[1] - top), scene.word, fill=(0, 0, 0), font=font)
    return image

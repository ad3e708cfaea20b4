"""``synthdoc``: coloured boxes holding two-character codes on a large page, a task that needs native resolution.

A document is a canvas of 448-1344 px per side (aspect 1:3 to 3:1) with a light grey, speckled background,
a few faint distractor lines, and 2-4 rectangles with coloured borders, each holding a centred code of two
characters from ``23456789`` in 18-24 px DejaVu type. At the paper preset's geometry the slices show a
1344 px page at about 0.6-1.0x, where the glyphs are 12-24 px, but the overview shows it at about 0.3x
(glyphs 5-8 px): the codes are legible only in the slices, which is the point of image modularization
(arXiv 2403.11703, section 3.1).

A :class:`Document` is data first (every box, glyph and line, with their exact pixel boxes) and pixels
second (:func:`render_document`), so answers and the dense labels used for vision pretraining are derived
from exactly what was drawn. Every document is a pure function of its seed string
(:func:`document_seed`: split, dataset seed, index), so the train, validation and test splits never share a
document.

Questions and their exact answers:

* "What is the code in the {colour} box?" -> the code, e.g. "49";
* "How many boxes are there?" -> the digit, e.g. "3";
* "What color is the box with the code {code}?" -> the colour word, e.g. "red".
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from llava_uhd.errors import ConfigError

# -- the spec ------------------------------------------------------------------------------------------
SIDE_RANGE = (448, 1344)  # canvas width and height, each uniform in this range
BACKGROUND_RANGE = (238, 252)  # grey level of the page
SPECKLE_RATE = 1 / 40  # fraction of background pixels darkened
SPECKLE_DARKEN = (5, 25)  # by this many levels
LINES_RANGE = (2, 5)  # distractor lines per page
LINE_GREY = (200, 225)
BOXES_RANGE = (2, 4)
BOX_WIDTH = (60, 110)
BOX_HEIGHT = (34, 56)
BOX_GAP = 6  # at least this many pixels between two boxes
EDGE_GAP = 4  # and between a box and the page's edge
BORDER_RANGE = (2, 3)
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (20, 150, 40),
    "blue": (30, 60, 220),
    "orange": (245, 140, 0),
    "purple": (130, 40, 170),
}
CODE_ALPHABET = "23456789"
CODE_LENGTH = 2
TEXT_RGB = (10, 10, 10)
FONTS = ("DejaVuSans-Bold.ttf", "DejaVuSans.ttf", "DejaVuSansMono.ttf")
FONT_SIZE_RANGE = (18, 24)
SPLITS = ("train", "validation", "test")
_MAX_PLACEMENT_TRIES = 500

QuestionKind = Literal["code", "count", "colour"]
QUESTION_KINDS: tuple[QuestionKind, ...] = ("code", "count", "colour")
CAPTION_PROMPT = "List the boxes."

Rect = tuple[int, int, int, int]  # (left, top, right, bottom), right and bottom exclusive


@dataclass(frozen=True)
class Glyph:
    """One drawn character and its ink box on the page."""

    char: str
    box: Rect

    @property
    def centre(self) -> tuple[float, float]:
        """(x, y) of the ink box's centre, in page pixels."""
        return ((self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2)


@dataclass(frozen=True)
class Box:
    """A rectangle with a coloured border and a centred code."""

    colour: str
    rgb: tuple[int, int, int]  # the drawn border colour (the named colour, jittered in training)
    rect: Rect
    border: int
    code: str
    font: str
    font_size: int
    text_origin: tuple[int, int]  # where the code was drawn (PIL's left-ascender anchor)
    glyphs: tuple[Glyph, ...]


@dataclass(frozen=True)
class Line:
    start: tuple[int, int]
    end: tuple[int, int]
    grey: int


@dataclass(frozen=True)
class Document:
    """Everything one synthdoc page shows; ``seed`` reproduces it."""

    seed: str
    width: int
    height: int
    background: int
    lines: tuple[Line, ...]
    boxes: tuple[Box, ...]

    @property
    def glyphs(self) -> tuple[Glyph, ...]:
        return tuple(g for box in self.boxes for g in box.glyphs)

    def reading_order(self) -> list[Box]:
        """Boxes top to bottom, then left to right (by their centres)."""
        return sorted(self.boxes, key=lambda b: ((b.rect[1] + b.rect[3]) / 2, (b.rect[0] + b.rect[2]) / 2))

    def caption(self) -> str:
        """E.g. "red 49, blue 37": every box's colour and code in reading order."""
        return ", ".join(f"{b.colour} {b.code}" for b in self.reading_order())


@dataclass(frozen=True)
class Question:
    kind: QuestionKind
    question: str
    answer: str


def code_question(colour: str) -> str:
    return f"What is the code in the {colour} box?"


def count_question() -> str:
    return "How many boxes are there?"


def colour_question(code: str) -> str:
    return f"What color is the box with the code {code}?"


def all_questions(doc: Document) -> list[Question]:
    """Every question the spec asks of ``doc``: per box a code and a colour question, and the count."""
    out = [Question("code", code_question(b.colour), b.code) for b in doc.boxes]
    out.append(Question("count", count_question(), str(len(doc.boxes))))
    out += [Question("colour", colour_question(b.code), b.colour) for b in doc.boxes]
    return out


def document_seed(split: str, index: int, seed: int = 0) -> str:
    """The seed string of document ``index`` of ``split``; splits and dataset seeds never collide."""
    if split not in SPLITS:
        raise ConfigError(f"synthdoc split must be one of {SPLITS}, got {split!r}")
    if index < 0:
        raise ConfigError(f"synthdoc document index must be >= 0, got {index}")
    return f"synthdoc/{split}/{seed}/{index}"


def _int_seed(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")


@lru_cache(maxsize=64)
def font(name: str, size: int) -> ImageFont.FreeTypeFont:
    """A DejaVu font by file name (resolved by the system's font path) at ``size`` px."""
    return ImageFont.truetype(name, size)


def _apart(a: Rect, b: Rect, gap: int) -> bool:
    return a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1]


def _jittered(rgb: tuple[int, int, int], rng: random.Random, jitter: int) -> tuple[int, int, int]:
    if jitter <= 0:
        return rgb
    return tuple(min(255, max(0, c + rng.randint(-jitter, jitter))) for c in rgb)  # type: ignore[return-value]


def _edge_point(rng: random.Random, width: int, height: int, edge: int) -> tuple[int, int]:
    if edge == 0:
        return (rng.randrange(width), 0)
    if edge == 1:
        return (width - 1, rng.randrange(height))
    if edge == 2:
        return (rng.randrange(width), height - 1)
    return (0, rng.randrange(height))


def layout_code(
    code: str, font_name: str, size: int, rect: Rect
) -> tuple[tuple[int, int], tuple[Glyph, ...]]:
    """Where to draw ``code`` so that its ink is centred in ``rect``, and each character's ink box."""
    f = font(font_name, size)
    left, top, right, bottom = f.getbbox(code)
    cx, cy = (rect[0] + rect[2]) / 2, (rect[1] + rect[3]) / 2
    ox, oy = round(cx - (left + right) / 2), round(cy - (top + bottom) / 2)
    glyphs = []
    for i, char in enumerate(code):
        advance = round(f.getlength(code[:i]))
        gl, gt, gr, gb = f.getbbox(char)
        glyphs.append(Glyph(char, (ox + advance + gl, oy + gt, ox + advance + gr, oy + gb)))
    return (ox, oy), tuple(glyphs)


def make_document(seed: str, colour_jitter: int = 0, size: tuple[int, int] | None = None) -> Document:
    """Draw the contents of one document from its seed string.

    ``colour_jitter`` moves each border channel by up to that many levels (training only; the test split
    uses the exact colours). ``size`` fixes (width, height) instead of drawing it (for tests and demos).
    """
    rng = random.Random(seed)
    if size is None:
        width, height = rng.randint(*SIDE_RANGE), rng.randint(*SIDE_RANGE)
    else:
        width, height = size
        min_side = 2 * EDGE_GAP + BOX_WIDTH[1]
        if width < min_side or height < min_side:
            raise ConfigError(f"synthdoc pages need both sides >= {min_side} px, got {width}x{height}")
    background = rng.randint(*BACKGROUND_RANGE)
    lines = []
    for _ in range(rng.randint(*LINES_RANGE)):
        first, second = rng.sample(range(4), 2)
        lines.append(
            Line(
                _edge_point(rng, width, height, first),
                _edge_point(rng, width, height, second),
                rng.randint(*LINE_GREY),
            )
        )
    n_boxes = rng.randint(*BOXES_RANGE)
    colours = rng.sample(sorted(COLOURS), n_boxes)
    codes: list[str] = []
    while len(codes) < n_boxes:
        code = "".join(rng.choice(CODE_ALPHABET) for _ in range(CODE_LENGTH))
        if code not in codes:
            codes.append(code)
    boxes: list[Box] = []
    for colour, code in zip(colours, codes, strict=True):
        for _ in range(_MAX_PLACEMENT_TRIES):
            w, h = rng.randint(*BOX_WIDTH), rng.randint(*BOX_HEIGHT)
            x = rng.randint(EDGE_GAP, width - EDGE_GAP - w)
            y = rng.randint(EDGE_GAP, height - EDGE_GAP - h)
            rect = (x, y, x + w, y + h)
            if all(_apart(rect, b.rect, BOX_GAP) for b in boxes):
                break
        else:  # a 448 px page holds 4 boxes easily; this only guards against an impossible request
            raise ConfigError(f"cannot place {n_boxes} boxes {BOX_GAP} px apart on {width}x{height}")
        font_name, size_px = rng.choice(FONTS), rng.randint(*FONT_SIZE_RANGE)
        origin, glyphs = layout_code(code, font_name, size_px, rect)
        boxes.append(
            Box(
                colour,
                _jittered(COLOURS[colour], rng, colour_jitter),
                rect,
                rng.randint(*BORDER_RANGE),
                code,
                font_name,
                size_px,
                origin,
                glyphs,
            )
        )
    return Document(seed, width, height, background, tuple(lines), tuple(boxes))


def render_document(doc: Document) -> Image.Image:
    """The RGB page of ``doc``: speckled background, then the lines, then the boxes and their codes."""
    noise = np.random.default_rng(_int_seed(doc.seed))
    page = np.full((doc.height, doc.width), doc.background, dtype=np.int16)
    speckled = noise.random((doc.height, doc.width)) < SPECKLE_RATE
    page[speckled] -= noise.integers(SPECKLE_DARKEN[0], SPECKLE_DARKEN[1] + 1, size=int(speckled.sum()))
    grey = page.astype(np.uint8)
    image = Image.fromarray(np.repeat(grey[:, :, None], 3, axis=2), mode="RGB")
    draw = ImageDraw.Draw(image)
    for line in doc.lines:
        draw.line([line.start, line.end], fill=(line.grey,) * 3, width=1)
    for box in doc.boxes:
        left, top, right, bottom = box.rect
        draw.rectangle((left, top, right - 1, bottom - 1), outline=box.rgb, width=box.border)
        draw.text(box.text_origin, box.code, fill=TEXT_RGB, font=font(box.font, box.font_size))
    return image


def documents(
    split: str, n: int, seed: int = 0, colour_jitter: int = 0, start: int = 0
) -> Iterator[Document]:
    """Documents ``start`` .. ``start + n - 1`` of ``split``."""
    for index in range(start, start + n):
        yield make_document(document_seed(split, index, seed), colour_jitter=colour_jitter)


RecordKind = Literal["caption", "qa"]


def _turns(pairs: Sequence[tuple[str, str]]) -> list[dict[str, str]]:
    turns = []
    for k, (question, answer) in enumerate(pairs):
        prefix = "<image>\n" if k == 0 else ""
        turns += [{"from": "human", "value": prefix + question}, {"from": "gpt", "value": answer}]
    return turns


def training_questions(doc: Document, rng: random.Random) -> list[Question]:
    """The questions of one training conversation, shuffled.

    Each box gets either its code or its colour question, never both: with both in one conversation the
    second is answerable from the first answer's text without looking at the image.
    """
    pool = [Question("count", count_question(), str(len(doc.boxes)))]
    for b in doc.boxes:
        pool.append(
            Question("code", code_question(b.colour), b.code)
            if rng.random() < 0.5
            else Question("colour", colour_question(b.code), b.colour)
        )
    rng.shuffle(pool)
    return pool


def llava_record(doc: Document, image_name: str, kind: RecordKind, variant: int = 0) -> dict[str, Any]:
    """One LLaVA-format record about ``doc``: its caption (stage 1) or a multi-turn Q&A (stage 2).

    Q&A records of different ``variant`` ask different subsets of the questions, in different orders.
    """
    if kind == "caption":
        pairs = [(CAPTION_PROMPT, doc.caption())]
    else:
        rng = random.Random(f"{doc.seed}/qa/{variant}")
        pairs = [(q.question, q.answer) for q in training_questions(doc, rng)]
    return {"id": f"{doc.seed}/{kind}/{variant}", "image": image_name, "conversations": _turns(pairs)}


def write_llava_json(
    out_dir: str | Path,
    split: str,
    n: int,
    seed: int = 0,
    kinds: Sequence[RecordKind] = ("qa",),
    colour_jitter: int = 0,
    json_name: str = "data.json",
) -> Path:
    """Render ``n`` documents of ``split`` as PNGs under ``out_dir/images`` and write ``out_dir/json_name``.

    Each document gives one record per entry of ``kinds`` (so ``("caption", "qa", "qa")`` gives a caption
    and two different Q&A conversations about every image). Returns the JSON's path; the same arguments
    always write the same bytes. Images already present (an earlier or interrupted call) are not drawn
    again, so two JSONs (say one per training stage) can share one folder of pages.
    """
    unknown = sorted(set(kinds) - {"caption", "qa"})
    if n < 1 or not kinds or unknown:
        raise ConfigError(f"write_llava_json needs n >= 1 and kinds from ('caption', 'qa'), got {n}, {kinds}")
    root = Path(out_dir)
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    records = []
    for index, doc in enumerate(documents(split, n, seed, colour_jitter)):
        name = f"{split}-{seed}-{index:06d}.png"
        path = images / name
        if not path.exists():
            tmp = path.with_suffix(".tmp.png")
            render_document(doc).save(tmp, format="PNG")
            tmp.replace(path)
        records += [llava_record(doc, name, kind, kinds[:k].count(kind)) for k, kind in enumerate(kinds)]
    json_path = root / json_name
    json_path.write_text(json.dumps(records, indent=1), encoding="utf-8")
    return json_path

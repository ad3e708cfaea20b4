"""The synthdoc task: the spec's ranges, determinism, split separation, answers and dense labels true to the
pixels, and LLaVA records the data pipeline reads."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from PIL import Image, ImageDraw

from llava_uhd.config import get_preset
from llava_uhd.data import parse_record
from llava_uhd.errors import ConfigError
from llava_uhd.slicing import plan_slices
from llava_uhd.synth.dense import (
    COLOUR_NAMES,
    COLOUR_NONE,
    GLYPH_NONE,
    colour_targets,
    glyph_targets,
    piece_views,
)
from llava_uhd.synth.synthdoc import (
    BOX_GAP,
    CODE_ALPHABET,
    COLOURS,
    EDGE_GAP,
    all_questions,
    document_seed,
    font,
    make_document,
    render_document,
    training_questions,
    write_llava_json,
)

DOCS = [make_document(document_seed("test", i)) for i in range(40)]


def test_documents_follow_the_spec():
    sizes = set()
    for doc in DOCS:
        assert 448 <= doc.width <= 1344 and 448 <= doc.height <= 1344
        assert 238 <= doc.background <= 252 and 2 <= len(doc.lines) <= 5
        assert all(200 <= line.grey <= 225 for line in doc.lines)
        assert 2 <= len(doc.boxes) <= 4
        assert len({b.colour for b in doc.boxes}) == len(doc.boxes)
        assert len({b.code for b in doc.boxes}) == len(doc.boxes)
        for i, box in enumerate(doc.boxes):
            left, top, right, bottom = box.rect
            assert 60 <= right - left <= 110 and 34 <= bottom - top <= 56
            assert left >= EDGE_GAP and top >= EDGE_GAP
            assert right <= doc.width - EDGE_GAP and bottom <= doc.height - EDGE_GAP
            assert 2 <= box.border <= 3 and 18 <= box.font_size <= 24
            assert box.rgb == COLOURS[box.colour]  # no jitter outside training
            assert len(box.code) == 2 and set(box.code) <= set(CODE_ALPHABET)
            for other in doc.boxes[i + 1 :]:  # at least BOX_GAP apart on one axis
                o = other.rect
                gap_x = max(o[0] - right, left - o[2])
                gap_y = max(o[1] - bottom, top - o[3])
                assert max(gap_x, gap_y) >= BOX_GAP
            for glyph in box.glyphs:  # the code's ink sits inside the box's border
                g = glyph.box
                assert left + box.border <= g[0] and g[2] <= right - box.border
                assert top + box.border <= g[1] and g[3] <= bottom - box.border
        sizes.add((doc.width, doc.height))
    assert len(sizes) == len(DOCS)


def test_deterministic_and_splits_never_share_a_page():
    again = make_document(document_seed("test", 3))
    assert again == DOCS[3]
    assert np.array_equal(np.asarray(render_document(again)), np.asarray(render_document(DOCS[3])))
    seeds = {
        document_seed(split, i, s)
        for split in ("train", "validation", "test")
        for i in range(50)
        for s in (0, 1)
    }
    assert len(seeds) == 300
    pages = {
        (d.width, d.height, tuple(b.code for b in d.boxes))
        for d in (
            make_document(document_seed(split, i))
            for split in ("train", "validation", "test")
            for i in range(30)
        )
    }
    assert len(pages) == 90
    with pytest.raises(ConfigError, match="split"):
        document_seed("dev", 0)


def test_colour_jitter_stays_near_the_named_colour():
    doc = make_document(document_seed("train", 0), colour_jitter=12)
    assert any(b.rgb != COLOURS[b.colour] for b in doc.boxes)
    for box in doc.boxes:
        assert max(abs(a - b) for a, b in zip(box.rgb, COLOURS[box.colour], strict=True)) <= 12


def test_pixels_show_what_the_document_says():
    for doc in DOCS[:12]:
        image = render_document(doc)
        pixels = np.asarray(image).astype(int)
        for box in doc.boxes:
            left, top, right, bottom = box.rect
            # the border: the box's colour along its left edge, at mid-height
            assert tuple(pixels[(top + bottom) // 2, left]) == box.rgb
            # each glyph's ink box holds near-black ink, and drawing the glyphs alone reproduces the code
            alone = Image.new("L", image.size, 0)
            draw = ImageDraw.Draw(alone)
            draw.text(box.text_origin, box.code, fill=255, font=font(box.font, box.font_size))
            ink = np.asarray(alone) > 127
            union = np.zeros_like(ink)
            for glyph in box.glyphs:
                g = glyph.box
                assert pixels[g[1] : g[3], g[0] : g[2]].max(axis=2).min() <= 60
                union[g[1] : g[3], g[0] : g[2]] = True
            assert ink.any() and not (ink & ~union).any()


def test_every_answer_is_true():
    for doc in DOCS:
        by_colour = {b.colour: b for b in doc.boxes}
        by_code = {b.code: b for b in doc.boxes}
        for q in all_questions(doc):
            if q.kind == "count":
                assert q.question == "How many boxes are there?" and q.answer == str(len(doc.boxes))
            elif q.kind == "code":
                colour = q.question.removeprefix("What is the code in the ").removesuffix(" box?")
                assert by_colour[colour].code == q.answer
            else:
                code = q.question.removeprefix("What color is the box with the code ").removesuffix("?")
                assert by_code[code].colour == q.answer
        assert len(all_questions(doc)) == 2 * len(doc.boxes) + 1


def test_a_training_conversation_never_answers_itself():
    for doc in DOCS:
        asked = training_questions(doc, random.Random(doc.seed))
        codes_answered = {q.answer for q in asked if q.kind == "code"}
        codes_asked = {q.question.split()[-1].rstrip("?") for q in asked if q.kind == "colour"}
        assert not codes_answered & codes_asked
        assert sum(q.kind == "count" for q in asked) == 1 and len(asked) == len(doc.boxes) + 1


def test_dense_labels_match_the_drawing():
    slicing = get_preset("paper").slicing
    for doc in DOCS[:10]:
        plan = plan_slices(doc.width, doc.height, slicing)
        views = piece_views(plan)
        assert len(views) == len(plan.pieces)
        assert [(v.rows, v.cols) for v in views] == [tuple(g) for g in plan.piece_grids]
        slice_glyphs = 0
        for k, view in enumerate(views):
            glyphs = glyph_targets(doc, view, 14)
            colours = colour_targets(doc, view, 14)
            assert glyphs.shape == (view.rows * view.cols, 4) and colours.shape == (view.rows * view.cols,)
            labelled = glyphs[glyphs != GLYPH_NONE]
            if k < plan.num_slices:
                slice_glyphs += labelled.size
            else:  # the overview shows every glyph centre (two may share one sub-cell there)
                assert 0 < labelled.size <= len(doc.glyphs)
            if k < plan.num_slices:  # a slice's patch holding a glyph centre has its own centre in the box
                patches = np.nonzero((glyphs != GLYPH_NONE).any(axis=1))[0]
                assert (colours[patches] != COLOUR_NONE).all()
        assert slice_glyphs == len(doc.glyphs)  # slices tile the page: every glyph centred exactly once
        overview = views[-1]
        colours = colour_targets(doc, overview, 14)
        found = {COLOUR_NAMES[c] for c in colours if c != COLOUR_NONE}
        assert found <= {b.colour for b in doc.boxes}


def test_glyph_targets_name_the_right_character_at_the_right_sub_cell():
    doc = DOCS[0]
    identity = piece_views(plan_slices(doc.width, doc.height, get_preset("paper").slicing))[-1]
    unit = type(identity)(1.0, 1.0, 0.0, 0.0, doc.height // 14, doc.width // 14)  # the page itself
    targets = glyph_targets(doc, unit, 14)
    for glyph in doc.glyphs:
        x, y = glyph.centre
        patch = int(y // 14) * unit.cols + int(x // 14)
        sub = int((y % 14) // 7) * 2 + int((x % 14) // 7)
        assert CODE_ALPHABET[targets[patch, sub]] == glyph.char


def test_llava_json_round_trip(tmp_path):
    path = write_llava_json(tmp_path / "a", "train", 3, seed=2, kinds=("caption", "qa", "qa"))
    again = write_llava_json(tmp_path / "b", "train", 3, seed=2, kinds=("caption", "qa", "qa"))
    assert path.read_bytes() == again.read_bytes()
    records = json.loads(path.read_text())
    assert len(records) == 9 and len({r["id"] for r in records}) == 9
    assert records[1]["conversations"] != records[2]["conversations"]  # two different Q&A variants
    for k, record in enumerate(records):
        conversation = parse_record(record, k)
        assert conversation.turns[0].text.startswith("<image>\n")
        with Image.open(tmp_path / "a" / "images" / record["image"]) as image:
            doc = make_document(document_seed("train", k // 3, 2))
            assert image.size == (doc.width, doc.height)
    assert records[0]["conversations"][1]["value"] == make_document(document_seed("train", 0, 2)).caption()
    with pytest.raises(ConfigError, match="kinds"):
        write_llava_json(tmp_path / "c", "train", 1, kinds=("essay",))

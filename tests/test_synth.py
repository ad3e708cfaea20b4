"""The synthetic dataset: deterministic, answers true to the pixels, records valid for the data pipeline."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from PIL import Image

from llava_uhd.data import parse_record
from llava_uhd.errors import ConfigError
from llava_uhd.synth import caption, make_dataset, make_scene, questions, render_scene
from llava_uhd.synth.scenes import COLOURS

SIZES = ((224, 112), (112, 224), (336, 112), (96, 96))


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_deterministic_given_seed(tmp_path):
    a = make_dataset(tmp_path / "a", n=9, seed=4, kinds=("caption", "qa", "text"), sizes=SIZES)
    b = make_dataset(tmp_path / "b", n=9, seed=4, kinds=("caption", "qa", "text"), sizes=SIZES)
    make_dataset(tmp_path / "c", n=9, seed=5, kinds=("caption", "qa", "text"), sizes=SIZES)
    files_a = _files(tmp_path / "a")
    assert files_a == _files(tmp_path / "b")
    assert files_a != _files(tmp_path / "c")
    assert len(files_a) == 1 + 6  # the JSON and one PNG per non-text record
    assert json.loads(a.json_path.read_text()) == a.records == b.records


def test_records_parse_and_kinds_cycle(tmp_path):
    data = make_dataset(tmp_path, n=6, seed=0, kinds=("caption", "qa", "text"), sizes=SIZES, name="d.jsonl")
    lines = data.json_path.read_text().splitlines()
    assert [json.loads(line) for line in lines] == data.records
    for k, record in enumerate(data.records):
        conversation = parse_record(record, k)
        if k % 3 == 2:
            assert conversation.images == () and "<image>" not in conversation.turns[0].text
        else:
            with Image.open(data.image_folder / record["image"]) as image:
                assert image.size in SIZES
            assert conversation.turns[0].text.startswith("<image>\n")
    assert data.records[0]["conversations"][0]["value"] == "<image>\nDescribe the image briefly."


def test_answers_are_true_to_the_pixels():
    rng = random.Random(11)
    for _ in range(20):
        scene = make_scene(rng, rng.choice(SIZES))
        image = render_scene(scene)
        for shape in scene.shapes:  # every shape is drawn in its colour at its centre
            cx, cy = (shape.box[0] + shape.box[2]) // 2, (shape.box[1] + shape.box[3]) // 2
            assert image.getpixel((cx, cy)) == COLOURS[shape.colour]
        word = np.asarray(image.crop(scene.word_box))
        assert word.max(axis=2).min() < 100  # dark glyph pixels inside the word's box
        for question, answer in questions(scene, rng):
            if question == "What word is written?":
                assert answer == scene.word
            elif question == "How many circles are there?":
                assert answer == str(sum(s.kind == "circle" for s in scene.shapes))
            elif question.startswith("How many "):
                colour = question.split()[2]
                assert answer == str(sum(s.kind == "box" and s.colour == colour for s in scene.shapes))
            elif question == "What colour is the circle?":
                assert [answer] == [s.colour for s in scene.shapes if s.kind == "circle"]


def test_caption_text():
    rng = random.Random(0)
    scene = make_scene(rng, (224, 112))
    text = caption(scene)
    assert text.startswith("A 224x112 picture of ") and text.endswith(f'the word "{scene.word}".')
    total = sum(
        int(part.split()[0])
        for part in text[len("A 224x112 picture of ") :].split(" and the word")[0].split(", ")
    )
    assert total == len(scene.shapes)


def test_shapes_do_not_overlap_each_other_or_the_word():
    rng = random.Random(3)
    for _ in range(20):
        scene = make_scene(rng, (224, 224))
        boxes = [scene.word_box, *(s.box for s in scene.shapes)]
        for i, a in enumerate(boxes):
            for b in boxes[i + 1 :]:
                assert not (a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3])


def test_bad_arguments(tmp_path):
    with pytest.raises(
        ConfigError, match=r"kinds from \('caption', 'qa', 'text'\), got n=3, kinds=\['video'\]"
    ):
        make_dataset(tmp_path, n=3, kinds=("video",))
    with pytest.raises(ConfigError, match=r"image sizes must be positive"):
        make_dataset(tmp_path, n=3, sizes=((0, 10),))

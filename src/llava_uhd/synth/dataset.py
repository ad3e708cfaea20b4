"""A small synthetic high-resolution LLaVA dataset: scene images plus a LLaVA JSON of captions (stage 1)
and question-answer conversations (stage 2), fully determined by ``seed``.

    >>> data = make_dataset("out/synth", n=32, seed=0)          # doctest: +SKIP
    >>> data.json_path, data.image_folder                        # doctest: +SKIP
    (PosixPath('out/synth/data.json'), PosixPath('out/synth/images'))

Answers are computed from the drawn :class:`~llava_uhd.synth.scenes.Scene`, so they are always true.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from llava_uhd.errors import ConfigError
from llava_uhd.synth.scenes import COLOURS, DEFAULT_SIZES, Scene, make_scene, render_scene

Kind = Literal["caption", "qa", "text"]
KINDS: tuple[Kind, ...] = ("caption", "qa", "text")
CAPTION_PROMPT = "Describe the image briefly."
_MAX_QUESTIONS = 4
_MAX_ADDEND = 20


@dataclass(frozen=True)
class SynthDataset:
    """Where a generated dataset lives, and its records (as written to ``json_path``)."""

    json_path: Path
    image_folder: Path
    records: list[dict[str, Any]]


def _plural(kind: str, count: int) -> str:
    return kind if count == 1 else {"box": "boxes", "circle": "circles"}[kind]


def caption(scene: Scene) -> str:
    """E.g. 'A 448x224 picture of 2 red boxes, 1 blue circle and the word "cat".'"""
    groups: dict[tuple[str, str], int] = {}
    for shape in scene.shapes:
        groups[(shape.colour, shape.kind)] = groups.get((shape.colour, shape.kind), 0) + 1
    parts = [f"{n} {colour} {_plural(kind, n)}" for (colour, kind), n in sorted(groups.items())]
    return f'A {scene.width}x{scene.height} picture of {", ".join(parts)} and the word "{scene.word}".'


def questions(scene: Scene, rng: random.Random) -> list[tuple[str, str]]:
    """Question-answer pairs about a scene (count, colour, word, presence), answers from the scene."""
    colour = rng.choice(sorted(COLOURS))
    pool = [
        (f"How many {colour} boxes are there?", str(scene.count("box", colour))),
        ("How many circles are there?", str(scene.count("circle"))),
        ("What word is written?", scene.word),
        (f"Is there a {colour} circle?", "Yes" if scene.count("circle", colour) else "No"),
    ]
    circles = [s for s in scene.shapes if s.kind == "circle"]
    if len(circles) == 1:
        pool.append(("What colour is the circle?", circles[0].colour))
    rng.shuffle(pool)
    return pool[: rng.randint(1, min(_MAX_QUESTIONS, len(pool)))]


def _conversation(pairs: Sequence[tuple[str, str]], with_image: bool) -> list[dict[str, str]]:
    turns = []
    for k, (question, answer) in enumerate(pairs):
        prefix = "<image>\n" if with_image and k == 0 else ""
        turns += [{"from": "human", "value": prefix + question}, {"from": "gpt", "value": answer}]
    return turns


def make_record(
    index: int, rng: random.Random, kind: Kind, image_name: str | None, scene: Scene | None
) -> dict[str, Any]:
    """One LLaVA record of ``kind`` about ``scene`` (``text`` records are arithmetic, without image)."""
    record: dict[str, Any] = {"id": f"synth-{index:05d}"}
    if kind == "text":
        a, b = rng.randint(0, _MAX_ADDEND), rng.randint(0, _MAX_ADDEND)
        record["conversations"] = _conversation([(f"What is {a} plus {b}?", str(a + b))], with_image=False)
        return record
    assert scene is not None and image_name is not None
    record["image"] = image_name
    pairs = [(CAPTION_PROMPT, caption(scene))] if kind == "caption" else questions(scene, rng)
    record["conversations"] = _conversation(pairs, with_image=True)
    return record


def make_dataset(
    out_dir: str | Path,
    n: int,
    seed: int = 0,
    kinds: Sequence[Kind] = ("caption", "qa"),
    sizes: Sequence[tuple[int, int]] = DEFAULT_SIZES,
    name: str = "data.json",
) -> SynthDataset:
    """Write ``n`` records (kinds drawn in turn from ``kinds``) and their PNG images under ``out_dir``.

    The same (n, seed, kinds, sizes) always writes byte-identical files. ``name`` ending in ``.jsonl``
    writes JSON lines instead of a JSON list.
    """
    unknown = sorted(set(kinds) - set(KINDS))
    if n < 0 or not kinds or unknown:
        raise ConfigError(f"make_dataset needs n >= 0 and kinds from {KINDS}, got n={n}, kinds={list(kinds)}")
    if not sizes or any(w < 1 or h < 1 for w, h in sizes):
        raise ConfigError(f"image sizes must be positive (width, height) pairs, got {list(sizes)}")
    root = Path(out_dir)
    image_folder = root / "images"
    image_folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    records = []
    for index in range(n):
        kind = kinds[index % len(kinds)]
        scene = image_name = None
        if kind != "text":
            scene = make_scene(rng, tuple(rng.choice(list(sizes))))
            image_name = f"synth-{index:05d}.png"
            render_scene(scene).save(image_folder / image_name, format="PNG")
        records.append(make_record(index, rng, kind, image_name, scene))
    json_path = root / name
    if name.endswith(".jsonl"):
        json_path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    else:
        json_path.write_text(json.dumps(records, indent=1), encoding="utf-8")
    return SynthDataset(json_path, image_folder, records)

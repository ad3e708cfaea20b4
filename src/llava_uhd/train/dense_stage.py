"""Stage 0: pretrain the vision tower on synthdoc pages with dense per-patch targets (:mod:`llava_uhd.synth.dense`).

Each sample is one generated page, cut by the preset's slicing exactly as the model will see it at
inference (the processor's pixel path), and

* every ``full_page_every``-th sample also feeds all of its pieces (slices and overview) whole;
* every sample feeds ``windows`` windows of ``window_patches`` x ``window_patches`` patches cut from its
  slices at a random pixel offset around a random character, so most compute goes where the glyphs are.

The loss per patch is the cross-entropy of each sub-cell's character (the "no character" class weighted by
``no_glyph_weight``, since most sub-cells hold none) plus ``colour_weight`` times the cross-entropy of the
surrounding box's colour; the loop averages it over the patches of the global batch.

:func:`probe` is the metric that bounds everything downstream: read each drawn character off the glyph head
at its true sub-cell (the box is given), on the slices and on the overview of held-out pages.

The ``stage0_resampler`` stage reuses all of this with the tower frozen: the same pages (whole, with
``windows: 0``) and targets, read back through the resampler's tokens by a dense decoder
(:class:`~llava_uhd.model.dense_heads.DenseResamplerModel`), so its probe measures what survives the
compression.

Dimensions: Pt patches, K values per patch, S sub-cells per patch, G glyph classes.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from llava_uhd.config import Preset, SlicingConfig
from llava_uhd.model.dense_heads import DenseResamplerModel, DenseVisionModel
from llava_uhd.pixels import image_patches, patches_to_piece
from llava_uhd.slicing import plan_slices
from llava_uhd.synth.dense import (
    COLOUR_CLASSES,
    GLYPH_CLASSES,
    GLYPH_NONE,
    SUBCELLS,
    View,
    colour_targets,
    glyph_targets,
    piece_views,
)
from llava_uhd.synth.synthdoc import CODE_ALPHABET, Document, document_seed, make_document, render_document
from llava_uhd.train.config import DenseConfig, TrainConfig
from llava_uhd.train.loop import TrainData

DENSE_KEYS = ("pixel_values", "piece_grids", "glyph_targets", "colour_targets")


def piece_to_patches(piece: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(C, rows*P, cols*P) -> (rows*cols, C*P*P): the inverse of :func:`llava_uhd.pixels.patches_to_piece`."""
    c, h, w = piece.shape
    p = patch_size
    grid = piece.reshape(c, h // p, p, w // p, p).permute(1, 3, 0, 2, 4)  # (rows, cols, C, P, P)
    return grid.reshape((h // p) * (w // p), c * p * p)


@dataclass(frozen=True)
class PageSample:
    """A page as the tower sees it: its pieces' patches, grids, views and the page itself."""

    doc: Document
    patches: torch.Tensor  # (Pt, K)
    grids: list[tuple[int, int]]  # (rows, cols) per piece
    views: list[View]
    num_slices: int


def page_sample(doc: Document, slicing: SlicingConfig) -> PageSample:
    """Render ``doc`` and cut it with the processor's own geometry and pixel path."""
    image = render_document(doc)
    plan = plan_slices(doc.width, doc.height, slicing)
    patches = image_patches([image], [plan], slicing)
    grids = [(g.rows, g.cols) for g in plan.piece_grids]
    return PageSample(doc, patches, grids, piece_views(plan), plan.num_slices)


def _targets(doc: Document, views: Sequence[View], patch_size: int) -> tuple[np.ndarray, np.ndarray]:
    glyphs = np.concatenate([glyph_targets(doc, v, patch_size) for v in views])
    colours = np.concatenate([colour_targets(doc, v, patch_size) for v in views])
    return glyphs, colours


def _windows(
    page: PageSample, count: int, side: int, patch_size: int, rng: random.Random
) -> tuple[list[torch.Tensor], list[View]]:
    """``count`` windows of ``side`` x ``side`` patches around random characters of random slices."""
    if page.num_slices == 0:
        return [], []
    offsets = np.cumsum([0] + [r * c for r, c in page.grids])
    centred: list[tuple[int, float, float]] = []  # (slice, x, y) of every glyph centre a slice shows
    for k in range(page.num_slices):
        view = page.views[k]
        for glyph in page.doc.glyphs:
            x = glyph.centre[0] * view.scale_x - view.offset_x
            y = glyph.centre[1] * view.scale_y - view.offset_y
            if 0 <= x < view.cols * patch_size and 0 <= y < view.rows * patch_size:
                centred.append((k, x, y))
    pixels, views = [], []
    size = side * patch_size
    for _ in range(count):
        k, x, y = rng.choice(centred)
        rows, cols = page.grids[k]
        height, width = rows * patch_size, cols * patch_size
        if height < size or width < size:
            continue
        piece = patches_to_piece(page.patches[offsets[k] : offsets[k + 1]], rows, cols, patch_size)
        # the glyph lands anywhere in the middle half of the window, at any sub-patch phase
        left = int(round(x - size / 2 + rng.uniform(-size / 4, size / 4)))
        top = int(round(y - size / 2 + rng.uniform(-size / 4, size / 4)))
        left, top = min(max(left, 0), width - size), min(max(top, 0), height - size)
        window = piece[:, top : top + size, left : left + size]
        pixels.append(piece_to_patches(window, patch_size))
        views.append(page.views[k].crop(left, top, side, side))
    return pixels, views


class DenseDocs(torch.utils.data.Dataset):
    """Stage-0 samples: page ``i`` of the synthdoc ``split`` (seeded by ``seed``), as a dict of tensors."""

    def __init__(
        self, n: int, seed: int, slicing: SlicingConfig, dense: DenseConfig, split: str = "train"
    ) -> None:
        self.n, self.seed, self.slicing, self.dense, self.split = n, seed, slicing, dense, split
        self.epoch = 0

    def __len__(self) -> int:
        return self.n

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch  # new windows every epoch; the pages stay the same

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        d, p = self.dense, self.slicing.patch_size
        doc = make_document(document_seed(self.split, index, self.seed), colour_jitter=d.colour_jitter)
        page = page_sample(doc, self.slicing)
        rng = random.Random(f"{doc.seed}/windows/{self.epoch}")
        pixels, grids, views = [], [], []
        if d.full_page_every and index % d.full_page_every == 0:
            pixels.append(page.patches)
            grids += page.grids
            views += page.views
        window_pixels, window_views = _windows(page, d.windows, d.window_patches, p, rng)
        pixels += window_pixels
        grids += [(v.rows, v.cols) for v in window_views]
        views += window_views
        if not views:  # an unsliced page with whole pages turned off: train on its overview
            pixels, grids, views = [page.patches], list(page.grids), list(page.views)
        glyphs, colours = _targets(doc, views, p)
        return {
            "pixel_values": torch.cat(pixels),
            "piece_grids": torch.tensor(grids, dtype=torch.long),
            "glyph_targets": torch.from_numpy(glyphs),
            "colour_targets": torch.from_numpy(colours),
        }


def collate_dense(samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Pieces of several samples packed into one batch (the tower packs pieces anyway)."""
    return {key: torch.cat([s[key] for s in samples]) for key in DENSE_KEYS}


class DenseObjective:
    """The stage-0 loss for :class:`~llava_uhd.train.loop.Trainer`: a sum over patches and their count."""

    def __init__(self, dense: DenseConfig) -> None:
        weights = torch.ones(GLYPH_CLASSES)
        weights[GLYPH_NONE] = dense.no_glyph_weight
        self.glyph_weights = weights
        self.colour_weight = dense.colour_weight

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["glyph_targets"].shape[0])

    def loss_sum(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        out = model(batch["pixel_values"], batch["piece_grids"])
        glyph = F.cross_entropy(
            out.glyph_logits.float().flatten(0, 1),
            batch["glyph_targets"].flatten(),
            weight=self.glyph_weights.to(out.glyph_logits.device),
            reduction="sum",
        )
        colour = F.cross_entropy(out.colour_logits.float(), batch["colour_targets"], reduction="sum")
        count = torch.tensor(batch["glyph_targets"].shape[0], device=glyph.device)
        return glyph + self.colour_weight * colour, count


@torch.no_grad()
def read_glyphs(model: nn.Module, page: PageSample, patch_size: int) -> list[tuple[int, list[str]]]:
    """Per piece, the characters read at each drawn glyph's true sub-cell (box given), in glyph order.

    Returns (piece index, reads) for every piece, where reads[i] is the character read for
    ``page.doc.glyphs[i]``, or "" when that piece does not show the glyph's centre.
    """
    out = model(page.patches, torch.tensor(page.grids, dtype=torch.long))
    digits = out.glyph_logits[:, :, : len(CODE_ALPHABET)].argmax(-1)  # (Pt, S), "none" excluded
    offsets = np.cumsum([0] + [r * c for r, c in page.grids])
    results = []
    cell = patch_size / SUBCELLS
    for k, view in enumerate(page.views):
        reads = []
        for glyph in page.doc.glyphs:
            x = glyph.centre[0] * view.scale_x - view.offset_x
            y = glyph.centre[1] * view.scale_y - view.offset_y
            col, row = int(x // patch_size), int(y // patch_size)
            if not (0 <= col < view.cols and 0 <= row < view.rows):
                reads.append("")
                continue
            sub = min(int((y - row * patch_size) // cell), 1) * SUBCELLS + min(
                int((x - col * patch_size) // cell), 1
            )
            reads.append(CODE_ALPHABET[int(digits[offsets[k] + row * view.cols + col, sub])])
        results.append((k, reads))
    return results


def probe(
    model: nn.Module, slicing: SlicingConfig, documents: int, seed: int = 0, split: str = "validation"
) -> dict[str, Any]:
    """Glyph accuracy of a (frozen) tower on held-out pages: per character and per whole code, on the
    slices and on the overview, and the number of characters each rate is measured on."""
    was_training = model.training
    model.eval()
    right = {"slice": 0, "overview": 0}
    total = {"slice": 0, "overview": 0}
    codes_right = {"slice": 0, "overview": 0}
    codes = {"slice": 0, "overview": 0}
    for index in range(documents):
        page = page_sample(make_document(document_seed(split, index, seed)), slicing)
        glyph_box = [b for b in page.doc.boxes for _ in b.glyphs]
        for k, reads in read_glyphs(model, page, slicing.patch_size):
            where = "overview" if k == len(page.views) - 1 else "slice"
            per_box: dict[int, list[bool]] = {}
            for glyph, box, read in zip(page.doc.glyphs, glyph_box, reads, strict=True):
                if not read:
                    continue
                ok = read == glyph.char
                right[where] += ok
                total[where] += 1
                per_box.setdefault(id(box), []).append(ok)
            for oks in per_box.values():
                if len(oks) == len(page.doc.boxes[0].code):  # the whole code is in this piece
                    codes[where] += 1
                    codes_right[where] += all(oks)
    model.train(was_training)
    return {
        f"{where}_{name}": value
        for where in ("slice", "overview")
        for name, value in (
            ("char_acc", right[where] / max(total[where], 1)),
            ("chars", total[where]),
            ("code_acc", codes_right[where] / max(codes[where], 1)),
        )
    }


def build_model(preset: Preset, task: str = "dense_vision") -> DenseVisionModel | DenseResamplerModel:
    """The preset's tower with heads sized for synthdoc's characters and colours ("dense_vision"), or its
    tower, resampler and a dense decoder of the same targets ("dense_resampler")."""
    if task == "dense_resampler":
        return DenseResamplerModel(preset, SUBCELLS * SUBCELLS, GLYPH_CLASSES, COLOUR_CLASSES)
    return DenseVisionModel(preset.vision, SUBCELLS * SUBCELLS, GLYPH_CLASSES, COLOUR_CLASSES)


def build_data(config: TrainConfig, slicing: SlicingConfig) -> TrainData:
    """Training pages (``data.synthetic_samples`` per epoch), eval pages and the probe for the loop."""
    data, dense_cfg = config.data, config.dense
    train = DenseDocs(data.synthetic_samples, config.seed, slicing, dense_cfg)
    eval_set = None
    if data.synthetic_eval_samples > 0:
        eval_set = DenseDocs(data.synthetic_eval_samples, config.seed, slicing, dense_cfg, split="validation")

    def metrics(model: nn.Module) -> dict[str, Any]:
        return (
            probe(model, slicing, dense_cfg.probe_documents, config.seed) if dense_cfg.probe_documents else {}
        )

    return TrainData(
        dataset=train,
        collate=collate_dense,
        eval_dataset=eval_set,
        objective=DenseObjective(dense_cfg),
        eval_metrics=metrics,
    )


def save_final(state: dict[str, torch.Tensor], preset: Preset, folder: Path) -> None:
    """``model.safetensors`` (tower and heads) and ``preset.yaml``: what ``model.init_from`` of stage 1 reads."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(folder / "model.safetensors"))
    preset.save(folder / "preset.yaml")

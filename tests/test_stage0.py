"""Stage 0 (vision pretraining on synthdoc): the conv stem, the stage's data and loss, a few steps of a tiny
tower through `llava-uhd train` with an exact resume, the probe, and the frozen-feature cache of stages 1-2."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from llava_uhd.config import Preset, VisionConfig, get_preset
from llava_uhd.errors import CheckpointError, ConfigError
from llava_uhd.model.dense_heads import DenseDecoder
from llava_uhd.model.feature_cache import FrozenFeatureCache
from llava_uhd.model.vision import VisionTransformer
from llava_uhd.pixels import patches_to_piece
from llava_uhd.synth.dense import GLYPH_NONE
from llava_uhd.synth.synthdoc import document_seed, make_document
from llava_uhd.train.config import DenseConfig, TrainConfig
from llava_uhd.train.dense_stage import DenseDocs, build_model, page_sample, piece_to_patches, probe
from llava_uhd.train.entry import run_training
from llava_uhd.train.stages import apply_stage, get_stage

CONV = VisionConfig(
    hidden_size=32,
    intermediate_size=64,
    num_layers=2,
    num_heads=4,
    image_size=112,
    stem="conv",
    center_pieces=True,
)


def _with_vision(vision: VisionConfig) -> Preset:
    return dataclasses.replace(get_preset("synthdoc"), vision=vision)


def _grids_and_pixels(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    grids = torch.tensor([[2, 3], [4, 1], [2, 3], [1, 1]])
    return grids, torch.randn(int(grids.prod(1).sum()), 3 * 14 * 14)


def test_conv_stem_equals_convolving_each_whole_piece():
    vit = VisionTransformer(CONV)
    grids, pixels = _grids_and_pixels()
    out = vit.stem(pixels, grids)
    start = 0
    for rows, cols in grids.tolist():
        n = rows * cols
        image = patches_to_piece(pixels[start : start + n], rows, cols, 14)[None]
        s = vit.stem
        ref = s.conv3(s.norm2(s.conv2(s.norm1(s.conv1(image)))))[0]  # (D, rows, cols)
        torch.testing.assert_close(out[start : start + n], ref.permute(1, 2, 0).reshape(n, -1))
        start += n
    assert "patch_embed.weight" not in vit.state_dict() and "stem.conv1.weight" in vit.state_dict()


def test_centring_makes_each_piece_blind_to_its_brightness():
    vit = VisionTransformer(CONV).eval()
    grids, pixels = _grids_and_pixels(1)
    shifted = pixels.clone()
    shifted[:6] += 0.7  # the first piece (2x3) only, every channel
    with torch.no_grad():
        torch.testing.assert_close(vit(pixels, grids), vit(shifted, grids), atol=1e-5, rtol=1e-5)
        plain = VisionTransformer(CONV.__class__(**{**CONV.__dict__, "center_pieces": False})).eval()
        plain.load_state_dict(vit.state_dict())
        assert not torch.allclose(plain(pixels, grids), plain(shifted, grids))


def test_conv_stem_config_is_checked():
    with pytest.raises(ConfigError, match="stem"):
        VisionConfig(stem="resnet")
    with pytest.raises(ConfigError, match="even patch size"):
        VisionTransformer(
            VisionConfig(hidden_size=32, num_heads=4, patch_size=7, image_size=112, stem="conv")
        )


def test_windows_and_pages_carry_their_targets():
    slicing = get_preset("synthdoc").slicing
    dense = DenseConfig(windows=5, window_patches=4, full_page_every=2)
    item = DenseDocs(4, 0, slicing, dense)[0]  # index 0: the whole page too
    page = page_sample(make_document(document_seed("train", 0), colour_jitter=dense.colour_jitter), slicing)
    n_page = page.patches.shape[0]
    assert torch.equal(item["pixel_values"][:n_page], page.patches)
    grids = item["piece_grids"].tolist()
    assert grids[: len(page.grids)] == [list(g) for g in page.grids]
    assert grids[len(page.grids) :] == [[4, 4]] * 5
    assert item["glyph_targets"].shape == (item["pixel_values"].shape[0], 4)
    windows = item["glyph_targets"][n_page:].view(5, 16, 4)
    assert ((windows != GLYPH_NONE).flatten(1).any(1)).all()  # every window holds a character
    odd = DenseDocs(4, 0, slicing, dense)[1]
    assert odd["piece_grids"].tolist() == [[4, 4]] * 5  # windows only
    rows, cols = page.grids[0]
    first = page.patches[: rows * cols]
    assert torch.equal(piece_to_patches(patches_to_piece(first, rows, cols, 14), 14), first)


def test_stage0_trains_exactly_the_tower_and_heads():
    model = build_model(_with_vision(CONV))
    names = apply_stage(model, get_stage("stage0"))
    assert names == sorted(n for n, _ in model.named_parameters())
    assert {n.split(".")[0] for n in names} == {"vision_tower", "dense_heads"}


def _tiny_preset(tmp_path: Path) -> Path:
    preset = get_preset("synthdoc").with_overrides(
        vision={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_layers": 1,
            "num_heads": 2,
            "stem_channels": (8, 16),
        },
        slicing={"max_slices": 2},
    )
    path = tmp_path / "tiny-synthdoc.yaml"
    preset.save(path)
    return path


def _config(tmp_path: Path, out: Path, **extra) -> TrainConfig:
    data = yaml.safe_load(
        (Path(__file__).parents[1] / "configs" / "synthdoc" / "stage0-debug.yaml").read_text()
    )
    data.update(output_dir=str(out), tensorboard=False, deterministic=True, **extra)
    data["model"]["preset"] = str(_tiny_preset(tmp_path))
    data["dense"]["probe_documents"] = 2
    return TrainConfig.from_dict(data)


def test_stage0_runs_resumes_exactly_and_saves_a_tower(tmp_path):
    whole = run_training(_config(tmp_path, tmp_path / "whole"))
    assert whole.global_step == 4 and whole.eval_loss is not None
    probe_record = [
        r for r in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines() if "slice_char_acc" in r
    ]
    assert probe_record  # the probe is logged with the evaluation
    # stop after step 2 (its checkpoint), then resume to the end
    shutil.copytree(
        tmp_path / "whole", tmp_path / "part", ignore=shutil.ignore_patterns("step-000004", "final")
    )
    (tmp_path / "part" / "metrics.jsonl").unlink()
    cfg = _config(tmp_path, tmp_path / "part")
    resumed = run_training(cfg, resume=True)
    assert resumed.global_step == 4
    a = load_file(str(tmp_path / "whole" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "part" / "final" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert {k.split(".")[0] for k in a} == {"vision_tower", "dense_heads"}
    # stage 1 starts its tower from this folder
    from llava_uhd.train.setup import module_weights

    tower = module_weights(tmp_path / "whole" / "final", ("vision_tower",))
    assert tower and all(k.startswith("vision_tower.") for k in tower)
    with pytest.raises(CheckpointError, match="resampler"):
        module_weights(tmp_path / "whole" / "final", ("resampler",))


def test_stage0_resampler_trains_the_resampler_and_its_decoder_only():
    model = build_model(_with_vision(CONV), "dense_resampler")
    names = apply_stage(model, get_stage("stage0_resampler"))
    assert {n.split(".")[0] for n in names} == {"resampler", "dense_decoder"}
    assert not any(p.requires_grad for p in model.vision_tower.parameters())
    # the resampler is the language model's (its width), so stage 1 can start from it
    assert model.resampler.embed_dim == get_preset("synthdoc").text.config["hidden_size"]


def test_dense_decoder_reads_each_piece_from_its_own_tokens_only():
    torch.manual_seed(0)
    decoder = DenseDecoder(32, 2, 4, 4, 9, 6).eval()
    grids = torch.tensor([[2, 3], [4, 1], [1, 1]])
    tokens = torch.randn(3, 4, 32)
    with torch.no_grad():
        out = decoder(tokens, grids)
        assert out.glyph_logits.shape == (11, 4, 9) and out.colour_logits.shape == (11, 6)
        # packed and padded equals one piece at a time: padding never reaches a real patch
        alone = [decoder(tokens[i : i + 1], grids[i : i + 1]).glyph_logits for i in range(3)]
        torch.testing.assert_close(out.glyph_logits, torch.cat(alone), atol=1e-5, rtol=1e-5)
        other = tokens.clone()
        other[1] += 1.0
        moved = decoder(other, grids).glyph_logits
    assert torch.equal(moved[:6], out.glyph_logits[:6]) and torch.equal(moved[10:], out.glyph_logits[10:])
    assert not torch.allclose(moved[6:10], out.glyph_logits[6:10])


def test_stage0_resampler_starts_from_stage0_and_feeds_stage1(tmp_path):
    run_training(_config(tmp_path, tmp_path / "stage0"))
    tower_final = tmp_path / "stage0" / "final"
    data = _config(tmp_path, tmp_path / "resampler").to_dict()
    data["stage"] = "stage0_resampler"
    data["model"].update(init_from=str(tower_final), init_modules=["vision_tower"])
    data["dense"].update(windows=0, full_page_every=1)
    cfg = TrainConfig.from_dict(data)
    result = run_training(cfg)
    assert result.global_step == 4
    records = (tmp_path / "resampler" / "metrics.jsonl").read_text()
    assert "slice_char_acc" in records  # the probe reads through the resampler's tokens
    tower = load_file(str(tower_final / "model.safetensors"))
    state = load_file(str(tmp_path / "resampler" / "final" / "model.safetensors"))
    assert {k.split(".")[0] for k in state} == {"vision_tower", "resampler", "dense_decoder"}
    assert all(torch.equal(state[k], v) for k, v in tower.items() if k.startswith("vision_tower."))  # frozen

    from llava_uhd.model.configuration import LlavaUHDConfig
    from llava_uhd.model.llava_uhd import LlavaUHDForConditionalGeneration
    from llava_uhd.train.setup import module_weights

    preset = Preset.load(_tiny_preset(tmp_path))
    model = LlavaUHDForConditionalGeneration(LlavaUHDConfig.from_preset(preset))
    weights = module_weights(tmp_path / "resampler" / "final", ("vision_tower", "resampler"))
    loaded = model.load_state_dict(weights, strict=False)
    assert not loaded.unexpected_keys
    assert not [k for k in loaded.missing_keys if k.startswith(("vision_tower.", "resampler."))]


def test_probe_reads_characters_off_the_heads():
    slicing = get_preset("synthdoc").slicing.__class__(max_slices=2)
    model = build_model(_with_vision(CONV.__class__(**{**CONV.__dict__, "image_size": 336})))
    result = probe(model, slicing, documents=2)
    assert result["slice_chars"] > 0 and result["overview_chars"] > 0
    assert 0.0 <= result["slice_char_acc"] <= 1.0

    from llava_uhd.train import dense_stage

    page = page_sample(make_document(document_seed("validation", 0)), slicing)
    targets = torch.from_numpy(dense_stage._targets(page.doc, page.views, 14)[0])
    logits = torch.nn.functional.one_hot(targets, 9).float()

    def oracle(pixel_values, piece_grids):  # a perfect tower: the true label of every sub-cell
        return type("Out", (), {"glyph_logits": logits})()

    read = [r for k, reads in dense_stage.read_glyphs(oracle, page, 14) if k < page.num_slices for r in reads]
    shown = [r for r in read if r]
    assert len(shown) == len(page.doc.glyphs)  # the slices tile the page: each glyph read once
    assert sorted(shown) == sorted(g.char for g in page.doc.glyphs)


def test_feature_cache_is_exact_and_persists(tmp_path):
    vit = VisionTransformer(CONV).eval().requires_grad_(False)
    grids, pixels = _grids_and_pixels(2)
    expected = vit(pixels, grids)
    cache = FrozenFeatureCache(vit, tmp_path / "cache").install()
    torch.testing.assert_close(vit(pixels, grids), expected, rtol=0, atol=0)
    assert (cache.hits, cache.misses) == (0, 4)
    # the same pieces in another order and batch: all hits, the same features
    order = [2, 0]
    rows = torch.cat([torch.arange(0, 6) if i == 0 else torch.arange(10, 16) for i in order])
    torch.testing.assert_close(vit(pixels[rows], grids[order]), expected[rows], rtol=0, atol=0)
    assert cache.hits == 2
    cache.save()
    fresh = VisionTransformer(CONV).eval().requires_grad_(False)
    fresh.load_state_dict({k: v for k, v in vit.state_dict().items()})
    again = FrozenFeatureCache(fresh, tmp_path / "cache").install()
    torch.testing.assert_close(fresh(pixels, grids), expected, rtol=0, atol=0)
    assert again.misses == 0
    other = VisionTransformer(CONV).eval().requires_grad_(False)  # other weights: never its features
    assert FrozenFeatureCache(other, tmp_path / "cache").install().entries == {}
    with pytest.raises(ConfigError, match="frozen"):
        FrozenFeatureCache(VisionTransformer(CONV))

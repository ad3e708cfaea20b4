"""The baseline slicing modes (``resize``: LLaVA-1.5, ``anyres``: LLaVA-NeXT) against hand-worked examples,
and the ``uhd`` mode left exactly as it was."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from PIL import Image

from llava_uhd.budget import plan_with_budget
from llava_uhd.cli import main
from llava_uhd.config import TINY, Preset, SlicingConfig
from llava_uhd.errors import ConfigError
from llava_uhd.layout import layout_string, visual_token_count
from llava_uhd.model.flops import uhd_flops
from llava_uhd.pixels import image_patches, patches_to_piece
from llava_uhd.processing import LlavaUHDProcessor
from llava_uhd.slicing import PAD_FILL, Grid, Letterbox, Size, anyres_grid, apply_plan, plan_slices
from llava_uhd.synth.dense import piece_views

ANYRES = SlicingConfig(mode="anyres")
RESIZE = SlicingConfig(mode="resize")

# Worked by hand from LLaVA-NeXT's rule (S = 336). For each canvas (cols x rows tiles): scale =
# min(canvas_w / W, canvas_h / H); effective = min(int(W*scale) * int(H*scale), W*H); the largest effective
# wins, then the least waste (canvas area - effective), then the earlier canvas.
#   1000x500: 2x1 and 2x2 both show 672x336 = 225792; 2x1 wastes nothing            -> 2 cols x 1 row
#   800x600:  2x2 shows 672x504 = 338688; every other canvas under 151000            -> 2x2, 504 high: top 84
#   100x100:  every canvas shows all 10000 pixels; 1x2 and 2x1 waste the least, the
#             tall 1x2 is listed first                                                -> 1 col x 2 rows
#   2000x500: 3x1 shows 1008x252 = 254016 (2x1: 672x168)                             -> 3 cols, top 42
#   500x2000: the transpose                                                           -> 3 rows, left 42
#   1344x896: 2x2 shows 672x448 = 301056 (3x1: 504x336)                               -> 2x2, top 112
#   700x300:  3x1 upscales (x1.12) and shows all 210000 pixels; 2x1 shows 672x288     -> 3 cols x 1 row;
#             the letterbox width is ceil(700 * 1.12) and 700 * 1.12 is 784.0000000000001 in floats,
#             so 785 wide (as the reference computes), left (1008 - 785) // 2 = 111
#   1001x999: 2x2, width fills (672/1001 < 672/999): ceil(999 * 0.67133) = 671 high, the odd pixel
#             of slack at the bottom (top 0)
ANYRES_EXAMPLES = [
    ((1000, 500), Grid(rows=1, cols=2), Letterbox(0, 0, 672, 336)),
    ((800, 600), Grid(rows=2, cols=2), Letterbox(0, 84, 672, 504)),
    ((100, 100), Grid(rows=2, cols=1), Letterbox(0, 168, 336, 336)),
    ((2000, 500), Grid(rows=1, cols=3), Letterbox(0, 42, 1008, 252)),
    ((500, 2000), Grid(rows=3, cols=1), Letterbox(42, 0, 252, 1008)),
    ((1344, 896), Grid(rows=2, cols=2), Letterbox(0, 112, 672, 448)),
    ((700, 300), Grid(rows=1, cols=3), Letterbox(111, 0, 785, 336)),
    ((1001, 999), Grid(rows=2, cols=2), Letterbox(0, 0, 672, 671)),
]


@pytest.mark.parametrize(("size", "grid", "box"), ANYRES_EXAMPLES)
def test_anyres_canvas_and_letterbox(size: tuple[int, int], grid: Grid, box: Letterbox) -> None:
    plan = plan_slices(*size, ANYRES)
    assert plan.grid == grid
    assert plan.letterbox == box
    assert plan.slice_size == Size(336, 336) and plan.overview == Size(336, 336)
    assert plan.refine_size == Size(336 * grid.cols, 336 * grid.rows)
    assert plan.num_slices == grid.rows * grid.cols
    assert plan.vit_patches == (plan.num_slices + 1) * 24 * 24


def test_anyres_slice_limit_drops_bigger_canvases() -> None:
    assert anyres_grid(800, 600, 336, max_tiles=3) == Grid(rows=1, cols=2)  # 2x2 is out: 2x1 shows 448x336
    assert anyres_grid(800, 600, 336, max_tiles=1) is None
    only_base = plan_slices(800, 600, SlicingConfig(mode="anyres", max_slices=1))
    assert only_base.grid is None and only_base.letterbox is None and only_base.overview == Size(336, 336)


@pytest.mark.parametrize("size", [(1920, 1080), (10, 300), (1, 1), (4000, 100), (336, 336)])
def test_resize_is_one_square_view(size: tuple[int, int]) -> None:
    plan = plan_slices(*size, RESIZE)
    assert plan.pieces == (Size(336, 336),)
    assert plan.grid is None and plan.letterbox is None
    assert visual_token_count(plan, 64) == 64
    assert layout_string(plan) == "[overview]"


def test_token_counts_and_flops_follow_the_mode() -> None:
    size = (1024, 768)
    uhd, resize, anyres = (plan_slices(*size, SlicingConfig(mode=m)) for m in ("uhd", "resize", "anyres"))
    assert [visual_token_count(p, 64) for p in (uhd, resize, anyres)] == [7 * 64 + 6, 64, 5 * 64 + 4]
    assert [p.vit_patches for p in (resize, anyres)] == [576, 5 * 576]
    assert layout_string(anyres) == "[s1] , [s2] \\n [s3] , [s4] \\n [overview]"
    preset = Preset.from_dict({**TINY.to_dict(), "name": "x"})
    flops = [uhd_flops(preset, p, 0)["vit"] for p in (resize, anyres)]
    assert flops[1] == 5 * flops[0]  # five identical 24x24-patch pieces


def test_resize_distorts_the_aspect() -> None:
    # a 400x200 image whose left 100x100 corner is black: squashed to 336x336 it is 84 wide, 168 high
    image = Image.new("RGB", (400, 200), (255, 255, 255))
    image.paste((0, 0, 0), (0, 0, 100, 100))
    slices, overview = apply_plan(image, plan_slices(400, 200, RESIZE))
    pixels = np.asarray(overview)[..., 0]
    assert slices == [] and overview.size == (336, 336)
    assert pixels[160, 78] < 10 and pixels[176, 78] > 245  # the square ends at row 168 ...
    assert pixels[160, 90] > 245  # ... and at column 84


@pytest.mark.parametrize("resize_mode", ["exact", "fast"])
def test_anyres_pixels_padding_and_tiles(resize_mode: str) -> None:
    # 800x600 white page with a grey centre mark, on a 672x672 canvas: the image fills rows 84..587
    image = Image.new("RGB", (800, 600), (255, 255, 255))
    image.paste((128, 128, 128), (390, 290, 410, 310))
    plan = plan_slices(800, 600, ANYRES)
    flat = image_patches([image], [plan], ANYRES, mode=resize_mode)
    assert flat.shape[0] == plan.vit_patches
    mean = torch.tensor(ANYRES.image_mean).view(3, 1, 1)
    std = torch.tensor(ANYRES.image_std).view(3, 1, 1)
    per_piece = 24 * 24
    pieces = [
        (patches_to_piece(flat[i * per_piece : (i + 1) * per_piece], 24, 24, 14) * std + mean) * 255
        for i in range(5)
    ]
    top_left, bottom_left = pieces[0], pieces[2]
    fill = torch.tensor(PAD_FILL, dtype=torch.float32).view(3, 1)
    assert torch.allclose(top_left[:, :84].flatten(1), fill, atol=0.01)  # padding above the page
    assert torch.allclose(
        top_left[:, 86:320, :320].flatten(1), torch.full((3, 1), 255.0), atol=1.0
    )  # the page (off the mark)
    assert torch.allclose(bottom_left[:, 253:].flatten(1), fill, atol=0.01)  # below: 588 - 336 = 252
    assert torch.allclose(bottom_left[:, 12:250, :320].flatten(1), torch.full((3, 1), 255.0), atol=1.0)
    # the mark (page centre) lands at the canvas centre, the corner shared by the four tiles
    assert pieces[0][:, 330:, 330:].mean() < 230 and pieces[3][:, :6, :6].mean() < 230
    base = pieces[4]  # the whole page squashed to 336x336: no padding at all
    assert base.min() > 100


def test_piece_views_map_the_page_through_the_letterbox() -> None:
    plan = plan_slices(800, 600, ANYRES)
    views = piece_views(plan)
    assert len(views) == 5
    # page (400, 300) -> canvas (336, 84 + 252 = 336): the top-left corner of the bottom-right tile
    bottom_right = views[3]
    x, y = (
        400 * bottom_right.scale_x - bottom_right.offset_x,
        300 * bottom_right.scale_y - bottom_right.offset_y,
    )
    assert (x, y) == pytest.approx((0.0, 0.0))
    top_left = views[0]
    assert 0 * top_left.scale_y - top_left.offset_y == pytest.approx(84.0)  # the page's top edge


def test_processor_counts_and_budget_follow_the_mode(llama_tokenizer) -> None:
    for mode, pieces in (("resize", 1), ("anyres", 5)):
        preset = TINY.with_overrides(slicing={"mode": mode})
        processor = LlavaUHDProcessor(llama_tokenizer, preset)
        image = Image.new("RGB", (300, 200), (200, 10, 10))  # tiny: S = 112, the 2x2 canvas
        out = processor("Look: <image>", [image], add_special_tokens=False, return_plans=True)
        plan = out.plans[0]
        q = preset.resampler.num_queries
        assert plan.num_slices + 1 == pieces
        assert out["pixel_values"].shape[0] == pieces * 8 * 8
        assert out["input_ids"].shape[1] == len(
            processor.tokenizer.encode("Look: ", add_special_tokens=False)
        ) + (visual_token_count(plan, q))
    # under a token budget an anyres image falls back to smaller canvases, then to its base image
    plans = plan_with_budget([(800, 600)], ANYRES, num_queries=64, max_visual_tokens=200)
    assert plans[0].grid == Grid(rows=1, cols=2) and visual_token_count(plans[0], 64) == 194


def test_plan_command_mode_flag(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "700x300", "--mode", "anyres", "--json", "--flops"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["mode"] == "anyres" and record["grid"] == {"rows": 1, "cols": 3}
    assert record["letterbox"] == {"left": 111, "top": 0, "width": 785, "height": 336}
    assert record["llm_tokens"] == 4 * 64 + 3 and record["vit_patches"] == 4 * 576
    assert main(["plan", "700x300", "--mode", "resize", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["slices"] == [] and record["llm_tokens"] == 64
    assert main(["plan", "700x300", "--json"]) == 0
    assert "mode" not in json.loads(capsys.readouterr().out)  # uhd records are unchanged


def test_uhd_is_unchanged_and_saved_configs_load_as_uhd() -> None:
    # the plans of a grid of sizes under three configs, hashed before the modes existed
    digest = hashlib.sha256()
    for cfg in (SlicingConfig(), SlicingConfig(max_slices=7), SlicingConfig(scale_resolution=112)):
        for w in range(20, 3000, 97):
            for h in range(20, 3000, 89):
                plan = plan_slices(w, h, cfg)
                assert plan.letterbox is None
                digest.update(repr((plan.grid, plan.slice_size, plan.overview)).encode())
    assert digest.hexdigest() == "22091cbbe8a7801576a3590b3d75df594d7670187e848aca69b8ba08bb604079"
    saved = TINY.to_dict()
    del saved["slicing"]["mode"]  # a preset.yaml written before the field existed
    assert Preset.from_dict(saved).slicing.mode == "uhd"


def test_bad_modes_are_refused() -> None:
    with pytest.raises(ConfigError, match="slicing mode must be one of"):
        SlicingConfig(mode="tiles")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="multiple of patch_size"):
        SlicingConfig(mode="anyres", scale_resolution=340)

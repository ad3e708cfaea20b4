"""Presets (typed, validated, YAML round trip) and the token layout."""

from __future__ import annotations

import pytest

from llava_uhd.config import PRESETS, Preset, ResamplerConfig, SlicingConfig, VisionConfig, get_preset
from llava_uhd.errors import ConfigError
from llava_uhd.layout import Segment, layout_segments, layout_string, visual_token_count
from llava_uhd.slicing import plan_slices


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_round_trip_through_yaml(name, tmp_path):
    preset = PRESETS[name]
    assert Preset.from_yaml(preset.to_yaml()) == preset
    path = tmp_path / f"{name}.yaml"
    preset.save(path)
    assert get_preset(str(path)) == preset


def test_preset_facts():
    paper, official = PRESETS["paper"], PRESETS["official-v1"]
    assert (paper.slicing.max_slices, paper.resampler.num_queries, paper.resampler.kind) == (
        6,
        64,
        "perceiver",
    )
    assert (official.slicing.max_slices, official.resampler.num_queries, official.resampler.kind) == (
        7,
        144,
        "windowed",
    )
    assert paper.resampler.resolved_heads(5120) == 8
    assert official.resampler.resolved_heads(5120) == 40  # LLM hidden / 128 for 13B
    assert paper.vision.grid_side == 24 and paper.vision.feature_layer == -2
    assert official.template == "vicuna_v1"


def test_unknown_preset_and_fields_are_named():
    with pytest.raises(ConfigError, match="unknown preset 'nope'"):
        get_preset("nope")
    with pytest.raises(ConfigError, match=r"preset.slicing: unknown field\(s\) \['max_slice'\]"):
        Preset.from_dict({"name": "x", "slicing": {"max_slice": 3}})
    with pytest.raises(ConfigError, match="no such preset file"):
        get_preset("/nonexistent/preset.yaml")
    with pytest.raises(ConfigError, match="must be a mapping"):
        Preset.from_yaml("- 1\n- 2\n")


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: SlicingConfig(max_slices=0), "max_slices must be >= 1"),
        (lambda: SlicingConfig(patch_size=14, scale_resolution=10), "scale_resolution must be"),
        (lambda: SlicingConfig(pre_resize_long_side=0), "pre_resize_long_side"),
        (lambda: SlicingConfig(image_std=(1.0, 0.0, 1.0)), "image_std must be positive"),
        (lambda: ResamplerConfig(num_queries=10), "positive square"),
        (lambda: ResamplerConfig(kind="mlp"), "resampler kind"),
        (lambda: VisionConfig(hidden_size=30, num_heads=4), "not divisible"),
        (lambda: Preset(name="x", slicing=SlicingConfig(patch_size=16, scale_resolution=336)), "patch_size"),
    ],
)
def test_invalid_values_are_refused(make, message):
    with pytest.raises(ConfigError, match=message):
        make()


def test_with_overrides():
    preset = PRESETS["paper"].with_overrides(slicing={"max_slices": 4})
    assert preset.slicing.max_slices == 4 and preset.resampler == PRESETS["paper"].resampler
    with pytest.raises(ConfigError, match="unknown preset section"):
        PRESETS["paper"].with_overrides(nope={"a": 1})


def test_layout_of_a_sliced_image():
    plan = plan_slices(1024, 768)  # 3 cols x 2 rows
    segs = layout_segments(plan)
    assert [s.kind for s in segs] == ["piece", "separator"] * 6 + ["piece"]
    assert segs[-1] == Segment("piece", index=6)
    assert [s.text for s in segs if s.kind == "separator"] == [",", ",", "\n", ",", ",", "\n"]
    assert visual_token_count(plan, 64) == 6 * 65 + 64
    assert visual_token_count(plan, 64, {",": 2, "\n": 1}) == 6 * 64 + 64 + 4 * 2 + 2
    assert layout_string(plan) == "[s1] , [s2] , [s3] \\n [s4] , [s5] , [s6] \\n [overview]"
    assert "7 pieces x 64 tokens + 6 separators = 454 tokens" in layout_string(plan, 64)


def test_layout_of_an_unsliced_image():
    plan = plan_slices(300, 200)
    assert layout_segments(plan) == (Segment("piece", index=0),)
    assert visual_token_count(plan, 144) == 144
    assert layout_string(plan) == "[overview]"

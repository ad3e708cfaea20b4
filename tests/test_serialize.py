"""The one dict/YAML <-> dataclass serialiser behind presets and training configs."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import pytest

from llava_uhd.config import TINY, Preset
from llava_uhd.errors import ConfigError
from llava_uhd.serialize import dump_yaml, from_plain, load_yaml_mapping, to_plain
from llava_uhd.train.config import TrainConfig


@dataclass(frozen=True)
class Inner:
    rate: float = 0.5
    count: int = 1
    flag: bool = False
    limit: int | None = None
    names: tuple[str, ...] = ("a", "b")
    mode: Literal["x", "y"] = "x"


@dataclass(frozen=True)
class Outer:
    name: str
    inner: Inner = field(default_factory=Inner)
    extra: Mapping[str, Any] | None = None


def test_round_trip_keeps_field_order_tuples_and_mappings() -> None:
    outer = Outer("o", Inner(rate=0.25, names=("q",)), extra={"k": [1, 2]})
    plain = to_plain(outer)
    assert list(plain) == ["name", "inner", "extra"]
    assert plain["inner"]["names"] == ["q"]
    assert from_plain(Outer, plain, "outer") == outer
    assert dump_yaml(outer).splitlines()[:3] == ["name: o", "inner:", "  rate: 0.25"]


def test_yaml_numbers_and_null_sections() -> None:
    # YAML 1.1 reads 1e-3 as a string; the field's type says it is a number
    assert from_plain(Outer, {"name": "o", "inner": {"rate": "1e-3", "count": True}}, "o").inner.rate == 1e-3
    assert from_plain(Outer, {"name": "o", "inner": {"rate": 2}}, "o").inner.rate == 2.0
    assert from_plain(Outer, {"name": "o", "inner": None}, "o").inner == Inner()
    assert from_plain(Outer, {"name": "o", "inner": {"limit": None}}, "o").inner.limit is None


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ([1], r"^outer: expected a mapping, got list$"),
        ({"name": "o", "inner": 3}, r"^outer.inner: expected a mapping, got int$"),
        (
            {"name": "o", "nme": 1},
            r"^outer: unknown field\(s\) \['nme'\]; known: \['extra', 'inner', 'name'\]$",
        ),
        ({"name": "o", "inner": {"rate": "fast"}}, r"^outer.inner.rate must be a number, got 'fast'$"),
        ({"name": "o", "inner": {"count": 1.5}}, r"^outer.inner.count must be an integer, got 1.5$"),
        ({"name": "o", "inner": {"flag": "yes"}}, r"^outer.inner.flag must be true or false, got 'yes'$"),
        ({"name": "o", "inner": {"count": None}}, r"^outer.inner.count must not be null$"),
        ({"inner": {}}, r"^outer: .*missing 1 required positional argument: 'name'"),
    ],
)
def test_errors_name_the_key(data: Any, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        from_plain(Outer, data, "outer")


def test_yaml_text_must_be_a_mapping() -> None:
    assert load_yaml_mapping("a: 1\n", "a thing") == {"a": 1}
    with pytest.raises(ConfigError, match="^a thing must be a mapping, got list$"):
        load_yaml_mapping("- 1\n", "a thing")
    with pytest.raises(ConfigError, match="^a thing is not valid YAML: "):
        load_yaml_mapping("a: [1,\n", "a thing")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"name: [unclosed\n  x: {", r"a preset is not valid YAML: while parsing a flow sequence: expected "),
        (b"a: 1\n b: 2\n", r"a preset is not valid YAML: mapping values are not allowed here at line 2, col"),
        (b"a: \x00\n", r"a preset is not valid YAML: unacceptable character #x0000"),
        (b"\xff\xfe name: x", r"not UTF-8 text \(invalid start byte at byte 0\)"),
        (b"- 1\n", r"a preset must be a mapping, got list"),
    ],
)
def test_a_bad_yaml_file_is_one_line_naming_the_file(tmp_path, content: bytes, message: str) -> None:
    path = tmp_path / "preset.yaml"
    path.write_bytes(content)
    for load in (Preset.load, TrainConfig.load):
        with pytest.raises(ConfigError) as info:
            load(path)
        assert str(info.value).startswith(f"{path}: ") and "\n" not in str(info.value)
    with pytest.raises(ConfigError, match=message):
        Preset.load(path)


def test_a_bad_value_in_a_preset_file_names_the_file(tmp_path) -> None:
    path = tmp_path / "preset.yaml"
    path.write_text("name: x\nslicing: {max_slices: 0}\n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}: max_slices must be >= 1, got 0$"):
        Preset.load(path)


def test_presets_and_train_configs_read_numbers_the_same_way() -> None:
    preset = Preset.from_yaml(TINY.to_yaml().replace("layer_norm_eps: 1.0e-06", "layer_norm_eps: 1e-6"))
    assert preset == TINY and isinstance(preset.resampler.layer_norm_eps, float)
    with pytest.raises(ConfigError, match="preset.slicing.max_slices must be an integer, got '6'"):
        Preset.from_dict({"name": "x", "slicing": {"max_slices": "6"}})
    config = TrainConfig.from_dict({"stage": "stage1", "output_dir": "o", "optim": {"lr": "1e-4"}})
    assert config.optim.lr == 1e-4


def test_train_config_refuses_an_unknown_bad_sample_policy() -> None:
    with pytest.raises(
        ConfigError, match=r"data.on_bad_sample must be one of \('error', 'skip'\), got 'ignore'"
    ):
        TrainConfig.from_dict(
            {
                "stage": "stage1",
                "output_dir": "o",
                "data": {"synthetic_samples": 1, "on_bad_sample": "ignore"},
            }
        )

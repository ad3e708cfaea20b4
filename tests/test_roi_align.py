"""RoIAlign: hand-computed bilinear samples, a scalar reference written from torchvision's kernel rules,
the separable grid path, and torchvision itself where it works with the installed torch."""

from __future__ import annotations

import math

import pytest
import torch

from llava_uhd.errors import ModelInputError
from llava_uhd.model.roi_align import (
    grid_boxes,
    roi_align,
    roi_align_grid,
    roi_align_torch,
    torchvision_roi_align_available,
)

# A small non-linear feature map (H=3, W=4) so that bilinear weights matter.
FEATURE = torch.tensor([[1.0, 2.0, 0.0, 7.0], [3.0, 9.0, 4.0, 1.0], [5.0, 0.0, 6.0, 2.0]])[None, None]


def _one(box: tuple[float, float, float, float], size: tuple[int, int] = (1, 1), **kw) -> torch.Tensor:
    boxes = torch.tensor([[0.0, *box]])
    return roi_align_torch(FEATURE, boxes, size, **kw)[0, 0]


@pytest.mark.parametrize(
    ("box", "expected"),
    [
        # 1x1 box, one sample at (0.5, 0.5): the mean of the four corner cells (1 + 2 + 3 + 9) / 4.
        ((0.0, 0.0, 1.0, 1.0), 3.75),
        # one sample at x=1.25, y=0.75: 0.25 * (0.75*2 + 0.25*0) + 0.75 * (0.75*9 + 0.25*4).
        ((0.75, 0.25, 1.75, 1.25), 6.1875),
        # two samples at x=-2.625, -1.875: both beyond -1, so zero.
        ((-3.0, 0.0, -1.5, 1.0), 0.0),
        # samples at x=-1.0 (on the boundary: kept, clamped to 0) and 0.0, y=0.5: both (1 + 3) / 2.
        ((-1.5, 0.0, 0.5, 1.0), 2.0),
        # samples at x=-1.1 (dropped, but still counted in the mean) and -0.1 (clamped to 0): (0 + 2) / 2.
        ((-1.6, 0.0, 0.4, 1.0), 1.0),
        # one sample at x=3.7 > W-1: clamped to the last column, y=0.5: (7 + 1) / 2.
        ((3.2, 0.0, 4.2, 1.0), 4.0),
        # x=4.5 > W: dropped.
        ((4.0, 0.0, 5.0, 1.0), 0.0),
        # a 0.2-wide box is widened to 1 cell (aligned=False): sample at x=1.5, y=1.5.
        ((1.0, 1.0, 1.2, 1.2), 0.25 * (9 + 4 + 0 + 6)),
    ],
)
def test_hand_computed_bilinear_samples(box, expected):
    assert _one(box).item() == pytest.approx(expected, abs=1e-6)


def test_adaptive_sampling_ratio_is_per_box():
    # A 2x2 box pooled to 1x1 takes ceil(2/1) = 2 samples per axis at 1.0 and 2.0 (not one at its centre).
    x, y = (1.0, 2.0), (1.0, 2.0)
    samples = [FEATURE[0, 0, int(j), int(i)].item() for j in y for i in x]
    together = roi_align_torch(FEATURE, torch.tensor([[0.0, 0.5, 0.5, 2.5, 2.5], [0.0, 0, 0, 1, 1]]), (1, 1))
    assert together[0, 0, 0, 0].item() == pytest.approx(sum(samples) / 4)
    assert together[1, 0, 0, 0].item() == pytest.approx(3.75)  # the 1x1 box in the same call keeps one sample
    fixed = _one((0.5, 0.5, 2.5, 2.5), sampling_ratio=1)  # one sample at the centre (1.5, 1.5)
    assert fixed.item() == pytest.approx(0.25 * (9 + 4 + 0 + 6))


def _bilinear(feature: torch.Tensor, y: float, x: float) -> float:
    """torchvision's bilinear_interpolate for one channel, as scalar Python."""
    height, width = feature.shape
    if y < -1.0 or y > height or x < -1.0 or x > width:
        return 0.0
    y, x = max(y, 0.0), max(x, 0.0)
    y_low, x_low = int(y), int(x)
    if y_low >= height - 1:
        y_low = y_high = height - 1
        y = float(y_low)
    else:
        y_high = y_low + 1
    if x_low >= width - 1:
        x_low = x_high = width - 1
        x = float(x_low)
    else:
        x_high = x_low + 1
    ly, lx = y - y_low, x - x_low
    hy, hx = 1.0 - ly, 1.0 - lx
    f = feature.tolist()
    return (
        hy * hx * f[y_low][x_low]
        + hy * lx * f[y_low][x_high]
        + ly * hx * f[y_high][x_low]
        + ly * lx * f[y_high][x_high]
    )


def reference_roi_align(feature, boxes, output_size, spatial_scale=1.0, sampling_ratio=-1, aligned=False):
    """An independent scalar RoIAlign: torchvision's CPU kernel, one sample at a time."""
    pooled_h, pooled_w = output_size
    out = torch.zeros(boxes.shape[0], feature.shape[1], pooled_h, pooled_w, dtype=torch.float64)
    offset = 0.5 if aligned else 0.0
    for k, (b, x1, y1, x2, y2) in enumerate(boxes.tolist()):
        start_w, start_h = x1 * spatial_scale - offset, y1 * spatial_scale - offset
        roi_w, roi_h = x2 * spatial_scale - offset - start_w, y2 * spatial_scale - offset - start_h
        if not aligned:
            roi_w, roi_h = max(roi_w, 1.0), max(roi_h, 1.0)
        bin_h, bin_w = roi_h / pooled_h, roi_w / pooled_w
        grid_h = sampling_ratio if sampling_ratio > 0 else math.ceil(roi_h / pooled_h)
        grid_w = sampling_ratio if sampling_ratio > 0 else math.ceil(roi_w / pooled_w)
        count = max(grid_h * grid_w, 1)
        for c in range(feature.shape[1]):
            for ph in range(pooled_h):
                for pw in range(pooled_w):
                    total = 0.0
                    for iy in range(grid_h):
                        y = start_h + ph * bin_h + (iy + 0.5) * bin_h / grid_h
                        for ix in range(grid_w):
                            x = start_w + pw * bin_w + (ix + 0.5) * bin_w / grid_w
                            total += _bilinear(feature[int(b), c], y, x)
                    out[k, c, ph, pw] = total / count
    return out


def _random_boxes(
    generator: torch.Generator, count: int, batch: int, height: int, width: int
) -> torch.Tensor:
    """Boxes of many sizes, some hanging over the edges or entirely outside."""
    x1 = torch.rand(count, generator=generator) * (width + 4) - 3
    y1 = torch.rand(count, generator=generator) * (height + 4) - 3
    x2 = x1 + torch.rand(count, generator=generator) * width * 0.9
    y2 = y1 + torch.rand(count, generator=generator) * height * 0.9
    index = torch.randint(0, batch, (count,), generator=generator).float()
    return torch.stack([index, x1, y1, x2, y2], dim=1)


@pytest.mark.parametrize("output_size", [(2, 4), (3, 3), (4, 3), (1, 1)])
@pytest.mark.parametrize(
    "options",
    [{}, {"sampling_ratio": 2}, {"aligned": True}, {"spatial_scale": 0.5}],
    ids=["adaptive", "ratio2", "aligned", "scale0.5"],
)
def test_matches_scalar_reference(output_size, options):
    generator = torch.Generator().manual_seed(0)
    feature = torch.randn(2, 3, 7, 9, generator=generator)
    boxes = _random_boxes(generator, 12, batch=2, height=7, width=9)
    ours = roi_align_torch(feature, boxes, output_size, **options)
    expected = reference_roi_align(feature, boxes, output_size, **options)
    assert ours.dtype == torch.float32 and ours.shape == (12, 3, *output_size)
    torch.testing.assert_close(ours.double(), expected, rtol=1e-5, atol=1e-5)


def test_grid_path_equals_box_path():
    """The separable grid path gives the same pooling as the general one on the expanded boxes."""
    generator = torch.Generator().manual_seed(1)
    feature = torch.randn(3, 5, 11, 17, generator=generator)
    rows, cols = 4, 3
    row_bounds = torch.tensor([[i * 11 / rows, (i + 1) * 11 / rows] for i in range(rows)])
    col_bounds = torch.tensor([[j * 17 / cols, (j + 1) * 17 / cols] for j in range(cols)])
    grid = roi_align_grid(feature, row_bounds, col_bounds, (2, 3), use_torchvision=False)
    boxes = grid_boxes(row_bounds, col_bounds, batch=3)
    assert boxes[rows * cols + 1].tolist() == pytest.approx(
        [1.0, 17 / 3, 0.0, 34 / 3, 11 / 4]
    )  # map 1, box (0, 1)
    flat = roi_align_torch(feature, boxes, (2, 3))
    assert grid.shape == (3, rows, cols, 5, 2, 3)
    torch.testing.assert_close(grid.reshape(-1, 5, 2, 3), flat, rtol=1e-5, atol=1e-6)


def test_low_precision_input_is_pooled_in_float32():
    generator = torch.Generator().manual_seed(2)
    feature = torch.randn(1, 4, 6, 6, generator=generator).to(torch.bfloat16)
    boxes = torch.tensor([[0.0, 0.3, 0.7, 4.9, 5.2]])
    out = roi_align_torch(feature, boxes, (3, 3))
    assert out.dtype == torch.bfloat16
    expected = reference_roi_align(feature.float(), boxes, (3, 3)).to(torch.bfloat16)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_rejects_bad_shapes():
    with pytest.raises(ModelInputError, match=r"\(K, 5\).*\(3, 4\)"):
        roi_align_torch(FEATURE, torch.zeros(3, 4), (1, 1))
    with pytest.raises(ModelInputError, match=r"\(B, C, H, W\).*\(3, 4\)"):
        roi_align_torch(FEATURE[0, 0], torch.zeros(1, 5), (1, 1))
    with pytest.raises(ModelInputError, match=r"output_size.*\(0, 2\)"):
        roi_align_torch(FEATURE, torch.zeros(1, 5), (0, 2))


@pytest.mark.skipif(
    not torchvision_roi_align_available(),
    reason="torchvision is not importable or does not run with this torch build",
)
@pytest.mark.parametrize("aligned", [False, True])
def test_matches_torchvision(aligned):
    from torchvision.ops import roi_align as tv_roi_align

    generator = torch.Generator().manual_seed(3)
    feature = torch.randn(2, 4, 13, 10, generator=generator)
    boxes = _random_boxes(generator, 20, batch=2, height=13, width=10)
    for output_size in [(2, 4), (3, 3), (4, 3)]:
        expected = tv_roi_align(
            feature, boxes, output_size, spatial_scale=1.0, sampling_ratio=-1, aligned=aligned
        )
        ours = roi_align_torch(feature, boxes, output_size, aligned=aligned)
        torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(roi_align(feature, boxes, (3, 3)), tv_roi_align(feature, boxes, (3, 3)))

"""RoIAlign (He et al., Mask R-CNN, 2017) with torchvision's exact sampling rules, in pure torch.

The released LLaVA-UHD checkpoint pools each of its 12x12 key/value windows with
``torchvision.ops.roi_align``. torchvision is optional here (its wheels are tied to one torch
build, and with the CPU torch 2.13 it fails to import), so this module reproduces its CPU/CUDA kernel:

* a box (x1, y1, x2, y2) is scaled by ``spatial_scale``; with ``aligned=False`` its sides are clamped to
  at least one cell, with ``aligned=True`` it is shifted by -0.5 and not clamped;
* each of the ``pooled`` bins along an axis averages ``g`` evenly spaced samples, ``g = sampling_ratio``
  or, when that is <= 0, ``ceil(roi_length / pooled)`` (chosen per box, "adaptive");
* a sample beyond -1 or beyond ``size`` contributes 0 (but still counts in the average); otherwise it is
  clamped to [0, size - 1] and read bilinearly.

Bilinear sampling and the validity rule are separable in y and x, so pooling one box is
``Ay @ feature @ Ax^T`` with two small interpolation matrices (``Ay``: pooled_h x H, ``Ax``: pooled_w x W).
That turns the whole operation into batched matrix products: no loop per box, and for a grid of boxes
that share row and column intervals (the resampler's windows) the matrices are shared too.

Computed in float32 whatever the input dtype, the result cast back.

Dimensions: K boxes, B feature maps, C channels, H x W feature map, ph x pw pooled size,
R x S grid of row x column intervals, G samples per bin (padded to the largest over boxes).
"""

from __future__ import annotations

import functools
import logging

import torch

from llava_uhd.errors import ModelInputError

logger = logging.getLogger(__name__)

# A box coordinate tensor row: (batch index, x1, y1, x2, y2), as torchvision takes it.
_BOX_COLUMNS = 5


@functools.lru_cache(maxsize=1)
def torchvision_roi_align_available() -> bool:
    """True if ``torchvision.ops.roi_align`` imports and runs with the installed torch.

    torchvision builds are tied to one torch version; a mismatched one imports but fails on its first
    operator (``operator torchvision::nms does not exist``), so one tiny call is made to be sure.
    """
    try:
        from torchvision.ops import roi_align as tv_roi_align

        tv_roi_align(torch.zeros(1, 1, 2, 2), torch.tensor([[0.0, 0.0, 0.0, 1.0, 1.0]]), (1, 1))
    except (ImportError, RuntimeError, OSError, AttributeError) as exc:
        logger.debug("torchvision RoIAlign unavailable, using the torch implementation: %s", exc)
        return False
    return True


def axis_weights(
    start: torch.Tensor,
    end: torch.Tensor,
    pooled: int,
    size: int,
    *,
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    aligned: bool = False,
) -> torch.Tensor:
    """Interpolation matrices of RoIAlign along one axis.

    Args:
        start, end: (K,) interval ends in input coordinates (x1/x2 or y1/y2 of K boxes).
        pooled: output bins along this axis.
        size: feature-map length along this axis.

    Returns:
        (K, pooled, size) float32: row ``p`` of box ``k`` holds the weights that average bin ``p``'s
        samples, i.e. pooled[k, p] = sum_i weights[k, p, i] * feature[i] along this axis.
    """
    if pooled < 1 or size < 1:
        raise ModelInputError(f"RoIAlign needs pooled >= 1 and size >= 1, got pooled={pooled}, size={size}")
    start = start.to(torch.float32)
    end = end.to(torch.float32)
    offset = 0.5 if aligned else 0.0
    roi_start = start * spatial_scale - offset  # (K,)
    roi_length = end * spatial_scale - offset - roi_start
    if not aligned:  # torchvision forces malformed boxes to 1x1 only in the legacy mode
        roi_length = roi_length.clamp(min=1.0)
    bin_size = roi_length / pooled  # (K,)
    if sampling_ratio > 0:
        grid = torch.full_like(bin_size, float(sampling_ratio))
    else:  # adaptive, per box: about one sample per input cell of the bin
        grid = torch.ceil(roi_length / pooled)
    grid = grid.clamp(min=1.0)  # a degenerate (aligned) box still averages over max(count, 1)
    max_grid = int(grid.max().item()) if grid.numel() else 1

    bins = torch.arange(pooled, dtype=torch.float32, device=start.device)  # (ph,)
    steps = torch.arange(max_grid, dtype=torch.float32, device=start.device)  # (G,)
    # Same operation order as torchvision: start + p * bin + (s + 0.5) * bin / g.
    pos = (
        roi_start[:, None, None]
        + bins[None, :, None] * bin_size[:, None, None]
        + (steps[None, None, :] + 0.5) * bin_size[:, None, None] / grid[:, None, None]
    )  # (K, ph, G)
    in_grid = steps[None, None, :] < grid[:, None, None]  # padding samples of boxes with a smaller g
    valid = in_grid & (pos >= -1.0) & (pos <= size)
    pos = pos.clamp(min=0.0)
    low = pos.floor().clamp(max=size - 1)
    at_edge = low >= size - 1  # the last cell: both corners collapse onto it
    pos = torch.where(at_edge, low, pos)
    high = torch.where(at_edge, low, low + 1)
    frac = pos - low
    scale = valid.to(torch.float32) / grid[:, None, None]  # each sample's share of the bin average
    weights = torch.zeros(start.shape[0], pooled, size, dtype=torch.float32, device=start.device)
    weights.scatter_add_(2, low.long(), (1.0 - frac) * scale)
    weights.scatter_add_(2, high.long(), frac * scale)
    return weights


def _check_input(input: torch.Tensor, output_size: tuple[int, int]) -> None:
    if input.dim() != 4:
        raise ModelInputError(f"RoIAlign input must be (B, C, H, W), got shape {tuple(input.shape)}")
    if len(output_size) != 2 or min(output_size) < 1:
        raise ModelInputError(f"RoIAlign output_size must be (height, width) >= 1, got {output_size!r}")


def roi_align_torch(
    input: torch.Tensor,
    boxes: torch.Tensor,
    output_size: tuple[int, int],
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    aligned: bool = False,
) -> torch.Tensor:
    """RoIAlign in pure torch; the arguments and result of ``torchvision.ops.roi_align``.

    Args:
        input: (B, C, H, W) feature maps.
        boxes: (K, 5) rows of (batch index, x1, y1, x2, y2).
        output_size: (ph, pw), pooled height then width.

    Returns:
        (K, C, ph, pw) in the input's dtype.
    """
    _check_input(input, output_size)
    if boxes.dim() != 2 or boxes.shape[1] != _BOX_COLUMNS:
        raise ModelInputError(
            f"RoIAlign boxes must be (K, 5) rows of (batch, x1, y1, x2, y2), got {tuple(boxes.shape)}"
        )
    pooled_h, pooled_w = output_size
    height, width = input.shape[-2:]
    options = {"spatial_scale": spatial_scale, "sampling_ratio": sampling_ratio, "aligned": aligned}
    weights_y = axis_weights(boxes[:, 2], boxes[:, 4], pooled_h, height, **options)  # (K, ph, H)
    weights_x = axis_weights(boxes[:, 1], boxes[:, 3], pooled_w, width, **options)  # (K, pw, W)
    features = input.to(torch.float32)[boxes[:, 0].long()]  # (K, C, H, W)
    pooled = torch.einsum("kchw,kqw->kchq", features, weights_x)  # (K, C, H, pw)
    pooled = torch.einsum("kph,kchq->kcpq", weights_y, pooled)  # (K, C, ph, pw)
    return pooled.to(input.dtype)


def roi_align(
    input: torch.Tensor,
    boxes: torch.Tensor,
    output_size: tuple[int, int],
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    aligned: bool = False,
) -> torch.Tensor:
    """RoIAlign: ``torchvision.ops.roi_align`` when it works here, else :func:`roi_align_torch`.

    Both compute in float32 and return the input's dtype.
    """
    if torchvision_roi_align_available():
        from torchvision.ops import roi_align as tv_roi_align

        out = tv_roi_align(
            input.to(torch.float32),
            boxes.to(torch.float32),
            output_size,
            spatial_scale=spatial_scale,
            sampling_ratio=sampling_ratio,
            aligned=aligned,
        )
        return out.to(input.dtype)
    return roi_align_torch(input, boxes, output_size, spatial_scale, sampling_ratio, aligned)


def grid_boxes(row_bounds: torch.Tensor, col_bounds: torch.Tensor, batch: int) -> torch.Tensor:
    """(B * R * S, 5) boxes of a grid: batch-major, then row-major over (row interval, column interval).

    Args:
        row_bounds: (R, 2) rows' (y1, y2). col_bounds: (S, 2) columns' (x1, x2).
    """
    rows, cols = row_bounds.shape[0], col_bounds.shape[0]
    y = row_bounds.to(torch.float32)[:, None, :].expand(rows, cols, 2)
    x = col_bounds.to(torch.float32)[None, :, :].expand(rows, cols, 2)
    one = torch.stack([x[..., 0], y[..., 0], x[..., 1], y[..., 1]], dim=-1).reshape(rows * cols, 4)
    index = torch.arange(batch, dtype=torch.float32, device=one.device).repeat_interleave(rows * cols)
    return torch.cat([index[:, None], one.repeat(batch, 1)], dim=1)


def roi_align_grid(
    input: torch.Tensor,
    row_bounds: torch.Tensor,
    col_bounds: torch.Tensor,
    output_size: tuple[int, int],
    *,
    sampling_ratio: int = -1,
    use_torchvision: bool | None = None,
) -> torch.Tensor:
    """RoIAlign of every box of a grid, in every feature map (spatial scale 1, aligned=False).

    Box (i, j) spans rows ``row_bounds[i]`` and columns ``col_bounds[j]``. The separable path shares one
    (ph x H) matrix per grid row and one (pw x W) matrix per grid column across all maps, so its cost is
    two matrix products over the maps; torchvision's kernel, when available, gets the expanded boxes.

    Args:
        input: (B, C, H, W) feature maps (all of the same size).
        row_bounds: (R, 2) (y1, y2) per grid row. col_bounds: (S, 2) (x1, x2) per grid column.
        output_size: (ph, pw).
        use_torchvision: None picks torchvision when it works; False forces the torch path.

    Returns:
        (B, R, S, C, ph, pw) in the input's dtype.
    """
    _check_input(input, output_size)
    batch, channels, height, width = input.shape
    pooled_h, pooled_w = output_size
    rows, cols = row_bounds.shape[0], col_bounds.shape[0]
    if use_torchvision is None:
        use_torchvision = torchvision_roi_align_available()
    if use_torchvision:
        boxes = grid_boxes(row_bounds, col_bounds, batch).to(input.device)
        out = roi_align(input, boxes, output_size, sampling_ratio=sampling_ratio)  # (B*R*S, C, ph, pw)
        return out.reshape(batch, rows, cols, channels, pooled_h, pooled_w)
    options = {"sampling_ratio": sampling_ratio}
    weights_y = axis_weights(row_bounds[:, 0], row_bounds[:, 1], pooled_h, height, **options)  # (R, ph, H)
    weights_x = axis_weights(col_bounds[:, 0], col_bounds[:, 1], pooled_w, width, **options)  # (S, pw, W)
    features = input.to(torch.float32)
    pooled = torch.einsum("bchw,sqw->bchsq", features, weights_x)  # (B, C, H, S, pw)
    pooled = torch.einsum("rph,bchsq->brscpq", weights_y, pooled)  # (B, R, S, C, ph, pw)
    return pooled.to(input.dtype)

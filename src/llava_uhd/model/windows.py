"""Window geometry of the released checkpoint's spatially constrained resampler. Pure Python, no torch.

Kept apart from :mod:`.resampler_windowed` so that FLOPs accounting (``llava-uhd plan --flops``) can
use the same pooled-size rule without importing torch.
"""

from __future__ import annotations

import math

from llava_uhd.errors import ModelInputError

# The released code's pooled sizes per window, as (width, height): 8, 6, 12, 9, 8, 6, 12 cells. The one
# whose aspect ratio is closest (in log) to the feature map's wins; a tie keeps the earlier candidate.
POOLED_SIZES_WH: tuple[tuple[int, int], ...] = ((4, 2), (3, 2), (4, 3), (3, 3), (2, 4), (2, 3), (3, 4))
# The released search starts from a square pooled size (it is replaced by the first candidate anyway).
DEFAULT_POOLED_WH = (3, 3)


def pooled_size(rows: int, cols: int) -> tuple[int, int]:
    """The (height, width) every window of a (rows x cols) feature map is RoIAligned to.

    Picks the candidate (w, h) with the smallest |log(cols/rows) - log(w/h)| (strict <, so the first of
    equal candidates wins), computed with Python floats exactly as the released code does.
    """
    if rows < 1 or cols < 1:
        raise ModelInputError(f"feature map must be at least 1x1 patches, got rows={rows}, cols={cols}")
    log_ratio = math.log(cols / rows)
    best_w, best_h = DEFAULT_POOLED_WH
    best_error = float("inf")
    for w, h in POOLED_SIZES_WH:
        error = abs(log_ratio - math.log(w / h))
        if error < best_error:
            best_w, best_h, best_error = w, h, error
    return best_h, best_w

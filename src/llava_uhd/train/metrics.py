"""Run metrics on rank 0: a tqdm bar (loss, lr, samples/s, ETA), a JSONL file and TensorBoard if installed.

Other ranks get a logger that does nothing, so the loop never branches on the rank to log.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"


class MetricsLogger:
    """Writes one JSON object per logged step to ``<output_dir>/metrics.jsonl`` and drives the progress bar."""

    def __init__(
        self, output_dir: Path, total_steps: int, initial_step: int, enabled: bool, tensorboard: bool = True
    ) -> None:
        self.enabled = enabled
        self._bar = None
        self._writer = None
        self._file = None
        self._last_time = time.perf_counter()
        self._last_samples = 0
        self._wall_start = time.perf_counter()
        if not enabled:
            return
        from tqdm.auto import tqdm

        output_dir.mkdir(parents=True, exist_ok=True)
        # wall_s counts training time over every resumed part of a run (for accuracy-against-time curves)
        self._wall_start -= _last_wall_time(output_dir / METRICS_FILE)
        # append: a resumed run continues the same file
        self._file = (output_dir / METRICS_FILE).open("a", encoding="utf-8")
        self._bar = tqdm(
            total=total_steps, initial=initial_step, desc="train", unit="step", dynamic_ncols=True
        )
        if tensorboard and importlib.util.find_spec("tensorboard") is not None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(output_dir / "tensorboard"))
        elif tensorboard:
            logger.info("tensorboard is not installed; metrics go to %s only", output_dir / METRICS_FILE)

    def log(self, step: int, samples_seen: int, **values: Any) -> dict[str, Any]:
        """Record the metrics of optimiser step ``step``; adds samples/s since the previous call."""
        now = time.perf_counter()
        elapsed = max(now - self._last_time, 1e-9)
        record = {
            "step": step,
            **values,
            "samples_per_s": (samples_seen - self._last_samples) / elapsed,
            "wall_s": round(now - self._wall_start, 3),
        }
        self._last_time, self._last_samples = now, samples_seen
        if not self.enabled:
            return record
        assert self._file is not None and self._bar is not None
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        postfix = {"loss": f"{values['loss']:.4f}"} if "loss" in values else {}
        if "lr" in values:
            postfix["lr"] = f"{values['lr']:.2e}"
        postfix["samples/s"] = f"{record['samples_per_s']:.1f}"
        self._bar.set_postfix(postfix, refresh=False)
        if self._writer is not None:
            for key, value in record.items():
                if isinstance(value, int | float) and key != "step":
                    self._writer.add_scalar(f"train/{key}", value, step)
        return record

    def advance(self, steps: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(steps)

    def reset_clock(self, samples_seen: int) -> None:
        """Start the samples/s window now (after a resume, or after an eval pass)."""
        self._last_time, self._last_samples = time.perf_counter(), samples_seen

    def close(self) -> None:
        for thing in (self._bar, self._writer, self._file):
            if thing is not None:
                thing.close()


def _last_wall_time(path: Path) -> float:
    """The ``wall_s`` of the last record of an earlier part of this run, 0 for a fresh run."""
    if not path.is_file():
        return 0.0
    last = 0.0
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            last = float(json.loads(line).get("wall_s", last))
        except (ValueError, AttributeError):  # a line cut short by a kill: the records before it count
            continue
    return last

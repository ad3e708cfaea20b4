"""The server's counters, written as Prometheus text (exposition format 0.0.4) at ``GET /metrics``.

Requests and responses by status code, queue depth, batch sizes, generated tokens and the time spent
generating them, seconds per stage (image decode, slicing, ViT, resampler, prefill, decode steps) and the
image-feature cache's hits, misses and size, and the images encoded (runs of ViT + resampler). Thread-safe:
the model thread and request handlers both count.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable

STAGES = ("image_decode", "slicing", "vit", "resampler", "prefill", "decode_steps")
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
PREFIX = "llava_uhd"


class Metrics:
    """Counters of one server; :meth:`render` writes them in the Prometheus text format."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: Counter[str] = Counter()  # by endpoint
        self.responses: Counter[int] = Counter()  # by HTTP status
        self.stage_seconds: Counter[str] = Counter()
        self.batch_sizes: Counter[int] = Counter()
        self.generated_tokens = 0
        self.generation_seconds = 0.0
        self.images_encoded = 0
        self.gauges: dict[str, Callable[[], float]] = {}

    def count_request(self, endpoint: str, status: int) -> None:
        with self._lock:
            self.requests[endpoint] += 1
            self.responses[status] += 1

    def add_stage(self, stage: str, seconds: float) -> None:
        with self._lock:
            self.stage_seconds[stage] += seconds

    def add_batch(self, size: int, tokens: int, seconds: float) -> None:
        with self._lock:
            self.batch_sizes[size] += 1
            self.generated_tokens += tokens
            self.generation_seconds += seconds

    def add_encoded(self, images: int) -> None:
        with self._lock:
            self.images_encoded += images

    def render(self) -> str:
        """All metrics as Prometheus text."""
        with self._lock:
            lines: list[str] = []
            _family(lines, "requests_total", "counter", "HTTP requests by endpoint")
            lines += [
                f'{PREFIX}_requests_total{{endpoint="{e}"}} {n}' for e, n in sorted(self.requests.items())
            ]
            _family(lines, "responses_total", "counter", "HTTP responses by status code")
            lines += [
                f'{PREFIX}_responses_total{{code="{c}"}} {n}' for c, n in sorted(self.responses.items())
            ]
            _family(lines, "errors_total", "counter", "error responses (4xx and 5xx) by status code")
            errors = sorted((c, n) for c, n in self.responses.items() if c >= 400)
            lines += [f'{PREFIX}_errors_total{{code="{c}"}} {n}' for c, n in errors]
            _family(lines, "stage_seconds_total", "counter", "seconds spent in each stage of serving")
            lines += [
                f'{PREFIX}_stage_seconds_total{{stage="{s}"}} {self.stage_seconds[s]:.6f}' for s in STAGES
            ]
            _family(lines, "batch_size", "histogram", "requests per model batch")
            for bound in BATCH_BUCKETS:
                total_le = sum(n for size, n in self.batch_sizes.items() if size <= bound)
                lines.append(f'{PREFIX}_batch_size_bucket{{le="{bound}"}} {total_le}')
            total = sum(self.batch_sizes.values())
            lines.append(f'{PREFIX}_batch_size_bucket{{le="+Inf"}} {total}')
            lines.append(f"{PREFIX}_batch_size_sum {sum(s * n for s, n in self.batch_sizes.items())}")
            lines.append(f"{PREFIX}_batch_size_count {total}")
            _family(lines, "generated_tokens_total", "counter", "tokens generated")
            lines.append(f"{PREFIX}_generated_tokens_total {self.generated_tokens}")
            _family(lines, "generation_seconds_total", "counter", "seconds the model spent generating")
            lines.append(f"{PREFIX}_generation_seconds_total {self.generation_seconds:.6f}")
            rate = self.generated_tokens / self.generation_seconds if self.generation_seconds else 0.0
            _family(lines, "tokens_per_second", "gauge", "generated tokens per second of generation")
            lines.append(f"{PREFIX}_tokens_per_second {rate:.3f}")
            _family(lines, "images_encoded_total", "counter", "images run through the ViT and the resampler")
            lines.append(f"{PREFIX}_images_encoded_total {self.images_encoded}")
            for name, read in sorted(self.gauges.items()):
                kind = "counter" if name.endswith("_total") else "gauge"
                _family(lines, name, kind, name.replace("_", " "))
                lines.append(f"{PREFIX}_{name} {read()}")
        return "\n".join(lines) + "\n"


def _family(lines: list[str], name: str, kind: str, help_text: str) -> None:
    lines.append(f"# HELP {PREFIX}_{name} {help_text}")
    lines.append(f"# TYPE {PREFIX}_{name} {kind}")

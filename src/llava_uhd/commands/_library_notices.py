"""Log lines a third-party import writes that are not the command's to report.

transformers imports torchao whenever it is installed, on any model or processor load
(``transformers.quantizers.quantizer_torchao`` imports it at module level, not only for a torchao
``quantization_config``). On a CPU build of torch that import logs that torchao's CUDA and C++ kernel
libraries (``torchao/_C*.so``) failed to load and that Triton is missing, and torch logs that torchao's
registration of its enums as pytree constants is deprecated. None of it concerns the command (int8
weight-only on CPU runs on plain torch ops), and it would come before the one line a bad input gets, so
the command drops exactly these records, from the loggers that write them, and no others.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

# logger -> the messages dropped from it (what torchao 0.18 and torch 2.13 write), matched from the start
IMPORT_NOTICES: dict[str, re.Pattern[str]] = {
    "torchao": re.compile(r"Failed to load \S*_C\S*\.so: |Skipping import of cpp extensions"),
    # silent unless the root logger has a handler (``llava-uhd train`` sets one)
    "torchao.kernel.intmm": re.compile(r"Warning: Detected no triton"),
    "torch.utils._pytree": re.compile(
        r"<enum '\w+'> is an Enum subclass .* Calling register_constant\(\) on Enum subclasses is deprecated"
    ),
}


class _DropImportNotices(logging.Filter):
    def __init__(self, pattern: re.Pattern[str]) -> None:
        super().__init__()
        self.pattern = pattern

    def filter(self, record: logging.LogRecord) -> bool:
        return self.pattern.match(record.getMessage()) is None


@contextmanager
def without_import_notices() -> Iterator[None]:
    """Drop torchao's kernel-loading notices and torch's deprecation notice about them while inside."""
    with ExitStack() as stack:
        for name, pattern in IMPORT_NOTICES.items():
            logger, notice = logging.getLogger(name), _DropImportNotices(pattern)
            logger.addFilter(notice)
            stack.callback(logger.removeFilter, notice)
        yield

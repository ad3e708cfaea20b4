"""The command drops the log lines torchao's import writes on a CPU torch, and only those."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from llava_uhd.commands._library_notices import without_import_notices

BUNDLED = Path(__file__).resolve().parents[1] / "src" / "llava_uhd" / "assets" / "synthdoc-model"

NOTICES = [
    ("torchao", "Failed to load /venv/torchao/_C_mxfp8.cpython-310-x86_64-linux-gnu.so: Could not load"),
    ("torchao", "Failed to load /venv/torchao/_C_cutlass_90a.abi3.so: Could not load this library"),
    ("torchao", "Skipping import of cpp extensions due to incompatible torch version."),
    ("torchao.kernel.intmm", "Warning: Detected no triton, on systems without Triton certain kernels"),
    (
        "torch.utils._pytree",
        "<enum 'KernelPreference'> is an Enum subclass and is now natively supported by torch.compile as an "
        "opaque value type. Calling register_constant() on Enum subclasses is deprecated and will be an error",
    ),
]
OTHERS = [
    ("torchao", "Failed to load the checkpoint"),
    ("torchao.kernel.intmm", "int_mm fell back to a slow path"),
    ("torch.utils._pytree", "<enum 'Colour'> cannot be registered"),
    ("torchao.quantization", "Failed to load /venv/torchao/_C_mxfp8.so: Could not load"),  # another logger
]


def test_the_import_notices_are_dropped_and_nothing_else(caplog) -> None:
    caplog.set_level(logging.WARNING)
    with without_import_notices():
        for name, message in NOTICES + OTHERS:
            logging.getLogger(name).warning(message)
    assert caplog.messages == [message for _, message in OTHERS]


def test_outside_the_command_the_notices_show(caplog) -> None:
    caplog.set_level(logging.WARNING)
    with without_import_notices():
        pass
    for name, message in NOTICES:
        logging.getLogger(name).warning(message)
    assert caplog.messages == [message for _, message in NOTICES]


def test_with_torchao_installed_a_bad_input_is_still_one_line(tmp_path) -> None:
    """transformers imports torchao on any model load; its notices must not come with the error."""
    pytest.importorskip("torchao", reason="the notices come from torchao's import (the quant extra)")
    image = tmp_path / "nope.png"
    done = subprocess.run(
        [sys.executable, "-m", "llava_uhd.cli", "demo", "--model", str(BUNDLED), "--image", str(image)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert (done.returncode, done.stderr) == (2, f"llava-uhd demo: error: {image}: no such file\n")
    probe = "import transformers.modeling_utils, sys; print('torchao' in sys.modules)"
    imported = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert imported.stdout.strip() == "True", "transformers no longer imports torchao on load"

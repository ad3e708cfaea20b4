"""The weight-init recipe of our modules: the released (paper-era) code's, for what trains from scratch.

- every ``nn.Linear``: truncated normal, std 0.02 (cut at +-2 absolute, torch's and timm's default), bias 0;
- every ``nn.LayerNorm``: weight 1, bias 0;
- ``nn.MultiheadAttention``: torch's own init of its packed in-projection (Xavier), as in the released
  code, whose init visits only ``nn.Linear`` and ``nn.LayerNorm`` (``out_proj`` is a Linear);
- the resampler (paper section 3.2): queries truncated normal 0.02, ``pos_embed`` the 2D sin-cos table,
  ``proj`` = D^-0.5 * randn;
- the ViT's own tensors, in practice replaced by CLIP weights: patch embedding and CLS token normal with
  std D^-0.5, position table normal with std 0.02.

:func:`init_weights` initialises one module's own parameters, like a function given to
``nn.Module.apply``: our modules apply it to themselves when built, and the model's ``_init_weights`` (which
transformers calls for every module whose weights were not loaded) is this same function. Modules with
tensors of their own carry ``init_own_parameters``, which uses the rules below. ``torch.nn.init`` is
looked up at call time and copies go through ``transformers.initialization`` so that transformers' guard
applies: when a checkpoint is loaded, only the tensors it lacks are initialised
(tests/test_model_io.py).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import initialization as hf_init

from llava_uhd.model.pos_embed import sincos_2d

INIT_STD = 0.02


def init_weights(module: nn.Module) -> None:
    """Initialise the parameters ``module`` holds itself (not its children's) by the recipe above."""
    if isinstance(module, nn.MultiheadAttention):
        module._reset_parameters()
    elif isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=INIT_STD)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
    elif hasattr(module, "init_own_parameters"):
        module.init_own_parameters()


def init_query(query: torch.Tensor) -> None:
    """Learned queries: truncated normal, std 0.02."""
    nn.init.trunc_normal_(query, std=INIT_STD)


def init_sincos_table(table: torch.Tensor, rows: int, cols: int) -> None:
    """A (rows * cols, D) position table set to the fixed 2D sin-cos one (a stored, trainable copy)."""
    hf_init.copy_(table, sincos_2d(table.shape[1], rows, cols))


def init_output_projection(proj: torch.Tensor) -> None:
    """A bias-free (D, D) output projection: D^-0.5 * randn."""
    nn.init.normal_(proj, std=proj.shape[0] ** -0.5)


def init_embedding(weight: torch.Tensor, width: int, bias: torch.Tensor | None = None) -> None:
    """The ViT's patch embedding or CLS token of width D: normal with std D^-0.5, bias 0."""
    nn.init.normal_(weight, std=width**-0.5)
    if bias is not None:
        nn.init.zeros_(bias)


def init_position_table(table: torch.Tensor) -> None:
    """The ViT's learned position table: normal, std 0.02."""
    nn.init.normal_(table, std=INIT_STD)

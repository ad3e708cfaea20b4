"""Remember a frozen vision tower's output per piece, so that a piece seen before skips the tower.

With the ViT frozen (training stages 1 and 2, and any inference), every epoch, and every question about
the same image, recomputes exactly the same features. Pieces never interact inside the tower (attention, the conv stem and per-piece centring all stay
within a piece), so each piece's features are a function of that piece's pixels alone and can be cached
by a hash of them: exact, whatever the batching or the order of the samples. Entries are kept in memory in
the tower's dtype (576 x 128 float32 features of a 336 x 336 piece take 295 KB) and, with a ``folder``,
written there as safetensors shards at the end of a run and read back by the next run with the same
folder (stage 2 on stage 1's pages then never runs the tower). The key includes a hash of the tower's
weights, so a folder shared by two different towers never mixes their features.

The cache is installed on the tower instance (its ``forward``), so the module tree and the state dict stay
unchanged and checkpoints do not know about it. Dimensions: Pt patches, K values per patch, D tower width.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch
from torch import nn

from llava_uhd.errors import ConfigError

logger = logging.getLogger(__name__)


class FrozenFeatureCache:
    """Per-piece features of a frozen tower, keyed by the piece's grid and pixel bytes."""

    def __init__(self, tower: nn.Module, folder: str | Path | None = None) -> None:
        if any(p.requires_grad for p in tower.parameters()):
            raise ConfigError("a feature cache needs a frozen vision tower (no parameter with requires_grad)")
        self.tower = tower
        self.compute = tower.forward  # the bound method of the class: the real computation
        self.entries: dict[str, torch.Tensor] = {}
        self.unsaved: list[str] = []
        self.hits = self.misses = 0
        self.folder = Path(folder) if folder is not None else None
        weights = hashlib.blake2b(digest_size=8)
        for name, tensor in sorted(tower.state_dict().items()):
            weights.update(name.encode())
            weights.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        self.tower_id = weights.hexdigest()

    def install(self) -> FrozenFeatureCache:
        """Route the tower's forward through the cache; load the folder's entries for this tower."""
        self.tower.forward = self.forward  # instance attribute: nn.Module.__call__ dispatches to it
        if self.folder is not None and self.folder.is_dir():
            from safetensors.torch import load_file

            for shard in sorted(self.folder.glob(f"{self.tower_id}-*.safetensors")):
                self.entries.update(load_file(str(shard)))
            logger.info("feature cache: %d pieces from %s", len(self.entries), self.folder)
        return self

    def save(self) -> Path | None:
        """Write the entries added since the last save as one new shard of the folder (if any)."""
        if self.folder is None or not self.unsaved:
            return None
        from safetensors.torch import save_file

        self.folder.mkdir(parents=True, exist_ok=True)
        shard = (
            self.folder / f"{self.tower_id}-{len(list(self.folder.glob(self.tower_id + '-*')))}.safetensors"
        )
        tmp = shard.with_suffix(".tmp")
        save_file({key: self.entries[key].contiguous() for key in self.unsaved}, str(tmp))
        tmp.replace(shard)  # a killed save leaves no half shard behind
        self.unsaved = []
        return shard

    @staticmethod
    def _key(patches: torch.Tensor, rows: int, cols: int) -> str:
        digest = hashlib.blake2b(patches.contiguous().numpy().tobytes(), digest_size=16)
        digest.update(f"{rows}x{cols}".encode())
        return digest.hexdigest()

    @torch.no_grad()
    def forward(self, pixel_values: torch.Tensor, piece_grids: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """(Pt, K) patches of N pieces -> (Pt, D) features, computing only the pieces not seen before."""
        counts = piece_grids.prod(dim=1).tolist()
        starts = [0]
        for n in counts:
            starts.append(starts[-1] + n)
        keys = [
            self._key(pixel_values[starts[i] : starts[i + 1]].cpu(), *map(int, piece_grids[i].tolist()))
            for i in range(len(counts))
        ]
        missing = [i for i, key in enumerate(keys) if key not in self.entries]
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        if missing:
            rows = torch.cat([torch.arange(starts[i], starts[i + 1]) for i in missing])
            features = self.compute(pixel_values[rows], piece_grids[missing], *args, **kwargs)
            offset = 0
            for i in missing:
                n = counts[i]
                self.entries[keys[i]] = features[offset : offset + n].cpu()
                self.unsaved.append(keys[i])
                offset += n
        return torch.cat([self.entries[key] for key in keys]).to(pixel_values.device)


def cache_frozen_tower(model: nn.Module) -> FrozenFeatureCache:
    """Freeze ``model.vision_tower`` and route it through a cache (inference: every image is encoded once
    however many questions it gets). Calling it again returns the cache already installed."""
    tower = model.vision_tower
    installed = getattr(tower, "forward", None)
    if isinstance(getattr(installed, "__self__", None), FrozenFeatureCache):
        return installed.__self__
    tower.requires_grad_(False)
    return FrozenFeatureCache(tower).install()

"""A contiguous per-request latent cache: what MLA (and DSA) keep per token, nothing more.

Per layer and token it holds the normalised KV latent (`kv_lora_rank`), the rotated shared rope key
(`qk_rope_head_dim`) and, for V3.2, the indexer key (`index_head_dim`). Slots are addressed by
absolute position, so a row may be written at any offset and rows can be at different lengths.
The inference engine's paged cache implements the same per-layer protocol (see `LayerCache`).
"""
from __future__ import annotations

import torch

from dsv32.config import ModelConfig


class LayerCache:
    """One layer's view of a `LatentCache`.

    Attention uses it in two phases, so that a cache may hand out only what is read: `write` the new
    tokens, then `read_index_keys` (DSA scores every cached key), then either `read` (all latents up
    to `n_keys`) or `gather` (only the entries DSA selected). The inference engine's paged cache
    implements the same four methods over blocks.
    """

    def __init__(self, latent: torch.Tensor, rope_key: torch.Tensor, index_key: torch.Tensor | None):
        self.latent = latent        # [batch, max_len, kv_lora_rank]
        self.rope_key = rope_key    # [batch, max_len, qk_rope_head_dim]
        self.index_key = index_key  # [batch, max_len, index_head_dim] or None

    def write(self, positions: torch.Tensor, latent: torch.Tensor, rope_key: torch.Tensor,
              index_key: torch.Tensor | None) -> None:
        """Store the new tokens [batch, seq, ...] at their absolute `positions` [batch, seq]."""
        max_len = self.latent.shape[1]
        if int(positions.max()) >= max_len:
            raise ValueError(f"position {int(positions.max())} is past the cache length {max_len}")
        rows = torch.arange(positions.shape[0], device=positions.device)[:, None]
        self.latent[rows, positions] = latent.to(self.latent.dtype)
        self.rope_key[rows, positions] = rope_key.to(self.rope_key.dtype)
        if self.index_key is not None and index_key is not None:
            self.index_key[rows, positions] = index_key.to(self.index_key.dtype)

    def read(self, n_keys: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Latents and rope keys of positions [0, n_keys): [batch, n_keys, ...]."""
        return self.latent[:, :n_keys], self.rope_key[:, :n_keys]

    def read_index_keys(self, n_keys: int) -> torch.Tensor | None:
        return self.index_key[:, :n_keys] if self.index_key is not None else None

    def gather(self, selected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Only the entries at `selected` [batch, seq, k] positions: [batch, seq, k, ...]."""
        rows = torch.arange(selected.shape[0], device=selected.device)[:, None, None]
        return self.latent[rows, selected], self.rope_key[rows, selected]

    def update(
        self,
        positions: torch.Tensor,
        latent: torch.Tensor,
        rope_key: torch.Tensor,
        index_key: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Write the new tokens at `positions` [batch, seq]; return everything up to the furthest position."""
        self.write(positions, latent, rope_key, index_key)
        end = int(positions.max()) + 1
        return (*self.read(end), self.read_index_keys(end))


class LatentCache:
    """Static latent cache for `batch` rows of up to `max_len` tokens, for the main layers and MTP layers."""

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu", include_mtp: bool = True):
        n_layers = cfg.num_hidden_layers + (cfg.num_nextn_predict_layers if include_mtp else 0)
        shape = (n_layers, batch, max_len)
        self.latent = torch.zeros(*shape, cfg.kv_lora_rank, dtype=dtype, device=device)
        self.rope_key = torch.zeros(*shape, cfg.qk_rope_head_dim, dtype=dtype, device=device)
        self.index_key = torch.zeros(*shape, cfg.index_head_dim, dtype=dtype, device=device) if cfg.use_dsa else None
        self.max_len = max_len

    def layer(self, idx: int) -> LayerCache:
        return LayerCache(self.latent[idx], self.rope_key[idx],
                          self.index_key[idx] if self.index_key is not None else None)

    def nbytes(self) -> int:
        tensors = [self.latent, self.rope_key] + ([self.index_key] if self.index_key is not None else [])
        return sum(t.numel() * t.element_size() for t in tensors)

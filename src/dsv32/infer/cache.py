"""The engine's paged latent cache: fixed-size blocks shared by every request, with prefix caching.

Per token and layer it holds exactly what MLA and DSA read at decode (reference §2, §5): the
normalised KV latent (`kv_lora_rank`), the rotated rope key (`qk_rope_head_dim`) and, for V3.2, the
indexer key (`index_head_dim`); the MTP layers get their own layer slots when speculative decoding is
on. Storage is two pools, `[layers, num_blocks, block_size, dim]`: `kv` holds the latent and the rope key
side by side (`kv_lora_rank + qk_rope_head_dim`: absorbed attention scores both with one product), and
`index_key` the indexer keys. A request owns a list of
block ids (its block table) and position `p` of that request lives in block `table[p // block_size]`
at offset `p % block_size`.

Block 0 is a reserved all-zero block: it pads the block tables of shorter rows in a batch, so reading
past a row's end yields finite values that the causal mask then hides.

Prefix caching: a block that is full of computed tokens gets a key, a hash of its parent's key, its
tokens and the token that follows it (the MTP layer's entry at a block's last position depends on
that next token). A new prompt walks its blocks from the start and reuses every block whose key is
cached. Blocks are reference-counted; a freed block with a key stays in an LRU pool of evictable
blocks until its memory is needed, so a repeated prompt finds it again.
"""
from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict

import torch

from dsv32.config import ModelConfig

NULL_BLOCK = 0


def block_key(parent: bytes, tokens: list[int], next_token: int) -> bytes:
    """The prefix-cache key of a full block: it identifies the whole prefix up to the block's end."""
    h = hashlib.blake2b(parent, digest_size=16)
    h.update(array("q", tokens).tobytes())
    h.update(array("q", [next_token]).tobytes())
    return h.digest()


class OutOfBlocks(RuntimeError):
    """No free or evictable block is left."""


class BlockPool:
    """Reference-counted block ids with an LRU of evictable cached blocks and a key -> block table."""

    def __init__(self, num_blocks: int):
        if num_blocks < 2:
            raise ValueError(f"num_blocks must be at least 2 (block 0 is reserved), got {num_blocks}")
        self.num_blocks = num_blocks
        self.ref = [0] * num_blocks
        self.key: list[bytes | None] = [None] * num_blocks
        self.free: list[int] = list(range(num_blocks - 1, 0, -1))  # pop() hands out low ids first
        self.evictable: OrderedDict[int, None] = OrderedDict()    # ref == 0 but cached, oldest first
        self.cached: dict[bytes, int] = {}
        self.ref[NULL_BLOCK] = 1  # never handed out

    @property
    def num_free(self) -> int:
        """Blocks that can be handed out now (free plus evictable)."""
        return len(self.free) + len(self.evictable)

    @property
    def num_used(self) -> int:
        return self.num_blocks - 1 - self.num_free

    def allocate(self) -> int:
        if self.free:
            block = self.free.pop()
        elif self.evictable:
            block, _ = self.evictable.popitem(last=False)
            del self.cached[self.key[block]]
            self.key[block] = None
        else:
            raise OutOfBlocks("the paged cache has no free block left")
        self.ref[block] = 1
        return block

    def release(self, block: int) -> None:
        self.ref[block] -= 1
        if self.ref[block] < 0:
            raise RuntimeError(f"block {block} released more often than taken")
        if self.ref[block] == 0:
            if self.key[block] is not None:
                self.evictable[block] = None
            else:
                self.free.append(block)

    def lookup(self, key: bytes) -> int | None:
        """The cached block for `key`, taking a reference to it, or None."""
        block = self.cached.get(key)
        if block is None:
            return None
        if self.ref[block] == 0:
            del self.evictable[block]
        self.ref[block] += 1
        return block

    def register(self, block: int, key: bytes) -> None:
        """Publish a full block under `key` (a no-op if another block already holds that prefix)."""
        if key in self.cached or self.key[block] is not None:
            return
        self.key[block] = key
        self.cached[key] = block

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix (blocks in use stay valid, evictable ones become free)."""
        for block in list(self.evictable):
            self.free.append(block)
        self.evictable.clear()
        for key, block in self.cached.items():
            self.key[block] = None
        self.cached.clear()


class PagedLatentCache:
    """Block storage for `num_layers` layers plus the block pool that manages it."""

    def __init__(self, cfg: ModelConfig, num_blocks: int, block_size: int = 16, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu", include_mtp: bool = False):
        if block_size < 1:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.cfg, self.block_size, self.dtype = cfg, block_size, dtype
        self.include_mtp = include_mtp
        self.num_layers = cfg.num_hidden_layers + (cfg.num_nextn_predict_layers if include_mtp else 0)
        shape = (self.num_layers, num_blocks, block_size)
        self.latent_dim = cfg.kv_lora_rank
        self.kv = torch.zeros(*shape, cfg.kv_lora_rank + cfg.qk_rope_head_dim, dtype=dtype, device=device)
        self.index_key = torch.zeros(*shape, cfg.index_head_dim, dtype=dtype, device=device) if cfg.use_dsa else None
        self.pool = BlockPool(num_blocks)

    @property
    def latent(self) -> torch.Tensor:
        return self.kv[..., : self.latent_dim]

    @property
    def rope_key(self) -> torch.Tensor:
        return self.kv[..., self.latent_dim:]

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    def tensors(self) -> list[torch.Tensor]:
        return [self.kv] + ([self.index_key] if self.index_key is not None else [])

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def bytes_per_token(self) -> int:
        """Bytes one token occupies across all layers: equals `ModelConfig.kv_cache_bytes_per_token`."""
        return sum(t[:, 0, 0].numel() * t.element_size() for t in self.tensors())

    def batch(self, block_tables: list[list[int]]) -> "PagedBatch":
        """A view for one forward over rows with these block tables (padded with the null block)."""
        width = max(1, max(len(t) for t in block_tables))
        table = torch.tensor([blocks + [NULL_BLOCK] * (width - len(blocks)) for blocks in block_tables],
                             dtype=torch.long)
        # a single row whose blocks are consecutive ids is one contiguous slab: reads can be views
        run = block_tables[0] if len(block_tables) == 1 else None
        start = run[0] if run and run == list(range(run[0], run[0] + len(run))) else None
        return PagedBatch(self, table.to(self.kv.device), start)


class PagedBatch:
    """What `Transformer.forward(cache=...)` sees: `layer(i)` views over a batch's block tables."""

    def __init__(self, cache: PagedLatentCache, block_table: torch.Tensor, contiguous_start: int | None = None):
        self.cache = cache
        self.block_table = block_table  # [batch, blocks]
        self.contiguous_start = contiguous_start  # first block of a one-row batch stored contiguously
        self.block_size = cache.block_size
        self.max_len = block_table.shape[1] * cache.block_size
        self._memo: tuple[torch.Tensor, torch.Tensor] | None = None

    def slots(self, positions: torch.Tensor) -> torch.Tensor:
        """Flat slot index (block * block_size + offset) of absolute `positions` [batch, ...]."""
        if self._memo is not None and self._memo[0] is positions:
            return self._memo[1]  # every layer writes the same positions: compute them once
        slots = self._slots(positions)
        self._memo = (positions, slots)
        return slots

    def _slots(self, positions: torch.Tensor) -> torch.Tensor:
        if int(positions.max()) >= self.max_len:
            raise ValueError(f"position {int(positions.max())} is past the blocks given for this batch "
                             f"({self.max_len} positions)")
        flat = positions.reshape(positions.shape[0], -1)
        blocks = self.block_table.gather(1, flat // self.block_size)
        return (blocks * self.block_size + flat % self.block_size).view_as(positions)

    def layer(self, idx: int) -> "PagedLayer":
        if not 0 <= idx < self.cache.num_layers:
            raise ValueError(f"cache layer {idx} does not exist (this cache holds {self.cache.num_layers} layers)")
        return PagedLayer(self, idx)


class PagedLayer:
    """One layer of a `PagedBatch`, with the `LayerCache` protocol (write / read / read_index_keys / gather)
    plus the combined-kv reads the decode fast path uses."""

    def __init__(self, batch: PagedBatch, idx: int):
        cache = batch.cache
        self.batch = batch
        self.latent_dim = cache.latent_dim
        self.kv = cache.kv[idx].view(-1, cache.kv.shape[-1])  # [num_blocks * block_size, kv_lora_rank + rope]
        self.index_key = cache.index_key[idx].view(-1, cache.index_key.shape[-1]) if cache.index_key is not None else None

    def write(self, positions, latent, rope_key, index_key) -> None:
        slots = self.batch.slots(positions).flatten()
        kv = torch.cat((latent, rope_key), dim=-1).flatten(0, 1)
        self.kv.index_copy_(0, slots, kv.to(self.kv.dtype))
        if self.index_key is not None and index_key is not None:
            self.index_key.index_copy_(0, slots, index_key.flatten(0, 1).to(self.index_key.dtype))

    def _rows(self, pool: torch.Tensor, n_keys: int) -> torch.Tensor:
        bs = self.batch.block_size
        start = self.batch.contiguous_start
        if start is not None:  # no copy: a view of the slab
            return pool[start * bs: start * bs + n_keys][None]
        # whole blocks are gathered (contiguous copies of block_size rows), then trimmed to n_keys
        table = self.batch.block_table[:, : -(-n_keys // bs)]
        return pool.view(-1, bs, pool.shape[-1])[table].flatten(1, 2)[:, :n_keys]  # [batch, n_keys, dim]

    def read_kv(self, n_keys: int) -> torch.Tensor:
        """Latent and rope key side by side for positions [0, n_keys): [batch, n_keys, C + R]."""
        return self._rows(self.kv, n_keys)

    def gather_kv(self, selected: torch.Tensor) -> torch.Tensor:
        """Latent and rope key of the `selected` positions [batch, seq, k]: [batch, seq, k, C + R]."""
        slots = self.batch._slots(selected)
        return self.kv.index_select(0, slots.flatten()).view(*slots.shape, self.kv.shape[-1])

    def read(self, n_keys: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.read_kv(n_keys).split([self.latent_dim, self.kv.shape[-1] - self.latent_dim], dim=-1)

    def read_index_keys(self, n_keys: int) -> torch.Tensor | None:
        return self._rows(self.index_key, n_keys) if self.index_key is not None else None

    def gather(self, selected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.gather_kv(selected).split([self.latent_dim, self.kv.shape[-1] - self.latent_dim], dim=-1)

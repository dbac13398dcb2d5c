"""Packed, sharded, exactly resumable batches from prepared token shards.

Each shard's token stream is cut into windows of `seq_len + 1` tokens (consecutive windows share
one token, so inputs are `window[:-1]` and labels `window[1:]`). Documents are packed back to back;
windows may cut a document, and the batch says where documents start so attention can be kept
inside one document. Every epoch visits the windows in a permutation fixed by (seed, epoch); rank r
of w takes every w-th window of it, so ranks see disjoint data and the same number of batches.
The whole position is (epoch, batch index): `state_dict()` / `load_state_dict()` resume exactly.
"""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from dsv32.data.shards import MANIFEST, open_shards, read_manifest

IGNORE_INDEX = -100


class PackedLoader:
    """Iterator of batches:
    `input_ids` [batch, seq] long; `labels` [batch, seq] long (IGNORE_INDEX where not trained);
    `doc_starts` [batch, seq] bool, True where a document starts (and at position 0: a row always
    begins a new attention segment); `position_ids` [batch, seq] long, restarting at every start.
    """

    def __init__(
        self,
        data_dir: str | Path,
        split: str = "train",
        seq_len: int = 256,
        batch_size: int = 8,
        *,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        epochs: int | None = None,
        tokenizer=None,
    ):
        if seq_len < 1 or batch_size < 1:
            raise ValueError("seq_len and batch_size must be positive")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size), got rank {rank} of {world_size}")
        self.data_dir = Path(data_dir)
        self.manifest = read_manifest(self.data_dir)
        if tokenizer is not None and tokenizer.fingerprint != self.manifest["tokenizer"]["fingerprint"]:
            raise ValueError(
                f"{self.data_dir / MANIFEST}: data was tokenized with a different tokenizer "
                f"({self.manifest['tokenizer']['fingerprint'][:12]}, given {tokenizer.fingerprint[:12]}); "
                "prepare it again with this tokenizer"
            )
        self.split, self.seq_len, self.batch_size = split, seq_len, batch_size
        self.rank, self.world_size, self.seed, self.shuffle, self.epochs = rank, world_size, seed, shuffle, epochs
        self._shards = open_shards(self.data_dir, self.manifest, split)
        windows = [max(0, (len(s.tokens) - 1) // seq_len) for s in self._shards]
        self._window_offsets = np.concatenate([[0], np.cumsum(windows)]).astype(np.int64)
        self.num_windows = int(self._window_offsets[-1])
        self.batches_per_epoch = self.num_windows // world_size // batch_size
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"{self.data_dir / MANIFEST}: split {split!r} has {self.num_windows} windows of {seq_len + 1} tokens, "
                f"too few for one batch of {batch_size} on each of {world_size} rank(s)"
            )
        self.epoch, self.batch_index = 0, 0
        self._order: np.ndarray | None = None

    def __len__(self) -> int:
        return self.batches_per_epoch

    # ----- position -----
    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch_index": self.batch_index, "seed": self.seed, "split": self.split,
                "seq_len": self.seq_len, "batch_size": self.batch_size, "world_size": self.world_size,
                "shuffle": self.shuffle, "fingerprint": self.manifest["tokenizer"]["fingerprint"]}

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "split", "seq_len", "batch_size", "world_size", "shuffle", "fingerprint"):
            mine = self.state_dict()[key]
            if state.get(key) != mine:
                raise ValueError(f"cannot resume: saved loader has {key}={state.get(key)!r}, this one {mine!r}")
        self.epoch, self.batch_index = int(state["epoch"]), int(state["batch_index"])
        self._order = None

    # ----- order -----
    def _rank_order(self) -> np.ndarray:
        """This rank's window indices for the current epoch, truncated to whole batches."""
        if self._order is None:
            if self.shuffle:
                order = np.random.default_rng([self.seed, self.epoch]).permutation(self.num_windows)
            else:
                order = np.arange(self.num_windows)
            self._order = order[self.rank::self.world_size][: self.batches_per_epoch * self.batch_size]
        return self._order

    def __iter__(self) -> Iterator[dict]:
        return self

    def __next__(self) -> dict:
        if self.batch_index >= self.batches_per_epoch:
            self.epoch, self.batch_index, self._order = self.epoch + 1, 0, None
        if self.epochs is not None and self.epoch >= self.epochs:
            raise StopIteration
        start = self.batch_index * self.batch_size
        windows = self._rank_order()[start: start + self.batch_size]
        self.batch_index += 1
        return self.batch(windows)

    # ----- assembly -----
    def batch(self, windows: np.ndarray) -> dict:
        """The batch for global window indices `windows`."""
        n, seq = len(windows), self.seq_len
        tokens = np.empty((n, seq + 1), dtype=np.int64)
        mask = np.empty((n, seq + 1), dtype=bool)
        starts = np.zeros((n, seq), dtype=bool)
        shard_ids = np.searchsorted(self._window_offsets, windows, side="right") - 1
        for row, (window, shard_id) in enumerate(zip(windows, shard_ids)):
            shard = self._shards[shard_id]
            begin = int(window - self._window_offsets[shard_id]) * seq
            tokens[row] = shard.tokens[begin: begin + seq + 1]
            mask[row] = shard.mask[begin: begin + seq + 1] != 0
            lo, hi = np.searchsorted(shard.starts, [begin, begin + seq])
            starts[row, shard.starts[lo:hi] - begin] = True
        starts[:, 0] = True
        labels = np.where(mask[:, 1:], tokens[:, 1:], IGNORE_INDEX)
        # position = distance to the latest start at or before each position
        arange = np.arange(seq)
        last_start = np.maximum.accumulate(np.where(starts, arange, 0), axis=1)
        return {
            "input_ids": torch.from_numpy(tokens[:, :-1].copy()),
            "labels": torch.from_numpy(labels),
            "doc_starts": torch.from_numpy(starts),
            "position_ids": torch.from_numpy(arange - last_start),
        }

"""Token shards on disk: flat binary arrays that numpy memory-maps, described by a manifest.

Per split and shard number three files:
    {split}-{n:05d}.tokens   token ids (uint16 when the vocabulary fits, else uint32)
    {split}-{n:05d}.mask     uint8, 1 where the token is a training target (0 on BOS, prompts, ...)
    {split}-{n:05d}.starts   int64 offsets (within the shard) where each document starts
`manifest.json` records the tokenizer fingerprint, the sources and every count, so a loader can
refuse data made with another tokenizer.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MANIFEST = "manifest.json"
FORMAT = "dsv32-token-shards"
VERSION = 1


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


class ShardWriter:
    """Appends documents of one split into shards of about `shard_tokens` tokens each."""

    def __init__(self, directory: Path, split: str, dtype: np.dtype, shard_tokens: int = 1 << 26):
        if shard_tokens < 1:
            raise ValueError("shard_tokens must be positive")
        self.directory, self.split, self.dtype, self.shard_tokens = Path(directory), split, np.dtype(dtype), shard_tokens
        self.shards: list[dict] = []
        self._files = None
        self._tokens = 0
        self._starts: list[int] = []

    def _open(self) -> None:
        stem = f"{self.split}-{len(self.shards):05d}"
        names = {kind: f"{stem}.{kind}" for kind in ("tokens", "mask", "starts")}
        self._files = {kind: open(self.directory / name, "wb") for kind, name in names.items() if kind != "starts"}
        self._names, self._tokens, self._starts = names, 0, []

    def _close_shard(self) -> None:
        for handle in self._files.values():
            handle.close()
        np.asarray(self._starts, dtype=np.int64).tofile(self.directory / self._names["starts"])
        self.shards.append({**self._names, "num_tokens": self._tokens, "num_documents": len(self._starts)})
        self._files = None

    def add(self, ids: list[int] | np.ndarray, mask: list[int] | np.ndarray) -> None:
        """One document; a document never straddles two shards."""
        ids = np.asarray(ids, dtype=self.dtype)
        mask = np.asarray(mask, dtype=np.uint8)
        if len(ids) != len(mask):
            raise ValueError("ids and mask differ in length")
        if len(ids) == 0:
            return
        if self._files is not None and self._tokens and self._tokens + len(ids) > self.shard_tokens:
            self._close_shard()
        if self._files is None:
            self._open()
        self._starts.append(self._tokens)
        ids.tofile(self._files["tokens"])
        mask.tofile(self._files["mask"])
        self._tokens += len(ids)

    def close(self) -> dict:
        if self._files is not None:
            self._close_shard()
        return {
            "num_tokens": sum(s["num_tokens"] for s in self.shards),
            "num_documents": sum(s["num_documents"] for s in self.shards),
            "shards": self.shards,
        }


@dataclass
class Shard:
    tokens: np.ndarray  # memory-mapped
    mask: np.ndarray
    starts: np.ndarray


def read_manifest(directory: str | Path) -> dict:
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"no {MANIFEST} in {directory} (make one with `dsv32 data prepare`)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"{path}: not a {FORMAT} manifest")
    if manifest.get("version") != VERSION:
        raise ValueError(f"{path}: manifest version {manifest.get('version')} is not supported (expected {VERSION})")
    return manifest


def open_shards(directory: str | Path, manifest: dict, split: str) -> list[Shard]:
    """Memory-map every shard of `split`, checking sizes against the manifest."""
    directory = Path(directory)
    splits = manifest.get("splits", {})
    if split not in splits:
        raise ValueError(f"{directory / MANIFEST}: no {split!r} split (has {', '.join(splits) or 'none'})")
    dtype = np.dtype(manifest["dtype"])
    shards = []
    for record in splits[split]["shards"]:
        files = {kind: directory / record[kind] for kind in ("tokens", "mask", "starts")}
        for file in files.values():
            if not file.is_file():
                raise FileNotFoundError(f"shard file {file} listed in {directory / MANIFEST} is missing")
        n = record["num_tokens"]
        if files["tokens"].stat().st_size != n * dtype.itemsize or files["mask"].stat().st_size != n:
            raise ValueError(f"{files['tokens']}: size does not match the manifest ({n} tokens); the data is damaged")
        shards.append(Shard(
            tokens=np.memmap(files["tokens"], dtype=dtype, mode="r", shape=(n,)),
            mask=np.memmap(files["mask"], dtype=np.uint8, mode="r", shape=(n,)),
            starts=np.fromfile(files["starts"], dtype=np.int64),
        ))
    return shards

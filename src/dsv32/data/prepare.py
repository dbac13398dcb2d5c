"""Tokenise corpora into token shards (`dsv32 data prepare`).

Sources: "stdlib" (the built-in code corpus), a path (directory or file of .txt/.md/.py/.jsonl),
or "tasks:KIND:N" (N generated training conversations of a task kind, plus N/10 for validation).
Plain text becomes BOS + text + EOS with every token but BOS a target; chat data is rendered with the
V3.2 chat encoding and only what the assistant writes is a target.
"""
from __future__ import annotations

import json
import os
import platform
from collections.abc import Iterator
from pathlib import Path

from dsv32.chat import render_sft
from dsv32.data.corpus import SPLITS, Document, corpus_documents
from dsv32.data.shards import FORMAT, MANIFEST, VERSION, ShardWriter, read_manifest, token_dtype
from dsv32.tokenizer import Tokenizer

THINKING_CHOICES = ("auto", "thinking", "chat")


def _task_documents(spec: str, split: str) -> Iterator[Document]:
    from dsv32.data.tasks import generate

    parts = spec.split(":")
    if len(parts) != 3 or not parts[2].isdigit() or int(parts[2]) < 1:
        raise ValueError(f"task source must look like tasks:KIND:N (e.g. tasks:arithmetic:1000), got {spec!r}")
    kind, n = parts[1], int(parts[2])
    count = n if split == "train" else max(1, n // 10)
    for task in generate(kind, split, count):
        yield Document(source=f"{spec}:{split}:{task.prompt[:40]}", messages=task.messages())


def source_documents(spec: str, split: str, validation_fraction: float) -> Iterator[Document]:
    if spec.startswith("tasks:"):
        return _task_documents(spec, split)
    return corpus_documents(spec, split, validation_fraction)


def _describe_source(spec: str) -> dict:
    if spec == "stdlib":
        return {"spec": spec, "python": platform.python_version()}
    if spec.startswith("tasks:"):
        return {"spec": spec}
    return {"spec": spec, "path": str(Path(spec).resolve())}


def chat_thinking_mode(messages: list[dict], choice: str = "auto") -> str:
    """"auto": thinking mode when the final agent loop's assistant turns all carry reasoning or tool
    calls (what thinking mode needs) and at least one carries reasoning; chat mode otherwise."""
    if choice != "auto":
        return choice
    last_user = max((i for i, m in enumerate(messages) if m.get("role") in ("user", "developer")), default=-1)
    turns = [m for m in messages[last_user + 1:] if m.get("role") == "assistant"]
    reasoning = [bool(m.get("reasoning_content") or m.get("reasoning")) for m in turns]
    if turns and any(reasoning) and all(r or m.get("tool_calls") for r, m in zip(reasoning, turns)):
        return "thinking"
    return "chat"


def tokenize_documents(docs: list[Document], tokenizer: Tokenizer, thinking: str = "auto") -> list[tuple[list[int], list[int]]]:
    """(ids, mask) per document; errors name the document's source."""
    texts = [d.text for d in docs if d.text is not None]
    encoded = iter(tokenizer.encode_batch(texts) if texts else [])
    bos, eos = tokenizer.bos_id, tokenizer.eos_id
    out = []
    for doc in docs:
        if doc.text is not None:
            ids = [bos, *next(encoded), eos]
            out.append((ids, [0] + [1] * (len(ids) - 1)))
            continue
        try:
            out.append(render_sft(doc.messages, tokenizer, chat_thinking_mode(doc.messages, thinking)))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"{doc.source}: {exc}") from None
    return out


def _batched(docs: Iterator[Document], size: int) -> Iterator[list[Document]]:
    batch: list[Document] = []
    for doc in docs:
        batch.append(doc)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _clear_previous(out: Path) -> None:
    previous = read_manifest(out)
    for split in previous.get("splits", {}).values():
        for shard in split.get("shards", []):
            for kind in ("tokens", "mask", "starts"):
                (out / shard[kind]).unlink(missing_ok=True)
    (out / MANIFEST).unlink()


def prepare(
    sources: list[str],
    tokenizer: Tokenizer | str | Path,
    out_dir: str | Path,
    *,
    validation_fraction: float = 0.05,
    shard_tokens: int = 1 << 26,
    thinking: str = "auto",
    overwrite: bool = False,
    batch_docs: int = 256,
    show_progress: bool = True,
) -> dict:
    """Tokenise `sources` into shards under `out_dir`; returns the manifest (also written there)."""
    if not sources:
        raise ValueError("give at least one source (stdlib, a path, or tasks:KIND:N)")
    if not 0 <= validation_fraction < 1:
        raise ValueError(f"validation fraction must be in [0, 1), got {validation_fraction}")
    if thinking not in THINKING_CHOICES:
        raise ValueError(f"thinking must be one of {', '.join(THINKING_CHOICES)}, got {thinking!r}")
    tokenizer_path = None
    if not isinstance(tokenizer, Tokenizer):
        tokenizer_path = str(Path(tokenizer).resolve())
        tokenizer = Tokenizer.load(tokenizer)
    out = Path(out_dir)
    if (out / MANIFEST).exists():
        if not overwrite:
            raise ValueError(f"{out} already holds prepared data (use --overwrite to replace it)")
        _clear_previous(out)
    out.mkdir(parents=True, exist_ok=True)

    dtype = token_dtype(tokenizer.vocab_size)
    splits: dict[str, dict] = {}
    per_source: dict[str, dict[str, int]] = {s: {} for s in sources}
    for split in SPLITS:
        writer = ShardWriter(out, split, dtype, shard_tokens)
        progress = None
        if show_progress:
            from tqdm import tqdm

            progress = tqdm(desc=f"data prepare: {split}", unit="doc")
        for spec in sources:
            count = 0
            for batch in _batched(source_documents(spec, split, validation_fraction), batch_docs):
                for ids, mask in tokenize_documents(batch, tokenizer, thinking):
                    writer.add(ids, mask)
                count += len(batch)
                if progress is not None:
                    progress.update(len(batch))
                    progress.set_postfix(tokens=sum(s["num_tokens"] for s in writer.shards) + writer._tokens)
            per_source[spec][split] = count
        if progress is not None:
            progress.close()
        splits[split] = writer.close()
    if splits["train"]["num_documents"] == 0:
        raise ValueError(f"no training documents found in {', '.join(sources)}")

    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "tokenizer": {"fingerprint": tokenizer.fingerprint, "vocab_size": tokenizer.vocab_size,
                      "bos_id": tokenizer.bos_id, "eos_id": tokenizer.eos_id, "path": tokenizer_path},
        "dtype": dtype.name,
        "validation_fraction": validation_fraction,
        "sources": [{**_describe_source(s), "documents": per_source[s]} for s in sources],
        "splits": splits,
    }
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, out / MANIFEST)  # the manifest appears only once every shard is complete
    return manifest

"""Perplexity and bits per byte on held-out text.

Sources: a prepared data directory (its validation split, read by `PackedLoader` exactly as the
training loop's `val_loss` / `val_bpb`), or text: "stdlib" / a path (the validation split of
`dsv32.data.corpus`) or a list of strings. Text documents are tokenised as the data pipeline does
(BOS + text + EOS, every token but BOS a target) and cut into windows of `seq_len + 1` tokens that
share one token, so every target is scored once. The loss sum, token and byte counts come from the
training loop's own `loss_totals` with the tokenizer's byte table (`token_byte_lengths`).

Over a URL the same windows are scored by the server: the text is tokenised by its `/tokenize` and
the windows sent as token-id prompts to `/v1/completions` with `echo` and `logprobs` (the prompt
tokens' log-probs, the first of each window null), so the numbers equal the in-process ones up to
floating point.
"""
from __future__ import annotations

import itertools
import math
from pathlib import Path

import torch

from dsv32.data.loader import IGNORE_INDEX
from dsv32.eval.backends import EvalError
from dsv32.tokenizer import EOS

DEFAULT_MAX_TOKENS = 16384   # targets scored per evaluation (a few seconds for the tiny model on 2 cores)


def held_out_texts(source: str | list[str], validation_fraction: float = 0.05) -> list[str]:
    """The documents of `source`: a list of strings as given, else the corpus' validation split."""
    if not isinstance(source, str):
        return [t for t in source if t]
    from dsv32.data.corpus import corpus_documents

    if source != "stdlib" and not Path(source).exists():
        raise FileNotFoundError(f"no such data: {source} (give stdlib, a text path or a prepared data directory)")
    texts = [d.text for d in corpus_documents(source, "validation", validation_fraction) if d.text]
    if not texts:
        raise EvalError(f"{source}: its validation split holds no text documents")
    return texts


def windows(ids: list[int], seq_len: int) -> list[list[int]]:
    """Windows of at most seq_len + 1 tokens, consecutive ones sharing one token (as the loader cuts)."""
    return [ids[start:start + seq_len + 1] for start in range(0, max(len(ids) - 1, 1), seq_len)]


def budgeted_documents(docs: list[list[int]], max_tokens: int) -> list[list[int]]:
    """The documents in order until they hold `max_tokens` targets (every token but the first); the
    last one is cut to fit."""
    out, targets = [], 0
    for doc in docs:
        out.append(doc[:max_tokens - targets + 1])
        targets += len(out[-1]) - 1
        if targets >= max_tokens:
            break
    return out


def document_windows(docs: list[list[int]], seq_len: int) -> list[list[int]]:
    return [w for doc in docs for w in windows(doc, seq_len)]


def window_batches(rows: list[list[int]], seq_len: int, batch_size: int, pad_id: int):
    """`PackedLoader`-form batches of the windows: one document segment per row, padding ignored."""
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        ids = torch.full((len(chunk), seq_len + 1), pad_id, dtype=torch.long)
        labels = torch.full((len(chunk), seq_len), IGNORE_INDEX, dtype=torch.long)
        for r, window in enumerate(chunk):
            ids[r, :len(window)] = torch.tensor(window)
            labels[r, :len(window) - 1] = ids[r, 1:len(window)]
        starts = torch.zeros(len(chunk), seq_len, dtype=torch.bool)
        starts[:, 0] = True
        yield {"input_ids": ids[:, :-1], "labels": labels, "doc_starts": starts,
               "position_ids": torch.arange(seq_len).expand(len(chunk), -1)}


def _summary(totals: torch.Tensor, documents: int) -> dict:
    from dsv32.train.loop import loss_metrics

    metrics = loss_metrics(totals)
    if not metrics:
        raise EvalError("no tokens to score")
    return {"loss": metrics["loss"], "perplexity": math.exp(metrics["loss"]), "bpb": metrics.get("bpb"),
            "tokens": int(totals[1]), "bytes": int(totals[2]), "n": documents}


def _is_data_dir(source) -> bool:
    from dsv32.data.shards import MANIFEST

    return isinstance(source, (str, Path)) and (Path(source) / MANIFEST).is_file()


@torch.no_grad()
def perplexity(model, data: str | list[str] = "stdlib", tokenizer=None, *, seq_len: int = 256, batch_size: int = 8,
               max_tokens: int = DEFAULT_MAX_TOKENS, validation_fraction: float = 0.05, progress: bool = False) -> dict:
    """{"loss" (nats/token), "perplexity", "bpb", "tokens", "bytes", "n" (documents)} of `model` (a
    `Transformer`, or a checkpoint directory) on held-out `data`; `tokenizer` defaults to the checkpoint's."""
    from dsv32.eval.runner import load_model
    from dsv32.train.loop import loss_totals, token_byte_lengths

    model, tokenizer = load_model(model, tokenizer)
    if _is_data_dir(data):
        return _data_dir_perplexity(model, str(data), tokenizer, seq_len, batch_size, max_tokens, progress)
    if tokenizer is None:
        raise EvalError("perplexity on text needs a tokenizer")
    texts = held_out_texts(data, validation_fraction)
    docs = [[tokenizer.bos_id, *ids, tokenizer.eos_id] for ids in tokenizer.encode_batch(texts)]
    docs = budgeted_documents(docs, max_tokens)
    rows = document_windows(docs, seq_len)
    table = token_byte_lengths(tokenizer, model.config.vocab_size)
    was_training = model.training
    model.eval()
    batches = _bar(window_batches(rows, seq_len, batch_size, tokenizer.eos_id), -(-len(rows) // batch_size), progress)
    totals = loss_totals(model, batches, table)
    model.train(was_training)
    return _summary(totals, len(docs))


def _bar(batches, total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(batches, total=total, desc="perplexity", unit="batch", disable=not enabled, leave=False)


def _data_dir_perplexity(model, data_dir: str, tokenizer, seq_len: int, batch_size: int, max_tokens: int,
                         progress: bool) -> dict:
    from dsv32.data.loader import PackedLoader
    from dsv32.data.shards import read_manifest
    from dsv32.tokenizer import Tokenizer
    from dsv32.train.loop import loss_totals, token_byte_lengths

    if tokenizer is None:
        path = read_manifest(Path(data_dir))["tokenizer"].get("path")
        tokenizer = Tokenizer.load(path) if path and Path(path).exists() else None
    try:
        loader = PackedLoader(data_dir, "validation", seq_len, batch_size, shuffle=False, epochs=1, tokenizer=tokenizer)
    except ValueError:  # a small validation split: one window per batch
        loader = PackedLoader(data_dir, "validation", seq_len, 1, shuffle=False, epochs=1, tokenizer=tokenizer)
    batches = max(1, math.ceil(max_tokens / (seq_len * loader.batch_size)))
    table = token_byte_lengths(tokenizer, model.config.vocab_size) if tokenizer is not None else None
    was_training = model.training
    model.eval()
    totals = loss_totals(model, _bar(itertools.islice(loader, batches), batches, progress), table)
    model.train(was_training)
    return _summary(totals, int(loader.manifest["splits"]["validation"]["num_documents"]))


# ---------------------------------------------------------------------- over HTTP
def perplexity_http(backend, data: str | list[str] = "stdlib", *, seq_len: int = 256, max_tokens: int = DEFAULT_MAX_TOKENS,
                    validation_fraction: float = 0.05, batch_size: int = 8, progress: bool = False) -> dict:
    """`perplexity` of the model behind an `HTTPBackend` (see the module docstring)."""
    if _is_data_dir(data):
        raise EvalError("over a URL, perplexity reads text (stdlib or a text path), not prepared token shards")
    texts = held_out_texts(data, validation_fraction)
    docs, context, targets = [], None, 0
    for text in texts:  # only as many documents as the budget needs
        info = _json(backend.post("/tokenize", {"model": backend.model_name, "prompt": text + EOS}, root=True),
                     "/tokenize")
        docs.append(info["tokens"])  # BOS + text + EOS
        context = info.get("max_model_len") or context
        targets += len(docs[-1]) - 1
        if targets >= max_tokens:
            break
    seq_len = min(seq_len, context - 1) if context else seq_len  # a window must fit the server's context
    scored = budgeted_documents(docs, max_tokens)
    rows = document_windows(scored, seq_len)
    nats, tokens = 0.0, 0
    for start in _bar(range(0, len(rows), batch_size), -(-len(rows) // batch_size), progress):
        body = {"model": backend.model_name, "prompt": rows[start:start + batch_size], "max_tokens": 0, "echo": True,
                "logprobs": 0, "temperature": 0.0}
        for choice in _json(backend.post("/completions", body), "/v1/completions with echo and logprobs")["choices"]:
            logprobs = [lp for lp in (choice.get("logprobs") or {}).get("token_logprobs") or [] if lp is not None]
            nats -= sum(logprobs)
            tokens += len(logprobs)
    if tokens != sum(len(w) - 1 for w in rows):
        raise EvalError(f"{backend.base_url}/completions did not return a log-prob for every prompt token "
                        "(perplexity needs echo + logprobs)")
    n_bytes = sum(len(t.encode("utf-8")) + len(EOS.encode("utf-8")) for t in texts[:len(scored) - 1])
    n_bytes += _scored_bytes(backend, scored[-1], docs[len(scored) - 1], texts[len(scored) - 1])
    return _summary(torch.tensor([nats, tokens, n_bytes], dtype=torch.float64), len(scored))


def _scored_bytes(backend, scored: list[int], doc: list[int], text: str) -> int:
    """Bytes of a document's targets; a document cut by the budget is measured by detokenising them."""
    if len(scored) == len(doc):
        return len(text.encode("utf-8")) + len(EOS.encode("utf-8"))
    body = {"model": backend.model_name, "tokens": scored[1:]}
    return len(_json(backend.post("/detokenize", body, root=True), "/detokenize")["prompt"].encode("utf-8"))


def _json(response, what: str) -> dict:
    if response.status_code != 200:
        raise EvalError(f"perplexity over a URL needs {what}: HTTP {response.status_code} {response.text[:200]}")
    return response.json()

"""Tokenizer throughput on the stdlib corpus: dsv32 vs the same tokenizer used naively and via transformers.

    OMP_NUM_THREADS=2 .venv/bin/python bench/tokenizer.py [--tokenizer DIR] [--vocab-size 8192]

All three paths run the very same tokenizer.json and must produce identical ids (checked):
  dsv32         Tokenizer.encode_batch: one call, Rust threads, no character offsets
  naive         tokenizers.Tokenizer.encode(doc) in a Python loop (a common first attempt)
  transformers  PreTrainedTokenizerFast(texts) on the saved directory
Throughput is UTF-8 megabytes of source per second (best of --repeats). The last line is JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from dsv32.data.corpus import stdlib_documents  # noqa: E402
from dsv32.tokenizer import Tokenizer, train_tokenizer  # noqa: E402


def best_time(fn, repeats: int) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", help="directory with tokenizer.json (default: train one on the stdlib train split)")
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    docs = [d.text for d in stdlib_documents("all")]
    megabytes = sum(len(t.encode("utf-8")) for t in docs) / 1e6
    if args.tokenizer:
        tok = Tokenizer.load(args.tokenizer)
    else:
        start = time.perf_counter()
        tok = train_tokenizer((d.text for d in stdlib_documents("train")), args.vocab_size, show_progress=False)
        print(f"trained a {tok.vocab_size}-id tokenizer in {time.perf_counter() - start:.1f}s")

    with tempfile.TemporaryDirectory() as tmp:
        tok.save(tmp)
        from transformers import PreTrainedTokenizerFast

        hf = PreTrainedTokenizerFast.from_pretrained(tmp, model_max_length=1 << 30)  # whole files, no length warning

        ours_s, ours = best_time(lambda: tok.encode_batch(docs), args.repeats)
        naive_s, naive = best_time(lambda: [tok.backend.encode(t, add_special_tokens=False).ids for t in docs], args.repeats)
        hf_s, hf_ids = best_time(lambda: hf(docs, add_special_tokens=False)["input_ids"], args.repeats)
    if not ours == naive == hf_ids:
        print("error: the three paths disagree on token ids", file=sys.stderr)
        return 1

    tokens = sum(map(len, ours))
    result = {
        "bench": "tokenizer",
        "corpus": "stdlib",
        "corpus_mb": round(megabytes, 2),
        "documents": len(docs),
        "vocab_size": tok.vocab_size,
        "tokens": tokens,
        "bytes_per_token": round(megabytes * 1e6 / tokens, 3),
        "dsv32_mb_s": round(megabytes / ours_s, 2),
        "naive_mb_s": round(megabytes / naive_s, 2),
        "transformers_mb_s": round(megabytes / hf_s, 2),
        "speedup_vs_naive": round(naive_s / ours_s, 2),
        "speedup_vs_transformers": round(hf_s / ours_s, 2),
        "cpus": os.cpu_count(),
    }
    for name, seconds in (("dsv32 encode_batch", ours_s), ("naive encode loop", naive_s), ("transformers fast", hf_s)):
        print(f"{name:20s} {megabytes / seconds:7.2f} MB/s  ({seconds:.2f}s for {megabytes:.1f} MB)")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`dsv32 tokenizer ...` and `dsv32 data ...` subcommands (registered by dsv32.cli)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def add_commands(sub) -> None:
    tokenizer = sub.add_parser("tokenizer", help="train or inspect the BPE tokenizer")
    tok_sub = tokenizer.add_subparsers(dest="tokenizer_command", required=True, metavar="ACTION")
    train = tok_sub.add_parser("train", help="train a byte-level BPE tokenizer on a corpus")
    train.add_argument("--corpus", default="stdlib", help="'stdlib' (default) or a directory/file of .txt/.md/.py/.jsonl")
    train.add_argument("--vocab-size", type=int, default=8192, help="total ids including special tokens (default 8192)")
    train.add_argument("--min-frequency", type=int, default=2, help="least count for a merge (default 2)")
    train.add_argument("--limit-docs", type=int, default=None, help="train on at most this many documents")
    train.add_argument("--out", required=True, help="directory for tokenizer.json + tokenizer_config.json")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.set_defaults(func=_tokenizer_train)

    encode = tok_sub.add_parser("encode", help="print the token ids of a text (control-token strings stay plain)")
    encode.add_argument("--tokenizer", required=True, help="directory with tokenizer.json")
    encode.add_argument("text")
    encode.set_defaults(func=_tokenizer_encode)

    data = sub.add_parser("data", help="prepare token shards, dump generated tasks")
    data_sub = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    prep = data_sub.add_parser("prepare", help="tokenise sources into memory-mapped shards with a manifest")
    prep.add_argument("--tokenizer", required=True, help="directory with tokenizer.json")
    prep.add_argument("--source", action="append", required=True,
                      help="stdlib, a path (.txt/.md/.py/.jsonl or a directory of them), or tasks:KIND:N; repeatable")
    prep.add_argument("--out", required=True, help="output directory (shards + manifest.json)")
    prep.add_argument("--validation-fraction", type=float, default=0.05, help="share of files held out (default 0.05)")
    prep.add_argument("--shard-tokens", type=int, default=1 << 26, help="tokens per shard (default 2^26)")
    prep.add_argument("--thinking", choices=("auto", "thinking", "chat"), default="auto",
                      help="chat data: render in thinking or chat mode (auto: thinking when turns carry reasoning)")
    prep.add_argument("--overwrite", action="store_true", help="replace data already in --out")
    prep.add_argument("--no-progress", action="store_true", help="no progress bar")
    prep.set_defaults(func=_data_prepare)

    tasks = data_sub.add_parser("tasks", help="write generated verifiable tasks as JSON lines")
    tasks.add_argument("--kind", required=True, help="arithmetic, word_problem, tool_use or python")
    tasks.add_argument("--split", default="train", choices=("train", "validation", "test"))
    tasks.add_argument("-n", type=int, default=100, help="number of tasks (default 100)")
    tasks.add_argument("--seed", type=int, default=0)
    tasks.add_argument("--out", default="-", help="output .jsonl file (default: stdout)")
    tasks.set_defaults(func=_data_tasks)


def _positive(value: int | None, name: str) -> None:
    if value is not None and value < 1:
        raise ValueError(f"{name} must be positive, got {value}")


def _tokenizer_train(args: argparse.Namespace) -> int:
    from itertools import islice

    from dsv32.data.corpus import corpus_documents
    from dsv32.tokenizer import train_tokenizer

    _positive(args.vocab_size, "--vocab-size")
    _positive(args.limit_docs, "--limit-docs")
    # Only the training split: validation text must stay unseen by every trained component.
    docs = [d for d in islice(corpus_documents(args.corpus, "train"), args.limit_docs) if d.text is not None]
    if not docs:
        raise ValueError(f"no text documents found in {args.corpus}")
    tokenizer = train_tokenizer((d.text for d in docs), args.vocab_size, min_frequency=args.min_frequency,
                                length=len(docs), show_progress=not args.no_progress)
    out = tokenizer.save(args.out)
    print(f"tokenizer: {tokenizer.vocab_size} ids trained on {len(docs)} documents from {args.corpus} -> {out} "
          f"(fingerprint {tokenizer.fingerprint[:12]})")
    return 0


def _tokenizer_encode(args: argparse.Namespace) -> int:
    from dsv32.tokenizer import Tokenizer

    print(json.dumps(Tokenizer.load(args.tokenizer).encode(args.text)))
    return 0


def _data_prepare(args: argparse.Namespace) -> int:
    from dsv32.data.prepare import prepare

    _positive(args.shard_tokens, "--shard-tokens")
    manifest = prepare(args.source, args.tokenizer, args.out, validation_fraction=args.validation_fraction,
                       shard_tokens=args.shard_tokens, thinking=args.thinking, overwrite=args.overwrite,
                       show_progress=not args.no_progress)
    counts = ", ".join(f"{name}: {s['num_tokens']:,} tokens in {s['num_documents']:,} documents"
                       for name, s in manifest["splits"].items())
    print(f"data: {counts} -> {Path(args.out) / 'manifest.json'}")
    return 0


def _data_tasks(args: argparse.Namespace) -> int:
    from dsv32.data.tasks import generate

    _positive(args.n, "-n")
    lines = (json.dumps(task.to_json(), ensure_ascii=False) + "\n" for task in generate(args.kind, args.split, args.n, args.seed))
    if args.out == "-":
        sys.stdout.writelines(lines)
    else:
        with open(args.out, "w", encoding="utf-8") as handle:
            handle.writelines(lines)
    return 0

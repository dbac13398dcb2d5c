"""Serving throughput and latency of `dsv32 serve` under 1, 8 and 32 concurrent streaming clients.

    OMP_NUM_THREADS=2 .venv/bin/python bench/serve.py                 # random `tiny` model (built once)
    OMP_NUM_THREADS=2 .venv/bin/python bench/serve.py --model DIR     # any checkpoint with its tokenizer
    OMP_NUM_THREADS=2 .venv/bin/python bench/serve.py --quick         # nano model, small run (< 1 min)

Starts the server as a subprocess on 127.0.0.1 (ephemeral port) and drives it with closed-loop
clients: each client sends its next request as soon as the previous one finished. Every request is a
streaming /v1/completions call with a distinct random token-id prompt (so the prefix cache cannot
help), `ignore_eos` and a fixed `max_tokens`, so all requests generate the same number of tokens.
`logprobs: 0` makes every generated token arrive in a chunk that names it, so inter-token latency
is measured per token. Reports requests/s and generated tokens/s per concurrency level, and TTFT
and inter-token latency percentiles; the last line is one JSON object.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent


def build_model(out: Path, preset: str) -> Path:
    """A random checkpoint of `preset` with a tokenizer covering its whole vocabulary."""
    import torch

    from dsv32 import ModelConfig, Transformer
    from dsv32.checkpoint import save_pretrained
    from dsv32.data.corpus import stdlib_documents
    from dsv32.tokenizer import train_tokenizer

    if (out / "config.json").exists() and (out / "tokenizer.json").exists():
        return out
    cfg = ModelConfig.preset(preset)
    docs = [d.text for d in stdlib_documents("train", limit=200 if cfg.vocab_size > 1024 else 12)]
    tok = train_tokenizer(docs, cfg.vocab_size, show_progress=False)
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    save_pretrained(model, out)
    tok.save(out)
    return out


class Server:
    def __init__(self, model: Path, args: list[str]):
        cmd = [sys.executable, "-m", "dsv32.cli", "serve", "--model", str(model), "--port", "0", *args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env=dict(os.environ, PYTHONUNBUFFERED="1"))
        self.log: list[str] = []
        for line in self.proc.stdout:
            self.log.append(line)
            if "listening on " in line:
                self.url = line.split("listening on ", 1)[1].strip()
                break
        else:
            raise SystemExit("server did not start:\n" + "".join(self.log))
        threading.Thread(target=lambda: [self.log.append(x) for x in self.proc.stdout], daemon=True).start()

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=60)


async def one_request(client: httpx.AsyncClient, prompt: list[int], max_tokens: int) -> dict:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
            "logprobs": 0}
    start = time.perf_counter()
    stamps: list[float] = []
    async with client.stream("POST", "/v1/completions", json=body) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"HTTP {resp.status_code}: {await resp.aread()}")
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(event["error"]["message"])
            lp = event["choices"][0].get("logprobs") if event["choices"] else None
            if lp:
                now = time.perf_counter()
                stamps += [now] * len(lp["tokens"])
    if len(stamps) != max_tokens:
        raise RuntimeError(f"expected {max_tokens} tokens, got {len(stamps)}")
    return {"ttft": stamps[0] - start, "itl": [b - a for a, b in zip(stamps, stamps[1:])],
            "e2e": stamps[-1] - start, "tokens": len(stamps)}


async def run_level(url: str, concurrency: int, n_requests: int, prompt_len: int, max_tokens: int, vocab: int,
                    seed: int) -> dict:
    rng = random.Random(seed)
    prompts = [[rng.randrange(10, vocab) for _ in range(prompt_len)] for _ in range(n_requests)]
    queue = list(range(n_requests))
    results: list[dict] = []
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        async def worker():
            while queue:
                i = queue.pop()
                results.append(await one_request(client, prompts[i], max_tokens))

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    ttft = sorted(r["ttft"] for r in results)
    itl = sorted(x for r in results for x in r["itl"])

    def pct(xs, q):
        return xs[min(len(xs) - 1, int(q * len(xs)))] * 1000 if xs else float("nan")

    return {"concurrency": concurrency, "requests": n_requests, "wall_s": round(wall, 2),
            "requests_per_s": round(n_requests / wall, 3),
            "tokens_per_s": round(sum(r["tokens"] for r in results) / wall, 1),
            "ttft_ms_p50": round(pct(ttft, 0.5), 1), "ttft_ms_p90": round(pct(ttft, 0.9), 1),
            "ttft_ms_p99": round(pct(ttft, 0.99), 1),
            "itl_ms_p50": round(pct(itl, 0.5), 1), "itl_ms_p90": round(pct(itl, 0.9), 1),
            "itl_ms_p99": round(pct(itl, 0.99), 1), "itl_ms_mean": round(statistics.fmean(itl) * 1000, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="checkpoint directory (default: a random model of --preset, built once)")
    p.add_argument("--preset", default="tiny", help="preset of the default random model (default tiny)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--requests", type=int, default=0, help="requests per level (default: 2x concurrency, >= 8)")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--quick", action="store_true", help="nano model, short prompts and outputs")
    p.add_argument("--server-arg", action="append", default=[], help="extra `dsv32 serve` flag (repeatable)")
    args = p.parse_args()
    if args.quick:
        args.preset, args.prompt_tokens, args.max_tokens = "nano", 32, 16
    model = Path(args.model) if args.model else build_model(
        Path(tempfile.gettempdir()) / f"dsv32-bench-serve-{args.preset}", args.preset)
    vocab = json.loads((model / "config.json").read_text())["vocab_size"]
    server = Server(model, ["--max-batch", str(args.max_batch), "--max-seq-len",
                            str(args.prompt_tokens + args.max_tokens + 16), *args.server_arg])
    try:
        asyncio.run(run_level(server.url, 1, 2, args.prompt_tokens, 4, vocab, seed=999))  # warm-up
        rows = []
        for c in args.concurrency:
            n = args.requests or max(8, 2 * c)
            rows.append(asyncio.run(run_level(server.url, c, n, args.prompt_tokens, args.max_tokens, vocab, seed=c)))
            r = rows[-1]
            print(f"concurrency {c:3d}: {r['requests_per_s']:7.2f} req/s  {r['tokens_per_s']:8.1f} tok/s  "
                  f"TTFT p50/p90/p99 {r['ttft_ms_p50']:.0f}/{r['ttft_ms_p90']:.0f}/{r['ttft_ms_p99']:.0f} ms  "
                  f"ITL p50/p90/p99 {r['itl_ms_p50']:.1f}/{r['itl_ms_p90']:.1f}/{r['itl_ms_p99']:.1f} ms", flush=True)
    finally:
        server.stop()
    summary = {"bench": "serve", "model": str(model), "preset": None if args.model else args.preset,
               "prompt_tokens": args.prompt_tokens, "max_tokens": args.max_tokens, "max_batch": args.max_batch,
               "levels": rows, "cpus": os.cpu_count()}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()

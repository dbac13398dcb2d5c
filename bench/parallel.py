"""Decode throughput of one engine in one process vs. across torchrun ranks (token ids, greedy).

    python bench/parallel.py --model DIR [--batch 4] [--tokens 64]
    torchrun --nproc_per_node 2 --rdzv-backend c10d --rdzv-endpoint 127.0.0.1:29500 bench/parallel.py --model DIR

Prints prefill and decode tokens/s on rank 0 (decode: generated tokens over the time after the first
token of every request). Random prompts; a random checkpoint works (`dsv32 init --preset tiny`).
"""
from __future__ import annotations

import argparse
import time

import torch

from dsv32.checkpoint import load_pretrained, load_sharded
from dsv32.infer import Engine, SamplingParams
from dsv32.infer.parallel import DriverEngine, follow, init_parallel, parallelize, shutdown


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--tokens", type=int, default=64)
    args = p.parse_args()
    ctx = init_parallel()
    ok = False
    try:
        if ctx.distributed:
            model = load_sharded(args.model, lambda meta: parallelize(meta, ctx), device=ctx.device)
        else:
            model = load_pretrained(args.model, device=ctx.device)
        settings = dict(max_batch=args.batch, max_seq_len=args.prompt_len + args.tokens + 1)
        if ctx.distributed and not ctx.is_driver:
            follow(Engine(model, **settings), ctx)
            ok = True
            return
        engine = DriverEngine(model, ctx, **settings) if ctx.distributed else Engine(model, **settings)
        g = torch.Generator().manual_seed(0)
        prompts = [torch.randint(2, model.config.vocab_size, (args.prompt_len,), generator=g).tolist()
                   for _ in range(args.batch)]
        params = SamplingParams(max_tokens=args.tokens, temperature=0, ignore_eos=True)
        engine.complete(prompts[:1], SamplingParams(max_tokens=2, temperature=0))   # warm-up: first calls are slow
        for rid, prompt in enumerate(prompts):
            engine.add_request(prompt, params, request_id=str(rid))
        t0 = time.perf_counter()
        first, generated = None, 0
        while engine.has_unfinished():
            outs = engine.step()
            generated += sum(len(o.token_ids) for o in outs)
            if first is None and generated >= args.batch:
                first, generated_at_first = time.perf_counter(), generated
        end = time.perf_counter()
        if ctx.distributed:
            engine.close()
        print(f"{ctx.world_size} rank(s): prefill {args.batch * args.prompt_len / (first - t0):.0f} tokens/s, "
              f"decode {(generated - generated_at_first) / (end - first):.1f} tokens/s "
              f"(batch {args.batch}, {args.tokens} tokens each)", flush=True)
        ok = True
    finally:
        shutdown(sync=ok)


if __name__ == "__main__":
    main()

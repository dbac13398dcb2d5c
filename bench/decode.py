"""Decoding speed: the dsv32 engine vs transformers `generate` on the same weights, plus DSA, MTP, int8.

Model: by default the 73M-parameter DeepSeek-V3 shape of the transformers peer measurements
(vocab 32000, hidden 512, 6 layers, 16 routed experts top-4, one MTP layer), random weights from a
fixed seed, written with `save_pretrained` and loaded by transformers from that directory, so both
sides hold identical fp32 weights. `--model DIR` uses a checkpoint instead (then MTP and perplexity
figures mean something: random weights give the MTP layer nothing to predict).

Sections (one process, `--threads` intra-op threads, fp32, greedy; dsv32 and transformers runs are
interleaved and each figure is the best of `--repeats`: this class of machine shows +-15-20%
run-to-run noise, far more when other jobs share its cores, and the slow runs measure those jobs):
  1. decode tokens/s at batch 1 and 8: dsv32 `Engine` vs `generate` (decode time = time for N+1 new
     tokens minus time for 1, i.e. without the prefill), and whether the greedy tokens agree; then batch 1
     with `Engine(compile=True)`, fp32 and int8, against eager and transformers;
  2. prefill tokens/s of one `--prefill-len` prompt;
  3. DSA vs dense decode step time at 4K/16K/32K tokens of context on the V3.2 variant of the model
     (index_topk 2048, the release value); the cache is filled with random latents (a 32K prefill of
     this model would take minutes), "dense" is the same model with the top-k switched off;
  4. MTP speculative decoding vs plain decoding at batch 1: speed-up and acceptance; with random
     weights the draft is almost never right, so the run is repeated with an oracle draft (the true
     next token) for the speed-up at full acceptance;
  5. weight-only int8 vs fp32 at batch 1, and the perplexity change on held-out stdlib text.

Usage: OMP_NUM_THREADS=2 .venv/bin/python bench/decode.py [--quick] [--threads 2] [--model DIR]
The last line printed is one JSON object: {"bench": "decode", "ratio_batch1": ..., "ratio_batch8": ...,
"dsa_vs_dense_32k": ..., "mtp_speedup": ..., "mtp_acceptance": ..., ...}.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import sys
import tempfile
import time

import torch


def bench_config():
    from dsv32 import ModelConfig

    return ModelConfig.preset("tiny").replace(
        model_type="deepseek_v3", vocab_size=32000, hidden_size=512, intermediate_size=1536,
        moe_intermediate_size=256, num_attention_heads=8, num_key_value_heads=8, q_lora_rank=256,
        kv_lora_rank=128, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64,
        index_n_heads=4, index_head_dim=64, index_topk=2048, max_position_embeddings=40960,
    )


def best(xs):
    """The fastest of the repeats: on a shared machine the slower runs measure other people's jobs."""
    return min(xs)


def prompts(vocab: int, batch: int, length: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, vocab, (batch, length), generator=g).tolist()


# ---------------------------------------------------------------------- dsv32 side
def engine_decode(model, batch_prompts, new_tokens: int, **engine_kw):
    """Run the prompts to `new_tokens` tokens each; returns (decode seconds, tokens per row, engine)."""
    from dsv32.infer import Engine, SamplingParams

    n = len(batch_prompts)
    length = len(batch_prompts[0])
    eng = Engine(model, max_batch=n, max_seq_len=length + new_tokens + 8, prefix_caching=False,
                 max_prefill_tokens=n * length, **engine_kw)
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    ids = [eng.add_request(p, params) for p in batch_prompts]
    tokens = {rid: [] for rid in ids}
    t_first = None
    while eng.has_unfinished():
        for out in eng.step():
            tokens[out.request_id] += out.token_ids
        if t_first is None and all(tokens[r] for r in ids):
            t_first = time.perf_counter()  # every row has its first token: prefill is over
    return time.perf_counter() - t_first, [tokens[r] for r in ids], eng


def prefill_time(model, prompt: list[int]) -> float:
    from dsv32.infer import Engine, SamplingParams

    eng = Engine(model, max_batch=1, max_seq_len=len(prompt) + 8, prefix_caching=False,
                 max_prefill_tokens=len(prompt))
    eng.add_request(prompt, SamplingParams(max_tokens=1, temperature=0, ignore_eos=True))
    t0 = time.perf_counter()
    eng.step()
    return time.perf_counter() - t0


# ---------------------------------------------------------------------- transformers side
def hf_generate(hf, batch_prompts, new_tokens: int):
    ids = torch.tensor(batch_prompts)
    t0 = time.perf_counter()
    out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                      do_sample=False, pad_token_id=0)
    return time.perf_counter() - t0, out[:, ids.shape[1]:].tolist()


def hf_decode(hf, batch_prompts, new_tokens: int):
    """Seconds for `new_tokens` tokens without the prefill (generate(N) - generate(1)), and the tokens."""
    full, tokens = hf_generate(hf, batch_prompts, new_tokens)
    first, _ = hf_generate(hf, batch_prompts, 1)
    return full - first, tokens


def hf_prefill_time(hf, prompt) -> float:
    ids = torch.tensor([prompt])
    t0 = time.perf_counter()
    hf(input_ids=ids, use_cache=True, logits_to_keep=1)
    return time.perf_counter() - t0


# ---------------------------------------------------------------------- sections
def section_throughput(args, ours, hf, results):
    cfg = ours.config
    for batch in (1, 8):
        ps = prompts(cfg.vocab_size, batch, args.prompt_len, seed=batch)
        n = args.new_tokens
        t_ours, t_hf, agree = [], [], None
        engine_decode(ours, ps, n + 1)  # warm-up at full length: the first runs after loading are slow
        hf_generate(hf, ps, n + 1)
        for r in range(args.repeats):
            order = ("ours", "hf") if r % 2 == 0 else ("hf", "ours")
            for side in order:
                if side == "ours":
                    seconds, toks, _ = engine_decode(ours, ps, n + 1)
                    t_ours.append(seconds)
                else:
                    seconds, hf_toks = hf_decode(hf, ps, n + 1)
                    t_hf.append(seconds)
            if agree is None:
                agree = sum(a == b for ra, rb in zip(toks, hf_toks) for a, b in zip(ra, rb)) / (batch * (n + 1))
        ours_tps = batch * n / best(t_ours)
        hf_tps = batch * n / best(t_hf)
        results[f"batch{batch}"] = {"dsv32_tok_s": round(ours_tps, 1), "hf_tok_s": round(hf_tps, 1),
                                    "ratio": round(ours_tps / hf_tps, 3), "greedy_tokens_agree": round(agree, 3)}
        print(f"decode batch {batch}: dsv32 {ours_tps:7.1f} tok/s   transformers {hf_tps:7.1f} tok/s   "
              f"ratio {ours_tps / hf_tps:5.2f}x   (greedy tokens agree: {agree:.0%})", flush=True)


def section_compile(args, ours, hf, results):
    """Batch 1 with `Engine(compile=True)` (the compiled one-token steps), fp32 and int8, interleaved with
    eager fp32 and transformers."""
    from dsv32.infer.quant import quantize_int8

    ps = prompts(ours.config.vocab_size, 1, args.prompt_len, seed=1)
    n = args.new_tokens
    int8 = quantize_int8(copy.deepcopy(ours))
    t0 = time.perf_counter()
    engine_decode(ours, ps, 4, compile=True)  # compiles the one-token steps
    compile_s = time.perf_counter() - t0
    engine_decode(int8, ps, 4, compile=True)
    runs = {"eager": (ours, False), "compiled": (ours, True), "compiled_int8": (int8, True)}
    times: dict = {side: [] for side in (*runs, "hf")}
    for r in range(args.repeats):
        for side in times if r % 2 == 0 else reversed(times):
            if side == "hf":
                times["hf"].append(hf_decode(hf, ps, n + 1)[0])
            else:
                model, compiled = runs[side]
                times[side].append(engine_decode(model, ps, n + 1, compile=compiled)[0])
    tps = {side: n / best(t) for side, t in times.items()}
    results["compile"] = {"compiled_tok_s": round(tps["compiled"], 1), "eager_tok_s": round(tps["eager"], 1),
                          "compiled_int8_tok_s": round(tps["compiled_int8"], 1), "hf_tok_s": round(tps["hf"], 1),
                          "compiled_vs_eager": round(tps["compiled"] / tps["eager"], 3),
                          "compiled_vs_hf": round(tps["compiled"] / tps["hf"], 3),
                          "compiled_int8_vs_hf": round(tps["compiled_int8"] / tps["hf"], 3),
                          "compile_seconds": round(compile_s, 1)}
    print(f"compiled decode (Engine(compile=True)), batch 1: {tps['compiled']:7.1f} tok/s   "
          f"eager {tps['eager']:7.1f}   transformers {tps['hf']:7.1f}   "
          f"compiled/eager {tps['compiled'] / tps['eager']:5.2f}x   compiled/transformers "
          f"{tps['compiled'] / tps['hf']:5.2f}x   (compiling took {compile_s:.0f} s); int8 compiled "
          f"{tps['compiled_int8']:7.1f} tok/s ({tps['compiled_int8'] / tps['hf']:5.2f}x transformers)", flush=True)


def section_prefill(args, ours, hf, results):
    prompt = prompts(ours.config.vocab_size, 1, args.prefill_len, seed=99)[0]
    prefill_time(ours, prompt)
    hf_prefill_time(hf, prompt)
    t_ours, t_hf = [], []
    with torch.inference_mode():
        for _ in range(args.repeats):
            t_ours.append(prefill_time(ours, prompt))
            t_hf.append(hf_prefill_time(hf, prompt))
    o, h = args.prefill_len / best(t_ours), args.prefill_len / best(t_hf)
    results["prefill"] = {"tokens": args.prefill_len, "dsv32_tok_s": round(o, 1), "hf_tok_s": round(h, 1),
                          "ratio": round(o / h, 3)}
    print(f"prefill 1x{args.prefill_len}: dsv32 {o:7.1f} tok/s   transformers {h:7.1f} tok/s   ratio {o / h:5.2f}x",
          flush=True)


def section_dsa(args, base_cfg, results):
    from dsv32.cli_model import build_random_model
    from dsv32.infer.cache import PagedLatentCache
    from dsv32.infer.decode import DecodePath, pair_expert_weights

    cfg = base_cfg.replace(model_type="deepseek_v32", num_nextn_predict_layers=0)
    model = build_random_model(cfg, seed=args.seed)
    pair_expert_weights(model)
    path = DecodePath(model)
    bs = 64
    longest = max(args.contexts)
    cache = PagedLatentCache(cfg, num_blocks=longest // bs + 3, block_size=bs)
    g = torch.Generator().manual_seed(0)
    cache.kv.normal_(generator=g)  # normalised latents and rope keys have unit scale
    cache.index_key.normal_(generator=g)
    blocks = [cache.pool.allocate() for _ in range(longest // bs + 2)]
    batch = cache.batch([blocks])
    attns = [layer.self_attn for layer in model.layers]
    out = {}

    def step(context: int) -> float:
        ids, pos = torch.tensor([[7]]), torch.tensor([[context]])
        t0 = time.perf_counter()
        path.forward(ids, pos, batch)
        return time.perf_counter() - t0

    base = []  # the same step at a short context: weights and everything but attention
    for r in range(args.repeats + 1):
        t = step(256)
        if r:
            base.append(t)
    base_t = best(base)
    print(f"decode step at {256:>6} tokens of context: {base_t * 1e3:7.2f} ms (the cost outside attention)", flush=True)
    for context in args.contexts:
        times = {"dsa": [], "dense": []}
        for r in range(args.repeats + 1):
            for mode in ("dsa", "dense") if r % 2 == 0 else ("dense", "dsa"):
                for a in attns:
                    a.indexer.topk = cfg.index_topk if mode == "dsa" else 1 << 30
                t = step(context)
                if r:  # the first round warms up
                    times[mode].append(t)
        for a in attns:
            a.indexer.topk = cfg.index_topk
        dsa, dense = best(times["dsa"]), best(times["dense"])
        attn = (dense - base_t) / max(dsa - base_t, 1e-6)
        out[str(context)] = {"dsa_ms": round(dsa * 1e3, 2), "dense_ms": round(dense * 1e3, 2),
                             "speedup": round(dense / dsa, 3), "attention_only_speedup": round(attn, 3)}
        print(f"decode step at {context:>6} tokens of context: DSA {dsa * 1e3:7.2f} ms   dense {dense * 1e3:7.2f} ms   "
              f"DSA {dense / dsa:5.2f}x faster (attention alone {attn:5.2f}x; index_topk {cfg.index_topk})", flush=True)
    out["base_ms"] = round(base_t * 1e3, 2)
    results["dsa"] = out


def section_mtp(args, ours, results):
    cfg = ours.config
    ps = prompts(cfg.vocab_size, 1, args.prompt_len, seed=5)
    n = args.new_tokens
    engine_decode(ours, ps, 4, speculative=True)
    plain_t, spec_t, oracle_t = [], [], []
    plain_tokens = None
    stats = oracle_stats = None
    for _ in range(args.repeats):
        seconds, plain_tokens, _ = engine_decode(ours, ps, n + 1)
        plain_t.append(seconds)
        seconds, spec_tokens, eng = engine_decode(ours, ps, n + 1, speculative=True)
        spec_t.append(seconds)
        stats = eng.spec_stats
        assert spec_tokens == plain_tokens, "speculative greedy output differs from plain decoding"
        with oracle_drafts(plain_tokens[0]):
            seconds, oracle_tokens, eng = engine_decode(ours, ps, n + 1, speculative=True)
        oracle_t.append(seconds)
        oracle_stats = eng.spec_stats
        assert oracle_tokens == plain_tokens
    speedup = best(plain_t) / best(spec_t)
    oracle = best(plain_t) / best(oracle_t)
    results["mtp"] = {"speedup": round(speedup, 3), "acceptance": round(stats.acceptance_rate, 4),
                      "tokens_per_step": round(stats.tokens_per_step, 3),
                      "speedup_full_acceptance": round(oracle, 3),
                      "tokens_per_step_full_acceptance": round(oracle_stats.tokens_per_step, 3)}
    print(f"MTP speculative, batch 1: {speedup:5.2f}x plain decoding at {stats.acceptance_rate:.0%} acceptance "
          f"({stats.tokens_per_step:.2f} tokens/step); with always-right drafts {oracle:5.2f}x "
          f"({oracle_stats.tokens_per_step:.2f} tokens/step)", flush=True)


@contextlib.contextmanager
def oracle_drafts(continuation: list[int]):
    """Make the engine draft the known greedy continuation (the MTP layer still runs and costs the same)."""
    from dsv32.infer.engine import Engine

    original = Engine._set_draft

    def set_draft(self, req, logits):
        original(self, req, logits)
        k = len(req.output_ids)
        if k < len(continuation):
            req.draft = continuation[k]

    Engine._set_draft = set_draft
    try:
        yield
    finally:
        Engine._set_draft = original


def section_int8(args, ours, results, tokenizer_dir):
    from dsv32.infer.quant import perplexity, quantize_int8, weight_bytes

    cfg = ours.config
    q = quantize_int8(copy.deepcopy(ours))
    ps = prompts(cfg.vocab_size, 1, args.prompt_len, seed=7)
    n = args.new_tokens
    engine_decode(q, ps, 4)
    t32, t8 = [], []
    for r in range(args.repeats):
        for which in ("fp32", "int8") if r % 2 == 0 else ("int8", "fp32"):
            seconds, toks, _ = engine_decode(ours if which == "fp32" else q, ps, n + 1)
            (t32 if which == "fp32" else t8).append(seconds)
    speed = best(t32) / best(t8)
    ids = heldout_ids(cfg.vocab_size, args.ppl_tokens, tokenizer_dir)
    with torch.inference_mode():
        p32, p8 = perplexity(ours, ids), perplexity(q, ids)
    change = p8 / p32 - 1
    results["int8"] = {"speedup_batch1": round(speed, 3), "fp32_tok_s": round(n / best(t32), 1),
                       "int8_tok_s": round(n / best(t8), 1), "weight_mb_fp32": round(weight_bytes(ours) / 1e6, 1),
                       "weight_mb_int8": round(weight_bytes(q) / 1e6, 1), "ppl_fp32": round(p32, 3),
                       "ppl_int8": round(p8, 3), "ppl_change": round(change, 5), "ppl_tokens": len(ids)}
    print(f"int8 weights, batch 1: {speed:5.2f}x fp32 decode ({n / best(t8):.1f} vs {n / best(t32):.1f} tok/s); "
          f"perplexity {p32:.3f} -> {p8:.3f} ({change:+.3%}) on {len(ids)} held-out stdlib tokens", flush=True)


def heldout_ids(vocab: int, n: int, tokenizer_dir: str | None) -> list[int]:
    """Tokens of the stdlib validation split: with the checkpoint's tokenizer, or one trained here."""
    from dsv32.data.corpus import stdlib_documents
    from dsv32.tokenizer import Tokenizer, train_tokenizer

    if tokenizer_dir:
        tok = Tokenizer.load(tokenizer_dir)
    else:
        tok = train_tokenizer((d.text for d in stdlib_documents("train", limit=40)), min(vocab, 4096),
                              show_progress=False)
    ids: list[int] = []
    for doc in stdlib_documents("validation"):
        ids += tok.encode(doc.text)
        if len(ids) >= n:
            break
    if max(ids) >= vocab:
        raise SystemExit("decode.py: error: the tokenizer's ids do not fit the model's vocabulary")
    return ids[:n]


# ---------------------------------------------------------------------- main
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smaller run, under a minute")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", help="checkpoint directory (default: the random 73M V3 model)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--new-tokens", type=int, default=None)
    parser.add_argument("--prompt-len", type=int, default=None)
    parser.add_argument("--prefill-len", type=int, default=512)
    parser.add_argument("--contexts", default="4096,16384,32768", help="contexts for the DSA section")
    parser.add_argument("--ppl-tokens", type=int, default=None)
    parser.add_argument("--sections", default="throughput,compile,prefill,dsa,mtp,int8")
    args = parser.parse_args(argv)
    quick = args.quick
    args.repeats = args.repeats or (2 if quick else 5)
    args.new_tokens = args.new_tokens or (16 if quick else 64)
    args.prompt_len = args.prompt_len or (32 if quick else 128)
    args.ppl_tokens = args.ppl_tokens or (1024 if quick else 8192)
    if quick:
        args.prefill_len = min(args.prefill_len, 256)
    args.contexts = [int(c) for c in args.contexts.split(",")]
    sections = set(args.sections.split(","))
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()

    import transformers

    from dsv32 import save_pretrained
    from dsv32.checkpoint import load_pretrained
    from dsv32.cli_model import build_random_model
    from dsv32.infer.decode import pair_expert_weights

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    if args.model:
        ours = load_pretrained(args.model, dtype=torch.float32).eval()
        tokenizer_dir = args.model
    else:
        ours = build_random_model(bench_config(), seed=args.seed)
        tokenizer_dir = None
    cfg = ours.config
    hf_cls = transformers.DeepseekV32ForCausalLM if cfg.use_dsa else transformers.DeepseekV3ForCausalLM
    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(ours, tmp, dtype=torch.float32)
        hf = hf_cls.from_pretrained(tmp, dtype=torch.float32).eval()
    pair_expert_weights(ours)  # same values; an expert's gate and up as one matmul at decode (infer/decode.py)
    print(f"model: {args.model or 'random ' + cfg.model_type} ({cfg.num_params() / 1e6:.1f}M params, "
          f"{cfg.num_active_params() / 1e6:.1f}M active, + MTP layer), fp32, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, transformers {transformers.__version__}; prompts {args.prompt_len} tokens, "
          f"{args.new_tokens} new tokens, best of {args.repeats}", flush=True)

    results: dict = {}
    with torch.inference_mode():
        if "throughput" in sections:
            section_throughput(args, ours, hf, results)
        if "compile" in sections:
            section_compile(args, ours, hf, results)
        if "prefill" in sections:
            section_prefill(args, ours, hf, results)
        del hf
        if "dsa" in sections:
            section_dsa(args, bench_config() if not args.model else cfg, results)
        if "mtp" in sections and len(ours.mtp):
            section_mtp(args, ours, results)
        if "int8" in sections:
            section_int8(args, ours, results, tokenizer_dir)
    longest = str(max(args.contexts))
    summary = {
        "bench": "decode",
        "ratio_batch1": results.get("batch1", {}).get("ratio"),
        "ratio_batch8": results.get("batch8", {}).get("ratio"),
        "dsa_vs_dense_32k": results.get("dsa", {}).get(longest, {}).get("speedup"),
        "mtp_speedup": results.get("mtp", {}).get("speedup"),
        "mtp_acceptance": results.get("mtp", {}).get("acceptance"),
        "mtp_speedup_full_acceptance": results.get("mtp", {}).get("speedup_full_acceptance"),
        "int8_speedup": results.get("int8", {}).get("speedup_batch1"),
        "int8_ppl_change": results.get("int8", {}).get("ppl_change"),
        "prefill_ratio": results.get("prefill", {}).get("ratio"),
        "compiled_ratio_batch1": results.get("compile", {}).get("compiled_vs_hf"),
        "quick": quick, "threads": torch.get_num_threads(), "model": args.model or "random-73M-v3",
        "seconds": round(time.perf_counter() - t_start, 1), "details": results,
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())

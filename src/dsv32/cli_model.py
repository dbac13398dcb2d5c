"""Model-level subcommands of `dsv32`: `info`, `init` and `demo`.

- `info PRESET_OR_DIR`: the architecture and its accounting (parameters, active parameters, KV-cache
  bytes, FLOPs), from arithmetic alone, so the 671B configs cost nothing to inspect.
- `init --preset NAME --out DIR`: a randomly initialised checkpoint in the Hugging Face layout, the
  fixture that tests, benchmarks and later tools start from. Deterministic for a given seed.
- `demo`: the presets side by side, then a forward pass and a greedy continuation of the `tiny`
  model over the latent cache, checked against decoding by full recomputation.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from dsv32.cli import CLIError
from dsv32.config import PRESETS, ModelConfig

# Above this many parameters `init` refuses without --force: the 671B configs need terabytes of RAM.
INIT_MAX_PARAMS = 100e9

DTYPES = {
    "fp32": torch.float32, "float32": torch.float32,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16,
    "fp8": torch.float8_e4m3fn, "float8_e4m3fn": torch.float8_e4m3fn,
}
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16",
               torch.float8_e4m3fn: "float8_e4m3fn"}


# ---------------------------------------------------------------------- helpers shared with tests/bench
def resolve_config(spec: str) -> tuple[ModelConfig, str]:
    """A preset name or a checkpoint directory (or a config.json path) -> (validated config, source label)."""
    if spec in PRESETS:
        return ModelConfig.preset(spec), f"preset {spec}"
    if os.path.exists(spec):
        if os.path.isdir(spec) and not os.path.exists(os.path.join(spec, "config.json")):
            raise FileNotFoundError(f"{spec} is a directory without a config.json (not a checkpoint)")
        return ModelConfig.from_pretrained(spec).validate(), os.path.abspath(spec)
    looks_like_path = os.sep in spec or spec.startswith(".") or spec.endswith(".json")
    if looks_like_path:
        raise FileNotFoundError(f"no such checkpoint directory: {spec}")
    raise CLIError(f"unknown preset {spec!r} and no such directory; presets: {', '.join(PRESETS)}")


def parse_dtype(name: str, allowed: tuple[str, ...] | None = None) -> torch.dtype:
    key = name.lower()
    if key not in DTYPES or (allowed is not None and key not in allowed):
        choices = allowed or tuple(DTYPES)
        raise CLIError(f"unknown dtype {name!r}; choose one of {', '.join(choices)}")
    return DTYPES[key]


def build_random_model(cfg: ModelConfig, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A `Transformer` with weights drawn from a generator seeded with `seed` (same seed -> same weights).

    Built on the meta device and materialised once, so no memory or time goes to a throwaway init.
    """
    from dsv32.model.transformer import Transformer

    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device="cpu")
    model.init_weights(generator=torch.Generator().manual_seed(seed))
    if dtype != torch.float32:
        model.to(dtype)
    return model.eval()


def model_facts(cfg: ModelConfig, dtype: torch.dtype = torch.bfloat16, context: int = 4096) -> dict:
    """Everything `info` reports, as plain JSON-able values."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    n_moe = sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
    per_layer = {
        "latent": cfg.kv_lora_rank * itemsize,
        "rope_key": cfg.qk_rope_head_dim * itemsize,
        "indexer_key": (cfg.index_head_dim if cfg.use_dsa else 0) * itemsize,
    }
    kv_per_token = cfg.kv_cache_bytes_per_token(dtype)
    rs = cfg.rope_scaling or {}
    return {
        "model_type": cfg.model_type,
        "vocab_size": cfg.vocab_size,
        "layers": cfg.num_hidden_layers,
        "dense_layers": cfg.num_hidden_layers - n_moe,
        "moe_layers": n_moe,
        "mtp_layers": cfg.num_nextn_predict_layers,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "moe_intermediate_size": cfg.moe_intermediate_size,
        "attention_heads": cfg.num_attention_heads,
        "q_lora_rank": cfg.q_lora_rank,
        "kv_lora_rank": cfg.kv_lora_rank,
        "qk_nope_head_dim": cfg.qk_nope_head_dim,
        "qk_rope_head_dim": cfg.qk_rope_head_dim,
        "v_head_dim": cfg.v_head_dim,
        "routed_experts": cfg.n_routed_experts,
        "shared_experts": cfg.n_shared_experts,
        "experts_per_token": cfg.num_experts_per_tok,
        "expert_groups": cfg.n_group,
        "topk_groups": cfg.topk_group,
        "scoring_func": cfg.scoring_func,
        "dsa": cfg.use_dsa,
        "index_n_heads": cfg.index_n_heads if cfg.use_dsa else None,
        "index_head_dim": cfg.index_head_dim if cfg.use_dsa else None,
        "index_topk": cfg.index_topk if cfg.use_dsa else None,
        "max_position_embeddings": cfg.max_position_embeddings,
        "rope_type": cfg.rope_type,
        "rope_factor": rs.get("factor") if cfg.rope_type == "yarn" else None,
        "softmax_scale": cfg.softmax_scale,
        "params_total": cfg.num_params(),
        "params_total_with_mtp": cfg.num_params(include_mtp=True),
        "params_active": cfg.num_active_params(),
        "params_active_with_mtp": cfg.num_active_params(include_mtp=True),
        "kv_dtype": DTYPE_NAMES.get(dtype, str(dtype)),
        "kv_bytes_per_token_per_layer": per_layer,
        "kv_bytes_per_token": kv_per_token,
        "context": context,
        "kv_bytes_at_context": kv_per_token * context,
        "flops_per_token_at_context": cfg.flops_per_token(context),
    }


def _si(n: float, unit: str = "") -> str:
    for div, suffix in ((1e12, "T"), (1e9, "G" if unit else "B"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.2f}{suffix}" + (f" {unit}" if unit else "")
    return f"{n:g}" + (f" {unit}" if unit else "")


def _bytes(n: int) -> str:
    for div, suffix in ((2**40, "TiB"), (2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if n >= div:
            return f"{n / div:.2f} {suffix}"
    return f"{n} B"


def _table(rows: list[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k.ljust(width)}  {v}" if k else "" for k, v in rows)


def format_info(facts: dict, source: str) -> str:
    f = facts
    kv = f["kv_bytes_per_token_per_layer"]
    kv_parts = f"latent {kv['latent']} + rope key {kv['rope_key']}"
    if f["dsa"]:
        kv_parts += f" + indexer key {kv['indexer_key']}"
    q = f"q-LoRA {f['q_lora_rank']}" if f["q_lora_rank"] else "plain q_proj"
    rope = f"yarn x{f['rope_factor']:g}" if f["rope_type"] == "yarn" else f["rope_type"]
    groups = (f"{f['expert_groups']} groups, best {f['topk_groups']} kept" if f["expert_groups"] > 1 else "no groups")
    experts = (f"{f['routed_experts']} routed + {f['shared_experts']} shared, top-{f['experts_per_token']}"
               f" ({f['scoring_func']}, {groups})")
    dsa = (f"on: {f['index_n_heads']} indexer heads x {f['index_head_dim']}, top-{f['index_topk']} keys"
           if f["dsa"] else "off (dense MLA)")
    rows = [
        ("source", source),
        ("model type", f["model_type"]),
        ("layers", f"{f['layers']} ({f['dense_layers']} dense + {f['moe_layers']} MoE) + {f['mtp_layers']} MTP"),
        ("width", f"hidden {f['hidden_size']}, dense FFN {f['intermediate_size']}, expert FFN {f['moe_intermediate_size']}"),
        ("attention (MLA)", f"{f['attention_heads']} heads, {q}, kv latent {f['kv_lora_rank']}, "
                            f"head dims nope {f['qk_nope_head_dim']} / rope {f['qk_rope_head_dim']} / v {f['v_head_dim']}"),
        ("experts", experts),
        ("DSA", dsa),
        ("vocab / positions", f"{f['vocab_size']:,} / {f['max_position_embeddings']:,} (rope {rope})"),
        ("softmax scale", f"{f['softmax_scale']:.7f}"),
        ("", ""),
        ("params (no MTP)", f"{_si(f['params_total'])}  ({f['params_total']:,})"),
        ("params (with MTP)", f"{_si(f['params_total_with_mtp'])}  ({f['params_total_with_mtp']:,})"),
        ("active / token", f"{_si(f['params_active'])}  ({f['params_active']:,}; "
                           f"{_si(f['params_active_with_mtp'])} with MTP)"),
        (f"KV cache ({f['kv_dtype']})", f"{f['kv_bytes_per_token']:,} B/token = {f['layers']} layers x ({kv_parts}) B"),
        (f"KV at {f['context']:,} tokens", _bytes(f["kv_bytes_at_context"]) + " per sequence"),
        (f"FLOPs/token @ {f['context']:,}", _si(f["flops_per_token_at_context"], "FLOP") + " (forward)"),
    ]
    return _table(rows)


def comparison_table(names: list[str] | None = None, dtype: torch.dtype = torch.bfloat16, context: int = 4096) -> str:
    """One compact line per preset."""
    names = names or list(PRESETS)
    header = ("preset", "type", "layers", "hidden", "heads", "experts", "params", "+MTP", "active",
              f"KV B/tok", f"GFLOP/tok@{context // 1024}K", "DSA")
    lines = [header]
    for name in names:
        cfg = ModelConfig.preset(name)
        f = model_facts(cfg, dtype, context)
        experts = f"{f['routed_experts']}+{f['shared_experts']} top{f['experts_per_token']}"
        lines.append((name, f["model_type"].replace("deepseek_", ""), str(f["layers"]), str(f["hidden_size"]),
                      str(f["attention_heads"]), experts, _si(f["params_total"]), _si(f["params_total_with_mtp"]),
                      _si(f["params_active"]), f"{f['kv_bytes_per_token']:,}",
                      f"{f['flops_per_token_at_context'] / 1e9:.3g}", "on" if f["dsa"] else "off"))
    widths = [max(len(row[i]) for row in lines) for i in range(len(header))]
    out = []
    for j, row in enumerate(lines):
        cells = [c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))]
        out.append("  " + "  ".join(cells))
        if j == 0:
            out.append("  " + "  ".join("-" * w for w in widths))
    return "\n".join(out)


# ---------------------------------------------------------------------- info
def cmd_info(args) -> int:
    cfg, source = resolve_config(args.model)
    dtype = parse_dtype(args.dtype)
    if args.context < 1:
        raise CLIError(f"--context must be a positive number of tokens, not {args.context}")
    facts = model_facts(cfg, dtype, args.context)
    if args.json:
        print(json.dumps({"source": source, **facts}))
    else:
        print(format_info(facts, source))
    return 0


# ---------------------------------------------------------------------- init
def cmd_init(args) -> int:
    if args.preset not in PRESETS:
        raise CLIError(f"unknown preset {args.preset!r}; choose one of {', '.join(PRESETS)}")
    cfg = ModelConfig.preset(args.preset)
    # the release stores the unquantised tensors of an FP8 checkpoint in bf16; otherwise default to fp32
    dtype_name = args.dtype or ("bfloat16" if args.fp8 else "float32")
    dtype = parse_dtype(dtype_name, ("float32", "bfloat16", "fp32", "bf16"))
    n_params = cfg.num_params(include_mtp=True)
    if n_params > INIT_MAX_PARAMS and not args.force:
        raise CLIError(f"preset {args.preset!r} has {_si(n_params)} parameters: building it needs about "
                       f"{_bytes(n_params * 4)} of RAM in float32; pass --force to try anyway")
    if args.tokenizer is not None:
        from dsv32.checkpoint import TOKENIZER_FILES

        if not os.path.isdir(args.tokenizer):
            raise FileNotFoundError(f"no such tokenizer directory: {args.tokenizer}")
        if not any(os.path.isfile(os.path.join(args.tokenizer, name)) for name in TOKENIZER_FILES):
            raise FileNotFoundError(f"{args.tokenizer} holds none of the tokenizer files {', '.join(TOKENIZER_FILES)}")
    if os.path.exists(args.out):
        if not os.path.isdir(args.out):
            raise CLIError(f"--out {args.out} exists and is not a directory")
        if os.listdir(args.out) and not args.overwrite:
            raise CLIError(f"--out {args.out} is not empty; pass --overwrite to write into it anyway")
    from dsv32.checkpoint import save_pretrained

    t0 = time.perf_counter()
    model = build_random_model(cfg, seed=args.seed)
    save_pretrained(model, args.out, dtype=dtype, fp8=args.fp8, tokenizer_dir=args.tokenizer)
    elapsed = time.perf_counter() - t0
    files = sorted(os.listdir(args.out))
    size = sum(os.path.getsize(os.path.join(args.out, name)) for name in files)
    weights = f"FP8 e4m3 projections, other tensors {DTYPE_NAMES[dtype]}" if args.fp8 else DTYPE_NAMES[dtype]
    print(f"wrote {args.preset} ({_si(n_params)} params, seed {args.seed}, {weights}) "
          f"to {args.out}: {len(files)} files, {_bytes(size)}, {elapsed:.1f}s")
    return 0


# ---------------------------------------------------------------------- demo
def cmd_demo(args) -> int:
    if args.prompt_len < 1 or args.new_tokens < 1:
        raise CLIError("--prompt-len and --new-tokens must be positive")
    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    print("== dsv32 demo ==")
    print("\n1. The presets (parameters from arithmetic; KV cache in bf16 per token; forward FLOPs at 4K context)\n")
    print(comparison_table())

    cfg = ModelConfig.preset("tiny")
    print(f"\n2. A randomly initialised `tiny` model (seed {args.seed}, float32, {torch.get_num_threads()} threads)\n")
    t0 = time.perf_counter()
    model = build_random_model(cfg, seed=args.seed)
    print(f"  built {_si(cfg.num_params(include_mtp=True))} parameters in {time.perf_counter() - t0:.2f}s; "
          f"DSA top-{cfg.index_topk} keys, {cfg.n_routed_experts} experts top-{cfg.num_experts_per_tok}")

    gen = torch.Generator().manual_seed(args.seed + 1)
    prompt = torch.randint(0, cfg.vocab_size, (1, args.prompt_len), generator=gen)
    with torch.inference_mode():
        model(prompt[:, :16])  # warm-up
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            out = model(prompt, return_mtp=True)
            times.append(time.perf_counter() - t0)
    t_fwd = sorted(times)[1]
    print(f"  forward over a {args.prompt_len}-token prompt: {t_fwd * 1000:.0f} ms (median of 3) = "
          f"{args.prompt_len / t_fwd:,.0f} tokens/s; logits {tuple(out.logits.shape)}, "
          f"MTP logits {tuple(out.mtp_logits[0].shape)}")

    n_new = args.new_tokens
    print(f"\n3. Greedy continuation of {n_new} tokens over the latent cache, checked by one full forward\n")
    cached_tokens, cached_logits, t_cached = greedy_with_cache(model, prompt, n_new)
    t0 = time.perf_counter()
    full_logits = teacher_forced_logits(model, prompt, cached_tokens)
    t_full = time.perf_counter() - t0
    full_tokens = [int(x) for x in full_logits.argmax(-1)]
    same = cached_tokens == full_tokens
    max_diff = max((a[0] - b).abs().max().item() for a, b in zip(cached_logits, full_logits))
    final_len = args.prompt_len + n_new
    cache_bytes = cfg.kv_cache_bytes_per_token(torch.float32) * final_len
    print(f"  latent cache : {n_new / t_cached:7.1f} tokens/s  ({t_cached:.2f}s incl. prefill)")
    print(f"  full forward over prompt + continuation: {t_full:.2f}s")
    print(f"  tokens: {cached_tokens}")
    sparse_note = (f"; sparse DSA selection active once the context passes {cfg.index_topk} keys"
                   if final_len > cfg.index_topk else "")
    print(f"  identical: {'yes' if same else 'NO'}; max |dlogits| = {max_diff:.2e}{sparse_note}")
    print(f"  cache held {_bytes(cache_bytes)} for {final_len} tokens "
          f"({cfg.kv_cache_bytes_per_token(torch.float32):,} B/token in float32)")
    if not same:
        raise CLIError("cached decoding disagreed with the full forward")

    summary = (f"forward {args.prompt_len / t_fwd:,.0f} tok/s, cached decode {n_new / t_cached:.1f} tok/s, "
               f"cache == full forward: PASS (max |dlogits| {max_diff:.1e})")
    if args.pretrain_steps > 0:
        first, last = demo_pretrain(Path(args.run_dir), args.pretrain_steps, args.seed)
        summary += f"; pretraining val loss {first:.3f} -> {last:.3f}"
        if not last < first:
            raise CLIError(f"validation loss did not fall ({first:.3f} -> {last:.3f})")
    print(f"\n== summary: {summary}; total {time.perf_counter() - t_start:.1f}s ==")
    return 0


def demo_pretrain(run_dir: Path, steps: int, seed: int) -> tuple[float, float]:
    """Section 4: a tokenizer on the stdlib corpus, the corpus as token shards, a short `tiny` pretraining.

    The tokenizer and data are reused when the run directory already has them; the run itself starts fresh.
    """
    import shutil

    from dsv32.data.corpus import stdlib_documents
    from dsv32.data.prepare import prepare
    from dsv32.data.shards import MANIFEST
    from dsv32.tokenizer import train_tokenizer
    from dsv32.train.config import TrainConfig
    from dsv32.train.loop import Trainer
    from dsv32.train.metrics import read_metrics

    print(f"\n4. Pretraining `tiny` on the standard library's own sources ({run_dir})\n")
    tok_dir, data_dir, out = run_dir / "tokenizer", run_dir / "data", run_dir / "pretrain"
    vocab = ModelConfig.preset("tiny").vocab_size
    if not (tok_dir / "tokenizer.json").exists():
        docs = [d.text for d in stdlib_documents("train")]
        train_tokenizer(docs, vocab, length=len(docs)).save(tok_dir)
    if not (data_dir / MANIFEST).exists():
        prepare(["stdlib"], tok_dir, data_dir)
    shutil.rmtree(out, ignore_errors=True)
    eval_every = max(1, steps // 4)
    cfg = TrainConfig(out=str(out), data=str(data_dir), tokenizer=str(tok_dir), preset="tiny", seed=seed,
                      seq_len=256, batch_size=8, steps=steps, lr=3e-3, warmup_steps=max(1, steps // 10),
                      eval_every=eval_every, eval_batches=4, ckpt_every=steps, keep_last=1)
    Trainer(cfg).run()
    val = [r for r in read_metrics(out / "metrics.jsonl") if "val_loss" in r]
    for r in val:
        print(f"  step {r['step']:4d}: validation loss {r['val_loss']:.3f} nats/token, {r.get('val_bpb', float('nan')):.3f} bits/byte")
    print(f"  exported weights: {out / 'final'}; plots: {out / 'loss.png'}, {out / 'expert_load.png'}")
    return val[0]["val_loss"], val[-1]["val_loss"]


@torch.inference_mode()
def greedy_with_cache(model, prompt: torch.Tensor, n_new: int):
    """Prefill into a latent cache, then one token per step; returns (tokens, step logits, seconds)."""
    t0 = time.perf_counter()
    batch, length = prompt.shape
    cache = model.new_cache(batch, length + n_new)
    logits = model(prompt, cache=cache, logits_to_keep=1).logits[:, -1]
    tokens, step_logits = [], []
    for t in range(n_new):
        step_logits.append(logits)
        nxt = logits.argmax(-1, keepdim=True)  # [batch, 1]
        tokens.append(int(nxt[0, 0]))
        if t + 1 < n_new:
            logits = model(nxt, start_pos=length + t, cache=cache).logits[:, -1]
    return tokens, step_logits, time.perf_counter() - t0


@torch.inference_mode()
def teacher_forced_logits(model, prompt: torch.Tensor, tokens: list[int]) -> torch.Tensor:
    """The reference: one causal forward over prompt + continuation; the logits that chose each token."""
    seq = torch.cat((prompt, torch.tensor([tokens[:-1]], dtype=prompt.dtype)), dim=1)
    return model(seq, logits_to_keep=len(tokens)).logits[0]  # [n_new, vocab]


# ---------------------------------------------------------------------- wiring
def add_commands(sub) -> None:
    p = sub.add_parser("info", help="architecture, parameter counts, KV-cache bytes and FLOPs of a preset or checkpoint",
                       description="Print the architecture and accounting of a preset or a checkpoint directory.")
    p.add_argument("model", metavar="PRESET_OR_DIR", help=f"one of {', '.join(PRESETS)}, or a directory with config.json")
    p.add_argument("--dtype", default="bf16", help="KV-cache dtype for the byte counts (bf16, fp16, fp32, fp8; default bf16)")
    p.add_argument("--context", type=int, default=4096, help="context length for the KV total and FLOPs (default 4096)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("init", help="write a randomly initialised checkpoint (Hugging Face layout)",
                       description="Write a randomly initialised checkpoint of a preset in the Hugging Face layout.")
    p.add_argument("--preset", required=True, help=f"one of {', '.join(PRESETS)}")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--seed", type=int, default=0, help="weights are a function of the seed (default 0)")
    p.add_argument("--dtype", default=None, help="float32 or bfloat16 (default: float32; bfloat16 with --fp8, as released)")
    p.add_argument("--tokenizer", metavar="TOKDIR", help="copy the tokenizer files of this directory into the checkpoint")
    p.add_argument("--fp8", action="store_true", help="FP8 e4m3 weights with 128x128 block scales, as released")
    p.add_argument("--force", action="store_true", help="allow the 671B-class presets (needs terabytes of RAM)")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty --out directory")
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("demo", help="the main job: presets, then a tiny model forward and cached greedy decoding",
                       description="Compare the presets, then run a randomly initialised tiny model: a forward pass "
                                   "and a greedy continuation over the latent cache, checked against full recomputation.")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompt-len", type=int, default=248, help="prompt tokens (default 248: decoding crosses index_topk=256)")
    p.add_argument("--new-tokens", type=int, default=16, help="tokens to generate (default 16)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    p.add_argument("--pretrain-steps", type=int, default=40,
                   help="steps of the short `tiny` pretraining on the stdlib corpus (0 skips it; default 40)")
    p.add_argument("--run-dir", default="runs/demo", help="where the demo's tokenizer, data and run go")
    p.set_defaults(func=cmd_demo)

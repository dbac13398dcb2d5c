"""Prefill throughput: dsv32 vs transformers' DeepseekV32ForCausalLM on the same weights.

The `tiny` preset is built with a fixed seed, written with `save_pretrained`, and loaded by
transformers from that directory, so both models hold identical fp32 weights. Both run the full
causal forward (logits for every position) under `torch.inference_mode`, single process,
`--threads` intra-op threads (2 by default). Per shape: warm-up, then `--repeats` timed runs with
the two models interleaved (order alternating), and the median is reported, since this class of
machine shows +-15-20% run-to-run noise.

Logit agreement is printed as max |dlogits|. Beyond `index_topk` keys the DSA top-k selection of
an untrained indexer has exact ties (ReLU zeros), which the two implementations may break
differently (dsv32: by position; transformers: `torch.topk`'s unspecified order), so the
check is also repeated with transformers' `Tensor.topk` made position-stable: that value must be
~1e-6 for the implementations to agree.

Usage: OMP_NUM_THREADS=2 .venv/bin/python bench/forward.py [--repeats 9] [--shapes 1x512,4x256]
The last line printed is one JSON object: {"bench": "forward", "ratio_vs_hf": R, ...}
(R = geometric mean over the shapes of dsv32 tokens/s / transformers tokens/s).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import statistics
import sys
import tempfile
import time

import torch


def parse_shapes(text: str) -> list[tuple[int, int]]:
    shapes = []
    for part in text.split(","):
        try:
            batch, seq = (int(v) for v in part.lower().split("x"))
        except ValueError:
            raise SystemExit(f"forward.py: error: bad shape {part!r}; use BATCHxSEQ, e.g. 1x512") from None
        shapes.append((batch, seq))
    return shapes


@contextlib.contextmanager
def position_stable_topk():
    """Make `Tensor.topk` break ties by position (lowest index first), like dsv32's `select_topk`."""
    original = torch.Tensor.topk

    def topk(self, k, dim=-1, largest=True, sorted=True):
        indices = self.sort(dim=dim, descending=largest, stable=True).indices.narrow(dim, 0, k)
        return torch.return_types.topk((self.gather(dim, indices), indices))

    torch.Tensor.topk = topk
    try:
        yield
    finally:
        torch.Tensor.topk = original


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shapes", default="1x512,4x256", help="comma-separated BATCHxSEQ prompts")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    shapes = parse_shapes(args.shapes)

    import transformers
    from transformers import DeepseekV32ForCausalLM

    from dsv32 import ModelConfig, save_pretrained
    from dsv32.cli_model import build_random_model

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(args.threads)

    cfg = ModelConfig.preset(args.preset)
    if not cfg.use_dsa:
        raise SystemExit(f"forward.py: error: preset {args.preset!r} is not a deepseek_v32 model")
    ours = build_random_model(cfg, seed=args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(ours, tmp, dtype=torch.float32)
        hf, info = DeepseekV32ForCausalLM.from_pretrained(tmp, dtype=torch.float32, output_loading_info=True)
    if info["missing_keys"] or info["mismatched_keys"]:
        raise SystemExit(f"forward.py: error: transformers did not load every weight: {info}")
    hf.eval()
    print(f"preset {args.preset}: {cfg.num_params() / 1e6:.2f}M params (no MTP), fp32, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, transformers {transformers.__version__}; "
          f"HF attn={hf.config._attn_implementation}, experts={getattr(hf.config, '_experts_implementation', '?')}")

    results = {}
    for batch, seq in shapes:
        ids = torch.randint(0, cfg.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(args.seed + seq))
        run_ours = lambda: ours(ids)  # noqa: E731
        run_hf = lambda: hf(input_ids=ids, use_cache=False)  # noqa: E731
        with torch.inference_mode():
            want = hf(input_ids=ids, use_cache=False).logits
            got = ours(ids).logits
            diff = (got - want).abs().max().item()
            with position_stable_topk():
                stable = hf(input_ids=ids, use_cache=False).logits
            diff_stable = (got - stable).abs().max().item()
            for _ in range(args.warmup):
                run_ours(), run_hf()
            t_ours, t_hf = [], []
            for r in range(args.repeats):
                if r % 2 == 0:
                    t_ours.append(timed(run_ours))
                    t_hf.append(timed(run_hf))
                else:
                    t_hf.append(timed(run_hf))
                    t_ours.append(timed(run_ours))
        tokens = batch * seq
        med_ours, med_hf = statistics.median(t_ours), statistics.median(t_hf)
        results[f"{batch}x{seq}"] = {
            "dsv32_tok_s": round(tokens / med_ours, 1),
            "hf_tok_s": round(tokens / med_hf, 1),
            "ratio": round(med_hf / med_ours, 3),
            "dsv32_ms": round(med_ours * 1000, 1),
            "hf_ms": round(med_hf * 1000, 1),
            "max_abs_diff": diff,
            "max_abs_diff_stable_ties": diff_stable,
            "sparse": seq > cfg.index_topk,
        }

    header = f"{'shape':>7}  {'dsv32 tok/s':>11}  {'HF tok/s':>9}  {'ratio':>6}  {'dsv32 ms':>8}  {'HF ms':>7}  " \
             f"{'max|dlogits|':>12}  {'same ties':>9}  DSA"
    print(header)
    print("-" * len(header))
    for shape, r in results.items():
        print(f"{shape:>7}  {r['dsv32_tok_s']:>11,.0f}  {r['hf_tok_s']:>9,.0f}  {r['ratio']:>6.2f}  {r['dsv32_ms']:>8.1f}  "
              f"{r['hf_ms']:>7.1f}  {r['max_abs_diff']:>12.2e}  {r['max_abs_diff_stable_ties']:>9.2e}  "
              f"{'sparse' if r['sparse'] else 'dense'}")
    ratio = math.exp(statistics.fmean(math.log(r["ratio"]) for r in results.values()))
    print(f"median of {args.repeats} interleaved runs per model; ratio = dsv32 tokens/s / HF tokens/s "
          f"(geometric mean {ratio:.3f}); 'same ties' = max|dlogits| with HF's top-k ties broken by position")
    print(json.dumps({"bench": "forward", "ratio_vs_hf": round(ratio, 3), "preset": args.preset, "dtype": "float32",
                      "threads": torch.get_num_threads(), "repeats": args.repeats, "torch": torch.__version__,
                      "transformers": transformers.__version__, "shapes": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

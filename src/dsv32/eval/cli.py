"""`dsv32 eval`: evaluate a checkpoint or a running server (registered by dsv32.cli).

    dsv32 eval --model DIR_OR_URL --tasks perplexity,arithmetic,tools,code [-n 20] [--samples 1] [--out DIR]

Writes eval.json and samples.jsonl to --out (default runs/eval-<name>) and prints a summary table.
"""
from __future__ import annotations

import json
import re
from pathlib import Path


def _csv_ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"expected comma-separated integers, got {text!r}") from None


def default_out_dir(model: str) -> Path:
    """runs/eval-<checkpoint directory name>, or runs/eval-<host>-<port> for a URL."""
    from dsv32.eval.runner import is_url

    if is_url(model):
        name = re.sub(r"^https?://", "", model).split("/")[0]
    else:
        name = Path(model).resolve().name
    return Path("runs") / ("eval-" + re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-"))


def cmd_eval(args) -> int:
    import torch

    from dsv32.eval.runner import RESULTS_FILE, SAMPLES_FILE, evaluate, is_url, summary_table

    if not is_url(args.model) and not Path(args.model).is_dir():
        raise FileNotFoundError(f"no such checkpoint directory: {args.model} (or give a URL http://host:port/v1)")
    if args.threads:
        torch.set_num_threads(args.threads)
    task_args = None
    if args.task_args:
        try:
            task_args = json.loads(args.task_args)
        except json.JSONDecodeError as exc:
            raise ValueError(f"--task-args must be a JSON object ({exc.msg})") from None
    out = Path(args.out) if args.out else default_out_dir(args.model)
    results = evaluate(args.model, args.tokenizer, args.tasks, out, n=args.n, samples=args.samples, k=args.k,
                       temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens,
                       thinking=args.thinking, progress=not args.no_progress, seed=args.seed, split=args.split,
                       data=args.data, seq_len=args.seq_len, ppl_tokens=args.ppl_tokens, task_args=task_args,
                       batch=args.batch, api_key=args.api_key)
    print(summary_table(results))
    print(f"results: {out / RESULTS_FILE}, samples: {out / SAMPLES_FILE}")
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a checkpoint or a server: perplexity, held-out tasks, GSM8K, HumanEval",
                       description="Perplexity / bits per byte on held-out text and generative tasks (pass@k, majority "
                                   "vote) on a checkpoint or an OpenAI-compatible server. Tasks: perplexity, arithmetic, "
                                   "wordproblems, tools, code, gsm8k:PATH, humaneval[:PATH], FILE.jsonl.")
    p.add_argument("--model", required=True, metavar="DIR_OR_URL", help="checkpoint directory or http://host:port/v1")
    p.add_argument("--tasks", default="perplexity,arithmetic,wordproblems,tools,code",
                   help="comma-separated (default perplexity,arithmetic,wordproblems,tools,code)")
    p.add_argument("--tokenizer", metavar="DIR", help="tokenizer directory (default: the checkpoint's)")
    p.add_argument("-n", type=int, default=20, help="problems per task (default 20)")
    p.add_argument("--samples", type=int, default=1, help="replies per problem (default 1)")
    p.add_argument("--k", type=_csv_ints, default=None, help="pass@k values (default 1,2,4,... up to --samples)")
    p.add_argument("--temperature", type=float, default=None, help="default 0 for one sample, else 1.0")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--max-tokens", type=int, default=256, help="reply length limit (default 256)")
    p.add_argument("--thinking", choices=("thinking", "chat"), default=None,
                   help="prompt mode (default: the checkpoint's lineage; over a URL the server's default)")
    p.add_argument("--split", default="test", choices=("train", "validation", "test"), help="generated tasks' split")
    p.add_argument("--task-args", default=None, help='arithmetic generator options, e.g. \'{"max_digits": 3}\'')
    p.add_argument("--data", default="stdlib", help="perplexity text: stdlib, a text path or a prepared data directory")
    p.add_argument("--seq-len", type=int, default=256, help="perplexity window (default 256)")
    p.add_argument("--ppl-tokens", type=int, default=None, help="tokens scored for perplexity (default 16384)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=64, help="engine batch (default 64)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    p.add_argument("--api-key", default=None, help="bearer token for a URL")
    p.add_argument("--out", metavar="DIR", help="output directory (default runs/eval-<name>)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_eval)

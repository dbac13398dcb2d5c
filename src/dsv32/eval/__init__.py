"""Evaluation: perplexity / bits per byte on held-out text, and generative tasks with pass@k and
majority vote, on a checkpoint (through the in-process engine) or a running OpenAI-compatible server.

    from dsv32.eval import evaluate, perplexity

    results = evaluate(model, tokenizer, ["perplexity", "arithmetic", "tools", "code"], out_dir="runs/eval-x",
                       n=20, samples=1, max_tokens=256, thinking="chat", progress=False, seed=0)
    results["arithmetic"]["pass@1"], results["perplexity"]["bpb"]

`model` is a loaded `Transformer` (then give `tokenizer`: a `Tokenizer` or its directory), a checkpoint
directory (its tokenizer is used), or a base URL `http://host:port/v1` (chat completions; perplexity
through `/tokenize` + `/v1/completions` with echo and logprobs, as `dsv32 serve` provides). Returns
{task: {metric: value, ..., "n": problems}}, the "results" of eval.json. Arguments:

  tasks        names or one comma-separated string: perplexity, arithmetic, wordproblems, tools, code,
               gsm8k:PATH, humaneval[:PATH], FILE.jsonl (dsv32.eval.tasks)
  n            problems per task (the first n of the held-out test split, or of the file)
  samples      replies per problem; k: the pass@k values (default 1, 2, 4, ... samples)
  temperature  default 0 (greedy) for one sample, 1.0 for several; top_p, max_tokens, seed as usual
  thinking     "thinking" | "chat"; default: the checkpoint's lineage (a reasoning model thinks), else
               chat; over a URL, the server's default
  data         perplexity text: "stdlib" (its held-out split), a text path, a prepared data directory
               (its validation split, as training's val_bpb), or a list of strings; seq_len, and
               ppl_tokens (how many target tokens to score, 16384 by default)
  out_dir      where eval.json and samples.jsonl go (nothing is written when None)

Metrics of a generative task: pass@k (the unbiased estimator over all samples; pass@1 is the
accuracy), maj@N (majority vote over the N samples of a problem, graded), format_ok, truncated,
mean_tokens, errors (samples that could not be drawn: a prompt past the context), n, samples. Perplexity: loss (nats/token), perplexity, bpb, tokens, bytes, n (documents).

`perplexity(model, data="stdlib", tokenizer=None, seq_len=256, max_tokens=16384)` returns the
perplexity entry alone. The speedrun's budget: the tiny model on 2 CPU cores, n=20, all tasks, in
about a minute.
"""
from dsv32.eval.backends import EvalError
from dsv32.eval.perplexity import perplexity
from dsv32.eval.runner import evaluate, summary_table

__all__ = ["EvalError", "evaluate", "perplexity", "summary_table"]

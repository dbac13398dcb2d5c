"""`dsv32 train grpo`, `dsv32 train r1` and `dsv32 ttc` (registered by dsv32.train.cli and dsv32.cli).

Every GRPOConfig field is a flag (`--num-generations 8`, `--loss-type dr_grpo`, `--no-keep-routing`, ...);
list fields take commas (`--rewards accuracy,format,my_rewards.py:brevity --reward-weights 1,0.2,0.1`);
`--config FILE` (JSON/TOML) sets them too; flags win over the file.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import typing

from dsv32.train.grpo import GRPOConfig


def _csv(kind):
    def parse(text: str):
        items = [t.strip() for t in text.split(",") if t.strip()]
        try:
            return [kind(t) for t in items]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {kind.__name__}, got {text!r}") from None
    return parse


def _json_object(text: str):
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


LIST_KINDS = {"rewards": str, "reward_weights": float}


def _field_comments(cls) -> dict[str, str]:
    """The `# comment` after each field in the class source: the flags' help texts."""
    import inspect
    import re

    comments = {}
    for line in inspect.getsource(cls).splitlines():
        m = re.match(r"\s+(\w+): [^=]+=.*?#\s*(.+)$", line)
        if m:
            comments[m.group(1)] = m.group(2).strip()
    return comments


def _add_dataclass_flags(parser: argparse.ArgumentParser, cls, skip: tuple[str, ...] = ()) -> None:
    from dsv32.train.cli import _flag_type

    comments = _field_comments(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        text = comments.get(f.name, "")
        text = f"{text} (default: {default!r})" if text else f"default: {default!r}"
        text = text.replace("%", "%%")
        if f.name in LIST_KINDS:
            parser.add_argument(flag, dest=f.name, type=_csv(LIST_KINDS[f.name]), default=None, metavar="A,B",
                                help=text)
            continue
        kind = _flag_type(f)
        if kind == "bool":
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=text)
        elif kind == "json":
            hint = f.type if not isinstance(f.type, str) else eval(f.type, vars(typing), {})  # noqa: S307
            parser.add_argument(flag, dest=f.name, type=_json_object if hint is dict else json.loads, default=None,
                                metavar="JSON", help=text)
        else:
            parser.add_argument(flag, dest=f.name, type=kind, default=None, metavar=kind.__name__.upper(), help=text)


def grpo_config_from_args(args: argparse.Namespace) -> GRPOConfig:
    names = {f.name for f in dataclasses.fields(GRPOConfig)}
    flags = {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}
    cfg = GRPOConfig.from_file(args.config) if args.config else GRPOConfig()
    return dataclasses.replace(cfg, **flags)


def _run_grpo(args: argparse.Namespace) -> int:
    from dsv32.train.grpo import GRPOTrainer

    cfg = grpo_config_from_args(args)
    trainer = GRPOTrainer(cfg)
    last = trainer.run(resume=args.resume)
    shown = {k: round(v, 4) for k, v in last.items() if k in ("reward", "val_accuracy", "kl", "policy_kl", "entropy")}
    print(f"grpo: step {trainer.step}/{cfg.steps} {shown}; run directory {cfg.out}")
    return 0


def _parse_sets(items: list[str], flag: str) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"{flag} takes KEY=VALUE, got {item!r}")
        try:
            out[key.replace("-", "_")] = json.loads(value)
        except json.JSONDecodeError:
            out[key.replace("-", "_")] = value
    return out


def _run_r1(args: argparse.Namespace) -> int:
    from dsv32.train.config import TrainConfig
    from dsv32.train.r1 import R1Config, run_r1

    sft = _parse_sets(args.sft_set, "--sft-set")
    grpo = _parse_sets(args.grpo_set, "--grpo-set")
    for name, overrides, cls in (("--sft-set", sft, TrainConfig), ("--grpo-set", grpo, GRPOConfig)):
        unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"{name}: unknown settings {', '.join(unknown)}")
    cfg = R1Config(out=args.out, init=args.init or "", preset=args.preset, tokenizer=args.tokenizer or "", task=args.task,
                   task_args=args.task_args or {}, seed=args.seed, sft_examples=args.sft_examples,
                   direct_fraction=args.direct_fraction, sft=sft, grpo=grpo,
                   eval_prompts=args.eval_prompts, samples=args.samples, sample_temperature=args.sample_temperature,
                   progress=not args.no_progress)
    report = run_r1(cfg)
    line = (f"r1: held-out {report['task']} accuracy (greedy, {report['test_problems']} problems): "
            f"SFT {100 * report['sft_accuracy']:.1f}% -> GRPO {100 * report['grpo_accuracy']:.1f}%")
    if "scaling" in report:
        best = max(report["scaling"], key=int)
        line += (f"; with {best} samples: majority {100 * report['scaling'][best]['majority']:.1f}%, "
                 f"best-of {100 * report['scaling'][best]['best_of']:.1f}%")
    print(line + f"; report {args.out}/report.json")
    return 0


GRPO_DESCRIPTION = """\
GRPO from a checkpoint (usually SFT) on verifiable tasks. Each step samples --num-generations
completions for --prompts-per-step prompts with the in-process engine (thinking mode by default),
scores them with the weighted reward functions, and updates the policy --num-iterations times.

Rewards: built-ins accuracy, format, tool_call, length, or your own `file.py:function` /
`module:function` with TRL's signature `def reward(completions, **kwargs) -> list[float | None]`
(kwargs: prompts, completion_ids, completion_text, truncated, task, answer, JSONL columns).
DeepSeek-V3.2 stabilisers: --unbiased-kl, --off-policy-delta D, --keep-routing, --keep-sampling-mask.
The run directory gets metrics.jsonl, completions.jsonl, rewards.png, dynamics.png, checkpoints/
(exact --resume) and final/ (HF layout with lineage.json). A --config JSON/TOML file sets the same
fields; flags win. Lists take commas: --rewards accuracy,format --reward-weights 1,0.2"""


def add_train_commands(stages) -> None:
    """`train grpo` and `train r1`, added to the `dsv32 train` stage parsers."""
    p = stages.add_parser("grpo", help="GRPO reinforcement learning with verifiable rewards (DeepSeek-V3.2 stabilisers)",
                          description=GRPO_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="a JSON or TOML file of GRPO settings")
    p.add_argument("--resume", action="store_true", help="continue exactly from the run's latest checkpoint")
    _add_dataclass_flags(p, GRPOConfig)
    p.set_defaults(func=_run_grpo)

    r = stages.add_parser("r1", help="the R1 recipe: SFT on reasoning traces (thinking mode), GRPO, held-out eval",
                          description="SFT on the generators' worked solutions as thinking-mode reasoning, then GRPO, "
                                      "then the held-out comparison and the accuracy-vs-samples curve. Re-running "
                                      "continues from the last finished stage.")
    r.add_argument("--out", default="runs/r1", help="run directory (default runs/r1)")
    r.add_argument("--init", help="start from this checkpoint (default: a fresh --preset model)")
    r.add_argument("--preset", default="tiny", help="model preset when there is no --init (default tiny)")
    r.add_argument("--tokenizer", help="tokenizer directory (default: the --init directory)")
    r.add_argument("--task", default="arithmetic", help="arithmetic | wordproblems | tools | code (or a comma mixture)")
    r.add_argument("--task-args", type=_json_object, help='generator options, e.g. \'{"max_digits": 3}\'')
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--sft-examples", type=int, default=4000, help="reasoning traces for SFT (default 4000)")
    r.add_argument("--direct-fraction", type=float, default=0.0,
                   help="share of arithmetic/word-problem traces that answer without working, so that GRPO has to "
                        "learn that working pays (default 0: pure reasoning traces)")
    r.add_argument("--sft-set", action="append", default=[], metavar="KEY=VALUE", help="SFT setting (TrainConfig field)")
    r.add_argument("--grpo-set", action="append", default=[], metavar="KEY=VALUE", help="GRPO setting (GRPOConfig field)")
    r.add_argument("--eval-prompts", type=int, default=200, help="held-out test problems (default 200)")
    r.add_argument("--samples", type=_csv(int), default=[1, 2, 4, 8], help="k values of the scaling curve (default 1,2,4,8)")
    r.add_argument("--sample-temperature", type=float, default=1.0)
    r.add_argument("--no-progress", action="store_true")
    r.set_defaults(func=_run_r1)


# ---------------------------------------------------------------------- dsv32 ttc
def _run_ttc(args: argparse.Namespace) -> int:
    import torch

    from dsv32.checkpoint import load_pretrained
    from dsv32.infer.engine import Engine
    from dsv32.tokenizer import Tokenizer
    from dsv32.train.r1 import default_thinking_mode
    from dsv32.train.rollout import load_prompts
    from dsv32.train.ttc import run_scaling

    import os

    if not os.path.isdir(args.model):
        raise FileNotFoundError(f"no such checkpoint directory: {args.model}")
    ks = sorted(set(args.samples))
    if not ks or ks[0] < 1:
        raise ValueError("--samples takes positive integers, e.g. 1,2,4,8")
    if args.n < 1:
        raise ValueError(f"-n must be positive, got {args.n}")
    thinking = args.thinking or default_thinking_mode(args.model)
    tokenizer = Tokenizer.load(args.tokenizer or args.model)
    model = load_pretrained(args.model, dtype=torch.float32)
    prompts = load_prompts(args.task, args.split, args.n, args.seed, args.task_args)[: args.n]
    engine = Engine(model, max_batch=args.batch, max_seq_len=min(model.config.max_position_embeddings, 1024 + args.max_tokens))
    out = args.out or os.path.join(args.model, "scaling")
    summary = run_scaling(engine, tokenizer, prompts, ks=ks, out_dir=out, thinking_mode=thinking, max_tokens=args.max_tokens,
                          temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed,
                          verifier=args.verifier, label=f"{args.model}: {len(prompts)} {args.task} ({args.split})")
    print(f"{'k':>4} {'single':>8} {'majority':>9} {'best-of':>8} {'pass@k':>8}")
    for k in ks:
        c = summary["curve"][str(k)]
        print(f"{k:>4} {100 * c['mean']:7.1f}% {100 * c['majority']:8.1f}% {100 * c['best_of']:7.1f}% {100 * c['pass_at_k']:7.1f}%")
    print(f"results: {out}/scaling.json, plot: {out}/accuracy_vs_samples.png")
    return 0


def add_ttc_command(sub) -> None:
    from dsv32.train.ttc import VERIFIERS

    p = sub.add_parser("ttc", help="test-time compute scaling: accuracy vs samples (majority vote, best-of-K)",
                       description="Sample K completions per held-out problem and report accuracy against k for majority "
                                   "vote (self-consistency), best-of-k with a verifier, and pass@k.")
    p.add_argument("--model", required=True, metavar="DIR", help="checkpoint directory")
    p.add_argument("--tokenizer", metavar="DIR", help="tokenizer directory (default: the checkpoint)")
    p.add_argument("--task", default="arithmetic", help="arithmetic | wordproblems | tools | code | FILE.jsonl")
    p.add_argument("--task-args", type=_json_object, default=None, help='generator options, e.g. \'{"max_digits": 3}\'')
    p.add_argument("--split", default="test", choices=("train", "validation", "test"))
    p.add_argument("-n", type=int, default=100, help="problems (default 100)")
    p.add_argument("--samples", type=_csv(int), default=[1, 2, 4, 8], help="k values (default 1,2,4,8)")
    p.add_argument("--verifier", default="auto", choices=VERIFIERS, help="best-of-k scorer (default: by task)")
    p.add_argument("--thinking", choices=("thinking", "chat"), default=None,
                   help="prompt mode (default: thinking for a model trained to reason, per its lineage)")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=32, help="engine batch (default 32)")
    p.add_argument("--out", help="output directory (default: DIR/scaling)")
    p.set_defaults(func=_run_ttc)

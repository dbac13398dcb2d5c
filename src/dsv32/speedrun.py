"""`dsv32 speedrun`: the whole pipeline on a laptop CPU in one command (what `make demo` runs).

    tokenizer -> data -> pretrain -> sft -> grpo -> eval -> card

Each stage writes `RUN/<stage>/stage.json` (its settings, metrics and wall time) when it finishes; a
re-run loads finished stages instead of redoing them, and `--fresh` starts over. Every stage reports
a measurable improvement on its own metric over the stage before it:

    pretrain  validation bits per byte on held-out standard-library files, before vs after
    sft       held-out task accuracy (arithmetic in thinking mode, tool use, word problems), base vs the
              model SFT-trained on worked solutions
    grpo      held-out arithmetic accuracy (greedy), SFT vs SFT + GRPO
    eval      the evaluation table of every checkpoint, which the card reports

SFT runs in two phases, as R1's and V3.2's SFT data mix reasoning with non-reasoning answers: first the
worked solutions, then a short phase on the same mixture in which `sft_direct_fraction` of the arithmetic
and word-problem traces answer without working. That model leans towards answering directly, and GRPO has
a choice to learn from the reward alone: that working the problem out pays.

The default budgets are sized for 2 CPU cores (bf16 autocast where the CPU has bf16 matmuls); every one is
a field of `SpeedrunConfig` and a `--set key=value` flag.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shlex
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

STAGES = ("tokenizer", "data", "pretrain", "sft", "grpo", "eval", "card")
ARITHMETIC = {"min_digits": 1, "max_digits": 2}   # the arithmetic the SFT traces, GRPO and the evals use


@dataclass
class SpeedrunConfig:
    out: str = "runs/speedrun"
    preset: str = "tiny"
    model: dict = field(default_factory=dict)   # ModelConfig overrides on the preset
    seed: int = 0
    # pretraining text: "stdlib" (the Python standard library's own sources) or a file/directory of yours
    corpus: str = "stdlib"
    # tokenizer: byte-level BPE on the corpus plus the task generators' texts
    vocab_size: int = 4096
    # pretraining
    pretrain_steps: int = 80
    pretrain_batch: int = 8
    pretrain_lr: float = 3e-3
    seq_len: int = 256
    # pretraining and SFT: "bf16" autocast, "fp32", or "auto" (bf16 on CUDA or a CPU with bf16 matmul
    # instructions, where it is ~1.3x faster at this size; fp32 elsewhere)
    precision: str = "auto"
    # SFT mixture: generated training-split conversations per task kind
    # (tool-use conversations carry ~600 tokens of tool schemas each: few of them go a long way)
    sft_examples: dict = field(default_factory=lambda: {"arithmetic": 4000, "word_problem": 200, "tool_use": 60})
    # SFT phase 1, worked solutions: warmup-stable-decay with a long decay, in which most of the held-out
    # accuracy appears (a 400-step run: 2% held-out arithmetic before its decay, 25% after it)
    sft_steps: int = 300
    sft_batch: int = 16
    sft_lr: float = 3e-3
    # SFT phase 2: the same kinds of conversations (new problems), this share of the arithmetic and
    # word-problem traces answering without working
    sft_direct_fraction: float = 0.6
    sft_mixed_steps: int = 40
    sft_mixed_lr: float = 5e-4
    # GRPO on arithmetic
    grpo_steps: int = 10
    grpo_prompts: int = 8
    grpo_generations: int = 8
    grpo_lr: float = 5e-5
    grpo_temperature: float = 0.8   # sampling; below 1 the worked answers it samples are right more often
    grpo_max_tokens: int = 128
    # evaluation: held-out (test split) problems per task and model
    eval_problems: int = 48
    eval_tasks: list = field(default_factory=lambda: ["arithmetic", "wordproblems", "tools"])
    progress: bool = True

    def replace(self, **changes) -> "SpeedrunConfig":
        return dataclasses.replace(self, **changes)

    def validate(self) -> "SpeedrunConfig":
        """Settings a later stage would only reject after the earlier ones had run."""
        from dsv32.train.r1 import check_direct_fraction

        if self.precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"precision={self.precision!r} must be auto, fp32 or bf16")
        check_direct_fraction(self.sft_direct_fraction)
        return self


# ---------------------------------------------------------------------- stage bookkeeping
def _write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def stage_record(run: Path, stage: str) -> dict | None:
    """The finished stage's record, or None if it has not finished."""
    path = run / stage / "stage.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None


def _banner(i: int, stage: str, text: str) -> None:
    print(f"\n[{i}/{len(STAGES)}] {stage}: {text}", flush=True)


# ---------------------------------------------------------------------- stages
def run_tokenizer(cfg: SpeedrunConfig, run: Path) -> dict:
    from dsv32.data.corpus import corpus_documents
    from dsv32.tokenizer import train_tokenizer

    texts = [d.text for d in corpus_documents(cfg.corpus, "train") if d.text] + _task_texts(cfg)
    tok = train_tokenizer(texts, cfg.vocab_size, length=len(texts), show_progress=cfg.progress)
    tok.save(run / "tokenizer")
    sample = "def add(a, b):\n    return a + b  # 12 + 345 = 357\n"
    return {"vocab_size": tok.vocab_size, "training_texts": len(texts),
            "bytes_per_token_on_sample": round(len(sample.encode()) / len(tok.encode(sample)), 3)}


def _task_texts(cfg: SpeedrunConfig) -> list[str]:
    """The task generators' conversations as plain text, so numbers and tool syntax get sensible merges."""
    from dsv32.data.tasks import generate

    texts = []
    for kind, n in cfg.sft_examples.items():
        for task in generate(kind, "train", min(n, 500), cfg.seed):
            texts.append("\n".join(str(m.get("content") or "") + str(m.get("reasoning_content") or "")
                                   for m in task.messages()))
    return texts


def sft_conversations(cfg: SpeedrunConfig, path: Path, direct_fraction: float = 0.0, seed: int | None = None) -> int:
    """The SFT mixture as JSONL, every conversation in thinking mode: the worked steps of arithmetic and
    word problems become the reasoning and the "Answer:" line the reply (for `direct_fraction` of them,
    a one-line reasoning instead); tool-use references carry their own reasoning."""
    from dsv32.train.r1 import direct_choices, reasoning_messages
    from dsv32.train.rollout import load_prompts

    seed = cfg.seed if seed is None else seed
    rows = []
    for kind, n in cfg.sft_examples.items():
        prompts = load_prompts(kind, "train", n, seed, ARITHMETIC if kind == "arithmetic" else None)
        direct = direct_choices(len(prompts), direct_fraction if kind != "tool_use" else 0.0, seed)
        rows += [reasoning_messages(p.task, skip) for p, skip in zip(prompts, direct)]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for messages in rows:
            f.write(json.dumps({"messages": messages}, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return len(rows)


def run_data(cfg: SpeedrunConfig, run: Path) -> dict:
    from dsv32.data.prepare import prepare

    tok = run / "tokenizer"
    for name in ("pretrain", "sft", "sft_mixed"):
        shutil.rmtree(run / "data" / name, ignore_errors=True)   # a half-written directory from a crash
    pre = prepare([cfg.corpus], tok, run / "data" / "pretrain", show_progress=cfg.progress)
    n_conv = sft_conversations(cfg, run / "data" / "sft.jsonl")
    sft = prepare([str(run / "data" / "sft.jsonl")], tok, run / "data" / "sft", validation_fraction=0.03,
                  thinking="auto", show_progress=cfg.progress)
    n_mixed = sft_conversations(cfg, run / "data" / "sft_mixed.jsonl", cfg.sft_direct_fraction, seed=cfg.seed + 1)
    mixed = prepare([str(run / "data" / "sft_mixed.jsonl")], tok, run / "data" / "sft_mixed", validation_fraction=0.03,
                    thinking="auto", show_progress=cfg.progress)
    return {"pretrain_tokens": _split_tokens(pre), "sft_conversations": n_conv, "sft_tokens": _split_tokens(sft),
            "sft_mixed_conversations": n_mixed, "sft_mixed_tokens": _split_tokens(mixed)}


def _split_tokens(manifest: dict) -> dict:
    return {split: info.get("num_tokens") for split, info in manifest.get("splits", {}).items()}


def run_pretrain(cfg: SpeedrunConfig, run: Path) -> dict:
    from dsv32.train.config import TrainConfig

    train = TrainConfig(stage="pretrain", out=str(run / "pretrain"), data=str(run / "data" / "pretrain"),
                        tokenizer=str(run / "tokenizer"), preset=cfg.preset, model=dict(cfg.model), seed=cfg.seed,
                        seq_len=cfg.seq_len, batch_size=cfg.pretrain_batch, steps=cfg.pretrain_steps,
                        precision=resolve_precision(cfg.precision), lr=cfg.pretrain_lr,
                        warmup_steps=max(1, cfg.pretrain_steps // 10), schedule="wsd",
                        eval_every=max(1, cfg.pretrain_steps // 4), eval_batches=8,
                        ckpt_every=max(1, cfg.pretrain_steps // 2), keep_last=1, progress=cfg.progress)
    val = _train(train, run / "pretrain")
    return {"val_bpb_start": val[0]["val_bpb"], "val_bpb_end": val[-1]["val_bpb"],
            "val_loss_start": val[0]["val_loss"], "val_loss_end": val[-1]["val_loss"],
            "settings": _settings(train)}


def run_sft(cfg: SpeedrunConfig, run: Path) -> dict:
    from dsv32.train.config import TrainConfig

    common = dict(tokenizer=str(run / "tokenizer"), seed=cfg.seed, seq_len=cfg.seq_len, batch_size=cfg.sft_batch,
                  precision=resolve_precision(cfg.precision), eval_batches=4, keep_last=1, progress=cfg.progress)
    worked = TrainConfig(stage="sft", out=str(run / "sft" / "worked"), data=str(run / "data" / "sft"),
                         init=str(run / "pretrain" / "final"), steps=cfg.sft_steps, lr=cfg.sft_lr,
                         warmup_steps=max(1, cfg.sft_steps // 10), schedule="wsd", decay_fraction=0.3,
                         eval_every=max(1, cfg.sft_steps // 4), ckpt_every=max(1, cfg.sft_steps // 2), **common)
    val = _train(worked, run / "sft" / "worked")
    mixed = TrainConfig(stage="sft", out=str(run / "sft"), data=str(run / "data" / "sft_mixed"),
                        init=str(run / "sft" / "worked" / "final"), steps=cfg.sft_mixed_steps, lr=cfg.sft_mixed_lr,
                        warmup_steps=max(1, cfg.sft_mixed_steps // 12), schedule="cosine",
                        eval_every=max(1, cfg.sft_mixed_steps), ckpt_every=max(1, cfg.sft_mixed_steps), **common)
    val_mixed = _train(mixed, run / "sft")
    for phase in ("sft/worked", "sft"):
        _mark_thinking(run / phase / "final")
    base, tuned = evaluate_checkpoint(cfg, run, "pretrain"), evaluate_checkpoint(cfg, run, "sft_worked")
    final = evaluate_checkpoint(cfg, run, "sft")
    return {"val_loss_start": val[0]["val_loss"] if val else None, "val_loss_end": val[-1]["val_loss"] if val else None,
            "mixed_val_loss_end": val_mixed[-1]["val_loss"] if val_mixed else None,
            "accuracy_base": _accuracies(base), "accuracy_worked": _accuracies(tuned), "accuracy_sft": _accuracies(final),
            "direct_answers_sft": _direct_share(run, "sft"),
            "settings": _settings(worked), "mixed_settings": _settings(mixed)}


def resolve_precision(precision: str) -> str:
    """"auto": bf16 autocast on CUDA or a CPU with bf16 matmul instructions (AVX512-BF16 or AMX), else fp32,
    since bf16 emulated with fp32 instructions is slower than fp32 itself."""
    if precision != "auto":
        return precision
    import torch

    if torch.cuda.is_available():
        return "bf16"
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return "bf16" if any(probe is not None and probe() for probe in probes) else "fp32"


def run_grpo(cfg: SpeedrunConfig, run: Path) -> dict:
    from dsv32.train.grpo import GRPOConfig, GRPOTrainer
    from dsv32.train.metrics import read_metrics

    grpo = GRPOConfig(out=str(run / "grpo"), init=str(run / "sft" / "final"), task="arithmetic",
                      task_args=dict(ARITHMETIC), seed=cfg.seed, steps=cfg.grpo_steps,
                      prompts_per_step=cfg.grpo_prompts, num_generations=cfg.grpo_generations, lr=cfg.grpo_lr,
                      max_completion_length=cfg.grpo_max_tokens, temperature=cfg.grpo_temperature, top_p=1.0,
                      rewards=["accuracy", "steps", "format"], reward_weights=[1.0, 0.5, 0.2],
                      eval_prompts=cfg.eval_problems, eval_split="test", eval_every=cfg.grpo_steps,
                      ckpt_every=cfg.grpo_steps, keep_last=1, progress=cfg.progress)
    GRPOTrainer(grpo).run(resume=_has_checkpoint(run / "grpo"))
    _mark_thinking(run / "grpo" / "final")
    evaluate_checkpoint(cfg, run, "grpo")   # cached for the eval stage; tells how it answers now
    records = read_metrics(run / "grpo" / "metrics.jsonl")
    evals = [r for r in records if "val_accuracy" in r]
    return {"accuracy_sft": evals[0]["val_accuracy"], "accuracy_grpo": evals[-1]["val_accuracy"],
            "direct_answers_sft": _direct_share(run, "sft"), "direct_answers_grpo": _direct_share(run, "grpo"),
            "reward_trend": {name: _halves([r[key] for r in records if key in r])
                             for name, key in [("total", "reward")] + [(n, f"rewards/{n}/mean") for n in grpo.rewards]},
            "settings": {k: v for k, v in dataclasses.asdict(grpo).items() if k not in ("progress",)}}


def _halves(values: list[float]) -> list[float]:
    """Mean of the first and of the second half of a per-step series (the trend of a noisy curve)."""
    half = max(1, len(values) // 2)
    return [sum(values[:half]) / half, sum(values[half:]) / max(1, len(values) - half)]


def run_eval(cfg: SpeedrunConfig, run: Path) -> dict:
    """Every checkpoint on the same held-out problems and the same held-out code."""
    return {"results": {stage: evaluate_checkpoint(cfg, run, stage) for stage in CHECKPOINTS}}


# the exported checkpoints, in pipeline order: sft_worked is SFT's first phase (worked solutions only)
CHECKPOINTS = {"pretrain": "pretrain/final", "sft_worked": "sft/worked/final", "sft": "sft/final",
               "grpo": "grpo/final"}


def evaluate_checkpoint(cfg: SpeedrunConfig, run: Path, stage: str) -> dict:
    """Held-out tasks (greedy, thinking mode) and bits per byte of one checkpoint; computed once, then
    read back from RUN/eval/<stage>/results.json."""
    from dsv32.eval import evaluate, perplexity

    cached = run / "eval" / stage / "results.json"
    if cached.exists():
        return json.loads(cached.read_text(encoding="utf-8"))
    model_dir = str(run / CHECKPOINTS[stage])
    common = dict(n=cfg.eval_problems, max_tokens=cfg.grpo_max_tokens, thinking="thinking", seed=cfg.seed,
                  progress=cfg.progress)
    results = {}
    if "arithmetic" in cfg.eval_tasks:   # the digit range the model was trained on
        results.update(evaluate(model_dir, tasks=["arithmetic"], out_dir=str(run / "eval" / stage / "arithmetic"),
                                task_args=dict(ARITHMETIC), **common))
    others = [t for t in cfg.eval_tasks if t != "arithmetic"]
    if others:
        results.update(evaluate(model_dir, tasks=others, out_dir=str(run / "eval" / stage / "other"), **common))
    results["perplexity"] = perplexity(model_dir, str(run / "data" / "pretrain"), seq_len=cfg.seq_len)
    _write_json(cached, results)
    return results


def _accuracies(results: dict) -> dict:
    return {task: r["pass@1"] for task, r in results.items() if "pass@1" in r}


def _direct_share(run: Path, stage: str) -> float | None:
    """The share of a checkpoint's held-out arithmetic answers that skip the working (the one-line
    reasoning of SFT's direct traces)."""
    from dsv32.train.r1 import DIRECT_REASONING

    path = run / "eval" / stage / "arithmetic" / "samples.jsonl"
    if not path.exists():
        return None
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return sum((r.get("reasoning") or "").strip() == DIRECT_REASONING for r in rows) / len(rows) if rows else None


def run_card(cfg: SpeedrunConfig, run: Path) -> dict:
    from dsv32.eval.card import write_card

    md, html = write_card(run)
    return {"markdown": str(md), "html": str(html)}


RUNNERS = {"tokenizer": run_tokenizer, "data": run_data, "pretrain": run_pretrain, "sft": run_sft,
           "grpo": run_grpo, "eval": run_eval, "card": run_card}
DESCRIPTIONS = {"tokenizer": "byte-level BPE on the standard library + task texts",
                "data": "token shards: the corpus for pretraining, a chat/tool/reasoning mixture for SFT",
                "pretrain": "the model from scratch on the standard library's sources",
                "sft": "chat, tool use and thinking-mode reasoning (loss on assistant tokens): worked solutions, "
                       "then direct answers mixed in",
                "grpo": "reinforcement learning with verifiable rewards on arithmetic",
                "eval": "held-out text and tasks for the base, SFT and GRPO checkpoints",
                "card": "the system card (Markdown + self-contained HTML)"}


# ---------------------------------------------------------------------- helpers shared by stages
def _train(train_cfg, run_dir: Path) -> list[dict]:
    from dsv32.train.loop import Trainer
    from dsv32.train.metrics import read_metrics

    trainer = Trainer(train_cfg)
    trainer.run(resume=_has_checkpoint(run_dir))
    return [r for r in read_metrics(run_dir / "metrics.jsonl") if "val_loss" in r]


def _has_checkpoint(run_dir: Path) -> bool:
    from dsv32.train.state import latest_checkpoint

    return latest_checkpoint(run_dir / "checkpoints") is not None


def _mark_thinking(model_dir: Path) -> None:
    from dsv32.train.r1 import _mark_thinking as mark

    mark(model_dir)


def _settings(train_cfg) -> dict:
    skip = ("progress", "plot", "device", "stop_after", "log_every")
    return {k: v for k, v in dataclasses.asdict(train_cfg).items() if k not in skip}


# ---------------------------------------------------------------------- the run
def speedrun(cfg: SpeedrunConfig, fresh: bool = False, until: str | None = None) -> dict:
    cfg.validate()
    run = Path(cfg.out)
    if fresh and run.exists():
        shutil.rmtree(run)
    run.mkdir(parents=True, exist_ok=True)
    _check_same_settings(cfg, run)
    records, t_start = {}, time.perf_counter()
    for i, stage in enumerate(STAGES, 1):
        done = stage_record(run, stage)
        if done is not None:
            _banner(i, stage, f"finished earlier ({done['seconds']:.0f}s), loaded from {run / stage / 'stage.json'}")
            records[stage] = done
        else:
            _banner(i, stage, DESCRIPTIONS[stage])
            t0 = time.perf_counter()
            result = RUNNERS[stage](cfg, run)
            records[stage] = {"stage": stage, "seconds": round(time.perf_counter() - t0, 1), **result}
            _write_json(run / stage / "stage.json", records[stage])
        print(f"  {stage_summary(stage, records[stage])}", flush=True)
        if stage == until:
            break
    total = sum(r["seconds"] for r in records.values())
    summary = {"run": str(run), "seconds_this_invocation": round(time.perf_counter() - t_start, 1),
               "seconds_all_stages": round(total, 1), "stages": records}
    _write_json(run / "summary.json", summary)
    return summary


def _check_same_settings(cfg: SpeedrunConfig, run: Path) -> None:
    """Resuming with other settings would mix two runs in one card: refuse, and say how to start over."""
    path = run / "speedrun.json"
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("progress",)}
    if path.exists():
        before = json.loads(path.read_text(encoding="utf-8"))
        changed = sorted(k for k in settings if before.get(k) != settings[k])
        if changed:
            raise ValueError(f"{run} was started with other settings ({', '.join(changed)}): "
                             f"use the same ones, another --out, or --fresh")
    else:
        _write_json(path, settings)
        (run / "reproduce.txt").write_text(reproduce_command(cfg) + "\n", encoding="utf-8")


def reproduce_command(cfg: SpeedrunConfig) -> str:
    defaults = SpeedrunConfig()
    sets = "".join(" --set " + shlex.quote(f"{f.name}={json.dumps(getattr(cfg, f.name), separators=(',', ':'))}")
                   for f in dataclasses.fields(cfg)
                   if f.name not in ("out", "preset", "seed", "progress") and getattr(cfg, f.name) != getattr(defaults, f.name))
    return f"dsv32 speedrun --preset {cfg.preset} --seed {cfg.seed} --out {cfg.out}{sets}"


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def stage_summary(stage: str, r: dict) -> str:
    """One line with the stage's metric, before -> after."""
    if stage == "tokenizer":
        return f"{r['vocab_size']} tokens from {r['training_texts']} texts"
    if stage == "data":
        return (f"pretraining {r['pretrain_tokens'].get('train', 0):,} tokens; "
                f"SFT {r['sft_conversations']:,} conversations, {r['sft_tokens'].get('train', 0):,} tokens, "
                f"then {r['sft_mixed_conversations']:,} with direct answers mixed in")
    if stage == "pretrain":
        return f"validation bits/byte {r['val_bpb_start']:.3f} -> {r['val_bpb_end']:.3f}"
    if stage == "sft":
        parts = [f"{k} {_pct(r['accuracy_base'][k])} -> {_pct(r['accuracy_worked'][k])} -> {_pct(r['accuracy_sft'][k])}"
                 for k in r["accuracy_sft"]]
        return ("held-out accuracy base -> worked solutions -> direct answers mixed in: " + ", ".join(parts)
                + _direct_note(r.get("direct_answers_sft")))
    if stage == "grpo":
        trend = ", ".join(f"{name} {a:.3f} -> {b:.3f}" for name, (a, b) in r["reward_trend"].items())
        direct = ""
        if r.get("direct_answers_sft") is not None and r.get("direct_answers_grpo") is not None:
            direct = (f" (arithmetic answered without working {_pct(r['direct_answers_sft'])} -> "
                      f"{_pct(r['direct_answers_grpo'])})")
        return (f"held-out arithmetic accuracy {_pct(r['accuracy_sft'])} -> {_pct(r['accuracy_grpo'])}{direct}; "
                f"training rewards, first half -> second half of the steps: {trend}")
    if stage == "eval":
        rows = []
        for model, res in r["results"].items():
            cells = [f"bpb {res['perplexity']['bpb']:.3f}"] + [f"{t} {_pct(a)}" for t, a in _accuracies(res).items()]
            rows.append(f"{model}: " + ", ".join(cells))
        return "; ".join(rows)
    if stage == "card":
        return f"{r['markdown']} and {r['html']}"
    return ""


def _direct_note(share: float | None) -> str:
    return "" if share is None else f" (arithmetic answered without working: {_pct(share)})"


def print_summary(summary: dict) -> None:
    run = summary["run"]
    print("\n== speedrun summary ==")
    for stage, r in summary["stages"].items():
        print(f"  {stage:<9} {r['seconds']:7.1f}s  {stage_summary(stage, r)}")
    print(f"  total     {summary['seconds_all_stages']:7.1f}s of stage time "
          f"({summary['seconds_this_invocation']:.1f}s in this invocation)")
    trained = [s for s in ("grpo", "sft", "pretrain") if s in summary["stages"]]
    if not trained:
        return
    model = f"{run}/{trained[0]}/final"
    print("\nNext:")
    print(f"  chat:   dsv32 chat --model {model}")
    print(f"  serve:  dsv32 serve --model {model}   (OpenAI-compatible API and a chat page at http://127.0.0.1:8000/)")
    if "card" in summary["stages"]:
        print(f"  card:   {run}/card/card.html")


# ---------------------------------------------------------------------- CLI
def _parse_set(items: list[str]) -> dict:
    changes = {}
    names = {f.name: f for f in dataclasses.fields(SpeedrunConfig)}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in names:
            raise ValueError(f"--set takes KEY=VALUE with KEY one of {', '.join(names)}; got {item!r}")
        try:
            changes[key] = json.loads(value)
        except json.JSONDecodeError:
            changes[key] = value
    return changes


def cmd_speedrun(args) -> int:
    from dsv32.config import ModelConfig

    ModelConfig.preset(args.preset)   # an unknown preset fails here, in one line
    if args.until and args.until not in STAGES:
        raise ValueError(f"--until must be one of {', '.join(STAGES)}")
    cfg = SpeedrunConfig(out=args.out, preset=args.preset, seed=args.seed, progress=not args.no_progress)
    cfg = cfg.replace(**_parse_set(args.set or []))
    summary = speedrun(cfg, fresh=args.fresh, until=args.until)
    print_summary(summary)
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser("speedrun", help="the whole pipeline on CPU: tokenizer, data, pretrain, SFT, GRPO, eval, card",
                       description=__doc__, formatter_class=__import__("argparse").RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", help="model preset (default tiny)")
    p.add_argument("--out", default="runs/speedrun", help="run directory (default runs/speedrun)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fresh", action="store_true", help="delete the run directory and start over")
    p.add_argument("--until", metavar="STAGE", help=f"stop after this stage ({', '.join(STAGES)})")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a budget, e.g. --set pretrain_steps=40 --set eval_problems=16 (repeatable)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_speedrun)

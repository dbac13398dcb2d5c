"""The system card (`dsv32 card --run DIR`): one Markdown file and one self-contained HTML file.

From a speedrun directory (`dsv32 speedrun`) it reports the architecture and the presets (parameters
total/active, KV-cache bytes per token), the data and every stage with its settings and its own
before -> after metric, the curves (loss, expert load, rewards) as PNGs, the evaluation table by
stage (base -> SFT -> GRPO), the known limitations and the commands that reproduce it. From a
single training run directory (pretrain, SFT or GRPO: `config.json` + `metrics.jsonl`) it writes the
same card with the parts that run has.

The card is built once as a list of blocks and rendered twice: Markdown (images as relative links
next to the run's files) and HTML (images embedded as base64 data, so the file stands alone).
"""
from __future__ import annotations

import base64
import html
import json
import os
import platform
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch

PRESETS = ("nano", "tiny", "lite", "v3-671b", "v3.2-671b", "coder")
TASK_LABELS = {"arithmetic": "arithmetic (1-2 digits, thinking)", "wordproblems": "word problems",
               "tools": "tool calls", "code": "python with unit tests", "perplexity": "held-out code"}


# ---------------------------------------------------------------------- the document model
@dataclass
class Block:
    kind: str                       # h1 | h2 | p | list | table | image | code
    text: str = ""
    rows: list = field(default_factory=list)    # table rows (first row: header) or list items
    path: Path | None = None        # image file


def render_markdown(blocks: list[Block], base: Path) -> str:
    out = []
    for b in blocks:
        if b.kind in ("h1", "h2", "h3"):
            out.append("#" * int(b.kind[1]) + " " + b.text)
        elif b.kind == "p":
            out.append(b.text)
        elif b.kind == "list":
            out.append("\n".join(f"- {item}" for item in b.rows))
        elif b.kind == "table":
            header, *body = b.rows
            lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
            lines += ["| " + " | ".join(map(str, row)) + " |" for row in body]
            out.append("\n".join(lines))
        elif b.kind == "image":
            out.append(f"![{b.text}]({os.path.relpath(b.path, base)})\n\n*{b.text}*")
        elif b.kind == "code":
            out.append("```\n" + b.text + "\n```")
    return "\n\n".join(out) + "\n"


STYLE = """
body{font:15px/1.5 system-ui,-apple-system,Segoe UI,sans-serif;max-width:960px;margin:2rem auto;padding:0 1rem;color:#1d1d1f}
h1{font-size:1.8rem;margin-bottom:.2rem}h2{margin-top:2.2rem;border-bottom:1px solid #ddd;padding-bottom:.2rem}
table{border-collapse:collapse;margin:.8rem 0;font-size:.92rem}th,td{border:1px solid #ddd;padding:.3rem .6rem;text-align:left}
th{background:#f4f4f6}td{font-variant-numeric:tabular-nums}figure{margin:1rem 0}img{max-width:100%;border:1px solid #eee}
figcaption{color:#666;font-size:.88rem}pre{background:#f6f8fa;padding:.8rem;overflow-x:auto;font-size:.85rem}
code{font-family:ui-monospace,SFMono-Regular,Menlo,monospace}
@media (prefers-color-scheme:dark){body{background:#111;color:#e6e6e6}th{background:#222}th,td{border-color:#333}
pre{background:#1b1b1b}img{border-color:#333;background:#fff}h2{border-color:#333}}
"""


def render_html(blocks: list[Block], title: str) -> str:
    esc = html.escape
    out = [f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{esc(title)}</title>"
           f"<meta name=viewport content='width=device-width,initial-scale=1'><style>{STYLE}</style></head><body>"]
    for b in blocks:
        if b.kind in ("h1", "h2", "h3"):
            out.append(f"<{b.kind}>{esc(b.text)}</{b.kind}>")
        elif b.kind == "p":
            out.append(f"<p>{_inline_code(esc(b.text))}</p>")
        elif b.kind == "list":
            out.append("<ul>" + "".join(f"<li>{_inline_code(esc(str(i)))}</li>" for i in b.rows) + "</ul>")
        elif b.kind == "table":
            header, *body = b.rows
            out.append("<table><thead><tr>" + "".join(f"<th>{esc(str(h))}</th>" for h in header) + "</tr></thead><tbody>"
                       + "".join("<tr>" + "".join(f"<td>{_inline_code(esc(str(c)))}</td>" for c in row) + "</tr>"
                                 for row in body)
                       + "</tbody></table>")
        elif b.kind == "image":
            data = base64.b64encode(b.path.read_bytes()).decode("ascii")
            out.append(f"<figure><img alt='{esc(b.text)}' src='data:image/png;base64,{data}'>"
                       f"<figcaption>{esc(b.text)}</figcaption></figure>")
        elif b.kind == "code":
            out.append(f"<pre><code>{esc(b.text)}</code></pre>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def _inline_code(text: str) -> str:
    """`x` -> <code>x</code> (on already-escaped text)."""
    parts = text.split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


# ---------------------------------------------------------------------- formatting helpers
def _si(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def _num(x, digits: int = 3) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None


def _image(blocks: list[Block], path: Path, caption: str) -> None:
    if path.exists():
        blocks.append(Block("image", caption, path=path))


# ---------------------------------------------------------------------- sections
def architecture_section(cfg) -> list[Block]:
    kv = cfg.kv_cache_bytes_per_token(torch.bfloat16)
    rows = [["field", "value"],
            ["layers (dense + MoE)", f"{cfg.num_hidden_layers} ({cfg.first_k_dense_replace} dense)"],
            ["hidden size", cfg.hidden_size],
            ["attention", f"MLA, {cfg.num_attention_heads} heads, q_lora_rank {cfg.q_lora_rank}, "
                          f"kv_lora_rank {cfg.kv_lora_rank}, rope dim {cfg.qk_rope_head_dim}"],
            ["sparse attention (DSA)", f"indexer {cfg.index_n_heads}x{cfg.index_head_dim}, top-{cfg.index_topk}"
             if cfg.use_dsa else "off (dense MLA)"],
            ["experts", f"{cfg.n_routed_experts} routed (top-{cfg.num_experts_per_tok}, {cfg.n_group} groups, "
                        f"top-{cfg.topk_group} groups) + {cfg.n_shared_experts} shared, sigmoid routing"],
            ["multi-token prediction", f"{cfg.num_nextn_predict_layers} module(s)"],
            ["vocabulary", cfg.vocab_size],
            ["context", f"{cfg.max_position_embeddings} ({cfg.rope_type} RoPE)"],
            ["parameters total / active per token", f"{_si(cfg.num_params())} / {_si(cfg.num_active_params())} "
                                                    f"(+{_si(cfg.num_params(include_mtp=True) - cfg.num_params())} MTP)"],
            ["KV cache per token (bf16)", f"{kv:,} bytes"]]
    return [Block("h2", "Architecture"),
            Block("p", "DeepSeek-V3.2's architecture at this size: Multi-head Latent Attention with a compressed "
                       "KV latent and decoupled RoPE, DeepSeekMoE with sigmoid group-limited routing and "
                       "bias-based balancing, multi-token prediction, and DeepSeek Sparse Attention's lightning "
                       "indexer."),
            Block("table", rows=rows),
            Block("p", "The same code builds the released sizes; their counts come from the config arithmetic "
                       "(`dsv32 info`), checked against the real release in the test suite:"),
            Block("table", rows=presets_table())]


def presets_table() -> list[list]:
    from dsv32.config import ModelConfig

    rows = [["preset", "total params", "active params", "KV bytes/token (bf16)", "context"]]
    for name in PRESETS:
        c = ModelConfig.preset(name)
        rows.append([name, _si(c.num_params()), _si(c.num_active_params()),
                     f"{c.kv_cache_bytes_per_token(torch.bfloat16):,}", f"{c.max_position_embeddings:,}"])
    return rows


def stages_section(run: Path, stages: dict, settings: dict) -> list[Block]:
    blocks = [Block("h2", "Training data and stages")]
    data = stages.get("data", {})
    tok = stages.get("tokenizer", {})
    items = []
    corpus = settings.get("corpus", "stdlib")
    corpus = "the Python standard library's own sources" if corpus == "stdlib" else f"`{corpus}`"
    if tok:
        items.append(f"Tokenizer: byte-level BPE, {tok['vocab_size']} tokens, trained on {tok['training_texts']} texts "
                     f"({corpus} and the task generators' texts); digits split one by one.")
    if data:
        items.append(f"Pretraining data: {corpus}, {data['pretrain_tokens'].get('train', 0):,} "
                     f"training tokens (held-out files for validation).")
        items.append(f"SFT data: {data['sft_conversations']:,} generated conversations "
                     f"({', '.join(f'{k} {v}' for k, v in settings.get('sft_examples', {}).items())}), all in thinking "
                     f"mode, {data['sft_tokens'].get('train', 0):,} tokens; loss on assistant tokens only.")
        if "sft_mixed_conversations" in data:
            share = settings.get("sft_direct_fraction")
            items.append(f"SFT's second phase: {data['sft_mixed_conversations']:,} new conversations of the same kinds, "
                         + (f"{share:.0%} of the arithmetic and word-problem ones answering without working "
                            if share is not None else "some answering without working ")
                         + "(a one-line reasoning, then the answer), as R1's and V3.2's SFT data mix reasoning with "
                           "non-reasoning answers. GRPO then has to learn from the reward alone when working pays.")
        items.append("Held-out evaluation problems come from the generators' test split, which no training stage sees.")
    blocks.append(Block("list", rows=items))
    rows = [["stage", "what it optimises", "metric", "before", "after", "wall time"]]
    if "pretrain" in stages:
        r = stages["pretrain"]
        rows.append(["pretrain", "next-token + MTP loss", "validation bits/byte", _num(r["val_bpb_start"]),
                     _num(r["val_bpb_end"]), f"{r['seconds']:.0f}s"])
    if "sft" in stages:
        r = stages["sft"]
        worked = r.get("accuracy_worked", r["accuracy_sft"])
        for task in worked:
            rows.append(["sft", "assistant-token loss on worked solutions",
                         f"held-out {TASK_LABELS.get(task, task)} accuracy", _pct(r["accuracy_base"].get(task)),
                         _pct(worked[task]), f"{r['seconds']:.0f}s"])
        if "accuracy_worked" in r:
            rows.append(["sft", "... then with direct answers mixed in", "held-out arithmetic accuracy",
                         _pct(worked.get("arithmetic")), _pct(r["accuracy_sft"].get("arithmetic")), ""])
    if "grpo" in stages:
        r = stages["grpo"]
        s = r.get("settings", {})
        rewards = " + ".join(f"{w:g} x {n}" for n, w in zip(s.get("rewards", []), s.get("reward_weights", [])))
        rows.append(["grpo", f"verifiable rewards ({rewards or 'task default'})", "held-out arithmetic accuracy (greedy)",
                     _pct(r["accuracy_sft"]), _pct(r["accuracy_grpo"]), f"{r['seconds']:.0f}s"])
        if r.get("direct_answers_grpo") is not None:
            rows.append(["grpo", "", "held-out arithmetic answered without working", _pct(r["direct_answers_sft"]),
                         _pct(r["direct_answers_grpo"]), ""])
        for name, (first, second) in r.get("reward_trend", {}).items():
            rows.append(["grpo", "", f"training reward `{name}`, first vs second half of the steps", _num(first),
                         _num(second), ""])
    blocks.append(Block("table", rows=rows))
    phases = (("pretrain", "pretrain", "settings", "Pretraining"),
              ("sft", "sft/worked", "settings", "Supervised fine-tuning on worked solutions"),
              ("sft", "sft", "mixed_settings", "Supervised fine-tuning with direct answers mixed in"),
              ("grpo", "grpo", "settings", "GRPO"))
    for stage, folder, key, title in phases:
        if stage not in stages or key not in stages[stage]:
            continue
        blocks.append(Block("h3", f"{title}: settings"))
        blocks.append(Block("code", _settings_text(stages[stage][key])))
        _image(blocks, run / folder / "loss.png", f"{title}: training and validation loss")
        _image(blocks, run / folder / "expert_load.png",
               f"{title}: expert load per MoE layer over training (load / mean; 1 = balanced)")
        _image(blocks, run / folder / "rewards.png", f"{title}: rewards per function and held-out accuracy")
        _image(blocks, run / folder / "dynamics.png", f"{title}: KL, entropy, clipping and completion length")
    return blocks


def _settings_text(settings: dict) -> str:
    keep = {k: v for k, v in settings.items() if v not in ("", None, {}, [])}
    return "\n".join(f"{k} = {json.dumps(v)}" for k, v in keep.items())


def evaluation_section(results: dict[str, dict]) -> list[Block]:
    """results: {stage: {task: metrics}}."""
    tasks = []
    for res in results.values():
        tasks += [t for t in res if t != "perplexity" and t not in tasks]
    header = ["checkpoint", "held-out code bits/byte"] + [f"{TASK_LABELS.get(t, t)} pass@1" for t in tasks]
    rows = [header]
    for stage, res in results.items():
        ppl = res.get("perplexity", {})
        rows.append([stage, _num(ppl.get("bpb"))] + [_pct(res.get(t, {}).get("pass@1")) for t in tasks])
    n = next((r.get("n") for res in results.values() for r in res.values() if isinstance(r, dict) and "n" in r), None)
    return [Block("h2", "Evaluation"),
            Block("p", f"Greedy decoding, thinking mode, {n} held-out problems per task and checkpoint; bits per "
                       "byte on held-out standard-library files (lower is better). The base model was never taught "
                       "the chat format, so its task scores show what SFT added."
                       + (" `sft_worked` is SFT's first phase (worked solutions only), `sft` the model after its "
                          "second phase (direct answers mixed in)." if "sft_worked" in results else "")),
            Block("table", rows=rows)]


LIMITATIONS = [
    "A model of this size trained for minutes on two CPU cores is a demonstration of the pipeline, not a useful "
    "assistant: it follows the formats it was taught and gets short arithmetic partly right; it knows nothing else.",
    "The evaluation uses synthetic generators (arithmetic, word problems, tool calls) with a held-out split; "
    "scores on them say nothing about general ability, and small problem counts leave several points of noise.",
    "GRPO here runs ten steps. What it learns in them is *when* to work a problem out: SFT's second phase leaves "
    "a model that mostly answers directly, and direct answers are mostly wrong. It does not teach digit facts; "
    "the remaining errors are wrong digit sums and miscopied operands. Started from the first phase's model "
    "(worked solutions only), the same ten steps do not raise greedy accuracy at this scale. Each training "
    "reward's trend is reported so that a regression is visible.",
    "Sparse attention (DSA) only selects tokens once a sequence is longer than the indexer's top-k; the short "
    "sequences here run it in its dense regime.",
    "No safety tuning, no refusal behaviour, and no filtering of the training corpus beyond what the Python "
    "standard library's own sources are.",
]


def reproduce_section(run: Path) -> list[Block]:
    command = (run / "reproduce.txt").read_text(encoding="utf-8").strip() if (run / "reproduce.txt").exists() else \
        f"dsv32 speedrun --out {run}"
    return [Block("h2", "Reproduce"),
            Block("code", "make demo   # sets up .venv, then runs the speedrun with its defaults; this card's run:\n" + command),
            Block("p", "Each stage resumes when re-run; `--fresh` starts over. Chat with the result: "
                       f"`dsv32 chat --model {run}/grpo/final`; serve it: `dsv32 serve --model {run}/grpo/final`.")]


# ---------------------------------------------------------------------- the card
def speedrun_blocks(run: Path) -> list[Block]:
    from dsv32.config import ModelConfig

    settings = _read_json(run / "speedrun.json") or {}
    stages = {s: r for s in ("tokenizer", "data", "pretrain", "sft", "grpo", "eval")
              if (r := _read_json(run / s / "stage.json")) is not None}
    final = next((run / s / "final" for s in ("grpo", "sft", "pretrain") if (run / s / "final" / "config.json").exists()),
                 None)
    if final is None:
        raise ValueError(f"{run} has no trained checkpoint yet (run `dsv32 speedrun --out {run}` first)")
    cfg = ModelConfig.from_pretrained(final)
    total = sum(r.get("seconds", 0) for r in stages.values())
    blocks = [Block("h1", f"dsv32 system card: {settings.get('preset', 'custom')} speedrun"),
              Block("p", f"Generated {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC from `{run}` on "
                         f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
                         f"{total / 60:.1f} minutes of stage time. Final checkpoint: `{final}`.")]
    blocks += architecture_section(cfg)
    blocks += stages_section(run, stages, settings)
    if "eval" in stages:
        blocks += evaluation_section(stages["eval"]["results"])
    blocks += [Block("h2", "Known limitations"), Block("list", rows=LIMITATIONS)]
    blocks += reproduce_section(run)
    return blocks


def single_run_blocks(run: Path) -> list[Block]:
    """A card for one training run directory (pretrain/SFT: config.json {"train", "model"}; GRPO: {"grpo", "model"})."""
    from dsv32.config import ModelConfig
    from dsv32.train.metrics import read_metrics

    config = _read_json(run / "config.json")
    if not config or "model" not in config:
        raise ValueError(f"{run} is neither a speedrun directory nor a training run directory (no config.json)")
    stage = "grpo" if "grpo" in config else config.get("train", {}).get("stage", "pretrain")
    settings = config.get("grpo") or config.get("train") or {}
    cfg = ModelConfig.from_dict(config["model"])
    records = read_metrics(run / "metrics.jsonl")
    blocks = [Block("h1", f"dsv32 system card: {stage} run"),
              Block("p", f"Generated {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC from `{run}`.")]
    blocks += architecture_section(cfg)
    blocks += [Block("h2", f"{stage} settings"), Block("code", _settings_text(settings))]
    key = "val_accuracy" if stage == "grpo" else "val_bpb"
    evals = [r for r in records if key in r]
    if evals:
        rows = [["step", key]] + [[r["step"], _num(r[key])] for r in evals]
        blocks += [Block("h2", "Held-out metric over training"), Block("table", rows=rows)]
    for name, caption in (("loss.png", "loss"), ("expert_load.png", "expert load (load / mean)"),
                          ("rewards.png", "rewards and held-out accuracy"), ("dynamics.png", "KL, entropy, clipping")):
        _image(blocks, run / name, caption)
    blocks += [Block("h2", "Known limitations"), Block("list", rows=LIMITATIONS[:2] + LIMITATIONS[4:])]
    return blocks


def write_card(run: str | os.PathLike, out_dir: str | os.PathLike | None = None) -> tuple[Path, Path]:
    """Write card.md and card.html (into RUN/card/ unless `out_dir`); returns their paths."""
    run = Path(run)
    if not run.is_dir():
        raise FileNotFoundError(f"no such run directory: {run}")
    blocks = speedrun_blocks(run) if (run / "speedrun.json").exists() else single_run_blocks(run)
    out = Path(out_dir) if out_dir else run / "card"
    out.mkdir(parents=True, exist_ok=True)
    md, page = out / "card.md", out / "card.html"
    for path, text in ((md, render_markdown(blocks, out)), (page, render_html(blocks, blocks[0].text))):
        tmp = path.with_suffix(".tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    return md, page


def cmd_card(args) -> int:
    md, page = write_card(args.run, args.out)
    print(f"wrote {md} and {page}")
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser("card", help="the system card of a speedrun or training run (Markdown + self-contained HTML)")
    p.add_argument("--run", required=True, metavar="DIR", help="a speedrun directory or a training run directory")
    p.add_argument("--out", metavar="DIR", help="where card.md and card.html go (default: RUN/card)")
    p.set_defaults(func=cmd_card)

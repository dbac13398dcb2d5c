"""The speedrun pipeline and the system card, end to end on the `nano` preset with minute budgets.

One module-scoped run goes through every stage (tokenizer, data, pretrain, SFT, GRPO, eval, card) on a
small corpus of this repository's own source files; the tests then check what each stage left behind,
that a re-run resumes instead of retraining, and that the card holds what it promises.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dsv32.eval.card import render_markdown, write_card, Block
from dsv32.speedrun import STAGES, SpeedrunConfig, reproduce_command, speedrun, stage_record

SRC = Path(__file__).resolve().parents[1] / "src" / "dsv32"


def tiny_budget(out: Path, corpus: Path) -> SpeedrunConfig:
    return SpeedrunConfig(out=str(out), preset="nano", corpus=str(corpus), vocab_size=320, seq_len=64,
                          pretrain_steps=4, pretrain_batch=2, pretrain_lr=1e-2,
                          sft_examples={"arithmetic": 24, "word_problem": 8, "tool_use": 8}, sft_steps=3, sft_batch=4,
                          sft_mixed_steps=2, precision="fp32",
                          grpo_steps=1, grpo_prompts=2, grpo_generations=2, grpo_max_tokens=12, eval_problems=2,
                          progress=False)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("speedrun")
    corpus = root / "corpus"
    corpus.mkdir()
    for path in sorted(SRC.rglob("*.py"))[:40]:   # real code, a few hundred KB
        shutil.copy(path, corpus / f"{path.parent.name}_{path.name}")
    cfg = tiny_budget(root / "run", corpus)
    summary = speedrun(cfg)
    return cfg, Path(cfg.out), summary


def test_every_stage_finishes_and_records_its_metric(finished_run):
    cfg, run, summary = finished_run
    assert list(summary["stages"]) == list(STAGES)
    for stage in STAGES:
        record = stage_record(run, stage)
        assert record is not None and record["seconds"] >= 0, stage
    pre = summary["stages"]["pretrain"]
    # even four steps at a high learning rate move a random model's held-out bits/byte down
    assert pre["val_bpb_end"] < pre["val_bpb_start"]
    sft = summary["stages"]["sft"]
    for phase in ("accuracy_worked", "accuracy_sft"):   # worked solutions, then direct answers mixed in
        assert set(sft[phase]) == {"arithmetic", "wordproblems", "tools"}
        assert all(0.0 <= v <= 1.0 for v in sft[phase].values())
    # the second phase trained on from the first one's export, on its own mixture
    assert json.loads((run / "sft" / "config.json").read_text())["train"]["init"] == str(run / "sft" / "worked" / "final")
    assert json.loads((run / "sft" / "config.json").read_text())["train"]["data"] == str(run / "data" / "sft_mixed")
    grpo = summary["stages"]["grpo"]
    assert 0.0 <= grpo["accuracy_sft"] <= 1.0 and 0.0 <= grpo["accuracy_grpo"] <= 1.0
    assert 0.0 <= grpo["direct_answers_sft"] <= 1.0 and 0.0 <= grpo["direct_answers_grpo"] <= 1.0
    assert set(grpo["reward_trend"]) == {"total", "accuracy", "steps", "format"}   # each reward's first/second half
    for stage, folder in (("pretrain", "pretrain"), ("sft_worked", "sft/worked"), ("sft", "sft"), ("grpo", "grpo")):
        assert (run / folder / "final" / "config.json").exists()
        results = summary["stages"]["eval"]["results"][stage]
        assert results["perplexity"]["bpb"] > 0 and results["arithmetic"]["n"] == cfg.eval_problems
    # SFT and GRPO exports are thinking-mode models (the chat and serve paths start in thinking mode)
    assert json.loads((run / "grpo" / "final" / "lineage.json").read_text())["thinking_default"] is True
    assert (run / "summary.json").exists()


def test_rerun_resumes_finished_stages_instead_of_redoing_them(finished_run, capsys):
    cfg, run, _ = finished_run
    weights = run / "pretrain" / "final" / "model.safetensors"
    before = weights.stat().st_mtime_ns
    summary = speedrun(cfg)
    out = capsys.readouterr().out
    assert out.count("finished earlier") == len(STAGES)
    assert weights.stat().st_mtime_ns == before
    assert summary["seconds_this_invocation"] < 30


def test_resuming_with_other_settings_is_refused(finished_run):
    cfg, _, _ = finished_run
    with pytest.raises(ValueError, match="other settings.*sft_steps.*--fresh"):
        speedrun(cfg.replace(sft_steps=cfg.sft_steps + 1))


def test_card_reports_architecture_stages_curves_and_evaluation(finished_run):
    _, run, summary = finished_run
    md = (run / "card" / "card.md").read_text()
    page = (run / "card" / "card.html").read_text()
    for heading in ("Architecture", "Training data and stages", "Evaluation", "Known limitations", "Reproduce"):
        assert f"## {heading}" in md and f"<h2>{heading}</h2>" in page
    # the released size next to ours, with its real total / active parameter counts (671.03B / 37.55B for V3)
    assert "| v3-671b | 671.03B | 37.55B |" in md
    # each stage's before -> after metric is in the card
    pre = summary["stages"]["pretrain"]
    assert f"{pre['val_bpb_start']:.3f} | {pre['val_bpb_end']:.3f}" in md
    grpo_acc = 100 * summary["stages"]["grpo"]["accuracy_grpo"]
    assert f"{grpo_acc:.1f}%" in md
    # curves: linked beside the run in Markdown, embedded in the HTML, which loads nothing from elsewhere
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert any("loss.png" in i for i in images) and any("expert_load.png" in i for i in images)
    assert all((run / "card" / i).exists() for i in images)
    assert page.count("src='data:image/png;base64,") == len(images)
    assert not re.search(r"(src|href)=['\"]?(https?:|//)", page)
    assert "dsv32 speedrun --preset nano" in md and "--set" in md
    assert "training reward `steps`" in md and "1 x accuracy + 0.5 x steps + 0.2 x format" in md
    assert "### Supervised fine-tuning on worked solutions: settings" in md
    assert "### Supervised fine-tuning with direct answers mixed in: settings" in md
    assert "held-out arithmetic answered without working" in md
    assert "training reward <code>steps</code>" in page   # inline code rendered in HTML table cells too


def test_card_of_a_single_training_run(finished_run, tmp_path):
    _, run, _ = finished_run
    md, page = write_card(run / "pretrain", tmp_path)
    text = md.read_text()
    assert text.startswith("# dsv32 system card: pretrain run") and "## Architecture" in text
    assert "val_bpb" in text and page.exists()


def test_markdown_rendering_of_blocks(tmp_path):
    (tmp_path / "a.png").write_bytes(b"\x89PNG")
    blocks = [Block("h2", "T"), Block("table", rows=[["a", "b"], [1, 2]]), Block("list", rows=["x"]),
              Block("image", "cap", path=tmp_path / "a.png"), Block("code", "cmd")]
    assert render_markdown(blocks, tmp_path) == "## T\n\n| a | b |\n|---|---|\n| 1 | 2 |\n\n- x\n\n![cap](a.png)\n\n*cap*\n\n```\ncmd\n```\n"


def test_second_sft_phase_answers_a_share_of_problems_directly(finished_run):
    from dsv32.train.r1 import DIRECT_REASONING

    cfg, run, _ = finished_run
    rows = [json.loads(line)["messages"] for line in (run / "data" / "sft_mixed.jsonl").read_text().splitlines()]
    first = [json.loads(line)["messages"] for line in (run / "data" / "sft.jsonl").read_text().splitlines()]
    assert len(rows) == len(first) == sum(cfg.sft_examples.values())
    assert rows != first   # new problems, not the first phase's again
    direct = [m for m in rows if m[-1].get("reasoning_content") == DIRECT_REASONING]
    n_arith, n_word = cfg.sft_examples["arithmetic"], cfg.sft_examples["word_problem"]
    assert len(direct) == round(n_arith * cfg.sft_direct_fraction) + round(n_word * cfg.sft_direct_fraction)
    assert all(m[-1]["content"].startswith("Answer:") for m in direct)   # the answer stays; the working goes
    assert not any(m[-1].get("reasoning_content") == DIRECT_REASONING for m in first)


def test_direct_share_counts_answers_without_working(tmp_path):
    from dsv32.speedrun import _direct_share
    from dsv32.train.r1 import DIRECT_REASONING

    folder = tmp_path / "eval" / "sft" / "arithmetic"
    folder.mkdir(parents=True)
    rows = [{"reasoning": DIRECT_REASONING}, {"reasoning": "Compute 2 + 3.\nones: 2 + 3 + carry 0 = 5"},
            {"reasoning": None}, {"reasoning": f" {DIRECT_REASONING}\n"}]
    (folder / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert _direct_share(tmp_path, "sft") == 0.5
    assert _direct_share(tmp_path, "grpo") is None   # not evaluated


def test_auto_precision_takes_bf16_only_with_bf16_instructions(monkeypatch):
    from dsv32.speedrun import resolve_precision

    assert resolve_precision("fp32") == "fp32" and resolve_precision("bf16") == "bf16"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for avx512_bf16, amx, expected in ((False, False, "fp32"), (True, False, "bf16"), (False, True, "bf16")):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v, raising=False)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v, raising=False)
        assert resolve_precision("auto") == expected


def test_reproduce_command_lists_only_changed_budgets():
    cmd = reproduce_command(SpeedrunConfig(out="runs/x", pretrain_steps=7, sft_examples={"arithmetic": 5}))
    assert cmd == ("dsv32 speedrun --preset tiny --seed 0 --out runs/x --set pretrain_steps=7 "
                   "--set 'sft_examples={\"arithmetic\":5}'")


@pytest.mark.parametrize("argv, message", [
    (["speedrun", "--preset", "huge"], "unknown preset"),
    (["speedrun", "--set", "nope=1"], "--set takes KEY=VALUE"),
    (["speedrun", "--until", "nowhere"], "--until must be one of"),
    (["speedrun", "--set", "precision=fp16"], "precision='fp16' must be auto, fp32 or bf16"),
    (["speedrun", "--set", "sft_direct_fraction=1.5"], "direct_fraction=1.5 must be in [0, 1]"),
    (["card", "--run", "/nonexistent/run"], "no such run directory"),
])
def test_cli_errors_are_one_line(argv, message, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "dsv32.cli", *argv, *(["--out", str(tmp_path / "r")] if argv[0] == "speedrun" else [])],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr

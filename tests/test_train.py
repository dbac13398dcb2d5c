"""Pretraining and SFT end to end on tiny data: overfitting, exact resume across a kill -9, the
indexer stages, the run directory's contents, continual training lineage and bad input."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dsv32.checkpoint import load_pretrained
from dsv32.data.corpus import stdlib_files
from dsv32.data.loader import PackedLoader
from dsv32.data.prepare import prepare
from dsv32.tokenizer import train_tokenizer
from dsv32.train.config import TrainConfig
from dsv32.train.loop import Trainer
from dsv32.train.metrics import read_metrics

NANO = {"num_hidden_layers": 2}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A small tokenizer, a prepared code corpus, a one-document corpus and chat (SFT) data."""
    root = tmp_path_factory.mktemp("train")
    files = stdlib_files()[:40]
    texts = [f.read_text(encoding="utf-8", errors="replace")[:4000] for f in files]
    tok = train_tokenizer(texts, vocab_size=400, show_progress=False)
    tok.save(root / "tok")
    corpus = root / "corpus"
    corpus.mkdir()
    for i, text in enumerate(texts):
        (corpus / f"doc{i:02d}.py").write_text(text, encoding="utf-8")
    prepare([str(corpus)], root / "tok", root / "data", validation_fraction=0.2, show_progress=False)
    tiny = root / "one_doc"
    tiny.mkdir()
    (tiny / "a.txt").write_text("def add(a, b):\n    return a + b\n" * 12, encoding="utf-8")
    prepare([str(tiny)], root / "tok", root / "data_one", validation_fraction=0.0, show_progress=False)
    prepare(["tasks:arithmetic:120"], root / "tok", root / "data_chat", show_progress=False)
    return root


def config(workspace, out, **changes) -> TrainConfig:
    base = dict(out=str(out), data=str(workspace / "data"), tokenizer=str(workspace / "tok"), preset="nano",
                model=dict(NANO), seq_len=32, batch_size=4, steps=6, lr=3e-3, warmup_steps=2, eval_every=3,
                eval_batches=2, ckpt_every=3, progress=False, plot=False)
    return TrainConfig(**{**base, **changes})


def test_overfits_a_tiny_fixed_batch(workspace, tmp_path):
    cfg = config(workspace, tmp_path / "run", data=str(workspace / "data_one"), steps=250, lr=1e-2,
                 warmup_steps=10, schedule="constant", eval_every=1000, ckpt_every=1000, batch_size=2)
    trainer = Trainer(cfg)
    trainer.run()
    losses = [r["lm_loss"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "lm_loss" in r]
    assert losses[0] > 4.0
    assert min(losses[-10:]) < 0.15


def test_run_directory_has_metrics_checkpoints_export_and_plots(workspace, tmp_path):
    out = tmp_path / "run"
    Trainer(config(workspace, out, plot=True)).run()
    records = read_metrics(out / "metrics.jsonl")
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 7))
    for key in ("loss", "lm_loss", "mtp_loss", "balance_loss", "lr", "grad_norm", "tokens_per_s", "mfu",
                "expert_load_max_over_mean", "starved_experts"):
        assert key in steps[-1], key
    assert 0 < steps[-1]["mfu"] < 1.5
    val = [r for r in records if "val_loss" in r]
    assert len(val) == 2 and all(r["val_bpb"] > 0 for r in val)
    resolved = json.loads((out / "config.json").read_text())
    assert resolved["train"]["steps"] == 6 and resolved["model"]["num_hidden_layers"] == 2
    assert (out / "loss.png").stat().st_size > 0 and (out / "expert_load.png").stat().st_size > 0
    model = load_pretrained(out / "final")
    assert model.config.num_hidden_layers == 2 and (out / "final" / "tokenizer.json").exists()
    lineage = json.loads((out / "final" / "lineage.json").read_text())
    assert lineage["stage"] == "pretrain" and lineage["steps"] == 6 and lineage["parent"] is None


def test_continual_training_and_sft_record_their_parent(workspace, tmp_path):
    Trainer(config(workspace, tmp_path / "base")).run()
    sft = config(workspace, tmp_path / "sft", stage="sft", init=str(tmp_path / "base" / "final"),
                 data=str(workspace / "data_chat"), steps=4, eval_every=100, lr=1e-3)
    trainer = Trainer(sft)
    loader = PackedLoader(sft.data, "train", sft.seq_len, sft.batch_size, epochs=1)
    ignored = sum(int((b["labels"] == -100).sum()) for b in loader)
    assert ignored > 0  # prompts are not trained on
    trainer.run()
    lineage = json.loads((tmp_path / "sft" / "final" / "lineage.json").read_text())
    assert lineage["stage"] == "sft" and lineage["parent"]["stage"] == "pretrain"
    assert lineage["init"] == str((tmp_path / "base" / "final").resolve())


def test_dense_warmup_trains_only_the_indexer(workspace, tmp_path):
    trainer = Trainer(config(workspace, tmp_path / "run", indexer_stage="dense_warmup", steps=3, lr=1e-2))
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.run()
    changed = {n for n, p in trainer.model.named_parameters() if not torch.equal(before[n], p)}
    assert changed and all(".indexer." in n for n in changed)
    records = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "indexer_loss" in r]
    assert len(records) == 3


def test_sparse_indexer_stage_trains_everything(workspace, tmp_path):
    trainer = Trainer(config(workspace, tmp_path / "run", indexer_stage="sparse", steps=2,
                             model={**NANO, "index_topk": 8}))
    before = trainer.model.embed_tokens.weight.detach().clone()
    trainer.run()
    assert not torch.equal(before, trainer.model.embed_tokens.weight)
    assert all("indexer_loss" in r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r)


def _cli(args, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "dsv32.cli", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def _losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]


def test_exact_resume_after_kill_9(workspace, tmp_path):
    steps = 30
    common = ["train", "pretrain", "--data", str(workspace / "data"), "--tokenizer", str(workspace / "tok"),
              "--preset", "nano", "--model-set", "num_hidden_layers=2", "--seq-len", "32", "--batch-size", "4",
              "--steps", str(steps), "--lr", "3e-3", "--warmup-steps", "3", "--eval-every", "1000",
              "--ckpt-every", "2", "--no-progress", "--no-plot"]
    straight = _cli([*common, "--out", str(tmp_path / "a")])
    assert straight.wait(timeout=300) == 0, straight.stderr.read()

    victim = _cli([*common, "--out", str(tmp_path / "b")])
    ckpts = tmp_path / "b" / "checkpoints"
    deadline = time.time() + 240
    while time.time() < deadline and not (ckpts.exists() and any(p.name.startswith("step_00000004") for p in ckpts.iterdir())):
        time.sleep(0.01)
    victim.send_signal(signal.SIGKILL)
    assert victim.wait(timeout=60) == -signal.SIGKILL
    killed_at = len(_losses(tmp_path / "b"))
    assert 4 <= killed_at < steps  # it really died mid-run

    resumed = _cli([*common, "--out", str(tmp_path / "b"), "--resume"])
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()
    assert _losses(tmp_path / "b") == _losses(tmp_path / "a")  # identical, step for step


def test_cli_bad_input_is_one_line(tmp_path):
    proc = _cli(["train", "pretrain", "--data", str(tmp_path / "missing"), "--no-progress"])
    assert proc.wait(timeout=120) == 1
    err = proc.stderr.read().strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    proc = _cli(["train", "sft", "--data", str(tmp_path)])
    assert proc.wait(timeout=120) == 1 and "--init" in proc.stderr.read()


def test_config_file_then_flags_then_default_sft_data(workspace, tmp_path):
    from dsv32.train import cli as train_cli
    from dsv32.cli import build_parser

    (tmp_path / "run.toml").write_text('steps = 3\nlr = 0.002\nseq_len = 16\n')
    args = build_parser().parse_args(["train", "pretrain", "--config", str(tmp_path / "run.toml"), "--lr", "0.005",
                                      "--model-set", "num_hidden_layers=1", "--data", "somewhere"])
    cfg = train_cli.config_from_args("pretrain", args)
    assert (cfg.steps, cfg.lr, cfg.seq_len, cfg.model) == (3, 0.005, 16, {"num_hidden_layers": 1})
    (tmp_path / "bad.json").write_text('{"stepz": 3}')
    with pytest.raises(ValueError, match="unknown training settings stepz"):
        TrainConfig.from_file(tmp_path / "bad.json")
    # SFT without --data prepares the generators' conversations with the checkpoint's tokenizer
    init = tmp_path / "init"
    init.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (init / name).write_bytes((workspace / "tok" / name).read_bytes())
    sft = TrainConfig(stage="sft", out=str(tmp_path / "sft"), init=str(init), progress=False, data="x")
    data_dir = train_cli.default_sft_data(sft)
    loader = PackedLoader(data_dir, "train", 64, 4, epochs=1)
    assert any((b["labels"] == -100).any() for b in loader)
    sources = [s["spec"] for s in loader.manifest["sources"]]
    assert sources == list(train_cli.DEFAULT_SFT_SOURCES)

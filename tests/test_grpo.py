"""GRPO end to end on the nano model: rewards (TRL signature), rollouts from the engine (log-probs equal
the trainer's), keep routing and keep sampling mask in the training forward, the reference model only
when beta > 0, num_iterations, exact resume, the run directory, the CLI, the R1 traces, test-time
scaling, and a short run that improves reward on an easy task."""
import json
import math
import subprocess
from pathlib import Path

import pytest
import torch

from dsv32 import ModelConfig, Transformer
from dsv32.checkpoint import load_pretrained, save_pretrained
from dsv32.data.tasks import arithmetic, tools
from dsv32.tokenizer import train_tokenizer
from dsv32.train.grpo import GRPOConfig, GRPOTrainer
from dsv32.train.metrics import read_metrics
from dsv32.train.rewards import accuracy_reward, build_rewards, compute_rewards, make_format_reward, tool_call_reward
from dsv32.train.rollout import completion_logits, load_prompts, score_old_policy
from dsv32.train.grpo_objective import token_logprobs

ONE_DIGIT = {"min_digits": 1, "max_digits": 1}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The nano model's matmuls are tiny: one thread is as fast on an idle machine, and on a loaded one
    OpenMP's second thread spin-waits (measured here at load 3 on 2 cores: 37 s with one thread, 9 min
    with two). Restored afterwards for the other test modules."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A tokenizer trained on arithmetic text and a random 2-layer nano checkpoint that carries it."""
    root = tmp_path_factory.mktemp("grpo")
    texts = [t.solution + "\n" + t.prompt for t in arithmetic.generate("train", 200, 0, min_digits=1, max_digits=2)]
    tok = train_tokenizer(texts, 400, show_progress=False)
    tok.save(root / "tok")
    torch.manual_seed(0)
    cfg = ModelConfig.preset("nano").replace(num_hidden_layers=2, initializer_range=0.08, bos_token_id=tok.bos_id,
                                             eos_token_id=tok.eos_id)
    save_pretrained(Transformer(cfg), root / "init", tokenizer_dir=root / "tok")
    # a dense reward for a random policy (its answers are never right): the share of even token ids
    (root / "dense.py").write_text("def even(prompts, completions, completion_ids, **kwargs):\n"
                                   "    return [sum(t % 2 == 0 for t in ids) / max(len(ids), 1) for ids in completion_ids]\n")
    return root


def grpo_config(workspace, out, **changes) -> GRPOConfig:
    base = dict(out=str(out), init=str(workspace / "init"), task="arithmetic", task_args=ONE_DIGIT, train_prompts=64,
                eval_prompts=4, eval_split="test", eval_every=100, steps=2, prompts_per_step=2, num_generations=3,
                micro_batch_size=4, max_completion_length=12, lr=1e-3, progress=False, plot=False, ckpt_every=1)
    return GRPOConfig(**{**base, **changes})


# ---------------------------------------------------------------------- rewards
def test_builtin_rewards_by_hand():
    task = next(arithmetic.generate("test", 1, 0, **ONE_DIGIT))
    right, wrong = f"Answer: {task.answer}", f"Answer: {int(task.answer) + 1}"
    comps = [[{"role": "assistant", "content": right}], [{"role": "assistant", "content": wrong}],
             [{"role": "assistant", "content": "no answer"}]]
    prompts = [task.prompt_messages()] * 3
    assert accuracy_reward(prompts, comps, task=[task] * 3, answer=[task.answer] * 3) == [1.0, 0.0, 0.0]
    fmt = make_format_reward(thinking=True)
    texts = [f"steps</think>{right}<eos>", f"steps {right}", f"steps</think>{right}"]
    assert fmt(prompts, comps[:1] * 3, completion_text=texts, truncated=[False, False, True], task=[task] * 3) == [1.0, 0.0, 0.0]
    # JSONL rows: the reference answer, compared as numbers when it is one
    assert accuracy_reward(prompts[:2], [[{"content": "Answer: 12.0"}], [{"content": "Answer: twelve"}]],
                           task=[{}, {}], answer=["12", "12"]) == [1.0, 0.0]
    # tool calls: well-formed calls of declared tools; None where the prompt has no tools
    tool_task = next(tools.generate("test", 1, 0))
    call = {"type": "function", "function": {"name": tool_task.meta["tool"], "arguments": json.dumps(tool_task.meta["arguments"])}}
    bad = {"type": "function", "function": {"name": "nope", "arguments": "{}"}}
    got = tool_call_reward([tool_task.prompt_messages()] * 2 + [prompts[0]],
                           [[{"content": "", "tool_calls": [call]}], [{"content": "", "tool_calls": [bad]}], comps[0]])
    assert got == [1.0, 0.0, None]
    assert accuracy_reward([tool_task.prompt_messages()], [[{"content": "", "tool_calls": [call]}]], task=[tool_task],
                           answer=[tool_task.answer]) == [1.0]


def test_steps_reward_scores_the_written_arithmetic_without_the_answer():
    from dsv32.train.rewards import steps_reward

    worked = {"role": "assistant", "reasoning_content": "Compute 47 + 38.\nones: 7 + 8 + carry 0 = 15, write 5, carry 1\n"
              "tens: 4 + 3 + carry 1 = 8, write 8, carry 0", "content": "Answer: 85"}
    slip = {**worked, "reasoning_content": worked["reasoning_content"].replace("= 15", "= 14")}
    comps = [[worked], [slip], [{"role": "assistant", "content": "Answer: 85"}]]
    assert steps_reward([[]] * 3, comps) == [1.0, 0.5, 0.0]
    (name, fn), = build_rewards(["steps"], thinking=True, max_completion_length=64, overlong_buffer=0)
    assert name == "steps" and fn([[]], comps[:1]) == [1.0]


def test_code_reward_runs_the_unit_tests_without_network():
    from dsv32.data.tasks import python_funcs

    task = next(python_funcs.generate("test", 1, 0))
    good = task.solution
    sneaky = good.replace("```python\n", "```python\nimport socket\nsocket.create_connection(('127.0.0.1', 9))\n")
    spawn = good.replace("```python\n", "```python\nimport subprocess\nsubprocess.run(['true'])\n")
    comps = [[{"content": c}] for c in (good, sneaky, spawn, "no code")]
    assert accuracy_reward([task.prompt_messages()] * 4, comps, task=[task] * 4, answer=[task.answer] * 4) == [1.0, 0, 0, 0]


def test_length_reward_and_weighted_sum_by_hand(tmp_path):
    fns = build_rewards(["length", "tool_call"], thinking=True, max_completion_length=10, overlong_buffer=4)
    ids = [[0] * 6, [0] * 8, [0] * 10]
    totals, per_fn = compute_rewards(fns, [0.5, 2.0], [[{"role": "user", "content": "x"}]] * 3, [[{"content": ""}]] * 3,
                                     completion_ids=ids)
    # soft overlong punishment: 0 up to 10 - 4 = 6 tokens, then (6 - n) / 4: -0.5 at 8, -1 at 10
    assert per_fn["length"] == [0.0, -0.5, -1.0]
    assert all(math.isnan(v) for v in per_fn["tool_call"])  # None (no tools): not applicable, counts 0
    assert totals == [0.0, -0.25, -0.5]
    user = tmp_path / "my_rewards.py"
    user.write_text("def short(completions, completion_ids, **kwargs):  # TRL style: no prompts parameter\n"
                    "    return [1.0 if len(i) < 7 else 0.0 for i in completion_ids]\n"
                    "def broken(prompts, completions, **kwargs):\n    return [1.0]\n"
                    "def no_kwargs(prompts, completions):\n    return [0.0]\n")
    fns = build_rewards([f"{user}:short"], thinking=True, max_completion_length=10, overlong_buffer=4)
    totals, per_fn = compute_rewards(fns, [2.0], [[]] * 3, [[{"content": ""}]] * 3, completion_ids=ids)
    assert totals == [2.0, 0.0, 0.0]
    fns = build_rewards([f"{user}:short", f"{user}:broken"], thinking=True, max_completion_length=10, overlong_buffer=4)
    assert [n for n, _ in fns] == ["short", "broken"]
    with pytest.raises(ValueError, match="broken.*expected a list of 3"):
        compute_rewards(fns, [1.0, 1.0], [[]] * 3, [[{"content": ""}]] * 3, completion_ids=ids)
    with pytest.raises(ValueError, match="must be \\(prompts, completions, \\*\\*kwargs\\)"):
        build_rewards([f"{user}:no_kwargs"], thinking=True, max_completion_length=10, overlong_buffer=4)
    with pytest.raises(ValueError, match="no function 'missing'"):
        build_rewards([f"{user}:missing"], thinking=True, max_completion_length=10, overlong_buffer=4)


def test_task_names_and_jsonl_prompts(tmp_path):
    assert load_prompts("wordproblems", "test", 3)[0].task.kind == "word_problem"
    mixed = load_prompts("arithmetic,tools", "train", 4)
    assert [p.task.kind for p in mixed] == ["arithmetic", "tool_use", "arithmetic", "tool_use"]
    f = tmp_path / "t.jsonl"
    f.write_text(json.dumps({"prompt": "What is 2 + 2?", "answer": 4, "level": "easy"}) + "\n")
    (p,) = load_prompts(str(f), "train", 10)
    assert p.messages == [{"role": "user", "content": "What is 2 + 2?"}] and p.answer == "4" and p.columns == {"level": "easy"}
    f.write_text('{"answer": 4}\n')
    with pytest.raises(ValueError, match="t.jsonl:1"):
        load_prompts(str(f), "train", 10)
    with pytest.raises(ValueError, match="unknown task"):
        load_prompts("poetry", "train", 10)


# ---------------------------------------------------------------------- rollouts, stabilisers
@pytest.fixture(scope="module")
def rollout_batch(workspace, tmp_path_factory):
    """A trainer with top-p sampling and one step's rollouts, micro-batches and old-policy scores."""
    trainer = GRPOTrainer(grpo_config(workspace, tmp_path_factory.mktemp("ro"), top_p=0.9, max_completion_length=16,
                                      micro_batch_size=8, prompts_per_step=2, num_generations=4))
    prompts = trainer.prompts_for_step(1)
    rollouts = trainer.rollout(prompts, 1)
    micro = trainer._micro_batches(rollouts)
    old = [score_old_policy(trainer.model, mb, trainer.cfg) for mb in micro]
    return trainer, rollouts, micro, old


def test_engine_logprobs_equal_the_trainers(rollout_batch):
    trainer, rollouts, micro, old = rollout_batch
    assert sum(len(r.completion_ids) for r in rollouts) > 40
    for mb, o in zip(micro, old):
        present = mb.present.bool()
        diff = (o.raw_logps - mb.engine_logprobs)[present].abs()
        assert float(diff.max()) <= 1e-4
    assert sum(o.forced_in for o in old) == 0  # every sampled token is in the recomputed top-p set


def test_keep_routing_replays_the_rollout_experts(rollout_batch):
    trainer, rollouts, micro, old = rollout_batch
    model, mb, o = trainer.model, micro[0], old[0]
    with torch.no_grad():
        before, _ = completion_logits(model, mb)
        biases = [b for n, b in model.named_buffers() if n.endswith("e_score_correction_bias")]
        saved = [b.clone() for b in biases]
        try:
            g = torch.Generator().manual_seed(0)
            for b in biases:  # the bias only moves selection: a big change reroutes many tokens
                b.add_(torch.randn(b.shape, generator=g) * 5)
            free, free_routing = completion_logits(model, mb)
            kept, kept_routing = completion_logits(model, mb, forced_routing=o.routing)
        finally:
            for b, s in zip(biases, saved):
                b.copy_(s)
    assert any(not torch.equal(a, b) for a, b in zip(free_routing, o.routing))
    assert all(torch.equal(a, b) for a, b in zip(kept_routing, o.routing))
    assert torch.equal(kept, before)             # replayed routing: exactly the rollout forward
    assert not torch.allclose(free, before, atol=1e-3)


def test_keep_sampling_mask_is_applied_to_the_training_distribution(rollout_batch):
    trainer, rollouts, micro, old = rollout_batch
    mb, o = micro[0], old[0]
    assert o.keep is not None and o.keep.shape[-1] == trainer.model.config.vocab_size
    with torch.no_grad():
        logits, _ = completion_logits(trainer.model, mb, forced_routing=o.routing)
    row, t = 0, 1
    kept = o.keep[row, t]
    assert 0 < int(kept.sum()) < kept.numel()
    # by hand: log p of the sampled token, renormalised over the kept set only
    token = int(mb.targets[row, t])
    expected = logits[row, t, token] - torch.logsumexp(logits[row, t][kept], 0)
    lp, _ = token_logprobs(logits, mb.targets, 1.0, o.keep)
    assert float(lp[row, t]) == pytest.approx(float(expected), abs=1e-5)
    assert float(o.logps[row, t]) == pytest.approx(float(expected), abs=1e-5)
    full, _ = token_logprobs(logits, mb.targets, 1.0, None)
    assert float(full[row, t]) < float(lp[row, t])  # the truncated distribution puts more mass on it


def test_flags_off_record_nothing(workspace, tmp_path):
    trainer = GRPOTrainer(grpo_config(workspace, tmp_path, top_p=0.9, keep_routing=False, keep_sampling_mask=False))
    rollouts = trainer.rollout(trainer.prompts_for_step(1), 1)
    o = score_old_policy(trainer.model, trainer._micro_batches(rollouts)[0], trainer.cfg)
    assert o.routing is None and o.keep is None


def test_beta_zero_loads_no_reference(workspace, tmp_path):
    assert GRPOTrainer(grpo_config(workspace, tmp_path / "a")).ref_model is None
    trainer = GRPOTrainer(grpo_config(workspace, tmp_path / "b", beta=0.04, num_iterations=2,
                                      rewards=[f"{workspace / 'dense.py'}:even"]))
    assert trainer.ref_model is not None and not any(p.requires_grad for p in trainer.ref_model.parameters())
    record = trainer.train_step()
    assert record["kl"] >= 0 and math.isfinite(record["kl"]) and record["policy_kl"] > 0
    assert trainer.scheduler.last_epoch == 2  # two optimizer updates on one rollout batch
    assert record["ratio/max"] != 1.0 or record["ratio/min"] != 1.0  # the second update is off-policy
    ref = dict(trainer.ref_model.named_parameters())
    assert any(not torch.equal(p, ref[n]) for n, p in trainer.model.named_parameters())


def test_one_update_takes_pi_old_from_the_training_forward(workspace, tmp_path):
    """num_iterations 1 skips the separate scoring forward; the update must equal the two-forward one."""
    dense = [f"{workspace / 'dense.py'}:even"]
    changes = dict(top_p=0.9, beta=0.04, off_policy_delta=0.0, rewards=dense, log_policy_shift=False)
    fused = GRPOTrainer(grpo_config(workspace, tmp_path / "a", **changes))
    separate = GRPOTrainer(grpo_config(workspace, tmp_path / "b", **changes))
    separate.fuse_old_policy = False
    a, b = fused.train_step(), separate.train_step()
    for key in ("reward", "loss", "kl", "entropy", "grad_norm", "sampling/logp_diff_max", "ratio/max"):
        assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), key
    assert a["ratio/max"] == pytest.approx(1.0) and a["off_policy_masked_frac"] == b["off_policy_masked_frac"]
    params = dict(separate.model.named_parameters())
    start = dict(load_pretrained(workspace / "init").named_parameters())
    assert any(not torch.allclose(p, start[name]) for name, p in fused.model.named_parameters())  # it did update
    for name, p in fused.model.named_parameters():
        torch.testing.assert_close(p, params[name], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------- run directory, resume, CLI
def test_run_directory_metrics_plots_and_export(workspace, tmp_path):
    out = tmp_path / "run"
    GRPOTrainer(grpo_config(workspace, out, plot=True, off_policy_delta=0.1, eval_every=2, mask_truncated_completions=True)).run()
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records] == [0, 1, 2] and "val_accuracy" in records[0] and "val_accuracy" in records[2]
    last = records[-1]
    for key in ("reward", "reward_std", "rewards/accuracy/mean", "rewards/format/std", "rewards/length/mean",
                "frac_reward_zero_std", "completions/mean_length", "completions/min_length", "completions/max_length",
                "completions/clipped_ratio", "clip_ratio/low_mean", "clip_ratio/high_mean", "policy_kl", "entropy",
                "sampling/logp_diff_mean", "sampling/logp_diff_max", "tokens_per_s", "rollout_tokens_per_s",
                "off_policy_masked_frac", "grad_norm", "learning_rate", "loss"):
        assert key in last, key
    assert last["sampling/logp_diff_max"] <= 1e-4
    for name in ("rewards.png", "dynamics.png"):
        assert (out / name).stat().st_size > 0
    lineage = json.loads((out / "final" / "lineage.json").read_text())
    assert lineage["stage"] == "grpo" and lineage["thinking_default"] is True
    assert (out / "final" / "tokenizer.json").exists()
    assert len((out / "completions.jsonl").read_text().splitlines()) == 4


def test_exact_resume(workspace, tmp_path):
    dense = [f"{workspace / 'dense.py'}:even"]
    straight = GRPOTrainer(grpo_config(workspace, tmp_path / "a", steps=3, num_iterations=2, rewards=dense))
    straight.run()
    first = GRPOTrainer(grpo_config(workspace, tmp_path / "b", steps=3, num_iterations=2, rewards=dense, stop_after=2))
    first.run()
    assert first.step == 2 and not (tmp_path / "b" / "final").exists()
    second = GRPOTrainer(grpo_config(workspace, tmp_path / "b", steps=3, num_iterations=2, rewards=dense))
    second.run(resume=True)
    a, b = straight.model.state_dict(), second.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(r.get("grad_norm", 0) > 0 for r in read_metrics(tmp_path / "a" / "metrics.jsonl"))
    strip = lambda rs: [{k: v for k, v in r.items() if not k.startswith(("time/", "tokens_per_s", "rollout_tokens"))} for r in rs]
    assert strip(read_metrics(tmp_path / "a" / "metrics.jsonl")) == strip(read_metrics(tmp_path / "b" / "metrics.jsonl"))


def _cli(capsys, *args):
    from dsv32.cli import main

    capsys.readouterr()
    code = main(list(args))
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out, err)


def test_cli_errors_are_one_line(workspace, tmp_path, capsys):
    for args, message in ((["train", "grpo", "--out", str(tmp_path)], "give --init CKPT"),
                          (["train", "grpo", "--init", str(workspace / "init"), "--task", "poetry", "--out", str(tmp_path)],
                           "unknown task 'poetry'"),
                          (["train", "grpo", "--init", str(workspace / "init"), "--loss-type", "bnpo"], "loss_type='bnpo'"),
                          (["train", "grpo", "--init", str(workspace / "init"), "--num-generations", "1"], "num_generations=1"),
                          (["train", "grpo", "--init", str(tmp_path / "missing")], "no such checkpoint"),
                          (["train", "grpo", "--init", str(workspace / "init"), "--rewards", "accuracy,nope:fn"],
                           "cannot import nope"),
                          (["train", "r1", "--tokenizer", str(workspace / "tok"), "--direct-fraction", "1.5"],
                           "direct_fraction=1.5 must be in [0, 1]")):
        args = args + ["--out", str(tmp_path / "never")] if "--out" not in args else args
        result = _cli(capsys, *args)
        assert result.returncode == 1, (args, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], (args, result.stderr)
        assert not (tmp_path / "never").exists()  # nothing written for a run that cannot start


def test_cli_runs_grpo_and_ttc(workspace, tmp_path, capsys):
    out = tmp_path / "cli"
    result = _cli(capsys, "train", "grpo", "--init", str(workspace / "init"), "--out", str(out), "--task", "arithmetic",
                  "--task-args", json.dumps(ONE_DIGIT), "--steps", "1", "--prompts-per-step", "2", "--num-generations", "2",
                  "--max-completion-length", "8", "--eval-prompts", "2", "--eval-split", "test", "--train-prompts", "16",
                  "--rewards", "accuracy,format", "--reward-weights", "1,0.5", "--loss-type", "grpo",
                  "--no-keep-routing", "--no-progress", "--no-plot")
    assert result.returncode == 0, result.stderr
    assert "grpo: step 1/1" in result.stdout
    saved = json.loads((out / "config.json").read_text())["grpo"]
    assert saved["rewards"] == ["accuracy", "format"] and saved["reward_weights"] == [1.0, 0.5]
    assert saved["keep_routing"] is False and saved["loss_type"] == "grpo"
    result = _cli(capsys, "ttc", "--model", str(out / "final"), "--task", "arithmetic", "--task-args", json.dumps(ONE_DIGIT),
                  "-n", "2", "--samples", "1,2", "--max-tokens", "8", "--out", str(tmp_path / "ttc"))
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "ttc" / "scaling.json").read_text())
    assert set(summary["curve"]) == {"1", "2"} and (tmp_path / "ttc" / "accuracy_vs_samples.png").exists()


# ---------------------------------------------------------------------- a short run that learns
@pytest.fixture(scope="module")
def sft_checkpoint(workspace):
    """The nano model after a short SFT on thinking-mode reasoning traces (the r1 recipe's first stage)."""
    from dsv32.data.prepare import prepare
    from dsv32.train.config import TrainConfig
    from dsv32.train.loop import Trainer
    from dsv32.train.r1 import write_traces

    write_traces("arithmetic", 200, workspace / "traces.jsonl", 0, ONE_DIGIT)
    prepare([str(workspace / "traces.jsonl")], workspace / "tok", workspace / "sft_data", validation_fraction=0.05,
            thinking="thinking", show_progress=False)
    cfg = TrainConfig(stage="sft", out=str(workspace / "sft"), data=str(workspace / "sft_data"), tokenizer=str(workspace / "tok"),
                      init=str(workspace / "init"), seq_len=128, batch_size=8, steps=60, lr=5e-3, warmup_steps=5,
                      schedule="cosine", eval_every=1000, ckpt_every=1000, progress=False, plot=False)
    Trainer(cfg).run()
    return workspace / "sft" / "final"


def test_short_grpo_run_improves_reward(sft_checkpoint, tmp_path):
    cfg = grpo_config(Path(sft_checkpoint).parent.parent, tmp_path, init=str(sft_checkpoint), steps=12,
                      prompts_per_step=4, num_generations=4, micro_batch_size=16, max_completion_length=40,
                      train_prompts=200, eval_prompts=24, eval_every=12, lr=1e-3, ckpt_every=100,
                      rewards=["accuracy", "format"], reward_weights=[1.0, 1.0])
    GRPOTrainer(cfg).run()
    records = read_metrics(tmp_path / "metrics.jsonl")
    rewards = [r["reward"] for r in records if "reward" in r]
    early, late = sum(rewards[:4]) / 4, sum(rewards[-4:]) / 4
    # reward: mean over each step's 16 rollouts; held-out: greedy on 24 test problems
    assert late > early + 0.25, rewards
    assert records[-1]["val_format"] >= records[0]["val_format"] + 0.25, (records[0], records[-1])


# ---------------------------------------------------------------------- R1 traces, test-time scaling
def test_r1_traces_are_thinking_mode_reasoning(tmp_path):
    from dsv32.train.r1 import default_thinking_mode, reasoning_messages

    task = next(arithmetic.generate("train", 1, 0, min_digits=2, max_digits=2))
    *prompt, turn = reasoning_messages(task)
    assert prompt == task.prompt_messages()
    assert turn["content"] == f"Answer: {task.answer}"
    assert turn["reasoning_content"].startswith(f"Compute {task.meta['a']}") and "Answer:" not in turn["reasoning_content"]
    (tmp_path / "lineage.json").write_text(json.dumps({"stage": "grpo", "thinking_default": True}))
    assert default_thinking_mode(tmp_path) == "thinking" and default_thinking_mode(tmp_path / "none") == "chat"


def test_r1_direct_traces_skip_the_working_at_the_asked_fraction(tmp_path):
    from dsv32.train.r1 import DIRECT_REASONING, direct_choices, write_traces

    assert sum(direct_choices(50, 0.6, 0)) == 30 and direct_choices(50, 0.6, 0) == direct_choices(50, 0.6, 0)
    assert direct_choices(50, 0.6, 0) != direct_choices(50, 0.6, 1) and not any(direct_choices(9, 0.0, 0))
    with pytest.raises(ValueError, match="direct_fraction"):
        direct_choices(10, 1.5, 0)
    path = tmp_path / "traces.jsonl"
    assert write_traces("arithmetic", 40, path, 0, ONE_DIGIT, direct_fraction=0.25) == 40
    turns = [json.loads(line)["messages"][-1] for line in path.read_text().splitlines()]
    direct = [t for t in turns if t["reasoning_content"] == DIRECT_REASONING]
    assert len(direct) == 10 and all(t["content"].startswith("Answer: ") for t in direct)
    assert all(t["reasoning_content"].startswith("Compute ") for t in turns if t not in direct)
    # tool-use references keep their own reasoning whatever the fraction
    write_traces("tools", 6, path, 0, direct_fraction=1.0)
    assert not any(DIRECT_REASONING in line for line in path.read_text().splitlines())


def test_votes_verifiers_and_pass_at_k_by_hand():
    from dsv32.train.ttc import equation_score, final_answer, majority_vote, pass_at_k, scaling_curve  # noqa: F401

    assert majority_vote(["3", None, "4", "4", "3"]) == 0       # tie 2-2: the answer seen first
    assert majority_vote(["3", "4", "4"]) == 1 and majority_vote([None, None]) is None
    assert final_answer({"content": "Answer: 012.50"}, None) == "12.5"
    # worked-solution lines are checked after dropping "carry"/"borrow" and place names
    text = "ones: 7 + 8 + carry 0 = 15, write 5\ntens: 4 + 3 + carry 1 = 8\n47 * 3 (ones) = 141\n2 * 2 = 5"
    assert equation_score(text) == (3, 4)
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25) and pass_at_k(4, 1, 2) == pytest.approx(0.5)
    assert pass_at_k(4, 0, 4) == 0.0 and pass_at_k(4, 3, 2) == 1.0

    def sample(answer, correct, logprob):
        return {"answer": answer, "correct": correct, "mean_logprob": logprob, "message": {"content": ""}}

    # 4 samples: right answer "7" twice; the logprob verifier prefers sample 3 (wrong), then 1 (right)
    samples = [sample("7", True, -1.0), sample("5", False, -2.0), sample("7", True, -3.0), sample("9", False, -0.5)]
    curve = scaling_curve([{"task": None, "samples": samples, "verifier": "logprob"}], [1, 2, 4])
    assert curve[1]["mean"] == 0.5 and curve[1]["majority"] == 0.5   # chunks (7) (5) (7) (9)
    assert curve[2]["majority"] == 1.0                               # (7,5) and (7,9): ties, the first (7) wins
    assert curve[2]["best_of"] == 0.5                                # (7,5)->7 right; (7,9)->9 wrong
    assert curve[4]["majority"] == 1.0 and curve[4]["best_of"] == 0.0 and curve[4]["pass_at_k"] == 1.0

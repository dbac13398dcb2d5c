import json
import re

import numpy as np
import pytest
import torch

from dsv32.chat import encode_messages
from dsv32.data import PackedLoader, prepare, read_manifest, stdlib_documents, user_documents
from dsv32.data.corpus import stdlib_files, stdlib_root
from dsv32.data.loader import IGNORE_INDEX
from dsv32.data.tasks import KINDS, check, generate
from dsv32.data.tasks.python_funcs import extract_code, run_tests
from dsv32.data.tasks.tools import calculator, check_tool_calls, convert_units, day_of_week, run_tool
from dsv32.tokenizer import train_tokenizer


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer([d.text for d in stdlib_documents("train", limit=15)], 600, show_progress=False)


# ---------------------------------------------------------------- corpora


def test_stdlib_corpus_is_deterministic_deduplicated_and_split_by_file():
    train = [d.source for d in stdlib_documents("train")]
    validation = [d.source for d in stdlib_documents("validation")]
    assert train == [d.source for d in stdlib_documents("train")]
    assert train == sorted(train) and validation == sorted(validation)
    assert not set(train) & set(validation) and len(validation) > 0
    assert sorted(train + validation) == [d.source for d in stdlib_documents("all")]
    texts = [d.text for d in stdlib_documents("all")]
    assert len(set(texts)) == len(texts)
    assert any(src == "stdlib:json/decoder.py" for src in train + validation)
    assert not any("site-packages" in str(p) or "/test/" in str(p) for p in stdlib_files())
    assert "def " in next(d.text for d in stdlib_documents("all") if d.source == "stdlib:json/decoder.py")
    assert stdlib_root().is_dir()


def test_user_directory_corpus(tmp_path):
    (tmp_path / "a.txt").write_text("alpha text")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.md").write_text("# beta")
    (tmp_path / "sub" / "dup.py").write_text("alpha text")  # duplicate content: kept once
    (tmp_path / "ignored.bin").write_bytes(b"\x00\x01")
    (tmp_path / "c.jsonl").write_text(
        json.dumps({"text": "gamma"}) + "\n\n" + json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    docs = list(user_documents(tmp_path, split="all"))
    assert [d.text for d in docs if d.text] == ["alpha text", "gamma", "# beta"]
    assert [d.messages for d in docs if d.messages] == [[{"role": "user", "content": "hi"}]]
    train = list(user_documents(tmp_path, "train", 0.5))
    validation = list(user_documents(tmp_path, "validation", 0.5))
    assert len(train) + len(validation) == len(docs)


@pytest.mark.parametrize("line, message", [
    ("{not json", "invalid JSON"),
    ("[1, 2]", "expected a JSON object"),
    ('{"txt": "x"}', "'text' field or a non-empty 'messages'"),
    ('{"messages": [{"content": "x"}]}', "needs a 'role'"),
])
def test_bad_jsonl_lines_are_reported_with_file_and_line(tmp_path, line, message):
    path = tmp_path / "data.jsonl"
    path.write_text('{"text": "fine"}\n' + line + "\n")
    with pytest.raises(ValueError, match=re.escape(f"{path}:2: ") + ".*" + re.escape(message)):
        list(user_documents(path, "all"))


def test_missing_and_unsupported_corpus_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list(user_documents(tmp_path / "missing"))
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(ValueError, match="unsupported file type"):
        list(user_documents(tmp_path / "x.csv"))


# ---------------------------------------------------------------- tasks


def _perturb(task, response: str) -> str:
    """A wrong response of the same shape: a different final answer, or broken code."""
    if task.kind == "python":
        function = task.meta["function"]
        wrapper = f"\n_real = {function}\ndef {function}(*args):\n    return ['perturbed', _real(*args)]\n"
        return f"```python\n{extract_code(response)}{wrapper}```"
    answer = task.answer
    if answer.lstrip("-").isdigit():
        wrong = str(int(answer) + 1)
    else:
        wrong = answer + "x"
    return response.rsplit("Answer:", 1)[0] + f"Answer: {wrong}"


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_checkers_accept_their_own_solutions_and_reject_perturbed_ones(kind):
    tasks = list(generate(kind, "train", 6 if kind == "python" else 40, seed=3))
    for task in tasks:
        assert check(task, task.solution), task.prompt
        assert not check(task, _perturb(task, task.solution)), task.prompt
        assert not check(task, "I don't know.")


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_generators_are_deterministic_and_splits_never_overlap(kind):
    first = [t.prompt for t in generate(kind, "train", 60, seed=1)]
    assert first == [t.prompt for t in generate(kind, "train", 60, seed=1)]
    assert first != [t.prompt for t in generate(kind, "train", 60, seed=2)]
    assert len(set(first)) == len(first)
    held_out = {t.prompt for seed in (1, 2) for t in generate(kind, "test", 30, seed=seed)}
    validation = {t.prompt for t in generate(kind, "validation", 30, seed=1)}
    training = {t.prompt for seed in (1, 2, 3) for t in generate(kind, "train", 60, seed=seed)}
    assert not held_out & training and not validation & training and not held_out & validation


def test_arithmetic_worked_solution_shows_carries():
    task = next(t for t in generate("arithmetic", "train", 200) if t.meta["op"] == "+" and "carry 1" in t.solution)
    a, b = task.meta["a"], task.meta["b"]
    assert task.solution.startswith(f"Compute {a} + {b}.")
    assert task.solution.endswith(f"Answer: {a + b}")


def test_task_conversations_render_in_the_chat_format():
    for kind in KINDS:
        task = next(generate(kind, "train", 1))
        prompt = encode_messages(task.messages(), "chat")
        assert task.prompt in prompt and prompt.endswith("<｜end▁of▁sentence｜>")
    tool_task = next(generate("tool_use", "train", 1))
    assert "<｜DSML｜invoke name=" in encode_messages(tool_task.messages(), "thinking")


def test_tools_really_compute():
    assert calculator("(12 + 7) * 3") == "57" and calculator("7 / 2") == "3.5" and calculator("2 ** 10") == "1024"
    assert convert_units(100, "C", "F") == "212" and convert_units(1, "mi", "km") == "1.61"
    assert day_of_week("2024-01-16") == "Tuesday"
    assert run_tool("calculator", '{"expression": "__import__(\'os\').system(\'x\')"}').startswith("error:")
    assert run_tool("calculator", {"expression": "1/0"}) == "error: division by zero"
    assert run_tool("nope", "{}").startswith("error: unknown tool")
    assert run_tool("convert_units", {"value": 1, "from_unit": "kg", "to_unit": "km"}).startswith("error:")


def test_tool_call_checker_runs_the_calls():
    task = next(generate("tool_use", "train", 1, seed=5))
    reference_calls = task.reference_messages[0]["tool_calls"]
    assert check_tool_calls(task, reference_calls)
    wrong = [{"function": {"name": task.meta["tool"], "arguments": "{}"}}]
    assert not check_tool_calls(task, wrong) and not check_tool_calls(task, None)


def test_python_checker_is_not_fooled():
    tests = [{"args": [2], "expected": 4}, {"args": [3], "expected": 6}]
    assert run_tests("def double(x):\n    return 2 * x\n", "double", tests)
    assert not run_tests("def double(x):\n    return x + 2\n", "double", tests)
    assert not run_tests("print('PASSED 2')\nimport os\nos._exit(0)\n", "double", tests)
    always_equal = "class E:\n    def __eq__(self, o): return True\n    def __ne__(self, o): return False\ndef double(x):\n    return E()\n"
    assert not run_tests(always_equal, "double", tests)
    assert not run_tests("def double(x):\n    while True: pass\n", "double", tests, timeout=1.0)


# ---------------------------------------------------------------- shards and loader


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tok):
    corpus = tmp_path_factory.mktemp("corpus")
    for i, doc in enumerate(stdlib_documents("all", limit=30)):
        (corpus / f"doc{i:02d}.py").write_text(doc.text[:3000])
    out = tmp_path_factory.mktemp("shards")
    manifest = prepare([str(corpus), "tasks:arithmetic:40", "tasks:tool_use:10"], tok, out,
                       validation_fraction=0.2, shard_tokens=4000, show_progress=False)
    return out, manifest


def test_prepare_writes_shards_and_a_manifest(prepared, tok):
    out, manifest = prepared
    assert read_manifest(out) == manifest
    assert manifest["tokenizer"]["fingerprint"] == tok.fingerprint and manifest["dtype"] == "uint16"
    train = manifest["splits"]["train"]
    assert len(train["shards"]) > 2  # small shard size forces several
    assert train["num_tokens"] == sum(s["num_tokens"] for s in train["shards"])
    assert train["num_documents"] == sum(s["documents"]["train"] for s in manifest["sources"])
    assert manifest["splits"]["validation"]["num_documents"] > 0
    first = train["shards"][0]
    tokens = np.fromfile(out / first["tokens"], dtype=np.uint16)
    starts = np.fromfile(out / first["starts"], dtype=np.int64)
    mask = np.fromfile(out / first["mask"], dtype=np.uint8)
    assert len(tokens) == first["num_tokens"] and (tokens[starts] == tok.bos_id).all() and (mask[starts] == 0).all()
    doc = tokens[starts[0]: starts[1]]
    assert doc[-1] == tok.eos_id and tok.decode(doc[1:-1].tolist()).startswith(tok.decode(doc[1:4].tolist()))


def test_chat_documents_only_train_on_assistant_tokens(prepared, tok):
    out, manifest = prepared
    found = False
    for shard in manifest["splits"]["train"]["shards"]:
        tokens = np.fromfile(out / shard["tokens"], dtype=np.uint16)
        mask = np.fromfile(out / shard["mask"], dtype=np.uint8)
        starts = list(np.fromfile(out / shard["starts"], dtype=np.int64)) + [len(tokens)]
        for a, b in zip(starts, starts[1:]):
            text = tok.decode(tokens[a:b].tolist())
            if text.startswith("<｜begin▁of▁sentence｜><｜User｜>What is"):
                trained = tok.decode(tokens[a:b][mask[a:b] == 1].tolist())
                assert trained.startswith("Compute ") and trained.endswith("<｜end▁of▁sentence｜>")
                assert "What is" not in trained
                found = True
    assert found


def test_loader_batches_pack_documents_with_boundaries(prepared, tok):
    out, _ = prepared
    loader = PackedLoader(out, "train", seq_len=64, batch_size=4, tokenizer=tok)
    batch = next(loader)
    ids, labels, starts, positions = batch["input_ids"], batch["labels"], batch["doc_starts"], batch["position_ids"]
    assert ids.shape == labels.shape == starts.shape == positions.shape == (4, 64)
    assert ids.dtype == labels.dtype == positions.dtype == torch.long and starts.dtype == torch.bool
    assert starts[:, 0].all()
    # every document begins with BOS, so starts (after position 0) are exactly the BOS positions
    assert torch.equal(starts[:, 1:], ids[:, 1:] == tok.bos_id)
    # labels are the next input token wherever they are trained
    trained = labels[:, :-1] != IGNORE_INDEX
    assert torch.equal(labels[:, :-1][trained], ids[:, 1:][trained])
    assert (labels[:, :-1][ids[:, 1:] == tok.bos_id] == IGNORE_INDEX).all()  # never predict across documents
    segment = torch.cumsum(starts.long(), dim=1)
    for row in range(4):
        for seg in segment[row].unique():
            pos = positions[row][segment[row] == seg]
            assert torch.equal(pos, torch.arange(len(pos)))


def _take(loader, n):
    return [next(loader) for _ in range(n)]


def _same(a, b):
    return all(torch.equal(x[k], y[k]) for x, y in zip(a, b) for k in x)


def test_loader_resumes_exactly_from_state_dict(prepared):
    out, _ = prepared
    make = lambda: PackedLoader(out, "train", seq_len=32, batch_size=3, seed=7)
    reference = make()
    per_epoch = len(reference)
    assert per_epoch > 3
    steps = per_epoch - 2  # resume point two batches before an epoch boundary
    _take(reference, steps)
    state = json.loads(json.dumps(reference.state_dict()))  # survives a JSON checkpoint
    expected = _take(reference, 5)  # crosses into the next epoch

    resumed = make()
    resumed.load_state_dict(state)
    assert _same(_take(resumed, 5), expected)
    fresh = make()
    assert not _same(_take(fresh, 5), expected)
    # a new epoch is a new order
    first_epoch = _take(make(), per_epoch)
    second = make()
    _take(second, per_epoch)
    assert not _same(_take(second, 3), first_epoch[:3])


def test_ranks_get_disjoint_windows_of_equal_count(prepared):
    out, _ = prepared
    loaders = [PackedLoader(out, "train", seq_len=32, batch_size=2, rank=r, world_size=3, seed=1) for r in range(3)]
    assert len({len(l) for l in loaders}) == 1
    windows = [set(l._rank_order().tolist()) for l in loaders]
    assert not (windows[0] & windows[1]) and not (windows[1] & windows[2]) and not (windows[0] & windows[2])
    n = loaders[0].num_windows
    assert sum(map(len, windows)) == 3 * len(loaders[0]) * 2 > n - 3 * 2 * 2  # at most a batch per rank dropped
    assert set().union(*windows) <= set(range(n))
    batches = _take(loaders[1], len(loaders[1]))
    order = loaders[1]._rank_order()
    assert torch.equal(batches[-1]["input_ids"], loaders[1].batch(order[-2:])["input_ids"])


def test_loader_rejects_mismatches(prepared, tmp_path):
    out, _ = prepared
    other = train_tokenizer(["something else entirely"] * 3, 300, show_progress=False)
    with pytest.raises(ValueError, match="different tokenizer"):
        PackedLoader(out, "train", tokenizer=other)
    with pytest.raises(ValueError, match="no 'test' split"):
        PackedLoader(out, "test")
    with pytest.raises(ValueError, match="too few"):
        PackedLoader(out, "validation", seq_len=100000, batch_size=8)
    loader = PackedLoader(out, "train", seq_len=32, batch_size=2)
    with pytest.raises(ValueError, match="cannot resume"):
        loader.load_state_dict({**loader.state_dict(), "seq_len": 64})
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        PackedLoader(tmp_path, "train")


def test_damaged_shards_are_detected(prepared, tmp_path):
    import shutil

    out, manifest = prepared
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    shard = copy / manifest["splits"]["train"]["shards"][0]["tokens"]
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(ValueError, match="does not match the manifest"):
        PackedLoader(copy, "train")


def test_prepare_rejects_bad_input(tmp_path, tok):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no training documents"):
        prepare([str(empty)], tok, tmp_path / "out", show_progress=False)
    with pytest.raises(ValueError, match="tasks:KIND:N"):
        prepare(["tasks:arithmetic"], tok, tmp_path / "out2", show_progress=False)
    bad_chat = tmp_path / "chat.jsonl"
    bad_chat.write_text(json.dumps({"messages": [{"role": "tool", "content": "x"}]}) + "\n")
    with pytest.raises(ValueError, match=re.escape(f"{bad_chat}:1: message 0")):
        prepare([str(bad_chat)], tok, tmp_path / "out3", validation_fraction=0.0, show_progress=False)


def test_cli_prepare_and_overwrite(tmp_path, tok, capsys):
    from dsv32.cli import main

    tok.save(tmp_path / "tok")
    args = ["data", "prepare", "--tokenizer", str(tmp_path / "tok"), "--source", "tasks:word_problem:30",
            "--out", str(tmp_path / "data"), "--no-progress"]
    assert main(args) == 0
    assert "train:" in capsys.readouterr().out
    assert main(args) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "--overwrite" in err
    assert main(args + ["--overwrite"]) == 0
    assert main(["data", "tasks", "--kind", "arithmetic", "-n", "3", "--out", str(tmp_path / "t.jsonl")]) == 0
    lines = (tmp_path / "t.jsonl").read_text().splitlines()
    assert len(lines) == 3 and json.loads(lines[0])["kind"] == "arithmetic"
    assert main(["data", "tasks", "--kind", "poetry"]) == 1
    assert "unknown task kind" in capsys.readouterr().err

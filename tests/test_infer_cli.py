"""`dsv32 generate` and `dsv32 chat`: output equals the engine's, the chat loop's commands and exits."""
import io
import os
import pty
import select
import signal
import sys
import time

import pytest
import torch

from dsv32.chat import parse_completion, tokenize_messages
from dsv32.checkpoint import save_pretrained
from dsv32.cli import main
from dsv32.infer import Engine, SamplingParams
from dsv32.infer.cli import ChatSession
from infer_common import nano_model, single_thread, tiny_tokenizer  # noqa: F401


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("nano_ckpt")
    save_pretrained(nano_model(), d, dtype=torch.float32)
    tiny_tokenizer().save(d)
    return str(d)


def engine_text(ids, max_tokens, skip_special):
    eng = Engine(nano_model(), max_batch=1, max_seq_len=1024, tokenizer=tiny_tokenizer())
    return eng.complete(ids, SamplingParams(max_tokens=max_tokens, temperature=0, skip_special_tokens=skip_special))[0]


def test_generate_raw_streams_the_engine_output(ckpt, capsys):
    assert main(["generate", "--model", ckpt, "--prompt", "Hello world", "--raw", "--max-tokens", "12",
                 "--temperature", "0", "--stats"]) == 0
    captured = capsys.readouterr()
    tok = tiny_tokenizer()
    want = engine_text([tok.bos_id] + tok.encode("Hello world"), 12, skip_special=True)
    assert captured.out == want.text + "\n"
    assert "prompt tokens" in captured.err and "tokens/s" in captured.err


@pytest.mark.parametrize("thinking", [False, True])
def test_generate_with_the_chat_template(ckpt, capsys, thinking):
    argv = ["generate", "--model", ckpt, "--prompt", "What is 2+2?", "--max-tokens", "16", "--temperature", "0",
            "--speculative"]
    assert main(argv + (["--thinking"] if thinking else [])) == 0
    captured = capsys.readouterr()
    mode = "thinking" if thinking else "chat"
    ids = tokenize_messages([{"role": "user", "content": "What is 2+2?"}], tiny_tokenizer(), thinking_mode=mode)
    parsed = parse_completion(engine_text(ids, 16, skip_special=False).text, mode)
    assert captured.out == parsed["content"] + "\n"
    if thinking:  # not a terminal: the reasoning goes to stderr, the answer alone to stdout
        assert parsed["reasoning_content"] and parsed["reasoning_content"] in captured.err


@pytest.mark.parametrize("select", ["majority", "best"])
def test_generate_samples_prints_the_majority_or_best_of_k_reply(ckpt, capsys, select):
    from dsv32.train.ttc import sample_and_vote

    argv = ["generate", "--model", ckpt, "--prompt", "What is 2+2?", "--max-tokens", "8", "--samples", "5",
            "--seed", "3", "--select", select]
    assert main(argv) == 0
    captured = capsys.readouterr()
    eng = Engine(nano_model(), max_batch=5, max_seq_len=1024, tokenizer=tiny_tokenizer())
    params = SamplingParams(max_tokens=8, temperature=1.0, top_p=0.95, seed=3)
    want = sample_and_vote(eng, tiny_tokenizer(), [{"role": "user", "content": "What is 2+2?"}], 5, params,
                           thinking_mode="chat", verifier="steps")
    reply = want["reply"] if select == "majority" else want["best_reply"]
    assert captured.out == (reply.get("content") or "") + "\n"
    assert f"votes {want['votes']}" in captured.err and sum(want["votes"].values()) <= 5
    assert len(want["replies"]) == 5 and len({r.get("content") for r in want["replies"]}) > 1  # really sampled


def test_generate_samples_errors(ckpt, capsys):
    base = ["generate", "--model", ckpt, "--prompt", "x"]
    assert main(base + ["--samples", "0"]) == 1
    assert main(base + ["--samples", "3", "--temperature", "0"]) == 1
    assert main(base + ["--samples", "3", "--raw"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and "at least 1" in err[0] and "temperature" in err[1] and "--raw" in err[2]


def test_generate_errors_are_one_line(ckpt, tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path / "missing"), "--prompt", "x"]) == 1
    assert main(["generate", "--model", ckpt, "--prompt", "x", "--dtype", "fp7"]) == 1
    assert main(["generate", "--model", ckpt, "--prompt", "x", "--top-p", "0"]) == 1
    assert main(["generate", "--model", ckpt, "--prompt", "x", "--max-seq-len", "99999"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 4 and all(line.startswith("dsv32 generate: error:") for line in err)
    assert "missing" in err[0] and "fp7" in err[1] and "top_p" in err[2] and "max-seq-len" in err[3]


# ---------------------------------------------------------------------- the chat loop
class Lines:
    """A fake `input`: returns the lines in order, then raises EOFError (Ctrl-D) or the given exception."""

    def __init__(self, lines, end=EOFError):
        self.lines, self.end, self.prompts = list(lines), end, 0

    def __call__(self, prompt=""):
        self.prompts += 1
        if not self.lines:
            raise self.end()
        return self.lines.pop(0)


def session(**kw):
    eng = Engine(nano_model(), max_batch=1, max_seq_len=1024, tokenizer=tiny_tokenizer())
    params = SamplingParams(max_tokens=8, temperature=0, skip_special_tokens=False)
    out = io.StringIO()
    return ChatSession(eng, tiny_tokenizer(), params, out=out, **kw), out


def test_chat_keeps_history_toggles_thinking_resets_and_exits_on_eof():
    chat, out = session()
    assert chat.run(Lines(["hello", "how are you?", "/think", "and now?"])) == 0
    assert [m["role"] for m in chat.history] == ["user", "assistant"] * 3
    assert chat.thinking and "(thinking on)" in out.getvalue()
    assert chat.history[-1]["reasoning_content"]  # a thinking-mode turn: the reply started with reasoning
    # the second turn's prompt started with the first turn: served from the prefix cache
    assert chat.engine.stats()["cached_prompt_tokens"] > 0
    assert chat.run(Lines(["/reset", "/stats", "/bogus", "/help", "/exit", "never read"])) == 0
    text = out.getvalue()
    assert chat.history == [] and "(history cleared)" in text and "unknown command /bogus" in text


def test_chat_ctrl_c_at_the_prompt_exits_cleanly():
    chat, _ = session()
    assert chat.run(Lines(["hi"], end=KeyboardInterrupt)) == 0
    assert len(chat.history) == 2


def test_chat_ctrl_c_while_generating_drops_the_turn_and_continues(monkeypatch):
    chat, out = session()
    real_step, calls = chat.engine.step, [0]

    def interrupted_step():
        calls[0] += 1
        if calls[0] == 3:
            raise KeyboardInterrupt
        return real_step()

    monkeypatch.setattr(chat.engine, "step", interrupted_step)
    assert chat.run(Lines(["first", "second"])) == 0
    assert "(interrupted)" in out.getvalue()
    assert [m["content"] for m in chat.history if m["role"] == "user"] == ["second"]
    assert not chat.engine.has_unfinished() and chat.engine.cache.pool.num_used == 0


def _read_until(fd, needle: bytes, timeout: float) -> bytes:
    buf, end = b"", time.monotonic() + timeout
    while needle not in buf:
        left = end - time.monotonic()
        if left <= 0:
            raise AssertionError(f"timed out waiting for {needle!r}; got {buf[-300:]!r}")
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                break
            if not chunk:
                break
            buf += chunk
    return buf


def test_chat_in_a_terminal_dims_reasoning_and_exits_on_ctrl_c(ckpt):
    """The real command on a pty (its controlling terminal): a thinking reply is dimmed, and Ctrl-C at
    the prompt, delivered by the terminal as SIGINT, exits with status 0."""
    argv = [sys.executable, "-m", "dsv32.cli", "chat", "--model", ckpt, "--thinking", "--max-tokens", "6",
            "--temperature", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    pid, fd = pty.fork()
    if pid == 0:  # the child: exec the CLI with the pty as its controlling terminal
        # a user's shell starts programs with SIGINT at its default; an ignored SIGINT would be inherited
        # through exec and Python would then leave it ignored
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.execve(sys.executable, argv, env)
    try:
        _read_until(fd, b"> ", timeout=120)
        os.write(fd, b"hello\r")
        reply = _read_until(fd, b"> ", timeout=120)
        assert b"\x1b[2m" in reply  # reasoning shown dimmed
        # Ctrl-C at the prompt. CPython's readline loop can miss a SIGINT that lands between printing the
        # prompt and entering its select() (the flag is only checked when select is interrupted), so a
        # user's first Ctrl-C may need a second one; the test presses again every 5 s, as a user would.
        end, next_press, seen = time.monotonic() + 60, 0.0, b""
        while True:
            if time.monotonic() >= next_press:
                os.write(fd, b"\x03")
                next_press = time.monotonic() + 5
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            assert time.monotonic() < end, f"chat did not exit after Ctrl-C; it printed {seen[-400:]!r}"
            seen += _drain(fd)
            time.sleep(0.05)
        assert os.waitstatus_to_exitcode(status) == 0
        pid = 0
    finally:
        if pid:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
        os.close(fd)


def _drain(fd) -> bytes:
    out = b""
    while select.select([fd], [], [], 0)[0]:
        try:
            chunk = os.read(fd, 4096)
            if not chunk:
                return out
            out += chunk
        except OSError:
            return out
    return out


def test_generate_serves_an_fp8_checkpoint_by_dequantising(tmp_path, capsys):
    d = tmp_path / "fp8"
    save_pretrained(nano_model(), d, fp8=True)
    tiny_tokenizer().save(d)
    assert main(["generate", "--model", str(d), "--prompt", "Hello", "--raw", "--max-tokens", "6", "--temperature", "0",
                 "--stats"]) == 0
    captured = capsys.readouterr()
    assert "6 generated" in captured.err and captured.out.endswith("\n")


@pytest.mark.parametrize("command", ["generate", "chat", "serve"])
def test_compile_flag_reaches_the_engine(command):
    """`--compile` is one of the shared engine options, so generate, chat and serve all pass it on."""
    from dsv32.cli import build_parser
    from dsv32.infer.cli import engine_options

    base = [command, "--model", "m"] + (["--prompt", "hi"] if command == "generate" else [])
    assert engine_options(build_parser().parse_args(base + ["--compile"]))["compile"] is True
    assert engine_options(build_parser().parse_args(base))["compile"] is False

"""`dsv32 serve` as a process: clean shutdown with a stream in flight, and one-line CLI errors."""
from __future__ import annotations

import signal
import socket
import threading
import time

import httpx
import pytest

from serve_common import ServerProcess, write_checkpoint


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("serve-cli"))


def test_sigterm_ends_streams_cleanly_and_exits_zero(model_dir):
    srv = ServerProcess(model_dir, "--shutdown-timeout", "0.5", "--max-seq-len", "1024")
    events, first = [], threading.Event()

    def stream():
        body = {"messages": [{"role": "user", "content": "go on forever"}], "max_tokens": 1000, "temperature": 0,
                "ignore_eos": True, "stream": True}
        with httpx.stream("POST", srv.url + "/v1/chat/completions", json=body, timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                    first.set()

    t = threading.Thread(target=stream)
    t.start()
    try:
        assert first.wait(60)
        time.sleep(0.2)
        t0 = time.monotonic()
        assert srv.stop(signal.SIGTERM, timeout=30) == 0, "".join(srv.lines)
        assert time.monotonic() - t0 < 15
    finally:
        t.join(30)
    # the cancelled stream ended properly: an error event saying why, then [DONE]
    assert events[-1] == "[DONE]"
    assert '"error"' in events[-2] and "shutting down" in events[-2]
    with pytest.raises(httpx.ConnectError):
        httpx.get(srv.url + "/health", timeout=5)


def test_cli_errors_are_one_line(model_dir, tmp_path, capsys):
    from dsv32.cli import main

    assert main(["serve", "--model", str(tmp_path / "nope")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no such checkpoint" in err
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    try:
        assert main(["serve", "--model", model_dir, "--port", str(busy.getsockname()[1])]) == 1
    finally:
        busy.close()
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot listen" in err
    assert main(["serve", "--model", model_dir, "--port", "70000"]) == 1
    assert "--port" in capsys.readouterr().err


def test_speculative_engine_behind_the_app(model_dir):
    """The app over a real engine with MTP speculation: greedy output equals plain decoding, and
    the acceptance counters reach /metrics."""
    from dsv32.checkpoint import load_pretrained
    from dsv32.infer import Engine
    from dsv32.serve.app import create_app
    from dsv32.tokenizer import Tokenizer
    from serve_common import InProcessServer, metric_value

    tok = Tokenizer.load(model_dir)
    outputs = {}
    for speculative in (False, True):
        engine = Engine(load_pretrained(model_dir), max_batch=4, max_seq_len=256, speculative=speculative,
                        tokenizer=tok)
        srv = InProcessServer(create_app(engine, tok, model_name="spec"))
        try:
            body = {"messages": [{"role": "user", "content": "count"}], "max_tokens": 12, "temperature": 0}
            r = httpx.post(srv.url + "/v1/chat/completions", json=body, timeout=60).json()
            outputs[speculative] = r["choices"][0]["message"]["content"]
            text = httpx.get(srv.url + "/metrics", timeout=30).text
            drafted = metric_value(text, "dsv32:spec_decode_num_draft_tokens_total")
            assert (drafted > 0) == speculative
        finally:
            srv.close()
    assert outputs[True] == outputs[False]

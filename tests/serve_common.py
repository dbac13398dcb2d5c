"""Shared pieces of the server tests (test_serve_*.py): a small checkpoint, real servers on
127.0.0.1 with an ephemeral port (a `dsv32 serve` subprocess, or uvicorn in a thread for an app
built here), and a scripted stand-in for the engine.

The scripted engine exists because a randomly initialised model does not decide to call tools:
it replays a completion chosen from the prompt, token by token, through the real app, engine loop,
chat parser and SSE code, so the tool-call and reasoning wire formats can be checked end to end.
"""
from __future__ import annotations

import functools
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from types import SimpleNamespace

import httpx
import torch

from dsv32 import ModelConfig, Transformer
from dsv32.chat import encode_messages, with_tools
from dsv32.checkpoint import save_pretrained
from dsv32.infer.engine import RequestOutput, Usage
from dsv32.tokenizer import EOS, train_tokenizer

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city.",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string"}, "days": {"type": "integer"}, "unit": {"enum": ["c", "f"]}},
        "required": ["city", "days"]}}}
TIME_TOOL = {"type": "function", "function": {
    "name": "get_time", "description": "Local time.",
    "parameters": {"type": "object", "properties": {"tz": {"type": "string"}}, "required": ["tz"]}}}
TOOLS = [WEATHER_TOOL, TIME_TOOL]


@functools.cache
def small_tokenizer():
    """A 512-id BPE trained on a few stdlib files and on rendered chat prompts, so that the V3.2
    template (tools section, DSML tags) costs few tokens in the nano model's 1024-token context."""
    from dsv32.data.corpus import stdlib_documents

    texts = [d.text for d in stdlib_documents("train", limit=8)]
    convo = [{"role": "user", "content": "What is the weather in Paris?"},
             {"role": "assistant", "content": "", "reasoning_content": "Call the tool.",
              "tool_calls": [{"type": "function", "function": {"name": "get_weather",
                                                               "arguments": '{"city": "Paris", "days": 2}'}}]},
             {"role": "tool", "content": "sunny"},
             {"role": "assistant", "content": "It is sunny.", "reasoning_content": "Easy."}]
    for mode in ("thinking", "chat"):
        texts += [encode_messages(with_tools(convo, TOOLS), mode)] * 30
    return train_tokenizer(texts, 512, show_progress=False)


def write_checkpoint(out_dir, seed: int = 0, std: float = 0.08) -> str:
    """A random nano checkpoint with the test tokenizer (std 0.08: greedy has clear winners)."""
    torch.manual_seed(seed)
    model = Transformer(ModelConfig.preset("nano").replace(initializer_range=std)).eval()
    save_pretrained(model, out_dir)
    small_tokenizer().save(out_dir)
    return str(out_dir)


# ---------------------------------------------------------------------- servers
class ServerProcess:
    """`dsv32 serve --model DIR --port 0 ...` in a subprocess; `.url` once it listens."""

    def __init__(self, model_dir: str, *args: str, timeout: float = 90):
        cmd = [sys.executable, "-m", "dsv32.cli", "serve", "--model", model_dir, "--port", "0", *args]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        self.lines: list[str] = []
        self._ready: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        try:
            self.url = self._ready.get(timeout=timeout)
        except queue.Empty:
            self.proc.kill()
            raise RuntimeError("server did not start:\n" + "".join(self.lines)) from None
        if self.url is None:
            raise RuntimeError("server exited:\n" + "".join(self.lines))

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)
            if "listening on " in line:
                self._ready.put(line.split("listening on ", 1)[1].strip())
        self._ready.put(None)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise
        return self.proc.returncode


class InProcessServer:
    """uvicorn serving `app` in a thread, on 127.0.0.1 and an ephemeral port."""

    def __init__(self, app):
        import uvicorn

        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("in-process server did not start")
            time.sleep(0.02)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def sse_events(response: httpx.Response) -> list:
    """The data payloads of an SSE response: parsed JSON objects, and the string "[DONE]"."""
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: "):]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def metric_value(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(name)


# ---------------------------------------------------------------------- the scripted engine
class ScriptedEngine:
    """The engine's serving interface (`add_request`, `step`, `abort`, `has_unfinished`, `stats`,
    `max_batch`, `max_seq_len`, `cfg`, `eos_ids`) replaying scripted completions.

    `script(prompt_text)` returns the completion text (special tokens written out, e.g. DSML tags);
    it is tokenized and emitted one token per step, then EOS. Stop strings, stop tokens and
    max_tokens behave as in the real engine. A completion containing "<FAIL>" makes `step()` raise
    when it gets there. `step_delay` slows every step down (seconds).
    """

    def __init__(self, tokenizer, script, *, max_batch: int = 4, max_seq_len: int = 4096, step_delay: float = 0.0):
        self.tok = tokenizer
        self.script = script
        self.max_batch, self.max_seq_len = max_batch, max_seq_len
        self.step_delay = step_delay
        self.cfg = SimpleNamespace(vocab_size=tokenizer.vocab_size, num_hidden_layers=2,
                                   is_moe_layer=lambda i: i >= 1)
        self.eos_ids = {tokenizer.special_ids[EOS]}
        self.waiting: deque = deque()
        self.running: list = []
        self.requests: dict = {}
        self.prompt_tokens = 0

    def add_request(self, prompt_ids, params, request_id=None):
        prompt = list(prompt_ids)
        if not prompt:
            raise ValueError("the prompt is empty")
        if len(prompt) >= self.max_seq_len:
            raise ValueError("prompt too long")
        text = self.script(self.tok.decode(prompt))
        fail_at = None
        if "<FAIL>" in text:
            head = text.split("<FAIL>")[0]
            fail_at = len(self.tok.encode(head, allow_special=True))
            text = head + "x" * 8
        ids = self.tok.encode(text, allow_special=True) + [self.tok.special_ids[EOS]]
        req = SimpleNamespace(id=request_id, prompt=prompt, params=params, ids=ids, pos=0, out=[], text="", sent=0,
                              detok=self.tok.detokenizer(skip_special=params.skip_special_tokens), fail_at=fail_at,
                              finish=None, stop_reason=None)
        self.requests[request_id] = req
        self.waiting.append(req)
        self.prompt_tokens += len(prompt)
        return request_id

    def has_unfinished(self):
        return bool(self.waiting or self.running)

    def abort(self, request_id):
        req = self.requests.pop(request_id, None)
        if req is None:
            return None
        if req in self.running:
            self.running.remove(req)
        if req in self.waiting:
            self.waiting.remove(req)
        return RequestOutput(request_id, [], finished=True, finish_reason="abort", usage=self._usage(req))

    def _usage(self, req):
        return Usage(len(req.prompt), len(req.out), 0)

    def step(self):
        if self.step_delay:
            time.sleep(self.step_delay)
        while self.waiting and len(self.running) < self.max_batch:
            self.running.append(self.waiting.popleft())
        outputs = []
        for req in list(self.running):
            if req.fail_at is not None and req.pos >= req.fail_at:
                raise RuntimeError("scripted failure")
            token = req.ids[req.pos]
            req.pos += 1
            new = []
            if len(req.out) >= req.params.max_tokens:
                req.finish = "length"
            else:
                req.out.append(token)
                new = [token]
                if token in self.eos_ids and not req.params.ignore_eos or token in req.params.stop_token_ids:
                    req.finish, req.stop_reason = "stop", token
                else:
                    req.text += req.detok.push([token])
                    for s in req.params.stop:
                        at = req.text.find(s)
                        if at >= 0:
                            req.text = req.text[: at + (len(s) if req.params.include_stop_str_in_output else 0)]
                            req.finish, req.stop_reason = "stop", s
                            break
                if req.finish is None and (len(req.out) >= req.params.max_tokens or req.pos >= len(req.ids)):
                    req.finish = "length"
            end = len(req.text)
            if req.finish is None:  # hold back text that may still become a stop string, as the engine does
                for stop in req.params.stop:
                    for n in range(min(len(stop) - 1, len(req.text)), 0, -1):
                        if stop.startswith(req.text[-n:]):
                            end = min(end, len(req.text) - n)
                            break
            text = req.text[req.sent:end]
            req.sent = max(req.sent, end)
            outputs.append(RequestOutput(req.id, new, text, finished=req.finish is not None,
                                         finish_reason=req.finish, stop_reason=req.stop_reason, usage=self._usage(req)))
            if req.finish is not None:
                self.running.remove(req)
                self.requests.pop(req.id, None)
        return outputs

    def stats(self):
        return {"running": len(self.running), "waiting": len(self.waiting), "cache_blocks_used": len(self.running),
                "cache_blocks_total": 64, "cache_blocks_cached": 0, "prompt_tokens": self.prompt_tokens,
                "cached_prompt_tokens": 0, "preemptions": 0, "speculative": None,
                "expert_load": {"tokens_per_expert": [[3, 0, 5]], "starved_experts": [[1]], "max_over_mean": [1.875]}}

"""Wire formats that need a model which actually decides to call tools or to think: the real app,
engine loop, chat parser and SSE code, over real HTTP, with the scripted engine of serve_common
standing in for the model (its completions are fixed by the prompt).

Covers: tool_choice auto with parallel calls (streaming deltas, the openai client's own stream
accumulator, non-streaming equality), the thinking agent loop (reasoning -> calls -> results ->
reasoning -> answer, each part in its field), a long string argument streamed in fragments (auto,
required, named; cut by max_tokens), tool_choice none, a named call's string argument,
malformed markup, n > 1 streams, an engine failure after the stream started (error event + [DONE]),
and 503 when the queue is full.
"""
from __future__ import annotations

import json
import threading
import time

import httpx
import openai
import pytest

from dsv32.serve.app import create_app
from serve_common import TOOLS, InProcessServer, ScriptedEngine, metric_value, sse_events, small_tokenizer

D = "｜DSML｜"
CALLS = (f'\n\n<{D}function_calls>\n<{D}invoke name="get_weather">\n'
         f'<{D}parameter name="city" string="true">杭州 (Hangzhou)</{D}parameter>\n'
         f'<{D}parameter name="days" string="false">3</{D}parameter>\n</{D}invoke>\n'
         f'<{D}invoke name="get_time">\n<{D}parameter name="tz" string="true">Asia/Shanghai</{D}parameter>\n'
         f'</{D}invoke>\n</{D}function_calls>')
EXPECTED_CALLS = [("get_weather", {"city": "杭州 (Hangzhou)", "days": 3}), ("get_time", {"tz": "Asia/Shanghai"})]
RUN_TOOL = {"type": "function", "function": {
    "name": "run_python", "description": "Run a Python program.",
    "parameters": {"type": "object", "properties": {"code": {"type": "string"}}, "required": ["code"]}}}
PROGRAM = 'for city in ["Paris", "杭州"]:\n\tprint(f"{city}: \\"sunny\\"")  # </tag> <｜x\n' * 6


def script(prompt: str) -> str:
    """The scripted model: what it 'writes' after each kind of prompt."""
    if prompt.endswith('<｜DSML｜parameter name="tz" string="true">'):  # constrained: the raw string argument
        return f"Asia/Tokyo</{D}parameter>\n</{D}invoke>\n</{D}function_calls>"
    if prompt.endswith('<｜DSML｜parameter name="code" string="true">'):
        return f"{PROGRAM}</{D}parameter>\n</{D}invoke>\n</{D}function_calls>"
    thinking = prompt.endswith("<think>")
    last = prompt.rsplit("<｜User｜>", 1)[-1]
    if "</function_results>" in last:
        return ("The results say 25 degrees.</think>" if thinking else "") + "It is 25 degrees in Hangzhou."
    if "weather" in last:
        return ("I should call both tools.</think>" if thinking else "") + "Let me check." + CALLS
    if "program" in last:
        return (f'Running it.\n\n<{D}function_calls>\n<{D}invoke name="run_python">\n'
                f'<{D}parameter name="code" string="true">{PROGRAM}</{D}parameter>\n</{D}invoke>\n</{D}function_calls>')
    if "broken" in last:
        return f"Here:\n\n<{D}function_calls>\n<{D}invoke name=\"get_weather\">oops</{D}function_calls>"
    if "fail" in last:
        return "Partial answer <FAIL>"
    if "slow" in last:
        return "word " * 300
    return ("Two plus two is four.</think>" if thinking else "") + "The answer is 4."


@pytest.fixture(scope="module")
def server():
    engine = ScriptedEngine(small_tokenizer(), script, max_batch=4)
    srv = InProcessServer(create_app(engine, small_tokenizer(), model_name="scripted"))
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)


def user(text):
    return [{"role": "user", "content": text}]


def test_auto_parallel_tool_calls_streaming(client, server):
    kwargs = dict(model="scripted", messages=user("What is the weather?"), tools=TOOLS)
    full = client.chat.completions.create(**kwargs)
    msg = full.choices[0].message
    assert full.choices[0].finish_reason == "tool_calls" and msg.content == "Let me check."
    assert [(c.function.name, json.loads(c.function.arguments)) for c in msg.tool_calls] == EXPECTED_CALLS
    assert "DSML" not in msg.content and all("DSML" not in c.function.arguments for c in msg.tool_calls)

    with httpx.stream("POST", server.url + "/v1/chat/completions", json={**kwargs, "stream": True}, timeout=60) as r:
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert len({(c["id"], c["created"], c["model"]) for c in chunks}) == 1
    calls = [tc for c in chunks for tc in c["choices"][0]["delta"].get("tool_calls", [])]
    assert all("index" in tc for tc in calls)
    firsts = {}
    for tc in calls:
        if tc["index"] not in firsts:
            firsts[tc["index"]] = tc
            assert tc["id"].startswith("call_") and tc["type"] == "function" and tc["function"]["arguments"] == ""
        else:
            assert "id" not in tc and "name" not in tc["function"]
    assert sorted(firsts) == [0, 1]
    args = {i: "".join(tc["function"]["arguments"] for tc in calls if tc["index"] == i) for i in firsts}
    assert [(firsts[i]["function"]["name"], json.loads(args[i])) for i in (0, 1)] == EXPECTED_CALLS
    content = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert content == "Let me check."
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == "tool_calls"

    # the official client's own accumulator rebuilds the same message
    with client.chat.completions.stream(**kwargs) as stream:
        final = stream.get_final_completion()
    got = final.choices[0].message
    assert got.content == "Let me check." and final.choices[0].finish_reason == "tool_calls"
    assert [(c.function.name, json.loads(c.function.arguments)) for c in got.tool_calls] == EXPECTED_CALLS


def test_thinking_agent_loop(client):
    extra = {"chat_template_kwargs": {"thinking": True}}
    messages = user("What is the weather in Hangzhou?")
    r1 = client.chat.completions.create(model="scripted", messages=messages, tools=TOOLS, extra_body=extra)
    m1 = r1.choices[0].message
    assert m1.model_extra["reasoning_content"] == "I should call both tools."
    assert m1.model_extra["reasoning"] == "I should call both tools."
    assert m1.content == "Let me check." and len(m1.tool_calls) == 2
    follow = messages + [m1.model_dump(exclude_none=True)] + [
        {"role": "tool", "tool_call_id": c.id, "content": "25C" if i == 0 else "12:00"} for i, c in enumerate(m1.tool_calls)]
    r2 = client.chat.completions.create(model="scripted", messages=follow, tools=TOOLS, extra_body=extra)
    m2 = r2.choices[0].message
    # after the tool results the reasoning is reasoning and the answer is content (sglang#17551)
    assert m2.model_extra["reasoning_content"] == "The results say 25 degrees."
    assert m2.content == "It is 25 degrees in Hangzhou." and m2.tool_calls is None
    assert r2.choices[0].finish_reason == "stop"
    # the same in chat mode: no reasoning at all
    r3 = client.chat.completions.create(model="scripted", messages=messages, tools=TOOLS)
    assert r3.choices[0].message.model_extra["reasoning_content"] is None


def test_tool_choice_none_and_malformed_markup(client):
    r = client.chat.completions.create(model="scripted", messages=user("weather?"), tools=TOOLS, tool_choice="none")
    assert r.choices[0].message.content == "Let me check." and r.choices[0].message.tool_calls is None
    assert r.choices[0].finish_reason == "stop"
    bad = client.chat.completions.create(model="scripted", messages=user("broken"), tools=TOOLS)
    assert bad.choices[0].finish_reason == "stop" and bad.choices[0].message.tool_calls is None
    assert "oops" in bad.choices[0].message.content  # never tool_calls with an empty list


def test_named_call_string_argument_ends_at_its_closing_tag(client):
    """tool_choice named: the server writes the tags, the model only the raw string value, which
    ends where the model starts the closing `</｜DSML｜parameter>` (not inside it)."""
    r = client.chat.completions.create(model="scripted", messages=user("time?"), tools=TOOLS,
                                       tool_choice={"type": "function", "function": {"name": "get_time"}})
    calls = r.choices[0].message.tool_calls
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [("get_time", {"tz": "Asia/Tokyo"})]
    assert r.choices[0].finish_reason == "tool_calls"


@pytest.mark.parametrize("tool_choice", ["auto", "required", {"type": "function", "function": {"name": "run_python"}}])
def test_long_string_argument_streams_incrementally(client, tool_choice):
    """Arguments are not fake-streamed as one blob (vllm PR #42879, sglang PR #19662): the call is
    announced with its name, then the string argument arrives in many fragments that join into
    exactly the non-streaming `arguments`; also under constrained tool_choice."""
    # (one call: choosing whether to add another is guided decoding, which the scripted engine lacks)
    kwargs = dict(model="scripted", messages=user("Write a program"), tools=[RUN_TOOL], tool_choice=tool_choice,
                  parallel_tool_calls=False)
    full = client.chat.completions.create(**kwargs)
    assert full.choices[0].finish_reason == "tool_calls"
    [call] = full.choices[0].message.tool_calls
    assert call.function.name == "run_python" and json.loads(call.function.arguments) == {"code": PROGRAM}

    chunks = list(client.chat.completions.create(**kwargs, stream=True))
    deltas = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    sent = [d.model_dump(exclude_unset=True) for d in deltas]  # the keys on the wire
    assert sent[0] == {"index": 0, "id": sent[0]["id"], "type": "function",
                       "function": {"name": "run_python", "arguments": ""}}
    assert sent[0]["id"].startswith("call_")
    assert all(d.keys() == {"index", "function"} and d["function"].keys() == {"arguments"} for d in sent[1:])
    assert all(d["index"] == 0 for d in sent)
    fragments = [d["function"]["arguments"] for d in sent[1:]]
    assert len(fragments) > 20  # the program streamed as it was written
    arguments = "".join(fragments)
    assert arguments == call.function.arguments and json.loads(arguments) == {"code": PROGRAM}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_streamed_call_cut_by_max_tokens_keeps_its_fragments(client):
    """An announced call cut short by max_tokens stays a call with the arguments sent so far,
    finish_reason "length" (as vLLM does); not a blob, and no markup as content."""
    kwargs = dict(model="scripted", messages=user("Write a program"), tools=[RUN_TOOL], max_tokens=60, stream=True)
    chunks = list(client.chat.completions.create(**kwargs))
    deltas = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    assert deltas[0].function.name == "run_python" and len(deltas) > 2
    arguments = "".join(d.function.arguments for d in deltas)
    assert arguments.startswith('{"code": "for city in') and len(arguments) < len(json.dumps({"code": PROGRAM}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "Running it."
    assert chunks[-1].choices[0].finish_reason == "length"


def test_n_streams_interleave_by_index(server):
    body = {"model": "scripted", "messages": user("what is 2+2"), "n": 3, "stream": True,
            "chat_template_kwargs": {"thinking": True}}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as r:
        events = sse_events(r)[:-1]
    for i in range(3):
        mine = [e["choices"][0] for e in events if e["choices"][0]["index"] == i]
        assert mine[0]["delta"]["role"] == "assistant" and mine[0]["delta"]["reasoning_content"] == ""
        assert "".join(c["delta"].get("reasoning_content") or "" for c in mine) == "Two plus two is four."
        assert "".join(c["delta"].get("content") or "" for c in mine) == "The answer is 4."
        assert mine[-1]["finish_reason"] == "stop"


def test_error_after_the_stream_started(server, client):
    body = {"model": "scripted", "messages": user("please fail"), "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    err = events[-2]["error"]
    assert err["type"] == "server_error" and "scripted failure" in err["message"]
    assert any(e["choices"] and e["choices"][0]["delta"].get("content") for e in events[:-2] if "choices" in e)
    # the engine loop survives and serves the next request
    assert client.chat.completions.create(model="scripted", messages=user("2+2")).choices[0].message.content


def test_metrics_expert_load_series(server):
    text = httpx.get(server.url + "/metrics", timeout=30).text
    assert metric_value(text, 'dsv32:starved_experts{model_name="scripted",layer="1"}') == 1
    assert metric_value(text, 'dsv32:expert_tokens_total{model_name="scripted",layer="1",expert="2"}') == 5


def test_full_queue_answers_503_with_retry_after():
    engine = ScriptedEngine(small_tokenizer(), script, max_batch=1, step_delay=0.01)
    srv = InProcessServer(create_app(engine, small_tokenizer(), model_name="scripted", max_queue=0))
    try:
        started = threading.Event()
        result = {}

        def long_stream():
            body = {"model": "scripted", "messages": user("slow please"), "stream": True, "max_tokens": 200}
            with httpx.stream("POST", srv.url + "/v1/chat/completions", json=body, timeout=60) as r:
                for line in r.iter_lines():
                    started.set()
                    if line:
                        result["last"] = line

        t = threading.Thread(target=long_stream)
        t.start()
        assert started.wait(30)
        resp = httpx.post(srv.url + "/v1/chat/completions", json={"model": "scripted", "messages": user("hi")},
                          timeout=30)
        assert resp.status_code == 503 and resp.headers["retry-after"] == "1"
        assert resp.json()["error"]["type"] == "server_error" and resp.json()["error"]["code"] == "overloaded"
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.InternalServerError) as info:
            c.chat.completions.create(model="scripted", messages=user("hi"))
        assert info.value.status_code == 503
        t.join(60)
        assert result["last"] == "data: [DONE]"
        deadline = time.monotonic() + 10
        while httpx.post(srv.url + "/v1/chat/completions", json={"model": "scripted", "messages": user("hi")},
                         timeout=30).status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        srv.close()

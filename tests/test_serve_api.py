"""The OpenAI-compatible server end to end: a real `dsv32 serve` process on 127.0.0.1 (ephemeral
port) with a nano checkpoint, driven by the official `openai` client and by raw HTTP.

Covers: models, chat (plain, streaming, logprobs, n, seed, stop, max_completion_tokens, top_k / top_p /
min_p, penalties checked against the model itself), tool calls constrained by
tool_choice required / named with a full round trip in chat and thinking modes, JSON response
formats, completions in every prompt form with echo + logprobs checked against the model itself,
the tokenizer routes, /metrics, a disconnecting streaming client, 64 concurrent streaming clients
equal to the same requests run alone, and a table of bad requests.
"""
from __future__ import annotations

import asyncio
import json
import time

import httpx
import openai
import pytest
import torch

from dsv32.checkpoint import load_pretrained
from serve_common import TIME_TOOL, TOOLS, WEATHER_TOOL, ServerProcess, metric_value, sse_events, write_checkpoint

KEY = "sk-test-key"
MODEL = "dsv32-nano"
THINKING = {"chat_template_kwargs": {"thinking": True}}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("serve-nano"))


@pytest.fixture(scope="module")
def server(model_dir):
    srv = ServerProcess(model_dir, "--api-key", KEY, "--served-model-name", MODEL, "--max-seq-len", "1024",
                        "--max-batch", "16")
    yield srv
    assert srv.stop() == 0, "".join(srv.lines)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=120) as c:
        yield c


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


# ---------------------------------------------------------------------- models, chat
def test_models_list(client, model_dir):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    card = models.data[0].model_dump()
    assert card["object"] == "model" and card["max_model_len"] == 1024 and card["owned_by"]
    assert client.models.retrieve(MODEL).id == MODEL


def test_chat_non_streaming(client):
    r = client.chat.completions.create(model=MODEL, messages=user("Hello there"), max_tokens=8, temperature=0)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.model == MODEL
    choice = r.choices[0]
    assert choice.index == 0 and choice.message.role == "assistant"
    assert isinstance(choice.message.content, str) and choice.message.tool_calls is None
    assert choice.finish_reason in ("stop", "length")
    assert 0 < r.usage.completion_tokens <= 8 and r.usage.prompt_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.usage.prompt_tokens_details.cached_tokens >= 0
    assert choice.message.model_extra.get("reasoning_content") is None  # chat mode: no reasoning


def test_chat_streaming_shape_equals_non_streaming(client, http):
    kwargs = dict(model=MODEL, messages=user("Stream me"), max_tokens=10, temperature=0)
    full = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len({(c.id, c.created, c.model) for c in chunks}) == 1
    body = [c for c in chunks if c.choices]
    assert body[-1].choices[0].finish_reason == full.choices[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in body[:-1])
    assert "".join(c.choices[0].delta.content or "" for c in body) == full.choices[0].message.content
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == [] and usage_chunk.usage.completion_tokens == full.usage.completion_tokens
    # the raw events: usage null everywhere but the last chunk, which has choices [] (not null); [DONE]
    with http.stream("POST", "/v1/chat/completions",
                     json={**kwargs, "stream": True, "stream_options": {"include_usage": True}}) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        events = sse_events(resp)
    assert events[-1] == "[DONE]"
    assert all(e["usage"] is None for e in events[:-2]) and events[-2]["choices"] == []
    assert all(e["object"] == "chat.completion.chunk" for e in events[:-1])


def test_chat_thinking_returns_reasoning_both_names(client):
    r = client.chat.completions.create(model=MODEL, messages=user("Think first"), max_tokens=12, temperature=0,
                                       extra_body=THINKING)
    extra = r.choices[0].message.model_extra
    assert isinstance(extra["reasoning_content"], str) and extra["reasoning"] == extra["reasoning_content"]
    # the prompt ends in <think>: the output starts as reasoning without the model writing the tag
    assert extra["reasoning_content"] or r.choices[0].message.content
    stream = list(client.chat.completions.create(model=MODEL, messages=user("Think first"), max_tokens=12,
                                                 temperature=0, extra_body={"enable_thinking": True}, stream=True))
    first = stream[0].choices[0].delta.model_extra
    assert first.get("reasoning_content") == "" and first.get("reasoning") == ""
    streamed = "".join(c.choices[0].delta.model_extra.get("reasoning_content") or "" for c in stream if c.choices)
    assert streamed == extra["reasoning_content"]
    # the third spelling of the switch; and thinking off gives no reasoning at all
    for thinking in (True, False):
        r = client.chat.completions.create(model=MODEL, messages=user("Think first"), max_tokens=12, temperature=0,
                                           extra_body={"chat_template_kwargs": {"enable_thinking": thinking}})
        got = r.choices[0].message.model_extra["reasoning_content"]
        assert got == (extra["reasoning_content"] if thinking else None)


def test_chat_n_seed_stop_logprobs(client):
    base = dict(model=MODEL, messages=user("Sample"), max_tokens=8, temperature=1.0)
    a = client.chat.completions.create(**base, n=3, seed=11)
    b = client.chat.completions.create(**base, n=3, seed=11)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert a.usage.completion_tokens == b.usage.completion_tokens
    greedy = client.chat.completions.create(model=MODEL, messages=user("Stop test"), max_tokens=12, temperature=0)
    text = greedy.choices[0].message.content
    stop = text[3:5]
    assert stop and stop in text
    cut = client.chat.completions.create(model=MODEL, messages=user("Stop test"), max_tokens=12, temperature=0,
                                         stop=[stop])
    assert cut.choices[0].message.content == text[: text.index(stop)] and cut.choices[0].finish_reason == "stop"
    lp = client.chat.completions.create(model=MODEL, messages=user("Stop test"), max_tokens=6, temperature=0,
                                        logprobs=True, top_logprobs=3)
    entries = lp.choices[0].logprobs.content
    assert len(entries) == lp.usage.completion_tokens
    for e in entries:  # greedy: the chosen token is the most likely one
        assert len(e.top_logprobs) == 3 and e.logprob == pytest.approx(e.top_logprobs[0].logprob)
        assert isinstance(e.bytes, list)


def _generated_ids(client, **kwargs) -> list[int]:
    """The token ids of a 16-token chat completion (EOS ignored), from its logprobs."""
    extra = {"ignore_eos": True, "return_tokens_as_token_ids": True, **kwargs.pop("extra_body", {})}
    r = client.chat.completions.create(model=MODEL, messages=user("Sample this"), max_tokens=16, logprobs=True,
                                       extra_body=extra, **kwargs)
    return [int(e.token.removeprefix("token_id:")) for e in r.choices[0].logprobs.content]


def test_truncation_parameters_reach_the_sampler(client):
    """top_k 1, a tiny top_p and min_p 1 each leave only the most likely token: sampling at the
    hottest temperature then gives exactly the greedy output (which plain hot sampling does not)."""
    greedy = _generated_ids(client, temperature=0)
    assert _generated_ids(client, temperature=2.0, seed=1) != greedy
    for only_the_best in ({"top_p": 1e-6}, {"extra_body": {"top_k": 1}}, {"extra_body": {"min_p": 1.0}}):
        assert _generated_ids(client, temperature=2.0, seed=1, **only_the_best) == greedy, only_the_best


@pytest.mark.parametrize("penalties", [{"frequency_penalty": 1.5}, {"presence_penalty": 2.0},
                                       {"repetition_penalty": 1.8}], ids=lambda p: next(iter(p)))
def test_penalties_follow_their_definitions(client, http, model_dir, penalties):
    """Greedy decoding under a penalty picks, at every step, the best token of the model's logits
    penalised as defined: OpenAI's presence/frequency over the generated tokens, CTRL's repetition
    over prompt and generated tokens. Checked against the model run here."""
    greedy = _generated_ids(client, temperature=0)
    assert len(set(greedy)) < len(greedy)  # the plain output repeats itself, so the penalty must matter
    got = _generated_ids(client, temperature=0, extra_body=penalties)
    assert got != greedy
    prompt = http.post("/tokenize", json={"messages": user("Sample this")}).json()["tokens"]
    model = load_pretrained(model_dir)
    with torch.no_grad():
        logits = model(torch.tensor([prompt + got])).logits[0].float()
    for i, token in enumerate(got):
        row = logits[len(prompt) + i - 1].clone()
        counts = torch.bincount(torch.tensor(got[:i], dtype=torch.long), minlength=row.numel()).float()
        if "repetition_penalty" in penalties:
            r = penalties["repetition_penalty"]
            seen = counts > 0
            seen[prompt] = True
            row = torch.where(seen, torch.where(row > 0, row / r, row * r), row)
        row -= penalties.get("frequency_penalty", 0.0) * counts + penalties.get("presence_penalty", 0.0) * (counts > 0)
        assert row[token] >= row.max() - 1e-4, (i, token, int(row.argmax()))


def test_max_completion_tokens_wins_over_max_tokens(client):
    r = client.chat.completions.create(model=MODEL, messages=user("Count"), max_tokens=9, max_completion_tokens=3,
                                       temperature=0, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 3 and r.choices[0].finish_reason == "length"


# ---------------------------------------------------------------------- tools
def _check_call(call, allowed=("get_weather", "get_time")):
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name in allowed
    args = json.loads(call.function.arguments)
    assert isinstance(args, dict)
    if call.function.name == "get_weather":
        assert isinstance(args["city"], str) and isinstance(args["days"], int)
        assert set(args) <= {"city", "days", "unit"} and args.get("unit", "c") in ("c", "f")
    else:
        assert set(args) == {"tz"} and isinstance(args["tz"], str)
    return args


@pytest.mark.parametrize("thinking", [False, True], ids=["chat", "thinking"])
def test_tool_call_round_trip(client, http, thinking):
    extra = THINKING if thinking else {}
    messages = user("What is the weather in Paris?")
    r1 = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, tool_choice="required",
                                        max_tokens=200, temperature=0, extra_body=extra)
    choice = r1.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
    for call in choice.message.tool_calls:
        _check_call(call)
    assistant = choice.message.model_dump(exclude_none=True)
    results = [{"role": "tool", "tool_call_id": c.id, "content": json.dumps({"temp": 21})}
               for c in choice.message.tool_calls]
    follow = messages + [assistant] + results
    r2 = client.chat.completions.create(model=MODEL, messages=follow, tools=TOOLS, max_tokens=12, temperature=0,
                                        extra_body=extra)
    answer = r2.choices[0]
    assert answer.finish_reason in ("stop", "length", "tool_calls")
    reasoning = answer.message.model_extra.get("reasoning_content")
    if thinking:
        assert isinstance(reasoning, str)
    else:
        assert reasoning is None
    # the follow-up prompt is the V3.2 agent-loop rendering: results block, then <think> / </think>
    ids = http.post("/tokenize", json={"messages": follow, "tools": TOOLS, **extra}).json()["tokens"]
    text = http.post("/detokenize", json={"tokens": ids}).json()["prompt"]
    assert text.endswith("</function_results>\n\n" + ("<think>" if thinking else "</think>"))
    assert r2.usage.prompt_tokens == len(ids)


def test_named_tool_choice_streaming(client):
    kwargs = dict(model=MODEL, messages=user("Time in Tokyo?"), tools=TOOLS, max_tokens=150, temperature=0,
                  tool_choice={"type": "function", "function": {"name": "get_time"}})
    full = client.chat.completions.create(**kwargs)
    calls = full.choices[0].message.tool_calls
    assert len(calls) == 1 and calls[0].function.name == "get_time"
    _check_call(calls[0])
    chunks = list(client.chat.completions.create(**kwargs, stream=True))
    deltas = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert deltas and all(d.index == 0 for d in deltas)
    assert deltas[0].id.startswith("call_") and deltas[0].type == "function"
    assert deltas[0].function.name == "get_time" and deltas[0].function.arguments == ""
    assert all(d.id is None and d.function.name is None for d in deltas[1:])
    arguments = "".join(d.function.arguments or "" for d in deltas)
    assert json.loads(arguments) == json.loads(calls[0].function.arguments)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
    assert all(not (c.choices[0].delta.content or "").strip() for c in chunks if c.choices)


def test_required_parallel_calls_are_indexed(client):
    r = client.chat.completions.create(model=MODEL, messages=user("Weather and time?"), tools=TOOLS,
                                       tool_choice="required", max_tokens=250, temperature=0.9, seed=5)
    calls = r.choices[0].message.tool_calls
    assert calls and len({c.id for c in calls}) == len(calls)
    for c in calls:
        _check_call(c)
    single = client.chat.completions.create(model=MODEL, messages=user("Weather and time?"), tools=TOOLS,
                                            tool_choice="required", max_tokens=250, temperature=0.9, seed=5,
                                            parallel_tool_calls=False)
    assert len(single.choices[0].message.tool_calls) == 1


def test_required_calls_are_complete_and_within_budget(client):
    """Across seeds and budgets, tool_choice "required" stays inside max_tokens; unless the budget
    ran out the answer is a finished block of well-formed calls, and when it ran out the unfinished
    markup never shows up as content. (A string argument cut at its closing tag used to be
    re-encoded into more tokens than the model generated, overrunning the budget and leaving the
    block unfinished: no tool call, the DSML tags in `content`.)"""
    counts = []
    for max_tokens, seeds in ((250, range(6)), (40, range(2)), (12, range(1))):
        for seed in seeds:
            kwargs = dict(model=MODEL, messages=user("Weather and time?"), tools=TOOLS, tool_choice="required",
                          max_tokens=max_tokens, temperature=1.0, seed=seed)
            r = client.chat.completions.create(**kwargs)
            choice = r.choices[0]
            assert r.usage.completion_tokens <= max_tokens, seed
            assert r.usage.prompt_tokens_details.cached_tokens <= r.usage.prompt_tokens, seed
            assert not choice.message.content, (seed, choice.message.content)  # no markup leaks as content
            if choice.finish_reason != "length":
                assert choice.finish_reason == "tool_calls" and choice.message.tool_calls, seed
            for call in choice.message.tool_calls or []:
                _check_call(call)
            counts.append(len(choice.message.tool_calls or []))
    assert max(counts) >= 2  # required may also call several tools at once
    # 12 tokens cannot hold a whole call: no tool call, no content, the block was cut short
    assert r.choices[0].finish_reason == "length" and not r.choices[0].message.tool_calls
    chunks = list(client.chat.completions.create(**kwargs, stream=True))
    assert not "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def test_tool_choice_none_gives_text(client):
    r = client.chat.completions.create(model=MODEL, messages=user("Weather?"), tools=TOOLS, tool_choice="none",
                                       max_tokens=10, temperature=0)
    assert r.choices[0].message.tool_calls is None and r.choices[0].finish_reason in ("stop", "length")
    assert "DSML" not in (r.choices[0].message.content or "")


def test_response_format_json(client):
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                               "tags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3},
                                               "kind": {"enum": ["a", "b"]}},
              "required": ["name", "age", "kind"], "additionalProperties": False}
    for thinking in (False, True):
        r = client.chat.completions.create(
            model=MODEL, messages=user("Give me a person"), max_tokens=80, temperature=0.7, seed=3,
            response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": True}},
            extra_body=THINKING if thinking else {})
        value = json.loads(r.choices[0].message.content)
        assert set(value) <= set(schema["properties"]) and {"name", "age", "kind"} <= set(value)
        assert isinstance(value["name"], str) and isinstance(value["age"], int) and value["kind"] in ("a", "b")
        assert all(isinstance(t, bool) for t in value.get("tags", [])) and len(value.get("tags", [])) <= 3
    r = client.chat.completions.create(model=MODEL, messages=user("Any JSON object"), max_tokens=40, temperature=0,
                                       response_format={"type": "json_object"})
    assert isinstance(json.loads(r.choices[0].message.content), dict)


# ---------------------------------------------------------------------- completions
def test_completions_echo_logprobs_match_the_model(client, model_dir):
    prompt = [0, 17, 42, 99, 5, 300, 12, 77, 101]
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=1, temperature=0, logprobs=1, echo=True)
    lp = r.choices[0].logprobs
    assert len(lp.token_logprobs) == len(prompt) + 1 == len(lp.tokens) == len(lp.top_logprobs) == len(lp.text_offset)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.text_offset == sorted(lp.text_offset)
    model = load_pretrained(model_dir)
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([prompt])).logits[0].float(), -1)
    for i in range(1, len(prompt)):
        assert lp.token_logprobs[i] == pytest.approx(float(ref[i - 1, prompt[i]]), abs=1e-4)
        top = lp.top_logprobs[i]
        assert lp.tokens[i] in top and max(top.values()) == pytest.approx(float(ref[i - 1].max()), abs=1e-4)
    generated = int(ref[-1].argmax())
    assert lp.token_logprobs[-1] == pytest.approx(float(ref[-1, generated]), abs=1e-4)
    assert lp.token_logprobs[-1] == max(lp.top_logprobs[-1].values())  # lm-eval's is_greedy test


def test_completions_prompt_forms(client):
    one = client.completions.create(model=MODEL, prompt="def main():", max_tokens=5, temperature=0)
    assert one.object == "text_completion" and len(one.choices) == 1 and isinstance(one.choices[0].text, str)
    many = client.completions.create(model=MODEL, prompt=["def main():", "import os"], max_tokens=5, temperature=0,
                                     n=2)
    assert [c.index for c in many.choices] == [0, 1, 2, 3]
    assert many.choices[0].text == many.choices[1].text == one.choices[0].text  # greedy: n copies agree
    ids = client.completions.create(model=MODEL, prompt=[[0, 5, 9, 12], [0, 44]], max_tokens=3, temperature=0)
    assert len(ids.choices) == 2 and ids.usage.prompt_tokens == 6
    seeded = [client.completions.create(model=MODEL, prompt="x = ", max_tokens=8, temperature=1.0, seed=42).choices[0].text
              for _ in range(2)]
    assert seeded[0] == seeded[1]
    text = one.choices[0].text
    stop = text[1:3]
    assert stop.strip() and stop in text
    cut = client.completions.create(model=MODEL, prompt="def main():", max_tokens=5, temperature=0, stop=[stop])
    assert cut.choices[0].text == text[: text.index(stop)] and cut.choices[0].finish_reason == "stop"
    echo = client.completions.create(model=MODEL, prompt="class A:", max_tokens=4, temperature=0, echo=True)
    assert echo.choices[0].text.startswith("class A:")
    stream = list(client.completions.create(model=MODEL, prompt="def main():", max_tokens=5, temperature=0,
                                            stream=True))
    assert "".join(c.choices[0].text for c in stream if c.choices) == one.choices[0].text
    assert stream[-1].choices[0].finish_reason == one.choices[0].finish_reason


# ---------------------------------------------------------------------- tokenizer routes, metrics
def test_tokenizer_routes(server):
    # lm-eval's remote tokenizer calls these without an API key
    with httpx.Client(base_url=server.url, timeout=30) as c:
        info = c.get("/tokenizer_info").json()
        assert info["eos_token"] == "<｜end▁of▁sentence｜>" and info["bos_token"] == "<｜begin▁of▁sentence｜>"
        eos = c.post("/tokenize", json={"prompt": info["eos_token"], "add_special_tokens": False}).json()
        assert eos["tokens"] == [1] and eos["count"] == 1 and eos["max_model_len"] == 1024
        text = "Hello, world! def f(x): return x"
        plain = c.post("/tokenize", json={"prompt": text, "add_special_tokens": False}).json()["tokens"]
        with_bos = c.post("/tokenize", json={"prompt": text}).json()["tokens"]
        assert with_bos == [0] + plain
        assert c.post("/detokenize", json={"tokens": plain}).json() == {"prompt": text}
        assert c.get("/health").status_code == 200


def test_metrics(server, client):
    client.completions.create(model=MODEL, prompt="metrics", max_tokens=3, temperature=0)
    before = metric_value(httpx.get(server.url + "/metrics", timeout=30).text, "dsv32:prefix_cache_hits_total")
    prompt = list(range(100, 164))  # 4 cache blocks of 16 tokens
    first, again = (client.completions.create(model=MODEL, prompt=prompt, max_tokens=2, temperature=0) for _ in range(2))
    assert first.usage.prompt_tokens_details.cached_tokens == 0  # a prompt never seen before
    assert again.usage.prompt_tokens_details.cached_tokens >= 48  # its full blocks come from the prefix cache
    resp = httpx.get(server.url + "/metrics", timeout=30)
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/plain; version=0.0.4")
    text = resp.text
    for name in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc", "prompt_tokens_total",
                 "generation_tokens_total", "time_to_first_token_seconds_bucket", "inter_token_latency_seconds_bucket",
                 "e2e_request_latency_seconds_count", "prefix_cache_queries_total", "prefix_cache_hits_total",
                 "spec_decode_acceptance_rate", "spec_decode_num_draft_tokens_total", "expert_tokens_total",
                 "starved_experts", "request_success_total"):
        assert f"dsv32:{name}" in text, name
    assert metric_value(text, "dsv32:generation_tokens_total") > 0
    assert metric_value(text, "dsv32:prompt_tokens_total") > 0
    assert 'layer="1",expert="0"' in text  # nano: layer 0 is dense, layers 1-2 are MoE
    hits = metric_value(text, "dsv32:prefix_cache_hits_total")
    assert hits - before >= again.usage.prompt_tokens_details.cached_tokens
    assert metric_value(text, "dsv32:prefix_cache_queries_total") >= hits


# ---------------------------------------------------------------------- load
def test_disconnected_stream_is_aborted_and_its_cache_freed(server, http):
    body = {"model": MODEL, "messages": user("a long answer please"), "max_tokens": 900, "temperature": 0,
            "ignore_eos": True, "stream": True}
    with http.stream("POST", "/v1/chat/completions", json=body) as resp:
        lines = resp.iter_lines()
        got = 0
        for line in lines:
            if line.startswith("data: "):
                got += 1
            if got >= 4:
                break
    deadline = time.monotonic() + 20
    while True:
        text = http.get("/metrics").text
        running = metric_value(text, "dsv32:num_requests_running")
        used = metric_value(text, "dsv32:kv_cache_blocks_used")
        if running == 0 and used == 0:
            break
        assert time.monotonic() < deadline, f"request still running: running={running} blocks={used}"
        time.sleep(0.1)
    assert metric_value(text, "dsv32:num_requests_in_flight") == 0
    assert metric_value(text, 'dsv32:request_success_total{model_name="dsv32-nano",finished_reason="abort"}') >= 1


def test_64_concurrent_streams_equal_solo_runs(server):
    prompts = [f"Question {i}: what is {i} plus {i * 3}?" for i in range(64)]

    async def one(client, text, stream):
        kwargs = dict(model=MODEL, messages=user(text), max_tokens=12, temperature=0)
        if not stream:
            r = await client.chat.completions.create(**kwargs)
            return r.choices[0].message.content, r.choices[0].finish_reason
        pieces, finish = [], None
        async for chunk in await client.chat.completions.create(**kwargs, stream=True):
            if chunk.choices:
                pieces.append(chunk.choices[0].delta.content or "")
                finish = chunk.choices[0].finish_reason or finish
        return "".join(pieces), finish

    async def main():
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=300)
        together = await asyncio.gather(*(one(client, p, True) for p in prompts))
        alone = [await one(client, p, False) for p in prompts]
        await client.close()
        return together, alone

    together, alone = asyncio.run(main())
    assert all(f in ("stop", "length") for _, f in together)
    assert len({text for text, _ in alone}) > 1  # outputs depend on the prompt: the comparison has teeth
    assert together == alone


# ---------------------------------------------------------------------- errors
CHAT = "/v1/chat/completions"
COMP = "/v1/completions"
OK_CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
BAD_TOOL_NAME = {"type": "function", "function": {"name": "get weather!", "parameters": {"type": "object"}}}
BAD_TOOL_SCHEMA = {"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}
BAD_TOOL_TYPE = {"type": "function", "function": {"name": "f", "parameters": {"type": "object",
                                                                                "properties": {"x": {"type": "quux"}}}}}
INVALID = "invalid_request_error"

BAD_REQUESTS = [
    # (name, path, body (dict, or raw bytes), headers, status, type, param)
    ("malformed json", CHAT, b'{"model": "x", "messages": [', None, 400, INVALID, None),
    ("body not an object", CHAT, [1, 2], None, 400, INVALID, None),
    ("unknown model", CHAT, {**OK_CHAT, "model": "gpt-99"}, None, 404, INVALID, "model"),
    ("missing messages", CHAT, {"model": MODEL}, None, 400, INVALID, "messages"),
    ("empty messages", CHAT, {**OK_CHAT, "messages": []}, None, 400, INVALID, "messages"),
    ("messages not a list", CHAT, {**OK_CHAT, "messages": "hi"}, None, 400, INVALID, "messages"),
    ("unknown role", CHAT, {**OK_CHAT, "messages": [{"role": "wizard", "content": "x"}]}, None, 400, INVALID,
     "messages[0].role"),
    ("content wrong type", CHAT, {**OK_CHAT, "messages": [{"role": "user", "content": 5}]}, None, 400, INVALID,
     "messages[0].content"),
    ("tool message without a call", CHAT, {**OK_CHAT, "messages": [{"role": "user", "content": "x"},
                                                                  {"role": "tool", "content": "42"}]},
     None, 400, INVALID, "messages[1].role"),
    ("temperature is a string", CHAT, {**OK_CHAT, "temperature": "hot"}, None, 400, INVALID, "temperature"),
    ("temperature out of range", CHAT, {**OK_CHAT, "temperature": 3.5}, None, 400, INVALID, "temperature"),
    ("top_p zero", CHAT, {**OK_CHAT, "top_p": 0}, None, 400, INVALID, "top_p"),
    ("n zero", CHAT, {**OK_CHAT, "n": 0}, None, 400, INVALID, "n"),
    ("n is a float", CHAT, {**OK_CHAT, "n": 1.5}, None, 400, INVALID, "n"),
    ("max_tokens zero", CHAT, {**OK_CHAT, "max_tokens": 0}, None, 400, INVALID, "max_tokens"),
    ("seed is a string", CHAT, {**OK_CHAT, "seed": "abc"}, None, 400, INVALID, "seed"),
    ("stream is a string", CHAT, {**OK_CHAT, "stream": "yes"}, None, 400, INVALID, "stream"),
    ("context length exceeded", CHAT, {**OK_CHAT, "max_tokens": 5000}, None, 400, INVALID, "messages"),
    ("tool name invalid", CHAT, {**OK_CHAT, "tools": [BAD_TOOL_NAME]}, None, 400, INVALID, "tools[0].function.name"),
    ("tool schema not an object", CHAT, {**OK_CHAT, "tools": [BAD_TOOL_SCHEMA]}, None, 400, INVALID,
     "tools[0].function.parameters"),
    ("tool schema unknown type", CHAT, {**OK_CHAT, "tools": [BAD_TOOL_TYPE]}, None, 400, INVALID,
     "tools[0].function.parameters"),
    ("duplicate tool names", CHAT, {**OK_CHAT, "tools": [WEATHER_TOOL, WEATHER_TOOL]}, None, 400, INVALID,
     "tools[1].function.name"),
    ("tool_choice required without tools", CHAT, {**OK_CHAT, "tool_choice": "required"}, None, 400, INVALID,
     "tool_choice"),
    ("tool_choice names an unknown tool", CHAT,
     {**OK_CHAT, "tools": [TIME_TOOL], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     None, 400, INVALID, "tool_choice"),
    ("tool_choice bad string", CHAT, {**OK_CHAT, "tools": [TIME_TOOL], "tool_choice": "always"}, None, 400, INVALID,
     "tool_choice"),
    ("response_format unknown", CHAT, {**OK_CHAT, "response_format": {"type": "xml"}}, None, 400, INVALID,
     "response_format.type"),
    ("top_logprobs without logprobs", CHAT, {**OK_CHAT, "top_logprobs": 2}, None, 400, INVALID, "top_logprobs"),
    ("top_logprobs too many", CHAT, {**OK_CHAT, "logprobs": True, "top_logprobs": 50}, None, 400, INVALID,
     "top_logprobs"),
    ("stream_options without stream", CHAT, {**OK_CHAT, "stream_options": {"include_usage": True}}, None, 400,
     INVALID, "stream_options"),
    ("empty stop string", CHAT, {**OK_CHAT, "stop": [""]}, None, 400, INVALID, "stop"),
    ("logit_bias unsupported", CHAT, {**OK_CHAT, "logit_bias": {"5": 10}}, None, 400, INVALID, "logit_bias"),
    ("thinking not a boolean", CHAT, {**OK_CHAT, "chat_template_kwargs": {"thinking": "yes"}}, None, 400, INVALID,
     "chat_template_kwargs.thinking"),
    ("completion prompt empty list", COMP, {"model": MODEL, "prompt": []}, None, 400, INVALID, "prompt"),
    ("completion token id out of range", COMP, {"model": MODEL, "prompt": [1, 99999]}, None, 400, INVALID, "prompt"),
    ("completion mixed prompt list", COMP, {"model": MODEL, "prompt": ["a", 3]}, None, 400, INVALID, "prompt"),
    ("completion suffix", COMP, {"model": MODEL, "prompt": "a", "suffix": "b"}, None, 400, INVALID, "suffix"),
    ("completion logprobs too many", COMP, {"model": MODEL, "prompt": "a", "logprobs": 99}, None, 400, INVALID,
     "logprobs"),
    ("completion negative max_tokens", COMP, {"model": MODEL, "prompt": "a", "max_tokens": -1}, None, 400, INVALID,
     "max_tokens"),
    ("completion prompt too long", COMP, {"model": MODEL, "prompt": [5] * 1024}, None, 400, INVALID, "prompt"),
    ("missing API key", CHAT, OK_CHAT, {"Authorization": ""}, 401, INVALID, None),
    ("wrong API key", CHAT, OK_CHAT, {"Authorization": "Bearer sk-wrong"}, 401, INVALID, None),
    ("unknown route", "/v1/engines", {}, None, 404, INVALID, None),
    ("detokenize bad id", "/detokenize", {"tokens": [-3]}, None, 400, INVALID, "tokens"),
    ("tokenize neither prompt nor messages", "/tokenize", {}, None, 400, INVALID, "prompt"),
]


@pytest.mark.parametrize("name,path,body,headers,status,etype,param", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_requests(http, name, path, body, headers, status, etype, param):
    kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
    resp = http.post(path, headers=headers, **kwargs)
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["type"] == etype and err["param"] == param, err
    if name.startswith("context length") or name.endswith("too long"):
        assert err["code"] == "context_length_exceeded" and "1024" in err["message"]


def test_bad_request_table_is_large_enough():
    assert len(BAD_REQUESTS) >= 20


def test_method_not_allowed_and_extras_ignored(http, client):
    assert http.get(CHAT).status_code == 405 and http.get(CHAT).json()["error"]["type"] == INVALID
    r = http.post(CHAT, json={**OK_CHAT, "frobnicate": {"deep": [1, 2]}, "user": "u1", "store": False})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["role"] == "assistant"
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=[], max_tokens=2)
    assert info.value.status_code == 400 and info.value.body["type"] == INVALID
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=user("x"), max_tokens=2)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=client.base_url, api_key="wrong", max_retries=0).models.list()

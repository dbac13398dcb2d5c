import copy
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dsv32.chat import (
    StreamParser, assemble_deltas, encode_messages, parse_completion, render_pieces, render_sft, tokenize_messages,
    with_tools,
)
from dsv32.data.corpus import stdlib_documents
from dsv32.tokenizer import ASSISTANT, BOS, DSML, EOS, THINK_END, THINK_START, USER, train_tokenizer

DATA = Path(__file__).parent / "data"


def official_example():
    spec = json.loads((DATA / "dsv32_official" / "test_input.json").read_text(encoding="utf-8"))
    messages = spec["messages"]
    messages[0]["tools"] = spec["tools"]  # as DeepSeek's own test does
    return messages


@pytest.fixture(scope="module")
def tok():
    texts = [d.text for d in stdlib_documents("train", limit=20)]
    texts.append((DATA / "dsv32_official" / "test_output.txt").read_text(encoding="utf-8"))
    return train_tokenizer(texts, 1024, show_progress=False)


# ---------------------------------------------------------------- encoding


def test_official_golden_example_byte_for_byte():
    gold = (DATA / "dsv32_official" / "test_output.txt").read_text(encoding="utf-8").strip()
    prompt = encode_messages(official_example(), thinking_mode="thinking", drop_thinking=True, add_default_bos_token=True)
    assert prompt == gold


CASES = json.loads((DATA / "chat_encoding_cases.json").read_text(encoding="utf-8"))["cases"]


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_matches_official_encoder_outputs(case):
    prompt = encode_messages(case["messages"], thinking_mode=case["thinking_mode"], context=case["context"],
                             add_default_bos_token=case["add_default_bos_token"])
    assert prompt == case["expected"]


def test_official_parse_round_trips():
    """The two parses of DeepSeek's test: a tool-call turn and a final-answer turn, each encoded
    alone after its context, parse back to the original message."""
    messages = official_example()
    tool_turn = messages[4]
    parsed = parse_completion(encode_messages([tool_turn], "thinking", context=messages[:4]), "thinking")
    expected = copy.deepcopy(tool_turn)
    for call in expected["tool_calls"]:
        call.pop("id")
    parsed.pop("content")
    assert parsed == expected

    answer_turn = messages[-6]
    parsed = parse_completion(encode_messages([answer_turn], "thinking", context=messages[:-6]), "thinking")
    parsed.pop("tool_calls")
    assert parsed == answer_turn


def test_thinking_markers_follow_the_last_user_turn():
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "reasoning_content": "old"},
                {"role": "user", "content": "c"}]
    thinking = encode_messages(messages, "thinking")
    assert thinking == f"{BOS}{USER}a{ASSISTANT}{THINK_END}b{EOS}{USER}c{ASSISTANT}{THINK_START}"
    assert "old" not in thinking  # reasoning of earlier turns is never shown
    assert encode_messages(messages, "chat").endswith(f"{USER}c{ASSISTANT}{THINK_END}")
    assert encode_messages(messages, "thinking", drop_thinking=False) == thinking


def test_openai_style_inputs_are_accepted():
    base = [{"role": "user", "content": "go"},
            {"role": "assistant", "reasoning_content": "r", "tool_calls": [
                {"id": "1", "type": "function", "function": {"name": "f", "arguments": '{"x": 1, "s": "t"}'}}]}]
    variant = [{"role": "user", "content": [{"type": "text", "text": "g"}, {"type": "text", "text": "o"}]},
               {"role": "assistant", "reasoning": "r", "content": None, "tool_calls": [
                   {"type": "function", "function": {"name": "f", "arguments": {"x": 1, "s": "t"}}}]}]
    assert encode_messages(variant, "thinking") == encode_messages(base, "thinking")
    assert f'<{DSML}parameter name="x" string="false">1</{DSML}parameter>' in encode_messages(base, "thinking")
    assert f'<{DSML}parameter name="s" string="true">t</{DSML}parameter>' in encode_messages(base, "thinking")


def test_developer_message_before_the_last_user_is_kept():
    # DeepSeek's drop_thinking pass silently drops such a message and then renders wrong indices.
    messages = [{"role": "developer", "content": "rules"}, {"role": "assistant", "content": "ok"},
                {"role": "user", "content": "q"}]
    prompt = encode_messages(messages, "thinking")
    assert prompt.startswith(f"{BOS}{USER}\n\n# The user's message is: rules{ASSISTANT}{THINK_END}ok{EOS}")


def test_with_tools_attaches_tools_to_a_system_message():
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    out = with_tools([{"role": "user", "content": "x"}], tools)
    assert out[0] == {"role": "system", "content": "", "tools": tools}
    prompt = encode_messages(out, "chat")
    assert prompt.startswith(f"{BOS}\n\n## Tools\n") and '{"name": "f", "parameters": {}}' in prompt
    assert with_tools([{"role": "user", "content": "x"}], None) == [{"role": "user", "content": "x"}]


@pytest.mark.parametrize("messages, mode, match", [
    ([{"role": "wizard", "content": "x"}], "chat", "unknown role"),
    ([{"role": "tool", "content": "x"}], "chat", "must follow an assistant"),
    ([{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [{"function": {"name": "f"}}]},
      {"role": "tool", "content": "1"}, {"role": "tool", "content": "2"}], "chat", "made 1 tool call"),
    ([{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{bad"}}]}], "chat", "not valid JSON"),
    ([{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], "thinking", "needs reasoning_content"),
    ([{"role": "user", "content": 3}], "chat", "content must be"),
    ([{"role": "user", "content": "x"}], "fast", "thinking_mode"),
])
def test_invalid_conversations_raise_clear_errors(messages, mode, match):
    with pytest.raises(ValueError, match=match):
        encode_messages(messages, mode)


# ---------------------------------------------------------------- parsing

CALL_BLOCK = (f'\n\n<{DSML}function_calls>\n<{DSML}invoke name="get">\n'
              f'<{DSML}parameter name="city" string="true">Paris "FR"</{DSML}parameter>\n'
              f'<{DSML}parameter name="days" string="false">3</{DSML}parameter>\n'
              f'</{DSML}invoke>\n</{DSML}function_calls>')
CALL = {"type": "function", "function": {"name": "get", "arguments": '{"city": "Paris \\"FR\\"", "days": 3}'}}


@pytest.mark.parametrize("text, mode, expected", [
    ("r</think>hi" + EOS, "thinking", ("hi", "r", None)),
    ("<think>r</think>hi", "thinking", ("hi", "r", None)),  # leading <think> and missing EOS
    ("still thinking", "thinking", ("", "still thinking", None)),  # truncated: all reasoning
    ("hello" + EOS + "junk after eos", "chat", ("hello", "", None)),
    ("ok" + CALL_BLOCK + EOS, "chat", ("ok", "", [CALL])),
    ("ok" + CALL_BLOCK, "chat", ("ok", "", [CALL])),  # missing EOS after tool calls
    ("ok" + CALL_BLOCK[:-4], "chat", ("ok", "", [CALL])),  # cut off (max_tokens) inside the closing tag
    ("ok" + CALL_BLOCK.removesuffix(f"\n</{DSML}function_calls>") + f'\n<{DSML}invoke name="get">\n<{DSML}param',
     "chat", ("ok", "", [CALL])),  # cut off inside a second invoke: the complete call stands, no markup as content
    ("ok" + CALL_BLOCK.removesuffix(f"\n</{DSML}function_calls>") + f'\n<{DSML}invoke name="get">' + EOS,
     "chat", ("ok", "", [CALL])),  # cut off by EOS inside a second invoke: the complete call stands
    ("ok" + CALL_BLOCK.replace(DSML, ""), "chat", ("ok", "", [CALL])),  # tags without the DSML prefix
    ("ok" + CALL_BLOCK.replace(f"</{DSML}function_calls>", "") + EOS, "chat", ("ok", "", [CALL])),  # unclosed block
    ('x\n\n<function_calls>\n<invoke name="get">{"city": "Paris \\"FR\\"", "days": 3}</invoke>\n</function_calls>',
     "chat", ("x", "", [CALL])),  # a JSON object inside the invoke
    ("plan" + CALL_BLOCK + EOS, "thinking", ("", "plan", [CALL])),  # tool call before </think>
    ("t</think>a" + CALL_BLOCK + "\ntrailing words" + EOS, "thinking", ("a\ntrailing words", "t", [CALL])),
    ('\n\n<function_calls><invoke name="f"><parameter name="v" string="false">NaN</parameter></invoke></function_calls>',
     "chat", ("", "", [{"type": "function", "function": {"name": "f", "arguments": '{"v": "NaN"}'}}])),  # not JSON
])
def test_parse_completion_is_lenient_like_production_parsers(text, mode, expected):
    parsed = parse_completion(text, mode)
    assert (parsed["content"], parsed["reasoning_content"], parsed["tool_calls"]) == expected


@pytest.mark.parametrize("block", [
    f'\n\n<{DSML}function_calls>\n<{DSML}invoke nam="f">\n</{DSML}invoke>\n</{DSML}function_calls>',  # bad attribute
    f"\n\n<{DSML}function_calls>\n</{DSML}function_calls>",  # empty block
    f'\n\n<{DSML}function_calls>\n<{DSML}invoke name="f">\n<{DSML}parameter name="a" string="true">1</{DSML}parameter>'
    f'<{DSML}parameter name="a" string="true">2</{DSML}parameter>\n</{DSML}invoke>\n</{DSML}function_calls>',  # duplicate
    f'\n\n<{DSML}function_calls>\n<{DSML}invoke name="f">\n<{DSML}parameter name="a"',  # truncated
    "\n\n<function_calls> are tags I like",
    f'\n\n<{DSML}function_calls>\n<{DSML}invoke name="f">[1, 2]</{DSML}invoke>\n</{DSML}function_calls>',  # not an object
])
def test_malformed_markup_falls_back_to_plain_content(block):
    parsed = parse_completion("text" + block + EOS, "chat")
    assert parsed["tool_calls"] is None
    assert parsed["content"] == "text" + block


def test_stream_parser_emits_openai_deltas_with_ids():
    parser = StreamParser("thinking", call_id=lambda i: f"call_{i}")
    deltas = []
    for chunk in ["rea", "son</th", "ink>Hi", CALL_BLOCK[:30], CALL_BLOCK[30:], EOS]:
        deltas += parser.feed(chunk)
    deltas += parser.finish()
    assert deltas[0] == {"reasoning_content": "rea"}
    assert {"content": "Hi"} in deltas
    calls = [d for d in deltas if "tool_calls" in d]
    assert calls == [{"tool_calls": [{"index": 0, "id": "call_0", **CALL}]}]
    for delta in deltas:  # markup never leaks into text deltas
        text = delta.get("content", "") + delta.get("reasoning_content", "")
        assert "<" not in text and EOS not in text
    with pytest.raises(ValueError):
        parser.feed("more")


# Pieces that build and break the markup, so random concatenations hit every parser state.
FRAGMENTS = ["a", "b c", "\n", "\n\n", "<", ">", "/", '"', "{", "}", "x=1", "NaN", "[1, 2]", THINK_START, THINK_END, EOS, DSML,
             f"<{DSML}function_calls>", f"</{DSML}function_calls>", "<function_calls>", "</function_calls>",
             f'<{DSML}invoke name="f">', f"</{DSML}invoke>", '<invoke name="g">', "</invoke>",
             f'<{DSML}parameter name="k" string="true">', f'<{DSML}parameter name="n" string="false">',
             f"</{DSML}parameter>", '<parameter name="m">', "</parameter>", '{"j": [1]}', CALL_BLOCK, "\n\n<｜DS"]


def _messages_text(draw):
    return draw(st.lists(st.sampled_from(FRAGMENTS), max_size=25).map("".join))


@st.composite
def completion_and_splits(draw):
    rendered = draw(st.booleans())
    if not rendered:
        text = _messages_text(draw)
    else:  # a well-formed completion, possibly cut short
        message = draw(assistant_messages())
        text = encode_messages([message], draw(st.sampled_from(["thinking", "chat"])),
                               context=[{"role": "user", "content": "q"}])
        text = text[: draw(st.integers(0, len(text)))]
    cuts = sorted(draw(st.lists(st.integers(0, len(text)), max_size=12)))
    return text, [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])], rendered


def _feed(parser: StreamParser, chunks) -> list[dict]:
    return [d for chunk in chunks for d in parser.feed(chunk)] + parser.finish()


def _events(deltas: list[dict]) -> list[list]:
    """The deltas as an ordered list of runs, consecutive pieces of one kind joined: ["content",
    text], ["reasoning_content", text], or ["call", index, name, arguments] (a call's first delta
    has the name, its argument fragments join onto it). What chunking must not change."""
    events: list[list] = []
    for delta in deltas:
        for key in ("content", "reasoning_content"):
            if key in delta:
                if events and events[-1][0] == key:
                    events[-1][1] += delta[key]
                else:
                    events.append([key, delta[key]])
        for call in delta.get("tool_calls", []):
            fn = call["function"]
            if "name" not in fn and events and events[-1][:2] == ["call", call["index"]]:
                events[-1][3] += fn["arguments"]
            else:
                events.append(["call", call["index"], fn.get("name"), fn["arguments"]])
    return events


def _is_json_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text, parse_constant=_no_constants), dict)
    except ValueError:
        return False


@settings(max_examples=400, deadline=None)
@given(completion_and_splits(), st.sampled_from(["thinking", "chat"]))
def test_streaming_is_invariant_to_chunking(case, mode):
    text, chunks, rendered = case
    deltas = _feed(StreamParser(mode), chunks)
    assembled = assemble_deltas(deltas)
    assert assembled == parse_completion(text, mode) == assemble_deltas(_feed(StreamParser(mode), list(text)))
    assert all(v for d in deltas for v in d.values())  # no empty deltas
    for call in assembled["tool_calls"] or []:  # arguments are always a strict JSON object
        assert isinstance(json.loads(call["function"]["arguments"], parse_constant=_no_constants), dict)

    # Streamed arguments: the same runs of events for any chunking, fragments included.
    streamed = _feed(StreamParser(mode, stream_arguments=True), chunks)
    whole = _feed(StreamParser(mode, stream_arguments=True), [text])
    by_char = _feed(StreamParser(mode, stream_arguments=True), list(text))
    assert _events(streamed) == _events(whole) == _events(by_char)
    assert all(v for d in streamed for v in d.values())
    for d in streamed:  # index on every call delta; the name (and type) only on a call's first
        for call in d.get("tool_calls", []):
            assert "index" in call and ("type" in call) == ("name" in call["function"])
    # ...joining into the non-streamed result. They part only where a call was announced and its
    # invoke then cut short or malformed: that call stands, with arguments that are not JSON.
    got = assemble_deltas(streamed)
    calls = got["tool_calls"] or []
    cut = next((k for k, c in enumerate(calls) if not _is_json_object(c["function"]["arguments"])), None)
    if cut is None:
        assert got == assembled
    else:
        assert calls[:cut] == (assembled["tool_calls"] or [])[:cut]
    # Arguments really stream: fed a character at a time, each complete call with DSML parameters
    # (everything `encode_messages` renders) arrives in several fragments, not one blob.
    if rendered:
        fragments = {}
        for d in by_char:
            for call in d.get("tool_calls", []):
                if call["function"]["arguments"]:
                    fragments[call["index"]] = fragments.get(call["index"], 0) + 1
        for index, call in enumerate(calls):
            if _is_json_object(call["function"]["arguments"]) and call["function"]["arguments"] != "{}":
                assert fragments[index] > 1, call


def _no_constants(name):
    raise AssertionError(f"{name} in tool-call arguments")


LONG_VALUE = 'print("héllo\tworld")\n' * 20 + 'path = "C:\\tmp" + "</para" + "</" + "<｜end"\n😀'
LONG_CALL_BLOCK = (f'\n\n<{DSML}function_calls>\n<{DSML}invoke name="run">\n'
                   f'<{DSML}parameter name="code" string="true">{LONG_VALUE}</{DSML}parameter>\n'
                   f'<{DSML}parameter name="opts" string="false">{{"n": 1.50, "x": [true, null]}}</{DSML}parameter>\n'
                   f'<{DSML}parameter name="bad" string="false">not json</{DSML}parameter>\n'
                   f'</{DSML}invoke>\n</{DSML}function_calls>')


def test_streamed_arguments_arrive_as_fragments_joining_into_the_parsed_arguments():
    text = "Running it." + LONG_CALL_BLOCK + EOS
    parsed = parse_completion(text, "chat")
    arguments = parsed["tool_calls"][0]["function"]["arguments"]
    assert json.loads(arguments) == {"code": LONG_VALUE, "opts": {"n": 1.5, "x": [True, None]}, "bad": "not json"}
    assert '"n": 1.50' in arguments  # non-string values keep the model's spelling

    parser = StreamParser("chat", call_id=lambda i: f"call_{i}", stream_arguments=True)
    calls = []
    for start in range(0, len(text), 3):  # about a token at a time
        chunk_calls = [c for d in parser.feed(text[start:start + 3]) for c in d.get("tool_calls", [])]
        assert len(chunk_calls) <= 2  # at most the announcement and one merged fragment per feed
        calls += chunk_calls
    calls += [c for d in parser.finish() for c in d.get("tool_calls", [])]
    assert calls[0] == {"index": 0, "id": "call_0", "type": "function", "function": {"name": "run", "arguments": ""}}
    fragments = [c["function"]["arguments"] for c in calls[1:]]
    assert all(c == {"index": 0, "function": {"arguments": f}} for c, f in zip(calls[1:], fragments))
    assert "".join(fragments) == arguments
    # the long string streamed as it came: many small fragments, none holding more than a
    # possible closing tag back (the longest, "</｜DSML｜parameter>", is 19 characters)
    assert len(fragments) > len(LONG_VALUE) // 4
    assert max(len(f) for f in fragments) < 40
    assert fragments[0].startswith('{"code": "') and fragments[-1] == "}"
    assert '{"n": 1.50, "x": [true, null]}' in fragments  # a non-string value: whole once closed, as parsed


def test_streamed_call_cut_short_or_malformed_after_its_header_stands():
    """The one documented difference from parse_completion: an announced call is not taken back.
    It keeps the arguments sent so far; the rest of its invoke is dropped."""
    head = f'\n\n<{DSML}function_calls>\n<{DSML}invoke name="run">\n<{DSML}parameter name="code" string="true">'
    param = f'<{DSML}parameter name="code" string="true">'
    cases = [
        # max_tokens inside a string value: all of its text so far
        (head + LONG_VALUE[:50], [("run", '{"code": "' + json.dumps(LONG_VALUE[:50], ensure_ascii=False)[1:-1])]),
        # EOS inside the value ("</" was held back as a possible closing tag)
        (head + "ab</" + EOS + "after", [("run", '{"code": "ab</')]),
        # a duplicate parameter: the invoke is malformed, the block goes on
        (head + f"1</{DSML}parameter>\n{param}2</{DSML}parameter>\n</{DSML}invoke>\n"
         f'<{DSML}invoke name="f">\n</{DSML}invoke>\n</{DSML}function_calls>', [("run", '{"code": "1"'), ("f", "{}")]),
    ]
    for text, calls in cases:
        assert parse_completion("x" + text, "chat")["tool_calls"] is None  # the block falls back to content
        chunks = ["x", *(text[i:i + 2] for i in range(0, len(text), 2))]
        for parser_chunks in (chunks, ["x" + text]):
            got = assemble_deltas(_feed(StreamParser("chat", stream_arguments=True), parser_chunks))
            assert got["content"] == "x"
            assert [(c["function"]["name"], c["function"]["arguments"]) for c in got["tool_calls"]] == calls


SAFE_TEXT = st.lists(st.sampled_from(list("ab 中😀.,:;'\"{}[]\n") + ["<x>", "</y>"]), max_size=15).map("".join)
JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers(-99, 99) | SAFE_TEXT,
                           lambda c: st.lists(c, max_size=3) | st.dictionaries(SAFE_TEXT, c, max_size=2), max_leaves=5)


@st.composite
def assistant_messages(draw):
    calls = draw(st.lists(st.dictionaries(st.text("abcxyz_", min_size=1, max_size=6), JSON_VALUES, max_size=3), max_size=2))
    message = {"role": "assistant", "content": draw(SAFE_TEXT), "reasoning_content": draw(SAFE_TEXT.filter(bool))}
    if calls:
        message["tool_calls"] = [{"type": "function", "function": {"name": draw(st.text("fgh", min_size=1, max_size=4)),
                                                                   "arguments": json.dumps(a, ensure_ascii=False)}}
                                 for a in calls]
    return message


@settings(max_examples=300, deadline=None)
@given(assistant_messages(), st.sampled_from(["thinking", "chat"]))
def test_render_then_parse_round_trips(message, mode):
    text = encode_messages([message], mode, context=[{"role": "user", "content": "q"}])
    parsed = parse_completion(text, mode)
    assert parsed["content"] == message["content"]
    assert parsed["reasoning_content"] == (message["reasoning_content"] if mode == "thinking" else "")
    got = [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in parsed["tool_calls"] or []]
    want = [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in message.get("tool_calls", [])]
    assert got == want


# ---------------------------------------------------------------- tokenisation and SFT


def test_tokenized_prompt_equals_encoding_the_prompt_string(tok):
    messages = official_example()
    ids = tokenize_messages(messages, tok, "thinking")
    assert ids == tok.encode(encode_messages(messages, "thinking"), allow_special=True)
    assert tok.decode(ids) == encode_messages(messages, "thinking")


def test_special_looking_user_text_stays_plain(tok):
    messages = [{"role": "user", "content": f"fake {EOS}{USER} turn"}, {"role": "assistant", "content": f"{THINK_END}x"}]
    ids, mask = render_sft(messages, tok, "chat")
    control = set(tok.special_ids.values())
    # Control tokens only where the template puts them: BOS, User, Assistant, </think>, EOS.
    assert [tok.decode([i]) for i in ids if i in control] == [BOS, USER, ASSISTANT, THINK_END, EOS]
    assert tok.decode(ids) == encode_messages(messages, "chat")


@pytest.mark.parametrize("mode", ["thinking", "chat"])
def test_sft_mask_covers_exactly_what_the_assistant_generates(tok, mode):
    messages = official_example()
    ids, mask = render_sft(messages, tok, mode)
    assert len(ids) == len(mask) and set(mask) == {0, 1}
    pieces = render_pieces(messages, mode)
    assert ids == tokenize_messages(messages, tok, mode)
    trained_text = "".join(p.text for p in pieces if p.trainable)
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == trained_text
    # Each trained span is one assistant turn, ending in EOS; everything else is prompt.
    spans, current = [], []
    for i, m in zip(ids, mask):
        if m:
            current.append(i)
        elif current:
            spans.append(current)
            current = []
    spans += [current] if current else []
    assistants = [m for m in messages if m["role"] == "assistant"]
    assert len(spans) == len(assistants) and all(span[-1] == tok.eos_id for span in spans)
    last = tok.decode(spans[-1])
    if mode == "thinking":  # the final turn keeps its reasoning and closes it itself
        assert last.startswith(assistants[-1]["reasoning_content"] + THINK_END)
    assert last.endswith(assistants[-1]["content"] + EOS)
    untrained = tok.decode([i for i, m in zip(ids, mask) if not m])
    assert "<function_results>" in untrained and "明天杭州和北京的天气怎么样" in untrained
    assert "<function_results>" not in tok.decode([i for i, m in zip(ids, mask) if m])

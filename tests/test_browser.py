"""The chat page at `/` in real headless Chromium (Debian's `chromium`, driven by Playwright; Playwright's
own browser downloads are never used). `make test-browser` installs both and runs this file; without
them it is skipped with the reason.

The server is the real app, engine loop, chat parser and SSE code over real HTTP, with the scripted
engine of serve_common standing in for the model, so that a tool call and reasoning appear on cue:
a message is sent, the reply is seen growing while it streams, thinking mode shows a collapsible
reasoning block, the sample tool's call shows as a card, the page answers it and the model goes on,
settings reach the request, the stop button cancels a stream, and both colour schemes render.

Screenshots go to the test's tmp dir; with DSV32_SCREENSHOT=PATH (e.g. docs/chat-page.png) the main
one is written there too (the README's picture).
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest

CHROMIUM = os.environ.get("DSV32_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
if not os.path.exists(CHROMIUM):
    pytest.skip(f"browser test: no Chromium at {CHROMIUM} (`make test-browser` installs Debian's chromium "
                "and playwright, then runs it)", allow_module_level=True)
try:
    from playwright.sync_api import expect, sync_playwright
except ImportError:
    pytest.skip("browser test: the `playwright` package is missing (`make test-browser` installs the "
                "[browser] extra, then runs it)", allow_module_level=True)

from dsv32.serve.app import create_app  # noqa: E402
from serve_common import InProcessServer, ScriptedEngine, small_tokenizer  # noqa: E402

pytestmark = pytest.mark.browser

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
D = "｜DSML｜"
GREETING = ("Hi! I am a small DeepSeek-V3.2-style model served by dsv32. Replies stream token by token "
            "over server-sent events; turn on Thinking to see my reasoning, or Sample tools to let me "
            "call get_weather and calculator.")


def weather_call(city: str) -> str:
    return (f'\n\n<{D}function_calls>\n<{D}invoke name="get_weather">\n'
            f'<{D}parameter name="city" string="true">{city}</{D}parameter>\n'
            f'<{D}parameter name="unit" string="true">celsius</{D}parameter>\n'
            f'</{D}invoke>\n</{D}function_calls>')


def script(prompt: str) -> str:
    """What the scripted model writes after each kind of prompt (thinking prompts end in <think>)."""
    thinking = prompt.endswith("<think>")
    last = prompt.rsplit("<｜User｜>", 1)[-1]
    if "</function_results>" in last:  # answer from what the page's sample tool returned
        temp = re.search(r'"temperature": ?(-?\d+)', last)
        cond = re.search(r'"conditions": ?"([^"]+)"', last)
        temp, cond = (temp.group(1) if temp else "?"), (cond.group(1) if cond else "unknown")
        return ((f"The tool reports {temp} °C and {cond}; answer briefly.</think>" if thinking else "")
                + f"It is {temp} °C and {cond} in Paris right now.")
    if "weather" in last:
        return (("The user wants the current weather in Paris. I have a get_weather tool, so I will call "
                 "it with the city and report what it returns.</think>" if thinking else "")
                + "Let me look that up." + weather_call("Paris"))
    if "story" in last:
        return "Once upon a time " + "a tiny model streamed one token after another. " * 40
    return ("Nothing much to think about.</think>" if thinking else "") + GREETING


@pytest.fixture(scope="module")
def server():
    engine = ScriptedEngine(small_tokenizer(), script, step_delay=0.015)
    srv = InProcessServer(create_app(engine, small_tokenizer(), model_name="dsv32-scripted"))
    yield srv
    srv.close()


@pytest.fixture()
def page(server, tmp_path):
    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=CHROMIUM, headless=True, args=FLAGS,
            viewport={"width": 1180, "height": 980}, color_scheme="light")
        context.set_default_timeout(20_000)
        page = context.new_page()
        page.errors = []
        page.on("pageerror", lambda exc: page.errors.append(str(exc)))
        page.on("console", lambda msg: page.errors.append(msg.text) if msg.type == "error" else None)
        page.requests = []
        page.on("request", lambda req: page.requests.append(req.post_data_json)
                if req.url.endswith("/v1/chat/completions") else None)
        page.goto(server.url + "/")
        yield page
        context.close()


def send(page, text: str) -> None:
    page.fill("#input", text)
    page.keyboard.press("Enter")


def wait_idle(page) -> None:
    expect(page.locator("body")).to_have_attribute("data-state", "idle")


RECORD_LENGTHS = """() => {
  window.__lengths = [];
  new MutationObserver(() => {
    const all = document.querySelectorAll('.msg.assistant .content');
    if (all.length) window.__lengths.push(all[all.length - 1].textContent.length);
  }).observe(document.getElementById('log'), {subtree: true, childList: true, characterData: true});
}"""


def test_chat_page_in_chromium(page, tmp_path):
    expect(page.locator("#model-name")).to_have_text("dsv32-scripted")
    expect(page.locator("#send")).to_be_disabled()  # nothing typed yet

    # settings reach the request
    page.click("#settings-button")
    page.eval_on_selector("#temperature", "el => { el.value = '0.3'; el.dispatchEvent(new Event('input')); }")
    expect(page.locator("#temperature-value")).to_have_text("0.30")
    page.fill("#max-tokens", "300")
    page.press("#max-tokens", "Tab")
    page.click("#settings-button")

    # 1. a plain message: the reply grows while it streams, then settles
    page.evaluate(RECORD_LENGTHS)
    send(page, "Hello! What can you do?")
    expect(page.locator(".msg.user .bubble")).to_have_text("Hello! What can you do?")
    expect(page.locator("body")).to_have_attribute("data-state", "busy")
    wait_idle(page)
    first = page.locator(".msg.assistant").nth(0)
    expect(first.locator(".content")).to_have_text(GREETING)
    lengths = page.evaluate("window.__lengths")
    partial = sorted({n for n in lengths if 0 < n < len(GREETING)})
    assert len(partial) >= 5, f"the reply did not appear incrementally: {lengths}"
    assert first.locator("details.reasoning").count() == 0  # thinking is off
    expect(first.locator(".meta")).to_contain_text("finish: stop")
    body = page.requests[0]
    assert body["stream"] is True and body["model"] == "dsv32-scripted"
    assert body["temperature"] == 0.3 and body["max_tokens"] == 300
    assert body["chat_template_kwargs"] == {"thinking": False} and "tools" not in body
    assert body["messages"] == [{"role": "user", "content": "Hello! What can you do?"}]

    # 2. thinking + sample tools: reasoning block, a tool-call card, the page answers it, the model goes on
    page.click("#thinking-toggle")
    page.click("#tools-toggle")
    expect(page.locator("#thinking-toggle")).to_have_attribute("aria-checked", "true")
    send(page, "What's the weather in Paris?")
    wait_idle(page)
    turns = page.locator(".msg.assistant")
    expect(turns).to_have_count(3)  # greeting, the call, the answer after the tool result
    call_turn, answer_turn = turns.nth(1), turns.nth(2)
    reasoning = call_turn.locator("details.reasoning")
    expect(reasoning.locator(".reasoning-text")).to_have_text(re.compile(r"^The user wants the current weather"))
    expect(reasoning.locator("summary")).to_have_text(re.compile(r"^Thought for \d+\.\d s$"))
    assert reasoning.get_attribute("open") is None  # collapsed once the answer started
    reasoning.locator("summary").click()  # ... and it opens
    expect(reasoning).to_have_attribute("open", "")
    expect(call_turn.locator(".content")).to_have_text("Let me look that up.")
    card = call_turn.locator(".tool-card")
    expect(card).to_have_count(1)
    expect(card.locator(".tool-name")).to_have_text("get_weather")
    expect(card.locator(".tool-id")).to_have_text(re.compile(r"^call_"))
    expect(card.locator(".tool-args")).to_have_text('{\n  "city": "Paris",\n  "unit": "celsius"\n}')
    result = card.locator(".tool-result").inner_text()
    assert '"city": "Paris"' in result and '"conditions"' in result
    expect(call_turn.locator(".meta")).to_contain_text("finish: tool_calls")
    temp = re.search(r'"temperature": (-?\d+)', result).group(1)
    expect(answer_turn.locator(".content")).to_have_text(re.compile(rf"^It is {temp} °C and .+ in Paris right now\.$"))
    expect(answer_turn.locator("details.reasoning .reasoning-text")).to_contain_text(f"{temp} °C")
    # the agent loop's second request carried the whole history back: call, tool result, tools, thinking
    body = page.requests[-1]
    assert [m["role"] for m in body["messages"]] == ["user", "assistant", "user", "assistant", "tool"]
    assert body["messages"][3]["tool_calls"][0]["function"]["name"] == "get_weather"
    assert body["messages"][3]["reasoning_content"].startswith("The user wants")
    assert body["messages"][4]["tool_call_id"].startswith("call_")
    assert body["chat_template_kwargs"] == {"thinking": True} and len(body["tools"]) == 2

    shot = tmp_path / "chat-page.png"
    page.locator("#input").blur()
    page.eval_on_selector("#scroller", "el => { el.scrollTop = el.scrollHeight; }")  # opening the block scrolled up
    page.screenshot(path=str(shot))
    assert shot.stat().st_size > 10_000
    if os.environ.get("DSV32_SCREENSHOT"):
        target = Path(os.environ["DSV32_SCREENSHOT"])
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, target)

    # 3. dark mode follows prefers-color-scheme
    light_bg = page.evaluate("getComputedStyle(document.body).backgroundColor")
    page.emulate_media(color_scheme="dark")
    dark_bg = page.evaluate("getComputedStyle(document.body).backgroundColor")
    assert light_bg != dark_bg
    page.screenshot(path=str(tmp_path / "chat-page-dark.png"))
    page.emulate_media(color_scheme="light")

    # 4. the stop button cancels a stream; the conversation goes on afterwards
    page.click("#tools-toggle")
    page.click("#thinking-toggle")
    send(page, "Tell me a long story.")
    story = page.locator(".msg.assistant").nth(3)
    expect(story.locator(".content")).to_contain_text("a tiny model streamed")
    expect(page.locator("#send")).to_have_attribute("aria-label", "Stop")
    page.click("#send")
    wait_idle(page)
    expect(story).to_have_attribute("data-finish", "stopped")
    expect(story.locator(".meta")).to_contain_text("stopped")
    stopped_at = len(story.locator(".content").inner_text())
    assert stopped_at < len(script("story"))
    page.click("#settings-button")  # a max tokens setting as large as the context is capped to fit it
    page.fill("#max-tokens", "100000")
    page.press("#max-tokens", "Tab")
    expect(page.locator("#max-tokens")).to_have_value("4096")
    page.click("#settings-button")
    send(page, "Thanks!")
    wait_idle(page)
    expect(page.locator(".msg.assistant").nth(4).locator(".content")).to_have_text(GREETING)
    assert [m["role"] for m in page.requests[-1]["messages"]][-3:] == ["user", "assistant", "user"]
    assert 100 < page.requests[-1]["max_tokens"] < 4096

    # 5. a new chat clears the page and the history
    page.click("#new-chat")
    expect(page.locator(".msg")).to_have_count(0)
    expect(page.locator("#empty")).to_be_visible()
    assert page.errors == []

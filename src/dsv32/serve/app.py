"""The OpenAI-compatible HTTP API (FastAPI) over one engine loop.

    app = create_app(engine, tokenizer, model_name="dsv32")     # then run it with uvicorn

Routes: POST /v1/chat/completions, POST /v1/completions, GET /v1/models[/{id}], GET /health,
GET /metrics, POST /tokenize, POST /detokenize, GET /tokenizer_info, and GET / (the browser chat page,
static/chat.html: plain HTML/JS over the same API).

Wire format notes (what real clients rely on):
- Streams are `data: <json>\\n\\n` events ending with `data: [DONE]`; every chunk of a response
  has the same id/created/model; the first chunk of each choice carries the role; tool-call deltas
  always carry `index`, the first delta of a call also `id`, `type` and the name (arguments ""),
  sent as soon as the call's name is known; its arguments then stream in fragments as the model
  writes them (string values character by character), joining into exactly the non-streaming
  `arguments`; `finish_reason: "tool_calls"` only when calls were emitted; with `stream_options.include_usage`
  the usage chunk has `choices: []` and every other chunk `usage: null`. An error after the stream
  started is sent as one `data: {"error": ...}` event, then `[DONE]`.
- Reasoning is returned as `reasoning_content` and again as `reasoning`. Thinking is chosen per
  request by `chat_template_kwargs.thinking` / `.enable_thinking` (or top-level `enable_thinking`);
  the prompt then ends in `<think>`, so the parser starts inside the reasoning.
- tool_choice "required" and named choices are constrained (generation.py): the output is a
  well-formed call of an allowed tool whose arguments are JSON typed by the tool's schema.
  response_format json_object / json_schema is constrained the same way. "none" stops the model
  before it can open a tool block.
- /v1/completions with `echo` + integer `logprobs` returns logprobs for every prompt token (the
  first is null) and the generated ones, with `tokens`, `top_logprobs` (always holding the token
  itself) and `text_offset`: the legacy shape lm-eval's loglikelihood needs.
- Errors: `{"error": {"message", "type", "param", "code"}}`; 400 for bad JSON, types, ranges and
  messages; 404 for an unknown model; 401 for a missing or wrong API key; 503 + Retry-After when
  the queue is full.
"""
from __future__ import annotations

import asyncio
import functools
import hmac
import importlib.resources
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from dsv32.chat import StreamParser, assemble_deltas, tokenize_messages, with_tools
from dsv32.infer.engine import FINISH_ABORT, FINISH_LENGTH, RequestOutput
from dsv32.infer.sampling import MAX_LOGPROBS, SamplingParams
from dsv32.serve import generation
from dsv32.serve.engine_loop import EngineFailed, EngineLoop, EngineStopped, Overloaded
from dsv32.serve.errors import SERVER_ERROR, APIError, bad_request, error_body, validation_param
from dsv32.serve.guides import validate_schema
from dsv32.serve.metrics import CONTENT_TYPE, Metrics
from dsv32.serve.schemas import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest
from dsv32.tokenizer import BOS, DSML, EOS

log = logging.getLogger("dsv32.serve")

MAX_N = 16
TOOL_NAME_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
ROLES = ("system", "developer", "user", "assistant", "tool")
RETRY_AFTER_S = 1
BLOCK_STOP = f"<{DSML}function_calls"  # with tool_choice "none": where the output is cut


class ServerState:
    """Everything the routes share."""

    def __init__(self, engine, tokenizer, *, model_name: str, api_key: str | None = None, max_queue: int = 256,
                 root: str | None = None, default_thinking: bool = False, sampling_defaults: dict | None = None,
                 shutdown_timeout: float = 5.0):
        self.engine = engine
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.api_key = api_key
        self.root = root or model_name
        self.default_thinking = default_thinking
        self.sampling_defaults = dict(sampling_defaults or {})
        self.shutdown_timeout = shutdown_timeout
        self.max_seq_len = engine.max_seq_len
        self.vocab_size = engine.cfg.vocab_size
        self.created = int(time.time())
        cfg = engine.cfg
        moe_layers = [i for i in range(cfg.num_hidden_layers) if cfg.is_moe_layer(i)]
        self.metrics = Metrics(model_name, moe_layers)
        self.loop = EngineLoop(engine, max_pending=engine.max_batch + max_queue, metrics=self.metrics)
        eos = set(engine.eos_ids)
        if EOS in tokenizer.special_ids:
            eos.add(tokenizer.special_ids[EOS])
        self.eos_ids = eos
        self.ctx = generation.Context(self.loop, tokenizer, self.max_seq_len, eos, self.metrics)


# ---------------------------------------------------------------------- small helpers
def _now() -> int:
    return int(time.time())


def _parse_body(raw: bytes, model: type[BaseModel]):
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise bad_request(f"malformed JSON in the request body: {exc}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise bad_request("the request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        param = validation_param(tuple(err.get("loc", ())))
        what = f"'{param}'" if param else "the request body"
        message = err.get("msg", "invalid value")
        if err.get("type") == "missing":
            raise bad_request(f"{what} is a required property", param=param) from None
        raise bad_request(f"invalid value for {what}: {message}", param=param) from None


def _check_range(value, lo, hi, name: str, lo_open: bool = False) -> None:
    if value is None:
        return
    if (value < lo or (lo_open and value == lo)) or (hi is not None and value > hi):
        lo_s = f"({lo}" if lo_open else f"[{lo}"
        raise bad_request(f"'{name}' must be in {lo_s}, {hi if hi is not None else 'inf'}], got {value}", param=name)


def _stop_list(stop) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else list(stop)
    if any(not s for s in stops):
        raise bad_request("'stop' strings must be non-empty", param="stop")
    if len(stops) > 16:
        raise bad_request("'stop' may hold at most 16 strings", param="stop")
    return stops


def _context_error(state: ServerState, n_prompt: int, max_tokens: int | None, param: str) -> APIError:
    limit = state.max_seq_len
    if max_tokens is None:
        message = (f"This model's maximum context length is {limit} tokens. However, your prompt has {n_prompt} "
                   "tokens, which leaves no room for a completion. Please reduce the length of the prompt.")
    else:
        message = (f"This model's maximum context length is {limit} tokens. However, you requested "
                   f"{n_prompt + max_tokens} tokens ({n_prompt} in the prompt, {max_tokens} in the completion). "
                   "Please reduce the length of the prompt or completion.")
    return bad_request(message, param=param, code="context_length_exceeded")


def _sampling(state: ServerState, req, *, max_tokens: int, logprobs: int | None, prompt_logprobs: int | None,
              stop: list[str], skip_special: bool, seed: int | None) -> SamplingParams:
    d = state.sampling_defaults
    _check_range(req.temperature, 0, 2, "temperature")
    _check_range(req.top_p, 0, 1, "top_p", lo_open=True)
    _check_range(req.min_p, 0, 1, "min_p")
    _check_range(req.presence_penalty, -2, 2, "presence_penalty")
    _check_range(req.frequency_penalty, -2, 2, "frequency_penalty")
    _check_range(req.repetition_penalty, 0, 2, "repetition_penalty", lo_open=True)
    if req.top_k is not None and req.top_k < -1:
        raise bad_request(f"'top_k' must be -1 or 0 (off) or a positive integer, got {req.top_k}", param="top_k")
    if req.logit_bias:
        raise bad_request("'logit_bias' is not supported by this server", param="logit_bias")
    if req.min_tokens:
        raise bad_request("'min_tokens' is not supported by this server", param="min_tokens")
    for t in req.stop_token_ids or []:
        if not 0 <= t < state.vocab_size:
            raise bad_request(f"stop token id {t} is outside the vocabulary", param="stop_token_ids")
    temperature = req.temperature if req.temperature is not None else d.get("temperature", 1.0)
    top_p = req.top_p if req.top_p is not None else d.get("top_p", 1.0)
    top_k = req.top_k if req.top_k is not None else d.get("top_k", 0)
    return SamplingParams(
        max_tokens=max_tokens, temperature=float(temperature), top_p=float(top_p), top_k=max(0, int(top_k)),
        min_p=float(req.min_p or 0.0), presence_penalty=float(req.presence_penalty or 0.0),
        frequency_penalty=float(req.frequency_penalty or 0.0),
        repetition_penalty=float(req.repetition_penalty if req.repetition_penalty is not None else 1.0),
        seed=None if seed is None else seed % (2**63), stop=stop, stop_token_ids=list(req.stop_token_ids or []),
        ignore_eos=req.ignore_eos, logprobs=logprobs, prompt_logprobs=prompt_logprobs,
        include_stop_str_in_output=req.include_stop_str_in_output, skip_special_tokens=skip_special,
    )


def _seed_for(seed: int | None, i: int) -> int | None:
    return None if seed is None else seed + i


def _check_model(state: ServerState, model: str | None) -> None:
    if model is not None and model not in (state.model_name, state.root):
        raise APIError(404, f"The model `{model}` does not exist.", param="model", code="model_not_found")


def _check_stream_options(req) -> None:
    if req.stream_options is not None and not req.stream:
        raise bad_request("'stream_options' is only allowed when 'stream' is true", param="stream_options")
    if not 1 <= req.n <= MAX_N:
        raise bad_request(f"'n' must be in [1, {MAX_N}], got {req.n}", param="n")


def _token_str(tokenizer, token_id: int, as_ids: bool) -> str:
    if as_ids:
        return f"token_id:{token_id}"
    return tokenizer.decode([token_id])


def _token_bytes(tokenizer, token_id: int) -> list[int]:
    try:
        return list(tokenizer.token_bytes(token_id))
    except (ValueError, IndexError):  # not byte-level, or an id past the tokenizer's vocabulary
        return list(tokenizer.decode([token_id]).encode("utf-8"))


async def _merge(gens: list[AsyncIterator[RequestOutput]]) -> AsyncIterator[tuple[int, Any]]:
    """Interleave several generations; yields (index, output). Leaving early cancels them all
    (their engine requests are aborted)."""
    if len(gens) == 1:
        async for out in gens[0]:
            yield 0, out
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, gen):
        try:
            async for out in gen:
                await queue.put((i, out))
        except Exception as exc:  # noqa: BLE001 - handed to the consumer
            await queue.put((i, exc))
        finally:
            await queue.put((i, None))

    tasks = [asyncio.create_task(pump(i, g)) for i, g in enumerate(gens)]
    live = len(tasks)
    try:
        while live:
            i, item = await queue.get()
            if item is None:
                live -= 1
                continue
            if isinstance(item, Exception):
                raise item
            yield i, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _sse(obj) -> str:
    return "data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n\n"


def _api_error_from(exc: BaseException) -> APIError:
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, (EngineStopped, Overloaded)):
        return APIError(503, str(exc) or "the server is shutting down", SERVER_ERROR, code="unavailable",
                        headers={"Retry-After": str(RETRY_AFTER_S)})
    if isinstance(exc, ValueError):
        return bad_request(str(exc))
    if isinstance(exc, EngineFailed):
        return APIError(500, str(exc), SERVER_ERROR, code="engine_error")
    log.error("internal error", exc_info=exc)
    return APIError(500, f"internal error: {type(exc).__name__}", SERVER_ERROR)


async def _watch_disconnect(request: Request, task: asyncio.Task) -> None:
    while not task.done():
        if await request.is_disconnected():
            task.cancel()
            return
        await asyncio.sleep(0.25)


async def _run_unless_disconnected(request: Request, coro):
    """Await `coro`, cancelling it (and so its engine requests) if the client goes away."""
    task = asyncio.create_task(coro)
    watcher = asyncio.create_task(_watch_disconnect(request, task))
    try:
        return await task
    except asyncio.CancelledError:
        if task.cancelled() and not watcher.done():
            raise
        raise APIError(499, "client disconnected") from None
    finally:
        watcher.cancel()


# ---------------------------------------------------------------------- chat
def _validate_tools(tools) -> list[dict]:
    """The function definitions of `tools` (OpenAI format), validated."""
    out, names = [], set()
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, dict):
            raise bad_request(f"{where} must be an object", param=where)
        if tool.get("type", "function") != "function":
            raise bad_request(f"{where}.type must be 'function', got {tool.get('type')!r}", param=f"{where}.type")
        fn = tool.get("function")
        if not isinstance(fn, dict):
            raise bad_request(f"{where}.function must be an object", param=f"{where}.function")
        name = fn.get("name")
        if not isinstance(name, str) or not TOOL_NAME_RE.match(name):
            raise bad_request(f"{where}.function.name must be 1-64 characters of letters, digits, '_', '.' or '-', "
                              f"got {name!r}", param=f"{where}.function.name")
        if name in names:
            raise bad_request(f"duplicate tool name {name!r}", param=f"{where}.function.name")
        names.add(name)
        if "description" in fn and not isinstance(fn["description"], (str, type(None))):
            raise bad_request(f"{where}.function.description must be a string", param=f"{where}.function.description")
        params = fn.get("parameters")
        if params is not None:
            if not isinstance(params, dict) or params.get("type", "object") != "object":
                raise bad_request(f"{where}.function.parameters must be a JSON schema of type 'object'",
                                  param=f"{where}.function.parameters")
            try:
                validate_schema(params, f"{where}.function.parameters")
            except ValueError as exc:
                raise bad_request(f"invalid tool schema: {exc}", param=f"{where}.function.parameters") from None
        out.append(fn)
    return out


def _validate_messages(messages: list) -> list[dict]:
    if not messages:
        raise bad_request("'messages' must contain at least one message", param="messages")
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad_request(f"{where} must be an object", param=where)
        role = m.get("role")
        if role not in ROLES:
            raise bad_request(f"{where}.role must be one of {', '.join(ROLES)}; got {role!r}", param=f"{where}.role")
        content = m.get("content")
        if content is not None and not isinstance(content, (str, list)):
            raise bad_request(f"{where}.content must be a string, a list of content parts or null",
                              param=f"{where}.content")
        if role in ("user", "system", "developer", "tool") and content is None:
            raise bad_request(f"{where}.content is required for role {role!r}", param=f"{where}.content")
        if role == "tool":
            prev = i - 1
            while prev >= 0 and isinstance(messages[prev], dict) and messages[prev].get("role") == "tool":
                prev -= 1
            if prev < 0 or messages[prev].get("role") != "assistant" or not messages[prev].get("tool_calls"):
                raise bad_request(f"{where}: a 'tool' message must follow an assistant message with 'tool_calls'",
                                  param=f"{where}.role")
        if role == "assistant" and m.get("tool_calls") is not None and not isinstance(m.get("tool_calls"), list):
            raise bad_request(f"{where}.tool_calls must be a list", param=f"{where}.tool_calls")
    return messages


def _thinking(state: ServerState, req: ChatCompletionRequest) -> bool:
    value = None
    kwargs = req.chat_template_kwargs or {}
    for key in ("thinking", "enable_thinking"):
        if key in kwargs and kwargs[key] is not None:
            value = kwargs[key]
            if not isinstance(value, bool):
                raise bad_request(f"'chat_template_kwargs.{key}' must be a boolean", param=f"chat_template_kwargs.{key}")
    for key in ("enable_thinking", "thinking"):
        if value is None and getattr(req, key) is not None:
            value = getattr(req, key)
    return state.default_thinking if value is None else value


def _response_format(rf: dict | None) -> tuple[str, dict | None]:
    """-> ("text" | "json", schema or None)."""
    if rf is None:
        return "text", None
    kind = rf.get("type")
    if kind == "text":
        return "text", None
    if kind == "json_object":
        return "json", {"type": "object"}
    if kind == "json_schema":
        spec = rf.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
            raise bad_request("'response_format.json_schema' must be an object with a 'schema' object",
                              param="response_format.json_schema")
        if "name" in spec and not isinstance(spec["name"], str):
            raise bad_request("'response_format.json_schema.name' must be a string",
                              param="response_format.json_schema.name")
        schema = spec.get("schema", {})
        try:
            validate_schema(schema, "response_format.json_schema.schema")
        except ValueError as exc:
            raise bad_request(str(exc), param="response_format.json_schema.schema") from None
        return "json", schema or None
    raise bad_request(f"'response_format.type' must be 'text', 'json_object' or 'json_schema', got {kind!r}",
                      param="response_format.type")


class _ChatPlan:
    pass


def _plan_chat(state: ServerState, req: ChatCompletionRequest) -> _ChatPlan:
    _check_model(state, req.model)
    _check_stream_options(req)
    messages = _validate_messages(req.messages)
    plan = _ChatPlan()
    plan.thinking = _thinking(state, req)
    tools = _validate_tools(req.tools) if req.tools else []
    choice = req.tool_choice
    named = None
    if choice is None:
        mode = "auto" if tools else "none"
    elif isinstance(choice, str):
        if choice not in ("auto", "none", "required"):
            raise bad_request(f"'tool_choice' must be 'auto', 'none', 'required' or a function, got {choice!r}",
                              param="tool_choice")
        mode = choice
    else:
        fn = choice.get("function") if choice.get("type", "function") == "function" else None
        name = fn.get("name") if isinstance(fn, dict) else None
        if not isinstance(name, str):
            raise bad_request("'tool_choice' must be {\"type\": \"function\", \"function\": {\"name\": ...}}",
                              param="tool_choice")
        mode, named = "named", name
    if mode in ("required", "named") and not tools:
        raise bad_request(f"tool_choice {'required' if mode == 'required' else 'with a function'} needs 'tools'",
                          param="tool_choice")
    if named is not None and named not in {t["name"] for t in tools}:
        raise bad_request(f"tool_choice names the function {named!r}, which is not in 'tools'", param="tool_choice")
    plan.tools, plan.tool_mode, plan.named = tools, mode, named
    plan.parallel = req.parallel_tool_calls is not False
    fmt, schema = _response_format(req.response_format)
    plan.json_schema = schema if fmt == "json" else None
    plan.json = fmt == "json"
    plan.constrained = mode in ("required", "named") or plan.json
    if req.logprobs and plan.constrained:
        raise bad_request("'logprobs' are not available with tool_choice 'required' / a named function or with "
                          "a JSON response_format (constrained output)", param="logprobs")
    if req.top_logprobs is not None:
        if not req.logprobs:
            raise bad_request("'top_logprobs' requires 'logprobs': true", param="top_logprobs")
        _check_range(req.top_logprobs, 0, MAX_LOGPROBS, "top_logprobs")
    plan.logprobs = (req.top_logprobs or 0) if req.logprobs else None

    rf = req.response_format if plan.json else None
    rendered = with_tools([dict(m) for m in messages], req.tools if tools else None, rf)
    try:
        prompt = tokenize_messages(rendered, state.tokenizer, "thinking" if plan.thinking else "chat")
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise bad_request(f"invalid messages: {exc}", param="messages") from None
    plan.prompt = prompt
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    which = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    if max_tokens is not None and max_tokens < 1:
        raise bad_request(f"'{which}' must be at least 1, got {max_tokens}", param=which)
    if len(prompt) >= state.max_seq_len:
        raise _context_error(state, len(prompt), max_tokens, "messages")
    if max_tokens is None:
        max_tokens = state.max_seq_len - len(prompt)
    elif len(prompt) + max_tokens > state.max_seq_len:
        raise _context_error(state, len(prompt), max_tokens, "messages")
    stop = _stop_list(req.stop)
    if mode == "none" or (mode == "auto" and plan.json):
        stop = stop + [BLOCK_STOP]  # no tool calls: stop before a block could open
    plan.params = [
        _sampling(state, req, max_tokens=max_tokens, logprobs=plan.logprobs, prompt_logprobs=None, stop=stop,
                  skip_special=False, seed=_seed_for(req.seed, i))
        for i in range(req.n)
    ]
    plan.n = req.n
    return plan


def _chat_generation(state: ServerState, plan: _ChatPlan, i: int, rid: str) -> AsyncIterator[RequestOutput]:
    params = plan.params[i]
    if plan.tool_mode in ("required", "named"):
        body = generation.tool_call_program(plan.tools, plan.named, plan.parallel, plan.thinking)
        gen = generation.Program(state.ctx, plan.prompt, params, f"{rid}-{i}").run(body)
    elif plan.json:
        body = generation.json_program(plan.json_schema, plan.thinking)
        gen = generation.Program(state.ctx, plan.prompt, params, f"{rid}-{i}").run(body)
    else:
        gen = generation.plain(state.ctx, plan.prompt, params)
    return generation.tracked(gen, state.metrics, len(plan.prompt))


def _chat_logprobs(state: ServerState, lps, as_ids: bool) -> list[dict]:
    tok = state.tokenizer
    out = []
    for lp in lps or []:
        out.append({
            "token": _token_str(tok, lp.token_id, as_ids), "logprob": lp.logprob,
            "bytes": _token_bytes(tok, lp.token_id),
            "top_logprobs": [{"token": _token_str(tok, t, as_ids), "logprob": v, "bytes": _token_bytes(tok, t)}
                             for t, v in lp.top_logprobs],
        })
    return out


def _finish_reason(engine_reason: str | None, tool_calls: bool) -> str:
    if engine_reason == FINISH_LENGTH:
        return "length"
    if engine_reason == FINISH_ABORT:
        return "abort"
    return "tool_calls" if tool_calls else "stop"


def _reasoning_delta(text: str) -> dict:
    return {"reasoning_content": text, "reasoning": text}


def _openai_delta(delta: dict) -> dict:
    """Parser delta -> OpenAI stream delta. Tool-call deltas already have the OpenAI shape (the
    parser streams arguments: a call's first delta has id, type and name, then argument fragments)."""
    if "reasoning_content" in delta:
        return _reasoning_delta(delta["reasoning_content"])
    return delta


def _finish_parser(parser: StreamParser, out: RequestOutput) -> list[dict]:
    """The parser's last deltas; when the output was cut before a tool block (tool_choice "none"),
    without the blank line that would have separated the block."""
    tail = parser.finish()
    if out.stop_reason == BLOCK_STOP:
        for delta in reversed(tail):
            key = "content" if "content" in delta else "reasoning_content" if "reasoning_content" in delta else None
            if key is None:
                break
            delta[key] = delta[key].rstrip("\n")
            if delta[key]:
                break
        tail = [d for d in tail if any(v for v in d.values())]
    return tail


def _without_leaked_markup(plan: _ChatPlan, deltas: list[dict]) -> list[dict]:
    """tool_choice required / named: the server writes every tag itself and the model writes no
    free content, so text the parser hands back as content is a block that max_tokens cut short.
    Its markup must not reach the client as content."""
    if plan.tool_mode in ("required", "named"):
        return [d for d in deltas if "content" not in d]
    return deltas


def _usage(prompt_tokens: int, completion_tokens: int, cached: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens, "prompt_tokens_details": {"cached_tokens": cached}}


async def _chat_stream(state: ServerState, req: ChatCompletionRequest, plan: _ChatPlan, reservation):
    rid = f"chatcmpl-{uuid.uuid4().hex}"
    created = _now()
    model = state.model_name
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    continuous = bool(req.stream_options and req.stream_options.continuous_usage_stats)
    as_ids = req.return_tokens_as_token_ids
    mode = "thinking" if plan.thinking else "chat"
    parsers = [StreamParser(mode, call_id=lambda _i: f"call_{uuid.uuid4().hex[:24]}", stream_arguments=True)
               for _ in range(plan.n)]
    called = [False] * plan.n
    completion = [0] * plan.n
    cached = [0] * plan.n

    def chunk(i: int, delta: dict, finish: str | None = None, logprobs=None) -> str:
        body = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]}
        if include_usage:
            body["usage"] = None
            if continuous:
                body["usage"] = _usage(len(plan.prompt), sum(completion), max(cached))
        return _sse(body)

    gens = [_chat_generation(state, plan, i, rid) for i in range(plan.n)]
    try:
        for i in range(plan.n):
            first = {"role": "assistant", "content": ""}
            if plan.thinking:
                first.update(_reasoning_delta(""))
            yield chunk(i, first)
        async for i, out in _merge(gens):
            completion[i] += len(out.token_ids)
            if out.usage is not None:
                cached[i] = out.usage.cached_tokens
                if out.finished:
                    completion[i] = out.usage.completion_tokens
            deltas = parsers[i].feed(out.text) if out.text else []
            if out.finished:
                deltas += _finish_parser(parsers[i], out)
            deltas = _without_leaked_markup(plan, deltas)
            lp = None
            if plan.logprobs is not None and out.logprobs:
                lp = {"content": _chat_logprobs(state, out.logprobs, as_ids)}
            for d in map(_openai_delta, deltas):
                if "tool_calls" in d:
                    called[i] = True
                yield chunk(i, d, logprobs=lp)
                lp = None
            if lp is not None:
                yield chunk(i, {}, logprobs=lp)
            if out.finished:
                if out.finish_reason == FINISH_ABORT:
                    raise EngineStopped("the request was cancelled: the server is shutting down")
                yield chunk(i, {}, finish=_finish_reason(out.finish_reason, called[i]))
        if include_usage:
            yield _sse({"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                        "choices": [], "usage": _usage(len(plan.prompt), sum(completion), max(cached))})
        yield "data: [DONE]\n\n"
    except Exception as exc:  # noqa: BLE001 - the stream has started: report in-band
        err = _api_error_from(exc)
        if err.status >= 500 and not isinstance(exc, (EngineStopped, Overloaded)):
            log.exception("error while streaming %s", rid)
        state.metrics.on_error(err.status)
        yield _sse(err.body())
        yield "data: [DONE]\n\n"
    finally:
        reservation.release()


async def _chat_full(state: ServerState, req: ChatCompletionRequest, plan: _ChatPlan) -> dict:
    rid = f"chatcmpl-{uuid.uuid4().hex}"
    created = _now()
    mode = "thinking" if plan.thinking else "chat"
    as_ids = req.return_tokens_as_token_ids
    parsers = [StreamParser(mode, call_id=lambda _i: f"call_{uuid.uuid4().hex[:24]}") for _ in range(plan.n)]
    deltas: list[list[dict]] = [[] for _ in range(plan.n)]
    logprobs: list[list[dict]] = [[] for _ in range(plan.n)]
    finish: list[str | None] = [None] * plan.n
    completion = [0] * plan.n
    cached = [0] * plan.n
    gens = [_chat_generation(state, plan, i, rid) for i in range(plan.n)]
    async for i, out in _merge(gens):
        completion[i] += len(out.token_ids)
        if out.text:
            deltas[i] += _without_leaked_markup(plan, parsers[i].feed(out.text))
        if plan.logprobs is not None and out.logprobs:
            logprobs[i] += _chat_logprobs(state, out.logprobs, as_ids)
        if out.finished:
            deltas[i] += _without_leaked_markup(plan, _finish_parser(parsers[i], out))
            finish[i] = out.finish_reason
            if out.usage is not None:
                cached[i] = out.usage.cached_tokens
                completion[i] = out.usage.completion_tokens
            if out.finish_reason == FINISH_ABORT:
                raise EngineStopped("the request was cancelled: the server is shutting down")
    choices = []
    for i in range(plan.n):
        msg = assemble_deltas(deltas[i])
        calls = msg["tool_calls"] or []
        message: dict[str, Any] = {"role": "assistant",
                                   "content": msg["content"] if (msg["content"] or not calls) else None}
        if plan.thinking:
            message["reasoning_content"] = msg["reasoning_content"]
            message["reasoning"] = msg["reasoning_content"]
        else:
            message["reasoning_content"] = None
            message["reasoning"] = None
        if calls:
            message["tool_calls"] = calls
        choices.append({"index": i, "message": message,
                        "logprobs": {"content": logprobs[i]} if plan.logprobs is not None else None,
                        "finish_reason": _finish_reason(finish[i], bool(calls))})
    return {"id": rid, "object": "chat.completion", "created": created, "model": state.model_name,
            "choices": choices, "usage": _usage(len(plan.prompt), sum(completion), max(cached))}


# ---------------------------------------------------------------------- completions
def _completion_prompts(state: ServerState, req: CompletionRequest) -> list[tuple[list[int], str | None]]:
    """(token ids, original text or None) per prompt."""
    p = req.prompt
    tok = state.tokenizer
    if isinstance(p, str):
        prompts: list = [p]
    elif isinstance(p, list) and p and all(isinstance(x, int) and not isinstance(x, bool) for x in p):
        prompts = [p]
    elif isinstance(p, list) and p and all(isinstance(x, str) for x in p):
        prompts = list(p)
    elif isinstance(p, list) and p and all(isinstance(x, list) for x in p):
        for x in p:
            if not x or not all(isinstance(t, int) and not isinstance(t, bool) for t in x):
                raise bad_request("'prompt' lists of token ids must be non-empty lists of integers", param="prompt")
        prompts = list(p)
    else:
        raise bad_request("'prompt' must be a string, a list of strings, a list of token ids or a list of lists "
                          "of token ids (non-empty)", param="prompt")
    out = []
    bos = tok.special_ids.get(BOS)
    for x in prompts:
        if isinstance(x, str):
            ids = tok.encode(x, allow_special=True)
            if req.add_special_tokens and bos is not None:
                ids = [bos] + ids
            if not ids:
                raise bad_request("'prompt' is empty", param="prompt")
            out.append((ids, x))
        else:
            bad = [t for t in x if not 0 <= t < state.vocab_size]
            if bad:
                raise bad_request(f"prompt token id {bad[0]} is outside the vocabulary [0, {state.vocab_size})",
                                  param="prompt")
            out.append((list(x), None))
    return out


def _plan_completion(state: ServerState, req: CompletionRequest):
    _check_model(state, req.model)
    _check_stream_options(req)
    if req.suffix is not None:
        raise bad_request("'suffix' is not supported", param="suffix")
    if req.best_of is not None and req.best_of != req.n:
        raise bad_request("'best_of' must equal 'n' (no server-side ranking)", param="best_of")
    if req.logprobs is not None:
        _check_range(req.logprobs, 0, MAX_LOGPROBS, "logprobs")
    if req.max_tokens is not None and req.max_tokens < 0:
        raise bad_request(f"'max_tokens' must be >= 0, got {req.max_tokens}", param="max_tokens")
    prompts = _completion_prompts(state, req)
    stop = _stop_list(req.stop)
    plans = []
    for k, (ids, text) in enumerate(prompts):
        if len(ids) >= state.max_seq_len:
            raise _context_error(state, len(ids), req.max_tokens, "prompt")
        max_tokens = req.max_tokens if req.max_tokens is not None else state.max_seq_len - len(ids)
        if len(ids) + max_tokens > state.max_seq_len:
            raise _context_error(state, len(ids), max_tokens, "prompt")
        for j in range(req.n):
            params = _sampling(state, req, max_tokens=max_tokens, logprobs=req.logprobs,
                               prompt_logprobs=req.logprobs if (req.echo and req.logprobs is not None) else None,
                               stop=stop, skip_special=req.skip_special_tokens, seed=_seed_for(req.seed, j))
            plans.append((ids, text, params))
    return plans


class _LegacyLogprobs:
    """Accumulates the legacy `logprobs` object: tokens, token_logprobs, top_logprobs, text_offset."""

    def __init__(self, state: ServerState, as_ids: bool, skip_special: bool):
        self.tok = state.tokenizer
        self.as_ids = as_ids
        self.detok = self.tok.detokenizer(skip_special=skip_special)
        self.offset = 0

    def entries(self, items: list[tuple[int, float | None, list[tuple[int, float]] | None]], offset_base: int) -> dict:
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for token, logprob, top in items:
            out["tokens"].append(_token_str(self.tok, token, self.as_ids))
            out["token_logprobs"].append(logprob)
            if top is None:
                out["top_logprobs"].append(None)
            else:
                d = {}
                for t, v in top:
                    key = _token_str(self.tok, t, self.as_ids)
                    d[key] = max(v, d.get(key, v))
                key = _token_str(self.tok, token, self.as_ids)
                d.setdefault(key, logprob)
                out["top_logprobs"].append(d)
            out["text_offset"].append(offset_base + self.offset)
            self.offset += len(self.detok.push([token]))
        return out


def _merge_logprobs(a: dict | None, b: dict) -> dict:
    if a is None:
        return b
    for k in a:
        a[k] += b[k]
    return a


async def _completion_choices(state: ServerState, req: CompletionRequest, plans, rid: str):
    """Yields (choice index, text piece, logprobs piece or None, finish reason or None, output)."""
    gens = [generation.tracked(generation.plain(state.ctx, ids, params), state.metrics, len(ids))
            for ids, _, params in plans]
    lp_state = [_LegacyLogprobs(state, req.return_tokens_as_token_ids, params.skip_special_tokens)
                for _, _, params in plans]
    echoed = [False] * len(plans)
    async for i, out in _merge(gens):
        ids, text, params = plans[i]
        piece = ""
        lp = None
        if req.echo and not echoed[i]:
            echoed[i] = True
            prompt_text = text if text is not None else state.tokenizer.decode(ids, skip_special=params.skip_special_tokens)
            piece = prompt_text
            if req.logprobs is not None:
                plp = out.prompt_logprobs or [None] * len(ids)
                items = []
                for pos, token in enumerate(ids):
                    entry = plp[pos] if pos < len(plp) else None
                    items.append((token, None, None) if entry is None else (token, entry.logprob, entry.top_logprobs))
                lp = lp_state[i].entries(items, 0)
        if out.text:
            piece += out.text
        if req.logprobs is not None and out.logprobs:
            gen_lp = lp_state[i].entries([(x.token_id, x.logprob, x.top_logprobs) for x in out.logprobs], 0)
            lp = _merge_logprobs(lp, gen_lp)
        yield i, piece, lp, out


async def _completion_full(state: ServerState, req: CompletionRequest, plans) -> dict:
    rid = f"cmpl-{uuid.uuid4().hex}"
    n_choices = len(plans)
    texts = [""] * n_choices
    lps: list[dict | None] = [None] * n_choices
    finish: list[str | None] = [None] * n_choices
    completion = [0] * n_choices
    cached = [0] * n_choices
    async for i, piece, lp, out in _completion_choices(state, req, plans, rid):
        texts[i] += piece
        if lp is not None:
            lps[i] = _merge_logprobs(lps[i], lp)
        completion[i] += len(out.token_ids)
        if out.finished:
            finish[i] = out.finish_reason
            if out.usage is not None:
                cached[i] = out.usage.cached_tokens
            if out.finish_reason == FINISH_ABORT:
                raise EngineStopped("the request was cancelled: the server is shutting down")
    choices = [{"index": i, "text": texts[i],
                "logprobs": (lps[i] or {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []})
                if req.logprobs is not None else None,
                "finish_reason": _finish_reason(finish[i], False)} for i in range(n_choices)]
    prompt_tokens = sum(len(ids) for ids, _, _ in plans[:: req.n])
    return {"id": rid, "object": "text_completion", "created": _now(), "model": state.model_name,
            "choices": choices, "usage": _usage(prompt_tokens, sum(completion), max(cached) if cached else 0)}


async def _completion_stream(state: ServerState, req: CompletionRequest, plans, reservation):
    rid = f"cmpl-{uuid.uuid4().hex}"
    created = _now()
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    completion = [0] * len(plans)
    cached = [0] * len(plans)
    prompt_tokens = sum(len(ids) for ids, _, _ in plans[:: req.n])

    def chunk(i, text, lp, finish):
        body = {"id": rid, "object": "text_completion", "created": created, "model": state.model_name,
                "choices": [{"index": i, "text": text, "logprobs": lp, "finish_reason": finish}]}
        if include_usage:
            body["usage"] = None
        return _sse(body)

    try:
        async for i, piece, lp, out in _completion_choices(state, req, plans, rid):
            completion[i] += len(out.token_ids)
            if out.usage is not None:
                cached[i] = out.usage.cached_tokens
            if out.finished and out.finish_reason == FINISH_ABORT:
                raise EngineStopped("the request was cancelled: the server is shutting down")
            if piece or lp is not None:
                yield chunk(i, piece, lp, None)
            if out.finished:
                yield chunk(i, "", None, _finish_reason(out.finish_reason, False))
        if include_usage:
            yield _sse({"id": rid, "object": "text_completion", "created": created, "model": state.model_name,
                        "choices": [], "usage": _usage(prompt_tokens, sum(completion), max(cached))})
        yield "data: [DONE]\n\n"
    except Exception as exc:  # noqa: BLE001 - in-band error after the stream started
        err = _api_error_from(exc)
        state.metrics.on_error(err.status)
        yield _sse(err.body())
        yield "data: [DONE]\n\n"
    finally:
        reservation.release()


# ---------------------------------------------------------------------- the app
@functools.cache
def _chat_page_html() -> str:
    """The browser chat page, shipped as package data (src/dsv32/serve/static/chat.html)."""
    return importlib.resources.files("dsv32.serve").joinpath("static", "chat.html").read_text(encoding="utf-8")


def create_app(engine, tokenizer, *, model_name: str = "dsv32", api_key: str | None = None, max_queue: int = 256,
               root: str | None = None, default_thinking: bool = False, sampling_defaults: dict | None = None,
               shutdown_timeout: float = 5.0) -> FastAPI:
    """The FastAPI app; the engine loop starts and stops with the app's lifespan."""
    state = ServerState(engine, tokenizer, model_name=model_name, api_key=api_key, max_queue=max_queue, root=root,
                        default_thinking=default_thinking, sampling_defaults=sampling_defaults,
                        shutdown_timeout=shutdown_timeout)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state.loop.start()
        try:
            yield
        finally:
            await asyncio.to_thread(state.loop.stop, 0.0)

    app = FastAPI(title="dsv32", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = state

    def error_response(err: APIError) -> JSONResponse:
        state.metrics.on_error(err.status)
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 404:
            return error_response(APIError(404, f"no route {request.method} {request.url.path}", code="not_found"))
        if exc.status_code == 405:
            return error_response(APIError(405, f"method {request.method} is not allowed on {request.url.path}",
                                           code="method_not_allowed"))
        return error_response(APIError(exc.status_code, str(exc.detail)))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return error_response(_api_error_from(exc))

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if state.api_key and request.url.path.startswith("/v1/"):
            header = request.headers.get("authorization", "")
            key = header[7:].strip() if header.lower().startswith("bearer ") else request.headers.get("x-api-key", "")
            if not key:
                return error_response(APIError(401, "You didn't provide an API key. Pass it as "
                                                    "'Authorization: Bearer KEY'.", code="missing_api_key"))
            if not hmac.compare_digest(key.encode(), state.api_key.encode()):
                return error_response(APIError(401, "Incorrect API key provided.", code="invalid_api_key"))
        try:
            return await call_next(request)
        except APIError as exc:
            return error_response(exc)

    def model_card() -> dict:
        return {"id": state.model_name, "object": "model", "created": state.created, "owned_by": "dsv32",
                "root": state.root, "parent": None, "max_model_len": state.max_seq_len, "permission": []}

    @app.get("/", include_in_schema=False)
    async def chat_page():
        return HTMLResponse(_chat_page_html(), headers={"Cache-Control": "no-cache"})

    @app.get("/health")
    async def health():
        if not state.loop.alive:
            return error_response(APIError(503, "the engine loop is not running", SERVER_ERROR, code="unavailable"))
        return JSONResponse({"status": "ok"})

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        _check_model(state, model_id)
        return model_card()

    @app.get("/metrics")
    async def metrics():
        stats = None
        if state.loop.alive:
            try:
                stats = await state.loop.call(lambda engine: engine.stats())
            except Exception:  # noqa: BLE001 - still serve the request-level series
                stats = None
        return Response(state.metrics.render(stats, state.loop.num_pending()), media_type=CONTENT_TYPE)

    @app.get("/tokenizer_info")
    async def tokenizer_info():
        tok = state.tokenizer
        special = tok.special_ids
        return {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOS if EOS in special else None,
                "bos_token": BOS if BOS in special else None, "pad_token": EOS if EOS in special else None,
                "add_bos_token": False, "add_eos_token": False, "model_max_length": state.max_seq_len,
                "vocab_size": tok.vocab_size, "chat_template": None}

    @app.post("/tokenize")
    async def tokenize(request: Request):
        req = _parse_body(await request.body(), TokenizeRequest)
        _check_model(state, req.model)
        if (req.prompt is None) == (req.messages is None):
            raise bad_request("give exactly one of 'prompt' or 'messages'", param="prompt")
        if req.prompt is not None:
            ids = state.tokenizer.encode(req.prompt, allow_special=True)
            if req.add_special_tokens and BOS in state.tokenizer.special_ids:
                ids = [state.tokenizer.special_ids[BOS]] + ids
        else:
            messages = _validate_messages(req.messages)
            kwargs = req.chat_template_kwargs or {}
            thinking = kwargs.get("thinking", kwargs.get("enable_thinking", state.default_thinking))
            tools = req.tools or None
            if tools:
                _validate_tools(tools)
            try:
                ids = tokenize_messages(with_tools([dict(m) for m in messages], tools), state.tokenizer,
                                        "thinking" if thinking else "chat")
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                raise bad_request(f"invalid messages: {exc}", param="messages") from None
        return {"count": len(ids), "max_model_len": state.max_seq_len, "tokens": ids}

    @app.post("/detokenize")
    async def detokenize(request: Request):
        req = _parse_body(await request.body(), DetokenizeRequest)
        _check_model(state, req.model)
        bad = [t for t in req.tokens if not 0 <= t < state.tokenizer.vocab_size]
        if bad:
            raise bad_request(f"token id {bad[0]} is outside the vocabulary", param="tokens")
        return {"prompt": state.tokenizer.decode(req.tokens)}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req = _parse_body(await request.body(), ChatCompletionRequest)
        plan = _plan_chat(state, req)
        reservation = _reserve(plan.n)
        if req.stream:
            return StreamingResponse(_chat_stream(state, req, plan, reservation), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            return JSONResponse(await _run_unless_disconnected(request, _chat_full(state, req, plan)))
        except APIError:
            raise
        except Exception as exc:  # noqa: BLE001 - mapped to an OpenAI error
            raise _api_error_from(exc) from None
        finally:
            reservation.release()

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = _parse_body(await request.body(), CompletionRequest)
        plans = _plan_completion(state, req)
        reservation = _reserve(len(plans))
        if req.stream:
            return StreamingResponse(_completion_stream(state, req, plans, reservation),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            return JSONResponse(await _run_unless_disconnected(request, _completion_full(state, req, plans)))
        except APIError:
            raise
        except Exception as exc:  # noqa: BLE001 - mapped to an OpenAI error
            raise _api_error_from(exc) from None
        finally:
            reservation.release()

    def _reserve(n: int):
        try:
            return state.loop.reserve(n)
        except (Overloaded, EngineStopped) as exc:
            raise APIError(503, str(exc), SERVER_ERROR, code="overloaded" if isinstance(exc, Overloaded) else "unavailable",
                           headers={"Retry-After": str(RETRY_AFTER_S)}) from None

    return app


__all__ = ["create_app", "ServerState", "error_body"]

"""Generations: what produces the tokens of one choice.

- `plain`: one engine request, streamed as the engine steps.
- `Program`: constrained output, run in the serving layer on top of the engine's public API (the
  engine has no logits hook). The output is built from three kinds of segment:
    forced text   template text the constraint fixes (DSML tags, a named tool), appended directly;
    free text     an engine request with stop strings (reasoning, a string argument's raw value);
    guided text   token by token under a guide (guides.py): each token is a one-token engine request
                  with the 20 most likely alternatives; the engine's own sample is kept when the
                  guide allows it, else the best allowed alternative (greedy) or a draw among the
                  allowed ones at the request's temperature; when none of the 20 fits, the guide's
                  closing text supplies the next character. The prefix cache keeps each such
                  request cheap (only the last partial block is recomputed).
  Programs: `tool_call_program` (tool_choice required / named: a well-formed DSML block calling
  allowed tools, argument values typed by their JSON schema) and `json_program` (response_format).
  Known differences from unconstrained sampling: frequency/presence penalties only see the current
  segment; logprobs are not reported for constrained output.

Every generation yields engine-style `RequestOutput`s whose `text` concatenates to the completion
(special tokens kept, so the chat parser sees the markup) and ends with one `finished` output.
"""
from __future__ import annotations

import asyncio
import dataclasses
import math
import random
import time
from collections.abc import AsyncIterator

from dsv32.infer.engine import FINISH_LENGTH, FINISH_STOP, RequestOutput, Usage
from dsv32.infer.sampling import MAX_LOGPROBS, SamplingParams
from dsv32.serve.guides import ChoiceGuide, JSONGuide
from dsv32.tokenizer import DSML, THINK_END

BLOCK_OPEN = f"\n\n<{DSML}function_calls>\n"
BLOCK_CLOSE = f"\n</{DSML}function_calls>"
INVOKE_OPEN = f'<{DSML}invoke name="'
INVOKE_CLOSE = f"</{DSML}invoke>"
PARAM_CLOSE = f"</{DSML}parameter>"
# where the raw text of a string argument must end: its closing tag or any markup the model starts,
# from the tag's "<" or "</" (the engine cuts at the earliest match; DSML alone would leave "</" in the value)
STRING_VALUE_STOPS = [f"</{DSML}", f"<{DSML}", DSML, "</parameter", "</invoke", "</function_calls", "<parameter",
                      "<invoke"]
MAX_PARALLEL_CALLS = 8


@dataclasses.dataclass
class Context:
    """What generations need from the server."""

    loop: object                  # EngineLoop
    tokenizer: object             # dsv32.tokenizer.Tokenizer
    max_seq_len: int
    eos_ids: set[int]
    metrics: object | None = None


async def plain(ctx: Context, prompt: list[int], params: SamplingParams) -> AsyncIterator[RequestOutput]:
    async for out in ctx.loop.generate(prompt, params):
        yield out


async def tracked(gen: AsyncIterator[RequestOutput], metrics, prompt_tokens: int) -> AsyncIterator[RequestOutput]:
    """Record a generation's request-level metrics (tokens, TTFT, inter-token latency, end to end)."""
    if metrics is None:
        async for out in gen:
            yield out
        return
    start = time.monotonic()
    last: float | None = None
    metrics.on_request(prompt_tokens)
    finished = False
    try:
        async for out in gen:
            now = time.monotonic()
            n = len(out.token_ids)
            if n:
                if last is None:
                    metrics.on_first_token(now - start)
                metrics.on_tokens(n, None if last is None else now - last)
                last = now
            if out.finished:
                finished = True
                metrics.on_finished(out.finish_reason, now - start)
            yield out
    finally:
        if not finished:
            metrics.on_finished("abort", time.monotonic() - start)
        await gen.aclose()


class _OutOfBudget(Exception):
    pass


class Program:
    """A constrained generation; `run(body)` streams what the coroutine `body(self)` produces."""

    def __init__(self, ctx: Context, prompt: list[int], params: SamplingParams, request_id: str = "program"):
        self.ctx = ctx
        self.tok = ctx.tokenizer
        self.prompt = list(prompt)
        self.params = params
        self.request_id = request_id
        self.ids: list[int] = []
        self.text = ""
        self.cached_tokens: int | None = None
        self._queue: asyncio.Queue = asyncio.Queue()
        self._rng = random.Random(params.seed)
        self._seed_base = params.seed
        self._requests = 0
        self._detok = self.tok.detokenizer(skip_special=False)
        self._pending = b""  # bytes of guided tokens that do not form a whole character yet
        self._special = set(self.tok.special_ids.values())
        self._vocab = self.tok.vocab_size

    # ----- budget
    @property
    def remaining(self) -> int:
        by_tokens = self.params.max_tokens - len(self.ids)
        by_context = self.ctx.max_seq_len - 1 - len(self.prompt) - len(self.ids)
        return max(0, min(by_tokens, by_context))

    def _append(self, ids: list[int], text: str) -> None:
        self.ids += ids
        self.text += text
        if ids or text:
            self._queue.put_nowait(RequestOutput(self.request_id, list(ids), text))

    def _sub_seed(self) -> int | None:
        self._requests += 1
        if self._seed_base is None:
            return None
        return (self._seed_base * 1_000_003 + self._requests) % (2**63)

    def _sub_params(self, **changes) -> SamplingParams:
        base = {f.name: getattr(self.params, f.name) for f in dataclasses.fields(SamplingParams)}
        base.update(stop=[], stop_token_ids=[], logprobs=None, prompt_logprobs=None, ignore_eos=False,
                    include_stop_str_in_output=False, skip_special_tokens=False, seed=self._sub_seed())
        base.update(changes)
        return SamplingParams(**base)

    # ----- segments
    def force(self, text: str) -> None:
        """Append template text the constraint fixes."""
        if not text:
            return
        ids = self.tok.encode(text, allow_special=True)
        if len(ids) > self.remaining:
            ids = ids[: self.remaining]
            self._append(ids, self._detok.push(ids))
            raise _OutOfBudget
        self._append(ids, self._detok.push(ids))

    async def free(self, stop: list[str], max_tokens: int) -> tuple[str, str]:
        """Let the model write until a stop string, EOS or `max_tokens`; returns (text, why it ended:
        "stop" for a stop string, "eos", or "length")."""
        n = min(max_tokens, self.remaining)
        if n <= 0:
            return "", "length"
        params = self._sub_params(max_tokens=n, stop=list(stop))
        ids, text, last = [], "", None
        async for out in self.ctx.loop.generate(self.prompt + self.ids, params):
            if self.cached_tokens is None and out.usage is not None:
                self.cached_tokens = out.usage.cached_tokens
            ids += out.token_ids
            text += out.text
            if out.text:
                self.text += out.text
                self._queue.put_nowait(RequestOutput(self.request_id, list(out.token_ids), out.text))
            last = out
        if isinstance(last.stop_reason, str):
            # the engine cut the text at the stop string; the tokens that spelled it are dropped
            self.ids += self._ids_of_prefix(ids, text)
            return text, "stop"
        if last.finish_reason == FINISH_STOP:  # a stop token (EOS): not part of the output
            self.ids += [t for t in ids if t not in self.ctx.eos_ids]
            return text, "eos"
        self.ids += ids
        return text, "length"

    def _ids_of_prefix(self, ids: list[int], text: str) -> list[int]:
        """Tokens for `text`, a prefix of what `ids` spell (cut at a stop string): the model's own
        tokens as far as they spell a prefix of it, then the rest (part of one token) re-encoded.
        Re-encoding all of it could take more tokens than were generated (e.g. bytes that are not
        UTF-8, which the text holds as U+FFFD) and overrun the budget."""
        data, kept, spelled_len = b"", 0, 0
        for k, token in enumerate(ids, 1):
            data += self.tok.token_bytes(token)
            spelled = data.decode("utf-8", "replace")
            if text.startswith(spelled):
                kept, spelled_len = k, len(spelled)
            elif len(spelled) > len(text) + 1:  # past the cut (+1: a trailing partial character)
                break
        rest = text[spelled_len:]
        return list(ids[:kept]) + (self.tok.encode(rest, allow_special=True) if rest else [])

    def _candidate_text(self, token: int) -> str | None:
        """The text `token` adds, "\\u00e9" for bytes that start a character, None if invalid."""
        data = self._pending + self.tok.token_bytes(token)
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as exc:
            if exc.reason == "unexpected end of data":
                return data[: exc.start].decode("utf-8", "replace") + "\u00e9"
            return None

    async def _one_token(self) -> tuple[int, list[tuple[int, float]]]:
        params = self._sub_params(max_tokens=1, logprobs=MAX_LOGPROBS, ignore_eos=True)
        chosen, top = None, []
        async for out in self.ctx.loop.generate(self.prompt + self.ids, params):
            if self.cached_tokens is None and out.usage is not None:
                self.cached_tokens = out.usage.cached_tokens
            if out.logprobs:
                chosen, top = out.logprobs[0].token_id, out.logprobs[0].top_logprobs
        return chosen, top

    def _take(self, token: int) -> str:
        """Append a guided token; returns the text it completed."""
        data = self._pending + self.tok.token_bytes(token)
        try:
            text = data.decode("utf-8")
            self._pending = b""
        except UnicodeDecodeError as exc:
            if exc.reason != "unexpected end of data":
                raise
            text, self._pending = data[: exc.start].decode("utf-8"), data[exc.start:]
        self._detok.push([token])  # keep the forced-text decoder in step (guided text is whole characters)
        self.ids.append(token)
        self.text += text
        self._queue.put_nowait(RequestOutput(self.request_id, [token], text))
        return text

    async def guided(self, guide, reserve: int = 0, allow_special: bool = False) -> str:
        """Generate one guided segment; returns its text (complete unless the budget ran out)."""
        seg = ""
        greedy = self.params.greedy
        while True:
            viable, complete = guide.check(seg)
            if complete and not guide.may_extend(seg):
                return seg
            room = self.remaining - reserve
            if not complete:
                forced = guide.forced_prefix(seg) if hasattr(guide, "forced_prefix") else ""
                if forced:
                    self.force(forced)
                    seg += forced
                    continue
                if room <= 48:
                    closing = guide.closing(seg + ("\u00e9" if self._pending else ""))
                    if closing is not None and len(self.tok.encode(closing, allow_special=True)) + 1 >= room:
                        self._pending = b""
                        self.force(closing)
                        return seg + closing
            if room <= 0 or self.remaining <= 0:
                raise _OutOfBudget
            sampled, top = await self._one_token()
            if sampled is None:
                raise _OutOfBudget
            order = [sampled] + [t for t, _ in top if t != sampled]
            logprob = dict(top)
            allowed: list[int] = []
            stop_here = False
            for token in order:
                if token in self.ctx.eos_ids:
                    if complete:
                        if token == sampled or (greedy and not allowed):
                            stop_here = True
                            break
                    continue
                if (token in self._special and not allow_special) or token >= self._vocab:
                    continue  # (ids past the tokenizer's vocabulary: padding rows of the embedding)
                piece = self._candidate_text(token)
                if piece is not None and piece and guide.check(seg + piece)[0]:
                    allowed.append(token)
                    if greedy or token == sampled:
                        break
            if stop_here or (complete and not allowed):
                return seg
            if not allowed:
                closing = guide.closing(seg)
                if not closing:
                    raise ValueError("constrained decoding reached a state with no valid continuation")
                self.force(closing[0])
                seg += closing[0]
                continue
            if greedy or allowed[0] == sampled:
                pick = allowed[0]
            else:
                temperature = max(self.params.temperature, 1e-5)
                weights = [math.exp((logprob.get(t, -1e9) - logprob.get(allowed[0], 0.0)) / temperature) for t in allowed]
                pick = self._rng.choices(allowed, weights=weights)[0]
            seg += self._take(pick)

    # ----- running
    async def run(self, body) -> AsyncIterator[RequestOutput]:
        async def main():
            reason = FINISH_STOP
            try:
                await body(self)
            except _OutOfBudget:
                reason = FINISH_LENGTH
            except BaseException as exc:  # noqa: BLE001 - handed to the consumer
                self._queue.put_nowait(exc)
                return
            # the first engine request's prompt already held forced markup: count only the request's prompt
            usage = Usage(len(self.prompt), len(self.ids), min(self.cached_tokens or 0, len(self.prompt)))
            self._queue.put_nowait(RequestOutput(self.request_id, [], "", finished=True,
                                                 finish_reason=reason, usage=usage))

        task = asyncio.create_task(main())
        try:
            while True:
                item = await self._queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    return
        finally:
            if not task.done():
                task.cancel()
                try:
                    await task
                except BaseException:  # noqa: BLE001 - cancelled on purpose
                    pass


# ---------------------------------------------------------------------- programs
def _is_string_schema(schema) -> bool:
    return isinstance(schema, dict) and schema.get("type") == "string" and "enum" not in schema and "const" not in schema


def _param_tag(key: str, schema, first: bool) -> str:
    kind = "true" if _is_string_schema(schema) else "false"
    return f'{"" if first else chr(10)}<{DSML}parameter name="{key}" string="{kind}">'


class _Sizes:
    """Token counts of the markup still to come, so that free and guided segments leave room for it."""

    def __init__(self, p: Program, tools: list[dict]):
        self.p = p
        self._memo: dict[str, int] = {}
        self.block_close = self.n(BLOCK_CLOSE)
        self.invoke = {t["name"]: self.n(INVOKE_OPEN + t["name"] + '">\n') + self.params(t.get("parameters") or {}, None)
                       for t in tools}

    def n(self, text: str) -> int:
        if text not in self._memo:
            self._memo[text] = len(self.p.tok.encode(text, allow_special=True))
        return self._memo[text]

    def params(self, schema: dict, done: list[str] | None) -> int:
        """The required parameters not in `done` (smallest values) and the invoke's closing tag."""
        props = schema.get("properties") if isinstance(schema.get("properties"), dict) else {}
        total = self.n("\n" + INVOKE_CLOSE)
        for k in schema.get("required", []):
            if k in props and k not in (done or []):
                value = "" if _is_string_schema(props[k]) else (JSONGuide(props[k] if isinstance(props[k], dict) else None)
                                                                .closing("") or "0")
                total += self.n(_param_tag(k, props[k], False) + value + PARAM_CLOSE)
        return total


async def _reasoning(p: Program, share: float, reserve: int) -> None:
    """Thinking mode: free reasoning (at most `share` of the budget), then `</think>`."""
    budget = max(0, min(int(p.remaining * share), p.remaining - reserve))
    await p.free([THINK_END, f"<{DSML}function_calls"], budget)
    p.force(THINK_END)


def tool_call_program(tools: list[dict], named: str | None, parallel: bool, thinking: bool):
    """A DSML block calling `named` (or any of `tools`; several calls when `parallel`)."""
    by_name = {t["name"]: t for t in tools}

    async def body(p: Program) -> None:
        sizes = _Sizes(p, [by_name[named]] if named is not None else tools)
        smallest = min(sizes.invoke.values())
        largest = max(sizes.invoke.values())
        if thinking:
            await _reasoning(p, 0.5, reserve=sizes.n(THINK_END + BLOCK_OPEN) + largest + sizes.block_close)
        p.force(BLOCK_OPEN + INVOKE_OPEN)
        await _invoke(p, by_name, named, sizes)
        calls = 1
        while (named is None and parallel and calls < MAX_PARALLEL_CALLS
               and p.remaining >= smallest + sizes.n("\n") + sizes.block_close):
            more = await p.guided(ChoiceGuide(["\n" + INVOKE_OPEN, BLOCK_CLOSE]), reserve=0, allow_special=True)
            if more == BLOCK_CLOSE:
                return
            await _invoke(p, by_name, None, sizes)
            calls += 1
        p.force(BLOCK_CLOSE)

    return body


async def _invoke(p: Program, by_name: dict, named: str | None, sizes: _Sizes) -> None:
    """From just after `<invoke name="`: the name, the parameters, `</invoke>`."""
    if named is not None:
        name = named
        p.force(f'{name}">\n')
    else:
        tail = max(sizes.invoke.values()) + sizes.block_close
        picked = await p.guided(ChoiceGuide([f'{n}">\n' for n in by_name]), reserve=tail)
        name = picked[: -len('">\n')]
    await _parameters(p, by_name[name].get("parameters") or {}, sizes)


async def _parameters(p: Program, schema: dict, sizes: _Sizes) -> None:
    """`<parameter>` tags for an object schema, then the invoke's closing tag: declared properties
    only, each at most once, every required one before the close; string values raw, the rest JSON."""
    props = schema.get("properties") if isinstance(schema.get("properties"), dict) else {}
    required = [k for k in schema.get("required", []) if k in props]
    done: list[str] = []
    while True:
        options: dict[str, str | None] = {_param_tag(k, props[k], not done): k for k in props if k not in done}
        if all(k in done for k in required):
            options["\n" + INVOKE_CLOSE] = None
        if len(options) == 1:
            choice = next(iter(options))
            p.force(choice)
        else:
            reserve = sizes.params(schema, done) + sizes.block_close
            choice = await p.guided(ChoiceGuide(list(options)), reserve=reserve, allow_special=True)
        key = options[choice]
        if key is None:
            return
        done.append(key)
        reserve = sizes.n(PARAM_CLOSE) + sizes.params(schema, done) + sizes.block_close
        value_schema = props[key]
        if _is_string_schema(value_schema):
            await p.free(STRING_VALUE_STOPS, p.remaining - reserve)
        else:
            await p.guided(JSONGuide(value_schema if isinstance(value_schema, dict) else None), reserve=reserve)
        p.force(PARAM_CLOSE)


def json_program(schema: dict | None, thinking: bool):
    """A JSON value (of `schema` if given) as the content."""
    guide = JSONGuide(schema)

    async def body(p: Program) -> None:
        if thinking:
            closing = guide.closing("") or "{}"
            await _reasoning(p, 0.5, reserve=len(p.tok.encode(THINK_END + closing, allow_special=True)))
        await p.guided(guide)

    return body

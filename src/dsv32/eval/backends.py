"""Where samples come from: the in-process engine, or an OpenAI-compatible server over HTTP.

Both take every conversation of an evaluation at once and return `samples` parsed replies per
conversation, in order. The engine backend submits all requests to one `Engine` (continuous batching;
the samples of one prompt share its cached prefix); the HTTP backend sends one chat completion per
conversation with `n` samples, several requests in flight, so the server batches them.
"""
from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass

from dsv32.tokenizer import THINK_END


class EvalError(ValueError):
    """A problem with the evaluation's input (unreachable server, missing file): one line for the CLI."""


@dataclass
class Sampling:
    samples: int = 1                # replies per prompt
    temperature: float = 0.0
    top_p: float = 1.0
    max_tokens: int = 256
    thinking: str | None = None     # "thinking" | "chat"; None: the server's default (HTTP only)
    seed: int = 0


@dataclass
class Sample:
    message: dict                   # parsed reply: content, reasoning_content, tool_calls
    text: str                       # the raw completion (over HTTP: rebuilt from the message)
    finish_reason: str              # stop | length | tool_calls | error
    tokens: int = 0
    error: str | None = None


def sample_seed(seed: int, prompt: int, k: int) -> int:
    return random.Random(f"eval:{seed}:{prompt}:{k}").getrandbits(63)


def _progress_bar(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="req", disable=not enabled, leave=False)


# ---------------------------------------------------------------------- the in-process engine
class EngineBackend:
    def __init__(self, model, tokenizer, max_batch: int = 64):
        self.model, self.tokenizer, self.max_batch = model, tokenizer, max_batch

    def sample(self, conversations: list[list[dict]], s: Sampling, progress: bool = False) -> list[list[Sample]]:
        from dsv32.chat import parse_completion, tokenize_messages
        from dsv32.infer.engine import Engine
        from dsv32.infer.sampling import SamplingParams

        thinking = s.thinking or "chat"
        context = self.model.config.max_position_embeddings
        prompts = [tokenize_messages(m, self.tokenizer, thinking_mode=thinking) for m in conversations]
        results: list[list[Sample]] = [[] for _ in conversations]
        fits = [i for i, ids in enumerate(prompts) if len(ids) < context]
        for i in set(range(len(prompts))) - set(fits):
            message = f"the prompt has {len(prompts[i])} tokens, the model's context {context}"
            results[i] = [Sample({"content": ""}, "", "error", 0, message)] * s.samples
        if not fits:
            return results
        max_seq_len = min(context, max(len(prompts[i]) for i in fits) + s.max_tokens + 1)
        was_training = self.model.training  # the engine puts the model in eval mode; a caller training it gets it back
        engine = Engine(self.model, max_batch=self.max_batch, max_seq_len=max_seq_len)
        leaders, followers = _leaders_first([(i, k) for i in fits for k in range(s.samples)], prompts)

        def submit(jobs) -> set[str]:
            rids = set()
            for i, k in jobs:
                params = SamplingParams(max_tokens=min(s.max_tokens, max_seq_len - len(prompts[i])),
                                        temperature=s.temperature, top_p=s.top_p, seed=sample_seed(s.seed, i, k),
                                        stop_token_ids=[self.tokenizer.eos_id])
                rid = engine.add_request(prompts[i], params)
                owner[rid], tokens[rid] = (i, k), []
                rids.add(rid)
            return rids

        owner, tokens, finish = {}, {}, {}
        prefilling = submit(leaders)
        with _progress_bar(len(leaders) + len(followers), "generate", progress) as bar:
            while engine.has_unfinished() or followers:
                if followers and not prefilling:  # the shared prompt prefixes are cached now
                    submit(followers)
                    followers = []
                for out in engine.step():
                    prefilling.discard(out.request_id)
                    tokens[out.request_id] += out.token_ids
                    if out.finished:
                        finish[out.request_id] = out.finish_reason
                        bar.update(1)
        self.model.train(was_training)
        for rid, (i, k) in sorted(owner.items(), key=lambda item: item[1]):
            text = self.tokenizer.decode(tokens[rid], skip_special=False)
            results[i].append(Sample(parse_completion(text, thinking), text, finish[rid], len(tokens[rid])))
        return results


def _leaders_first(jobs: list[tuple[int, int]], prompts: list[list[int]], prefix: int = 32):
    """(leaders, followers): the first job of each distinct prompt start, then the rest. The engine
    matches cached prefixes when it admits a request, so prompts that share a long start (the tool
    schemas of every tool task, the samples of one prompt) are admitted once a leader has prefilled it."""
    seen, leaders, followers = set(), [], []
    for i, k in jobs:
        key = tuple(prompts[i][:prefix])
        (followers if key in seen else leaders).append((i, k))
        seen.add(key)
    return leaders, followers


# ---------------------------------------------------------------------- an OpenAI-compatible server
def _rebuilt_text(message: dict, thinking: bool) -> str:
    """What the raw completion looked like, as far as the format check needs: a reply with an answer
    or a tool call after its reasoning closed the reasoning."""
    closed = thinking and (message.get("content") or message.get("tool_calls"))
    return (message.get("reasoning_content") or "") + (THINK_END if closed else "") + (message.get("content") or "")


def split_tools(messages: list[dict]) -> tuple[list[dict], list | None]:
    """Our prompts carry tool schemas on the system message (the V3.2 template's place); the OpenAI
    API takes them as the request's `tools`."""
    tools, out = None, []
    for m in messages:
        if m.get("tools"):
            tools = m["tools"]
            m = {k: v for k, v in m.items() if k != "tools"}
        out.append(m)
    return out, tools


class HTTPBackend:
    """Chat completions (and, for perplexity, /tokenize + echoed completions) of a server at `base_url`."""

    def __init__(self, base_url: str, api_key: str | None = None, timeout: float = 600.0, concurrency: int = 8):
        import httpx

        self.base_url = base_url.rstrip("/")
        self.root_url = self.base_url.removesuffix("/v1")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(headers=headers, timeout=timeout)
        self.concurrency = concurrency
        self.model_name = self._served_model()

    def _served_model(self) -> str:
        import httpx

        try:
            response = self.client.get(f"{self.base_url}/models")
        except httpx.HTTPError as exc:
            raise EvalError(f"cannot reach {self.base_url} ({type(exc).__name__}: {exc})") from None
        if response.status_code != 200:
            raise EvalError(f"{self.base_url}/models answered HTTP {response.status_code}: {response.text[:200]}")
        models = response.json().get("data") or []
        if not models:
            raise EvalError(f"{self.base_url}/models lists no model")
        return models[0]["id"]

    def post(self, path: str, body: dict, root: bool = False):
        import httpx

        url = (self.root_url if root else self.base_url) + path
        try:
            return self.client.post(url, json=body)
        except httpx.HTTPError as exc:
            raise EvalError(f"request to {url} failed ({type(exc).__name__}: {exc})") from None

    def _chat(self, messages: list[dict], s: Sampling, index: int) -> list[Sample]:
        messages, tools = split_tools(messages)
        body = {"model": self.model_name, "messages": messages, "n": s.samples, "temperature": s.temperature,
                "top_p": s.top_p, "max_tokens": s.max_tokens, "seed": sample_seed(s.seed, index, 0)}
        if tools:
            body["tools"] = tools
        if s.thinking is not None:
            body["chat_template_kwargs"] = {"thinking": s.thinking == "thinking"}
        response = self.post("/chat/completions", body)
        if 400 <= response.status_code < 500:  # this prompt is refused (too long, ...): its samples fail
            error = f"HTTP {response.status_code}: {response.text[:300]}"
            return [Sample({"content": ""}, "", "error", 0, error)] * s.samples
        if response.status_code != 200:
            raise EvalError(f"{self.base_url}/chat/completions answered HTTP {response.status_code}: {response.text[:200]}")
        payload = response.json()
        choices = sorted(payload["choices"], key=lambda c: c["index"])
        per_sample = (payload.get("usage") or {}).get("completion_tokens", 0) // max(len(choices), 1)
        out = []
        for choice in choices:
            m = choice.get("message") or {}
            message = {"content": m.get("content") or "", "reasoning_content": m.get("reasoning_content"),
                       "tool_calls": m.get("tool_calls") or []}
            out.append(Sample(message, _rebuilt_text(message, s.thinking == "thinking"), choice.get("finish_reason") or "stop",
                              per_sample))
        return out

    def sample(self, conversations: list[list[dict]], s: Sampling, progress: bool = False) -> list[list[Sample]]:
        results: list[list[Sample]] = [[] for _ in conversations]
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool, \
                _progress_bar(len(conversations), "generate", progress) as bar:
            futures = {pool.submit(self._chat, m, s, i): i for i, m in enumerate(conversations)}
            for future in as_completed(futures):
                results[futures[future]] = future.result()
                bar.update(1)
        return results

    def close(self) -> None:
        self.client.close()

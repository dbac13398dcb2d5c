"""Sampling: per-request parameters, logit processing, token choice and logprobs.

Order of operations on one row of logits (fp32): penalties (repetition, presence, frequency) ->
greedy argmax, or temperature -> top-k -> top-p -> min-p -> renormalise -> draw with the request's
own generator. Each request owns a `torch.Generator` seeded from `seed`, so a request's tokens do not
depend on what else is in the batch.

Logprobs are those of the model's distribution (log-softmax of the raw logits, before penalties and
temperature), as vLLM reports them by default.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

MAX_LOGPROBS = 20


@dataclass
class SamplingParams:
    max_tokens: int = 256             # 0: only score the prompt (with prompt_logprobs)
    temperature: float = 1.0          # 0: greedy
    top_k: int = 0                    # 0: off
    top_p: float = 1.0                # 1: off
    min_p: float = 0.0                # 0: off; keeps tokens with p >= min_p * p_max
    presence_penalty: float = 0.0     # OpenAI: subtract once from every token already generated
    frequency_penalty: float = 0.0    # OpenAI: subtract per occurrence in the generated tokens
    repetition_penalty: float = 1.0   # CTRL/HF: divide positive (multiply negative) logits of prompt+output tokens
    seed: int | None = None
    stop: list[str] = field(default_factory=list)          # stop strings (need an engine tokenizer)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None       # None: off; n: the chosen token's logprob plus the n most likely
    prompt_logprobs: int | None = None  # the same for every prompt token (the first has none)
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True  # for the text the engine decodes

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop)
        self.stop_token_ids = [int(t) for t in self.stop_token_ids]
        checks = [
            (isinstance(self.max_tokens, int) and self.max_tokens >= 0, f"max_tokens must be an integer >= 0, got {self.max_tokens!r}"),
            (_finite(self.temperature) and self.temperature >= 0, f"temperature must be >= 0, got {self.temperature!r}"),
            (isinstance(self.top_k, int) and self.top_k >= 0, f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}"),
            (_finite(self.top_p) and 0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p!r}"),
            (_finite(self.min_p) and 0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p!r}"),
            (_finite(self.presence_penalty) and -2 <= self.presence_penalty <= 2,
             f"presence_penalty must be in [-2, 2], got {self.presence_penalty!r}"),
            (_finite(self.frequency_penalty) and -2 <= self.frequency_penalty <= 2,
             f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty!r}"),
            (_finite(self.repetition_penalty) and self.repetition_penalty > 0,
             f"repetition_penalty must be > 0, got {self.repetition_penalty!r}"),
            (self.seed is None or isinstance(self.seed, int), f"seed must be an integer, got {self.seed!r}"),
            (all(isinstance(s, str) and s for s in self.stop), "stop strings must be non-empty strings"),
            (all(t >= 0 for t in self.stop_token_ids), "stop_token_ids must be >= 0"),
        ]
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            checks.append((value is None or (isinstance(value, int) and 0 <= value <= MAX_LOGPROBS),
                           f"{name} must be None or an integer in [0, {MAX_LOGPROBS}], got {value!r}"))
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    @property
    def has_penalties(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top_logprobs: list[tuple[int, float]]  # the n most likely (token id, logprob), best first


class PenaltyState:
    """What the penalties need to know about one request: which tokens it saw and how often it produced them."""

    def __init__(self, vocab_size: int, prompt: list[int], params: SamplingParams):
        self.params = params
        self.counts = torch.zeros(vocab_size) if (params.presence_penalty or params.frequency_penalty) else None
        self.seen = None
        if params.repetition_penalty != 1.0:
            self.seen = torch.zeros(vocab_size, dtype=torch.bool)
            if prompt:
                self.seen[torch.tensor(prompt)] = True

    def add(self, token: int) -> None:
        if self.counts is not None:
            self.counts[token] += 1
        if self.seen is not None:
            self.seen[token] = True

    def apply(self, logits: torch.Tensor, extra: int | None = None) -> torch.Tensor:
        """Penalised copy of one row of logits [vocab]; `extra` counts as one more generated token."""
        p = self.params
        out = logits.float().clone()
        if self.seen is not None:
            seen = self.seen if extra is None else self.seen.clone().index_fill_(0, torch.tensor([extra]), True)
            r = p.repetition_penalty
            out = torch.where(seen, torch.where(out > 0, out / r, out * r), out)
        if self.counts is not None:
            counts = self.counts if extra is None else self.counts.clone().index_add_(0, torch.tensor([extra]), torch.ones(1))
            out = out - p.frequency_penalty * counts - p.presence_penalty * (counts > 0).float()
        return out


def probabilities(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The sampling distribution of one row of (penalised) logits [vocab] under temperature/top-k/top-p/min-p."""
    logits = logits.float() / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = logits.topk(params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        before = sorted_probs.cumsum(0) - sorted_probs  # mass strictly above each token
        drop_sorted = before >= params.top_p           # the smallest set reaching top_p is kept
        probs = probs.masked_fill(drop_sorted.scatter(0, order, drop_sorted), 0.0)
    if params.min_p > 0:
        probs = probs.masked_fill(probs < params.min_p * probs.max(), 0.0)
    return probs / probs.sum()


def draw(probs: torch.Tensor, generator: torch.Generator) -> int:
    return int(torch.multinomial(probs, 1, generator=generator))


def choose(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator,
           penalties: PenaltyState | None = None, extra: int | None = None) -> tuple[int, torch.Tensor | None]:
    """Pick the next token from one row of raw logits; returns (token, the distribution it came from or None if greedy)."""
    if penalties is not None and params.has_penalties:
        logits = penalties.apply(logits, extra)
    if params.greedy:
        return int(logits.argmax()), None
    probs = probabilities(logits, params)
    return draw(probs, generator), probs


def token_logprob(logprobs: torch.Tensor, token: int, n_top: int) -> TokenLogprob:
    """`logprobs`: one row of log-softmax values [vocab]."""
    top: list[tuple[int, float]] = []
    if n_top:
        values, ids = logprobs.topk(n_top)
        top = list(zip(ids.tolist(), values.tolist()))
    return TokenLogprob(token, float(logprobs[token]), top)

"""The inference engine: continuous batching over a paged latent cache.

    engine = Engine(model, max_batch=8, max_seq_len=4096)
    rid = engine.add_request(prompt_ids, SamplingParams(max_tokens=64, temperature=0))
    while engine.has_unfinished():
        for out in engine.step():          # new tokens of every request that advanced
            print(out.request_id, out.token_ids, out.text, out.finished, out.finish_reason)

One `step()` runs one decode forward over every request that has a single token left to feed (its
last sampled token; with MTP speculation also its draft), then prefill chunks of waiting prompts up
to `max_prefill_tokens`. Requests join and leave between steps; a long prompt is prefilled over
several steps while the others keep decoding. The engine works on token ids; give it a tokenizer
(anything with `detokenizer()`) and it also streams text and honours stop strings.

Per request the engine tracks `tokens` (prompt + generated) and `n_computed`, the tokens whose
latents are in the cache. A request in decode has exactly one token not yet fed. Prefix caching
(see cache.py) sets `n_computed` past the shared blocks at admission. When the cache runs out of
blocks the most recently admitted request is preempted: its blocks are freed and it is prefilled
again later (its tokens so far become its prompt).

Decode steps run `DecodePath` (infer/decode.py: the model's math with fewer ops) unless
`fast_decode=False`, which uses `Transformer.forward` itself; prefill always uses the model's forward.
The engine reads the model's weights in place: after changing them (an RL update), call
`reset_prefix_cache()`, since cached blocks hold latents computed by the old weights. `compile=True`
compiles the decode of a lone request with `torch.compile` (seconds to compile; graphs shared by all
layers): one compiled call per layer, with the cache write and the DSA selection between calls. On
the 2-core CPU measured it decodes batch 1 1.3-1.6x faster than eager (bench/README.md); steps of
more tokens stay eager, where compiling measured no gain. With `fast_decode=False` it compiles the
model's forward instead. Eager is the default and the reference.

Not thread-safe: drive it from one thread (a server runs one engine loop and feeds it requests).
"""
from __future__ import annotations

import itertools
import random
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch

from dsv32.infer.cache import OutOfBlocks, PagedLatentCache, block_key
from dsv32.infer.decode import DecodePath
from dsv32.infer.sampling import PenaltyState, SamplingParams, TokenLogprob, choose, probabilities, token_logprob
from dsv32.infer.speculative import SpeculativeStats, verify_draft
from dsv32.model.transformer import ABSORB_MAX_QUERY_TOKENS

FINISH_STOP, FINISH_LENGTH, FINISH_ABORT = "stop", "length", "abort"


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int  # prompt tokens served from the prefix cache

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class RequestOutput:
    """What one `step()` produced for one request."""

    request_id: str
    token_ids: list[int]                     # new tokens (a stop token that ended the request included)
    text: str = ""                           # new text ("" without a tokenizer); stop strings cut off
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None  # once, with the first output
    finished: bool = False
    finish_reason: str | None = None         # "stop" | "length" | "abort"
    stop_reason: int | str | None = None     # the stop token id or stop string that ended it
    usage: Usage | None = None


@dataclass
class Completion:
    """A finished request, as `Engine.complete` returns it."""

    request_id: str
    token_ids: list[int]
    text: str
    finish_reason: str
    stop_reason: int | str | None
    usage: Usage
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None


@dataclass
class _Request:
    id: str
    prompt: list[int]
    params: SamplingParams
    arrival: int
    max_len: int                       # stop at this many tokens (prompt + output)
    generator: torch.Generator
    tokens: list[int] = field(default_factory=list)
    n_computed: int = 0
    blocks: list[int] = field(default_factory=list)
    n_registered: int = 0              # leading blocks published to the prefix cache
    parent_key: bytes = b""
    cached_tokens: int = 0
    output_ids: list[int] = field(default_factory=list)
    penalties: PenaltyState | None = None
    draft: int | None = None
    draft_probs: torch.Tensor | None = None
    detok: object | None = None
    text: str = ""
    sent: int = 0                      # characters of `text` already streamed
    prompt_logprobs: list[TokenLogprob | None] | None = None
    prompt_logprobs_sent: bool = False
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    # produced during the current step
    new_ids: list[int] = field(default_factory=list)
    new_logprobs: list[TokenLogprob] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def usage(self) -> Usage:
        return Usage(len(self.prompt), len(self.output_ids), self.cached_tokens)


class Engine:
    """Continuous-batching inference over a paged latent cache; see the module docstring."""

    def __init__(
        self,
        model,
        max_batch: int = 8,
        max_seq_len: int | None = None,
        *,
        block_size: int = 16,
        num_blocks: int | None = None,
        max_prefill_tokens: int = 512,
        prefix_caching: bool = True,
        speculative: bool = False,
        tokenizer=None,
        cache_dtype: torch.dtype | None = None,
        fast_decode: bool = True,
        compile: bool = False,
        seed: int | None = None,
    ):
        cfg = model.config
        if max_seq_len is None:
            max_seq_len = cfg.max_position_embeddings
        for name, value in (("max_batch", max_batch), ("max_seq_len", max_seq_len), ("block_size", block_size),
                            ("max_prefill_tokens", max_prefill_tokens)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if speculative and not len(model.mtp):
            raise ValueError("speculative decoding needs a model with an MTP layer (num_nextn_predict_layers >= 1)")
        self.model = model.eval()
        self.cfg = cfg
        self.max_batch, self.max_seq_len = max_batch, max_seq_len
        self.max_prefill_tokens = max_prefill_tokens
        self.prefix_caching = prefix_caching
        self.speculative = speculative
        self.tokenizer = tokenizer
        self.device = model.embed_tokens.weight.device
        blocks_per_seq = -(-(max_seq_len + (1 if speculative else 0)) // block_size)  # (+1: a draft position)
        if num_blocks is None:
            num_blocks = max_batch * blocks_per_seq + 1
        dtype = cache_dtype or model.embed_tokens.weight.dtype
        self.cache = PagedLatentCache(cfg, num_blocks, block_size, dtype=dtype, device=self.device,
                                      include_mtp=speculative)
        self.block_size = block_size
        eos = cfg.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else ([eos] if eos is not None else []))
        self.waiting: deque[_Request] = deque()
        self.running: list[_Request] = []
        self.requests: dict[str, _Request] = {}
        self._arrivals = itertools.count()
        self._ids = itertools.count()
        self._rng = random.Random(seed)
        n_moe = sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
        self.expert_load = torch.zeros(n_moe, cfg.n_routed_experts, dtype=torch.long)
        self.spec_stats = SpeculativeStats()
        self.counters = {"prompt_tokens": 0, "cached_prompt_tokens": 0, "generated_tokens": 0,
                         "preemptions": 0, "forwards": 0, "finished": 0}
        # decode steps run the fast path (infer/decode.py) unless fast_decode=False; prefill always runs
        # the model's own forward
        self.decode_path = DecodePath(model, compile=compile) if fast_decode else None
        decode_fn = self.decode_path.forward if fast_decode else self._model_decode
        self._decode_forward = torch.compile(decode_fn, dynamic=True) if compile and not fast_decode else decode_fn

    # ------------------------------------------------------------------ public API
    def add_request(self, prompt_ids: Iterable[int], params: SamplingParams | None = None,
                    request_id: str | None = None) -> str:
        """Queue a request; returns its id. Raises ValueError for requests that can never run."""
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be a SamplingParams, got {type(params).__name__}")
        prompt = [int(t) for t in prompt_ids]
        if not prompt:
            raise ValueError("the prompt is empty: give at least one token id")
        bad = [t for t in prompt if not 0 <= t < self.cfg.vocab_size]
        if bad:
            raise ValueError(f"prompt token id {bad[0]} is outside the vocabulary [0, {self.cfg.vocab_size})")
        if len(prompt) >= self.max_seq_len:
            raise ValueError(f"the prompt has {len(prompt)} tokens; this engine's max_seq_len is {self.max_seq_len} "
                             "(room for at least one generated token is needed)")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need an engine with a tokenizer")
        longest = min(len(prompt) + params.max_tokens, self.max_seq_len) + (1 if self.speculative else 0)
        blocks_needed = -(-longest // self.block_size)
        if blocks_needed > self.cache.num_blocks - 1:
            raise ValueError(f"the request can grow to {longest} positions, {blocks_needed} cache blocks; the cache "
                             f"has {self.cache.num_blocks - 1}: lower max_tokens or give the engine more blocks")
        if request_id is None:
            request_id = f"req-{next(self._ids)}"
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        seed = params.seed if params.seed is not None else self._rng.getrandbits(63)
        req = _Request(id=request_id, prompt=prompt, params=params, arrival=next(self._arrivals),
                       max_len=min(len(prompt) + params.max_tokens, self.max_seq_len),
                       generator=torch.Generator().manual_seed(seed), tokens=list(prompt))
        if params.has_penalties:
            req.penalties = PenaltyState(self.cfg.vocab_size, prompt, params)
        if self.tokenizer is not None:
            req.detok = self.tokenizer.detokenizer(skip_special=params.skip_special_tokens)
        if params.prompt_logprobs is not None:
            req.prompt_logprobs = [None]  # the first prompt token has no logprob
        self.requests[request_id] = req
        self.waiting.append(req)
        self.counters["prompt_tokens"] += len(prompt)
        return request_id

    def abort(self, request_id: str) -> RequestOutput | None:
        """Cancel a request and free its blocks; returns its final output (reason "abort"), or None if unknown."""
        req = self.requests.get(request_id)
        if req is None:
            return None
        req.finish_reason = FINISH_ABORT
        out = self._output(req)
        self._retire(req)
        return out

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        """Advance every running request by one forward; returns the outputs of those that produced something."""
        self._admit()
        touched: list[_Request] = []
        decode = []
        for req in [r for r in self.running if len(r.tokens) - r.n_computed == 1]:
            if self._reserve(req, len(req.tokens) + (1 if self.speculative else 0)):
                decode.append(req)
        decode = [r for r in decode if r in self.running]  # a later reservation may have preempted an earlier row
        if decode:
            (self._decode_speculative if self.speculative else self._decode)(decode)
            touched += decode
        budget = self.max_prefill_tokens
        for req in [r for r in self.running if len(r.tokens) - r.n_computed > 1]:
            if budget <= 0:
                break
            if req not in self.running:  # preempted by a reservation in this step
                continue
            n = min(budget, len(req.tokens) - req.n_computed)
            if not self._reserve(req, req.n_computed + n):
                continue
            self._prefill_chunk(req, n)
            budget -= n
            touched.append(req)
        outputs = []
        for req in touched:
            if req.id not in self.requests:
                continue
            self._register_blocks(req)
            out = self._output(req)
            if out is not None:
                outputs.append(out)
            if req.finished:
                self._retire(req)
        return outputs

    def generate(self, prompts: list[int] | list[list[int]], params: SamplingParams | list[SamplingParams] | None = None
                 ) -> Iterator[RequestOutput]:
        """One-shot use: run these prompts to completion, yielding every step's outputs."""
        return self._drain(self._submit(prompts, params))

    def _submit(self, prompts, params) -> list[str]:
        if self.has_unfinished():
            raise RuntimeError("generate()/complete() need an idle engine; drive add_request/step yourself to mix requests")
        if not prompts:
            raise ValueError("no prompts given")
        prompts = [prompts] if isinstance(prompts[0], int) else prompts
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        if len(params_list) != len(prompts):
            raise ValueError(f"{len(params_list)} SamplingParams for {len(prompts)} prompts")
        ids = []
        try:
            for p, sp in zip(prompts, params_list):
                ids.append(self.add_request(p, sp))
        except ValueError:
            for rid in ids:
                self.abort(rid)
            raise
        return ids

    def _drain(self, ids: list[str]) -> Iterator[RequestOutput]:
        try:
            while self.has_unfinished():
                yield from self.step()
        finally:  # a consumer that stops early must not leave requests behind
            for rid in ids:
                if rid in self.requests:
                    self.abort(rid)

    def complete(self, prompts: list[int] | list[list[int]], params: SamplingParams | list[SamplingParams] | None = None
                 ) -> list[Completion]:
        """Run prompts to completion and return one `Completion` per prompt, in order."""
        ids = self._submit(prompts, params)
        results: dict[str, Completion] = {}
        for out in self._drain(ids):
            c = results.get(out.request_id)
            if c is None:
                c = results[out.request_id] = Completion(out.request_id, [], "", "", None, out.usage)
            c.token_ids += out.token_ids
            c.text += out.text
            if out.logprobs is not None:
                c.logprobs = (c.logprobs or []) + out.logprobs
            if out.prompt_logprobs is not None:
                c.prompt_logprobs = out.prompt_logprobs
            if out.finished:
                c.finish_reason, c.stop_reason, c.usage = out.finish_reason, out.stop_reason, out.usage
        return [results[rid] for rid in ids]

    def stats(self) -> dict:
        """Serving counters: tokens, prefix-cache hits, cache occupancy, speculation, expert load."""
        pool = self.cache.pool
        return {
            **self.counters,
            "running": len(self.running), "waiting": len(self.waiting),
            "cache_blocks_used": pool.num_used, "cache_blocks_total": pool.num_blocks - 1,
            "cache_blocks_cached": len(pool.cached),
            "speculative": self.spec_stats.as_dict() if self.speculative else None,
            "expert_load": expert_load_summary(self.expert_load),
        }

    def reset_prefix_cache(self) -> None:
        self.cache.pool.reset_prefix_cache()

    # ------------------------------------------------------------------ scheduling
    def _admit(self) -> None:
        pool = self.cache.pool
        while self.waiting and len(self.running) < self.max_batch:
            req = self.waiting[0]
            hits = self._match_prefix(req)
            needed = -(-(len(req.tokens) + 1) // self.block_size) - len(hits)
            if pool.num_free < needed:
                for block in hits:
                    pool.release(block)
                if not self.running:  # add_request guarantees a lone request fits
                    raise RuntimeError("internal error: a waiting request does not fit in an empty cache")
                return
            self.waiting.popleft()
            req.blocks = hits
            req.n_registered = len(hits)
            req.n_computed = len(hits) * self.block_size
            if not req.output_ids:  # first admission (a preempted request may hit its own blocks again)
                req.cached_tokens = req.n_computed
                self.counters["cached_prompt_tokens"] += req.cached_tokens
            self.running.append(req)

    def _match_prefix(self, req: _Request) -> list[int]:
        if not self.prefix_caching or (req.params.prompt_logprobs is not None and not req.prompt_logprobs_sent):
            return []
        pool, bs = self.cache.pool, self.block_size
        blocks, parent = [], b""
        # every reused block must be followed by at least one token that is still fed (for its logits)
        for j in range((len(req.tokens) - 1) // bs):
            key = block_key(parent, req.tokens[j * bs:(j + 1) * bs], req.tokens[(j + 1) * bs])
            block = pool.lookup(key)
            if block is None:
                break
            blocks.append(block)
            parent = key
        req.parent_key = parent
        return blocks

    def _register_blocks(self, req: _Request) -> None:
        if not self.prefix_caching:
            return
        bs = self.block_size
        while (req.n_registered + 1) * bs <= req.n_computed and (req.n_registered + 1) * bs < len(req.tokens):
            j = req.n_registered
            key = block_key(req.parent_key, req.tokens[j * bs:(j + 1) * bs], req.tokens[(j + 1) * bs])
            self.cache.pool.register(req.blocks[j], key)
            req.parent_key = key
            req.n_registered += 1

    def _reserve(self, req: _Request, n_positions: int) -> bool:
        """Make sure `req` owns blocks for positions [0, n_positions); preempt others if the cache is full."""
        if req not in self.running:  # preempted earlier in this step
            return False
        pool = self.cache.pool
        while len(req.blocks) * self.block_size < n_positions:
            try:
                req.blocks.append(pool.allocate())
            except OutOfBlocks:
                victim = max(self.running, key=lambda r: r.arrival)
                self._preempt(victim)
                if victim is req:
                    return False
        return True

    def _preempt(self, req: _Request) -> None:
        for block in req.blocks:
            self.cache.pool.release(block)
        req.blocks, req.n_computed, req.n_registered, req.parent_key = [], 0, 0, b""
        req.draft = req.draft_probs = None
        if req.prompt_logprobs is not None and not req.prompt_logprobs_sent:
            req.prompt_logprobs = [None]  # not delivered yet: computed again by the new prefill
        self.running.remove(req)
        self.waiting.appendleft(req)
        self.counters["preemptions"] += 1

    def _retire(self, req: _Request) -> None:
        for block in req.blocks:
            self.cache.pool.release(block)
        req.blocks = []
        if req in self.running:
            self.running.remove(req)
        if req in self.waiting:
            self.waiting.remove(req)
        self.requests.pop(req.id, None)
        self.counters["finished"] += 1

    # ------------------------------------------------------------------ forwards
    def _run(self, rows: list[_Request], ids: torch.Tensor, positions: torch.Tensor, keep: int, decode: bool):
        """One forward over `rows`; returns (logits [batch, keep or seq, vocab] fp32, final-normed hidden, batch)."""
        batch = self.cache.batch([r.blocks for r in rows])
        ids, positions = ids.to(self.device), positions.to(self.device)
        if decode:
            logits, hidden, counts = self._decode_forward(ids, positions, batch, keep)
        else:
            out = self.model(ids, positions=positions, cache=batch, logits_to_keep=keep)
            logits, hidden, counts = out.logits, out.hidden_states, out.expert_counts
        self.counters["forwards"] += 1
        if counts is not None:
            self.expert_load += counts[: self.expert_load.shape[0]].cpu()
        return logits.float(), hidden, batch

    def _model_decode(self, ids, positions, batch, keep):
        out = self.model(ids, positions=positions, cache=batch, logits_to_keep=keep)
        return out.logits, out.hidden_states, out.expert_counts

    def _decode(self, rows: list[_Request]) -> None:
        ids = torch.tensor([[r.tokens[-1]] for r in rows])
        positions = torch.tensor([[r.n_computed] for r in rows])
        logits, _, _ = self._run(rows, ids, positions, keep=1, decode=True)
        logits = logits[:, -1]
        tokens = self._greedy_batch(rows, logits)
        for i, req in enumerate(rows):
            req.n_computed += 1
            token = tokens[i] if tokens is not None else self._sample(req, logits[i])[0]
            self._emit(req, token, logits[i])

    def _greedy_batch(self, rows: list[_Request], logits: torch.Tensor) -> list[int] | None:
        """One argmax for the whole batch when every row is plain greedy."""
        if all(r.params.greedy and r.penalties is None for r in rows):
            return logits.argmax(-1).tolist()
        return None

    def _sample(self, req: _Request, logits: torch.Tensor, extra: int | None = None):
        return choose(logits, req.params, req.generator, req.penalties, extra)

    def _prefill_chunk(self, req: _Request, n: int) -> None:
        start = req.n_computed
        ids = torch.tensor([req.tokens[start:start + n]])
        positions = torch.arange(start, start + n)[None]
        want_prompt_lp = req.params.prompt_logprobs is not None and not req.prompt_logprobs_sent
        final = start + n == len(req.tokens)
        logits, hidden, batch = self._run([req], ids, positions, keep=0 if want_prompt_lp else 1, decode=False)
        logits = logits[0]  # [n or 1, vocab]
        if want_prompt_lp:
            self._prompt_logprobs(req, start, n, logits)
        req.n_computed += n
        if final:
            self._emit(req, self._sample(req, logits[-1])[0], logits[-1])
        if self.speculative and len(req.tokens) > start + n:
            # the MTP layer's cache follows the main model's (also when the request just finished: its
            # blocks go to the prefix cache); at the end of the prompt the MTP layer drafts
            nxt = req.tokens[start + 1:start + n + 1]
            pick = torch.tensor([n - 1]) if final and not req.finished else None
            mtp_logits = self._mtp(batch, hidden, torch.tensor([nxt]), positions, pick)
            if mtp_logits is not None:
                self._set_draft(req, mtp_logits[0])

    def _prompt_logprobs(self, req: _Request, start: int, n: int, logits: torch.Tensor) -> None:
        if req.prompt_logprobs is None:
            req.prompt_logprobs = [None]  # the first prompt token has no logprob
        lp = torch.log_softmax(logits, dim=-1)
        k = req.params.prompt_logprobs
        for i in range(n):
            pos = start + i + 1
            if pos < len(req.prompt):
                req.prompt_logprobs.append(token_logprob(lp[i], req.prompt[pos], k))

    # ------------------------------------------------------------------ speculative decoding
    def _mtp(self, batch, hidden: torch.Tensor, next_ids: torch.Tensor, positions: torch.Tensor,
             pick: torch.Tensor | None, decode: bool = False) -> torch.Tensor | None:
        """Run the first MTP layer at `positions` on (main final-normed `hidden`, embedding of the next token),
        writing its cache layer; returns the logits [batch, vocab] at position index `pick` [batch] of each
        row (None when `pick` is None: only the cache entries are wanted)."""
        next_ids, positions = next_ids.to(self.device), positions.to(self.device)
        if decode and self.decode_path is not None:
            logits = self.decode_path.mtp(hidden, next_ids, positions, batch, pick)
            return logits.float() if logits is not None else None
        model = self.model
        mtp = model.mtp[0]
        impl = "absorbed" if positions.shape[1] <= ABSORB_MAX_QUERY_TOKENS else "expanded"
        ctx = model._context(positions, batch, None, impl, None)
        h, _ = mtp(hidden, model.embed_tokens(next_ids), ctx, batch.layer(self.cfg.num_hidden_layers))
        if pick is None:
            return None
        h = h[torch.arange(h.shape[0], device=h.device), pick.to(h.device)]
        return model.lm_head(mtp.shared_head.norm(h)).float()

    def _set_draft(self, req: _Request, logits: torch.Tensor) -> None:
        req.draft, req.draft_probs = self._sample(req, logits)

    def _decode_speculative(self, rows: list[_Request]) -> None:
        # every row feeds [last token, draft] at [m-1, m]; a row without a draft feeds a placeholder
        ids = torch.tensor([[r.tokens[-1], r.draft if r.draft is not None else r.tokens[-1]] for r in rows])
        positions = torch.tensor([[r.n_computed, r.n_computed + 1] for r in rows])
        logits, hidden, batch = self._run(rows, ids, positions, keep=2, decode=True)  # logits [batch, 2, vocab]
        greedy = self._greedy_batch(rows, logits.flatten(0, 1))
        take = []  # per row: which of the two MTP positions drafts next
        for i, req in enumerate(rows):
            stats = self.spec_stats
            stats.steps += 1
            before = len(req.output_ids)
            if req.draft is None:
                token = greedy[2 * i] if greedy is not None else self._sample(req, logits[i, 0])[0]
                req.n_computed += 1
                self._emit(req, token, logits[i, 0])
                accepted = False
            else:
                stats.drafted += 1
                accepted, token = self._verify(req, logits[i], greedy[2 * i] if greedy is not None else None)
                req.n_computed += 1
                self._emit(req, token, logits[i, 0])
                if accepted:
                    stats.accepted += 1
                    if not req.finished:
                        bonus = greedy[2 * i + 1] if greedy is not None else self._sample(req, logits[i, 1])[0]
                        req.n_computed += 1
                        self._emit(req, bonus, logits[i, 1])
            stats.emitted += len(req.output_ids) - before
            req.draft = req.draft_probs = None
            take.append(1 if accepted else 0)
        # MTP over [m-1, m]: (h_{m-1}, x_m) and, when the draft was kept, (h_m, x_{m+1}); in a batch where
        # some rows kept theirs, the others' second entry is a placeholder that the next step overwrites.
        # When no row kept its draft only m-1 runs (two tokens would route to twice the experts). Finished
        # rows run too, so that their blocks enter the prefix cache with valid MTP entries.
        width = 2 if any(take) else 1
        m = [int(p) for p in positions[:, 1]]
        nxt = torch.tensor([[r.tokens[m[i]], r.tokens[-1]] for i, r in enumerate(rows)])
        mtp_logits = self._mtp(batch, hidden[:, :width], nxt[:, :width], positions[:, :width], torch.tensor(take),
                               decode=True)
        for i, req in enumerate(rows):
            if not req.finished:
                self._set_draft(req, mtp_logits[i])

    def _verify(self, req: _Request, logits: torch.Tensor, greedy_token: int | None) -> tuple[bool, int]:
        if greedy_token is not None:
            return verify_draft(req.draft, None, None, req.generator, greedy_token)
        params = req.params
        row = req.penalties.apply(logits[0]) if req.penalties is not None else logits[0]
        if params.greedy:
            return verify_draft(req.draft, None, None, req.generator, int(row.argmax()))
        return verify_draft(req.draft, probabilities(row, params), req.draft_probs, req.generator)

    # ------------------------------------------------------------------ outputs
    def _emit(self, req: _Request, token: int, logits: torch.Tensor) -> None:
        """Append a sampled token and apply the stop rules (token ids, strings, lengths)."""
        if req.finished:
            return
        if len(req.output_ids) >= req.params.max_tokens:  # max_tokens=0: prompt only (e.g. to score it)
            req.finish_reason = FINISH_LENGTH
            return
        req.tokens.append(token)
        req.output_ids.append(token)
        req.new_ids.append(token)
        self.counters["generated_tokens"] += 1
        if req.params.logprobs is not None:
            lp = torch.log_softmax(logits.float(), dim=-1)
            req.new_logprobs.append(token_logprob(lp, token, req.params.logprobs))
        if req.penalties is not None:
            req.penalties.add(token)
        is_stop_token = token in req.params.stop_token_ids or (token in self.eos_ids and not req.params.ignore_eos)
        if is_stop_token:
            req.finish_reason, req.stop_reason = FINISH_STOP, token
        elif req.detok is not None:
            piece = req.detok.push(token)
            if piece:
                self._append_text(req, piece)
        if not req.finished and len(req.tokens) >= req.max_len:
            req.finish_reason = FINISH_LENGTH
        if req.finished and req.detok is not None and not isinstance(req.stop_reason, str):
            tail = req.detok.flush()  # an unfinished UTF-8 character at the very end
            if tail:
                self._append_text(req, tail)

    def _append_text(self, req: _Request, piece: str) -> None:
        if isinstance(req.stop_reason, str):
            return  # already cut at a stop string
        start = len(req.text)
        req.text += piece
        stops = req.params.stop
        if not stops:
            return
        longest = max(len(s) for s in stops)
        window = max(0, start - longest + 1)
        best = None
        for s in stops:
            at = req.text.find(s, window)
            if at >= 0 and (best is None or at < best[0]):
                best = (at, s)
        if best is not None:
            at, s = best
            req.text = req.text[: at + (len(s) if req.params.include_stop_str_in_output else 0)]
            req.finish_reason, req.stop_reason = FINISH_STOP, s

    def _output(self, req: _Request) -> RequestOutput | None:
        text = ""
        if req.detok is not None:
            end = len(req.text) if req.finished else len(req.text) - _held_back(req.text, req.params.stop)
            if end > req.sent:
                text = req.text[req.sent:end]
                req.sent = end
        prompt_lp = None
        if req.prompt_logprobs is not None and not req.prompt_logprobs_sent:
            if len(req.prompt_logprobs) == len(req.prompt) or req.finished:
                prompt_lp, req.prompt_logprobs_sent = req.prompt_logprobs, True
        if not (req.new_ids or text or prompt_lp or req.finished):
            return None  # a prefill chunk that produced nothing visible yet
        out = RequestOutput(
            request_id=req.id, token_ids=req.new_ids, text=text,
            logprobs=req.new_logprobs if req.params.logprobs is not None else None,
            prompt_logprobs=prompt_lp, finished=req.finished, finish_reason=req.finish_reason,
            stop_reason=req.stop_reason, usage=req.usage(),
        )
        req.new_ids, req.new_logprobs = [], []
        return out


def _held_back(text: str, stops: list[str]) -> int:
    """Length of the longest suffix of `text` that could still grow into a stop string."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if s.startswith(text[-n:]):
                best = n
                break
    return best


def expert_load_summary(load: torch.Tensor) -> dict:
    """Per-layer expert token counts from serving traffic, with starvation indicators."""
    if load.numel() == 0:
        return {"tokens_per_expert": [], "starved_experts": [], "max_over_mean": []}
    mean = load.float().mean(-1).clamp_min(1e-9)
    return {
        "tokens_per_expert": load.tolist(),
        "starved_experts": [torch.nonzero(row == 0).flatten().tolist() for row in load],
        "max_over_mean": [round(v, 3) for v in (load.float().max(-1).values / mean).tolist()],
    }

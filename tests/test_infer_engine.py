"""The inference engine: batching, chunked prefill, prefix caching, the paged cache, DSA at decode,
speculative decoding, preemption, cancellation, statistics.

Ground truth is greedy decoding by full recomputation (`reference_greedy`): every engine mode must
give exactly those tokens.
"""
import pytest
import torch

from dsv32.infer import Engine, SamplingParams
from dsv32.infer.cache import BlockPool, OutOfBlocks, PagedLatentCache, PagedLayer
from infer_common import nano, nano_model, periodic_model, prompts_for, reference_greedy, single_thread  # noqa: F401

GREEDY = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
LENGTHS = (3, 17, 40, 9)  # nano's index_topk is 16: most of these decode with sparse DSA


@pytest.fixture(scope="module")
def model():
    return nano_model()


@pytest.fixture(scope="module")
def prompts(model):
    return prompts_for(model.config, LENGTHS)


@pytest.fixture(scope="module")
def expected(model, prompts):
    return [reference_greedy(model, p, GREEDY.max_tokens) for p in prompts]


def engine(model, **kw) -> Engine:
    kw.setdefault("max_batch", 4)
    kw.setdefault("max_seq_len", 96)
    kw.setdefault("block_size", 8)
    return Engine(model, **kw)


def run_staggered(eng: Engine, prompts, params, arrivals):
    """Add prompt i at step arrivals[i]; returns the tokens of each, in order."""
    ids, tokens, step = {}, {}, 0
    while len(ids) < len(prompts) or eng.has_unfinished():
        for i, at in enumerate(arrivals):
            if at == step:
                ids[eng.add_request(prompts[i], params)] = i
        for out in eng.step():
            tokens.setdefault(ids[out.request_id], []).extend(out.token_ids)
        step += 1
        assert step < 500
    return [tokens[i] for i in range(len(prompts))]


# ---------------------------------------------------------------------- equivalences (acceptance)
def test_batched_equals_one_by_one_equals_recompute(model, prompts, expected):
    batched = engine(model).complete(prompts, GREEDY)
    assert [c.token_ids for c in batched] == expected
    for p, want in zip(prompts, expected):
        assert engine(model, max_batch=1).complete(p, GREEDY)[0].token_ids == want
    assert all(c.finish_reason == "length" and c.usage.completion_tokens == 10 for c in batched)


def test_staggered_arrivals_equal_isolated_runs(model, prompts, expected):
    # requests join while others decode; max_batch=2 also makes some wait for a free slot
    got = run_staggered(engine(model, max_batch=2), prompts, GREEDY, arrivals=[0, 2, 3, 7])
    assert got == expected


def test_chunked_prefill_equals_whole_prefill(model, prompts, expected):
    eng = engine(model, max_prefill_tokens=6)  # 40-token prompt: 7 chunks, interleaved with decoding
    got = run_staggered(eng, prompts, GREEDY, arrivals=[0, 0, 1, 5])
    assert got == expected


def test_prefix_cache_hits_equal_cold_runs(model):
    cfg = model.config
    base = prompts_for(cfg, [35], seed=7)[0]
    variants = [base + [5, 6, 7], base + [9], base[:20] + [11, 12]]
    cold = [reference_greedy(model, p, 8) for p in variants]
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    eng = engine(model)
    first = eng.complete(base, params)[0]
    assert first.usage.cached_tokens == 0
    warm = eng.complete(variants, params)
    assert [c.token_ids for c in warm] == cold
    # reused: whole 8-token blocks of the shared prefix, leaving at least one prompt token to feed
    assert [c.usage.cached_tokens for c in warm] == [32, 32, 16]
    assert eng.stats()["cached_prompt_tokens"] == 80
    off = engine(model, prefix_caching=False)
    off.complete(base, params)
    assert [c.usage.cached_tokens for c in off.complete(variants, params)] == [0, 0, 0]


def test_generated_tokens_enter_the_prefix_cache_too(model):
    """A follow-up turn (prompt + reply + more) reuses the blocks the first request generated."""
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    eng = engine(model)
    prompt = prompts_for(model.config, [10], seed=3)[0]
    reply = eng.complete(prompt, params)[0].token_ids
    follow = prompt + reply + [4, 5, 6]
    again = eng.complete(follow, params)[0]
    # 30 tokens were known (10 + 20), 29 of them computed: three full 8-token blocks (24) entered the cache
    assert again.usage.cached_tokens == 24
    assert again.token_ids == reference_greedy(model, follow, 20)


def test_speculative_greedy_equals_plain_with_accepts_and_rejects(model, prompts, expected):
    # random weights: the MTP draft is almost always wrong (reject path)
    eng = engine(model, speculative=True)
    assert [c.token_ids for c in eng.complete(prompts, GREEDY)] == expected
    assert eng.spec_stats.drafted > 0
    # trained on a deterministic rule: drafts are right (accept path, two tokens per step)
    trained = periodic_model()
    ps = prompts_for(trained.config, (5, 12, 30))
    want = [reference_greedy(trained, p, 12) for p in ps]
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    eng = engine(trained, speculative=True)
    assert [c.token_ids for c in eng.complete(ps, params)] == want
    stats = eng.stats()["speculative"]
    assert stats["acceptance_rate"] > 0.9 and stats["tokens_per_step"] > 1.8


def test_speculative_mixed_accept_and_reject_in_one_batch(monkeypatch):
    """Corrupt every third draft: rows of one batch accept and reject in the same step."""
    trained = periodic_model()
    ps = prompts_for(trained.config, (5, 12, 30, 7))
    params = SamplingParams(max_tokens=15, temperature=0, ignore_eos=True)
    want = [reference_greedy(trained, p, 15) for p in ps]
    eng = engine(trained, speculative=True)
    original, calls = eng._set_draft, [0]

    def corrupting(req, logits):
        original(req, logits)
        calls[0] += 1
        if calls[0] % 3 == 0:
            req.draft = (req.draft + 1) % trained.config.vocab_size

    monkeypatch.setattr(eng, "_set_draft", corrupting)
    assert [c.token_ids for c in eng.complete(ps, params)] == want
    rate = eng.spec_stats.acceptance_rate
    assert 0.4 < rate < 0.9


def test_speculative_prefix_hits_reuse_mtp_entries():
    trained = periodic_model()
    base = prompts_for(trained.config, [26], seed=5)[0]
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    eng = engine(trained, speculative=True)
    eng.complete(base, params)
    warm = eng.complete(base[:25] + [7], params)[0]
    assert warm.usage.cached_tokens == 24
    assert warm.token_ids == reference_greedy(trained, base[:25] + [7], 10)
    assert eng.spec_stats.acceptance_rate > 0.9  # the MTP layer's cached entries are valid


# ---------------------------------------------------------------------- the paged cache
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("include_mtp", [False, True])
@pytest.mark.parametrize("model_type", ["deepseek_v32", "deepseek_v3"])
def test_cache_bytes_per_token_equal_the_config_accounting(dtype, include_mtp, model_type):
    cfg = nano(model_type=model_type)
    cache = PagedLatentCache(cfg, num_blocks=5, block_size=4, dtype=dtype, include_mtp=include_mtp)
    per_token = cfg.kv_cache_bytes_per_token(dtype, include_mtp=include_mtp)
    assert cache.bytes_per_token() == per_token
    assert cache.nbytes() == per_token * 5 * 4  # nothing else is stored


def test_engine_cache_holds_mtp_layers_only_when_speculating(model):
    cfg = model.config
    assert engine(model).cache.bytes_per_token() == cfg.kv_cache_bytes_per_token(torch.float32)
    assert engine(model, speculative=True).cache.bytes_per_token() == \
        cfg.kv_cache_bytes_per_token(torch.float32, include_mtp=True)


def test_block_pool_sharing_eviction_and_reuse():
    pool = BlockPool(4)  # blocks 1..3 usable
    a, b = pool.allocate(), pool.allocate()
    pool.register(a, b"ka")
    assert pool.lookup(b"ka") == a and pool.ref[a] == 2  # shared
    pool.release(a)
    pool.release(a)
    assert pool.num_free == 2 and a in pool.evictable  # freed, still cached
    assert pool.lookup(b"ka") == a and pool.num_free == 1  # found again
    pool.release(a)
    c, d = pool.allocate(), pool.allocate()  # the free block first, then the cached one is evicted
    assert d == a and pool.lookup(b"ka") is None
    with pytest.raises(OutOfBlocks):
        pool.allocate()
    for blk in (b, c, d):
        pool.release(blk)
    assert pool.num_free == 3 and pool.num_used == 0
    with pytest.raises(RuntimeError, match="released more often"):
        pool.release(b)


def test_finished_and_aborted_requests_free_their_blocks(model, prompts):
    eng = engine(model, prefix_caching=False)
    total = eng.cache.pool.num_free
    rid = eng.add_request(prompts[2], SamplingParams(max_tokens=50, temperature=0, ignore_eos=True))
    eng.add_request(prompts[1], GREEDY)
    for _ in range(3):
        eng.step()
    assert eng.cache.pool.num_free < total
    final = eng.abort(rid)
    assert final.finished and final.finish_reason == "abort" and final.usage.completion_tokens == 3
    assert eng.abort(rid) is None and eng.abort("nope") is None
    while eng.has_unfinished():
        eng.step()
    assert eng.cache.pool.num_free == total


@pytest.mark.parametrize("chunk", [512, 6])
def test_preemption_when_the_cache_is_full_keeps_outputs_exact(model, prompts, expected, chunk):
    # 9 usable blocks of 8 tokens for 4 requests that need up to 7 each: some get preempted and redone,
    # also in the middle of a prefill that collects prompt logprobs
    eng = engine(model, num_blocks=10, max_prefill_tokens=chunk)
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, prompt_logprobs=0)
    done = eng.complete(prompts, params)
    assert [c.token_ids for c in done] == expected
    assert eng.counters["preemptions"] > 0
    for p, c in zip(prompts, done):
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([p])).logits[0], -1)
        assert len(c.prompt_logprobs) == len(p)
        want = [float(lp[i - 1, p[i]]) for i in range(1, len(p))]
        assert [e.logprob for e in c.prompt_logprobs[1:]] == pytest.approx(want, abs=1e-4)


# ---------------------------------------------------------------------- DSA at decode
@pytest.mark.parametrize("fast_decode", [True, False])
def test_dsa_decode_attends_at_most_index_topk_entries(model, monkeypatch, fast_decode):
    """At 300 tokens of context (index_topk = 16) each decode step reads 16 latents per layer, never all
    (the fast decode path and the model's own forward alike)."""
    cfg = model.config
    prompt = prompts_for(cfg, [300], seed=11)[0]
    reads, gathers = [], []
    real_read, real_gather = PagedLayer.read_kv, PagedLayer.gather_kv  # every latent read goes through these

    def spy_read(self, n_keys):
        reads.append(n_keys)
        return real_read(self, n_keys)

    def spy_gather(self, selected):
        gathers.append(tuple(selected.shape))
        return real_gather(self, selected)

    eng = Engine(model, max_batch=1, max_seq_len=320, block_size=16, max_prefill_tokens=512, fast_decode=fast_decode)
    rid = eng.add_request(prompt, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
    out = eng.step()  # prefill (expanded path: 300 queries, masked to their top-k)
    monkeypatch.setattr(PagedLayer, "read_kv", spy_read)
    monkeypatch.setattr(PagedLayer, "gather_kv", spy_gather)
    tokens = list(out[0].token_ids)
    while eng.has_unfinished():
        for o in eng.step():
            tokens += o.token_ids
    assert reads == []  # no decode step read the full latent cache
    assert len(gathers) == 5 * cfg.num_hidden_layers
    assert all(shape == (1, 1, cfg.index_topk) for shape in gathers)
    assert tokens == reference_greedy(model, prompt, 6)  # and the result is the full model's
    assert rid not in eng.requests


def test_dense_v3_decode_reads_the_whole_context(monkeypatch):
    model = nano_model(model_type="deepseek_v3")
    prompt = prompts_for(model.config, [40])[0]
    reads = []
    real_read = PagedLayer.read_kv
    monkeypatch.setattr(PagedLayer, "read_kv", lambda self, n: reads.append(n) or real_read(self, n))
    got = engine(model).complete(prompt, SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))[0]
    assert got.token_ids == reference_greedy(model, prompt, 3)
    assert reads[-1] == 42  # the last decode step attended all 42 cached positions


# ---------------------------------------------------------------------- statistics and errors
def test_expert_load_counts_every_routed_token(model, prompts):
    eng = engine(model)
    done = eng.complete(prompts, GREEDY)
    cfg = model.config
    fed = sum(len(p) for p in prompts) + sum(c.usage.completion_tokens - 1 for c in done)
    load = eng.expert_load
    n_moe = sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
    assert load.shape == (n_moe, cfg.n_routed_experts)
    assert load.sum(-1).tolist() == [fed * cfg.num_experts_per_tok] * n_moe
    summary = eng.stats()["expert_load"]
    assert summary["tokens_per_expert"] == load.tolist() and len(summary["max_over_mean"]) == n_moe


def test_bad_requests_are_clear_errors(model):
    eng = engine(model)
    with pytest.raises(ValueError, match="empty"):
        eng.add_request([])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        eng.add_request([1, 99999])
    with pytest.raises(ValueError, match="max_seq_len"):
        eng.add_request(list(range(2, 98)))
    with pytest.raises(ValueError, match="cache blocks"):
        engine(model, num_blocks=4).add_request([2] * 20, SamplingParams(max_tokens=20))
    with pytest.raises(ValueError, match="tokenizer"):
        eng.add_request([2, 3], SamplingParams(stop=["x"]))
    rid = eng.add_request([2, 3], request_id="a")
    with pytest.raises(ValueError, match="already in use"):
        eng.add_request([2, 3], request_id=rid)
    with pytest.raises(ValueError, match="SamplingParams"):
        eng.add_request([2, 3], {"temperature": 0})
    with pytest.raises(RuntimeError, match="idle engine"):
        eng.complete([2, 3])
    with pytest.raises(ValueError, match="MTP"):
        Engine(nano_model(num_nextn_predict_layers=0), speculative=True)
    with pytest.raises(ValueError, match="max_batch"):
        Engine(model, max_batch=0)


def test_compiled_engine_decodes_like_the_reference():
    """`Engine(compile=True)` on a V3 model: one request alone (the compiled one-token steps) and three
    arriving at different steps (eager steps at batch 2 and 3, compiled ones while a request runs alone)
    give the greedy tokens of plain recomputation."""
    torch._dynamo.reset()
    v3 = nano_model(model_type="deepseek_v3")
    ps = prompts_for(v3.config, LENGTHS[:3])
    want = [reference_greedy(v3, p, GREEDY.max_tokens) for p in ps]
    assert engine(v3, compile=True).complete(ps[0], GREEDY)[0].token_ids == want[0]
    assert run_staggered(engine(v3, compile=True), ps, GREEDY, [0, 2, 5]) == want
    torch._dynamo.reset()

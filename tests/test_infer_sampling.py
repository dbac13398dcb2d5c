"""Sampling: parameters, logit processing, seeds, stops, logprobs, and the speculative accept rule."""
import pytest
import torch

from dsv32.infer import Engine, SamplingParams
from dsv32.infer.sampling import PenaltyState, probabilities
from dsv32.infer.speculative import verify_draft
from infer_common import nano_model, prompts_for, reference_greedy, single_thread, tiny_tokenizer  # noqa: F401


@pytest.fixture(scope="module")
def model():
    return nano_model()


def engine(model, **kw):
    kw.setdefault("max_batch", 4)
    kw.setdefault("max_seq_len", 96)
    kw.setdefault("block_size", 8)
    return Engine(model, **kw)


# ---------------------------------------------------------------------- parameters and processing
@pytest.mark.parametrize("bad, match", [
    (dict(temperature=-1), "temperature"), (dict(top_p=0), "top_p"), (dict(top_p=1.5), "top_p"),
    (dict(top_k=-1), "top_k"), (dict(min_p=2), "min_p"), (dict(max_tokens=-1), "max_tokens"),
    (dict(presence_penalty=3), "presence_penalty"), (dict(frequency_penalty=float("nan")), "frequency_penalty"),
    (dict(repetition_penalty=0), "repetition_penalty"), (dict(logprobs=21), "logprobs"),
    (dict(prompt_logprobs=-1), "prompt_logprobs"), (dict(stop=[""]), "stop"), (dict(seed=1.5), "seed"),
])
def test_bad_sampling_params_are_rejected(bad, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**bad)


def test_stop_may_be_a_single_string():
    assert SamplingParams(stop="END").stop == ["END"]


def test_top_k_top_p_min_p_and_temperature():
    logits = torch.log(torch.tensor([0.5, 0.25, 0.15, 0.1]))
    p = probabilities(logits, SamplingParams(top_k=2))
    assert torch.allclose(p, torch.tensor([2 / 3, 1 / 3, 0, 0]))
    # top_p 0.7: 0.5 alone is short of it, 0.5 + 0.25 reaches it
    p = probabilities(logits, SamplingParams(top_p=0.7))
    assert torch.allclose(p, torch.tensor([2 / 3, 1 / 3, 0, 0]))
    p = probabilities(logits, SamplingParams(top_p=0.75))
    assert torch.allclose(p, torch.tensor([2 / 3, 1 / 3, 0, 0]))
    p = probabilities(logits, SamplingParams(top_p=0.76))
    assert (p > 0).tolist() == [True, True, True, False]
    p = probabilities(logits, SamplingParams(min_p=0.3))  # keeps p >= 0.15
    assert torch.allclose(p, torch.tensor([0.5, 0.25, 0.15, 0]) / 0.9)
    hot = probabilities(logits, SamplingParams(temperature=2.0))
    assert torch.allclose(hot, torch.softmax(logits / 2, -1))
    assert SamplingParams(temperature=0).greedy and SamplingParams(top_k=1).greedy


def test_penalties_by_hand():
    params = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25, repetition_penalty=2.0)
    state = PenaltyState(5, prompt=[0], params=params)
    for t in (1, 1, 2):
        state.add(t)
    logits = torch.tensor([1.0, 2.0, -1.0, 3.0, -2.0])
    got = state.apply(logits)
    # token 0: prompt only -> repetition 1/2; token 1: twice -> /2 then -0.5 - 0.5; token 2: -1*2 - 0.5 - 0.25
    assert torch.allclose(got, torch.tensor([0.5, 0.0, -2.75, 3.0, -2.0]))
    with_extra = state.apply(logits, extra=3)  # one more generated token, without changing the state
    assert torch.allclose(with_extra[3], torch.tensor(3.0 / 2 - 0.75)) and torch.equal(state.apply(logits), got)


def test_penalties_change_greedy_output(model):
    prompt = prompts_for(model.config, [12])[0]
    plain = engine(model).complete(prompt, SamplingParams(max_tokens=30, temperature=0, ignore_eos=True))[0]
    rep = engine(model).complete(prompt, SamplingParams(max_tokens=30, temperature=0, ignore_eos=True,
                                                        frequency_penalty=2.0, presence_penalty=2.0))[0]
    assert rep.token_ids != plain.token_ids
    assert len(set(rep.token_ids)) >= len(set(plain.token_ids))


# ---------------------------------------------------------------------- seeds
SAMPLED = dict(temperature=0.9, top_p=0.9, top_k=50, min_p=0.01, repetition_penalty=1.1, max_tokens=12, ignore_eos=True)


def test_a_seed_gives_the_same_tokens_batched_or_alone(model):
    cfg = model.config
    ps = prompts_for(cfg, (5, 20, 33))
    params = [SamplingParams(seed=100 + i, **SAMPLED) for i in range(3)]
    batched = engine(model).complete(ps, params)
    for p, sp, got in zip(ps, params, batched):
        assert engine(model, max_batch=1).complete(p, sp)[0].token_ids == got.token_ids
    other = engine(model).complete(ps[1], SamplingParams(seed=999, **SAMPLED))[0]
    assert other.token_ids != batched[1].token_ids


def test_a_seed_gives_the_same_tokens_with_speculation_batched_or_alone(model):
    # random weights: the MTP distribution differs from the main one, so drafts are kept or rejected at random
    ps = prompts_for(model.config, (5, 20))
    params = [SamplingParams(seed=7 + i, temperature=1.0, max_tokens=20, ignore_eos=True) for i in range(2)]
    eng = engine(model, speculative=True)
    batched = eng.complete(ps, params)
    assert 0 < eng.spec_stats.acceptance_rate < 1
    for p, sp, got in zip(ps, params, batched):
        assert engine(model, max_batch=1, speculative=True).complete(p, sp)[0].token_ids == got.token_ids


# ---------------------------------------------------------------------- stopping
def test_stop_token_ids_and_eos(model):
    prompt = prompts_for(model.config, [12])[0]
    free = reference_greedy(model, prompt, 10)
    stop_id = free[4]
    first = free.index(stop_id)
    got = engine(model).complete(prompt, SamplingParams(max_tokens=10, temperature=0, stop_token_ids=[stop_id]))[0]
    assert got.token_ids == free[:first + 1] and got.finish_reason == "stop" and got.stop_reason == stop_id
    # the model's EOS (id 1) stops by default; ignore_eos generates through it
    eos_model_engine = engine(model)
    eos_model_engine.eos_ids = {stop_id}
    got = eos_model_engine.complete(prompt, SamplingParams(max_tokens=10, temperature=0))[0]
    assert got.token_ids == free[:first + 1] and got.finish_reason == "stop"
    got = eos_model_engine.complete(prompt, SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))[0]
    assert got.token_ids == free and got.finish_reason == "length"


def test_max_seq_len_ends_with_length(model):
    prompt = prompts_for(model.config, [20])[0]
    got = engine(model, max_seq_len=24).complete(prompt, SamplingParams(max_tokens=50, temperature=0, ignore_eos=True))[0]
    assert len(got.token_ids) == 4 and got.finish_reason == "length"


@pytest.fixture(scope="module")
def text_engine_run(model):
    tok = tiny_tokenizer()
    prompt = tok.encode("Hello world! The quick brown fox")
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    full = engine(model, tokenizer=tok).complete(prompt, params)[0]
    return tok, prompt, full


def test_streamed_text_is_the_decoded_tokens(model, text_engine_run):
    tok, prompt, full = text_engine_run
    assert full.text == tok.decode(full.token_ids, skip_special=True)
    assert len(full.text) > 10


@pytest.mark.parametrize("include", [False, True])
def test_stop_strings_cut_the_text_and_never_leak_while_streaming(model, text_engine_run, include):
    tok, prompt, full = text_engine_run
    stop = full.text[len(full.text) // 2: len(full.text) // 2 + 3]
    cut = full.text.index(stop)
    eng = engine(model, tokenizer=tok)
    pieces, last = [], None
    for out in eng.generate(prompt, SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, stop=[stop, "\x00never"],
                                                   include_stop_str_in_output=include)):
        pieces.append(out.text)
        last = out
    text = "".join(pieces)
    assert text == full.text[:cut + (len(stop) if include else 0)]
    assert last.finish_reason == "stop" and last.stop_reason == stop
    assert sum(len(p) for p in pieces[:-1]) <= cut  # nothing past the cut was streamed before the end


# ---------------------------------------------------------------------- logprobs
def test_logprobs_and_prompt_logprobs_equal_the_full_forward(model):
    prompt = prompts_for(model.config, [14])[0]
    n_top = 3
    got = engine(model).complete(prompt, SamplingParams(max_tokens=5, temperature=0, ignore_eos=True,
                                                        logprobs=n_top, prompt_logprobs=2))[0]
    seq = torch.tensor([prompt + got.token_ids])
    with torch.no_grad():
        lp = torch.log_softmax(model(seq).logits[0].float(), -1)
    assert len(got.logprobs) == 5
    for i, entry in enumerate(got.logprobs):
        row = lp[len(prompt) - 1 + i]
        assert entry.token_id == got.token_ids[i]
        assert entry.logprob == pytest.approx(float(row[entry.token_id]), abs=1e-4)
        values, ids = row.topk(n_top)
        assert [t for t, _ in entry.top_logprobs] == ids.tolist()
        assert [v for _, v in entry.top_logprobs] == pytest.approx(values.tolist(), abs=1e-4)
        assert entry.logprob == pytest.approx(entry.top_logprobs[0][1], abs=1e-6)  # greedy: the best one
    assert got.prompt_logprobs[0] is None and len(got.prompt_logprobs) == len(prompt)
    for pos in range(1, len(prompt)):
        entry = got.prompt_logprobs[pos]
        assert entry.token_id == prompt[pos]
        assert entry.logprob == pytest.approx(float(lp[pos - 1, prompt[pos]]), abs=1e-4)
        assert len(entry.top_logprobs) == 2


def test_prompt_scoring_with_max_tokens_zero_across_chunks(model):
    """The server's `echo` + `max_tokens=0`: prompt logprobs only, also when prefilled in chunks."""
    prompt = prompts_for(model.config, [30])[0]
    eng = engine(model, max_prefill_tokens=7)
    got = eng.complete(prompt, SamplingParams(max_tokens=0, prompt_logprobs=0))[0]
    assert got.token_ids == [] and got.finish_reason == "length" and got.usage.completion_tokens == 0
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([prompt])).logits[0].float(), -1)
    want = [float(lp[i - 1, prompt[i]]) for i in range(1, len(prompt))]
    assert [e.logprob for e in got.prompt_logprobs[1:]] == pytest.approx(want, abs=1e-4)
    assert not eng.has_unfinished() and eng.cache.pool.num_used == 0


# ---------------------------------------------------------------------- the speculative rule
def test_accept_resample_rule_keeps_the_target_distribution():
    """Draw d ~ q, apply the rule: the emitted token must be distributed as p, whatever q is."""
    p = torch.tensor([0.5, 0.2, 0.2, 0.1, 0.0])
    q = torch.tensor([0.1, 0.5, 0.1, 0.1, 0.2])
    g = torch.Generator().manual_seed(0)
    n = 20000
    drafts = torch.multinomial(q, n, replacement=True, generator=g).tolist()
    counts = torch.zeros(5)
    accepted = 0
    for d in drafts:
        ok, token = verify_draft(d, p, q, g)
        counts[token] += 1
        accepted += ok
    assert torch.allclose(counts / n, p, atol=0.012)
    assert accepted / n == pytest.approx(float(torch.minimum(p, q).sum()), abs=0.015)  # E[accept] = sum min(p, q)


def test_greedy_rule():
    g = torch.Generator()
    assert verify_draft(3, None, None, g, greedy_token=3) == (True, 3)
    assert verify_draft(3, None, None, g, greedy_token=4) == (False, 4)
    with pytest.raises(ValueError):
        verify_draft(3, None, None, g)

"""Weight-only int8: per-channel quantisation error, which modules are swapped, engine use, perplexity."""
import copy

import pytest
import torch
from torch import nn

from dsv32.infer import Engine, SamplingParams
from dsv32.infer.quant import Int8Experts, Int8Linear, perplexity, quantize_int8, quantize_per_channel, weight_bytes
from dsv32.model.layers import Linear
from dsv32.model.moe import Experts, Router
from infer_common import nano, nano_model, periodic_model, prompts_for, reference_greedy, single_thread, successor  # noqa: F401


def test_per_channel_round_trip_error_is_at_most_half_a_step():
    w = torch.randn(48, 40) * torch.logspace(-3, 0, 48)[:, None]  # rows of very different scale
    q, scale = quantize_per_channel(w)
    assert q.dtype == torch.int8 and scale.shape == (48,)
    assert (q.float() * scale[:, None] - w).abs().le(scale[:, None] / 2 + 1e-9).all()
    assert q.abs().amax(dim=1).eq(127).all()  # each channel uses its whole range


def test_int8_linear_tracks_the_float_layer():
    torch.manual_seed(0)
    lin = nn.Linear(64, 96, bias=True)
    q = Int8Linear(lin)
    x = torch.randn(5, 3, 64)
    want, got = lin(x), q(x)
    assert got.shape == want.shape and got.dtype == want.dtype
    assert ((got - want).norm() / want.norm()) < 0.02


@pytest.mark.parametrize("tokens", [1, 20])
def test_int8_experts_track_the_float_experts(tokens):
    """20 tokens: sorted by expert; 1 token (decoding): its experts in turn."""
    torch.manual_seed(0)
    cfg = nano()
    experts = Experts(cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size)
    for p in experts.parameters():
        nn.init.normal_(p, std=0.1)
    router = Router(cfg)
    nn.init.normal_(router.weight, std=0.1)
    x = torch.randn(tokens, cfg.hidden_size)
    routing = router(x)
    want, got = experts(x, routing), Int8Experts(experts)(x, routing)
    assert ((got - want).norm() / want.norm()) < 0.03


def test_quantize_swaps_the_right_modules_and_shrinks_the_weights():
    model = copy.deepcopy(nano_model())
    before = weight_bytes(model)
    quantize_int8(model)
    names = {name: type(m) for name, m in model.named_modules()}
    assert names["lm_head"] is Int8Linear and names["layers.0.self_attn.q_b_proj"] is Int8Linear
    assert names["layers.1.mlp.experts"] is Int8Experts and names["mtp.0.eh_proj"] is Int8Linear
    assert names["layers.0.self_attn.kv_b_proj"] is Linear  # read as a matrix by absorbed attention
    assert names["layers.0.self_attn.indexer.wq_b"] is Linear  # DSA selection stays exact
    assert not any(isinstance(m, nn.Linear) for n, m in model.named_modules()
                   if not ("kv_b_proj" in n or "indexer" in n))
    assert weight_bytes(model) < 0.5 * before


def test_engine_decodes_an_int8_model_exactly_like_recomputation():
    model = quantize_int8(copy.deepcopy(nano_model()))
    ps = prompts_for(model.config, (6, 25))
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    want = [reference_greedy(model, p, 8) for p in ps]
    for spec in (False, True):
        eng = Engine(model, max_batch=2, max_seq_len=64, block_size=8, speculative=spec)
        assert [c.token_ids for c in eng.complete(ps, params)] == want


def test_int8_perplexity_change_on_held_out_text_is_small():
    """On the model trained on the successor rule, scoring fresh sequences of that rule."""
    model = periodic_model()
    q = quantize_int8(copy.deepcopy(model))
    g = torch.Generator().manual_seed(123)
    seq = []
    for start in torch.randint(2, model.config.vocab_size, (4,), generator=g).tolist():
        seq.append(start)  # each 64-token window starts at a fresh random point of the rule
        for _ in range(63):
            seq.append(successor(seq[-1], model.config.vocab_size))
    base, quant = perplexity(model, seq, window=64), perplexity(q, seq, window=64)
    assert base < 3  # the model did learn the rule (a random model scores ~500)
    assert abs(quant / base - 1) < 0.01


def test_perplexity_needs_two_tokens():
    with pytest.raises(ValueError):
        perplexity(nano_model(), [3])

"""The decode fast path against the model's own forward: same logits, hidden states, top-k sets."""
import copy

import pytest
import torch

from dsv32.infer import decode as decode_module
from dsv32.infer.cache import PagedLatentCache
from dsv32.infer.decode import DecodePath, pair_expert_weights, topk_positions
from dsv32.infer.quant import quantize_int8
from dsv32.model.indexer import select_topk
from infer_common import nano_model, single_thread  # noqa: F401

CONFIGS = {
    "v32-sparse": dict(),
    "v3-dense": dict(model_type="deepseek_v3"),
    "v3-no-q-lora": dict(model_type="deepseek_v3", q_lora_rank=None),
}


def _fill(model, lengths, block_size=8, include_mtp=False):
    """Prefill rows of different lengths through the model's path into one paged cache."""
    cfg = model.config
    cache = PagedLatentCache(cfg, num_blocks=64, block_size=block_size, include_mtp=include_mtp)
    g = torch.Generator().manual_seed(3)
    rows = [torch.randint(2, cfg.vocab_size, (n,), generator=g).tolist() for n in lengths]
    tables = []
    for row in rows:
        blocks = [cache.pool.allocate() for _ in range(-(-(len(row) + 2) // block_size))]
        tables.append(blocks)
        model(torch.tensor([row]), cache=cache.batch([blocks]))
    return cache, rows, tables


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("seq", [1, 2])
def test_fast_path_equals_the_model_forward(name, seq):
    """Rows at different positions (22 and 39 cached tokens), one or two new tokens each."""
    model = nano_model(**CONFIGS[name])
    fast = DecodePath(model)
    results = []
    for path in ("model", "fast"):
        cache, rows, tables = _fill(model, [22, 39])
        batch = cache.batch(tables)
        ids = torch.tensor([[5, 6][:seq], [7, 8][:seq]])
        positions = torch.tensor([[22, 23][:seq], [39, 40][:seq]])
        with torch.no_grad():
            if path == "model":
                out = model(ids, positions=positions, cache=batch, logits_to_keep=seq)
                results.append((out.logits, out.hidden_states, out.expert_counts))
            else:
                results.append(fast.forward(ids, positions, batch, keep=seq))
    (ml, mh, mc), (fl, fh, fc) = results
    assert (fl - ml).abs().max() < 1e-4 and (fh - mh).abs().max() < 1e-4
    assert torch.equal(fc, mc)


def test_fast_mtp_equals_the_model_mtp_layer():
    model = nano_model()
    fast = DecodePath(model)
    hidden = torch.randn(2, 2, model.config.hidden_size)
    next_ids = torch.tensor([[3, 4], [5, 6]])
    positions = torch.tensor([[22, 23], [39, 40]])
    outs = []
    for path in ("model", "fast"):
        cache, _, tables = _fill(model, [22, 39], include_mtp=True)
        batch = cache.batch(tables)
        with torch.no_grad():
            if path == "model":
                mtp = model.mtp[0]
                ctx = model._context(positions, batch, None, "absorbed", None)
                h, _ = mtp(hidden, model.embed_tokens(next_ids), ctx, batch.layer(model.config.num_hidden_layers))
                outs.append(model.lm_head(mtp.shared_head.norm(h))[:, [1, 0]].diagonal().T)
            else:
                outs.append(fast.mtp(hidden, next_ids, positions, batch, pick=torch.tensor([1, 0])))
    assert outs[1].shape == (2, model.config.vocab_size)
    assert (outs[0] - outs[1]).abs().max() < 1e-4


def _transpose_linear_weights(model):
    """Every nn.Linear weight stored transposed (same values): `_linear` must fall back to the module."""
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            m.weight.data = m.weight.data.t().contiguous().t()
    return model


@pytest.mark.parametrize("variant", ["int8", "paired", "transposed"])
def test_fast_path_on_int8_paired_and_transposed_weights(variant):
    model = nano_model()
    if variant == "int8":
        changed = quantize_int8(copy.deepcopy(model))
    elif variant == "paired":
        changed = copy.deepcopy(model)
        assert pair_expert_weights(changed) == sum(1 for name, _ in model.named_modules() if name.endswith(".experts"))
        assert pair_expert_weights(changed) == 0  # already paired
        experts = changed.layers[-1].mlp.experts
        assert not experts.gate_proj.is_contiguous()
        assert experts.up_proj.data_ptr() == experts.gate_proj[0, -1, -1].data_ptr() + 4  # up[0] right after gate[0]
        assert all(torch.equal(a, b) for a, b in zip(changed.state_dict().values(), model.state_dict().values()))
    else:
        changed = _transpose_linear_weights(copy.deepcopy(model))
    cache, _, tables = _fill(changed, [30, 17])
    for rows in ([0], [0, 1]):  # one token (the one-token expert path) and two
        ids, positions = torch.tensor([[9], [4]])[rows], torch.tensor([[30], [17]])[rows]
        batch = cache.batch([tables[r] for r in rows])
        with torch.no_grad():
            want = changed(ids, positions=positions, cache=batch).logits
            got, _, _ = DecodePath(changed).forward(ids, positions, batch)
        assert (got - want).abs().max() < 1e-4


@pytest.mark.parametrize("rows", [1, 3, 8, 9])
@pytest.mark.parametrize("bias", [False, True])
def test_small_row_linear_equals_f_linear(rows, bias):
    """`_linear` runs up to SMALL_ROWS rows as a chunked bmm; more rows, odd widths and transposed
    weights go through the module."""
    torch.manual_seed(rows)
    for out_features in (24, 6, 7):
        layer = torch.nn.Linear(16, out_features, bias=bias)
        x = torch.randn(rows, 1, 16)
        torch.testing.assert_close(decode_module._linear(layer, x), layer(x), rtol=1e-5, atol=1e-6)
        _transpose_linear_weights(layer)
        torch.testing.assert_close(decode_module._linear(layer, x), layer(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("seed", range(5))
def test_topk_positions_is_the_stable_sort_set(seed):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 4, (3, 2, 50), generator=g).float()  # many exact ties
    allowed = torch.arange(50) <= torch.tensor([[10, 11], [49, 49], [3, 30]])[:, :, None]
    for k in (1, 8, 16):
        got = topk_positions(scores, allowed, k)
        want = select_topk(scores, allowed, k)
        assert torch.equal(got, want.sort(dim=-1).values)  # the same set, in position order


@pytest.mark.parametrize("n_keys", [decode_module.LONG_KEYS, decode_module.LONG_KEYS + 3])
def test_many_keys_layout_equals_the_plain_attention(monkeypatch, n_keys):
    """One row over LONG_KEYS or more keys runs `_attend_many_keys` (the [keys, queries] layout, blocks of
    keys plus a remainder); an all-true mask forces the plain path on the same inputs."""
    from types import SimpleNamespace

    calls = []
    many = decode_module._attend_many_keys
    monkeypatch.setattr(decode_module, "_attend_many_keys", lambda *a: calls.append(1) or many(*a))
    g = torch.Generator().manual_seed(4)
    attn = SimpleNamespace(softmax_scale=0.9, kv_lora_rank=12)
    queries, kv = torch.randn(1, 8, 20, generator=g), torch.randn(1, n_keys, 20, generator=g)
    got = decode_module._attend_keys(attn, queries, kv, None)
    assert calls == [1]
    want = decode_module._attend_keys(attn, queries, kv, torch.ones(1, 1, n_keys, dtype=torch.bool))
    assert calls == [1]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", ["distinct", "ties", "few_allowed"])
def test_topk_positions_one_long_row(monkeypatch, case):
    """One row of at least SAMPLE_STRIDE * k scores takes the sampled route (`_one_row_topk`) when the
    scores are distinct; ties at the k-th score or too few allowed keys fall back to the full route.
    Every case gives the stable-sort set."""
    routes = []
    sampled = decode_module._one_row_topk
    monkeypatch.setattr(decode_module, "_one_row_topk", lambda row, k: routes.append(sampled(row, k)) or routes[-1])
    g = torch.Generator().manual_seed(3)
    n, k = 4096, 64
    if case == "ties":
        scores = torch.randint(0, 40, (1, 1, n), generator=g).float()  # ~100 keys per value: the k-th is tied
    else:
        scores = torch.randn(1, 1, n, generator=g)
    allowed = (torch.arange(n) < (30 if case == "few_allowed" else n))[None, None]
    got = topk_positions(scores, allowed, k)
    want = select_topk(scores, allowed, k)
    assert torch.equal(got, want.sort(dim=-1).values)
    assert len(routes) == 1 and (routes[0] is not None) == (case == "distinct")
@pytest.mark.parametrize("paired", [False, True])
@pytest.mark.parametrize("tokens", [1, 3, 12])
def test_active_experts_equal_the_loop_reference(monkeypatch, tokens, paired):
    """1 token: its experts one by one; 3 tokens x top-2 of 8 experts: one SwiGLU per active expert;
    12 tokens: the padded batched block (more copies than experts). Expert 7 gets nothing in the last
    case. Paired: gate and up stored side by side (`pair_expert_weights`), one bmm for both."""
    from dsv32.model.moe import Experts, Routing

    torch.manual_seed(0)
    experts = Experts(8, 32, 16)
    for p in experts.parameters():
        torch.nn.init.normal_(p, std=0.2)
    if paired:
        assert pair_expert_weights(experts) == 1 and decode_module._gate_up_pairs(experts) is not None
    g = torch.Generator().manual_seed(1)
    x = torch.randn(tokens, 32, generator=g)
    indices = torch.randint(0, 7, (tokens, 2), generator=g)
    routing = Routing(weights=torch.rand(tokens, 2, generator=g), indices=indices, scores=None)
    calls, padded = [], decode_module._padded_experts
    monkeypatch.setattr(decode_module, "_padded_experts", lambda *a: calls.append(1) or padded(*a))
    with torch.inference_mode():
        got = decode_module._active_experts(experts, x, routing)
        want = experts.forward_loop(x, routing)
    assert len(calls) == (1 if tokens * 2 > 8 else 0)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def _dequantised(model):
    """A float copy of an int8 model whose linear layers and experts hold the dequantised int8 weights."""
    from dsv32.infer.quant import Int8Experts, Int8Linear
    from dsv32.model.moe import Experts

    copy_ = copy.deepcopy(model)
    for parent in list(copy_.modules()):
        for child_name, child in list(parent.named_children()):
            if type(child) is Int8Linear:
                linear = torch.nn.Linear(child.in_features, child.out_features, bias=child.bias is not None)
                linear.weight.data = child.qweight.float() * child.scale[:, None]
                if child.bias is not None:
                    linear.bias.data = child.bias.data.clone()
                setattr(parent, child_name, linear)
            elif type(child) is Int8Experts:
                gate_up = child.gate_up_q.float() * child.gate_up_scale[..., None]    # [experts, 2 * inter, dim]
                experts = Experts(child.n_experts, gate_up.shape[-1], gate_up.shape[1] // 2)
                experts.gate_proj.data, experts.up_proj.data = [t.contiguous() for t in gate_up.chunk(2, dim=1)]
                experts.down_proj.data = child.down_q.float() * child.down_scale[..., None]
                setattr(parent, child_name, experts)
    return copy_


@pytest.mark.parametrize("name", ["v3-dense", "v32-sparse", "v3-dense-int8"])
def test_compiled_one_token_steps_equal_the_eager_path(monkeypatch, name):
    """`DecodePath(compile=True)`: the same logits, hidden states and expert counts as eager. One token at
    three positions (the compiled one-token steps: the context length dynamic, so the positions share
    graphs; nano's index_topk is 16, so with DSA position 10 attends every key and 22 and 25 the
    selected ones) and two rows of two tokens (eager regions)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = copy.deepcopy(nano_model(**CONFIGS[name.removesuffix("-int8")]))  # the builder's cache is shared
    if name.endswith("-int8"):  # int8 experts and head dequantised inside the compiled reductions
        quantize_int8(model)
    else:
        pair_expert_weights(model)
    eager, compiled = DecodePath(model), DecodePath(model, compile=True)
    assert compiled._one_token_steps is not None
    one_token_calls = []
    monkeypatch.setattr(compiled, "_one_token",
                        lambda *a: one_token_calls.append(1) or DecodePath._one_token(compiled, *a))
    for rows, seq, at in ((1, 1, 10), (1, 1, 22), (1, 1, 25), (2, 2, 22)):
        ids = torch.tensor([[5, 6], [7, 8]])[:rows, :seq]
        positions = torch.tensor([[at, at + 1], [39, 40]])[:rows, :seq]
        outs = []
        for path in (eager, compiled):
            cache, _, tables = _fill(model, [at, 39][:rows])
            outs.append(path.forward(ids, positions, cache.batch(tables), keep=seq))
        (el, eh, ec), (cl, ch, cc) = outs
        assert torch.equal(cc, ec)
        if name.endswith("-int8") and rows == 1:
            # eager int8 rounds activations and products to bf16 (quant.int8_matmul), while the compiled steps
            # reduce in fp32 over the dequantised weights: exactly the float model holding those weights
            cache, _, tables = _fill(model, [at])
            ml, mh, _ = DecodePath(_dequantised(model)).forward(ids, positions, cache.batch(tables))
            assert (cl - ml).abs().max() < 1e-4 and (ch - mh).abs().max() < 1e-4
            assert (cl - el).norm() / el.norm() < 2e-2  # and near eager int8: bf16 rounding apart
        else:
            assert (cl - el).abs().max() < 1e-4 and (ch - eh).abs().max() < 1e-4
    assert len(one_token_calls) == 3
    graphs = counters["stats"]["unique_graphs"]
    torch._dynamo.reset()
    # first projections, dense and MoE layer steps, last layer and head; with DSA a second graph for the
    # steps that attend the selected keys. Positions 22 and 25 must share their graphs.
    assert graphs <= (8 if name == "v32-sparse" else 5)

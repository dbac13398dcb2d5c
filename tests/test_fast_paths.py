"""The training fast paths equal their plain references (fp32 exactly or to rounding; bf16 autocast to bf16 rounding)."""
import pytest
import torch
import torch.nn.functional as F

from dsv32 import ModelConfig, Transformer
from dsv32.model import layers
from dsv32.model.layers import Linear, RMSNorm, linear
from dsv32.model.loss import linear_cross_entropy, linear_cross_entropy_reference
from dsv32.model.mla import _sdpa
from dsv32.model.moe import MoE
from dsv32.model.rope import apply_rope_interleaved, apply_rope_interleaved_reference


def gen(seed):
    return torch.Generator().manual_seed(seed)


def grads(fn, *inputs):
    inputs = [x.detach().clone().requires_grad_() for x in inputs]
    out = fn(*inputs)
    weight = torch.randn(out.shape, generator=gen(99)).to(out.dtype)
    (out * weight).float().sum().backward()
    return out.detach(), [x.grad for x in inputs]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_fused_equals_reference(dtype):
    norm = RMSNorm(48)
    torch.nn.init.normal_(norm.weight, generator=gen(0))
    x = (torch.randn(3, 7, 48, generator=gen(1)) * 4).to(dtype)
    out, (gx,) = grads(norm, x)
    ref, (rx,) = grads(norm.forward_reference, x)
    assert out.dtype == dtype
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gx, rx, rtol=1e-5, atol=1e-5)


def test_rope_complex_equals_reference_on_views():
    cos, sin = torch.randn(2, 5, 8, generator=gen(0)), torch.randn(2, 5, 8, generator=gen(1))
    q = torch.randn(2, 5, 3, 40, generator=gen(2))
    # a slice at an even offset (a view the complex path reads in place), an odd one (copied), bf16
    for x in (q[..., 24:], q[..., 3:19], q[..., 24:].to(torch.bfloat16)):
        out, (gx,) = grads(lambda t: apply_rope_interleaved(t, cos, sin), x)
        ref, (rx,) = grads(lambda t: apply_rope_interleaved_reference(t, cos, sin), x)
        torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(gx, rx, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("masked", [False, True])
def test_padded_sdpa_equals_math(masked):
    q, k = (torch.randn(2, 3, 10, 24, generator=gen(s)) for s in (0, 1))
    v = torch.randn(2, 3, 10, 16, generator=gen(2))
    mask = None
    if masked:  # two packed documents
        doc = torch.tensor([0] * 4 + [1] * 6)
        mask = (torch.ones(10, 10, dtype=torch.bool).tril() & (doc[:, None] == doc[None]))[None].expand(2, -1, -1)
    out, g = grads(lambda a, b, c: _sdpa(a, b, c, mask, 0.3), q, k, v)
    causal = torch.ones(10, 10, dtype=torch.bool).tril()[None].expand(2, -1, -1)
    ref_mask = (mask if masked else causal)[:, None]

    def math(a, b, c):
        scores = (a @ b.transpose(-1, -2) * 0.3).masked_fill(~ref_mask, float("-inf"))
        return scores.softmax(-1) @ c

    ref, rg = grads(math, q, k, v)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(g, rg):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("masked", [False, True])
def test_bf16_small_attention_is_within_bf16_rounding_of_fp32(monkeypatch, masked):
    """bf16 on CPU: the two-matmul path (and, for comparison, the flash kernel) against fp32 math attention."""
    from dsv32.model import mla as mla_module

    q, k = (torch.randn(2, 3, 12, 24, generator=gen(s)) for s in (0, 1))
    v = torch.randn(2, 3, 12, 16, generator=gen(2))
    doc = torch.tensor([0] * 5 + [1] * 7)
    causal = torch.ones(12, 12, dtype=torch.bool).tril()[None].expand(2, -1, -1)
    mask = (causal & (doc[:, None] == doc[None])) if masked else None
    calls, small = [], mla_module._small_attention
    monkeypatch.setattr(mla_module, "_small_attention", lambda *a: calls.append(1) or small(*a))

    def math(a, b, c):
        allowed = (mask if masked else causal)[:, None]
        return ((a @ b.transpose(-1, -2) * 0.3).masked_fill(~allowed, float("-inf"))).softmax(-1) @ c

    ref, ref_grads = grads(math, q, k, v)
    for limit in (mla_module.SMALL_ATTENTION_SCORES, 0):   # the small path, then the flash kernel
        monkeypatch.setattr(mla_module, "SMALL_ATTENTION_SCORES", limit)
        out, g = grads(lambda a, b, c: _sdpa(a, b, c, mask, 0.3), *(t.to(torch.bfloat16) for t in (q, k, v)))
        assert out.dtype == torch.bfloat16 and out.shape == ref.shape
        assert float((out.float() - ref).norm() / ref.norm()) < 1e-2
        for a, b in zip(g, ref_grads):
            assert float((a.float() - b).norm() / b.norm()) < 2e-2
    assert len(calls) == 1   # only the first round took the small path


@pytest.mark.parametrize("autocast", [False, True])
def test_linear_cross_entropy_equals_reference(autocast):
    hidden = torch.randn(2, 37, 32, generator=gen(0))
    weight = torch.randn(300, 32, generator=gen(1)) * 0.2
    labels = torch.randint(0, 300, (2, 37), generator=gen(2))
    labels[0, ::5] = -100
    results = []
    for fn in (linear_cross_entropy, linear_cross_entropy_reference):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            kwargs = {"chunk_rows": 16} if fn is linear_cross_entropy else {}
            loss = fn(h, w, labels, **kwargs)
        (0.7 * loss).backward()
        results.append((loss.detach(), h.grad, w.grad))
    (loss, gh, gw), (ref, rh, rw) = results
    assert loss.dtype == torch.float32 and gh.dtype == gw.dtype == torch.float32
    if not autocast:
        torch.testing.assert_close(loss, ref, rtol=1e-6, atol=0)
        torch.testing.assert_close(gh, rh, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(gw, rw, rtol=1e-5, atol=1e-6)
    else:  # bf16 logits: chunked and whole matmuls may round a few logits differently
        torch.testing.assert_close(loss, ref, rtol=1e-4, atol=0)
        for a, b in ((gh, rh), (gw, rw)):
            assert float((a - b).norm() / b.norm()) < 1e-2  # bf16 keeps 8 bits: ~4e-3 per rounding


def test_model_loss_sum_equals_cross_entropy_of_logits():
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("nano"))
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=gen(3))
    labels = torch.cat((ids[:, 1:], torch.full_like(ids[:, :1], -100)), dim=1)
    out = model(ids, labels=labels)
    assert out.logits is None
    ref = F.cross_entropy(model(ids).logits.flatten(0, 1), labels.flatten(), reduction="sum")
    torch.testing.assert_close(out.loss_sum, ref, rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="labels must have the shape"):
        model(ids, labels=labels[:, 1:])


def test_grouped_experts_in_bf16_autocast_match_the_loop_reference():
    """Under autocast the grouped path runs in bf16 like the loop reference (whose matmuls autocast)."""
    cfg = ModelConfig.preset("nano")
    torch.manual_seed(0)
    moe = MoE(cfg)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.1)
    x = torch.randn(2, 40, cfg.hidden_size, generator=gen(1))

    def run(reference: bool, autocast: bool):
        moe.use_loop_reference = reference
        moe.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y, _ = moe(xi)
        (y.float() * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        return [y.detach().float(), xi.grad] + [p.grad.clone() for p in moe.parameters()]

    exact = run(False, False)
    for a, b in zip(exact, run(True, False)):  # fp32: the grouped path equals the loop
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for reference in (False, True):  # bf16: both within bf16 rounding of the fp32 result
        for a, b in zip(run(reference, True), exact):
            assert float((a - b).norm() / b.norm()) < 2e-2


@pytest.mark.parametrize("path", ["padded", "grouped"])
@pytest.mark.parametrize("routing", ["learned", "skewed", "two_blocks"])
def test_both_expert_layouts_equal_the_loop_reference(monkeypatch, path, routing):
    """The padded batched-matmul layout and the grouped one. skewed: most copies on one expert, some on
    none; two_blocks: half the experts busy, half nearly idle (the padded path then runs two blocks)."""
    from dsv32.model import moe as moe_module

    monkeypatch.setattr(moe_module, "MAX_PADDING", float("inf") if path == "padded" else 0.0)
    monkeypatch.setattr(moe_module, "PADDED_DTYPES", (torch.float32,) if path == "padded" else ())
    cfg = ModelConfig.preset("nano")
    torch.manual_seed(0)
    moe = MoE(cfg)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.1)
    n_experts, top_k = cfg.n_routed_experts, cfg.num_experts_per_tok
    x = torch.randn(2, 40, cfg.hidden_size, generator=gen(1))
    forced = None
    if routing == "skewed":
        forced = torch.zeros(2, 40, top_k, dtype=torch.long)
        forced[..., 1] = torch.randint(1, 3, (2, 40), generator=gen(2))   # experts 3.. get nothing
    elif routing == "two_blocks":
        busy = torch.randint(0, n_experts // 2, (2, 40, top_k), generator=gen(2))
        idle = torch.randint(n_experts // 2, n_experts, (2, 40, top_k), generator=gen(3))
        forced = torch.where(torch.rand(2, 40, top_k, generator=gen(4)) < 0.9, busy, idle)
        counts = torch.bincount(forced.flatten(), minlength=n_experts)
        assert len(moe_module.padding_buckets(counts).blocks) == 2

    def run(reference: bool):
        moe.use_loop_reference = reference
        moe.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_()
        y, _ = moe(xi, forced)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        return [y.detach(), xi.grad] + [p.grad.clone() for p in moe.parameters()]

    for a, b in zip(run(False), run(True)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("precision, padded", [("fp32", False), ("bf16", True)])
def test_cpu_experts_pad_in_bf16_and_group_in_fp32(monkeypatch, precision, padded):
    """The layout each precision measured faster on CPU (see moe.PADDED_DTYPES)."""
    from dsv32.model import moe as moe_module

    calls = {"padded": 0, "grouped": 0}
    for name in calls:
        original = getattr(moe_module.Experts, f"_{name}")
        monkeypatch.setattr(moe_module.Experts, f"_{name}",
                            lambda self, *a, _o=original, _n=name: calls.__setitem__(_n, calls[_n] + 1) or _o(self, *a))
    cfg = ModelConfig.preset("nano")
    moe = MoE(cfg)
    x = torch.randn(2, 40, cfg.hidden_size, generator=gen(1))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        moe(x)
    assert calls == {"padded": int(padded), "grouped": int(not padded)}


def test_padding_buckets_split_the_busy_experts_from_the_rest():
    from dsv32.model.moe import padding_buckets

    layout = padding_buckets(torch.tensor([10, 2, 3, 9, 0, 1]))
    # one block would be 6 x 10 = 60 rows; the busiest two padded to 10 and the rest to 3 is 32
    assert [(e.tolist(), c) for e, c in layout.blocks] == [([0, 3], 10), ([2, 1, 5, 4], 3)]
    assert layout.n_slots == 32
    assert layout.first_slot.tolist() == [0, 23, 20, 10, 29, 26]
    even = padding_buckets(torch.tensor([5, 6, 5, 6]))    # a split saves under a tenth: one block, natural order
    assert [(e.tolist(), c) for e, c in even.blocks] == [([0, 1, 2, 3], 6)] and even.n_slots == 24


def test_fused_head_losses_equal_cross_entropy_of_the_logits():
    """`labels=` and `mtp_labels=` (what the trainer uses) against F.cross_entropy of the main and MTP logits:
    the same loss sums and the same parameter gradients, on packed rows with ignored targets."""
    cfg = ModelConfig.preset("nano").replace(num_nextn_predict_layers=2)
    torch.manual_seed(0)
    model = Transformer(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 24), generator=gen(1))
    doc_ids = torch.tensor([0] * 10 + [1] * 14).expand(2, -1)
    labels = torch.cat((ids[:, 1:], torch.full_like(ids[:, :1], -100)), dim=1)
    labels[0, :5] = -100
    depth_labels = [labels[:, 1 + k:] for k in range(2)]

    def run(fused: bool):
        model.zero_grad(set_to_none=True)
        if fused:
            out = model(ids, doc_ids=doc_ids, return_mtp=True, labels=labels, mtp_labels=depth_labels)
            assert out.logits is None and out.mtp_logits == []
            sums = [out.loss_sum] + out.mtp_loss_sums
        else:
            out = model(ids, doc_ids=doc_ids, return_mtp=True)
            sums = [F.cross_entropy(lg.float().flatten(0, 1), lb.flatten(), ignore_index=-100, reduction="sum")
                    for lg, lb in zip([out.logits] + out.mtp_logits, [labels] + depth_labels)]
        sum(s * (i + 1) for i, s in enumerate(sums)).backward()
        return [s.detach() for s in sums], [p.grad.clone() for p in model.parameters() if p.grad is not None]

    (fused, fused_grads), (plain, plain_grads) = run(True), run(False)
    assert len(fused) == 3
    with pytest.raises(ValueError, match="mtp_labels has 1 depths"):
        model(ids, return_mtp=True, labels=labels, mtp_labels=depth_labels[:1])
    torch.testing.assert_close(torch.stack(fused), torch.stack(plain), rtol=1e-5, atol=1e-4)
    assert len(fused_grads) == len(plain_grads)
    for a, b in zip(fused_grads, plain_grads):   # fp32, summed in another order: relative to each gradient's size
        assert float((a - b).norm() / b.norm().clamp_min(1e-12)) < 1e-5


def _count_onednn_calls(monkeypatch) -> list:
    """Route the oneDNN op through a counter; skip where this torch build has none."""
    op = layers._onednn_linear_op()
    if not op:
        pytest.skip("no oneDNN linear op in this torch build")
    calls = []

    def counted(*args):
        calls.append(tuple(args[0].shape))
        return op(*args)

    monkeypatch.setattr(layers, "_onednn_op", counted)
    return calls


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("layout", ["3d", "transposed_input", "one_row"])
def test_onednn_linear_equals_f_linear_with_gradients(monkeypatch, bias, layout):
    calls = _count_onednn_calls(monkeypatch)
    weight = torch.randn(40, 24, generator=gen(0))
    b = torch.randn(40, generator=gen(1)) if bias else None
    x = {"3d": torch.randn(3, 5, 24, generator=gen(2)),
         "transposed_input": torch.randn(24, 6, generator=gen(2)).t(),          # a non-contiguous [6, 24]
         "one_row": torch.randn(1, 24, generator=gen(2))}[layout]
    inputs = (x, weight) + ((b,) if bias else ())
    got, got_grads = grads(lambda x, w, *bb: linear(x, w, *bb), *inputs)
    assert calls, "the fp32 CPU linear did not take the oneDNN path"
    n_forward = len(calls)
    want, want_grads = grads(lambda x, w, *bb: F.linear(x, w, *bb), *inputs)
    assert len(calls) == n_forward  # F.linear itself stays MKL
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_onednn_linear_is_skipped_where_it_does_not_apply(monkeypatch):
    calls = _count_onednn_calls(monkeypatch)
    layer = Linear(16, 8)
    x = torch.randn(4, 16, generator=gen(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(x).dtype == torch.bfloat16  # autocast's own bf16 kernel
    assert layer.to(torch.float64)(x.double()).dtype == torch.float64
    assert layer(torch.zeros(0, 16, dtype=torch.float64)).shape == (0, 8)
    monkeypatch.setattr(layers, "ONEDNN_FP32", False)
    layer = layer.float()
    assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))
    assert calls == []
    monkeypatch.setattr(layers, "ONEDNN_FP32", True)
    layer(x)
    assert calls == [(4, 16)]


def test_model_projections_and_head_loss_take_the_onednn_path(monkeypatch):
    """Every projection of an fp32 model on CPU is a `Linear`, and a training step's matmuls go through oneDNN."""
    calls = _count_onednn_calls(monkeypatch)
    cfg = ModelConfig.preset("nano")
    model = Transformer(cfg)
    assert not any(type(m) is torch.nn.Linear for m in model.modules())
    ids = torch.randint(0, cfg.vocab_size, (2, 12), generator=gen(4))
    model(ids, labels=ids).loss_sum.backward()
    assert (24, cfg.hidden_size) in calls  # a projection over the 2 x 12 tokens
    assert (24, cfg.vocab_size) in calls   # the head loss's input gradient: grad_logits @ weight

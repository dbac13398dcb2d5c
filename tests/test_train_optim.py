import pytest
import torch

from dsv32 import ModelConfig, Transformer
from dsv32.train.balance import BiasBalancer, routers_in_count_order
from dsv32.train.optim import build_optimizer, build_scheduler, lr_multiplier, param_groups


def nano_model():
    torch.manual_seed(0)
    return Transformer(ModelConfig.preset("nano"))


def test_no_weight_decay_on_norms_and_biases():
    model = nano_model()
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(not names[id(p)].endswith("bias") and p.ndim >= 2 for p in decay["params"])
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    assert "norm.weight" in no_decay_names and "layers.0.self_attn.indexer.k_norm.bias" in no_decay_names
    assert "layers.1.mlp.experts.gate_proj" not in no_decay_names
    all_params = {id(p) for p in model.parameters()}
    assert {id(p) for g in (decay, no_decay) for p in g["params"]} == all_params
    opt = build_optimizer(model, lr=1e-3)
    assert opt.defaults["betas"] == (0.9, 0.95)


def test_wsd_schedule_shape():
    kw = dict(total_steps=100, warmup_steps=10, schedule="wsd", decay_fraction=0.2, min_lr_ratio=0.1)
    lrs = [lr_multiplier(s, **kw) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(v == 1.0 for v in lrs[10:80])          # stable
    assert all(a > b for a, b in zip(lrs[80:], lrs[81:]))  # decaying
    assert lrs[99] == pytest.approx(0.1)


def test_cosine_schedule_shape_and_bad_name():
    kw = dict(total_steps=50, warmup_steps=5, schedule="cosine", decay_fraction=0.2, min_lr_ratio=0.0)
    lrs = [lr_multiplier(s, **kw) for s in range(50)]
    assert lrs[4] == pytest.approx(1.0) and lrs[49] == pytest.approx(0.0, abs=1e-9)
    assert lrs[27] == pytest.approx(0.5, abs=0.05)
    with pytest.raises(ValueError, match="unknown schedule"):
        build_scheduler(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1), total_steps=10,
                        warmup_steps=0, schedule="linear", decay_fraction=0.1, min_lr_ratio=0)


def test_bias_update_moves_load_toward_balance_on_a_skewed_batch():
    cfg = ModelConfig.preset("nano").replace(n_group=1, topk_group=1, aux_loss_alpha=0.0)
    torch.manual_seed(0)
    model = Transformer(cfg)
    router = routers_in_count_order(model)[0]
    with torch.no_grad():
        router.weight[0] += 0.5  # expert 0 attracts everyone: a skewed start
    params = [p for p in model.parameters()]
    opt = torch.optim.SGD(params, lr=0.0)  # only the balancer changes anything
    balancer = BiasBalancer(model, gamma=0.01)
    balancer.hook(opt)
    ids = torch.randint(0, cfg.vocab_size, (4, 32), generator=torch.Generator().manual_seed(1))

    def imbalance():
        with torch.no_grad():
            counts = model(ids).expert_counts[0].float()
        return float(counts.max() / counts.mean())

    start = imbalance()
    for _ in range(60):
        out = model(ids)
        balancer.accumulate(out.expert_counts)
        opt.step()
    assert imbalance() < start * 0.7
    assert router.e_score_correction_bias[0] < 0  # the overloaded expert became less attractive


def test_eval_forwards_do_not_touch_the_biases():
    cfg = ModelConfig.preset("nano")
    model = Transformer(cfg)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    BiasBalancer(model, gamma=0.5).hook(opt)
    before = [r.e_score_correction_bias.clone() for r in routers_in_count_order(model)]
    with torch.no_grad():
        model.eval()(torch.randint(0, cfg.vocab_size, (2, 16)))  # an evaluation forward, never accumulated
    opt.step()
    after = [r.e_score_correction_bias for r in routers_in_count_order(model)]
    assert all(torch.equal(a, b) for a, b in zip(before, after))

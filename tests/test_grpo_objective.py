"""The GRPO objective against hand-computed values: advantages (group/batch/none, group bookkeeping),
the clipped surrogate (epsilon / epsilon_high, clip flags and gradients), loss aggregation
(grpo / dr_grpo / dapo, micro-batch accumulation), truncated-completion masking, num_iterations on a
one-token bandit, and DeepSeek-V3.2's stabilisers: the unbiased KL (k3 x ratio), off-policy sequence
masking, and the keep-sampling-mask distribution (top-k / top-p / min-p, renormalised)."""
import math

import pytest
import torch

from dsv32.infer.sampling import SamplingParams, probabilities
from dsv32.train.grpo_objective import (aggregate, group_advantages, k3_kl, loss_mask, off_policy_sequence_mask,
                                        per_token_loss, sampling_keep_mask, token_logprobs)

L = math.log


# ---------------------------------------------------------------------- advantages
def test_group_advantages_by_hand():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    adv, zero = group_advantages(rewards, 4, "group")
    # group 1: mean 0.5, sample std sqrt((4 * 0.25) / 3); group 2: constant
    a = 0.5 / (math.sqrt(1 / 3) + 1e-4)
    assert adv.tolist() == pytest.approx([a, -a, -a, a, 0, 0, 0, 0], abs=1e-6)
    assert zero.tolist() == [False, True]

    adv, zero = group_advantages(rewards, 4, "batch")
    # batch mean 1.25; squared deviations .0625 + 1.5625 + 1.5625 + .0625 + 4 * .5625 = 5.5; std sqrt(5.5 / 7)
    b = 0.5 / (math.sqrt(5.5 / 7) + 1e-4)
    assert adv.tolist() == pytest.approx([b, -b, -b, b, 0, 0, 0, 0], abs=1e-6)
    assert zero.tolist() == [False, True]  # logged per group whatever the scaling

    adv, _ = group_advantages(rewards, 4, "none")
    assert adv.tolist() == pytest.approx([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0])


def test_advantages_are_computed_within_consecutive_groups():
    rewards = torch.tensor([1.0, 1.0, 0.0, 0.0])
    adv, zero = group_advantages(rewards, 2, "group")  # groups (1, 1) and (0, 0): no signal at all
    assert adv.tolist() == [0, 0, 0, 0] and zero.tolist() == [True, True]
    adv, zero = group_advantages(rewards, 4, "group")  # one group: the 1s are above its mean
    assert adv[0] > 0 and adv[2] < 0 and zero.tolist() == [False]


def test_advantage_errors():
    with pytest.raises(ValueError, match="groups of 3"):
        group_advantages(torch.zeros(4), 3)
    with pytest.raises(ValueError, match="at least 2"):
        group_advantages(torch.zeros(4), 1)
    with pytest.raises(ValueError, match="scale_rewards"):
        group_advantages(torch.zeros(4), 2, "mean")


# ---------------------------------------------------------------------- clipped surrogate
def test_clipping_with_epsilon_and_epsilon_high_by_hand():
    ratios = torch.tensor([[0.5, 1.0, 1.5], [0.5, 1.0, 1.5]])
    old = torch.zeros(2, 3)
    logps = ratios.log().requires_grad_()
    adv = torch.tensor([2.0, -2.0])
    loss, parts = per_token_loss(logps, old, adv, epsilon_low=0.2, epsilon_high=0.28)
    # A=+2: min(r A, clip(r, 0.8, 1.28) A) = 1.0, 2.0, 2.56;  A=-2: -1.6, -2.0, -3.0  (loss is the negation)
    assert loss.tolist() == [pytest.approx([-1.0, -2.0, -2.56]), pytest.approx([1.6, 2.0, 3.0])]
    assert parts["high_clipped"].tolist() == [[False, False, True], [False, False, False]]
    assert parts["low_clipped"].tolist() == [[False, False, False], [True, False, False]]
    loss.sum().backward()
    # d(-r A)/d log r = -r A where the unclipped term is the minimum, 0 where the clipped one is
    assert logps.grad.tolist() == [pytest.approx([-1.0, -2.0, 0.0]), pytest.approx([0.0, 2.0, 3.0])]


def test_symmetric_epsilon_when_epsilon_high_equals_epsilon():
    logps = torch.tensor([[L(1.25)]])
    loss, parts = per_token_loss(logps, torch.zeros(1, 1), torch.tensor([1.0]), epsilon_low=0.2, epsilon_high=0.2)
    assert float(loss) == pytest.approx(-1.2) and bool(parts["high_clipped"])


# ---------------------------------------------------------------------- KL: k3 and the unbiased estimate
def test_k3_and_unbiased_kl_by_hand():
    logps, ref, old = torch.tensor([[L(0.5)]]), torch.tensor([[L(0.25)]]), torch.tensor([[L(0.4)]])
    k3 = 0.25 / 0.5 - math.log(0.25 / 0.5) - 1                      # 0.193147...
    assert float(k3_kl(logps, ref)) == pytest.approx(k3)
    assert float(k3_kl(ref, ref)) == 0.0
    adv = torch.tensor([1.0])
    # ratio 0.5 / 0.4 = 1.25 (inside the clip range 0.8..1.28): surrogate -1.25
    plain, parts = per_token_loss(logps, old, adv, epsilon_low=0.2, epsilon_high=0.28, ref_logps=ref, beta=0.1)
    assert float(plain) == pytest.approx(-1.25 + 0.1 * k3)
    unbiased, parts = per_token_loss(logps, old, adv, epsilon_low=0.2, epsilon_high=0.28, ref_logps=ref, beta=0.1,
                                     unbiased_kl=True)
    assert float(parts["kl"]) == pytest.approx(1.25 * k3)            # k3 x pi_theta / pi_old = 0.241434...
    assert float(unbiased) == pytest.approx(-1.25 + 0.1 * 1.25 * k3)


def test_unbiased_kl_gradient_matches_the_exact_kl_gradient():
    """E_{pi_old}[ratio * k3] = KL(pi_theta || pi_ref) exactly, so summing ratio*k3*pi_old over the whole
    vocabulary and differentiating must give the gradient of the true KL (plain k3 does not)."""
    torch.manual_seed(0)
    theta = torch.randn(5, requires_grad=True)
    old = torch.log_softmax(torch.randn(5), -1)
    ref = torch.log_softmax(torch.randn(5), -1)
    logp = torch.log_softmax(theta, -1)
    kl = (logp.exp() * (logp - ref)).sum()
    (g_true,) = torch.autograd.grad(kl, theta)
    logp = torch.log_softmax(theta, -1)
    est = (old.exp() * k3_kl(logp, ref) * torch.exp(logp - old)).sum()
    assert float(est.detach()) == pytest.approx(float(kl.detach()), rel=1e-5)
    (g_est,) = torch.autograd.grad(est, theta)
    assert torch.allclose(g_est, g_true, atol=1e-6)
    (g_plain,) = torch.autograd.grad((old.exp() * k3_kl(torch.log_softmax(theta, -1), ref)).sum(), theta)
    assert not torch.allclose(g_plain, g_true, atol=1e-3)


def test_beta_zero_needs_no_reference_and_beta_needs_one():
    loss, parts = per_token_loss(torch.zeros(1, 2), torch.zeros(1, 2), torch.tensor([1.0]), epsilon_low=0.2,
                                 epsilon_high=0.2, beta=0.0)
    assert parts["kl"] is None and loss.tolist() == [[-1.0, -1.0]]
    with pytest.raises(ValueError, match="reference"):
        per_token_loss(torch.zeros(1, 2), torch.zeros(1, 2), torch.tensor([1.0]), epsilon_low=0.2, epsilon_high=0.2, beta=0.1)


# ---------------------------------------------------------------------- off-policy sequence masking
def test_off_policy_sequence_mask_by_hand():
    sampling = torch.tensor([[L(0.5), L(0.5)], [L(0.5), L(0.5)], [L(0.5), 0.0]])
    current = torch.tensor([[L(0.25), L(0.5)], [L(0.25), L(0.5)], [L(0.4), -9.0]])  # -9: padding, masked out
    mask = torch.tensor([[1.0, 1.0], [1.0, 1.0], [1.0, 0.0]])
    adv = torch.tensor([-1.0, 1.0, -1.0])
    # mean log(pi_sampling / pi_theta): seq 0 and 1: (ln 2 + 0) / 2 = 0.3466; seq 2: ln 1.25 = 0.2231
    m = off_policy_sequence_mask(adv, current, sampling, mask, delta=0.3)
    assert m.tolist() == [0.0, 1.0, 1.0]  # seq 0: negative advantage and far off-policy; seq 1: A >= 0 is kept
    m = off_policy_sequence_mask(adv, current, sampling, mask, delta=0.2)
    assert m.tolist() == [0.0, 1.0, 0.0]
    m = off_policy_sequence_mask(adv, current, sampling, mask, delta=0.35)
    assert m.tolist() == [1.0, 1.0, 1.0]
    # the mask multiplies the surrogate only; the KL term stays
    ref = current.clone()
    ref[0, 0] = L(0.5)
    loss, parts = per_token_loss(current, sampling, adv, epsilon_low=0.2, epsilon_high=0.28, ref_logps=ref, beta=1.0,
                                 sequence_mask=off_policy_sequence_mask(adv, current, sampling, mask, 0.3))
    k3 = 0.5 / 0.25 - math.log(0.5 / 0.25) - 1  # the reference differs from pi_theta at token (0, 0) only
    assert float(loss[0, 0]) == pytest.approx(k3)  # masked surrogate, KL kept (beta = 1)
    assert float(loss[0, 1]) == 0.0
    assert float(loss[1, 0]) == pytest.approx(-0.5)  # A = +1, ratio .25 / .5 = .5: min(.5, clip .8) = .5


# ---------------------------------------------------------------------- aggregation
def test_loss_types_by_hand():
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    kw = dict(n_sequences=2, n_tokens=3, max_completion_length=4)
    assert float(aggregate(loss, mask, "grpo", **kw)) == pytest.approx(((1 + 2) / 2 + 4 / 1) / 2)  # 2.75
    assert float(aggregate(loss, mask, "dr_grpo", **kw)) == pytest.approx((1 + 2 + 4) / (2 * 4))   # 0.875
    assert float(aggregate(loss, mask, "dapo", **kw)) == pytest.approx((1 + 2 + 4) / 3)            # 2.333
    with pytest.raises(ValueError, match="loss_type"):
        aggregate(loss, mask, "bnpo", **kw)


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo"])
def test_micro_batches_sum_to_the_whole_batch(loss_type):
    torch.manual_seed(1)
    loss = torch.randn(6, 5)
    mask = (torch.rand(6, 5) > 0.3).float()
    kw = dict(n_sequences=6, n_tokens=float(mask.sum()), max_completion_length=5)
    whole = aggregate(loss, mask, loss_type, **kw)
    parts = sum(aggregate(loss[i:i + 2], mask[i:i + 2], loss_type, **kw) for i in range(0, 6, 2))
    assert float(parts) == pytest.approx(float(whole))


def test_truncated_completion_masking():
    present = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    truncated = torch.tensor([True, False])
    assert loss_mask(present, truncated, True).tolist() == [[0, 0, 0], [1, 1, 0]]
    assert loss_mask(present, truncated, False).tolist() == present.tolist()


# ---------------------------------------------------------------------- num_iterations on a bandit
def test_num_iterations_reuses_pi_old_by_hand():
    """One prompt, a one-token completion (action 0, advantage +1), three actions, SGD with lr 0.3,
    two updates on the same rollout. Update 1: ratio 1, gradient -(e_0 - pi) = (-2/3, 1/3, 1/3).
    Update 2: pi_old stays the rollout policy, ratio = pi_1(0) / (1/3) = 1.2089 (< 1.28: not clipped),
    gradient -ratio (e_0 - pi_1)."""
    theta = torch.zeros(3, requires_grad=True)
    opt = torch.optim.SGD([theta], lr=0.3)
    old = torch.log_softmax(theta.detach(), -1)[0].reshape(1, 1)
    for _ in range(2):
        logp = torch.log_softmax(theta, -1)[0].reshape(1, 1)
        loss, _ = per_token_loss(logp, old, torch.tensor([1.0]), epsilon_low=0.2, epsilon_high=0.28)
        opt.zero_grad()
        aggregate(loss, torch.ones(1, 1), "dapo", n_sequences=1, n_tokens=1, max_completion_length=1).backward()
        opt.step()
    t1 = [0.3 * 2 / 3, -0.3 / 3, -0.3 / 3]
    z = [math.exp(v) for v in t1]
    p1 = [v / sum(z) for v in z]
    ratio = p1[0] / (1 / 3)
    assert ratio == pytest.approx(1.20888, abs=1e-5)
    t2 = [t1[0] + 0.3 * ratio * (1 - p1[0]), t1[1] - 0.3 * ratio * p1[1], t1[2] - 0.3 * ratio * p1[2]]
    assert theta.tolist() == pytest.approx(t2, abs=1e-6)

    # a big first step pushes the ratio past 1 + epsilon_high: the second update does nothing
    theta = torch.zeros(3, requires_grad=True)
    opt = torch.optim.SGD([theta], lr=3.0)
    after = []
    for _ in range(2):
        logp = torch.log_softmax(theta, -1)[0].reshape(1, 1)
        loss, parts = per_token_loss(logp, old, torch.tensor([1.0]), epsilon_low=0.2, epsilon_high=0.28)
        opt.zero_grad()
        loss.sum().backward()
        opt.step()
        after.append(theta.tolist())
    assert after[0] == pytest.approx([2.0, -1.0, -1.0]) and after[1] == after[0]
    assert bool(parts["high_clipped"])  # ratio e^2 / (e^2 + 2/e) * 3 = 2.728


# ---------------------------------------------------------------------- keep sampling mask
def test_sampling_keep_mask_by_hand():
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    assert sampling_keep_mask(logits) is None  # nothing truncated
    # top-p 0.8: mass above each token 0, .5, .8, .95 -> keep while below 0.8
    assert sampling_keep_mask(logits, top_p=0.8).tolist() == [True, True, False, False]
    assert sampling_keep_mask(logits, top_p=0.81).tolist() == [True, True, True, False]
    assert sampling_keep_mask(logits, top_k=2).tolist() == [True, True, False, False]
    assert sampling_keep_mask(logits, min_p=0.2).tolist() == [True, True, True, False]  # p >= 0.1
    # temperature 2: p ~ sqrt(p) = .379, .294, .208, .120 -> mass above: 0, .379, .673, .880
    assert sampling_keep_mask(logits, temperature=2.0, top_p=0.8).tolist() == [True, True, True, False]


def test_keep_mask_renormalises_the_training_distribution_by_hand():
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    keep = torch.tensor([[True, True, False, False]])
    lp, ent = token_logprobs(logits, torch.tensor([0]), 1.0, keep)
    assert float(lp) == pytest.approx(math.log(0.5 / 0.8))
    assert float(ent) == pytest.approx(-(0.625 * math.log(0.625) + 0.375 * math.log(0.375)))
    lp, ent = token_logprobs(logits, torch.tensor([0]), 1.0, None)
    assert float(lp) == pytest.approx(math.log(0.5))
    assert float(ent) == pytest.approx(-sum(p * math.log(p) for p in (0.5, 0.3, 0.15, 0.05)))


@pytest.mark.parametrize("params", [dict(top_k=5), dict(top_p=0.7), dict(top_p=0.9, temperature=0.7),
                                    dict(top_k=20, top_p=0.5, min_p=0.05), dict(min_p=0.1, temperature=1.5)])
def test_keep_mask_is_the_engines_sampling_support(params):
    torch.manual_seed(0)
    logits = torch.randn(16, 64) * 3
    keep = sampling_keep_mask(logits, params.get("temperature", 1.0), params.get("top_k", 0), params.get("top_p", 1.0),
                              params.get("min_p", 0.0))
    sp = SamplingParams(**params)
    for row, k in zip(logits, keep):
        assert torch.equal(probabilities(row, sp) > 0, k)

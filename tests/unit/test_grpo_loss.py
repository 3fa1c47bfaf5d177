"""grpo_loss and group_advantages against values computed by hand."""

import pytest
import torch

from node.train.loss import group_advantages, grpo_loss, loss_weight


def policy_logps(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits, -1).gather(-1, tokens[..., None]).squeeze(-1)


def make_batch(seed: int = 0, rows: int = 4, length: int = 5, vocab: int = 7):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, length, vocab, generator=gen).requires_grad_(True)
    tokens = torch.randint(0, vocab, (rows, length), generator=gen)
    return logits, tokens


def test_advantages_of_one_correct_in_four():
    # mean 0.25, sample std sqrt((0.75^2 + 3 * 0.25^2) / 3) = 0.5
    adv = group_advantages(torch.tensor([1.0, 0, 0, 0]), 4, "group")
    assert torch.allclose(adv, torch.tensor([1.5, -0.5, -0.5, -0.5]), atol=1e-3)
    unscaled = group_advantages(torch.tensor([1.0, 0, 0, 0]), 4, "none")
    assert torch.allclose(unscaled, torch.tensor([0.75, -0.25, -0.25, -0.25]))


def test_constant_group_has_zero_advantage():
    adv = group_advantages(torch.tensor([1.0, 1, 1, 1, 0, 1, 0, 1]), 4, "group")
    assert torch.equal(adv[:4], torch.zeros(4))
    assert adv[4:].abs().min() > 0.5


def test_batch_scaling_divides_by_batch_std():
    rewards = torch.tensor([1.0, 0, 0, 0, 1, 1, 0, 0])
    adv = group_advantages(rewards, 4, "batch")
    centered = group_advantages(rewards, 4, "none")
    assert torch.allclose(adv, centered / (rewards.std() + 1e-4))


def test_mu_one_gradient_is_minus_advantage_times_grad_logp():
    logits, tokens = make_batch()
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 0, 0, 0]])
    adv = torch.tensor([1.5, -0.5, -0.5, 0.25])
    logps = policy_logps(logits, tokens)
    loss, metrics = grpo_loss(logps, logps.detach(), None, adv, mask, loss_type="dapo")
    (grad,) = torch.autograd.grad(loss, logits, retain_graph=True)

    expected_objective = -(adv[:, None] * logps * mask).sum() / mask.sum()
    (expected,) = torch.autograd.grad(expected_objective, logits)
    assert torch.allclose(grad, expected, atol=1e-6)
    assert metrics["ratio"] == pytest.approx(1.0)
    assert metrics["clip_ratio/region_mean"] == 0.0


def test_k3_kl_is_zero_with_zero_gradient_when_policy_is_reference():
    logits, tokens = make_batch(seed=1)
    mask = torch.ones(tokens.shape)
    logps = policy_logps(logits, tokens)
    loss, metrics = grpo_loss(logps, logps.detach(), logps.detach(), torch.zeros(4), mask, beta=0.5)
    (grad,) = torch.autograd.grad(loss, logits)
    assert metrics["kl"] == 0.0
    assert float(loss) == 0.0
    assert grad.abs().max() == 0.0


def test_k3_kl_is_positive_and_pulls_towards_reference():
    logits, tokens = make_batch(seed=2)
    mask = torch.ones(tokens.shape)
    logps = policy_logps(logits, tokens)
    ref = logps.detach() - 0.3
    loss, metrics = grpo_loss(logps, logps.detach(), ref, torch.zeros(4), mask, beta=1.0)
    # k3 with log(ref/pi) = -0.3 everywhere: e^-0.3 + 0.3 - 1
    assert metrics["kl"] == pytest.approx(float(torch.exp(torch.tensor(-0.3)) + 0.3 - 1), rel=1e-5)
    assert float(loss) > 0


@pytest.mark.parametrize("log_ratio, advantage, clipped", [
    (0.6, 1.0, True),     # ratio 1.82 > 1 + eps_high with A > 0: flat
    (-0.6, -1.0, True),   # ratio 0.55 < 1 - eps_low with A < 0: flat
    (0.6, -1.0, False),   # ratio high but A < 0: the unclipped term is the min, gradient flows
    (-0.6, 1.0, False),   # ratio low but A > 0: gradient flows
    (0.1, 1.0, False),    # inside the trust region
])
def test_gradient_vanishes_exactly_for_tokens_clipped_out_of_the_trust_region(log_ratio, advantage, clipped):
    logits, tokens = make_batch(seed=3, rows=1, length=1)
    logps = policy_logps(logits, tokens)
    old = logps.detach() - log_ratio
    loss, metrics = grpo_loss(logps, old, None, torch.tensor([advantage]), torch.ones(1, 1),
                              epsilon_low=0.2, epsilon_high=0.2)
    (grad,) = torch.autograd.grad(loss, logits)
    assert (grad.abs().max() == 0) == clipped
    assert metrics["clip_ratio/region_mean"] == (1.0 if clipped else 0.0)


def test_delta_caps_the_unclipped_ratio():
    logits, tokens = make_batch(seed=4, rows=1, length=1)
    logps = policy_logps(logits, tokens)
    old = logps.detach() - torch.log(torch.tensor(5.0))  # ratio 5
    loss, _ = grpo_loss(logps, old, None, torch.tensor([-1.0]), torch.ones(1, 1), delta=4.0)
    (grad,) = torch.autograd.grad(loss, logits)
    assert float(loss) == pytest.approx(4.0, rel=1e-5)  # -min(4 * -1, 1.2 * -1)
    assert grad.abs().max() == 0
    uncapped, _ = grpo_loss(logps, old, None, torch.tensor([-1.0]), torch.ones(1, 1))
    assert float(uncapped) == pytest.approx(5.0, rel=1e-5)


@pytest.mark.parametrize("loss_type, expected", [
    ("grpo", (-2.0 + -1.0) / 2),      # mean of per-sequence means
    ("bnpo", (-2.0 - 3.0) / 4),       # token mean over the batch
    ("dapo", (-2.0 - 3.0) / 4),       # token mean (the swarm weights peers by tokens)
    ("dr_grpo", (-2.0 - 3.0) / (2 * 6)),  # sum / (rows * max_completion_length)
])
def test_loss_type_normalization_on_unequal_lengths(loss_type, expected):
    zeros = torch.zeros(2, 4)
    mask = torch.tensor([[1, 0, 0, 0], [1, 1, 1, 0]])
    loss, _ = grpo_loss(zeros, zeros, None, torch.tensor([2.0, 1.0]), mask, loss_type=loss_type,
                        max_completion_length=6)
    assert float(loss) == pytest.approx(expected)


def test_loss_weight_makes_weighted_means_equal_the_union_loss():
    """Two halves weighted by loss_weight give the loss of the whole batch, for every loss type."""
    gen = torch.Generator().manual_seed(5)
    logps = torch.randn(6, 5, generator=gen)
    old = logps + 0.1 * torch.randn(6, 5, generator=gen)
    adv = torch.randn(6, generator=gen)
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0],
                         [1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 0, 0, 0, 0]])
    for loss_type in ("grpo", "bnpo", "dapo", "dr_grpo"):
        whole, _ = grpo_loss(logps, old, None, adv, mask, loss_type=loss_type)
        parts = [slice(0, 2), slice(2, 6)]
        weighted = sum(loss_weight(loss_type, mask[s]) * grpo_loss(logps[s], old[s], None, adv[s], mask[s],
                                                                     loss_type=loss_type, max_completion_length=5)[0]
                       for s in parts)
        total = sum(loss_weight(loss_type, mask[s]) for s in parts)
        assert float(weighted / total) == pytest.approx(float(whole), rel=1e-6), loss_type


def test_unknown_loss_type_is_rejected():
    zeros = torch.zeros(1, 1)
    with pytest.raises(ValueError, match="unknown loss type"):
        grpo_loss(zeros, zeros, None, torch.zeros(1), torch.ones(1, 1), loss_type="ppo")

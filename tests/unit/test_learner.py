"""The peer's GRPO machinery on the real tiny model: rollouts, log-probs, gradients."""


import pytest
import torch

from node.train.learner import Learner
from node.train.logprobs import completion_logits, token_logps
from node.train.models import load_policy
from node.train.rollouts import completion_mask_for, generate
from protocol.config import load_config
from protocol.tasks import load_task


@pytest.fixture(scope="module")
def setup():
    config = load_config(overrides=["rollout.group_size=4", "rollout.questions_per_peer=3"])
    task = load_task("arithmetic", {})
    return config, task


def fresh_learner(config, task):
    torch.manual_seed(0)
    return Learner(load_policy(config.model, config.run.seed), config, task)


def test_completion_mask_stops_after_first_eos():
    ids = torch.tensor([[5, 2, 7, 2], [5, 6, 7, 8], [2, 0, 0, 0]])
    assert completion_mask_for(ids, eos=2).tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]


def test_rollouts_are_grouped_and_logps_match_one_prefill_pass(setup):
    config, task = setup
    policy = load_policy(config.model, config.run.seed)
    prompts = ["12+34=", "7+8=", "99+99="]
    r = generate(policy.model, policy.tokenizer, prompts, 4, 6, temperature=0.8,
                 generator=torch.Generator().manual_seed(0))
    assert r.completion_ids.shape[0] == 12 and r.completion_ids.shape[1] <= 6
    assert all((r.prompt_ids[i] == r.prompt_ids[i - i % 4]).all() for i in range(12))
    assert len(r.texts) == 12
    with torch.no_grad():
        logits = completion_logits(policy.model, r.prompt_ids, r.prompt_mask, r.completion_ids, r.completion_mask)
        prefill = token_logps(logits, r.completion_ids, temperature=0.8)
    assert ((prefill - r.sampling_logps) * r.completion_mask).abs().max() < 1e-4
    assert (r.sampling_logps * (1 - r.completion_mask)).abs().max() == 0
    # A row without EOS in max_new_tokens is marked truncated.
    eos = policy.tokenizer.eos_token_id
    assert r.truncated.tolist() == [bool((row != eos).all()) for row in r.completion_ids]


def test_same_seed_same_rollouts(setup):
    config, task = setup
    policy = load_policy(config.model, config.run.seed)
    runs = [generate(policy.model, policy.tokenizer, ["1+1="], 4, 6, generator=torch.Generator().manual_seed(3))
            for _ in range(2)]
    assert torch.equal(runs[0].completion_ids, runs[1].completion_ids)


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "dr_grpo"])
def test_micro_batches_give_the_full_batch_gradient(setup, loss_type):
    config, task = setup
    config = config.updated(grpo={"loss_type": loss_type})
    learner = fresh_learner(config, task)
    batch = learner.collect([task.question(i) for i in range(3)], torch.Generator().manual_seed(1))
    batch.advantages = torch.linspace(-1, 1, batch.advantages.numel())  # make every row count
    full = learner.gradient(batch)
    learner.config = config.updated(optim={"micro_batch_size": 5})
    micro = learner.gradient(batch)
    assert full.weight == micro.weight
    for a, b in zip(full.tensors, micro.tensors, strict=True):
        assert torch.allclose(a, b, atol=1e-6)


def test_step_changes_the_model_and_kl_reference_stays(setup):
    config, task = setup
    config = config.updated(grpo={"beta": 0.1})
    learner = fresh_learner(config, task)
    batch = learner.collect([task.question(i) for i in range(3)], torch.Generator().manual_seed(2))
    assert batch.ref_logps is not None
    batch.advantages = torch.linspace(-1, 1, batch.advantages.numel())
    before = [p.detach().clone() for p in learner.params]
    gradient = learner.gradient(batch)
    assert gradient.metrics["kl"] == pytest.approx(0.0, abs=1e-6)  # policy == reference at step 0
    learner.apply(gradient.tensors)
    assert any(not torch.equal(a, p) for a, p in zip(before, learner.params, strict=True))
    second = learner.gradient(batch, iteration=1)
    assert second.metrics["kl"] > 0


def test_lora_trains_only_adapters_and_uses_base_as_reference(setup):
    config, task = setup
    config = config.updated(model={"lora_rank": 4}, grpo={"beta": 0.1})
    learner = fresh_learner(config, task)
    assert learner.reference is None and learner.policy.uses_lora
    assert all("lora" in name for name, p in learner.policy.model.named_parameters() if p.requires_grad)
    batch = learner.collect([task.question(0)], torch.Generator().manual_seed(4))
    batch.advantages = torch.linspace(-1, 1, batch.advantages.numel())
    learner.apply(learner.gradient(batch).tensors)
    assert learner.gradient(batch, iteration=1).metrics["kl"] > 0

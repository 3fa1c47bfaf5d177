"""With fixed rollouts, one round of a 3-peer swarm equals one centralized step on the union batch.

Each peer (a real process, real DHT, real all-reduce) trains the tiny model on its own 3
questions; the test then steps a fresh copy of the same model on all 9 questions at once.
Under ``dapo`` the all-reduce weight is the token count, so the averaged gradient is the
union's token mean and the parameters must agree to fp32 precision.
"""

from pathlib import Path

import torch
import torch.nn.functional as F

from node.train.learner import ScoredBatch
from node.train.rollouts import Rollouts
from tests.system.swarm.grpo_round_worker import build_learner

WORKER = Path(__file__).with_name("grpo_round_worker.py")
PEERS = 3


def pad_to(tensor: torch.Tensor, width: int, left: bool) -> torch.Tensor:
    missing = width - tensor.shape[1]
    return F.pad(tensor, (missing, 0) if left else (0, missing))


def union(batches: list[dict]) -> ScoredBatch:
    """The peers' batches as one batch, rows in peer order, padded to common widths."""
    rollouts = [b["rollouts"] for b in batches]
    prompt_width = max(r["prompt_ids"].shape[1] for r in rollouts)
    completion_width = max(r["completion_ids"].shape[1] for r in rollouts)

    def cat(key, width=None, left=False, source=rollouts):
        parts = [s[key] if width is None else pad_to(s[key], width, left) for s in source]
        return torch.cat(parts)

    merged = Rollouts(
        prompt_ids=cat("prompt_ids", prompt_width, left=True), prompt_mask=cat("prompt_mask", prompt_width, left=True),
        completion_ids=cat("completion_ids", completion_width),
        completion_mask=cat("completion_mask", completion_width),
        sampling_logps=cat("sampling_logps", completion_width), truncated=cat("truncated"),
        texts=[t for r in rollouts for t in r["texts"]],
    )
    return ScoredBatch(
        questions=[q for b in batches for q in b["questions"]], rollouts=merged, rewards=cat("rewards", source=batches),
        reward_parts={name: [v for b in batches for v in b["reward_parts"][name]]
                      for name in batches[0]["reward_parts"]},
        advantages=cat("advantages", source=batches), mask=cat("mask", completion_width, source=batches),
        ref_logps=None,
    )


def test_three_peer_round_equals_a_central_step_on_the_union(swarm):
    first, ready = swarm.start("--rank", "0", "--peers", str(PEERS), script=WORKER)
    others = [swarm.launch("--rank", str(rank), "--peers", str(PEERS), "--initial-peers", *ready["maddrs"],
                           script=WORKER) for rank in range(1, PEERS)]
    for peer in others:
        peer.expect("ready", 60)
    for peer in [first, *others]:
        result = peer.expect("result", 120)
        assert result["ok"], result["reason"]

    out = swarm.directory
    batches = [torch.load(out / f"batch{rank}.pt", weights_only=False) for rank in range(PEERS)]
    peer_params = [torch.load(out / f"params{rank}.pt") for rank in range(PEERS)]
    swarm_gradient = torch.load(out / "gradient0.pt")
    torch.set_num_threads(1)
    learner = build_learner()
    central_gradient = learner.gradient(union(batches)).tensors
    scale = max(float(g.abs().max()) for g in central_gradient)
    gradient_gap = max(float((a - b).abs().max()) for a, b in zip(swarm_gradient, central_gradient, strict=True))
    assert gradient_gap <= 1e-6 * scale, (gradient_gap, scale)
    learner.apply(central_gradient)

    for params in peer_params[1:]:
        assert all(torch.equal(a, b) for a, b in zip(peer_params[0], params, strict=True))  # bit for bit
    worst = max(float((a - b.detach()).abs().max()) for a, b in zip(peer_params[0], learner.params, strict=True))
    print(f"gradient gap {gradient_gap:.2e} (max |g| {scale:.2e}); parameter gap {worst:.2e}")
    assert worst <= 1e-5, worst
    moved = max(float((a - b).abs().max()) for a, b in zip(peer_params[0], build_learner().params, strict=True))
    assert moved > 1e-4  # the step did something, so the comparison means something

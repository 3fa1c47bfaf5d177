"""``grpo-swarm bench verifier``: what an audit costs next to the contribution it audits, and what it catches.

One process plays a contributor and a verifier, each with its own copy of the run's θ_0 (the
configured model after its cached warm start). Round r is contributed by peer ``r mod peers``:
the contributor samples its shard, computes the gradient with the unit sketches and builds the
contribution (timed together: the contributor's cost); the verifier audits it (timed: the audit's
cost, with its model digest computed once per round outside the timing, as a peer keeps it);
then both step on that gradient, so every round audits a new θ_r. Medians over the rounds.

The honest rounds give the false-positive count and the distributions behind the [trust]
tolerances. Then each attack in ``ATTACKS`` is built from the last honest round, at the function
level (the signature, token and replay layers are the swarm's, tested there), and audited.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import random
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from rich.console import Console
from rich.table import Table

from node.audit import AuditReport, audit_report, tolerances
from node.contribution import make_contribution
from node.digest import model_digest
from node.grpo import group_advantages
from node.learner import Gradient, Learner, ScoredBatch
from node.logprobs import completion_logits, token_logps
from node.models import Policy, load_policy
from node.rollouts import completion_mask_for, encode_completions
from node.solo import round_generator, shard_batch
from node.warm_start import warm_started_policy
from protocol import swarm_pb2
from protocol.config import ConfigError, RunConfig, load_config
from protocol.sketch import sketch_seed
from protocol.tasks import Task, load_task

Commitment = tuple[swarm_pb2.Contribution, bytes, str]  # (body, bundle, the peer id that signs it)


@dataclass
class Honest:
    """One honest round's contribution: what the attacks start from."""

    round: int
    peer_id: str
    batch: ScoredBatch
    gradient: Gradient
    body: swarm_pb2.Contribution
    bundle: bytes


@dataclass
class Results:
    contributor_s: list[float] = field(default_factory=list)
    collect_s: list[float] = field(default_factory=list)
    gradient_s: list[float] = field(default_factory=list)
    plain_gradient_s: list[float] = field(default_factory=list)  # the same gradient without unit sketches
    audit_s: list[float] = field(default_factory=list)
    digest_s: list[float] = field(default_factory=list)
    honest: list[AuditReport] = field(default_factory=list)
    attacks: dict[str, AuditReport] = field(default_factory=dict)

    @property
    def false_positives(self) -> int:
        return sum(not r.passed for r in self.honest)

    @property
    def cost_ratio(self) -> float:
        return statistics.median(self.audit_s) / statistics.median(self.contributor_s)


class VerifierBench:
    """A contributor and a verifier on copies of one model, stepping together."""

    def __init__(self, config: RunConfig, task: Task, policy: Policy):
        self.config, self.task = config, task
        self.contributor = Learner(policy, config, task)
        self.verifier = Learner(dataclasses.replace(policy, model=copy.deepcopy(policy.model)), config, task)
        self._other_model: Learner | None = None
        self.rng = random.Random(config.run.seed)
        self.digest = model_digest(policy.model)

    @property
    def other_model(self) -> Learner:
        """Another model: the tiny preset from another random init; a hub model without the run's training."""
        if self._other_model is None:
            self._other_model = Learner(load_policy(self.config.model, self.config.run.seed + 1), self.config,
                                        self.task)
        return self._other_model

    def contribute(self, round_: int, peer_id: str, results: Results | None = None) -> Honest:
        start = time.perf_counter()
        batch = shard_batch(self.contributor, self.config, self.task, round_, peer_id)
        collected = time.perf_counter()
        gradient = self.contributor.gradient(batch, 0, sketch_seed(self.config.run.seed, round_))
        computed = time.perf_counter()
        body, bundle = make_contribution(self.config, round_, peer_id, batch, gradient, self.digest)
        if results is not None:
            done = time.perf_counter()
            results.collect_s.append(collected - start)
            results.gradient_s.append(computed - collected)
            results.contributor_s.append(done - start)
            self.contributor.gradient(batch)
            results.plain_gradient_s.append(time.perf_counter() - done)
        return Honest(round_, peer_id, batch, gradient, body, bundle)

    def audit(self, honest: Honest, commitment: Commitment, results: Results | None = None) -> AuditReport:
        body, bundle, signer = commitment
        start = time.perf_counter()
        report = audit_report(self.config, self.task, self.verifier, body, bundle, honest.round, signer, self.rng,
                              model_digest=self.digest)
        if results is not None:
            results.audit_s.append(time.perf_counter() - start)
        return report

    def step(self, gradient: Gradient, results: Results) -> None:
        """Both to θ_{r+1}, as the swarm's agreed step (each on its own copy: ``apply`` clips in place)."""
        for learner in (self.contributor, self.verifier):
            learner.apply([t.clone() for t in gradient.tensors])
        start = time.perf_counter()
        self.digest = model_digest(self.verifier.policy.model)
        results.digest_s.append(time.perf_counter() - start)
        if model_digest(self.contributor.policy.model) != self.digest:
            raise RuntimeError("the verifier's model left the contributor's after the same step")

    def commit(self, honest: Honest, batch: ScoredBatch, gradient: Gradient | None = None,
               peer_id: str | None = None) -> Commitment:
        """A contribution of ``batch`` in the honest round, its gradient computed under θ_r unless given."""
        peer_id = peer_id or honest.peer_id
        if gradient is None:
            gradient = self.contributor.gradient(batch, 0, sketch_seed(self.config.run.seed, honest.round))
        return (*make_contribution(self.config, honest.round, peer_id, batch, gradient, self.digest), peer_id)

    def prefill_logps(self, batch: ScoredBatch) -> torch.Tensor:
        """Log-probs of the batch's completion tokens under θ_r, as an attacker fixing them up computes them."""
        r = batch.rollouts
        with torch.no_grad():
            logits = completion_logits(self.contributor.policy.model, r.prompt_ids, r.prompt_mask,
                                       r.completion_ids, r.completion_mask)
            return token_logps(logits, r.completion_ids, self.config.rollout.temperature) * r.completion_mask


# ---- attacks: each returns what the attacker commits, and the check that must catch it -------------

def cherry_picked(bench: VerifierBench, h: Honest) -> Commitment:
    """Questions of the attacker's choosing (the first ones of the dataset), all else honest."""
    questions = [bench.task.question(i) for i in range(bench.config.rollout.questions_per_peer)]
    generator = round_generator(bench.config.run.seed, h.round, h.peer_id)
    return bench.commit(h, bench.contributor.collect(questions, generator))


def copied(bench: VerifierBench, h: Honest) -> Commitment:
    """Another peer's contribution and bundle, published as the attacker's."""
    return h.body, h.bundle, "attacker"


def copied_renamed(bench: VerifierBench, h: Honest) -> Commitment:
    """Another peer's rollouts, re-committed under the attacker's own peer id."""
    return bench.commit(h, h.batch, h.gradient, peer_id="attacker")


def fabricated_rewards(bench: VerifierBench, h: Honest) -> Commitment:
    """Rewards inverted (1 - r), so the gradient pushes towards wrong answers."""
    rewards = 1 - h.batch.rewards
    advantages = group_advantages(rewards, bench.config.rollout.group_size, bench.config.grpo.scale_rewards)
    return bench.commit(h, dataclasses.replace(h.batch, rewards=rewards, advantages=advantages))


def other_model(bench: VerifierBench, h: Honest) -> Commitment:
    """Completions sampled from another model (a different random init), with that model's log-probs."""
    questions = h.batch.questions
    batch = bench.other_model.collect(questions, round_generator(bench.config.run.seed, h.round, h.peer_id))
    return bench.commit(h, batch)


def other_model_prefilled(bench: VerifierBench, h: Honest) -> Commitment:
    """Another model's completions with their log-probs recomputed under θ_r."""
    questions = h.batch.questions
    batch = bench.other_model.collect(questions, round_generator(bench.config.run.seed, h.round, h.peer_id))
    rollouts = dataclasses.replace(batch.rollouts, sampling_logps=bench.prefill_logps(batch))
    return bench.commit(h, dataclasses.replace(batch, rollouts=rollouts))


def _edited(bench: VerifierBench, h: Honest) -> ScoredBatch:
    """The first completion of every group replaced by the right answer after sampling, and re-scored."""
    r, group = h.batch.rollouts, bench.config.rollout.group_size
    tokenizer, device = bench.contributor.policy.tokenizer, bench.contributor.policy.device
    edited = list(range(0, r.completion_ids.shape[0], group))
    answers, _ = encode_completions(tokenizer, [h.batch.questions[row // group].answer for row in edited], device)
    width = max(r.completion_ids.shape[1], answers.shape[1])
    ids = torch.full((r.completion_ids.shape[0], width), tokenizer.pad_token_id, dtype=torch.long, device=device)
    ids[:, :r.completion_ids.shape[1]] = r.completion_ids
    ids[edited] = tokenizer.pad_token_id
    ids[edited, :answers.shape[1]] = answers
    mask = completion_mask_for(ids, tokenizer.eos_token_id)
    logps = torch.zeros(ids.shape, dtype=r.sampling_logps.dtype, device=device)
    logps[:, :r.completion_ids.shape[1]] = r.sampling_logps  # the sampled tokens' log-probs, kept
    rollouts = dataclasses.replace(r, completion_ids=ids, completion_mask=mask, sampling_logps=logps * mask,
                                   truncated=~(ids == tokenizer.eos_token_id).any(dim=1),
                                   texts=tokenizer.batch_decode(ids, skip_special_tokens=True))
    return bench.contributor.score_rollouts(h.batch.questions, rollouts)


def edited_tokens(bench: VerifierBench, h: Honest) -> Commitment:
    """Wrong answers edited into right ones after sampling, keeping the sampled log-probs."""
    return bench.commit(h, _edited(bench, h))


def edited_prefilled(bench: VerifierBench, h: Honest) -> Commitment:
    """Edited answers with log-probs recomputed under θ_r: caught only when the edits are improbable."""
    batch = _edited(bench, h)
    rollouts = dataclasses.replace(batch.rollouts, sampling_logps=bench.prefill_logps(batch))
    return bench.commit(h, dataclasses.replace(batch, rollouts=rollouts))


def _rescaled(h: Honest, factor: float) -> Gradient:
    return dataclasses.replace(h.gradient, tensors=[t * factor for t in h.gradient.tensors],
                               unit_sketches=h.gradient.unit_sketches * factor)


def scaled(bench: VerifierBench, h: Honest) -> Commitment:
    """The gradient ×10, committed consistently (sketches and norm ×10)."""
    return bench.commit(h, h.batch, _rescaled(h, 10.0))


def sign_flipped(bench: VerifierBench, h: Honest) -> Commitment:
    """The gradient negated, committed consistently."""
    return bench.commit(h, h.batch, _rescaled(h, -1.0))


def other_gradient(bench: VerifierBench, h: Honest) -> Commitment:
    """Honest rollouts, but unit sketches and norm of another batch's gradient."""
    other = shard_batch(bench.contributor, bench.config, bench.task, h.round + 1, h.peer_id)
    gradient = bench.contributor.gradient(other, 0, h.gradient.sketch_seed)
    return bench.commit(h, h.batch, dataclasses.replace(gradient, weight=h.gradient.weight))


def inflated_tokens(bench: VerifierBench, h: Honest) -> Commitment:
    """An honest contribution claiming twice its all-reduce weight."""
    body = swarm_pb2.Contribution()
    body.CopyFrom(h.body)
    body.token_count *= 2
    return body, h.bundle, h.peer_id


ATTACKS: dict[str, tuple[Callable[[VerifierBench, Honest], Commitment], str]] = {
    "cherry-picked questions": (cherry_picked, "shard"),
    "copy of another peer's contribution": (copied, "shard"),
    "another peer's rollouts, renamed": (copied_renamed, "shard"),
    "fabricated rewards": (fabricated_rewards, "rewards"),
    "inflated token count": (inflated_tokens, "token_count"),
    "completions from another model": (other_model, "logprobs"),
    "another model, log-probs recomputed": (other_model_prefilled, "surprisal"),
    "tokens edited after sampling": (edited_tokens, "logprobs"),
    "scaled gradient (x10)": (scaled, "sketch"),
    "sign-flipped gradient": (sign_flipped, "sketch"),
    "sketch of another gradient": (other_gradient, "sketch"),
}
# Informative, not guaranteed: edits to answers θ_r finds likely enough pass the surprisal test.
PROBES = {"edited answers, log-probs recomputed": edited_prefilled}


# ---- the run and its tables ------------------------------------------------------------------------

def run_verifier_bench(config: RunConfig, contributions: int, peers: int, attacks: bool = True,
                       console: Console | None = None) -> Results:
    if contributions < 1:
        raise ConfigError(f"--contributions: must be >= 1 (got {contributions})")
    if peers < 1:
        raise ConfigError(f"--peers: must be >= 1 (got {peers})")
    console = console or Console()
    task = load_task(config.task.name, config.task.options)
    with console.status("warm start (cached after the first run)"):
        bench = VerifierBench(config, task, warm_started_policy(config, task))
    results = Results()
    honest = None
    for round_ in range(contributions):
        honest = bench.contribute(round_, f"peer-{round_ % peers}", results)
        results.honest.append(bench.audit(honest, (honest.body, honest.bundle, honest.peer_id), results))
        if round_ < contributions - 1:  # the attacks start from the last round's θ_r
            bench.step(honest.gradient, results)
    if attacks:
        for name, (attack, _) in {**ATTACKS, **{n: (p, "") for n, p in PROBES.items()}}.items():
            results.attacks[name] = bench.audit(honest, attack(bench, honest))
    return results


def _seconds(values: list[float]) -> str:
    return f"{statistics.median(values):.4f}" if values else "n/a"


def cost_table(results: Results) -> Table:
    contributor = statistics.median(results.contributor_s)
    table = Table(title="audit cost per contribution (median seconds)")
    table.add_column("")
    table.add_column("seconds", justify="right")
    table.add_column("vs contributor", justify="right")
    rows = [
        ("contributor: rollouts + rewards", results.collect_s),
        ("contributor: gradient + unit sketches", results.gradient_s),
        ("  (the same gradient without sketches)", results.plain_gradient_s),
        ("contributor total (+ bundle, contribution)", results.contributor_s),
        ("verifier: audit", results.audit_s),
        ("verifier: model digest, once per round", results.digest_s),
    ]
    for label, values in rows:
        share = f"{statistics.median(values) / contributor:.1%}" if values else "n/a"
        table.add_row(label, _seconds(values), share)
    table.caption = f"audit / contributor = {results.cost_ratio:.1%} (target <= 25%)"
    return table


def distribution_table(results: Results, config: RunConfig) -> Table:
    trust, limit = config.trust, tolerances(config)
    table = Table(title=f"honest contributions: {len(results.honest)}, false positives: {results.false_positives}")
    for column in ("statistic", "min", "median", "max", "tolerance"):
        table.add_column(column, justify="left" if column == "statistic" else "right")
    limits = {"logprob_max_abs": f"<= {limit.logprob_max_abs:g}", "logprob_mean_abs": f"<= {limit.logprob_mean_abs:g}",
              "surprisal_z": f"<= {trust.surprisal_max_z:g}", "sketch_min_cosine": f">= {limit.sketch_min_cosine:g}",
              "sketch_norm_ratio": f"1 ± {limit.sketch_norm_tolerance:g}",
              "sketch_deviation": f"<= {limit.sketch_noise_floor:g} or the two above",
              "grad_norm_ratio": f"1/{trust.grad_norm_factor:g}..{trust.grad_norm_factor:g}",
              "sketch_sum_error": "<= 1e-4"}
    for name, limit in limits.items():
        values = sorted(r.stats[name] for r in results.honest if name in r.stats)
        if values:
            table.add_row(name, f"{values[0]:.3g}", f"{statistics.median(values):.3g}", f"{values[-1]:.3g}", limit)
    return table


def attack_table(results: Results) -> Table:
    table = Table(title="attacks (function level)")
    for column in ("attack", "must fail", "failed", "evidence"):
        table.add_column(column)
    expected = {name: check for name, (_, check) in ATTACKS.items()}
    for name, report in results.attacks.items():
        want = expected.get(name, "")
        found = report.check or "passed"
        mark = "" if not want else (" ✓" if report.check == want else " ✗")
        table.add_row(name, want or "(probe)", found + mark, report.evidence if report.check or not want else "")
    return table


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--contributions", type=int, default=50, help="honest contributions to produce and audit")
    parser.add_argument("--peers", type=int, default=4, help="peer ids the rounds cycle through")
    parser.add_argument("--no-attacks", action="store_true", help="skip the attack variants")


def run(args) -> Results:
    """For the CLI: ``args`` has config, overrides, contributions, peers, no_attacks."""
    console = Console()
    config = load_config(args.config, args.overrides)
    results = run_verifier_bench(config, args.contributions, args.peers, not args.no_attacks, console)
    console.print(cost_table(results))
    console.print(distribution_table(results, config))
    if results.attacks:
        console.print(attack_table(results))
    return results

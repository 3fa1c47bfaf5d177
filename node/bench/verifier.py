"""``grpo-swarm bench verifier``: what an audit costs next to the contribution it audits, and what it catches.

One process plays the trainers and a verifier, each with its own copy of the run's θ_0 (the configured
model after its cached warm start). Round r is contributed by peer ``r mod peers``, an honest
TrainerDecisions (node/peer/trainer.py) on the contributor's model: it samples its shard, computes the
gradient with the unit sketches and builds and signs the contribution (timed together: the
contributor's cost). What it sends into the all-reduce is reduced offline by the real reducer
(node/swarm/hivemind/offline.py), whose binding reports go to the verifier with the served contribution. The
verifier then decides, as the swarm's verifier does (node/verify/judge.py; timed: the audit's cost, with
its model digest computed once per round outside the timing, as a peer keeps it). Then both step on that
gradient, so every round audits a new θ_r. Medians over the rounds.

The honest rounds give the false-positive count and the distributions behind the [trust] tolerances.
Then every attack of the catalogue (attacks.py) plays two rounds at the last θ_r as its own peer, and the
first verdict that fails must name the attack's check.
"""

from __future__ import annotations

import copy
import dataclasses
import random
import statistics
import time
from dataclasses import dataclass, field
from typing import Optional

import torch
from rich.console import Console
from rich.table import Table

from node.bench.attacks import ATTACKS, Attack, attacking
from node.peer.trainer import ServedContribution, TrainerDecisions, largest_honest_weight
from node.swarm.hivemind.offline import simulate_allreduce
from node.swarm.hivemind.reducer import ReduceRules
from node.train.learner import Gradient, Learner, ScoredBatch
from node.train.models import Policy
from node.train.warm_start import warm_started_policy
from node.verify.audit import AuditReport
from node.verify.judge import judge_contribution
from node.verify.tolerances import tolerances
from protocol import swarm_pb2
from protocol.config import ConfigError, RunConfig
from protocol.digest import model_digest
from protocol.identity import SigningKey
from protocol.records import ReplayGuard
from protocol.sketch import sketch_seed
from protocol.tasks import Task, load_task

REDUCERS = 3  # reducers of the offline all-reduce that report what a trainer sent
OFFLINE_GROUP = b"offline"  # the group id of the offline all-reduce's reports
ATTACK_ROUNDS = 2  # an attack must be caught within this many rounds


@dataclass
class Played:
    """What a trainer did in one round: the evidence a verifier gets, and what it computed."""

    round: int
    served: ServedContribution  # the signed contribution record(s) and the rollout bundle
    parts: dict[bytes, list[swarm_pb2.PartSketch]]  # the reducers' reports of what it sent, by group
    batch: ScoredBatch
    gradient: Gradient  # the gradient it committed to
    body: swarm_pb2.Contribution  # the commitment it made (what it serves may differ)


@dataclass
class AttackResult:
    report: Optional[AuditReport]  # the first failing one, else the last round's (None: no judgement)
    round: int


@dataclass
class Results:
    contributor_s: list[float] = field(default_factory=list)
    collect_s: list[float] = field(default_factory=list)
    gradient_s: list[float] = field(default_factory=list)
    plain_gradient_s: list[float] = field(default_factory=list)  # the same gradient without unit sketches
    audit_s: list[float] = field(default_factory=list)
    digest_s: list[float] = field(default_factory=list)
    honest: list[AuditReport] = field(default_factory=list)
    attacks: dict[str, AttackResult] = field(default_factory=dict)

    @property
    def false_positives(self) -> int:
        return sum(not r.passed for r in self.honest)

    @property
    def cost_ratio(self) -> float:
        return statistics.median(self.audit_s) / statistics.median(self.contributor_s)


class BenchTrainer(TrainerDecisions):
    """A trainer of the bench: the contributor's model, its own peer id and key."""

    def __init__(self, bench: "VerifierBench", peer_id: str):
        self.bench, self.peer_id = bench, peer_id
        self.config, self.task, self.learner = bench.config, bench.task, bench.contributor
        self.key = bench.key_of(peer_id)

    @property
    def digest(self) -> str:
        return self.bench.digest

    def others_contributions(self, r: int):
        for peer_id in self.bench.honest_peers:
            if peer_id != self.peer_id:
                yield peer_id, self.bench.honest_contribution(r, peer_id)


class VerifierBench:
    """Trainers and a verifier on copies of one model, stepping together."""

    def __init__(self, config: RunConfig, task: Task, policy: Policy, peers: int = 4):
        self.config, self.task = config, task
        self.contributor = Learner(policy, config, task)
        self.verifier = Learner(dataclasses.replace(policy, model=copy.deepcopy(policy.model)), config, task)
        self.rng = random.Random(config.run.seed)
        self.digest = model_digest(policy.model)
        self.honest_peers = [f"peer-{k}" for k in range(peers)]
        self.total_length = sum(p.numel() for p in self.contributor.params)
        self._keys: dict[str, SigningKey] = {}
        self._honest: dict[tuple[str, int, str], ServedContribution] = {}  # (θ digest, round, peer) -> served

    def key_of(self, peer_id: str) -> SigningKey:
        """The key a peer registered (its token binds it to the peer id)."""
        return self._keys.setdefault(peer_id, SigningKey())

    def trainer(self, peer_id: str, attack: Optional[type[Attack]] = None) -> TrainerDecisions:
        return (BenchTrainer if attack is None else attacking(attack, BenchTrainer))(self, peer_id)

    def honest_contribution(self, r: int, peer_id: str) -> ServedContribution:
        """What honest ``peer_id`` serves for round ``r`` at the current θ (made once)."""
        key = (self.digest, r, peer_id)
        if key not in self._honest:
            self._honest[key] = self.play(self.trainer(peer_id), r).served
        return self._honest[key]

    def play(self, trainer: TrainerDecisions, r: int, results: Optional[Results] = None) -> Played:
        """Round ``r`` of ``trainer``: its decisions, and the reducers' reports of what it sent."""
        start = time.perf_counter()
        batch = trainer.sample_batch(r)
        collected = time.perf_counter()
        gradient = trainer.committed_gradient(r, batch)
        computed = time.perf_counter()
        body, bundle = trainer.contribution(r, batch, gradient)
        served = trainer.served_contribution(r, body, bundle)
        if results is not None:
            done = time.perf_counter()
            results.collect_s.append(collected - start)
            results.gradient_s.append(computed - collected)
            results.contributor_s.append(done - start)
            self.contributor.gradient(batch)
            results.plain_gradient_s.append(time.perf_counter() - done)
        tensors, weight = trainer.outgoing(gradient)
        return Played(r, served, self.reported_parts(trainer.peer_id, tensors, weight, r), batch, gradient, body)

    def reported_parts(self, peer_id: str, tensors: list[torch.Tensor], weight: float,
                       r: int) -> dict[bytes, list[swarm_pb2.PartSketch]]:
        """What REDUCERS reducers of one group report ``peer_id`` sent them (the offline all-reduce's real
        reducer)."""
        rules = ReduceRules(sketch_seed=sketch_seed(self.config.run.seed, r),
                            max_weight=largest_honest_weight(self.config))
        senders = [[t.detach() for t in tensors]] * REDUCERS
        _, reports = simulate_allreduce(senders, [weight] * REDUCERS, rules)
        parts = [report["0"] for report in reports if "0" in report]
        for part in parts:
            part.sender = peer_id
        return {OFFLINE_GROUP: parts}

    def judge(self, peer_id: str, played: Played, replay: ReplayGuard,
              results: Optional[Results] = None) -> Optional[AuditReport]:
        records, bundle = played.served
        start = time.perf_counter()
        report = judge_contribution(self.config, self.task, self.verifier, peer_id=peer_id, round_=played.round,
                                    records=records, bundle=bundle, parts=played.parts,
                                    bound_key=self.key_of(peer_id).public_key, replay=replay, rng=self.rng,
                                    model_digest=self.digest, total_length=self.total_length)
        if results is not None:
            results.audit_s.append(time.perf_counter() - start)
        return report

    def attack(self, name: str, first_round: int) -> AttackResult:
        """Rounds ``first_round``.. of the attack as peer "attacker": the first failing verdict, if any."""
        trainer, replay, report = self.trainer("attacker", ATTACKS[name]), ReplayGuard(), None
        for r in range(first_round, first_round + ATTACK_ROUNDS):
            report = self.judge("attacker", self.play(trainer, r), replay)
            if report is not None and not report.passed:
                return AttackResult(report, r)
        return AttackResult(report, first_round + ATTACK_ROUNDS - 1)

    def step(self, gradient: Gradient, results: Results) -> None:
        """Both to θ_{r+1}, as the swarm's agreed step (each on its own copy: ``apply`` clips in place)."""
        for learner in (self.contributor, self.verifier):
            learner.apply([t.clone() for t in gradient.tensors])
        start = time.perf_counter()
        self.digest = model_digest(self.verifier.policy.model)
        results.digest_s.append(time.perf_counter() - start)
        if model_digest(self.contributor.policy.model) != self.digest:
            raise RuntimeError("the verifier's model left the contributor's after the same step")


def run_verifier_bench(config: RunConfig, contributions: int, peers: int, attacks: bool = True,
                       console: Console | None = None) -> Results:
    if contributions < 1:
        raise ConfigError(f"--contributions: must be >= 1 (got {contributions})")
    if peers < 2:
        raise ConfigError(f"--peers: must be >= 2 (got {peers}): copying attacks need another trainer")
    console = console or Console()
    task = load_task(config.task.name, config.task.options)
    with console.status("warm start (cached after the first run)"):
        bench = VerifierBench(config, task, warm_started_policy(config, task), peers)
    results, replay = Results(), ReplayGuard()
    for r in range(contributions):
        peer_id = bench.honest_peers[r % peers]
        played = bench.play(bench.trainer(peer_id), r, results)
        results.honest.append(bench.judge(peer_id, played, replay, results))
        if r < contributions - 1:  # the attacks start from the last round's θ_r
            bench.step(played.gradient, results)
    if attacks:
        for name in ATTACKS:
            results.attacks[name] = bench.attack(name, contributions)
    return results


def print_verifier_bench(results: Results, config: RunConfig, console: Console | None = None) -> None:
    console = console or Console()
    console.print(cost_table(results))
    console.print(distribution_table(results, config))
    if results.attacks:
        console.print(attack_table(results))


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
        ("contributor total (+ bundle, signed contribution)", results.contributor_s),
        ("verifier: record, audit and binding checks", results.audit_s),
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
    for name, bound in limits.items():
        values = sorted(r.stats[name] for r in results.honest if name in r.stats)
        if values:
            table.add_row(name, f"{values[0]:.3g}", f"{statistics.median(values):.3g}", f"{values[-1]:.3g}", bound)
    return table


def attack_table(results: Results) -> Table:
    table = Table(title=f"attacks (each {ATTACK_ROUNDS} rounds as its own peer; offline reducers)")
    for column in ("attack", "must fail", "failed", "round", "evidence"):
        table.add_column(column)
    for name, result in results.attacks.items():
        attack, report = ATTACKS[name], result.report
        found = "no judgement" if report is None else (report.check or "passed")
        mark = "" if attack.probe else (" ✓" if report is not None and report.check == attack.caught_by else " ✗")
        want = f"{attack.caught_by} (probe)" if attack.probe else attack.caught_by
        evidence = report.evidence if report is not None and report.check else ""
        table.add_row(name, want, found + mark, str(result.round), evidence)
    return table

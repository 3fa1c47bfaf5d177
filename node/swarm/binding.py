"""Binding (docs/DESIGN.md "Trust" 4): what a sender put into the all-reduce must be what it committed.

Every reducer sketches (protocol.sketch, the round's seed) each part it receives from each sender, as
received (decompressed, before clipping or averaging), and reports per sender: the weight the sender
claimed, the flat range [offset, offset + length) of the gradient it received, and the sum of those
parts' sketches. The sketch is linear, so the reports of all reducers for one sender must cover the
gradient exactly once and add up to the sketch the sender committed; ``check_binding`` checks that for the
reports of one all-reduce group, ``check_groups`` for every group the sender was in during the round (a
peer's failed attempt and its retry are two groups; an honest peer sends its one commitment in each).

Flat order: the tensors passed to RoundAverager.average, in order, each flattened (the order of
protocol.sketch.sketch_tensors).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence

import torch

from protocol import swarm_pb2
from protocol.sketch import relative_error


class BindingKind(enum.StrEnum):
    """What is wrong between a sender's commitment and the reducers' reports of what it sent."""

    WEIGHT = "weight"  # a reducer saw another weight than the committed token count
    INCONSISTENT = "inconsistent"  # the reducers' reports contradict each other (overlap, out of range)
    INCOMPLETE = "incomplete"  # no reducer reported part of the gradient (it may have failed)
    MISMATCH = "mismatch"  # the reported parts do not add up to the committed sketch

    @property
    def is_evidence(self) -> bool:
        """Evidence against the sender (or a lying reducer: the reports are signed), not a reducer's failure."""
        return self in (BindingKind.WEIGHT, BindingKind.MISMATCH)


@dataclass(frozen=True)
class BindingProblem:
    kind: BindingKind
    detail: str

    def __str__(self) -> str:
        return f"{self.kind}: {self.detail}"


@dataclass
class ReceivedParts:
    """What one reducer received from one sender: a contiguous run of its parts (they arrive in order)."""

    weight: float
    offset: int
    length: int = 0
    sketch: Optional[torch.Tensor] = None  # float64 sum of the parts' sketches

    def add(self, offset: int, length: int, sketch: torch.Tensor) -> None:
        assert offset == self.offset + self.length, "a sender's parts reach a reducer in order"
        self.length += length
        self.sketch = sketch if self.sketch is None else self.sketch + sketch

    def to_proto(self, sender: str) -> swarm_pb2.PartSketch:
        return swarm_pb2.PartSketch(sender=sender, weight=self.weight, offset=self.offset, length=self.length,
                                    sketch=self.sketch.tolist())


@dataclass
class AllReduceReport:
    """The averager process's account of one all-reduce, handed to the host even when the round failed."""

    group_id: bytes
    members: list[str]  # the group as formed, in hivemind's order (the i-th member reduces the i-th span)
    received: dict[str, swarm_pb2.PartSketch] = field(default_factory=dict)  # sender -> what we received
    non_finite_from: list[str] = field(default_factory=list)  # reducers that sent this peer a NaN or an infinity
    gathers: dict[str, object] = field(default_factory=dict)  # member -> what it sent in hivemind's gather
    dropped: list[str] = field(default_factory=list)  # members that failed to deliver to this peer (runner)


def check_binding(
    committed_sketch: Sequence[float] | torch.Tensor,
    committed_weight: float,
    reports: Sequence[swarm_pb2.PartSketch],
    total_length: int,
    tolerance: float,
) -> Optional[BindingProblem]:
    """None when the reducers' ``reports`` of what one sender sent them bind it to its commitment, else the
    first problem found, in this order:

    - every reducer saw the committed weight (the token count);
    - the reported ranges cover [0, total_length) exactly once;
    - the sum of the reported sketches is within ``tolerance`` (relative error) of the committed sketch.
    """
    senders = {report.sender for report in reports}
    if len(senders) > 1:
        raise ValueError(f"reports of several senders: {sorted(senders)}")
    if not 0 < tolerance:
        raise ValueError(f"tolerance must be > 0, got {tolerance}")
    for report in reports:
        if report.weight != committed_weight:
            span = f"[{report.offset}, {report.offset + report.length})"
            return BindingProblem(BindingKind.WEIGHT, f"sent weight {report.weight:g} for {span}, "
                                                      f"committed {committed_weight:g}")
    position = 0
    for report in sorted(reports, key=lambda r: r.offset):
        if report.length <= 0 or report.offset < 0 or report.offset + report.length > total_length:
            return BindingProblem(BindingKind.INCONSISTENT, f"a report claims [{report.offset}, "
                                                            f"{report.offset + report.length}) of [0, {total_length})")
        if report.offset < position:
            return BindingProblem(BindingKind.INCONSISTENT, f"[{report.offset}, {position}) reported twice")
        if report.offset > position:
            return BindingProblem(BindingKind.INCOMPLETE, f"no reducer reported [{position}, {report.offset})")
        position = report.offset + report.length
    if position < total_length:
        return BindingProblem(BindingKind.INCOMPLETE, f"no reducer reported [{position}, {total_length})")
    committed = torch.as_tensor(committed_sketch, dtype=torch.float64)
    received = torch.zeros_like(committed)
    for report in reports:
        if len(report.sketch) != len(committed):
            raise ValueError(f"a report's sketch has {len(report.sketch)} entries, the commitment {len(committed)}")
        received += torch.tensor(report.sketch, dtype=torch.float64)
    error = relative_error(received, committed)
    if not error <= tolerance:
        return BindingProblem(BindingKind.MISMATCH, f"the parts' sketches differ from the committed sketch by "
                                                    f"{error:.3g} (tolerance {tolerance:g})")
    return None


def check_groups(
    committed_sketch: Sequence[float] | torch.Tensor,
    committed_weight: float,
    groups: Mapping[bytes, Sequence[swarm_pb2.PartSketch]],
    total_length: int,
    tolerance: float,
) -> Optional[BindingProblem]:
    """``check_binding`` on the reports of each group (group id -> reports) separately: reports of two groups
    are two sendings and never add up. The first evidence found in any group, else the first other problem,
    else None."""
    problems = [check_binding(committed_sketch, committed_weight, reports, total_length, tolerance)
                for _, reports in sorted(groups.items())]
    found = [problem for problem in problems if problem is not None]
    return next((problem for problem in found if problem.kind.is_evidence), found[0] if found else None)

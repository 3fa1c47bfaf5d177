"""Binding (DESIGN "Trust" 4): what a sender put into the all-reduce must be what it committed.

Every reducer sketches (protocol.sketch, the round's seed) each part it receives from each sender, as
received (decompressed, before clipping or averaging), and reports per sender: the weight the sender
claimed, the flat range [offset, offset + length) of the gradient it received, and the sum of those
parts' sketches. The sketch is linear, so the reports of all reducers for one sender must cover the
gradient exactly once and add up to the sketch the sender committed; ``check_binding`` checks that.

Flat order: the tensors passed to GradientAverager.average, in order, each flattened (the order of
protocol.sketch.sketch_tensors).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from protocol import swarm_pb2
from protocol.sketch import relative_error

# check_binding's reasons start with one of these words. WEIGHT and MISMATCH are evidence against the
# sender (or a lying reducer: the reports are signed); INCONSISTENT means the reducers' reports contradict
# each other, INCOMPLETE that some reducer reported nothing for part of the gradient (it may have failed).
WEIGHT, INCONSISTENT, INCOMPLETE, MISMATCH = "weight", "inconsistent", "incomplete", "mismatch"


def part_offsets(tensors: Sequence[torch.Tensor], parts: Sequence[torch.Tensor]) -> list[int]:
    """Where each part starts in the flat order of ``tensors``. hivemind's TensorPartContainer cuts parts
    as views of each (contiguous) tensor's flat view, so a part starts where its data lies in its tensor."""
    offsets = []
    for part in parts:
        start = 0
        for tensor in tensors:
            begin = tensor.data_ptr()
            if tensor.numel() and begin <= part.data_ptr() < begin + tensor.numel() * tensor.element_size():
                offsets.append(start + (part.data_ptr() - begin) // tensor.element_size())
                break
            start += tensor.numel()
        else:
            raise ValueError("a part is not a view of any of the tensors")
    return offsets


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


def check_binding(
    committed_sketch: Sequence[float] | torch.Tensor,
    committed_weight: float,
    reports: Sequence[swarm_pb2.PartSketch],
    total_length: int,
    tolerance: float,
) -> Optional[str]:
    """None when the reducers' ``reports`` of what one sender sent them bind it to its commitment, else why
    not (the reason starts with WEIGHT, INCONSISTENT, INCOMPLETE or MISMATCH, in the order checked).

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
            return (f"{WEIGHT}: sent weight {report.weight:g} for [{report.offset}, {report.offset + report.length}),"
                    f" committed {committed_weight:g}")
    position = 0
    for report in sorted(reports, key=lambda r: r.offset):
        if report.length <= 0 or report.offset < 0 or report.offset + report.length > total_length:
            return f"{INCONSISTENT}: a report claims [{report.offset}, {report.offset + report.length}) of [0, {total_length})"
        if report.offset < position:
            return f"{INCONSISTENT}: [{report.offset}, {position}) reported twice"
        if report.offset > position:
            return f"{INCOMPLETE}: no reducer reported [{position}, {report.offset})"
        position = report.offset + report.length
    if position < total_length:
        return f"{INCOMPLETE}: no reducer reported [{position}, {total_length})"
    committed = torch.as_tensor(committed_sketch, dtype=torch.float64)
    received = torch.zeros_like(committed)
    for report in reports:
        if len(report.sketch) != len(committed):
            raise ValueError(f"a report's sketch has {len(report.sketch)} entries, the commitment {len(committed)}")
        received += torch.tensor(report.sketch, dtype=torch.float64)
    error = relative_error(received, committed)
    if not error <= tolerance:
        return f"{MISMATCH}: the parts' sketches differ from the committed sketch by {error:.3g} (tolerance {tolerance:g})"
    return None

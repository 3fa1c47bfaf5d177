"""Members a peer keeps out of its groups for a while: those that failed to deliver to it in a failed all-reduce
(a griefer that joins groups and then stalls or drops its parts fails the round for every member, every round
it joins).

What a member saw on its own streams is no evidence for anyone else, and an honest peer that froze or lost its
connection looks the same, so a suspension is local and temporary: SUSPENSION_ATTEMPTS of this peer's round
attempts the first time, twice as long each time after, so that one griefer costs the honest peers a number of
rounds that grows with the logarithm of the run's length. Attempts, not rounds, count down: a swarm that cannot
step while it waits must still get the suspended peer back.

A peer that saw more than half of the other members fail it blames nobody: with an honest majority in a group,
that is this peer's own trouble (a starved CPU, a lost connection), not theirs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

logger = logging.getLogger(__name__)

SUSPENSION_ATTEMPTS = 4  # round attempts a member is kept out of this peer's groups, the first time


@dataclass
class Suspension:
    times: int  # how often the member was suspended
    until: int  # the attempt from which it is admitted again


class Suspensions:
    def __init__(self, owner: str, first: int = SUSPENSION_ATTEMPTS):
        self.owner, self.first = owner, first
        self.attempt = 0  # this peer's round attempts so far
        self._by_peer: dict[str, Suspension] = {}

    def next_attempt(self) -> None:
        self.attempt += 1

    def blame(self, dropped: list[str], members: list[str], round_: int) -> None:
        """Suspend the ``dropped`` members of a failed all-reduce among ``members`` (this peer's group), unless they
        are more than half of the others."""
        others = [member for member in members if member != self.owner]
        if not dropped or 2 * len(dropped) > len(others):
            return
        for peer in dropped:
            held = self._by_peer.get(peer)
            times = 1 if held is None else held.times + 1
            attempts = self.first * 2 ** (times - 1)
            self._by_peer[peer] = Suspension(times, self.attempt + 1 + attempts)
            logger.warning(f"{self.owner}: suspending {peer} for {attempts} round attempts: it failed to deliver "
                           f"in the all-reduce of round {round_} (time {times})")

    def current(self) -> set[str]:
        """The members kept out of this peer's next group."""
        return {peer for peer, held in self._by_peer.items() if held.until > self.attempt}

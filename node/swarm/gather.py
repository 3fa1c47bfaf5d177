"""What each member of an all-reduce group tells the others in hivemind's gather: the round it averages and a
nonce. Every member checks every gather before any part is sent (node/swarm/hivemind/averager.py) and again
with the result (averaging.py): a group that mixed rounds averages nothing, so no reducer reports, under its
round, parts another member sent for another round."""

from __future__ import annotations

import secrets
from dataclasses import dataclass

NONCE_BYTES = 8


@dataclass(frozen=True)
class RoundGather:
    """What each member tells its group: the round it averages (a group that mixed rounds is refused by all of
    its members) and a random nonce, unique to the call, that makes the group's agreement key unique."""

    round: int
    nonce: bytes

    @classmethod
    def new(cls, round_: int) -> "RoundGather":
        return cls(round_, secrets.token_bytes(NONCE_BYTES))

    def to_wire(self) -> list:
        return [self.round, self.nonce]

    @classmethod
    def from_wire(cls, value) -> "RoundGather":
        """The gather another member sent; ValueError if it is not one."""
        if not (isinstance(value, (list, tuple)) and len(value) == 2):
            raise ValueError(f"not a round gather: {value!r:.80}")
        round_, nonce = value
        if not (isinstance(round_, int) and not isinstance(round_, bool) and round_ >= 0
                and isinstance(nonce, bytes) and len(nonce) == NONCE_BYTES):
            raise ValueError(f"not a round gather: {value!r:.80}")
        return cls(round_, nonce)

"""Loading the swarm's state from a peer (docs/DESIGN.md "Trust" 6): only the state a majority of the live
identities vouches for, and only from a peer that vouched for it.

A resyncing or joining peer and the coordinator's checkpointer each pick the position (round, model digest)
more than half of the live identities published (node/swarm/progress.py ``majority_position``), download
from one of the peers that published it, and check the state whole before a value changes: it must fit the
model (node/train/state.py) and hash to the vouched digest at the vouched round. A donor whose state is not
a state of this model, or has another digest at the round it published, is named in the result, so the
caller can stop asking it (and stop averaging with it). One that serves another round is only skipped: an
honest donor steps between publishing its progress and serving its state. So is one whose stream ends early
(fewer tensors than its metadata names): a cut connection looks the same.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Optional, Sequence

from node.swarm.averaging import RoundAverager
from node.swarm.progress import Progress
from node.train.learner import Learner
from node.train.state import IncompleteState, StateError, check_served_state, load_served_state
from protocol.digest import model_digest

logger = logging.getLogger(__name__)


@dataclass
class StateLoad:
    donor: Optional[str] = None  # whose state is now loaded; None: nothing was loaded
    refused: dict[str, str] = field(default_factory=dict)  # donor -> why its state was refused (evidence)


def load_vouched_state(averager: RoundAverager, learner: Learner, position: Progress, donors: Sequence[str],
                       timeout: float) -> StateLoad:
    """Download the state at ``position`` from the first of ``donors`` that serves exactly it, within ``timeout``
    seconds in all, and load it into ``learner``."""
    deadline, load = time.monotonic() + timeout, StateLoad()
    for donor in donors:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        served = averager.download_state(donor, timeout=left)
        if served is None:
            continue
        try:
            state = check_served_state(learner.params, learner.optimizer, *served)
            if state.round != position.round:  # no evidence: it may have stepped since it published
                logger.info(f"{donor} served round {state.round}, not {position.round}: it moved on")
                continue
            digest = model_digest(learner.policy.model, replaced={
                id(param): value for param, value in zip(learner.params, state.params, strict=True)})
            if digest != position.digest:
                raise StateError(f"it served model digest {digest[:12]} at round {state.round}, having published "
                                 f"{position.digest[:12]}")
            load_served_state(learner.params, learner.optimizer, state)
        except IncompleteState as e:
            logger.warning(f"state of {donor} incomplete, trying another donor: {e}")
            continue
        except StateError as e:
            logger.warning(f"state of {donor} refused: {e}")
            load.refused[donor] = str(e)
            continue
        load.donor = donor
        return load
    return load

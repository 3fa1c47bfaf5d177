"""The coordinator's checkpoints: every ``checkpoint.every`` rounds, take the state from peers and save it.

The coordinator holds no model of its own while the run goes: it downloads the state peers serve to
joiners (node/train/state.py: parameters, optimizer tensors, round) as a client-mode
averager, loads it into a scratch copy of the run's model and writes node.train.checkpoint's safetensors
format with the run config. Only the state more than half of the live trainers published (signed progress
records) is taken, from one of them, and it is checked whole against that round and model digest before
anything is copied (node/peer/state_sync.py). A new peer starts from a checkpoint with
``node.train.checkpoint.load_checkpoint``.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from pathlib import Path
from typing import Callable, Optional

from node.peer.state_sync import load_vouched_state
from node.swarm.averaging import RoundAverager
from node.swarm.dht import dht_get
from node.swarm.progress import KeyOf, majority_position, published_progress
from node.train.checkpoint import latest_checkpoint, read_checkpoint, save_checkpoint
from node.train.learner import Learner
from node.train.models import Policy
from node.train.warm_start import warm_started_policy
from protocol.config import RunConfig
from protocol.keys import tokens_key
from protocol.tasks import load_task

logger = logging.getLogger(__name__)

POLL_SECONDS = 1.0  # how often the furthest round is looked at (one small SQL query)
RETRY_SECONDS = 30.0  # after a try that found no newer state, wait this long (or for progress) to try again


def due_round(last_saved: int, config: RunConfig) -> int:
    """The next round at which a checkpoint is due after ``last_saved``: a multiple of ``checkpoint.every``,
    or the run's last round (``every`` = 0: only that one)."""
    every, last = config.checkpoint.every, config.run.rounds
    if every == 0:
        return last
    return min((last_saved // every + 1) * every, last)


def scratch_model(dht, config: RunConfig) -> tuple[Policy, Learner, RoundAverager]:
    """The run's policy and learner as SwarmPeer builds them (with LoRA, the frozen base comes from the warm
    start), and a client-mode averager of the same tensors to download peers' state with."""
    task = load_task(config.task.name, config.task.options)
    policy = warm_started_policy(config, task)
    learner = Learner(policy, config, task)
    return policy, learner, RoundAverager.for_run(dht, config, learner.params, client_mode=True)


class Checkpointer:
    """A thread that saves a checkpoint whenever the swarm has passed a due round.

    Construct it in the main thread: hivemind's averager start sets a signal handler, which only the main
    thread may do (and it sets SIGINT to ignored: install the process's own handlers after this).

    :param furthest_round: the furthest round peers reported running (the ledger's); the state they serve
      after it is of the next round
    :param root: folder of ``round-NNNNNN`` checkpoints; the latest one there is where it resumes
    :param key_of: the signing key of a registered, unbanned peer (None for anyone else): progress records
      count, and state may come from, only such peers
    """

    def __init__(self, dht, config: RunConfig, root: str | Path, furthest_round: Callable[[], int],
                 key_of: KeyOf, poll: float = POLL_SECONDS):
        self.dht, self.config, self.root = dht, config, Path(root)
        self.furthest_round, self.key_of, self.poll = furthest_round, key_of, poll
        latest = latest_checkpoint(self.root)
        self.last_saved = read_checkpoint(latest).round if latest is not None else 0
        self.policy, self.learner, self.averager = scratch_model(dht, config)
        self._last_miss: Optional[tuple[int, float]] = None  # (furthest round, time) of a fruitless try
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="checkpointer", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        self.averager.shutdown()

    def due(self) -> bool:
        """Whether peers should now hold a state past the next due round, and were not asked in vain at
        this progress just now (a download costs a whole model)."""
        furthest = self.furthest_round()
        if self.last_saved >= self.config.run.rounds or furthest + 1 < due_round(self.last_saved, self.config):
            return False
        return self._last_miss is None or self._last_miss[0] != furthest or \
            time.monotonic() > self._last_miss[1] + RETRY_SECONDS

    def _run(self) -> None:
        while not self._stop.wait(self.poll):
            if not self.due():
                continue
            furthest = self.furthest_round()
            try:
                path = self.take()
            except Exception as e:  # the run goes on; the next round's progress brings another try
                logger.warning(f"checkpoint not taken: {type(e).__name__}: {e}")
                path = None
            if path is None:
                self._last_miss = (furthest, time.monotonic())
            else:
                logger.info(f"saved checkpoint {path}")

    def take(self) -> Optional[Path]:
        """Download the state most live trainers vouch for and save it; None when there is none newer than the
        last checkpoint, or none of them served exactly it."""
        dht_get(self.dht, tokens_key(self.config.run.id))  # teaches our DHT node the tokens (run_records.TokenBook)
        progress = published_progress(self.dht, self.config.run.id, self.key_of)
        position = majority_position(progress)
        if position is None or position.round <= self.last_saved:
            logger.info(f"no newer state that most of the {len(progress)} live trainers vouch for")
            return None
        donors = [peer for peer, published in progress.items() if published == position]
        random.shuffle(donors)
        self.averager.set_admitted(donors)
        load = load_vouched_state(self.averager, self.learner, position, donors, self.config.swarm.state_timeout)
        if load.donor is None:
            return None
        path = save_checkpoint(self.root, position.round, self.policy.model, self.learner.optimizer,
                               self.config.to_dict())
        self.last_saved = position.round
        return path

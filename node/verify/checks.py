"""The checks a verifier runs on a trainer's round, in the order it runs them.

A failed verdict names the first check that failed; each attack of the shared catalogue
(node/bench/attacks.py) names the check that must catch it. Where each one is decided:

- judge.py: RECORD, SIGNATURE (the served bytes), BINDING (what the trainer sent into the all-reduce);
- audit.py: IDENTITY through SURPRISAL (the contribution and its rollouts, recomputed under θ_r);
- verifier.py: COMMITMENT (the trainer sent parts into the all-reduce but shows no contribution).
"""

from __future__ import annotations

import enum


class Check(enum.StrEnum):
    RECORD = "record"  # one record, of this run, kind and round, with a fresh nonce
    SIGNATURE = "signature"  # signed with the key the sender's token binds to its peer id
    IDENTITY = "identity"  # the contribution names the peer that signed it
    SHARD = "shard"  # its question ids are that peer's shard of the round
    DIGEST = "digest"  # the bundle hashes to the committed digest, parses, and agrees with the contribution
    REWARDS = "rewards"  # re-scoring the completions gives the bundle's rewards and the committed mean
    TOKEN_COUNT = "token_count"  # the batch's loss weight is the committed all-reduce weight
    SKETCH = "sketch"  # the committed sketch and norm agree with the units, and recomputed units with them
    LOGPROBS = "logprobs"  # the sampling log-probs are the prefill log-probs under θ_r
    SURPRISAL = "surprisal"  # the tokens are as likely under θ_r as sampling makes them
    BINDING = "binding"  # the reducers' reports of what it sent add up to its commitment, at its weight
    COMMITMENT = "commitment"  # it sent parts into the all-reduce, so it must show a contribution

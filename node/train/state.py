"""A learner's state as peers serve it to each other: parameters, optimizer tensors and the round.

A joining or resyncing peer, the verifier and the coordinator's checkpointer download it from a peer
(node/swarm/hivemind/averager.py carries it); it comes from a stranger, so ``load_served_state`` checks
it whole before a value is changed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list]:
    """The optimizer's state as flat named tensors ("<param index>.<key>") and its param groups."""
    state = optimizer.state_dict()
    tensors = {f"{index}.{key}": torch.as_tensor(value).detach().cpu().contiguous()
               for index, entries in state["state"].items() for key, value in entries.items()}
    return tensors, state["param_groups"]


def optimizer_state(tensors: dict[str, torch.Tensor], param_groups: list) -> dict:
    """The inverse of ``optimizer_tensors``: a state dict for ``Optimizer.load_state_dict``."""
    state: dict = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    return {"state": state, "param_groups": param_groups}


def served_state(params: Sequence[torch.nn.Parameter], optimizer: torch.optim.Optimizer,
                 round_: int) -> tuple[dict, list[torch.Tensor]]:
    """(metadata {round, optimizer_keys, param_groups}, tensors = parameters then optimizer tensors)."""
    tensors, groups = optimizer_tensors(optimizer)
    names = sorted(tensors)
    metadata = {"round": round_, "optimizer_keys": names, "param_groups": groups}
    return metadata, [p.detach().cpu().clone() for p in params] + [tensors[name] for name in names]


class StateError(ValueError):
    """A state served by a peer that does not fit the run's model; nothing was loaded."""


class IncompleteState(StateError):
    """A served state with fewer tensors than its metadata names: the stream ended early. A cut connection does
    that too, so it is no evidence against the donor (unlike every other misfit)."""


ADAM_STATE = {"step", "exp_avg", "exp_avg_sq"}  # what AdamW keeps per parameter (the learner's optimizer)


@dataclass(frozen=True)
class ServedState:
    """A served state that fits this model and optimizer, checked whole and not yet loaded."""

    round: int
    params: list[torch.Tensor]
    optimizer_state: dict


def check_served_state(params: Sequence[torch.nn.Parameter], optimizer: torch.optim.Optimizer, metadata: dict,
                       tensors: Sequence[torch.Tensor]) -> ServedState:
    """The state in ``served_state``'s format if it fits ``params`` and ``optimizer``; StateError naming the first
    misfit otherwise. Besides the shapes: every value finite, parameters of the same dtype, AdamW's moments
    shaped like their parameter and its second moment not negative, and the optimizer's hyperparameters (the
    run's) exactly this optimizer's: a served state carries values, never a learning rate."""
    try:
        round_, keys, groups = int(metadata["round"]), list(metadata["optimizer_keys"]), metadata["param_groups"]
    except (TypeError, KeyError, ValueError) as e:
        raise StateError(f"state metadata unreadable ({type(e).__name__}: {e})") from None
    if round_ < 0 or not all(isinstance(key, str) for key in keys) or len(set(keys)) != len(keys):
        raise StateError(f"state metadata invalid (round {round_}, optimizer keys {keys[:3]}...)")
    if len(tensors) < len(params) + len(keys):
        raise IncompleteState(f"state has only {len(tensors)} tensors, this model needs {len(params)} + {len(keys)}")
    if len(tensors) > len(params) + len(keys):
        raise StateError(f"state has {len(tensors)} tensors, this model needs {len(params)} + {len(keys)}")
    for index, (param, value) in enumerate(zip(params, tensors[:len(params)], strict=True)):
        if not isinstance(value, torch.Tensor) or value.shape != param.shape or value.dtype != param.dtype:
            raise StateError(f"state tensor {index} is {getattr(value, 'dtype', type(value).__name__)} "
                             f"{tuple(getattr(value, 'shape', ()))}, the parameter {param.dtype} {tuple(param.shape)}")
    own_groups = optimizer.state_dict()["param_groups"]
    if not _same_groups(groups, own_groups):
        raise StateError("state's optimizer hyperparameters differ from the run's")
    served = dict(zip(keys, tensors[len(params):], strict=True))
    for key, value in served.items():
        index, _, name = key.partition(".")
        known = index.isdigit() and int(index) < len(params) and name in ADAM_STATE
        if not (known and isinstance(value, torch.Tensor)):
            raise StateError(f"state has an optimizer tensor {key!r:.60} this optimizer does not keep")
        expected = () if name == "step" else tuple(params[int(index)].shape)
        if tuple(value.shape) != expected:
            raise StateError(f"optimizer tensor {key} has shape {tuple(value.shape)}, not {expected}")
    for index, value in enumerate(tensors):
        if not torch.isfinite(value).all():
            raise StateError(f"state tensor {index} has non-finite values")
    if any(bool((value < 0).any()) for key, value in served.items() if key.endswith((".exp_avg_sq", ".step"))):
        raise StateError("state has a negative second moment or step count")
    return ServedState(round_, list(tensors[:len(params)]), optimizer_state(served, own_groups))


def _same_groups(served, own: list) -> bool:
    """Whether served param groups equal ours; any structure a donor sends compares (tensors inside would make
    ``==`` raise)."""
    if not (isinstance(served, list) and len(served) == len(own) and all(isinstance(g, dict) for g in served)):
        return False
    try:
        return bool(served == own)
    except (RuntimeError, TypeError, ValueError):
        return False


def load_served_state(params: Sequence[torch.nn.Parameter], optimizer: torch.optim.Optimizer,
                      state: ServedState) -> int:
    """Copy a checked state into ``params`` and ``optimizer``; returns its round. All or nothing."""
    # load_state_dict validates the groups and keys before it replaces anything.
    backup = optimizer.state_dict()
    try:
        optimizer.load_state_dict(state.optimizer_state)
    except (ValueError, KeyError, TypeError, IndexError, RuntimeError) as e:
        optimizer.load_state_dict(backup)
        raise StateError(f"state's optimizer does not fit this model ({type(e).__name__}: {e})") from None
    with torch.no_grad():
        for param, value in zip(params, state.params, strict=True):
            param.copy_(value)
    return state.round

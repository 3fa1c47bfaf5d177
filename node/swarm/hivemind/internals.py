"""What the overrides in this package expect of hivemind's internals, checked in one place.

The overrides subclass hivemind classes and reach into private methods and attributes that hivemind may
change in any release. ``internals_problems`` lists every expectation that the installed hivemind does
not meet; importing ``node.swarm.hivemind`` raises ``HivemindMismatch`` naming them, so a different
hivemind fails at start-up with one clear message instead of misbehaving mid-round.
"""

from __future__ import annotations

import asyncio
import inspect
from typing import Callable

import hivemind
import torch
from hivemind.averaging import DecentralizedAverager
from hivemind.averaging.allreduce import AllReduceRunner
from hivemind.averaging.control import StepControl
from hivemind.averaging.key_manager import GroupKeyManager
from hivemind.averaging.matchmaking import Matchmaking
from hivemind.averaging.partition import TensorPartContainer, TensorPartReducer
from hivemind.compression import NoCompression, quantization, serialization
from hivemind.dht.protocol import DHTProtocol
from hivemind.utils.auth import TokenAuthorizerBase

from node.swarm.hivemind.parts import part_offsets

PINNED_VERSION = "1.1.12"


class HivemindMismatch(ImportError):
    """The installed hivemind is not the one the overrides were written for."""


def _methods(cls: type, *names: str) -> list[str]:
    return [f"{cls.__name__}.{name} is missing" for name in names if not callable(getattr(cls, name, None))]


def _source_has(function: Callable, *snippets: str) -> list[str]:
    """Snippets of code (attribute assignments, calls) that ``function``'s source no longer contains."""
    source = inspect.getsource(function)
    return [f"{function.__qualname__} no longer contains `{snippet}`" for snippet in snippets if snippet not in source]


def _parameters(function: Callable, *names: str) -> list[str]:
    known = inspect.signature(function).parameters
    return [f"{function.__qualname__} has no parameter {name!r}" for name in names if name not in known]


def _parts_are_views() -> list[str]:
    """parts.py reads a part's offset from its data pointer: the container must cut views of the inputs."""
    async def cut() -> list[str]:
        tensors = [torch.zeros(3000), torch.zeros(70, 30)]
        container = TensorPartContainer(tensors, (1.0, 1.0), compression=NoCompression(), part_size_bytes=4096)
        parts = [part for peer in range(2) for part in container.get_raw_input_parts(peer)]
        try:
            offsets = part_offsets(tensors, parts)
        except ValueError:
            return ["TensorPartContainer's parts are no longer views of the input tensors"]
        expected = [sum(part.numel() for part in parts[:i]) for i in range(len(parts))]
        return [] if offsets == expected else ["TensorPartContainer no longer cuts parts in flat order"]

    return asyncio.run(cut())


def internals_problems() -> list[str]:
    """Every expectation of the overrides that the installed hivemind does not meet (empty: all met)."""
    problems = [] if hivemind.__version__ == PINNED_VERSION else [
        f"hivemind {hivemind.__version__} is installed, the overrides were written for {PINNED_VERSION}"]
    # allreduce.py: ExactAllReduceRunner
    problems += _methods(AllReduceRunner, "_communicate_with_peer", "_accumulate_parts_streaming", "_ban_sender",
                         "finalize")
    problems += _parameters(AllReduceRunner.__init__, "p2p", "servicer_type", "prefix", "tensors", "group_id",
                            "ordered_peer_ids")
    problems += _source_has(AllReduceRunner.__init__, "self.tensor_part_container =",
                            "self.parts_for_local_averaging =", "self.tensor_part_reducer =", "self.sender_peer_ids =",
                            "self.banned_senders", "self.weight =")
    problems += _methods(TensorPartContainer, "register_processed_part", "get_raw_input_parts")
    problems += _parameters(TensorPartContainer.register_processed_part, "peer_index", "part_index", "part")
    problems += _source_has(TensorPartContainer.__init__, "self.return_deltas =", "self.local_tensors",
                            "self.compression", "self.prefetch =", "self.failed_size =")
    problems += _parts_are_views()
    # reducer.py: CheckedPartReducer and the ClippedSum accumulator
    problems += _methods(TensorPartReducer, "reset_accumulators", "accumulate_part")
    problems += _parameters(TensorPartReducer.accumulate_part, "sender_index", "part_index", "tensor_part", "weight")
    problems += _source_has(TensorPartReducer.accumulate_part, "self.accumulator.add_(tensor_part, alpha=weight)")
    problems += _source_has(TensorPartReducer.check_current_part_finished, "self.accumulator.div_(self.denominator)")
    # averager.py: ExactAverager and AdmittingMatchmaking
    problems += _methods(DecentralizedAverager, "_step", "_run_allreduce_inplace_",
                         "_shutdown", "rpc_join_group", "rpc_aggregate_part", "rpc_download_state", "get_current_state",
                         "get_tensors", "get_stub", "remove_p2p_handlers")
    problems += _source_has(DecentralizedAverager._run_internal, "self._matchmaking = Matchmaking(",
                            "getattr(self, method)(*args, **kwargs)")
    problems += _source_has(DecentralizedAverager.__init__, "self._outer_pipe", "self.lock_averaged_tensors =",
                            "self._running_groups", "self.next_chunk_timeout =")
    problems += _source_has(DecentralizedAverager._declare_for_download_periodically, ".all_averagers")
    problems += _source_has(DecentralizedAverager._aggregate_with_group,
                            "bandwidths, mode_ids, user_gathered_bytes = zip(*map(self.serializer.loads, "
                            "group_info.gathered))")
    problems += _methods(Matchmaking, "_request_join_group")
    # averager.py: matchmaking under the key of the step's round (group bits), from the step's own gather
    problems += _source_has(Matchmaking.__init__, "self.group_key_manager = GroupKeyManager(")
    problems += _source_has(GroupKeyManager.current_key.fget, "self.group_bits")
    problems += _source_has(Matchmaking._check_reasons_to_reject, "self.group_key_manager.current_key")
    if not isinstance(getattr(StepControl, "data_for_gather", None), property):
        problems.append("StepControl.data_for_gather is no longer a property")
    if not isinstance(getattr(StepControl, "began_allreduce", None), property):
        problems.append("StepControl.began_allreduce is no longer a property")
    # codecs.py: the 8-bit decoders registered by wire type
    registry = getattr(serialization, "_BASE_COMPRESSION_TYPES", None)
    if not isinstance(registry, dict) or not {"UNIFORM_8BIT", "QUANTILE_8BIT"} <= set(registry):
        problems.append("compression.serialization._BASE_COMPRESSION_TYPES no longer maps the 8-bit wire types")
    problems += _methods(quantization.Quantization, "extract", "quantize")
    problems += [f"quantization.{name} is missing" for name in ("average_buckets", "Uniform8BitQuantization",
                                                                "Quantile8BitQuantization")
                 if not hasattr(quantization, name)]
    # admission (authorizer.py): our token inside hivemind's, pushed into the DHT process
    problems += _methods(TokenAuthorizerBase, "get_token", "is_token_valid", "does_token_need_refreshing")
    problems += _source_has(TokenAuthorizerBase.__init__, "self._local_access_token = None")
    problems += _source_has(DHTProtocol.create, "self.authorizer = authorizer")
    return problems


def require_internals() -> None:
    problems = internals_problems()
    if problems:
        raise HivemindMismatch(f"node.swarm.hivemind overrides internals of hivemind {PINNED_VERSION} that the "
                               f"installed hivemind lacks (pin hivemind=={PINNED_VERSION}): " + "; ".join(problems))

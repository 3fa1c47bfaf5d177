"""An all-reduce without the network, for benchmarks: the real reducer, the real part split, the real codecs.
It mirrors what ExactAllReduceRunner (allreduce.py) does with each part, so it lives beside it.

Each reducer gets the parts hivemind's TensorPartContainer assigns it, each sender's part compressed and
decompressed as on the wire (a reducer's own part is not, as in ExactAllReduceRunner), and reduces them
with the real CheckedPartReducer. Its reports are the binding reports real reducers would sign.
"""

from __future__ import annotations

import asyncio
from typing import Sequence

import torch
from hivemind.averaging.partition import DEFAULT_PART_SIZE_BYTES, TensorPartContainer
from hivemind.compression import CompressionInfo, deserialize_torch_tensor

from node.swarm.hivemind.codecs import make_compression
from node.swarm.hivemind.parts import part_offsets
from node.swarm.hivemind.reducer import CheckedPartReducer, ReduceRules
from protocol import swarm_pb2


def simulate_allreduce(
    senders: Sequence[Sequence[torch.Tensor]],
    weights: Sequence[float],
    rules: ReduceRules,
    compression: str = "none",
    part_size_bytes: int = DEFAULT_PART_SIZE_BYTES,
) -> tuple[torch.Tensor, list[dict[str, swarm_pb2.PartSketch]]]:
    """(the flat average, each reducer's {sender: PartSketch}) of one all-reduce in which every sender also
    reduces an equal share; sender i is named str(i)."""
    codec = make_compression(compression)
    peers = len(senders)
    names = [str(sender) for sender in range(peers)]
    split = [TensorPartContainer(tensors, (1.0,) * peers, compression=codec, part_size_bytes=part_size_bytes)
             for tensors in senders]
    parts = [[container.get_raw_input_parts(reducer) for reducer in range(peers)] for container in split]

    def on_the_wire(sender: int, reducer: int, part: torch.Tensor) -> torch.Tensor:
        if sender == reducer:
            return part
        return deserialize_torch_tensor(codec.compress(part, CompressionInfo.from_tensor(part)))

    async def reduce(reducer: int) -> tuple[list[torch.Tensor], dict[str, swarm_pb2.PartSketch]]:
        own = parts[reducer][reducer]
        checked = CheckedPartReducer(tuple(part.shape for part in own), peers, rules=rules,
                                     part_offsets=part_offsets(senders[reducer], own))

        async def send(sender: int) -> list[torch.Tensor]:
            return [await checked.accumulate_part(sender, index, on_the_wire(sender, reducer, part), weights[sender])
                    for index, part in enumerate(parts[sender][reducer])]

        averaged = await asyncio.gather(*(send(sender) for sender in range(peers)))
        return averaged[0], checked.received_sketches(names)

    async def reduce_all():
        return [await reduce(reducer) for reducer in range(peers)]

    results = asyncio.run(reduce_all())
    return torch.cat([part.reshape(-1) for averaged, _ in results for part in averaged]), [r for _, r in results]

"""One swarm peer in its own process, driven by the tests through stdin and reporting JSON lines on stdout.

Commands (one per line): ``average ROUND [OPTION=VALUE ...]``, ``load_state TIMEOUT DONOR_PEER_ID``,
``admit all`` / ``admit PEER_ID,PEER_ID,...``, ``exit``.
Events: ready, result, state, admitted, stalled, lookup, bye. Averaged tensors go to ``--out-dir`` as .pt files.

``average`` options: ``seed`` (sketch seed: the result then carries the binding reports and this peer's
committed sketch), ``clip`` (clip factor), ``max_weight``, and two lies for attack tests: ``scale`` (send
the inputs times this, while committing to the sketch of the inputs) and ``weight`` (claim this weight
instead of ``--weight``, the committed one).

``--stall-at-round R`` injects a fault: in round R this peer's averager process freezes while serving
its second averaged part (mid all-reduce), announces ``stalled``, and the test then SIGKILLs or
SIGSTOPs the whole peer. ``--nan-reducer`` makes this peer a reducer that returns NaN for its parts.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import threading
import time
from pathlib import Path

import torch

from node.swarm.averaging import RoundAverager
from node.swarm.dht import LOOPBACK, DHTSettings, start_dht
from node.swarm.hivemind.allreduce import ExactAllReduceRunner
from protocol.config import SwarmSection
from protocol.sketch import sketch_tensors

STATE_METADATA = {"round": 7, "model": "test"}


def emit(event: str, **fields) -> None:
    print(json.dumps(dict(event=event, **fields)), flush=True)


def parse_shapes(text: str) -> list[tuple[int, ...]]:
    return [tuple(int(dim) for dim in shape.split("x")) for shape in text.split(",")]


def make_tensors(seed: int, shapes) -> list[torch.Tensor]:
    """The deterministic input of a peer in a round (the tests recompute it to check the average)."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator) for shape in shapes]


def input_seed(rank: int, round_: int) -> int:
    return 1000 * round_ + rank


def state_tensors(shapes) -> list[torch.Tensor]:
    return make_tensors(424242, shapes)


def arm_stall_fault(part_index: int = 1) -> mp.synchronize.Event:
    """Patch the reducer so that, once armed, the averager process hangs instead of encoding a part.
    The patch is inherited by the averager process, which is forked after this call."""
    armed = mp.Event()
    encode_average = ExactAllReduceRunner._encode_average

    def stalling_encode_average(runner, index, averaged_part):
        if armed.is_set() and index == part_index:
            emit("stalled", pid=os.getpid())
            while True:
                time.sleep(1)
        return encode_average(runner, index, averaged_part)

    ExactAllReduceRunner._encode_average = stalling_encode_average
    return armed


def arm_nan_reducer() -> None:
    """Patch the reducer so that every part this peer reduces comes back to its group as NaN (a lying reducer:
    every member receives the same bytes, so they agree on them). Inherited by the forked averager process."""
    encoded = ExactAllReduceRunner._encoded  # past the honest reducer's own check

    def nan_encoded(runner, index, averaged_part):
        return encoded(runner, index, torch.full_like(averaged_part, float("nan")))

    ExactAllReduceRunner._encoded = nan_encoded


AVERAGE_OPTIONS = {"seed": int, "clip": float, "max_weight": float, "scale": float, "weight": float}


def parse_options(params: list[str]) -> dict:
    options = dict(param.split("=", 1) for param in params)
    return {name: AVERAGE_OPTIONS[name](value) for name, value in options.items()}


def run_average(averager: RoundAverager, args, shapes, round_: int, options: dict) -> None:
    inputs = make_tensors(input_seed(args.rank, round_), shapes)
    tensors = [options.get("scale", 1.0) * t for t in inputs]
    originals = [t.clone() for t in tensors]
    seed = options.get("seed")
    outcome = averager.average(tensors, options.get("weight", args.weight), round_, sketch_seed=seed,
                               clip_factor=options.get("clip", 0.0), max_weight=options.get("max_weight"))
    if outcome.ok:
        torch.save(outcome.tensors, Path(args.out_dir) / f"rank{args.rank}_round{round_}.pt")
    report = outcome.report
    emit(
        "result",
        round=round_,
        ok=outcome.ok,
        group_size=outcome.group_size,
        digest=outcome.digest,
        seconds=outcome.seconds,
        reason=outcome.reason,
        failure=outcome.failure.kind if outcome.failure else None,
        culprits=outcome.culprits,
        dropped=outcome.dropped,
        inputs_unchanged=all(torch.equal(a, b) for a, b in zip(tensors, originals, strict=True)),
        members=report.members if report else [],
        group_id=report.group_id.hex() if report else "",
        received={sender: dict(weight=part.weight, offset=part.offset, length=part.length, sketch=list(part.sketch))
                  for sender, part in (report.received if report else {}).items()},
        committed=sketch_tensors(inputs, seed).tolist() if seed is not None else None,
    )


def serve_averager(args, dht) -> None:
    shapes = parse_shapes(args.shapes)
    stall = arm_stall_fault() if args.stall_at_round is not None else None
    if args.nan_reducer:
        arm_nan_reducer()
    metadata = dict(STATE_METADATA, round=args.state_round)
    swarm = SwarmSection(compression=args.compression, target_group_size=args.target_group_size,
                         matchmaking_time=args.matchmaking_time, allreduce_timeout=args.allreduce_timeout,
                         next_chunk_timeout=args.next_chunk_timeout, agreement_timeout=args.agreement_timeout)
    averager = RoundAverager(dht, shapes, swarm, prefix="test",
                             state_provider=(lambda: (metadata, state_tensors(shapes))) if args.serve_state else None)
    emit("ready", maddrs=[str(m) for m in dht.get_visible_maddrs()], peer_id=averager.peer_id,
         max_seconds=averager.max_seconds)
    in_flight = None
    for line in sys.stdin:
        command, *params = line.split()
        if command == "average":
            round_ = int(params[0])
            if stall is not None and round_ == args.stall_at_round:
                stall.set()
            in_flight = threading.Thread(target=run_average,
                                         args=(averager, args, shapes, round_, parse_options(params[1:])))
            in_flight.start()
        elif command == "load_state":
            loaded = averager.download_state(params[1], timeout=float(params[0]))
            if loaded is not None:
                torch.save(loaded[1], Path(args.out_dir) / f"rank{args.rank}_state.pt")
            emit("state", loaded=loaded is not None, metadata=loaded[0] if loaded else None)
        elif command == "admit":
            averager.set_admitted(None if params[0] == "all" else params[0].split(","))
            emit("admitted")
        elif command == "exit":
            break
    started = time.monotonic()
    averager.shutdown()
    if in_flight is not None:
        in_flight.join()
    emit("bye", shutdown_seconds=time.monotonic() - started)


def serve_dht(args, dht) -> None:
    """DHT only: publish and/or look up one key, so two workers can show that they are connected."""
    if args.publish:
        dht.store(args.publish, args.rank, expiration_time=time.time() + 600)
    found = dht.get(args.lookup, latest=True) if args.lookup else None
    emit("ready", maddrs=[str(m) for m in dht.get_visible_maddrs()], peer_id=str(dht.peer_id),
         lookup=found.value if found else None)
    for line in sys.stdin:
        if line.strip() == "exit":
            break


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=["averager", "dht"], default="averager")
    parser.add_argument("--initial-peers", nargs="*", default=[])
    parser.add_argument("--client-mode", action="store_true")
    parser.add_argument("--rank", type=int, default=0)
    parser.add_argument("--weight", type=float, default=1.0)
    parser.add_argument("--shapes", default="1024x1024,1000,7")
    parser.add_argument("--compression", default="none")
    parser.add_argument("--target-group-size", type=int, default=64)
    parser.add_argument("--matchmaking-time", type=float, default=2.0)
    parser.add_argument("--allreduce-timeout", type=float, default=10.0)
    parser.add_argument("--next-chunk-timeout", type=float, default=3.0)
    parser.add_argument("--agreement-timeout", type=float, default=5.0)
    parser.add_argument("--serve-state", action="store_true")
    parser.add_argument("--state-round", type=int, default=STATE_METADATA["round"], help="in the state served")
    parser.add_argument("--stall-at-round", type=int, default=None)
    parser.add_argument("--nan-reducer", action="store_true", help="return NaN for every part this peer reduces")
    parser.add_argument("--publish", default=None)
    parser.add_argument("--lookup", default=None)
    parser.add_argument("--out-dir", default=".")
    args = parser.parse_args()

    dht = start_dht(DHTSettings(initial_peers=args.initial_peers, host_maddrs=[LOOPBACK], client_mode=args.client_mode,
                                join_retries=2), backoff=0.5)
    try:
        (serve_dht if args.mode == "dht" else serve_averager)(args, dht)
    finally:
        dht.shutdown()


if __name__ == "__main__":
    main()

"""``grpo-swarm bench allreduce``: time the gradient all-reduce among N local peer processes.

Next to the measured time it puts the bandwidth bound of a butterfly all-reduce, 2(N-1)/N x bytes /
bandwidth, with the loopback bandwidth measured in the same run, so a slow result can be told apart
from a slow machine. (All peers share one machine's loopback and CPUs here, so the machine as a whole
moves N times the bytes of one link; the per-link bound is still the one a real swarm is held to.)
Each peer also checks its result against the exact weighted mean.
"""

from __future__ import annotations

import math
import multiprocessing as mp
import os
import signal
import socket
import statistics
import time
from typing import Optional

import torch
from hivemind.compression import CompressionInfo
from rich.console import Console
from rich.table import Table

from node.swarm.averaging import RoundAverager
from node.swarm.dht import LOOPBACK, DHTSettings, start_dht
from node.swarm.hivemind.codecs import make_compression
from protocol.config import ConfigError, SwarmSection

BANDWIDTH_PROBE_BYTES = 256 * 2**20
CHUNK_BYTES = 2**20
REASON_WIDTH = 100  # characters of each failure reason shown in the table
PEER_DEADLINE = 600.0  # seconds for a whole bench run before stragglers are killed


def run_allreduce_bench(peers: int, size_mb: float, rounds: int, swarm: Optional[SwarmSection] = None,
                        probe_bytes: int = BANDWIDTH_PROBE_BYTES) -> dict:
    """All-reduce ``size_mb`` MB of fp32 among ``peers`` processes for ``rounds`` rounds, with ``swarm``'s
    timeouts and compression (its group sizes are set to ``peers``); returns the timings."""
    if peers < 2 or rounds < 1 or size_mb <= 0:
        raise ConfigError("need --peers >= 2, --rounds >= 1, --size > 0")
    swarm = (swarm or SwarmSection()).replaced(min_group_size=peers, target_group_size=peers)
    compression = swarm.compression
    numel = max(1, int(size_mb * 2**20 / 4))
    bandwidth = measure_loopback_bandwidth(probe_bytes)
    rows_by_rank = _run_peers(peers, numel, rounds, swarm)

    payload = 4 * numel
    tensor_info = CompressionInfo.from_tensor(torch.empty(0))
    wire = payload * make_compression(compression).estimate_compression_ratio(tensor_info)
    per_round = []
    for round_ in range(rounds):
        rows = [rows_by_rank[rank][round_] for rank in range(peers)]
        per_round.append(
            dict(
                round=round_,
                ok=sum(row["ok"] for row in rows),
                allreduce_seconds=max(row["allreduce_seconds"] for row in rows),
                seconds=max(row["seconds"] for row in rows),
                max_abs_error=max((row["max_abs_error"] for row in rows if row["ok"]), default=math.nan),
                reasons=sorted({row["reason"] for row in rows if row["reason"]}),
            )
        )
    ok_rounds = [row for row in per_round if row["ok"] == peers]
    return dict(
        peers=peers,
        compression=compression,
        payload_bytes=payload,
        wire_bytes=wire,
        loopback_bytes_per_second=bandwidth,
        bound_seconds=2 * (peers - 1) / peers * wire / bandwidth,
        median_allreduce_seconds=statistics.median(r["allreduce_seconds"] for r in ok_rounds) if ok_rounds else None,
        median_seconds=statistics.median(r["seconds"] for r in ok_rounds) if ok_rounds else None,
        max_abs_error=max((r["max_abs_error"] for r in ok_rounds), default=None),
        rounds=per_round,
    )


def measure_loopback_bandwidth(total_bytes: int = BANDWIDTH_PROBE_BYTES) -> float:
    """Bytes per second through a TCP socket on 127.0.0.1 from another process to this one."""
    context = mp.get_context("spawn")
    with socket.create_server(("127.0.0.1", 0)) as server:
        server.settimeout(60)  # the sender needs a few seconds to start (spawn imports torch)
        sender = context.Process(target=_send_bytes, args=(server.getsockname()[1], total_bytes), daemon=True)
        sender.start()
        try:
            connection, _ = server.accept()
            with connection:
                buffer = memoryview(bytearray(CHUNK_BYTES))
                received = connection.recv_into(buffer)
                started = time.perf_counter()  # from the first byte: the sender's start-up is not bandwidth
                while received < total_bytes:
                    count = connection.recv_into(buffer)
                    if count == 0:
                        raise ConnectionError("bandwidth probe: sender closed early")
                    received += count
                first_chunk = min(CHUNK_BYTES, total_bytes)
                return (total_bytes - first_chunk) / max(time.perf_counter() - started, 1e-9)
        finally:
            sender.join(10)
            if sender.is_alive():
                sender.kill()


def _send_bytes(port: int, total_bytes: int) -> None:
    chunk = b"\0" * CHUNK_BYTES
    with socket.create_connection(("127.0.0.1", port)) as connection:
        for offset in range(0, total_bytes, CHUNK_BYTES):
            connection.sendall(chunk[: min(CHUNK_BYTES, total_bytes - offset)])


def _run_peers(peers: int, numel: int, rounds: int, swarm: SwarmSection) -> dict:
    """Start the peers (rank 0 first: the others bootstrap from it) and collect {rank: rows}."""
    context = mp.get_context("spawn")
    maddrs, results = context.Queue(), context.Queue()
    barrier = context.Barrier(peers)
    processes = [
        context.Process(target=_bench_peer, args=(rank, peers, numel, rounds, swarm, maddrs, barrier, results))
        for rank in range(peers)
    ]
    for process in processes:
        process.start()
    try:
        deadline = time.monotonic() + PEER_DEADLINE
        rows_by_rank = {}
        while len(rows_by_rank) < peers:
            rank, rows = results.get(timeout=max(deadline - time.monotonic(), 0.01))
            if rows is None:
                raise RuntimeError(f"bench peer {rank} failed")
            rows_by_rank[rank] = rows
        return rows_by_rank
    finally:
        for process in processes:
            process.join(30)
            if process.is_alive():  # each peer leads its own process group (DHT, averager, p2pd)
                os.killpg(process.pid, signal.SIGKILL)
                process.join(10)


def _bench_peer(rank, peers, numel, rounds, swarm, maddrs, barrier, results) -> None:
    os.setsid()
    rows: Optional[list] = None
    try:
        initial_peers = [] if rank == 0 else maddrs.get(timeout=120)
        dht = start_dht(DHTSettings(initial_peers=initial_peers, host_maddrs=[LOOPBACK]))
        if rank == 0:
            for _ in range(peers - 1):
                maddrs.put([str(maddr) for maddr in dht.get_visible_maddrs()])
        averager = RoundAverager(dht, [(numel,)], swarm, prefix="bench")
        try:
            rows = [_bench_round(averager, rank, peers, numel, round_, barrier) for round_ in range(rounds)]
        finally:
            averager.shutdown()
            dht.shutdown()
    finally:
        results.put((rank, rows))


def _bench_round(averager: RoundAverager, rank: int, peers: int, numel: int, round_: int, barrier) -> dict:
    tensor = _peer_tensor(rank, round_, numel)
    barrier.wait(timeout=averager.max_seconds)
    outcome = averager.average([tensor], weight=_peer_weight(rank), round_=round_)
    error = math.nan
    if outcome.ok:
        exact = sum(_peer_weight(r) * _peer_tensor(r, round_, numel) for r in range(peers))
        error = (outcome.tensors[0] - exact / sum(map(_peer_weight, range(peers)))).abs().max().item()
    return dict(
        ok=outcome.ok,
        seconds=outcome.seconds,
        allreduce_seconds=outcome.allreduce_seconds,
        max_abs_error=error,
        reason=outcome.reason,
    )


def _peer_tensor(rank: int, round_: int, numel: int) -> torch.Tensor:
    return torch.randn(numel, generator=torch.Generator().manual_seed(1000 * round_ + rank))


def _peer_weight(rank: int) -> float:
    return float(100 * (rank + 1))  # unequal token counts, so the weighting is exercised


def print_allreduce_table(result: dict, console: Optional[Console] = None) -> None:
    console = console or Console()
    table = Table(title=f"all-reduce: {result['peers']} peers, {result['payload_bytes'] / 2**20:.1f} MB fp32, "
                        f"compression {result['compression']}")
    for column in ("round", "peers ok", "all-reduce s", "round s", "max abs error", "failures"):
        table.add_column(column, justify="left" if column == "failures" else "right")
    for row in result["rounds"]:
        table.add_row(
            str(row["round"]),
            f"{row['ok']}/{result['peers']}",
            f"{row['allreduce_seconds']:.3f}",
            f"{row['seconds']:.3f}",
            f"{row['max_abs_error']:.2e}",
            "; ".join(reason[:REASON_WIDTH] for reason in row["reasons"]),
        )
    console.print(table)
    console.print(
        f"loopback {result['loopback_bytes_per_second'] / 1e9:.2f} GB/s; "
        f"bound 2(N-1)/N x {result['wire_bytes'] / 2**20:.1f} MB on the wire / bandwidth = "
        f"{result['bound_seconds']:.3f} s; median all-reduce {_seconds(result['median_allreduce_seconds'])}, "
        f"median round (with matchmaking and agreement) {_seconds(result['median_seconds'])}"
    )


def _seconds(value: Optional[float]) -> str:
    return "n/a (no round succeeded)" if value is None else f"{value:.3f} s"

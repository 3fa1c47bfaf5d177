"""The round-data RPC between two real DHT peers on 127.0.0.1: chunked bundles, history, admission."""

import os

import pytest

from node.swarm.dht import start_dht
from node.swarm.rpc import CHUNK_BYTES, PeerService, RpcError

LOOPBACK = ["/ip4/127.0.0.1/tcp/0"]


@pytest.fixture
def two_peers():
    dhts, services = [], []
    try:
        first = start_dht(host_maddrs=LOOPBACK, retries=1)
        dhts.append(first)
        second = start_dht([str(m) for m in first.get_visible_maddrs()], host_maddrs=LOOPBACK, retries=1)
        dhts.append(second)
        server = PeerService(first, "run", history=2, is_admitted=lambda peer: peer == str(second.peer_id)).start()
        services.append(server)
        client = PeerService(second, "run", history=2, is_admitted=lambda peer: False).start()
        services.append(client)
        yield server, client
    finally:
        for service in services:
            service.stop()
        for dht in dhts:
            dht.shutdown()
            dht.join(10)
        assert not any(dht.is_alive() for dht in dhts)


def test_a_peer_serves_what_it_kept_for_its_last_rounds_only_to_admitted_peers(two_peers):
    server, client = two_peers
    bundle = os.urandom(2 * CHUNK_BYTES + 123)  # streamed in three chunks
    server.keep(1, "contribution", [b"old"], b"x")
    server.keep(2, "contribution", [b"record"], bundle)
    server.keep(2, "bindings", [b"a", b"b"])
    server.keep(3, "contribution", [b"newest"], b"")

    assert client.fetch(server.peer_id, 2, "contribution", timeout=20) == ([b"record"], bundle)
    assert client.fetch(server.peer_id, 2, "bindings", timeout=20) == ([b"a", b"b"], b"")
    assert client.fetch(server.peer_id, 3, "contribution", timeout=20) == ([b"newest"], b"")
    with pytest.raises(RpcError, match=r"no 'contribution' held for round 1 \(holding rounds \[2, 3\]\)"):
        client.fetch(server.peer_id, 1, "contribution", timeout=20)

    client.keep(5, "contribution", [b"mine"])
    with pytest.raises(RpcError, match="not admitted to this run"):  # the client admits nobody
        server.fetch(client.peer_id, 5, "contribution", timeout=20)
